"""Concurrency soak: many runs of every kind of change with threads switched every microsecond.

Not a test; tests/test_concurrency.py runs a short version of it in the suite. Each round
changes the simulated account (leaves, joins, re-joins, now and then a deleted segment), runs
the pipeline with leave detection on, and compares the tables with the simulator's truth,
`first_seen_at` of every unchanged member included. Every combination of seed and extract
worker count gets a pipeline of its own.

    .venv/bin/python tests/benchmarks/concurrency_soak.py --rounds 20 --seeds 1,2 --workers 2,5,8

Exit status 1 if any round was not exact; each such round is named with the assertion that
failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

import dlt  # noqa: E402
from scenarios import assert_run_was_exact, change_account, first_seen_at  # noqa: E402

from klaviyo_source import klaviyo  # noqa: E402
from klaviyo_source.simulator import KlaviyoSimulator, generate_account  # noqa: E402

ACCOUNT = {"segments": 12, "tags": 6, "profiles": 3000, "memberships": 9000}


def soak(seed: int, workers: int, rounds: int, workdir: str) -> list[str]:
    """Run `rounds` changed runs for one seed and worker count; the rounds that were not exact."""
    os.environ["EXTRACT__WORKERS"] = str(workers)
    account = generate_account(seed=seed, **ACCOUNT)
    rng = random.Random(seed)
    failures = []
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        name = f"soak_{seed}_{workers}"
        pipeline = dlt.pipeline(
            pipeline_name=name,
            pipelines_dir=os.path.join(workdir, "pipelines"),
            destination=dlt.destinations.duckdb(os.path.join(workdir, f"{name}.duckdb")),
            dataset_name="klaviyo",
        )

        def source(reconcile: str) -> object:
            return klaviyo(
                api_key=simulator.api_key,
                base_url=simulator.base_url,
                reconcile=reconcile,
                rate_limit_time_scale=1000.0,
            )

        pipeline.run(source("counts"))
        for round_ in range(rounds):
            before = first_seen_at(pipeline)
            changes = change_account(account, rng, delete=round_ % 5 == 4)
            pipeline.run(source(rng.choice(["all", "counts"])))
            try:
                assert_run_was_exact(pipeline, account, before, changes)
            except AssertionError as error:
                failures.append(f"seed {seed}, {workers} workers, round {round_}: {error!r:.300}")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--workers", default="2,5,8")
    parser.add_argument("--switch-interval", type=float, default=1e-6)
    args = parser.parse_args(argv)
    sys.setswitchinterval(args.switch_interval)
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        os.environ["DLT_DATA_DIR"] = workdir
        for seed in (int(value) for value in args.seeds.split(",")):
            for workers in (int(value) for value in args.workers.split(",")):
                started = time.monotonic()
                failed = soak(seed, workers, args.rounds, workdir)
                failures += failed
                print(
                    f"seed {seed}, {workers} workers: {args.rounds - len(failed)} of "
                    f"{args.rounds} rounds exact ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
