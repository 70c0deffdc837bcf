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
from dlt.common.exceptions import DltException

from klaviyo_source import klaviyo
from klaviyo_source.cli import build_parser, exporter, print_report, segment_lines_shown
from klaviyo_source.errors import KlaviyoError
from klaviyo_source.export import ExportFailed, one_line


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
    with segment_lines_shown(args.quiet):
        failed = [account for account in args.accounts if not export_account(args, account)]
    return 1 if failed else 0


def export_account(args: argparse.Namespace, account: str) -> bool:
    """Export one account into its own pipeline and dataset; False, and one line, if it failed."""
    print(f"== account {account}")
    try:
        pipeline = dlt.pipeline(
            pipeline_name=f"klaviyo_segments_{account}",
            destination=args.destination,
            dataset_name=f"{args.dataset_name}_{account}",
        )
        print_report(exporter(args, pipeline).run(klaviyo()))
    except ExportFailed as error:
        if error.report is not None:
            print_report(error.report)
        print(f"error: account {account}: {error}", file=sys.stderr)
        return False
    except (KlaviyoError, DltException) as error:
        print(f"error: account {account}: {one_line(error)}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
