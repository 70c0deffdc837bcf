"""Export several Klaviyo accounts: one pipeline and one dataset per account.

    python pipelines/klaviyo_accounts_pipeline.py --accounts eu,us

Account `eu` runs as pipeline `klaviyo_segments_eu` into dataset `klaviyo_eu`, with its own
cursors and its own key, found by dlt under the pipeline's name first:
KLAVIYO_SEGMENTS_EU__SOURCES__KLAVIYO__API_KEY, or in .dlt/secrets.toml

    [klaviyo_segments_eu.sources.klaviyo]
    api_key = "pk_..."

Separate datasets keep each account's `replace` tables, deleted-segment detection and state
apart; `klaviyo_source.views.account_union_sql` writes the SQL that queries them together.
One account failing does not stop the others; the exit status is 1 if any failed.
"""

import argparse
import sys
from typing import List, Optional, Sequence

import dlt
from dlt.common.configuration.exceptions import ConfigFieldMissingException
from dlt.pipeline.exceptions import PipelineStepFailed
from klaviyo_pipeline import (
    _one_line,
    _root_cause,
    build_parser,
    cap_duckdb_memory,
    run_and_report,
    show_progress,
)

from klaviyo_source import klaviyo
from klaviyo_source.errors import KlaviyoError


def account_names(value: str) -> List[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names or not all(name.replace("_", "").isalnum() for name in names):
        raise argparse.ArgumentTypeError("names of letters, digits and _, e.g. eu,us")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--accounts", type=account_names, required=True, help="comma-separated account names"
    )
    args = parser.parse_args(argv)
    show_progress(args)
    cap_duckdb_memory(args)
    failed = 0
    for account in args.accounts:
        print(f"== account {account}")
        try:
            pipeline = dlt.pipeline(
                pipeline_name=f"klaviyo_segments_{account}",
                destination=args.destination,
                dataset_name=f"{args.dataset_name}_{account}",
            )
            run_and_report(pipeline, klaviyo(), args)
        except (KlaviyoError, PipelineStepFailed, ConfigFieldMissingException) as error:
            failed += 1
            print(f"error: account {account}: {_one_line(_root_cause(error))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
