"""What keeping profiles current costs: the profile refresh's requests and time per run.

Not a test. For each of 0, 1,000 and 100,000 profile edits since the last run: a fresh
account (by default 110,000 profiles, about 8,600 of them in 14 segments), a first export,
the edits spread over the whole account, and a second run with `reconcile="off"` (no
membership changed, so only the refresh can bring the edits). Printed per run: the
`GET /api/profiles` requests (and one page per 100 edited profiles, at least one), the profile
rows reloaded, the member rows that still differ from the simulator (must be 0), how long the
refresh's pages took against this simulator with limits off, and what its requests cost at
Klaviyo's L tier: the pacing floor (75/s, 750/min, nothing else waiting) and the time at
`--latency` seconds a page (the pages of one walk follow each other).

    .venv/bin/python tests/benchmarks/profile_refresh_cost.py [--profiles 110000] [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

import dlt  # noqa: E402
from expected import loaded_profiles, member_ids, query, true_profiles  # noqa: E402

from klaviyo_source import klaviyo, settings  # noqa: E402
from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account  # noqa: E402

EDITS = (0, 1_000, 100_000)


def paced_seconds(requests: int, burst: int = 75, steady: int = 750) -> float:
    """Real seconds `requests` take at Klaviyo's L tier when nothing else waits: bursts of
    `burst` a second until `steady` a minute are spent, then the next minute."""
    minutes, rest = divmod(requests, steady)
    if rest == 0 and minutes:
        minutes, rest = minutes - 1, steady
    return 60.0 * minutes + rest / burst


def edit(account: Account, rng: random.Random, count: int) -> None:
    for profile_id in rng.sample(sorted(account.profiles()), count):
        account.update_profile(profile_id, last_name=f"Edited {rng.randrange(10**6)}")


def stale_members(pipeline: dlt.Pipeline, account: Account) -> int:
    members = member_ids(account)
    loaded = loaded_profiles(pipeline)
    truth = true_profiles(account, members)
    return sum(1 for pid in members if loaded.get(pid) != truth[pid])


def reloaded(pipeline: dlt.Pipeline) -> int:
    (count,) = query(
        pipeline,
        "SELECT COUNT(*) FROM profiles WHERE _dlt_load_id = (SELECT MAX(load_id) FROM _dlt_loads)",
    )[0]
    return int(count)


def measure_one(profiles: int, memberships: int, edits: int) -> Dict[str, Any]:
    """A first export, `edits` profile edits, and the run after them."""
    account = generate_account(
        seed=3, segments=14, tags=5, profiles=profiles, memberships=memberships
    )
    with (
        tempfile.TemporaryDirectory() as workdir,
        KlaviyoSimulator(account, rate_limits=False) as simulator,
    ):
        pipeline = dlt.pipeline(
            pipeline_name="refresh_cost",
            pipelines_dir=f"{workdir}/pipelines",
            destination=dlt.destinations.duckdb(f"{workdir}/refresh_cost.duckdb"),
            dataset_name="klaviyo",
        )

        def run() -> None:
            source = klaviyo(
                api_key=simulator.api_key,
                base_url=simulator.base_url,
                reconcile="off",
                rate_limit_time_scale=1000.0,
            )
            pipeline.run(source)

        run()
        edit(account, random.Random(edits), edits)
        simulator.request_log.clear()
        run()
        served = [r for r in simulator.request_log if r.operation == "get_profiles"]
        return {
            "members": len(member_ids(account)),
            "requests": len(served),
            "pages": max(1, math.ceil(edits / settings.PROFILES_PAGE_SIZE)),
            "reloaded": reloaded(pipeline),
            "stale": stale_members(pipeline, account),
            "local": served[-1].timestamp - served[0].timestamp if len(served) > 1 else 0.0,
        }


def measure(profiles: int, memberships: int, latency: float, edits: Sequence[int]) -> None:
    print(
        "| edits since the last run | GET /api/profiles | edits/100, at least 1 "
        "| profile rows reloaded | stale member rows | pages' time here, limits off (s) "
        f"| L-tier floor (s) | at {latency:g} s a page (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for count in edits:
        row = measure_one(profiles, memberships, count)
        requests = row["requests"]
        print(
            f"| {count:,} | {requests:,} | {row['pages']:,} | {row['reloaded']:,} "
            f"| {row['stale']} | {row['local']:.1f} | {paced_seconds(requests):.1f} "
            f"| {max(requests * latency, paced_seconds(requests)):.0f} |",
            flush=True,
        )
    print(f"account: {profiles:,} profiles, {row['members']:,} of them in 14 segments")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=110_000)
    parser.add_argument("--memberships", type=int, default=9_000)
    parser.add_argument("--latency", type=float, default=0.3, help="seconds a page takes")
    parser.add_argument("--quick", action="store_true", help="5,000 profiles, 0 and 1,000 edits")
    args = parser.parse_args(argv)
    if args.quick:
        measure(5_000, 1_500, args.latency, EDITS[:2])
    else:
        measure(args.profiles, args.memberships, args.latency, EDITS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
