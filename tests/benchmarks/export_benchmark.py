"""Export benchmark: the project's performance figures, in one table.

Not a test. Run: ``.venv/bin/python tests/benchmarks/export_benchmark.py [--quick] [--long]``.
It prints the machine it ran on (CPU, cores, load, versions), the code it measured, and one
table, each row with its target and whether it was met:

1. a full export at Klaviyo's published limits: its wall against the fewest seconds the
   quotas allow its requests, where the wall went, the share of 429s, the share of each
   quota used, memberships a minute, the exporter's CPU;
2. requests per 100 memberships of a full export, and of no-change runs (limits off);
3. memberships a second into DuckDB and CPU per 100k memberships (limits off);
4. peak RSS of the exporting process at 10k, 100k and 1M memberships, of a reconciliation
   run, and of exports of lean accounts as the command runs them (1M; ``--long`` adds 10M);
5. no-change runs with leave checks at the limits, at 20, 100 and 500 segments (wall, requests
   by endpoint, 429s), and at the most segments the hourly run that reads the segment reports'
   last days again.

The full run takes 12 to 20 minutes; ``--long`` adds 10 to 30 (the 10M account is
built in the simulator's process, then exported). ``--quick`` is a smoke check of every row
with small accounts (no-change runs at 3 and 6 segments, lean accounts of 10k and 30k), about
two minutes; its figures mean little. ``--pacing-only`` runs figure 1 alone (about 5 minutes).
``--no-change-segments``, ``--no-change-largest`` and ``--lean-memberships`` change the sizes
of figures 5 and 4 (empty: none). ``--profile`` instead profiles one export with limits off and
prints the top functions and where the time goes, grouped by layer. A figure that could not be
measured is marked FAILED and the script exits with 1.

How it measures:

- The simulator runs in its own process (``multiprocessing`` spawn), so the exporting process
  and the server are measured apart: client CPU is the export process's ``time.process_time``
  (all its threads), server CPU the simulator process's ``getrusage`` over the same run.
  Before a measured run every segment is walked once with the same query, so the simulator
  serves from its rendered-row cache and costs about what a remote server would cost us: nothing.
- Every export runs in a fresh process into a real DuckDB file in a temporary directory,
  through ``pipeline.run(..., loader_file_format=...)``. Its peak RSS is that process's
  ``ru_maxrss``; a sampling thread tells in which step (extract, normalize, load) it peaked.
  The parent kills an export whose RSS passes ``--rss-limit-gb`` (the machine is shared).
- "Limits off": the simulator enforces no limits and the source's own pacing is scaled so far
  (``rate_limit_time_scale=1000``) that it never waits; its bookkeeping still runs.
- "Limits on": the simulator enforces Klaviyo's published limits in fixed windows with
  ``time_scale=S`` and the source runs with ``rate_limit_time_scale=S``; S defaults to 1, so
  the windows are Klaviyo's real ones. Each export starts at a set point of the simulator's
  minute (``--pacing-phase``, 30 s in by default). Its wall (``pipeline.run``) is set against the
  fewest seconds the quotas allow for its requests: from the simulator's own count of what each
  bucket was charged, when the last request of the busiest bucket could have gone at the
  earliest had every request gone as soon as its windows had room, after the export's start.
  The share of each quota used is its requests over as many as its windows allowed during the
  wall. At S above 10 the scaled ceiling (12,500 memberships/s) passes what the exporter can
  do with limits off, and the figures would measure its CPU instead. The paced exports leave
  out the segment reports: at 2 requests a minute their backfill would set the wall alone.
- Lean accounts (figure 4) are measured by ``memory_benchmark.measure_size``: profiles with
  few attributes of their own, 4 memberships a profile, served without the simulator's row
  cache; each export runs as ``klaviyo-export`` runs it (``KlaviyoExport.run``) in a fresh
  process, its peak RSS is ``ru_maxrss``, and a run that loaded less than the account is
  reported as failed.
- No-change runs (figure 5) are measured by ``leave_checks_benchmark.measure_no_change``: an
  account with a long tail of segment sizes (the n-th largest holds 1/n of the largest),
  a first export with the limits off, then, with nothing changed, a run with
  ``reconcile="counts"`` while the simulator enforces the published limits at ``--time-scale``
  (1: real windows) and the source paces at the same scale; the segment reports are off
  except in the hourly run's row. That run is timed in this process, with the code it
  imported at its start.
- Each row records which loader file format every table really got, and every export the
  hash of the source package it imported: other people may change the code during a run.
- The profile is cProfile on every thread (each thread started during the export gets its
  own profiler), timed by wall clock, with one extract worker so threads seldom wait for each
  other; functions that only wait (sockets, locks, idle pools) are reported apart. Shared code
  (stdlib, ``dlt.common``, builtins) is booked to the layers of its callers.

The machine has few cores and other work may run beside this script: treat every figure as
provisional, and compare figures of one run with each other rather than across machines.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import marshal
import multiprocessing as mp
import os
import platform
import pstats
import resource
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

UNLIMITED_SCALE = 1000.0  # source pacing windows of 60 ms / 1 ms: never the bottleneck
SEGMENTS = 12
TAGS = 8
PROFILES_PER_MEMBERSHIP = 1 / 8  # each profile in ~8 of the 10 non-empty segments
SEED = 7
LISTING_PAGE_SIZE = 10  # GET /api/segments serves 10 segments a page
MEMBER_PAGE_SIZE = 100  # GET /api/segments/{id}/profiles serves 100 members a page
Func = tuple[str, int, str]  # (file, first line, name), as in a code object
MB = 1024 * 1024

DEFAULT_FORMAT = "parquet"  # pipelines/klaviyo_pipeline.py's loader file format for DuckDB
TARGET_QUOTA_RATIO = 1.05
TARGET_THROTTLED_SHARE = 0.01
TARGET_MEMBERSHIPS_PER_S = 25_000
# Extract workers of the comparison run (dlt's default is 5): see `fewer_workers_run`.
FEWER_WORKERS = 2
TARGET_PEAK_RSS_MB = 300.0
# No-change runs at the limits: the wall allowed a run of at most so many segments.
TARGET_NO_CHANGE_S = ((100, 30.0), (500, 120.0))
NO_CHANGE_SEGMENTS = (20, 100, 500)
NO_CHANGE_LARGEST = 20_000  # members of the largest segment (leave_checks_benchmark's default)
LEAN_RSS_SIZES = (1_000_000,)  # memberships of memory_benchmark's lean accounts
LONG_RSS_SIZE = 10_000_000  # added by --long


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes, scales and options of one benchmark run (full or quick)."""

    pacing_memberships: int
    pacing_time_scale: float
    pacing_revisions: tuple[str, ...]
    pacing_include_profiles: bool
    pacing_phase: float  # seconds into the simulator's minute at which a paced export starts
    pacing_only: bool  # figure 1 alone
    throughput_sizes: tuple[int, ...]
    request_count_size: int
    rss_sizes: tuple[int, ...]
    lean_rss_sizes: tuple[int, ...]  # memberships of lean accounts exported as the command does
    no_change_segments: tuple[int, ...]  # segments of the no-change runs at the limits
    no_change_largest: int  # members of their largest segment
    formats: tuple[str, ...]
    rss_limit_mb: float

    def sizes(self) -> set[int]:
        """Every account size exported with limits off."""
        return {*self.throughput_sizes, *self.rss_sizes}


def _sizes(text: str | None) -> tuple[int, ...] | None:
    """Comma-separated whole numbers, or None when the option was not given."""
    return None if text is None else tuple(int(value) for value in text.split(",") if value)


def make_plan(args: argparse.Namespace, formats: tuple[str, ...]) -> Plan:
    """The benchmark's sizes, or small ones for a smoke check (`--quick`); sizes given on the
    command line win over both."""
    from klaviyo_source.settings import DEFAULT_REVISION

    plan = Plan(
        pacing_memberships=args.pacing_memberships,
        pacing_time_scale=args.time_scale,
        pacing_revisions=(DEFAULT_REVISION, "2026-01-15"),
        pacing_include_profiles=args.pacing_profiles,
        pacing_phase=args.pacing_phase,
        pacing_only=args.pacing_only,
        throughput_sizes=(100_000, 1_000_000),
        request_count_size=100_000,
        rss_sizes=(10_000, 100_000, 1_000_000),
        lean_rss_sizes=LEAN_RSS_SIZES,
        no_change_segments=NO_CHANGE_SEGMENTS,
        no_change_largest=NO_CHANGE_LARGEST,
        formats=formats,
        rss_limit_mb=args.rss_limit_gb * 1024,
    )
    if args.quick:
        plan = replace(
            plan,
            pacing_memberships=20_000,
            pacing_revisions=(DEFAULT_REVISION,),
            throughput_sizes=(10_000,),
            request_count_size=10_000,
            rss_sizes=(10_000,),
            lean_rss_sizes=(10_000, 30_000),
            no_change_segments=(3, 6),
            no_change_largest=300,
            formats=formats[:1],
        )
    lean = _sizes(args.lean_memberships)
    segments = _sizes(args.no_change_segments)
    return replace(
        plan,
        lean_rss_sizes=(plan.lean_rss_sizes if lean is None else lean)
        + ((LONG_RSS_SIZE,) if args.long else ()),
        no_change_segments=plan.no_change_segments if segments is None else segments,
        no_change_largest=args.no_change_largest or plan.no_change_largest,
    )


def available_formats() -> tuple[str, ...]:
    """The default format first (what pipelines/klaviyo_pipeline.py uses for DuckDB), then
    jsonl, the fastest format for rows that are not Arrow tables."""
    return (DEFAULT_FORMAT, "jsonl")


def child_environment() -> None:
    """Settings every child inherits: no telemetry, quiet logs (set before spawning)."""
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the simulator, in its own process -------------------------------------------------------


@dataclass(frozen=True)
class AccountInfo:
    """What the exporting side needs to know about the served account."""

    base_url: str
    api_key: str
    segment_sizes: dict[str, int]

    @property
    def memberships(self) -> int:
        return sum(self.segment_sizes.values())


def _answer(sim: Any, command: str, args: tuple[Any, ...]) -> Any:
    """One control command of the simulator process."""
    if command == "counters":
        return dict(sim.counters)
    if command == "quota_log":
        # Wall-clock start of the simulator's windows, what each bucket was charged when (scaled
        # seconds since that start) and the status of every request answered.
        epoch = time.time() - sim.limiter.elapsed()
        charged = [(charge.bucket, charge.at) for charge in sim.limiter.charged]
        return epoch, charged, [record.status for record in sim.request_log]
    if command == "phase":
        return sim.limiter.elapsed() * sim.time_scale % 60.0
    if command == "cpu":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    if command == "reset":
        sim.reset_counters()
        sim.reset_rate_limits()
        return None
    if command == "rate_limits":
        sim.rate_limits_enabled = bool(args[0])
        return None
    raise ValueError(f"unknown simulator command {command!r}")


def serve_simulator(
    conn: Connection, memberships: int, rate_limits: bool, time_scale: float
) -> None:
    """Child process: generate the account, serve it, answer control commands until stop."""
    from klaviyo_source.simulator import KlaviyoSimulator, generate_account

    account = generate_account(
        seed=SEED,
        segments=SEGMENTS,
        tags=TAGS,
        profiles=max(1000, int(memberships * PROFILES_PER_MEMBERSHIP)),
        memberships=memberships,
    )
    sizes = {segment_id: account.profile_count(segment_id) for segment_id in account.segments()}
    with KlaviyoSimulator(account, rate_limits=rate_limits, time_scale=time_scale) as sim:
        conn.send(AccountInfo(sim.base_url, sim.api_key, sizes))
        while True:
            command, args = conn.recv()
            if command == "stop":
                break
            conn.send(_answer(sim, command, args))


class SimulatorProcess:
    """A simulator serving a generated account from a child process, with a control pipe."""

    def __init__(self, memberships: int, rate_limits: bool = False, time_scale: float = 1.0):
        self._args = (memberships, rate_limits, time_scale)
        self._conn: Connection | None = None
        self._process: Any = None
        self.info: AccountInfo

    def __enter__(self) -> SimulatorProcess:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=serve_simulator, args=(child, *self._args), daemon=True
        )
        self._process.start()
        self.info = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.send(("stop", ()))
        if self._process is not None:
            self._process.join(timeout=30)

    def call(self, command: str, *args: Any) -> Any:
        assert self._conn is not None
        self._conn.send((command, args))
        return self._conn.recv()

    def counters(self) -> dict[str, int]:
        return self.call("counters")

    def quota_log(self) -> QuotaLog:
        return QuotaLog(*self.call("quota_log"))

    def phase(self) -> float:
        """Seconds (scaled) into the simulator's current steady window."""
        return self.call("phase")

    def cpu_seconds(self) -> float:
        return self.call("cpu")

    def reset(self) -> None:
        self.call("reset")

    def set_rate_limits(self, enabled: bool) -> None:
        self.call("rate_limits", enabled)


def _next_link(body: bytes) -> str | None:
    """`links.next` of a page, found without parsing the whole body."""
    marker = b'"next":"'
    at = body.rfind(marker)
    if at < 0:
        return None
    start = at + len(marker)
    return body[start : body.index(b'"', start)].decode()


def _walk_segment(info: AccountInfo, segment_id: str, include_profiles: bool) -> None:
    """Fetch every page of one segment the way the source asks for it."""
    from klaviyo_source.settings import DEFAULT_REVISION, MEDIA_TYPE

    session = requests.Session()
    session.trust_env = False
    session.headers.update(
        {
            "Authorization": f"Klaviyo-API-Key {info.api_key}",
            "revision": DEFAULT_REVISION,
            "Accept": MEDIA_TYPE,
        }
    )
    params = {"sort": "joined_group_at", "page[size]": "100"}
    if not include_profiles:
        params["fields[profile]"] = "joined_group_at"
    response = session.get(f"{info.base_url}/api/segments/{segment_id}/profiles", params=params)
    while True:
        response.raise_for_status()
        url = _next_link(response.content)
        if url is None:
            return
        response = session.get(url)


def warm_simulator(sim: SimulatorProcess, include_profiles: Sequence[bool]) -> None:
    """Walk every segment once per variant so measured runs are served from the row cache."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(_walk_segment, sim.info, segment_id, variant)
            for variant in include_profiles
            for segment_id in sim.info.segment_sizes
        ]
        for job in jobs:
            job.result()
    log(f"  simulator warmed in {time.perf_counter() - started:.1f} s")


# -- one export, in its own process ----------------------------------------------------------


@dataclass(frozen=True)
class ExportJob:
    """One `pipeline.run` of the klaviyo source against a simulator."""

    base_url: str
    api_key: str
    workdir: str
    include_profiles: bool = True
    loader_file_format: str = "parquet"
    reconcile: str = "off"
    segment_reports: bool = True  # the source's default
    revision: str | None = None
    rate_limit_time_scale: float = UNLIMITED_SCALE
    profile_to: str | None = None
    extract_workers: int | None = None  # dlt's [extract] workers (default 5)
    rss_limit_mb: float = 4096.0  # the parent kills the export above this (shared machine)


@dataclass
class ExportResult:
    """What one export cost and what it left in the destination."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    steps: dict[str, float]  # seconds of extract, normalize, load (and run)
    memberships: int
    profiles: int
    rss_by_step: dict[str, float] = field(default_factory=dict)  # peak MB during each step
    formats: dict[str, str] = field(default_factory=dict)  # loader file format per table
    code: str = ""  # hash of the source package this export imported
    started_at: float = 0.0  # time.time() when pipeline.run began
    error: str | None = None


def current_rss_mb() -> float:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


class RssTimeline:
    """This process's RSS sampled in a thread, to tell which pipeline step holds the peak."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-timeline", daemon=True)

    def __enter__(self) -> RssTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), current_rss_mb()))
            if self._stop.wait(self.interval):
                return

    def peak_between(self, start: float, end: float) -> float:
        return max((rss for stamp, rss in self.samples if start <= stamp <= end), default=0.0)


class AllThreadsProfile:
    """cProfile on this thread and on every thread started while it is active.

    cProfile sees only the thread that enabled it, and dlt extracts in a worker pool and loads
    in threads, so each new thread gets a profiler of its own; `dump` merges them. Times are
    wall clock per thread: run the profiled export with one extract worker, so threads seldom
    wait for each other, and read the waiting functions (`WAITING`) as waits, not work.
    """

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _new_profile(self) -> cProfile.Profile:
        profile = cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        return profile

    def _start_in_thread(self, frame: FrameType, event: str, arg: Any) -> None:
        sys.setprofile(None)
        self._new_profile().enable()

    def __enter__(self) -> AllThreadsProfile:
        threading.setprofile(self._start_in_thread)
        self._new_profile().enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profiles[0].disable()
        threading.setprofile(None)  # type: ignore[arg-type]

    def dump(self, path: str) -> None:
        """Write every thread's statistics, merged, as one pstats file."""
        merged = pstats.Stats()
        for index, profile in enumerate(self._profiles):
            profile.snapshot_stats()  # unlike create_stats, leaves other threads' hooks alone
            part = f"{path}.{index}"
            with open(part, "wb") as file:
                marshal.dump(profile.stats, file)  # type: ignore[attr-defined]
            merged.add(part)
            os.unlink(part)
        merged.dump_stats(path)


def _count_rows(pipeline: Any, table: str) -> int:
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    with pipeline.sql_client() as client:
        try:
            rows = client.execute_sql(
                f"SELECT count(*) FROM {client.make_qualified_table_name(table)}"
            )
        except DatabaseUndefinedRelation:
            return 0
    return int(rows[0][0])


def _step_spans(pipeline: Any) -> dict[str, tuple[float, float]]:
    """(start, end) epoch seconds of each step of the last run, from dlt's trace."""
    return {
        step.step: (step.started_at.timestamp(), step.finished_at.timestamp())
        for step in pipeline.last_trace.steps
        if step.started_at and step.finished_at
    }


def make_pipeline(job: ExportJob) -> Any:
    """A pipeline in the job's directory, loading into a DuckDB file there."""
    import dlt

    workdir = Path(job.workdir)
    return dlt.pipeline(
        pipeline_name="klaviyo_benchmark",
        pipelines_dir=str(workdir / "pipelines"),
        destination=dlt.destinations.duckdb(str(workdir / "export.duckdb")),
        dataset_name="klaviyo",
    )


def make_source(job: ExportJob) -> Any:
    """The klaviyo source pointed at the simulator, with the job's options."""
    from klaviyo_source import klaviyo

    options: dict[str, Any] = {
        "api_key": job.api_key,
        "base_url": job.base_url,
        "include_profiles": job.include_profiles,
        "reconcile": job.reconcile,
        "segment_reports": job.segment_reports,
        "rate_limit_time_scale": job.rate_limit_time_scale,
    }
    if job.revision:
        options["revision"] = job.revision
    return klaviyo(**options)


def loaded_formats(load_info: Any) -> dict[str, str]:
    """The loader file format each table was loaded with, from the load packages."""
    formats: dict[str, str] = {}
    for package in load_info.load_packages:
        for job in package.jobs.get("completed_jobs", []):
            info = job.job_file_info
            if info.file_format != "sql":  # merge statements, not data
                formats[info.table_name] = info.file_format
    return formats


def run_export(job: ExportJob) -> ExportResult:
    """The export itself (runs in the child process): one `pipeline.run`, measured."""
    if job.extract_workers is not None:
        os.environ["EXTRACT__WORKERS"] = str(job.extract_workers)
    code = source_hash()  # before the import below: the code this export runs
    pipeline = make_pipeline(job)
    source = make_source(job)
    profiler = AllThreadsProfile() if job.profile_to else nullcontext()
    # The memory settings of an export (klaviyo_source.export): DuckDB's memory cap, Arrow's
    # system allocator and freed memory handed back.
    from klaviyo_source.export import export_settings, settings_applied
    from klaviyo_source.process_memory import managed_for_an_export

    tuned = settings_applied(export_settings(pipeline, job.loader_file_format))
    with tuned, RssTimeline() as rss, profiler, managed_for_an_export():
        started_at = time.time()
        cpu_started, started = time.process_time(), time.perf_counter()
        load_info = pipeline.run(source, loader_file_format=job.loader_file_format)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if isinstance(profiler, AllThreadsProfile) and job.profile_to:
        profiler.dump(job.profile_to)
    spans = _step_spans(pipeline)
    return ExportResult(
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        steps={name: end - start for name, (start, end) in spans.items()},
        memberships=_count_rows(pipeline, "segment_memberships"),
        profiles=_count_rows(pipeline, "profiles") if job.include_profiles else 0,
        rss_by_step={name: rss.peak_between(*span) for name, span in spans.items()},
        formats=loaded_formats(load_info),
        code=code,
        started_at=started_at,
    )


def export_child(conn: Connection, job: ExportJob) -> None:
    """Child process entry: run the export, send back its result or its traceback."""
    try:
        conn.send(run_export(job))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(ExportResult(0, 0, 0, {}, 0, 0, error=traceback.format_exc()))


def rss_of(pid: int) -> float:
    """Resident set size of another process, in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, IndexError, ValueError):
        return 0.0


def export_in_fresh_process(
    job: ExportJob, child: Callable[[Connection, ExportJob], None] = export_child
) -> ExportResult:
    """Run one export in a new interpreter, so its CPU and peak RSS are its own.

    `child` runs it there and sends back its result (`export_child`: one `pipeline.run`).
    An export whose RSS passes `job.rss_limit_mb` is killed (other work shares the machine)
    and comes back with `error` saying so; any other failure raises.
    """
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(sender, job))
    started = time.perf_counter()
    process.start()
    while not receiver.poll(0.2):
        rss = rss_of(process.pid or 0)
        if rss > job.rss_limit_mb:
            process.kill()
            process.join()
            wall = time.perf_counter() - started
            error = f"killed: RSS passed {job.rss_limit_mb:,.0f} MB after {wall:.0f} s"
            return ExportResult(wall, 0, rss, {}, 0, 0, error=error)
        if not process.is_alive() and not receiver.poll(0.2):
            raise RuntimeError(f"export process ended with {process.exitcode} and no result")
    result: ExportResult = receiver.recv()
    process.join()
    if result.error:
        raise RuntimeError(f"export failed in the child process:\n{result.error}")
    return result


@dataclass
class MeasuredExport:
    """An export plus what the simulator served, saw and spent meanwhile."""

    job: ExportJob
    result: ExportResult
    served: int  # memberships the simulator's account has
    server_cpu_s: float
    counters: dict[str, int]
    quota_log: QuotaLog | None = None

    @property
    def complete(self) -> bool:
        return self.result.memberships == self.served


def measure_export(sim: SimulatorProcess, job: ExportJob, keep_log: bool = False) -> MeasuredExport:
    """Reset the simulator's books, run the export, read the books."""
    sim.reset()
    server_cpu = sim.cpu_seconds()
    result = export_in_fresh_process(job)
    server_cpu = sim.cpu_seconds() - server_cpu
    counters = sim.counters()
    quota_log = sim.quota_log() if keep_log else None
    what = f"  {job.loader_file_format:7s} profiles={job.include_profiles!s:5s} " + (
        f"reconcile={job.reconcile:6s}: "
    )
    if result.error:
        log(what + result.error)
    else:
        log(
            what + f"{result.memberships:,} memberships in {result.wall_s:.1f} s, client CPU "
            f"{result.cpu_s:.1f} s, server CPU {server_cpu:.1f} s, RSS "
            f"{result.peak_rss_mb:.0f} MB, {sum(counters.values())} requests; load average "
            f"{os.getloadavg()[0]:.1f}"
        )
    return MeasuredExport(job, result, sim.info.memberships, server_cpu, counters, quota_log)


def new_workdir(root: Path, name: str) -> str:
    path = root / name
    path.mkdir(parents=True, exist_ok=False)
    return str(path)


def new_job(plan: Plan, sim: SimulatorProcess, workdir: str, **options: Any) -> ExportJob:
    """An export of the simulator's account with the plan's options."""
    return ExportJob(
        sim.info.base_url,
        sim.info.api_key,
        workdir,
        rss_limit_mb=plan.rss_limit_mb,
        **options,
    )


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    section: str
    figure: str
    value: str
    target: str = ""
    met: bool | None = None
    failed: bool = False  # the figure could not be measured


def _mark(row: Row) -> str:
    if row.failed:
        return "FAILED"
    return "" if row.met is None else ("yes" if row.met else "NO")


def render_table(rows: Sequence[Row]) -> str:
    """A plain-text table, one row per figure, sections in order."""
    header = ("#", "figure", "value", "target", "met")
    body = [(row.section, row.figure, row.value, row.target, _mark(row)) for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "-+-".join("-" * width for width in widths)
    out = [line(header), rule]
    previous = None
    for cells in body:
        if previous is not None and cells[0] != previous:
            out.append(rule)
        out.append(line(cells))
        previous = cells[0]
    return "\n".join(out)


def machine_facts() -> list[str]:
    """CPU, cores, load and the versions that matter."""
    import dlt
    import duckdb

    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for text in cpuinfo:
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    try:
        import pyarrow

        arrow = pyarrow.__version__
    except ImportError:
        arrow = "not installed"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"CPU: {model}; {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); "
        f"load average at start {load}",
        f"Python {platform.python_version()}, dlt {dlt.__version__}, duckdb {duckdb.__version__}, "
        f"pyarrow {arrow}, {platform.platform()}",
    ]


def source_hash() -> str:
    """A short hash of every file of the source package as it is on disk now."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "klaviyo_source").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def source_fingerprint() -> str:
    """Git HEAD, files changed since, and a hash of the source package as it is now.

    Other people may edit the source while this runs; compare the fingerprints at start and
    end to know whether every figure measured the same code.
    """
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "klaviyo_source", "pipelines").splitlines()
    changed_names = ", ".join(line.split(maxsplit=1)[1] for line in changed) or "none"
    return f"HEAD {git('rev-parse', '--short', 'HEAD')}, uncommitted: {changed_names}; " + (
        f"klaviyo_source sha256 {source_hash()}"
    )


def _k(value: int) -> str:
    return f"{value // 1_000_000}M" if value >= 1_000_000 else f"{value // 1000}k"


# -- 1. spending the quota at the published limits --------------------------------------------


@dataclass(frozen=True)
class QuotaLog:
    """What the simulator counted during one rate-limited export."""

    epoch: float  # time.time() at which the simulator's windows began
    charged: list[tuple[str, float]]  # (bucket, scaled seconds since epoch) per allowed request
    statuses: list[int]  # status of every request answered


def bucket_windows(bucket: str, revision: str) -> list[tuple[int, float]]:
    """(requests, scaled seconds) windows the simulator enforces on a bucket, burst first."""
    from klaviyo_source.simulator.rate_limits import tier_windows
    from klaviyo_source.simulator.revisions import Revision
    from klaviyo_source.simulator.segment_reports import ReportSettings
    from klaviyo_source.simulator.spec_tables import OPERATION_TIER

    if OPERATION_TIER.get(bucket) == "REPORT":  # the report endpoints' own windows
        return [(w.limit, w.seconds) for w in ReportSettings().windows()]
    tier = {
        "additional-fields:profile_count": "XS",
        "additional-fields:predictive_analytics": "M",
    }.get(bucket) or OPERATION_TIER[bucket]
    large = Revision(revision).large_steady_limit
    return [(w.limit, w.seconds) for w in tier_windows(tier, large)]


def earliest_times(windows: list[tuple[int, float]], start: float) -> Iterator[float]:
    """When requests could go at the earliest from `start` (scaled seconds since the epoch),
    each as soon as every fixed window holding it has room: the quota's own floor."""
    used: dict[tuple[float, int], int] = {}
    now = start
    while True:
        keys = [(seconds, int(now // seconds)) for _, seconds in windows]
        limits = [limit for limit, _ in windows]
        room = min(limit - used.get(key, 0) for limit, key in zip(limits, keys, strict=True))
        for _ in range(room):
            yield now
            for key in keys:
                used[key] = used.get(key, 0) + 1
        now = max(
            (index + 1) * seconds
            for limit, (seconds, index) in zip(limits, keys, strict=True)
            if used.get((seconds, index), 0) >= limit
        )


@dataclass(frozen=True)
class QuotaUse:
    """One rate-limited export against the quotas it spent."""

    wall_s: float  # pipeline.run
    fewest_s: float  # when its last request could have gone at the earliest, after its start
    phase_s: float  # seconds into the simulator's minute at which it started (scaled)
    throttled: int
    answered: int
    used: dict[str, tuple[int, float]]  # bucket: (requests, share of what the quota allowed)
    first_s: float  # first request, after the start
    last_s: float  # last request, after the start
    resumed_s: list[
        float
    ]  # the busiest bucket's first request in each later minute, after its reset


def quota_use(run: MeasuredExport, revision: str, scale: float) -> QuotaUse:
    """The export's wall against the fewest seconds its requests needed, per the simulator's
    own count of what each bucket was charged."""
    log = run.quota_log
    assert log is not None
    start = (run.result.started_at - log.epoch) * scale
    end = start + run.result.wall_s * scale
    by_bucket: dict[str, int] = {}
    for bucket, _ in log.charged:
        by_bucket[bucket] = by_bucket.get(bucket, 0) + 1
    fewest = 0.0
    used: dict[str, tuple[int, float]] = {}
    stamps = sorted(at for _, at in log.charged)
    busiest = max(by_bucket, key=by_bucket.__getitem__)
    firsts: dict[int, float] = {}
    for bucket, at in log.charged:
        if bucket == busiest:
            firsts.setdefault(int(at // 60.0), at)
    resumed = [at - index * 60.0 for index, at in sorted(firsts.items())[1:]]
    for bucket, count in sorted(by_bucket.items(), key=lambda item: -item[1]):
        windows = bucket_windows(bucket, revision)
        last = next(itertools.islice(earliest_times(windows, start), count - 1, None))
        fewest = max(fewest, last - start)
        # What the quota allowed over the run's wall: as many as fit from its start to its end.
        allowed = sum(1 for at in itertools.takewhile(end.__gt__, earliest_times(windows, start)))
        used[bucket] = (count, count / max(1, allowed))
    throttled = sum(1 for status in log.statuses if status == 429)
    return QuotaUse(
        run.result.wall_s,
        fewest / scale,
        start % 60.0,
        throttled,
        len(log.statuses),
        used,
        (stamps[0] - start) / scale,
        (stamps[-1] - start) / scale,
        [delay / scale for delay in resumed],
    )


def quota_rows(label: str, use: QuotaUse, memberships: int, busy: float) -> list[Row]:
    """The rows of one rate-limited export: wall against the floor, 429s, quota used."""
    ratio = use.wall_s / use.fewest_s if use.fewest_s else float("inf")
    throttled_share = use.throttled / max(1, use.answered)
    used = ", ".join(
        f"{bucket} {share:.1%} ({count:,})" for bucket, (count, share) in use.used.items()
    )
    return [
        Row(
            "1",
            f"wall of a full export / fewest seconds its requests allow ({label}; started "
            f"{use.phase_s:.0f} s into the minute)",
            f"{use.wall_s:.1f} s / {use.fewest_s:.1f} s = {ratio:.3f}x",
            f"<= {TARGET_QUOTA_RATIO:.2f}x",
            ratio <= TARGET_QUOTA_RATIO,
        ),
        Row(
            "1",
            f"where the wall went ({label})",
            f"first request after {use.first_s:.1f} s, last after {use.last_s:.1f} s; each "
            "minute resumed "
            + ", ".join(f"{delay:.2f}" for delay in use.resumed_s)
            + f" s after its reset; {use.wall_s - use.last_s:.1f} s after the last request",
        ),
        Row(
            "1",
            f"share of 429s ({label})",
            f"{throttled_share:.2%} ({use.throttled} of {use.answered})",
            f"<= {TARGET_THROTTLED_SHARE:.0%}",
            throttled_share <= TARGET_THROTTLED_SHARE,
        ),
        Row(
            "1",
            f"share of each quota used over the run's wall, requests ({label})",
            used,
        ),
        Row("1", f"memberships per minute ({label})", f"{memberships / use.wall_s * 60:,.0f}"),
        Row(
            "1",
            f"exporter CPU during the paced run, share of one core ({label})",
            f"{busy:.0%}",
            "well below 100%, else CPU and not the quota sets the pace",
        ),
    ]


def wait_for_phase(sim: SimulatorProcess, phase: float, scale: float) -> None:
    """Return when the simulator's minute is `phase` seconds (scaled) in."""
    time.sleep(((phase - sim.phase()) % 60.0) / scale)


def pacing_rows(plan: Plan, root: Path) -> tuple[list[Row], list[MeasuredExport]]:
    """Figure 1: full exports with the simulator enforcing the published limits."""
    rows: list[Row] = []
    runs: list[MeasuredExport] = []
    scale = plan.pacing_time_scale
    mode = "with profiles" if plan.pacing_include_profiles else "membership-only"
    log(f"1. quota: {_k(plan.pacing_memberships)} memberships, limits on, time_scale {scale:g}")
    with SimulatorProcess(plan.pacing_memberships, rate_limits=True, time_scale=scale) as sim:
        sim.set_rate_limits(False)
        warm_simulator(sim, [plan.pacing_include_profiles])
        sim.set_rate_limits(True)
        for revision in plan.pacing_revisions:
            job = new_job(
                plan,
                sim,
                new_workdir(root, f"pacing-{revision}"),
                include_profiles=plan.pacing_include_profiles,
                # The reports' backfill, at 2 requests a minute, would set the wall alone.
                segment_reports=False,
                revision=revision,
                rate_limit_time_scale=scale,
            )
            wait_for_phase(sim, plan.pacing_phase, scale)
            measured = measure_export(sim, job, keep_log=True)
            runs.append(measured)
            if measured.result.error:
                rows.append(_failed_row("1", f"paced export, revision {revision}", measured, ""))
                continue
            use = quota_use(measured, revision, scale)
            label = f"revision {revision}, {mode}, x{scale:g}"
            busy = measured.result.cpu_s / measured.result.wall_s
            rows += quota_rows(label, use, measured.result.memberships, busy)
    return rows, runs


# -- 2. requests per membership, 3. throughput, 4. memory ------------------------------------


def _formats_text(formats: dict[str, str]) -> str:
    """`jsonl` when every table used one format, else each format with its tables."""
    by_format: dict[str, list[str]] = {}
    for table, file_format in sorted(formats.items()):
        if not table.startswith("_dlt"):
            by_format.setdefault(file_format, []).append(table)
    if len(by_format) <= 1:
        return next(iter(by_format), "?")
    return "; ".join(f"{fmt}: {', '.join(tables)}" for fmt, tables in by_format.items())


def _failed_row(section: str, figure: str, run: MeasuredExport, target: str) -> Row:
    return Row(section, figure, run.result.error or "failed", target, False, failed=True)


def pages(rows: int, page_size: int) -> int:
    """Pages a listing of so many rows takes; an empty listing is one page too."""
    return max(1, -(-rows // page_size))


# Requests for Klaviyo's daily segment reports, a table of their own beside the export.
REPORT_OPERATIONS = ("query_segment_series", "query_segment_values")


def requests_per_100_row(run: MeasuredExport, segment_sizes: dict[str, int]) -> Row:
    """Figure 2a: the requests of a full export against the fewest its account allows.

    The fewest: the segment listing's pages, the tags' page and a page per started 100
    members of each segment (each segment's last page is a partial one, so a ratio of
    1.01 requests per 100 memberships is out of reach for small accounts). Requests for the
    daily segment reports are counted apart: they fill a table of their own.
    """
    reports = sum(run.counters.get(name, 0) for name in REPORT_OPERATIONS)
    made = sum(run.counters.values()) - reports
    walked_pages = run.counters.get("get_segment_profiles", 0)
    listing_pages = pages(len(segment_sizes), LISTING_PAGE_SIZE)
    member_pages = sum(pages(size, MEMBER_PAGE_SIZE) for size in segment_sizes.values())
    fewest = listing_pages + 1 + member_pages
    figure = (
        f"requests of a full export of {_k(run.served)} against the fewest its segments allow "
        f"({walked_pages} segment-profile pages; {reports} segment report requests besides)"
    )
    target = f"<= {fewest} ({listing_pages} listing + 1 tags + member pages)"
    if run.result.error:
        return _failed_row("2", figure, run, target)
    per_100 = made / run.result.memberships * 100
    value = f"{made} ({per_100:.4f} per 100 memberships)"
    return Row("2", figure, value, target, made <= fewest)


def no_change_rows(sim: SimulatorProcess, full: MeasuredExport) -> list[Row]:
    """Figure 2b: requests of two no-change runs on the pipeline of a full export."""
    segments = len(sim.info.segment_sizes)
    listing_pages = pages(segments, LISTING_PAGE_SIZE)
    # Each populated segment's leave check lists its ids (a page per 100) or counts it (1).
    checks = sum(-(-size // MEMBER_PAGE_SIZE) for size in sim.info.segment_sizes.values())
    rows = []
    for reconcile, extra in (("off", 0), ("counts", checks)):
        # Beside the segments: the tags' page (the table holds every tag) and the profile
        # refresh's one request for profiles updated since its cursor.
        limit = listing_pages + 2 + segments + extra
        extra_text = f" + at most {extra} for leave checks" if extra else ""
        target = (
            f"<= {limit} ({listing_pages} listing pages + 1 tags + 1 profile refresh + "
            f"{segments} segments{extra_text})"
        )
        figure = f"requests, no-change incremental run, reconcile={reconcile}"
        if full.result.error:
            rows.append(_failed_row("2", f"{figure}: its full export failed", full, target))
            continue
        measured = measure_export(sim, replace(full.job, reconcile=reconcile))
        made = sum(measured.counters.values())
        breakdown = ", ".join(
            f"{name} {count}" for name, count in sorted(measured.counters.items())
        )
        rows.append(Row("2", f"{figure} ({breakdown})", str(made), target, made <= limit))
    return rows


def throughput_rows(runs: Sequence[MeasuredExport]) -> list[Row]:
    """Figure 3: memberships/s into DuckDB and CPU per 100k memberships, limits off."""
    rows: list[Row] = []
    target = f">= {TARGET_MEMBERSHIPS_PER_S:,}"
    for run in runs:
        result = run.result
        mode = "with profiles" if run.job.include_profiles else "membership-only"
        name = f"{_k(run.served)} {mode}, {run.job.loader_file_format}"
        if run.job.extract_workers is not None:
            name += f", {run.job.extract_workers} extract workers"
        if result.error:
            rows.append(_failed_row("3", f"memberships/s end-to-end, {name}", run, target))
            continue
        loaded_as = _formats_text(result.formats)
        if loaded_as != run.job.loader_file_format:
            name += f" (loaded as {loaded_as})"
        steps = ", ".join(
            f"{step} {result.steps[step]:.1f}"
            for step in ("extract", "normalize", "load")
            if step in result.steps
        )
        rate = result.memberships / result.wall_s
        client = result.cpu_s / result.memberships * 1e5
        server = run.server_cpu_s / result.memberships * 1e5
        # The target is the default format's; another format is there to compare with it.
        judged = run.job.loader_file_format == DEFAULT_FORMAT
        rows += [
            Row(
                "3",
                f"memberships/s end-to-end, {name} ({result.wall_s:.1f} s: {steps})",
                f"{rate:,.0f}",
                target if judged else "for comparison",
                rate >= TARGET_MEMBERSHIPS_PER_S if judged else None,
            ),
            Row(
                "3",
                f"CPU s per 100k memberships, {name}: exporter / simulator process",
                f"{client:.1f} / {server:.1f}",
            ),
        ]
    return rows


def rss_rows(runs: Sequence[MeasuredExport]) -> list[Row]:
    """Figure 4: peak RSS of the exporting process by size (profiles, default format)."""
    rows = []
    target = f"<= {TARGET_PEAK_RSS_MB:.0f} MB"
    for run in runs:
        result = run.result
        figure = f"peak RSS of the exporting process, {_k(run.served)} memberships"
        if result.error:
            rows.append(_failed_row("4", figure, run, target))
            continue
        steps = " / ".join(
            f"{step} {result.rss_by_step.get(step, 0):,.0f}"
            for step in ("extract", "normalize", "load")
        )
        figure += (
            f" (with profiles, {run.job.loader_file_format}, loaded as "
            f"{_formats_text(result.formats)}; peak MB in {steps})"
        )
        rss = result.peak_rss_mb
        rows.append(Row("4", figure, f"{rss:,.0f} MB", target, rss <= TARGET_PEAK_RSS_MB))
    measured = [run for run in runs if not run.result.error]
    if len(measured) > 1:
        first, last = measured[0], measured[-1]
        growth = last.result.peak_rss_mb / first.result.peak_rss_mb
        # Told, not judged: the bound that matters is the largest account's (the lean rows).
        rows.append(
            Row(
                "4",
                f"peak RSS growth {_k(first.served)} -> {_k(last.served)} memberships",
                f"x{growth:.2f}",
                "the bound is the largest account's",
            )
        )
    return rows


def reconciliation_rss_row(sim: SimulatorProcess, full: MeasuredExport) -> Row:
    """Figure 4b: peak RSS of a run that walks every segment again over a full export.

    A reconciliation compares each walked segment with the members the destination holds,
    so it is the scheduled run whose memory grows with segment size, not the first export.
    """
    figure = f"peak RSS of a reconciliation run (reconcile=all) over the {_k(full.served)} export"
    target = f"<= {TARGET_PEAK_RSS_MB:.0f} MB"
    if full.result.error:
        return _failed_row("4", f"{figure}: its full export failed", full, target)
    run = measure_export(sim, replace(full.job, reconcile="all"))
    if run.result.error:
        return _failed_row("4", figure, run, target)
    rss = run.result.peak_rss_mb
    steps = " / ".join(
        f"{step} {run.result.rss_by_step.get(step, 0):,.0f}" for step in ("extract", "load")
    )
    figure += (
        f" (with profiles; {run.result.wall_s:.1f} s, {sum(run.counters.values())} requests; "
        f"peak MB in {steps})"
    )
    return Row("4", figure, f"{rss:,.0f} MB", target, rss <= TARGET_PEAK_RSS_MB)


def lean_rss_row(measured: Any) -> Row:
    """Figure 4c: peak RSS of one export of a lean account as the command runs it
    (a `memory_benchmark.Measured`: its account, `KlaviyoExport.run` in a fresh process)."""
    result = measured.result
    figure = (
        f"peak RSS of KlaviyoExport.run, lean account of {_k(measured.memberships)} memberships, "
        f"{measured.profiles:,} profiles each in "
        f"{measured.memberships // max(1, measured.profiles)} segments"
    )
    target = f"<= {TARGET_PEAK_RSS_MB:.0f} MB"
    if result.error:
        return Row("4", figure, result.error.strip().splitlines()[-1], target, False, failed=True)
    steps = " / ".join(
        f"{step} {result.rss_by_step.get(step, 0):,.0f}"
        for step in ("extract", "normalize", "load")
    )
    figure += f" (peak MB in {steps}; {result.wall_s:.0f} s, CPU {result.cpu_s:.0f} s)"
    rss = result.peak_rss_mb
    if not measured.complete:
        loaded = f"{result.memberships:,} of {measured.memberships:,} memberships"
        return Row("4", figure, f"{rss:,.0f} MB, loaded only {loaded}", target, False, failed=True)
    return Row("4", figure, f"{rss:,.0f} MB", target, rss <= TARGET_PEAK_RSS_MB)


def lean_rss_rows(plan: Plan, root: Path) -> tuple[list[Row], list[ExportResult]]:
    """Figure 4c at each lean size, measured by memory_benchmark (imported here: it imports
    this module)."""
    import memory_benchmark

    rows: list[Row] = []
    results: list[ExportResult] = []
    for size in plan.lean_rss_sizes:
        log(f"4. peak RSS, lean account of {_k(size)} memberships, as the command exports it")
        for measured in memory_benchmark.measure_size(size, root, rss_limit_mb=plan.rss_limit_mb):
            rows.append(lean_rss_row(measured))
            results.append(measured.result)
    return rows, results


def no_change_target_s(segments: int) -> float | None:
    """The wall a no-change run over so many segments may take, if one is set."""
    return next((seconds for most, seconds in TARGET_NO_CHANGE_S if segments <= most), None)


def no_change_target_text(segments: int) -> str:
    target_s = no_change_target_s(segments)
    if target_s is None:
        return ""
    return f"<= {target_s / 60:g} min" if target_s >= 60 else f"<= {target_s:g} s"


def no_change_at_limits_rows(run: Any, label: str) -> list[Row]:
    """Figure 5 of one run (a `leave_checks_benchmark.NoChangeRun`): its wall, its requests."""
    target_s = no_change_target_s(run.segments)
    throttled_share = run.throttled / max(1, run.answered)
    return [
        Row(
            "5",
            f"no-change run, {run.segments} segments ({label}; {run.memberships:,} "
            f"memberships): wall of pipeline.run (extract {run.extract_s:.1f} s; {run.plan})",
            f"{run.wall_s:.1f} s",
            no_change_target_text(run.segments),
            None if target_s is None else run.wall_s <= target_s,
        ),
        Row(
            "5",
            f"no-change run, {run.segments} segments: requests by endpoint ({run.served_text()})",
            f"{run.answered:,}; {run.throttled} answered 429",
            f"429s <= {TARGET_THROTTLED_SHARE:.0%}",
            throttled_share <= TARGET_THROTTLED_SHARE,
        ),
    ]


def no_change_section(plan: Plan) -> list[Row]:
    """Figure 5: no-change runs with leave checks at the limits, measured by
    leave_checks_benchmark (a first export with the limits off, then the timed run); at the
    most segments, also the hourly run that reads the segment reports' last days again."""
    import leave_checks_benchmark as leave_checks

    scale = plan.pacing_time_scale
    options = leave_checks.Options(largest=plan.no_change_largest, time_scale=scale)
    hourly = replace(options, segment_reports=True, reread_reports=True)
    label = f"largest {plan.no_change_largest:,}, reconcile={options.reconcile}, x{scale:g}"
    runs = [(segments, options, label) for segments in plan.no_change_segments]
    if plan.no_change_segments:
        reports = f"{label}, segment reports on: the hourly run that reads their last days again"
        runs.append((max(plan.no_change_segments), hourly, reports))
    rows: list[Row] = []
    for segments, chosen, text in runs:
        log(f"5. no-change run at the limits, {segments} segments ({text})")
        try:
            rows += no_change_at_limits_rows(leave_checks.measure_no_change(segments, chosen), text)
        except Exception as error:  # noqa: BLE001 - the row says so, the other rows go on
            figure = f"no-change run, {segments} segments ({text})"
            target = no_change_target_text(segments)
            log(traceback.format_exc())
            rows.append(
                Row("5", figure, f"{type(error).__name__}: {error}", target, False, failed=True)
            )
    return rows


def correctness_row(runs: Sequence[MeasuredExport]) -> Row:
    """Every full export loaded exactly the simulator's memberships (else figures mislead)."""
    wrong = [
        f"{run.result.error or f'{run.result.memberships} of {run.served}'}"
        for run in runs
        if not run.complete
    ]
    return Row(
        "-",
        "full exports whose segment_memberships row count equals the simulator's memberships",
        f"{len(runs) - len(wrong)} of {len(runs)}" + (f" ({'; '.join(wrong)})" if wrong else ""),
        "all",
        not wrong,
    )


def code_versions_row(results: Sequence[ExportResult]) -> Row:
    """Whether every export ran the same source code (others may edit it meanwhile)."""
    versions = sorted({result.code for result in results if result.code})
    return Row(
        "-",
        "source versions the exports ran (sha256 of klaviyo_source/*.py)",
        ", ".join(versions),
        "one",
        len(versions) <= 1,
    )


def default_run(runs: Sequence[MeasuredExport]) -> MeasuredExport:
    """The with-profiles run in the default format: the pipeline's default configuration."""
    return next(
        run
        for run in runs
        if run.job.include_profiles
        and run.job.loader_file_format == DEFAULT_FORMAT
        and run.job.extract_workers is None
    )


def fewer_workers_run(sim: SimulatorProcess, plan: Plan, root: Path) -> MeasuredExport:
    """The default export again with `FEWER_WORKERS` extract workers instead of dlt's 5.

    With no network latency (limits off, a local simulator) five threads contend for the GIL
    and spend CPU on it; against Klaviyo each request waits a few hundred milliseconds, and
    five in flight are what reaches the rate ceiling. The table shows both.
    """
    workdir = new_workdir(root, f"{sim.info.memberships}-workers-{FEWER_WORKERS}")
    job = new_job(
        plan,
        sim,
        workdir,
        include_profiles=True,
        loader_file_format=DEFAULT_FORMAT,
        extract_workers=FEWER_WORKERS,
    )
    return measure_export(sim, job)


def full_exports(
    sim: SimulatorProcess,
    plan: Plan,
    formats: Sequence[str],
    modes: Sequence[bool],
    root: Path,
) -> list[MeasuredExport]:
    """One full export per profile mode and file format, each into a fresh pipeline."""
    runs = []
    for include_profiles in modes:
        for file_format in formats:
            workdir = new_workdir(root, f"{sim.info.memberships}-{file_format}-{include_profiles}")
            job = new_job(
                plan,
                sim,
                workdir,
                include_profiles=include_profiles,
                loader_file_format=file_format,
            )
            runs.append(measure_export(sim, job))
    return runs


@dataclass
class SizeResults:
    """The full exports of one account size, and the rows of later runs measured there."""

    runs: list[MeasuredExport]
    no_change: list[Row]
    reconciliation: list[Row]
    segment_sizes: dict[str, int]


def run_size(size: int, plan: Plan, root: Path) -> SizeResults:
    """Every export this plan makes at one account size, limits off."""
    measured_throughput = size in plan.throughput_sizes
    modes = (True, False) if measured_throughput else (True,)
    formats = plan.formats if measured_throughput else (DEFAULT_FORMAT,)
    with SimulatorProcess(size) as sim:
        log(f"{_k(size)}: {sim.info.memberships:,} memberships at {sim.info.base_url}, limits off")
        warm_simulator(sim, modes)
        runs = full_exports(sim, plan, formats, modes, root)
        if size == max(plan.throughput_sizes):
            runs.append(fewer_workers_run(sim, plan, root))
        no_change = (
            no_change_rows(sim, default_run(runs)) if size == plan.request_count_size else []
        )
        reconciliation = (
            [reconciliation_rss_row(sim, default_run(runs))] if size == max(plan.rss_sizes) else []
        )
    return SizeResults(runs, no_change, reconciliation, dict(sim.info.segment_sizes))


def run_benchmark(plan: Plan, root: Path) -> list[Row]:
    """All five figures, in the table's order (the first alone with `--pacing-only`)."""
    pacing, paced_runs = pacing_rows(plan, root)
    if plan.pacing_only:
        return pacing + [code_versions_row([run.result for run in paced_runs])]
    results = {size: run_size(size, plan, root) for size in sorted(plan.sizes())}
    lean, lean_results = lean_rss_rows(plan, root)
    no_change_at_limits = no_change_section(plan)
    requests = [
        requests_per_100_row(default_run(found.runs), found.segment_sizes)
        for found in results.values()
    ]
    no_change = [row for found in results.values() for row in found.no_change]
    throughput = [run for size in plan.throughput_sizes for run in results[size].runs]
    rss = [default_run(results[size].runs) for size in plan.rss_sizes]
    every_run = [run for found in results.values() for run in found.runs]
    exports = [run.result for run in [*paced_runs, *every_run]] + lean_results
    return (
        pacing
        + requests
        + no_change
        + throughput_rows(throughput)
        + rss_rows(rss)
        + lean
        + [row for found in results.values() for row in found.reconciliation]
        + no_change_at_limits
        + [correctness_row(every_run), code_versions_row(exports)]
    )


# -- profiling -------------------------------------------------------------------------------

# Layers by file. Code several layers share (stdlib, dlt.common, builtins) is booked to the
# layers of its callers; JSON loads called by the HTTP client count as "JSON parse", as does
# the decoding of member pages (member_pages, msgspec) wherever it is called.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "waiting (I/O, locks: not CPU)",
        (
            "<method 'acquire' of '_thread.",
            "<method 'recv_into' of '_socket.socket'",
            "<method 'poll' of 'select.poll'",
            "<method 'poll' of 'select.epoll'",
            "<built-in method time.sleep>",
            "<method 'get' of '_queue.SimpleQueue'",
        ),
    ),
    ("simulator", ("klaviyo_source/simulator/",)),
    ("JSON parse", ("klaviyo_source/member_pages.py", "of 'msgspec.json.Decoder'")),
    (
        "HTTP client",
        (
            "/requests/",
            "/urllib3/",
            "/http/client.py",
            "/socket.py",
            "/ssl.py",
            "/email/",
            "/tenacity/",
            "dlt/sources/helpers/",
            "klaviyo_source/client.py",
            "klaviyo_source/transport.py",
            "klaviyo_source/quota.py",
            "klaviyo_source/origins.py",
            "klaviyo_source/documents.py",
            "klaviyo_source/endpoints.py",
            "klaviyo_source/errors.py",
            "<method 'sendall' of '_socket.socket'",
        ),
    ),
    ("our row shaping", ("klaviyo_source/",)),
    ("dlt extract", ("dlt/extract/",)),
    ("normalize", ("dlt/normalize/",)),
    ("load", ("dlt/load/", "dlt/destinations/", "of 'duckdb.", "duckdb.duckdb")),
    ("pipeline glue", ("dlt/pipeline/", "concurrent/futures/", "/threading.py")),
)
JSON_LOADS = ("dlt/common/json/", ("loadb", "loads", "typed_loadb", "typed_loads"))
OTHER = "other (interpreter, process start)"
Shares = dict[str, float]


def category_of(func: Func) -> str | None:
    """The layer of a function by its file or builtin name; None for shared code."""
    text = f"{func[0]}:{func[2]}"
    for category, patterns in CATEGORIES:
        if any(pattern in text for pattern in patterns):
            return category
    return None


def _is_json_load(func: Func) -> bool:
    return JSON_LOADS[0] in func[0] and func[2] in JSON_LOADS[1]


def _mix_callers(func: Func, callers: dict[Func, tuple[Any, ...]], shares: dict) -> Shares:
    """The callers' layers, weighted by the time `func` spent for each of them."""
    mixed: Shares = {}
    weights = 0.0
    for caller, edge in callers.items():
        caller_shares = shares.get(caller)
        weight = edge[2] or edge[3]  # (calls, primitive calls, self time, cumulative time)
        if not caller_shares or caller == func or weight <= 0:
            continue
        weights += weight
        for category, share in caller_shares.items():
            if _is_json_load(func) and category == "HTTP client":
                category = "JSON parse"
            mixed[category] = mixed.get(category, 0.0) + share * weight
    return {category: value / weights for category, value in mixed.items()} if weights else {}


def layer_shares(stats: dict[Func, tuple[Any, ...]], rounds: int = 40) -> dict[Func, Shares]:
    """Which layers each function's self time belongs to.

    A function of a known layer belongs to it; shared code to its callers' layers, in
    proportion to the time it spent for each. Repeated rounds carry that up call chains and
    around recursion; what no round resolves (thread roots) is `OTHER`.
    """
    shares: dict[Func, Shares] = {}
    for func in stats:
        category = category_of(func)
        if category is not None:
            shares[func] = {category: 1.0}
    shared = [func for func in stats if func not in shares]
    for _ in range(rounds):
        for func in shared:
            mixed = _mix_callers(func, stats[func][4], shares)
            if mixed:
                shares[func] = mixed
    for func in shared:
        shares.setdefault(func, {OTHER: 1.0})
    return shares


def layer_totals(stats: dict[Func, tuple[Any, ...]], shares: dict[Func, Shares]) -> Shares:
    """Self seconds per layer."""
    totals: Shares = {}
    for func, entry in stats.items():
        for category, share in shares[func].items():
            totals[category] = totals.get(category, 0.0) + entry[2] * share
    return totals


def _func_label(func: Func) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    short = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
    if "/lib/python3" in short:
        short = "stdlib/" + short.split("/lib/python3.")[-1].split("/", 1)[-1]
    return f"{short}:{line}({name})"


def profile_report(path: str, top: int = 15) -> str:
    """Top functions by cumulative and self time, and self time grouped by layer."""
    raw: dict[Func, tuple[Any, ...]] = pstats.Stats(path).stats  # type: ignore[attr-defined]
    shares = layer_shares(raw)
    totals = layer_totals(raw, shares)
    total = sum(totals.values())
    waiting = totals.get(CATEGORIES[0][0], 0.0)
    lines = [
        f"profiled time, all threads: {total:.1f} s, of which {waiting:.1f} s waiting; "
        "shares below are of the time not waiting"
    ]
    busy = total - waiting
    for title, key in (("cumulative", 3), ("self", 2)):
        lines.append(f"\ntop {top} by {title} time (s, share, calls, layer):")
        ranked = sorted(raw.items(), key=lambda item: -item[1][key])
        ranked = [item for item in ranked if category_of(item[0]) != CATEGORIES[0][0]][:top]
        for func, entry in ranked:
            layer = max(shares[func].items(), key=lambda item: item[1])[0]
            lines.append(
                f"  {entry[key]:8.1f}  {entry[key] / busy:6.1%}  {entry[1]:>10,}  "
                f"{layer:16s} {_func_label(func)}"
            )
    lines.append("\nself time by layer (shared code booked to its callers' layers):")
    for category, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        share = "" if category == CATEGORIES[0][0] else f"{seconds / busy:6.1%}"
        lines.append(f"  {seconds:8.1f} s  {share:>6s}  {category}")
    return "\n".join(lines)


def run_profile(args: argparse.Namespace, root: Path) -> str:
    """Profile one full export with limits off and one extract worker; return the report."""
    stats_path = str(root / "export.pstats")
    include_profiles = not args.membership_only
    with SimulatorProcess(args.profile_memberships) as sim:
        log(f"profiling: {sim.info.memberships:,} memberships")
        warm_simulator(sim, [include_profiles])
        job = ExportJob(
            sim.info.base_url,
            sim.info.api_key,
            new_workdir(root, "profile"),
            include_profiles=include_profiles,
            loader_file_format=args.profile_format,
            profile_to=stats_path,
            extract_workers=1,
            rss_limit_mb=args.rss_limit_gb * 1024,
        )
        result = measure_export(sim, job).result
    if result.error:
        return f"profiled export failed: {result.error}"
    header = (
        f"profiled export: {result.memberships:,} memberships, profiles={include_profiles}, "
        f"{args.profile_format} (tables loaded as {_formats_text(result.formats)}); "
        f"{result.wall_s:.1f} s wall under the profiler, process CPU {result.cpu_s:.1f} s; "
        "steps " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.steps.items())
    )
    return header + "\n" + profile_report(stats_path)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulator and source clock speed-up for the limits-on figures (1: Klaviyo's "
        "real windows; 2: 1 min = 30 s); keep the scaled ceiling (1,250 memberships/s x scale) "
        "well below the exporter's limits-off throughput, or the figure measures CPU",
    )
    parser.add_argument(
        "--pacing-memberships",
        type=int,
        default=200_000,
        help="account size of the limits-on figures (200k: about 2,000 requests, 100 s a run)",
    )
    parser.add_argument(
        "--pacing-phase",
        type=float,
        default=30.0,
        help="seconds into the simulator's minute at which each limits-on export starts",
    )
    parser.add_argument(
        "--pacing-only", action="store_true", help="only the limits-on figures (section 1)"
    )
    parser.add_argument(
        "--pacing-profiles",
        action="store_true",
        help="limits-on figures with profile attributes (default: membership-only, cheaper)",
    )
    parser.add_argument(
        "--formats", default=None, help="loader file formats, comma-separated (parquet,jsonl)"
    )
    parser.add_argument(
        "--no-change-segments",
        default=None,
        help="segments of the no-change runs at the limits, comma-separated (20,100,500; "
        "quick: 3,6; empty: none)",
    )
    parser.add_argument(
        "--no-change-largest",
        type=int,
        default=None,
        help="members of their largest segment (20000; quick: 300)",
    )
    parser.add_argument(
        "--lean-memberships",
        default=None,
        help="memberships of the lean accounts whose export's peak RSS is measured as the "
        "command runs it, comma-separated (1000000; quick: 10000,30000; empty: none)",
    )
    parser.add_argument(
        "--long", action="store_true", help="add a lean account of 10M memberships (~30 min)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one export instead of the table"
    )
    parser.add_argument("--profile-memberships", type=int, default=1_000_000)
    parser.add_argument("--profile-format", default=DEFAULT_FORMAT)
    parser.add_argument("--membership-only", action="store_true", help="profile without profiles")
    parser.add_argument(
        "--rss-limit-gb",
        type=float,
        default=4.0,
        help="kill an export whose RSS passes this (protects a shared machine)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


@contextmanager
def work_directory(keep: bool) -> Iterator[Path]:
    """A temporary directory for pipelines and DuckDB files, removed unless kept."""
    if keep:
        path = Path(tempfile.mkdtemp(prefix="klaviyo-export-benchmark-"))
        log(f"keeping {path}")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="klaviyo-export-benchmark-") as name:
        yield Path(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    child_environment()
    formats = tuple(args.formats.split(",")) if args.formats else available_formats()
    facts = machine_facts()
    facts.append(f"code at start: {source_fingerprint()}")
    started = time.perf_counter()
    with work_directory(args.keep) as root:
        if args.profile:
            report = run_profile(args, root)
            facts.append(f"code at end:   {source_fingerprint()}")
            print("\n".join(facts))
            print(report)
            return 0
        plan = make_plan(args, formats)
        rows = run_benchmark(plan, root)
    elapsed = time.perf_counter() - started
    facts.append(f"code at end:   {source_fingerprint()}")
    print("\n".join(facts))
    print(
        f"{'quick smoke check' if args.quick else 'full run'} in {elapsed / 60:.1f} min; "
        f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}. "
        "Figures are provisional (shared 2-core machine)."
    )
    print(render_table(rows))
    failed = [row for row in rows if row.failed]
    if failed:
        print(
            f"{len(failed)} figure(s) could not be measured (FAILED rows above; the log on "
            "stderr has each cause)"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
