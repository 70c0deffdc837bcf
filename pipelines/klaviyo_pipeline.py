"""Export Klaviyo segments, tags and segment membership into DuckDB or any dlt destination.

    python pipelines/klaviyo_pipeline.py                      # Klaviyo -> klaviyo_segments.duckdb
    python pipelines/klaviyo_pipeline.py --demo               # simulator -> klaviyo_demo.duckdb
    python pipelines/klaviyo_pipeline.py --destination postgres --segments Y6nRLr,TxVpCr

The key comes the dlt way: SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] api_key in
.dlt/secrets.toml; every other option lives in .dlt/config.toml. The pipeline is always named
`klaviyo_segments`, so `dlt pipeline klaviyo_segments info|show|trace|drop` work after a run.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

# Read the project's .dlt/ (config, secrets) from whatever directory the script is started in:
# schedulers (dlt deploy's GitHub workflow among them) start it from pipelines/.
os.environ.setdefault("DLT_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))
# Arrow's default allocator keeps what it frees for later; the system allocator returns it,
# which keeps a long export's memory flat. Read once, when pyarrow is first imported.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import dlt  # noqa: E402
import duckdb  # noqa: E402
from dlt.common.configuration.exceptions import (
    ConfigFieldMissingException,
    ConfigurationException,
    ConfigValueCannotBeCoercedException,
)
from dlt.common.configuration.specs import RuntimeConfiguration
from dlt.common.destination import LOADER_FILE_FORMATS
from dlt.common.pipeline import LoadInfo
from dlt.pipeline.exceptions import PipelineStepFailed

from klaviyo_source import klaviyo
from klaviyo_source.errors import KlaviyoError
from klaviyo_source.process_memory import managed_for_an_export
from klaviyo_source.settings import WALK_BATCH_PROFILES
from klaviyo_source.summary import failed_segments, membership_summary
from klaviyo_source.views import create_views

PIPELINE_NAME = "klaviyo_segments"
DEMO_SEED = 7
DEMO_DATABASE = "klaviyo_demo.duckdb"
DUCKDB_CREDENTIALS = "DESTINATION__DUCKDB__CREDENTIALS"
DUCKDB_GLOBAL_CONFIG = "destination.duckdb.credentials.global_config"
# DuckDB takes 80 % of the machine's memory by default, and a merge of a million rows used
# 1.4 GB of it; under a cap it spills to a temporary file instead. Since the walk tables'
# merges skip deduplication, a merge of 1M memberships with profiles loads in about 6 s under
# 64 MB (a first export appends, in about 3.5 s), with DuckDB's share of the peak about 120 MB
# (150 MB at 96 MB, 200 MB at 128 MB). Each thread reads a row group at once, so the threads
# are two whatever the machine: profiles of 20 KB each in 500-row groups loaded with two
# threads under 64 MB as under 96 MB (30 KB failed under both), but not with eight. Insertion
# order is not kept: dlt does not need it, and it costs memory.
DUCKDB_SETTINGS = {"memory_limit": "64MB", "threads": 2, "preserve_insertion_order": False}
# One table loads at a time, so the cap serves one reader: at 1M, 15 MB less, as fast.
DUCKDB_LOAD_WORKERS = 1
LOAD_WORKERS = "load.workers"
# A parquet reader holds a whole row group, and dlt writes what it has buffered as one: 6,000
# profiles of 20 KB would not fit under the cap. Flushing every 500 rows (the walk's profile
# tables) keeps row groups of wide profiles small; membership tables are written whole.
PARQUET_BUFFER_ROWS = WALK_BATCH_PROFILES
BUFFER_MAX_ITEMS = "data_writer.buffer_max_items"
# DuckDB reads each jsonl or csv file through a 32 MB buffer of its own: under 128 MB a 1M
# jsonl load failed (when dlt still loaded every table at once). Text formats get more room.
DUCKDB_TEXT_FORMAT_MEMORY_LIMIT = "512MB"


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--destination", default="duckdb", help="any dlt destination (duckdb)")
    parser.add_argument("--dataset-name", default="klaviyo", help="dataset/schema (klaviyo)")
    parser.add_argument("--segments", help="comma-separated segment ids to export (all)")
    parser.add_argument("--segment-names", help="comma-separated segment names to export (all)")
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
        help="drop this source's tables and cursors, then export everything again",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve a generated account from the bundled simulator and export it (no API key)",
    )
    parser.add_argument("--demo-profiles", type=int, default=3000, help="demo account size")
    parser.add_argument(
        "--progress",
        choices=["log", "tqdm", "enlighten", "alive_progress"],
        help="dlt's progress display for long runs (log needs no extra package)",
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


def _csv(value: Optional[str]) -> Optional[List[str]]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


@contextlib.contextmanager
def demo_simulator(profiles: int) -> Iterator[Dict[str, Any]]:
    """Start the bundled simulator and yield the source settings that point at it."""
    from klaviyo_source.simulator import KlaviyoSimulator, generate_account

    account = generate_account(seed=DEMO_SEED, profiles=profiles, memberships=profiles * 3)
    with KlaviyoSimulator(account) as simulator:
        print(f"Demo: simulated Klaviyo account served at {simulator.base_url}")
        yield {"api_key": simulator.api_key, "base_url": simulator.base_url}


def source_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Source arguments given on the command line; the rest comes from config and env."""
    options: Dict[str, Any] = {}
    if args.segments:
        options["segment_ids"] = _csv(args.segments)
    if args.segment_names:
        options["segment_names"] = _csv(args.segment_names)
    if args.memberships_only:
        options["include_profiles"] = False
    if args.reconcile:
        options["reconcile"] = args.reconcile
    return options


def destination_for(args: argparse.Namespace) -> Any:
    """The demo writes its own DuckDB file, so it never mixes into a real account's tables."""
    if args.demo and args.destination == "duckdb" and not os.environ.get(DUCKDB_CREDENTIALS):
        return dlt.destinations.duckdb(str(Path.cwd() / DEMO_DATABASE))
    return args.destination


def cap_duckdb_memory(args: argparse.Namespace) -> None:
    """Bound what a DuckDB load takes; each setting unless configured already.

    Set your own with DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG='{"memory_limit": "1GB"}'
    or `global_config` under [destination.duckdb.credentials] in .dlt/secrets.toml, and
    LOAD__WORKERS, DATA_WRITER__BUFFER_MAX_ITEMS.
    """
    if args.destination != "duckdb":
        return
    _set_unless_configured(LOAD_WORKERS, str(DUCKDB_LOAD_WORKERS))
    _set_unless_configured(BUFFER_MAX_ITEMS, str(PARQUET_BUFFER_ROWS))
    settings = dict(DUCKDB_SETTINGS)
    if args.loader_file_format not in (None, "parquet"):
        settings["memory_limit"] = DUCKDB_TEXT_FORMAT_MEMORY_LIMIT
    _set_unless_configured(DUCKDB_GLOBAL_CONFIG, json.dumps(settings))


def _set_unless_configured(key: str, value: str) -> None:
    """Give a dlt setting a value through its environment variable, unless it has one."""
    if dlt.config.get(key) is None:
        os.environ[key.replace(".", "__").upper()] = value


def load_klaviyo(args: argparse.Namespace, source_overrides: Dict[str, Any]) -> LoadInfo:
    """Run the pipeline once and print what it loaded; raise if any segment failed."""
    cap_duckdb_memory(args)
    pipeline = dlt.pipeline(
        pipeline_name="klaviyo_segments",
        destination=destination_for(args),
        dataset_name=args.dataset_name,
        **({"progress": args.progress} if args.progress else {}),
    )
    return run_and_report(pipeline, klaviyo(**source_options(args), **source_overrides), args)


def run_and_report(pipeline: dlt.Pipeline, source: Any, args: argparse.Namespace) -> LoadInfo:
    """Load, refresh the SQL views, print a summary; raise naming any segment that failed."""
    # Membership pages are Arrow tables: as parquet DuckDB loads them without conversion (and
    # the few rows of the other tables still load far faster than as insert_values).
    file_format = args.loader_file_format or ("parquet" if args.destination == "duckdb" else None)
    if pipeline.has_pending_data:
        # dlt's run() then only finishes those packages; new changes wait for the next run.
        print("Finishing the load an interrupted run left; run again to fetch new changes.")
    with managed_for_an_export():
        load_info = pipeline.run(
            source,
            refresh="drop_sources" if args.full_refresh else None,  # type: ignore[arg-type]
            loader_file_format=file_format,  # type: ignore[arg-type]
        )
    print(load_info)
    create_views(pipeline)
    print(membership_summary(pipeline))
    failures = failed_segments(pipeline)
    if failures:
        raise KlaviyoError(
            f"{len(failures)} segment(s) failed and keep their cursors for the next run: "
            + "; ".join(failures.values())
        )
    return load_info


class StepFailed(Exception):
    """A dlt step failed for a reason outside Klaviyo; says what is kept and what comes next."""


# What a failure in each dlt step leaves behind, and so what the next run does.
_AFTER_STEP = {
    "sync": "Nothing was extracted; fix the destination and run again.",
    "extract": (
        "Nothing was loaded and no cursor moved: the next run starts from the same place. "
        "Details: dlt pipeline klaviyo_segments trace."
    ),
    "normalize": (
        "The extracted data is kept in a pending load package; the next run loads it before "
        "extracting anything new (or, if nothing was ever loaded, extracts again)."
    ),
    "load": (
        "The extracted data is kept in a pending load package; the next run loads it before "
        "extracting anything new (or, if nothing was ever loaded, extracts again)."
    ),
}


def _innermost(error: BaseException) -> BaseException:
    """The last link of the cause chain (dlt keeps a step's error in `.exception` too)."""
    seen = {id(error)}
    while True:
        linked = error.__cause__ or getattr(error, "exception", None)
        if not isinstance(linked, BaseException) or id(linked) in seen:
            return error
        seen.add(id(linked))
        error = linked


def _root_cause(error: BaseException) -> BaseException:
    """The error a user can act on, out of dlt's step-failure wrappers.

    A Klaviyo or configuration error is shown as it is. Anything else that failed a dlt step
    (a locked DuckDB file, a bug) is wrapped with the step and what it left behind.
    """
    step = error.step if isinstance(error, PipelineStepFailed) else None
    current = error
    seen = {id(error)}
    while not isinstance(current, (KlaviyoError, ConfigurationException)):
        linked = current.__cause__ or getattr(current, "exception", None)
        if not isinstance(linked, BaseException) or id(linked) in seen:
            break
        seen.add(id(linked))
        current = linked
        if isinstance(current, PipelineStepFailed):
            step = current.step
    if isinstance(current, (KlaviyoError, ConfigurationException)) or step is None:
        return current
    # The innermost error says it best: dlt's destination errors wrap the driver's message
    # in a longer, generic one about credentials.
    reason = _innermost(error)
    if isinstance(reason, duckdb.OutOfMemoryException):
        # DuckDB's own advice lists SET statements a run of this script cannot issue.
        what = f"DuckDB ran out of memory ({str(reason).strip().splitlines()[0]}). {_MORE_MEMORY}"
    else:
        what = f"{type(reason).__name__}: {str(reason).strip().rstrip('.')}."
    return StepFailed(f"The {step} step failed: {what} {_AFTER_STEP.get(str(step), '')}".strip())


_MORE_MEMORY = (
    "Give it more with DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG="
    '\'{"memory_limit": "1GB"}\' or global_config under [destination.duckdb.credentials]'
    f" (this script's default is {DUCKDB_SETTINGS['memory_limit']})."
)


def _one_line(error: BaseException) -> str:
    if isinstance(error, ConfigFieldMissingException) and "api_key" in error.fields:
        return (
            "No Klaviyo API key: set SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] api_key in "
            ".dlt/secrets.toml (or run with --demo)."
        )
    if isinstance(error, ConfigValueCannotBeCoercedException):
        # The value itself is never shown: the field may be a secret.
        hint = getattr(error.hint, "__name__", str(error.hint))
        section = (
            "runtime"
            if error.field_name in RuntimeConfiguration.get_resolvable_fields()
            else "sources.klaviyo"
        )
        return (
            f"The configured value of [{section}] {error.field_name} is not a valid {hint}: fix "
            f"it in .dlt/config.toml or {section.replace('.', '__').upper()}__"
            f"{error.field_name.upper()}."
        )
    return " ".join(str(error).split())


def show_progress(args: argparse.Namespace) -> None:
    """Print the source's per-segment lines (rows and requests) on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    source_logger = logging.getLogger("klaviyo_source")
    source_logger.addHandler(handler)
    source_logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    source_logger.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    show_progress(args)
    try:
        if args.demo:
            with demo_simulator(args.demo_profiles) as overrides:
                load_klaviyo(args, overrides)
        else:
            load_klaviyo(args, {})
    except (KlaviyoError, PipelineStepFailed, ConfigurationException) as error:
        # One line, cause and fix: a scheduler's log shows it as it is.
        print(f"error: {_one_line(_root_cause(error))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
