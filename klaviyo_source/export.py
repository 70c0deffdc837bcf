"""One export of a Klaviyo account, as `klaviyo-export` runs it and a scheduler can.

    import dlt
    from klaviyo_source import klaviyo
    from klaviyo_source.export import KlaviyoExport

    pipeline = dlt.pipeline(
        pipeline_name="klaviyo_segments", destination="duckdb", dataset_name="klaviyo"
    )
    report = KlaviyoExport(pipeline).run(klaviyo())
    print(report.summary)

`KlaviyoExport.run` is `pipeline.run` with what an export needs around it: DuckDB's memory
capped, dlt's extract files rotated, the process's memory managed (see process_memory), the
run's record of listed members dropped before the load, completed load packages emptied of
their data, the SQL views refreshed, a summary of members per segment, and every failure
raised as `ExportFailed` whose message is one line naming the cause and the fix.
"""

import contextlib
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import dlt
import duckdb
import tomllib
from dlt.common.configuration.exceptions import (
    ConfigFieldMissingException,
    ConfigurationException,
    ConfigValueCannotBeCoercedException,
    LookupTrace,
)
from dlt.common.destination.exceptions import UnknownDestinationModule
from dlt.common.exceptions import DltException, MissingDependencyException
from dlt.common.pipeline import LoadInfo
from dlt.extract import DltSource
from dlt.pipeline.exceptions import PipelineStepFailed
from dlt.pipeline.helpers import pipeline_drop
from dlt.pipeline.pipeline import with_config_section, with_runtime_trace

from . import settings
from .errors import KlaviyoError
from .process_memory import managed_for_an_export, return_freed_memory
from .run import runs_started
from .segment_reports import failed_segment_reports
from .settings import SEGMENT_REPORTS_TABLE, WALK_BATCH_PROFILES
from .summary import failed_segments, membership_summary
from .views import create_views

logger = logging.getLogger(__name__)

# DuckDB takes 80 % of the machine's memory by default, and a merge of a million rows used
# 1.4 GB of it; under a cap it spills to a temporary file instead. Since the walk tables'
# merges skip deduplication, a merge of 1M memberships with profiles loads in about 6 s under
# 64 MB (a first export appends, in about 3.5 s), with DuckDB's share of the peak about 120 MB
# (150 MB at 96 MB, 200 MB at 128 MB). One thread: each thread reads a row group at once and
# keeps memory of its own beyond the cap; 3M first exports' loads peaked at 246 and 272 MB
# with one, 273 and 280 with two, and were no slower (docs/performance.md). Profiles of 20 KB
# each in 500-row groups load under 64 MB with one thread as with two (30 KB fail with both).
# Insertion order is not kept: dlt does not need it, and it costs memory.
DUCKDB_SETTINGS: Dict[str, Any] = {
    "memory_limit": "64MB",
    "threads": 1,
    "preserve_insertion_order": False,
}
# One table loads at a time, so the cap serves one reader: at 1M, 15 MB less, as fast.
DUCKDB_LOAD_WORKERS = 1
# A parquet reader holds a whole row group, and dlt writes what it has buffered as one: 6,000
# profiles of 20 KB would not fit under the cap. Flushing every 500 rows (the walk's profile
# tables) keeps row groups of wide profiles small; membership tables are written whole.
PARQUET_BUFFER_ROWS = WALK_BATCH_PROFILES
# dlt writes each table of an extract to one file unless told to rotate, and pyarrow keeps the
# metadata of every row group of a file until it closes: at 500-row groups that grew with the
# account (docs/performance.md, "Memory at 10M"). Closing a file every so many rows bounds it.
EXTRACT_FILE_ROWS = 100_000
# DuckDB reads each jsonl or csv file through a 32 MB buffer of its own: under 128 MB a 1M
# jsonl load failed (when dlt still loaded every table at once). Text formats get more room.
DUCKDB_TEXT_FORMAT_MEMORY_LIMIT = "512MB"
DUCKDB_TYPE = "dlt.destinations.duckdb"
# A loaded package keeps every file it loaded (profiles with their emails) in the pipeline's
# working folder, run after run; its schema, state and job list are all dlt's commands need.
DELETE_COMPLETED_JOBS = "load.delete_completed_jobs"

# What a failure in each dlt step leaves behind, and so what the next run does.
_AFTER_STEP = {
    "sync": "Nothing was extracted; fix the destination and run again.",
    "extract": (
        "Nothing was loaded and no cursor moved: the next run starts from the same place. "
        "Details: dlt pipeline {pipeline} trace."
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
_MORE_MEMORY = (
    "Give it more with DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG="
    '\'{"memory_limit": "1GB"}\' or global_config under [destination.duckdb.credentials]'
    f" (an export's default is {DUCKDB_SETTINGS['memory_limit']})."
)


class ExportFailed(Exception):
    """An export failed; the message is one line naming the cause and the fix.

    The error it stands for is its `__cause__`. `report` is set when the load itself
    completed and only some segments failed.
    """

    def __init__(self, line: str, report: Optional["ExportReport"] = None) -> None:
        super().__init__(line)
        self.report = report


@dataclass(frozen=True)
class ExportReport:
    """What one export did: dlt's load info, the views it refreshed, members per segment."""

    load_info: LoadInfo
    summary: str
    views: List[str] = field(default_factory=list)


class KlaviyoExport:
    """Runs the Klaviyo source into a pipeline the way `klaviyo-export` does.

    Args:
        pipeline: The pipeline to load into, with its destination set.
        full_refresh: Start over: drop every table and cursor of this source before anything
            is read, and export Klaviyo's current membership as if for the first time; the
            history of past memberships and periods is gone.
        loader_file_format: dlt's loader file format; parquet for DuckDB when unset (the
            memberships are Arrow tables, which DuckDB loads as they are).
    """

    def __init__(
        self,
        pipeline: dlt.Pipeline,
        *,
        full_refresh: bool = False,
        loader_file_format: Optional[str] = None,
    ) -> None:
        self.pipeline = pipeline
        self.full_refresh = full_refresh
        self.loader_file_format = loader_file_format

    def run(self, data: DltSource) -> ExportReport:
        """Export the source once; raise `ExportFailed` (one line) if anything failed.

        A run whose load completed but where some segments (or the segment reports) failed
        still refreshes the views; the error then carries the report, and those segments keep
        their cursors.
        """
        pipeline = self.pipeline
        file_format = self.loader_file_format or ("parquet" if _is_duckdb(pipeline) else None)
        try:
            with settings_applied(export_settings(pipeline, file_format)):
                if self.full_refresh:
                    start_over(pipeline, data.schema.name)
                elif pipeline.has_pending_data:
                    # dlt's run() then only finishes those packages; new changes wait.
                    logger.warning(
                        "Finishing the load an interrupted run left; run again to fetch new "
                        "changes."
                    )
                with managed_for_an_export():
                    load_info = run(pipeline, data, file_format)
                views = create_views(pipeline)
                report = ExportReport(load_info, membership_summary(pipeline), views)
        except (DltException, KlaviyoError) as error:
            raise ExportFailed(one_line(error)) from error
        problems = []
        failures = failed_segments(pipeline)
        if failures:
            problems.append(failure_line(failures))
        # A failure stays in state until the reports run again: only this run's counts.
        if SEGMENT_REPORTS_TABLE in data.selected_resources:
            problems.extend(filter(None, [failed_segment_reports(pipeline)]))
        if problems:
            raise ExportFailed(" ".join(problems), report)
        return report


@with_runtime_trace()
@with_config_section(("run",))
def run(pipeline: dlt.Pipeline, data: DltSource, loader_file_format: Optional[str]) -> LoadInfo:
    """`pipeline.run(data)`, step by step, ending the source's runs between extract and
    normalize.

    A run's record of the members it listed grows with the account and serves only the
    extract; dropped before normalize, its memory serves normalize and load instead. dlt's own
    decorators of `Pipeline.run` keep one trace of the steps and its config section, and the
    nested `pipeline.run()` does what `run` does before it extracts: it syncs the destination
    once and finishes the packages an interrupted run left, in which case nothing new is
    extracted (its trace step shows beside this one).
    """
    pending = pipeline.run()
    if pending is not None:
        return pending
    with runs_started() as runs:
        try:
            pipeline.extract(data, loader_file_format=loader_file_format)  # type: ignore[arg-type]
        finally:
            for started in runs:
                started.end()
            # glibc keeps what the record freed until asked; asked now rather than at the next
            # periodic trim, the load starts without it.
            return_freed_memory()
    pipeline.normalize()
    return pipeline.load()


def failure_line(failures: Dict[str, str]) -> str:
    """One line for the parts of a run that failed: segments by count, the refresh by name."""
    segments = [key for key in failures if key != settings.PROFILE_REFRESH_FAILURE]
    failed = []
    if segments:
        failed.append(f"{len(segments)} segment(s)")
    if settings.PROFILE_REFRESH_FAILURE in failures:
        failed.append("the profile refresh")
    return (
        f"{' and '.join(failed)} failed; the next run reads again from the cursors kept: "
        + "; ".join(failures.values())
    )


def _is_duckdb(pipeline: dlt.Pipeline) -> bool:
    destination = pipeline.destination
    return destination is not None and destination.destination_type == DUCKDB_TYPE


def export_settings(pipeline: dlt.Pipeline, loader_file_format: Optional[str]) -> Dict[str, str]:
    """The dlt settings an export runs with where none is configured: {config key: value}.

    Set your own with DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG='{"memory_limit": "1GB"}'
    or `global_config` under [destination.duckdb.credentials] in .dlt/secrets.toml, and
    LOAD__WORKERS, DATA_WRITER__BUFFER_MAX_ITEMS, DATA_WRITER__FILE_MAX_ITEMS,
    LOAD__DELETE_COMPLETED_JOBS.
    """
    settings = {DELETE_COMPLETED_JOBS: "true"}
    if not _is_duckdb(pipeline):
        return settings
    duckdb_settings = dict(DUCKDB_SETTINGS)
    if loader_file_format not in (None, "parquet"):
        duckdb_settings["memory_limit"] = DUCKDB_TEXT_FORMAT_MEMORY_LIMIT
    name = pipeline.destination.destination_name  # type: ignore[union-attr]
    settings.update(
        {
            "load.workers": str(DUCKDB_LOAD_WORKERS),
            "data_writer.buffer_max_items": str(PARQUET_BUFFER_ROWS),
            "data_writer.file_max_items": str(EXTRACT_FILE_ROWS),
            f"destination.{name}.credentials.global_config": json.dumps(duckdb_settings),
        }
    )
    return settings


@contextlib.contextmanager
def settings_applied(settings: Dict[str, str]) -> Iterator[None]:
    """While the block runs, each setting that dlt finds no value for has this one.

    They go through their environment variables, and the variables are put back as they
    were afterwards: other pipelines of the same process are not affected.
    """
    saved: Dict[str, Optional[str]] = {}
    for key, value in settings.items():
        if dlt.config.get(key) is None:
            variable = key.replace(".", "__").upper()
            saved[variable] = os.environ.get(variable)
            os.environ[variable] = value
    try:
        yield
    finally:
        for variable, previous in saved.items():
            if previous is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = previous


def start_over(pipeline: dlt.Pipeline, schema_name: str) -> None:
    """Drop this source's tables and state in the destination, before anything is read.

    dlt's `refresh="drop_sources"` drops the tables only when the new data loads, so the
    source would still read the old tables (when each membership was first seen) while it
    extracts. This drops first, the way `dlt pipeline <name> drop --drop-all` does; packages
    an interrupted run left are discarded rather than loaded.
    """
    if pipeline.has_pending_data:
        pipeline.drop_pending_packages()
    # A pipeline that never ran here may still have loaded elsewhere: its state and schema
    # come back from the destination.
    pipeline.sync_destination()
    if schema_name not in pipeline.schema_names:
        return
    pipeline_drop(pipeline, schema_name=schema_name, drop_all=True, state_paths="*")()


def one_line(error: BaseException) -> str:
    """An error of an export as one line: the cause and the fix, never a configured value."""
    cause = _root_cause(error)
    if isinstance(cause, ExportFailed):
        return str(cause)
    if isinstance(cause, ConfigFieldMissingException):
        return _missing_setting(cause)
    if isinstance(cause, ConfigValueCannotBeCoercedException):
        return _uncoercible_setting(cause)
    if isinstance(cause, UnknownDestinationModule):
        return _unknown_destination(cause.ref)
    if isinstance(cause, MissingDependencyException):
        return _missing_package(cause)
    return " ".join(str(cause).split())


class StepFailed(Exception):
    """A dlt step failed for a reason outside Klaviyo; says what is kept and what comes next."""


def _innermost(error: BaseException) -> BaseException:
    """The last link of the cause chain (dlt keeps a step's error in `.exception` too)."""
    seen = {id(error)}
    while True:
        linked = error.__cause__ or getattr(error, "exception", None)
        if not isinstance(linked, BaseException) or id(linked) in seen:
            return error
        seen.add(id(linked))
        error = linked


_ACTIONABLE = (KlaviyoError, ConfigurationException, MissingDependencyException, ExportFailed)


def _root_cause(error: BaseException) -> BaseException:
    """The error a user can act on, out of dlt's step-failure wrappers.

    A Klaviyo, configuration or missing-package error is shown as it is. Anything else that
    failed a dlt step (a locked DuckDB file, a bug) is wrapped with the step and what it left.
    """
    failed_step = error if isinstance(error, PipelineStepFailed) else None
    current = error
    seen = {id(error)}
    while not isinstance(current, _ACTIONABLE):
        linked = current.__cause__ or getattr(current, "exception", None)
        if not isinstance(linked, BaseException) or id(linked) in seen:
            break
        seen.add(id(linked))
        current = linked
        if isinstance(current, PipelineStepFailed):
            failed_step = current
    if isinstance(current, _ACTIONABLE) or failed_step is None:
        return current
    # The innermost error says it best: dlt's destination errors wrap the driver's message
    # in a longer, generic one about credentials.
    reason = _innermost(error)
    if isinstance(reason, duckdb.OutOfMemoryException):
        # DuckDB's own advice lists SET statements an export cannot issue.
        what = f"DuckDB ran out of memory ({str(reason).strip().splitlines()[0]}). {_MORE_MEMORY}"
    else:
        what = f"{type(reason).__name__}: {' '.join(str(reason).split()).rstrip('.')}."
    step = str(failed_step.step)
    after = _AFTER_STEP.get(step, "").format(pipeline=failed_step.pipeline.pipeline_name)
    return StepFailed(f"The {step} step failed: {what} {after}".strip())


def _missing_setting(error: ConfigFieldMissingException) -> str:
    if "api_key" in error.fields:
        return (
            "No Klaviyo API key: set SOURCES__KLAVIYO__API_KEY or [sources.klaviyo] api_key in "
            ".dlt/secrets.toml (or run with --demo)."
        )
    name = error.fields[0]
    traces = list(error.traces.get(name) or [])
    nested = [trace for trace in traces if not isinstance(trace, LookupTrace)]
    if nested:
        # A whole configuration is missing (a destination's credentials): name its section.
        inner = next(iter(nested[0].traces.values()), [])
        sections = _section_of(inner)[:-1] or [name]
        missing = ", ".join(nested[0].traces)
        section = ".".join(sections)
        return (
            f"No {name} configured for [{section}] (needs {missing}): set "
            f"{'__'.join(sections).upper()} (a connection string) or fill [{section}] in "
            ".dlt/secrets.toml."
        )
    sections = _section_of([trace for trace in traces if isinstance(trace, LookupTrace)])
    section = ".".join(sections[:-1])
    return (
        f"Missing setting {name} of [{section}]: set {'__'.join(sections).upper()} or {name} "
        f"under [{section}] in .dlt/config.toml (.dlt/secrets.toml if it is a secret)."
    )


def _section_of(traces: List[Any]) -> List[str]:
    """The sections and key of the plainest place dlt looked: no pipeline-name prefix."""
    plain = [
        [*trace.sections, trace.key.split("__")[-1].lower()]
        for trace in traces
        if isinstance(trace, LookupTrace)
        and trace.key.upper() == "__".join([*trace.sections, trace.key.split("__")[-1]]).upper()
    ]
    return max(plain, key=len) if plain else []


def _uncoercible_setting(error: ConfigValueCannotBeCoercedException) -> str:
    # The value itself is never shown: the field may be a secret.
    hint = getattr(error.hint, "__name__", str(error.hint))
    found = _where_configured(error.field_name, error.field_value)
    if found is None:
        return (
            f"A configured value of {error.field_name} is not a valid {hint}: fix it where it is "
            f"set (an environment variable ending in __{error.field_name.upper()}, or .dlt/)."
        )
    section, place = found
    return (
        f"The configured value of [{section}] {error.field_name} is not a valid {hint}: "
        f"fix it in {place}."
    )


def _where_configured(name: str, value: Any) -> Optional[Tuple[str, str]]:
    """The section of the setting `name` that holds `value`, and where it is set."""
    suffix = f"__{name.upper()}"
    for variable, text in os.environ.items():
        if variable.endswith(suffix) and text == str(value):
            return variable[: -len(suffix)].lower().replace("__", "."), variable
    for provider in dlt.config.config_providers:
        to_toml = getattr(provider, "to_toml", None)
        if to_toml is None:
            continue
        section = _toml_section_holding(tomllib.loads(to_toml()), name, value)
        if section is not None:
            return section, f"{provider.name} under [{section}]"
    return None


def _toml_section_holding(table: Dict[str, Any], name: str, value: Any) -> Optional[str]:
    if name in table and str(table[name]) == str(value):
        return ""
    for key, inner in table.items():
        if isinstance(inner, dict):
            found = _toml_section_holding(inner, name, value)
            if found is not None:
                return f"{key}.{found}".rstrip(".")
    return None


def _unknown_destination(name: str) -> str:
    known = sorted(dlt.destinations.__all__)
    close = difflib.get_close_matches(name, known, n=1)
    guess = f" Did you mean {close[0]}?" if close else ""
    return (
        f"Unknown destination {name!r}: choose one of dlt's destinations with --destination "
        f"({', '.join(known)}), or configure [destination.{name}] destination_type.{guess}"
    )


def _missing_package(error: MissingDependencyException) -> str:
    packages = " ".join(f'"{dependency}"' for dependency in error.dependencies)
    progress = " (or choose --progress log)" if "Collector" in error.caller else ""
    return f"{error.caller} needs a package not installed here: pip install {packages}{progress}."
