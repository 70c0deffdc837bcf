"""No-change run benchmark: a run with leave detection on, at Klaviyo's real rate limits.

Not a test. Run: ``.venv/bin/python tests/benchmarks/leave_checks_benchmark.py``
(``--segments 20,100,500`` by default; a few minutes in all). For each number of segments:

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
        return "429 throttled"
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


class PlanLine(logging.Handler):
    """Keeps the leave-check plan the run logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("leave checks:"):
            self.lines.append(message)


def measure(segments: int, args: argparse.Namespace) -> str:
    log(f"{segments} segments: building the account")
    sim = Simulator(segments, args.largest, args.time_scale)
    plan = PlanLine()
    planner = logging.getLogger("klaviyo_source.segment_listing")
    planner.setLevel(logging.INFO)
    planner.addHandler(plan)
    try:
        with tempfile.TemporaryDirectory() as workdir:
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
                    reconcile=args.reconcile,
                    include_profiles=not args.membership_only,
                    segment_reports=args.segment_reports,
                    # The timed run within the hour of the first: 0 times it as the run that
                    # reads the segments' last days again (at most two requests).
                    segment_reports_reread_minutes=0 if args.reread_reports else 60,
                    rate_limit_time_scale=time_scale,
                )

            log(f"{segments} segments, {sim.memberships:,} memberships: first export")
            pipeline.run(source(UNLIMITED_SCALE), loader_file_format="parquet")
            sim.call("limits", True)
            log(f"{segments} segments: no-change run at the real limits")
            started = time.monotonic()
            pipeline.run(source(args.time_scale), loader_file_format="parquet")
            wall = time.monotonic() - started
            extract = _step_seconds(pipeline, "extract")
            requests = sim.call("requests")
    finally:
        planner.removeHandler(plan)
        sim.stop()
    served = ", ".join(f"{name} {count}" for name, count in sorted(requests.items()))
    return (
        f"| {segments} | {sim.memberships:,} | {wall:.1f} s | {extract:.1f} s | {served} | "
        f"{plan.lines[-1] if plan.lines else '-'} |"
    )


def _step_seconds(pipeline: dlt.Pipeline, step: str) -> float:
    trace = pipeline.last_trace
    for traced in trace.steps if trace else []:
        if traced.step == step and traced.finished_at is not None:
            return (traced.finished_at - traced.started_at).total_seconds()
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", default="20,100,500")
    parser.add_argument("--largest", type=int, default=20_000)
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
    args = parser.parse_args()
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    print(
        f"reconcile={args.reconcile}, largest segment {args.largest:,}, time scale "
        f"{args.time_scale:g}, profiles {'off' if args.membership_only else 'on'}, segment "
        f"reports {'on' if args.segment_reports else 'off'}"
    )
    print("| segments | memberships | no-change run | extract | requests | plan |")
    print("|---|---|---|---|---|---|")
    for segments in (int(value) for value in args.segments.split(",")):
        print(measure(segments, args), flush=True)


if __name__ == "__main__":
    main()
