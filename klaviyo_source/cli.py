"""Export Klaviyo segments, tags and segment membership into DuckDB or any dlt destination.

The `klaviyo-export` command, installed with the package:

    klaviyo-export                                   # Klaviyo -> klaviyo_segments.duckdb
    klaviyo-export --demo                            # simulator -> klaviyo_demo.duckdb
    klaviyo-export --destination postgres --segments Y6nRLr,TxVpCr
    klaviyo-export --segment-name 'VIP, "gold"' --segment-name 'Newsletter'

The key comes the dlt way: SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] api_key in
.dlt/secrets.toml; every other option lives in .dlt/config.toml. A run exports into the
pipeline `klaviyo_segments` (`klaviyo_demo` with --demo), so `dlt pipeline klaviyo_segments
info|trace|drop` work after it. Every failure is one line on stderr and exit status 1.
"""

import argparse
import contextlib
import logging
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import dlt
from dlt.common.destination import LOADER_FILE_FORMATS
from dlt.common.exceptions import DltException

from . import klaviyo
from .errors import KlaviyoError
from .export import ExportFailed, ExportReport, KlaviyoExport, one_line

PIPELINE_NAME = "klaviyo_segments"
DEMO_PIPELINE_NAME = "klaviyo_demo"
DEMO_SEED = 7
DEMO_DATABASE = "klaviyo_demo.duckdb"
# The demo's segment reports reach this many days back: two requests, answered at once at
# Klaviyo's real 2/min, where the whole history would take minutes to read.
DEMO_REPORT_DAYS = 120
DUCKDB_CREDENTIALS = "DESTINATION__DUCKDB__CREDENTIALS"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# What exports one account: the command's own, or a pipeline script's spelled-out copy.
ExportAccount = Callable[[argparse.Namespace], ExportReport]


class UsageError(Exception):
    """A command-line value the run cannot use; the message names it and the fix."""


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog=(
            f"After a run: dlt pipeline {PIPELINE_NAME} info|trace|drop "
            f"(dlt pipeline {DEMO_PIPELINE_NAME} ... after --demo)."
        ),
    )
    parser.add_argument("--destination", default="duckdb", help="any dlt destination (duckdb)")
    parser.add_argument("--dataset-name", default="klaviyo", help="dataset/schema (klaviyo)")
    parser.add_argument("--segments", help="comma-separated segment ids to export (all)")
    parser.add_argument(
        "--segment-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a segment name to export, exactly as in Klaviyo; repeat the flag for more. Any "
        "name works, with commas, quotes or emoji: --segment-name 'VIP, \"gold\"'",
    )
    parser.add_argument(
        "--segment-names",
        help="comma-separated segment names to export (names without commas; see "
        "--segment-name). A selected id or name Klaviyo does not have fails the run",
    )
    parser.add_argument(
        "--memberships-only",
        action="store_true",
        help="load memberships without profile attributes",
    )
    parser.add_argument(
        "--reconcile",
        choices=["counts", "all", "off"],
        help="how leaves are found this run: 'all' walks every segment in full now "
        "(default from config: counts)",
    )
    parser.add_argument(
        "--full-refresh",
        action="store_true",
        help="start over: drop every table and cursor of this source before anything is read, "
        "then export Klaviyo's current membership as if for the first time (the history of "
        "ended memberships is gone)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"serve a generated account from the bundled simulator and export it into "
        f"pipeline {DEMO_PIPELINE_NAME} and {DEMO_DATABASE} (no API key)",
    )
    parser.add_argument(
        "--demo-profiles", type=int, default=3000, help="demo account size, 1 or more (3000)"
    )
    parser.add_argument(
        "--progress",
        choices=["log", "tqdm", "enlighten", "alive_progress"],
        help="dlt's own progress display of its extract, normalize and load steps; it counts "
        "dlt's resources and items, not segments: the per-segment lines show those (log needs "
        "no extra package)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-segment lines")
    parser.add_argument(
        "--loader-file-format",
        choices=sorted(LOADER_FILE_FORMATS),
        help="dlt loader file format; default parquet for duckdb (Arrow tables load as they are)",
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser(__doc__.splitlines()[0]).parse_args(argv)


def _csv(value: Optional[str]) -> List[str]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else []


def source_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Source arguments given on the command line; the rest comes from config and env."""
    options: Dict[str, Any] = {}
    if args.segments:
        options["segment_ids"] = _csv(args.segments)
    names = [*args.segment_name, *_csv(args.segment_names)]
    if names:
        options["segment_names"] = names
    if args.memberships_only:
        options["include_profiles"] = False
    if args.reconcile:
        options["reconcile"] = args.reconcile
    return options


def exporter(args: argparse.Namespace, pipeline: dlt.Pipeline) -> KlaviyoExport:
    """The export of the command-line options into `pipeline`."""
    return KlaviyoExport(
        pipeline, full_refresh=args.full_refresh, loader_file_format=args.loader_file_format
    )


def export_account(args: argparse.Namespace) -> ExportReport:
    """Export the configured Klaviyo account into the pipeline `klaviyo_segments`."""
    pipeline = dlt.pipeline(
        pipeline_name=PIPELINE_NAME,
        destination=args.destination,
        dataset_name=args.dataset_name,
        progress=args.progress,
    )
    return exporter(args, pipeline).run(klaviyo(**source_options(args)))


def export_demo(args: argparse.Namespace) -> ExportReport:
    """Export a generated account, served by the bundled simulator, into its own pipeline.

    Its own pipeline name and DuckDB file keep it apart from a real account's state and tables.
    """
    if args.demo_profiles < 1:
        raise UsageError(
            f"--demo-profiles must be 1 or more (it was {args.demo_profiles}): give the number "
            "of profiles the demo account should have, e.g. --demo-profiles 3000."
        )
    with demo_simulator(args.demo_profiles) as served:
        pipeline = dlt.pipeline(
            pipeline_name=DEMO_PIPELINE_NAME,
            destination=demo_destination(args),
            dataset_name=args.dataset_name,
            progress=args.progress,
        )
        return exporter(args, pipeline).run(klaviyo(**source_options(args), **served))


@contextlib.contextmanager
def demo_simulator(profiles: int) -> Iterator[Dict[str, Any]]:
    """Start the bundled simulator and yield the source settings that point at it."""
    from .simulator import KlaviyoSimulator, generate_account

    account = generate_account(seed=DEMO_SEED, profiles=profiles, memberships=profiles * 3)
    with KlaviyoSimulator(account) as simulator:
        print(f"Demo: simulated Klaviyo account served at {simulator.base_url}")
        reports_start = datetime.now(timezone.utc).date() - timedelta(days=DEMO_REPORT_DAYS - 1)
        yield {
            "api_key": simulator.api_key,
            "base_url": simulator.base_url,
            "segment_reports_start": reports_start.isoformat(),
        }


def demo_destination(args: argparse.Namespace) -> Any:
    """The demo writes its own DuckDB file, so it never mixes into a real account's tables."""
    if args.destination == "duckdb" and not os.environ.get(DUCKDB_CREDENTIALS):
        return dlt.destinations.duckdb(str(Path.cwd() / DEMO_DATABASE))
    return args.destination


@contextlib.contextmanager
def segment_lines_shown(quiet: bool) -> Iterator[None]:
    """While the block runs, the source's per-segment lines (rows, requests) go to stdout.

    The source's logger is put back as it was afterwards, for a host that calls `main` twice.
    """
    source_logger = logging.getLogger("klaviyo_source")
    level, propagate = source_logger.level, source_logger.propagate
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    source_logger.addHandler(handler)
    source_logger.setLevel(logging.WARNING if quiet else logging.INFO)
    source_logger.propagate = False
    try:
        yield
    finally:
        source_logger.removeHandler(handler)
        source_logger.setLevel(level)
        source_logger.propagate = propagate


def start_dlt_runtime() -> None:
    """Set up dlt's runtime (its logging) now, so that a bad runtime setting fails first.

    dlt does it on the first read of any setting and raises Python's own ValueError for a
    log level logging does not know.
    """
    try:
        dlt.config.get("runtime.log_level")
    except DltException:
        raise  # a runtime setting of the wrong type: dlt's error names it
    except ValueError as error:
        raise UsageError(
            "The configured [runtime] log_level is not a log level: set RUNTIME__LOG_LEVEL or "
            f"log_level under [runtime] in .dlt/config.toml to one of {', '.join(LOG_LEVELS)}."
        ) from error


def print_report(report: ExportReport) -> None:
    print(report.load_info)
    print(report.summary)


def main(argv: Optional[Sequence[str]] = None, export: ExportAccount = export_account) -> int:
    """Run the command; `export` builds and runs the pipeline of a real account."""
    args = parse_args(argv)
    try:
        with segment_lines_shown(args.quiet):
            start_dlt_runtime()
            report = export_demo(args) if args.demo else export(args)
    except ExportFailed as error:
        if error.report is not None:
            print_report(error.report)
        return _fail(str(error))
    except UsageError as error:
        return _fail(str(error))
    except (KlaviyoError, DltException) as error:
        return _fail(one_line(error))
    print_report(report)
    return 0


def _fail(line: str) -> int:
    # One line, cause and fix: a scheduler's log shows it as it is.
    print(f"error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
