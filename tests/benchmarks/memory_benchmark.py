"""Memory benchmark: the export's peak RSS as the account grows, and what the
run's per-profile and per-member structures cost on their own.

Not a test. Run: ``.venv/bin/python tests/benchmarks/memory_benchmark.py [--long]``
(1M and 3M memberships, about 10 minutes; ``--long`` adds 10M, about half an hour more).
``--structures`` measures only the structures, in this process, at ``--profiles`` profiles
(2.5M by default, about 7 minutes). Printed: the machine and the code measured, then a line per
export (peak RSS and the step it fell in, RSS by step, time, CPU, rows loaded against the
account) and whether every run kept within the target. ``export_benchmark.py`` prints the
peak RSS of these exports (1M; 10M with its ``--long``) in its table through `measure_size`;
this script adds 3M, ``--realistic``, ``--reconcile`` and ``--structures``.

How it measures:

- Accounts have 4 memberships a profile (1M memberships: 250k profiles; 10M: 2.5M) over ten
  non-empty segments of twelve. They are "lean": every profile has a few attributes and shares
  its nested ones (subscriptions, predictive analytics), so that 2.5M profiles fit in the
  simulator's process. The per-profile cost of a run does not depend on a profile's size;
  ``--realistic`` uses the project's generator instead (``generate_account``, full profiles),
  whose account at 1M needs about 2 GB in the simulator and 10M would need about 20 GB.
- The simulator runs in its own process. Its cache of rendered rows is turned off there (it
  would hold every membership's row, gigabytes at 10M); each profile is still rendered once.
  Its memory is not the export's.
- Every export runs in a fresh process (``export_benchmark.export_in_fresh_process``) into a
  DuckDB file, limits off, as ``klaviyo-export`` runs it (``KlaviyoExport.run``: its settings,
  memory handling, views and summary); its peak RSS is ``ru_maxrss``,
  and a sampling thread tells in which step (extract, normalize, load) the peak fell. The rows
  loaded are counted against the account: a run that loaded less is reported as failed.
- ``--reconcile`` adds, after each first export, a second one with ``reconcile="all"``: every
  segment walked in full against what is held (``HeldData.joined_times``).
- ``--structures``: ``MembersThisRun`` fed as a run feeds it (pages of 100 members, 4 segments
  a profile) and ``HeldData.joined_times`` of a segment of 1M held members read from a real
  DuckDB file; for each, the growth of this process's RSS (glibc trimmed before and after),
  what ``tracemalloc`` saw, and the time a membership took.

The machine has two cores and is shared: run one benchmark at a time, and read times as rough.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import export_benchmark as bench  # noqa: E402  (the benchmark beside this one)

SEED = 23
SEGMENTS = 12
NON_EMPTY_SEGMENTS = 10
MEMBERSHIPS_PER_PROFILE = 4
PAGE = 100  # members a page of GET /api/segments/{id}/profiles
DEFAULT_SIZES = (1_000_000, 3_000_000)
LONG_SIZE = 10_000_000
TARGET_MB = 300.0


# -- the account, built and served in the simulator's process ----------------------------------


def ulid(rng: random.Random, when: datetime) -> str:
    """A profile id as Klaviyo makes them (48 bits of milliseconds, 80 random bits)."""
    from klaviyo_source.simulator.account import make_ulid

    return make_ulid(when, rng)


def lean_account(memberships: int) -> Any:
    """Profiles with few attributes of their own, each in 4 of 10 segments."""
    from klaviyo_source.simulator import Account
    from klaviyo_source.simulator.account import (
        default_predictive_analytics,
        default_subscriptions,
    )

    rng = random.Random(SEED)
    now = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    account = Account(seed=SEED)
    segment_ids = [
        account.create_segment(f"Segment {k}", created=now - timedelta(days=900))
        for k in range(SEGMENTS)
    ]
    # Shared, never changed: the simulator stores nested attributes as given.
    subscriptions = default_subscriptions()
    predictive = default_predictive_analytics()
    properties = {"plan": "basic", "source": "import"}
    # Join times from a pool of shared objects (ties included, as Klaviyo's bulk imports make).
    times = [now - timedelta(seconds=rng.randrange(2 * 365 * 86400)) for _ in range(50_000)]
    profiles = memberships // MEMBERSHIPS_PER_PROFILE
    for i in range(profiles):
        created = now - timedelta(days=800, seconds=i)
        pid = account.insert_profile(
            {
                "id": ulid(rng, created),
                "email": f"member.{i}@example.com",
                "first_name": "Ada",
                "created": created,
                "updated": created,
                "properties": properties,
                "subscriptions": subscriptions,
                "predictive_analytics": predictive,
            },
            take_ownership=True,
        )
        for segment_id in rng.sample(segment_ids[:NON_EMPTY_SEGMENTS], MEMBERSHIPS_PER_PROFILE):
            account.join(segment_id, pid, at=rng.choice(times))
    return account


def realistic_account(memberships: int) -> Any:
    from klaviyo_source.simulator import generate_account

    return generate_account(
        seed=SEED,
        segments=SEGMENTS,
        tags=8,
        profiles=memberships // MEMBERSHIPS_PER_PROFILE,
        memberships=memberships,
    )


def without_row_caches(simulator: Any, profiles: int) -> None:
    """Keep each profile rendered once, but no rendered row of a membership: those would hold
    the whole account (about 6 GB at 10M memberships)."""

    class NoRows(dict):  # type: ignore[type-arg]
        """A view's rendered rows, never kept."""

        def get(self, key: Any, default: Any = None) -> Any:
            return Forgotten()

    class Forgotten:
        def __getitem__(self, index: int) -> None:
            return None

        def __setitem__(self, index: int, row: bytes) -> None:
            pass

    api = simulator.api
    api.profiles.MAX_ENTRIES = max(api.profiles.MAX_ENTRIES, profiles + 1)
    build_view: Callable[..., Any] = api._member_view

    def member_view(*args: Any) -> Any:
        view = build_view(*args)
        view.rows = NoRows()
        return view

    api._member_view = member_view


def serve(conn: Connection, memberships: int, realistic: bool) -> None:
    """Child process: build the account, serve it without limits until told to stop."""
    from klaviyo_source.simulator import KlaviyoSimulator

    started = time.perf_counter()
    account = (realistic_account if realistic else lean_account)(memberships)
    built = time.perf_counter() - started
    sizes = {segment_id: account.profile_count(segment_id) for segment_id in account.segments()}
    profiles = len(account.peek_profiles())
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        without_row_caches(simulator, profiles)
        info = bench.AccountInfo(simulator.base_url, simulator.api_key, sizes)
        conn.send((info, profiles, built))
        while conn.recv() != "stop":
            pass


@contextmanager
def served_account(memberships: int, realistic: bool) -> Iterator[tuple[Any, int]]:
    """(AccountInfo, profiles) of an account served from a child process while the block runs."""
    context = mp.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=serve, args=(child, memberships, realistic), daemon=True)
    process.start()
    info, profiles, built = conn.recv()
    bench.log(
        f"account of {info.memberships:,} memberships and {profiles:,} profiles built in "
        f"{built:.0f} s; simulator RSS {bench.rss_of(process.pid or 0):,.0f} MB"
    )
    try:
        yield info, profiles
    finally:
        conn.send("stop")
        process.join(timeout=60)


# -- exports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    label: str
    memberships: int
    profiles: int
    result: bench.ExportResult
    complete: bool

    def line(self) -> str:
        r = self.result
        if r.error:
            return f"{self.label}: FAILED {r.error.strip().splitlines()[-1]}"
        steps = ", ".join(f"{name} {r.rss_by_step.get(name, 0):,.0f}" for name in _STEPS)
        peak_step = max(_STEPS, key=lambda name: r.rss_by_step.get(name, 0))
        steps += "".join(
            f"; {name} {r.rss_by_step[name]:,.0f}"
            for name in (AT_NORMALIZE, AFTER_RUN)
            if name in r.rss_by_step
        )
        times = ", ".join(f"{name} {r.steps.get(name, 0):.0f} s" for name in _STEPS)
        done = "complete" if self.complete else "INCOMPLETE"
        return (
            f"{self.label}: peak RSS {r.peak_rss_mb:,.0f} MB (in {peak_step}; by step: {steps}) "
            f"| {r.wall_s:.0f} s ({times}), CPU {r.cpu_s:.0f} s | {r.memberships:,} memberships, "
            f"{r.profiles:,} profiles loaded: {done}"
        )


_STEPS = ("extract", "normalize", "load")
AT_NORMALIZE = "as normalize began"
AFTER_RUN = "after the export"


def run_klaviyo_export(job: bench.ExportJob) -> bench.ExportResult:
    """The export as the command runs it (in the child process), measured."""
    from klaviyo_source.export import KlaviyoExport

    code = bench.source_hash()
    pipeline = bench.make_pipeline(job)
    source = bench.make_source(job)
    with bench.RssTimeline() as rss:
        started_at = time.time()
        cpu_started, started = time.process_time(), time.perf_counter()
        report = KlaviyoExport(pipeline, loader_file_format=job.loader_file_format).run(source)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    spans = bench._step_spans(pipeline)
    rss_by_step = {name: rss.peak_between(*span) for name, span in spans.items()}
    # What the extract left held, as normalize starts: the run's record is gone by then.
    normalize_start = spans.get("normalize", (0.0, 0.0))[0]
    rss_by_step[AT_NORMALIZE] = next(
        (mb for stamp, mb in rss.samples if stamp >= normalize_start), 0.0
    )
    rss_by_step[AFTER_RUN] = rss.samples[-1][1] if rss.samples else 0.0
    return bench.ExportResult(
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        steps={name: end - start for name, (start, end) in spans.items()},
        memberships=bench._count_rows(pipeline, "segment_memberships"),
        profiles=bench._count_rows(pipeline, "profiles"),
        rss_by_step=rss_by_step,
        formats=bench.loaded_formats(report.load_info),
        code=code,
        started_at=started_at,
    )


def klaviyo_export_child(conn: Connection, job: bench.ExportJob) -> None:
    """Child process entry: run the export, send back its result or its traceback."""
    try:
        conn.send(run_klaviyo_export(job))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(bench.ExportResult(0, 0, 0, {}, 0, 0, error=traceback.format_exc()))


def export_once(
    info: Any, profiles: int, workdir: Path, label: str, reconcile: str, rss_limit_mb: float
) -> Measured:
    job = bench.ExportJob(
        info.base_url,
        info.api_key,
        str(workdir),
        reconcile=reconcile,
        rss_limit_mb=rss_limit_mb,
    )
    started = time.perf_counter()
    try:
        result = bench.export_in_fresh_process(job, klaviyo_export_child)
    except RuntimeError as error:
        result = bench.ExportResult(time.perf_counter() - started, 0, 0, {}, 0, 0, error=str(error))
    complete = result.memberships == info.memberships and result.profiles == profiles
    measured = Measured(label, info.memberships, profiles, result, complete)
    bench.log(measured.line())
    return measured


def measure_size(
    memberships: int,
    root: Path,
    *,
    realistic: bool = False,
    reconcile: bool = False,
    rss_limit_mb: float = 3072.0,
) -> list[Measured]:
    """A first export of an account of `memberships` (lean unless `realistic`) into a DuckDB
    file under `root`, and with `reconcile` a `reconcile="all"` run over it."""
    with served_account(memberships, realistic) as (info, profiles):
        workdir = root / f"export-{memberships}"
        workdir.mkdir()
        size = f"{memberships / 1e6:g}M memberships, {profiles / 1e3:,.0f}k profiles"
        runs = [export_once(info, profiles, workdir, f"{size}, first export", "off", rss_limit_mb)]
        if reconcile and not runs[0].result.error:
            label = f"{size}, reconcile=all"
            runs.append(export_once(info, profiles, workdir, label, "all", rss_limit_mb))
    return runs


# -- the structures alone ---------------------------------------------------------------------


def trim() -> None:
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class Footprint:
    rss_mb: float
    traced_mb: float
    traced_peak_mb: float
    seconds: float


def footprint(build: Callable[[], Any], traced: bool) -> tuple[Footprint, Any]:
    """What `build()`'s result holds: RSS growth (trimmed), and tracemalloc's view if traced."""
    trim()
    before = bench.current_rss_mb()
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    kept = build()
    seconds = time.perf_counter() - started
    traced_now = traced_peak = 0
    if traced:
        traced_now, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    trim()
    grown = bench.current_rss_mb() - before
    return Footprint(grown, traced_now / bench.MB, traced_peak / bench.MB, seconds), kept


def profile_ids(count: int) -> list[str]:
    rng = random.Random(SEED)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [ulid(rng, start + timedelta(milliseconds=i)) for i in range(count)]


def feed_members(ids: Sequence[str]) -> Any:
    """A MembersThisRun fed as a run feeds it: each segment's pages of 100, 4 segments a
    profile, and the profile refresh claiming a page now and then."""
    from klaviyo_source.members_this_run import MembersThisRun

    rng = random.Random(SEED)
    segments: list[list[str]] = [[] for _ in range(NON_EMPTY_SEGMENTS)]
    for pid in ids:
        for k in rng.sample(range(NON_EMPTY_SEGMENTS), MEMBERSHIPS_PER_PROFILE):
            segments[k].append(pid)
    members = MembersThisRun()
    for k, listed in enumerate(segments):
        for start in range(0, len(listed), PAGE):
            # Each page's ids are strings of their own, as a decoded page's are.
            page = [pid[:1] + pid[1:] for pid in listed[start : start + PAGE]]
            members.sight(f"segment{k}", page)
            if start % (PAGE * 1000) == 0:
                members.claim_profiles(page)
    del segments
    return members


def held_segment(root: Path, ids: Sequence[str]) -> Any:
    """A DuckDB file holding one segment's current members, as a first export loads them."""
    import dlt
    import pyarrow as pa

    joined = datetime(2024, 6, 1, tzinfo=timezone.utc)
    table = pa.table(
        {
            "membership_id": [f"S1:{pid}" for pid in ids],
            "segment_id": ["S1"] * len(ids),
            "profile_id": list(ids),
            "joined_group_at": pa.array(
                [joined + timedelta(seconds=i % 86_400) for i in range(len(ids))],
                pa.timestamp("us", tz="UTC"),
            ),
            "is_member": [True] * len(ids),
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="memory_benchmark_held",
        pipelines_dir=str(root / "pipelines"),
        destination=dlt.destinations.duckdb(str(root / "held.duckdb")),
        dataset_name="klaviyo",
    )
    pipeline.run(table, table_name="segment_memberships")
    return pipeline


def startup_rss() -> float:
    """RSS of a process that has imported what an export imports, before it runs."""
    import dlt

    from klaviyo_source import klaviyo
    from klaviyo_source.export import KlaviyoExport  # noqa: F401  (what the script imports)

    with tempfile.TemporaryDirectory() as name:
        pipeline = dlt.pipeline(
            pipeline_name="memory_benchmark_startup",
            pipelines_dir=name,
            destination=dlt.destinations.duckdb(str(Path(name) / "startup.duckdb")),
            dataset_name="klaviyo",
        )
        source = klaviyo(api_key="pk_startup", base_url="http://127.0.0.1:9")
        assert pipeline is not None and source is not None
        return bench.current_rss_mb()


def measure_structures(args: argparse.Namespace, root: Path) -> list[str]:
    from klaviyo_source.held import HeldData

    with mp.get_context("spawn").Pool(1) as pool:
        started_at = pool.apply(startup_rss)
    lines = [
        f"a fresh process with an export's imports, pipeline and source: RSS {started_at:.0f} MB"
    ]
    ids = profile_ids(args.profiles)
    memberships = len(ids) * MEMBERSHIPS_PER_PROFILE
    for traced in (False, True):
        found, members = footprint(lambda: feed_members(ids), traced)
        del members
        if traced:
            lines.append(
                f"MembersThisRun, {len(ids):,} profiles: tracemalloc {found.traced_mb:,.1f} MB "
                f"kept (peak {found.traced_peak_mb:,.1f})"
            )
        else:
            lines.append(
                f"MembersThisRun, {len(ids):,} profiles in {memberships:,} listings: RSS "
                f"+{found.rss_mb:,.1f} MB ({found.rss_mb * bench.MB / len(ids):,.0f} B a profile),"
                f" {found.seconds:.1f} s to feed ({found.seconds / memberships * 1e6:.2f} µs a "
                "listing, page shuffling included)"
            )
    members_in_segment = min(len(ids), args.segment_members)
    pipeline = held_segment(root, ids[:members_in_segment])
    held = HeldData(pipeline.sql_client(), appends_versions=False)
    for traced in (False, True):
        found, joined = footprint(lambda: held.joined_times("S1"), traced)
        popped = time.perf_counter()
        probe = ids[: members_in_segment // 2]
        hits = sum(1 for pid in probe if pid in joined and joined.pop(pid) is not None)
        popped = time.perf_counter() - popped
        assert hits == len(probe) and len(joined) == members_in_segment - len(probe)
        del joined
        if traced:
            lines.append(
                f"joined_times, {members_in_segment:,} members: tracemalloc "
                f"{found.traced_mb:,.1f} MB kept (peak {found.traced_peak_mb:,.1f})"
            )
        else:
            lines.append(
                f"joined_times, {members_in_segment:,} members: RSS +{found.rss_mb:,.1f} MB "
                f"({found.rss_mb * bench.MB / members_in_segment:,.0f} B a member), read in "
                f"{found.seconds:.1f} s; `in` + `pop` {popped / len(probe) * 1e6:.2f} µs a member"
            )
    return lines


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="add the 10M-membership export")
    parser.add_argument(
        "--sizes", default=None, help="memberships to export, comma-separated (1000000,3000000)"
    )
    parser.add_argument("--realistic", action="store_true", help="full profiles (generator)")
    parser.add_argument("--reconcile", action="store_true", help="add a reconcile=all export")
    parser.add_argument("--structures", action="store_true", help="the structures alone")
    parser.add_argument("--profiles", type=int, default=2_500_000, help="for --structures")
    parser.add_argument("--segment-members", type=int, default=1_000_000, help="for --structures")
    parser.add_argument(
        "--limit", type=float, default=3072.0, help="kill an export above this RSS (MB)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the exports, e.g. DATA_WRITER__FILE_MAX_ITEMS=100000 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench.child_environment()
    for setting in args.env:
        name, _, value = setting.partition("=")
        os.environ[name] = value
    facts = [*bench.machine_facts(), f"code at start: {bench.source_fingerprint()}"]
    facts += [f"setting: {setting}" for setting in args.env]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="klaviyo-memory-benchmark-") as name:
        root = Path(name)
        if args.structures:
            lines = measure_structures(args, root)
        else:
            sizes = (
                tuple(int(size) for size in args.sizes.split(","))
                if args.sizes
                else DEFAULT_SIZES + ((LONG_SIZE,) if args.long else ())
            )
            runs = [
                run
                for size in sizes
                for run in measure_size(
                    size,
                    root,
                    realistic=args.realistic,
                    reconcile=args.reconcile,
                    rss_limit_mb=args.limit,
                )
            ]
            lines = [run.line() for run in runs]
            over = [run for run in runs if run.result.peak_rss_mb > TARGET_MB]
            lines.append(
                f"target: at most {TARGET_MB:.0f} MB; "
                + (f"{len(over)} of {len(runs)} over" if over else "every run within")
            )
    facts.append(f"code at end:   {bench.source_fingerprint()}")
    print("\n".join(facts))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, took {(time.perf_counter() - started) / 60:.1f} min")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
