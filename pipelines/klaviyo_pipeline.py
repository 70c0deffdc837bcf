"""Export Klaviyo segments, tags and segment membership into DuckDB or any dlt destination.

    python pipelines/klaviyo_pipeline.py                      # Klaviyo -> klaviyo_segments.duckdb
    python pipelines/klaviyo_pipeline.py --demo               # simulator -> klaviyo_demo.duckdb
    python pipelines/klaviyo_pipeline.py --destination postgres --segments Y6nRLr,TxVpCr

It takes every option of the `klaviyo-export` command (see --help) and runs the same export.
The pipeline is spelled out below because `dlt deploy` reads its name and run from this file.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

# Read the project's .dlt/ (config, secrets) from whatever directory the script is started in:
# schedulers (dlt deploy's GitHub workflow among them) start it from pipelines/.
os.environ.setdefault("DLT_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))

import dlt  # noqa: E402

from klaviyo_source import klaviyo  # noqa: E402
from klaviyo_source.cli import exporter, source_options  # noqa: E402
from klaviyo_source.cli import main as run_command  # noqa: E402
from klaviyo_source.export import ExportReport  # noqa: E402


def export_account(args: argparse.Namespace) -> ExportReport:
    pipeline = dlt.pipeline(
        pipeline_name="klaviyo_segments",
        destination=args.destination,
        dataset_name=args.dataset_name,
        progress=args.progress,
    )
    return exporter(args, pipeline).run(klaviyo(**source_options(args)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the options, export (or run --demo), print a summary; 1 and one line on failure."""
    return run_command(argv, export=export_account)


if __name__ == "__main__":
    sys.exit(main())
