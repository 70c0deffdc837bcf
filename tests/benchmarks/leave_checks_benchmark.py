"""No-change run benchmark: a run with leave detection on, at Klaviyo's real rate limits.

Not a test. Run: ``.venv/bin/python tests/benchmarks/leave_checks_benchmark.py``
(``--segments 20,100,500`` by default: about 3 minutes in all, under a minute of it the timed
runs; there is no long mode). ``export_benchmark.py`` prints the default rows in its table
through `measure_no_change`; this script gives one table of its own and the variants below.
For each number of segments:

- an account whose segment sizes have a long tail (tests/scenarios.py,
  `sizes_as_accounts_have_them`: the n-th largest holds 1/n of the largest, 20,000 by
  default, at least 5), every member joined days ago, served by the simulator in a process of
  its own;
- a first export with the simulator's limits off fills a DuckDB file;
- then the simulator enforces Klaviyo's published limits with their real windows
  (``--time-scale 1``; fixed 1 s and 60 s windows, per endpoint, `profile_count` on its own XS
  bucket) and the source paces at the same scale; a second run, with nothing changed in the
  account, is timed.

Printed per row: wall time of the no-change ``pipeline.run`` (extract, normalize, load), of
its extract step, the requests each endpoint served, 429s, and the plan the run logged.
``--reconcile off`` times the floor: the incremental passes alone. The segment reports are off
unless ``--segment-reports``: at 2 requests a minute, one per 100 segments, they pace a run of
their own (the profile refresh's request stays in).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

import dlt  # noqa: E402

from klaviyo_source import klaviyo  # noqa: E402

SEED = 5
UNLIMITED_SCALE = 1000.0  # the source's pacing windows of 60 ms: never what it waits on


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the simulator, in its own process --------------------------------------------------------


def serve(conn: Connection, segments: int, largest: int, time_scale: float) -> None:
    """Child process: build the account, serve it, answer control commands until "stop"."""
    from scenarios import account_of_sizes, sizes_as_accounts_have_them

    from klaviyo_source.simulator import KlaviyoSimulator

    account = account_of_sizes(sizes_as_accounts_have_them(segments, largest), SEED)
    memberships = sum(len(members) for members in account.memberships().values())
    with KlaviyoSimulator(account, rate_limits=False, time_scale=time_scale) as sim:
        conn.send((sim.base_url, sim.api_key, memberships))
        while True:
            command, argument = conn.recv()
            if command == "stop":
                return
            if command == "limits":
                sim.reset_counters()
                sim.reset_rate_limits()
                sim.rate_limits_enabled = bool(argument)
                conn.send(None)
            elif command == "requests":
                conn.send(Counter(_endpoint(record) for record in sim.request_log))


def _endpoint(record: Any) -> str:
    if record.status == 429:
        return THROTTLED
    if record.operation == "get_segment" and "additional-fields[segment]" in record.query:
        return "profile_count"
    return str(record.operation)


class Simulator:
    def __init__(self, segments: int, largest: int, time_scale: float) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=serve, args=(child, segments, largest, time_scale), daemon=True
        )
        self._process.start()
        self.base_url, self.api_key, self.memberships = self._conn.recv()

    def call(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send(("stop", None))
        self._process.join(timeout=30)


# -- one measured row -------------------------------------------------------------------------


THROTTLED = "429 throttled"  # the key under which `NoChangeRun.requests` counts 429s


@dataclass(frozen=True)
class Options:
    """How a no-change run is set up and paced (the script's options; other benchmarks reuse
    `measure_no_change` with their own)."""

    largest: int = 20_000  # members of the largest segment; the n-th largest holds 1/n of it
    reconcile: str = "counts"
    include_profiles: bool = True
    segment_reports: bool = False
    reread_reports: bool = False  # the timed run reads the segments' last report days again
    time_scale: float = 1.0  # 1: Klaviyo's real 1 s and 60 s windows


@dataclass(frozen=True)
class NoChangeRun:
    """What one timed no-change run cost."""

    segments: int
    memberships: int
    wall_s: float  # the whole `pipeline.run`: extract, normalize, load
    extract_s: float
    requests: Counter[str]  # requests answered, by endpoint; 429s under `THROTTLED`
    plan: str  # the leave-check plan the run logged, "-" if it logged none

    @property
    def answered(self) -> int:
        return sum(self.requests.values())

    @property
    def throttled(self) -> int:
        return self.requests.get(THROTTLED, 0)

    def served_text(self) -> str:
        return ", ".join(f"{name} {count}" for name, count in sorted(self.requests.items()))

    def table_line(self) -> str:
        """The run as a row of this script's table."""
        return (
            f"| {self.segments} | {self.memberships:,} | {self.wall_s:.1f} s | "
            f"{self.extract_s:.1f} s | {self.served_text()} | {self.plan} |"
        )


class PlanLine(logging.Handler):
    """Keeps the leave-check plan the run logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("leave checks:"):
            self.lines.append(message)


@contextmanager
def logged_plan() -> Iterator[PlanLine]:
    """Collect the leave-check plans logged while the block runs."""
    plan = PlanLine()
    planner = logging.getLogger("klaviyo_source.segment_listing")
    planner.setLevel(logging.INFO)
    planner.addHandler(plan)
    try:
        yield plan
    finally:
        planner.removeHandler(plan)


def measure_no_change(segments: int, options: Options) -> NoChangeRun:
    """A first export with the limits off, then a timed run with nothing changed, paced."""
    log(f"{segments} segments: building the account")
    sim = Simulator(segments, options.largest, options.time_scale)
    try:
        with logged_plan() as plan, tempfile.TemporaryDirectory() as workdir:
            pipeline = dlt.pipeline(
                pipeline_name=f"leave_checks_{segments}",
                pipelines_dir=os.path.join(workdir, "pipelines"),
                destination=dlt.destinations.duckdb(os.path.join(workdir, "export.duckdb")),
                dataset_name="klaviyo",
            )

            def source(time_scale: float) -> Any:
                return klaviyo(
                    api_key=sim.api_key,
                    base_url=sim.base_url,
                    reconcile=options.reconcile,
                    include_profiles=options.include_profiles,
                    segment_reports=options.segment_reports,
                    # The timed run within the hour of the first: 0 times it as the run that
                    # reads the segments' last days again (at most two requests).
                    segment_reports_reread_minutes=0 if options.reread_reports else 60,
                    rate_limit_time_scale=time_scale,
                )

            log(f"{segments} segments, {sim.memberships:,} memberships: first export")
            pipeline.run(source(UNLIMITED_SCALE), loader_file_format="parquet")
            sim.call("limits", True)
            log(f"{segments} segments: no-change run at the real limits")
            started = time.monotonic()
            pipeline.run(source(options.time_scale), loader_file_format="parquet")
            wall = time.monotonic() - started
            extract = _step_seconds(pipeline, "extract")
            requests = sim.call("requests")
    finally:
        sim.stop()
    return NoChangeRun(
        segments,
        sim.memberships,
        wall,
        extract,
        requests,
        plan.lines[-1] if plan.lines else "-",
    )


def _step_seconds(pipeline: dlt.Pipeline, step: str) -> float:
    trace = pipeline.last_trace
    for traced in trace.steps if trace else []:
        if traced.step == step and traced.finished_at is not None:
            return (traced.finished_at - traced.started_at).total_seconds()
    return float("nan")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", default="20,100,500")
    parser.add_argument("--largest", type=int, default=Options.largest)
    parser.add_argument("--reconcile", default="counts", choices=("counts", "all", "off"))
    parser.add_argument("--membership-only", action="store_true")
    parser.add_argument(
        "--segment-reports",
        action="store_true",
        help="also read Klaviyo's segment reports",
    )
    parser.add_argument(
        "--reread-reports",
        action="store_true",
        help="with --segment-reports: the timed run reads the segments' last days again, as "
        "one run an hour does",
    )
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="1: Klaviyo's real 1 s and 60 s windows"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    options = Options(
        largest=args.largest,
        reconcile=args.reconcile,
        include_profiles=not args.membership_only,
        segment_reports=args.segment_reports,
        reread_reports=args.reread_reports,
        time_scale=args.time_scale,
    )
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    print(
        f"reconcile={options.reconcile}, largest segment {options.largest:,}, time scale "
        f"{options.time_scale:g}, profiles {'on' if options.include_profiles else 'off'}, "
        f"segment reports {'on' if options.segment_reports else 'off'}"
    )
    print("| segments | memberships | no-change run | extract | requests | plan |")
    print("|---|---|---|---|---|---|")
    for segments in (int(value) for value in args.segments.split(",")):
        print(measure_no_change(segments, options).table_line(), flush=True)


if __name__ == "__main__":
    main()
