"""Planning a run's leave checks: every settled segment is checked each run, walked where its
pages are done sooner than a count, counted where that pays; a run makes the planned requests."""

import dataclasses
import itertools
import math
import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Sequence

import pytest
from expected import table_snapshot
from scenarios import one_page_segment, settled_segments, sizes_as_accounts_have_them

from klaviyo_source import segment_listing
from klaviyo_source.leave_checks import (
    LeaveCheck,
    LeavePlan,
    LeavePolicy,
    Quota,
    SegmentToCheck,
    plan_leave_checks,
)
from klaviyo_source.profile_counts import COUNT_CLOCK_MARGIN, ProfileCount, count_differs
from klaviyo_source.simulator import Account, KlaviyoSimulator

NOW = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
# Klaviyo's published limits at the source's default revision (L steady 700/min).
REAL_LIMITS = LeavePolicy()
WALK_TABLES = ("segment_memberships", "segment_membership_periods", "profiles")


def _segment(segment_id: str, held: int, **overrides: Any) -> SegmentToCheck:
    fields: Dict[str, Any] = dict(
        segment_id=segment_id,
        held_count=held,
        walked_before=True,
        is_processing=False,
        read_whole_at=NOW - timedelta(hours=1),
    )
    fields.update(overrides)
    return SegmentToCheck(**fields)


def _many(sizes: Sequence[int]) -> List[SegmentToCheck]:
    return [_segment(f"s{index:03d}", size) for index, size in enumerate(sizes)]


# -- the time a quota takes -------------------------------------------------------------------


def test_a_quota_spends_one_steady_window_at_burst_pace_then_a_window_a_minute() -> None:
    xs = Quota.of_tier("XS", "2025-04-15", 1.0)
    assert [xs.seconds_for(n) for n in (0, 1, 15, 16, 30, 31)] == [0, 0, 14, 60, 74, 120]
    large = Quota.of_tier("L", "2025-04-15", 1.0)
    assert large.per_minute == 700 and Quota.of_tier("L", "2026-01-15", 1.0).per_minute == 750
    assert large.seconds_for(700) == pytest.approx(699 / 75)
    assert large.seconds_for(701) == 60
    # Half the account's quota: half of each window.
    assert Quota.of_tier("XS", "2025-04-15", 0.5).seconds_for(8) == 60
    assert [xs.requests_within(seconds) for seconds in (0, 14, 59.9, 60, 74)] == [1, 15, 15, 16, 30]
    # Member pages with predictive_analytics are held to the M tier too.
    policy = LeavePolicy.for_account("counts", None, "2025-04-15", 1.0, pass_tier="M")
    assert policy.pass_quota == Quota(10, 150) and policy.walk_quota == large


@pytest.mark.parametrize("share", [0.005, 0.3, 1.0])
def test_requests_paced_at_any_share_fit_the_time_they_take(share: float) -> None:
    """Turning a time back into requests loses none to rounding (0.3 s a request is 3 * 0.1)."""
    policy = LeavePolicy.for_account("counts", None, "2025-04-15", share)
    for quota in (policy.walk_quota, policy.pass_quota, policy.count_quota):
        assert [quota.requests_within(quota.seconds_for(n)) for n in range(1, 800)] == list(
            range(1, 800)
        )
    plan = plan_leave_checks(_many(sizes_as_accounts_have_them(40, largest=5_000)), policy, NOW)
    assert LeaveCheck.NONE not in plan.checks.values()


# -- which segments are checked, and how ------------------------------------------------------


def test_segments_whose_pass_reads_them_whole_or_that_are_not_checked() -> None:
    plan = plan_leave_checks(
        [
            _segment("first walk", 500, walked_before=False),
            _segment("processing", 500, is_processing=True),
            _segment("nothing held", 0),
            _segment("one page", 100),
            _segment("two pages", 101),
            _segment("due", 5_000, read_whole_at=NOW - timedelta(hours=24)),
            _segment("never read whole", 5_000, read_whole_at=None),
        ],
        REAL_LIMITS,
        NOW,
    )

    assert plan.checks == {
        "first walk": LeaveCheck.NONE,
        "processing": LeaveCheck.NONE,
        "nothing held": LeaveCheck.NONE,
        "one page": LeaveCheck.READ_WHOLE,
        "two pages": LeaveCheck.WALK_IDS,
        "due": LeaveCheck.READ_WHOLE,
        "never read whole": LeaveCheck.READ_WHOLE,
    }


@pytest.mark.parametrize(
    "reconcile, every, expected",
    [
        ("off", timedelta(hours=24), {"one page": "none", "large": "none", "due": "read whole"}),
        ("off", None, {"one page": "none", "large": "none", "due": "none"}),
        ("all", None, dict.fromkeys(("one page", "large", "due"), "read whole")),
    ],
)
def test_off_reads_only_the_segments_due_and_all_reads_every_segment_whole(
    reconcile: str, every: timedelta, expected: Dict[str, str]
) -> None:
    policy = dataclasses.replace(REAL_LIMITS, reconcile=reconcile, full_walk_every=every)
    segments = [
        _segment("one page", 40),
        _segment("large", 50_000),
        _segment("due", 50_000, read_whole_at=NOW - timedelta(days=2)),
    ]

    plan = plan_leave_checks(segments, policy, NOW)

    assert {sid: check.value for sid, check in plan.checks.items()} == expected
    assert plan.counted == () and plan.walked_pages == 0


def test_small_segments_are_walked_and_the_largest_counted_largest_first() -> None:
    segments = _many(sizes_as_accounts_have_them(100, largest=20_000))

    plan = plan_leave_checks(segments, REAL_LIMITS, NOW)

    size = {segment.segment_id: segment.held_count for segment in segments}
    walked = [sid for sid, check in plan.checks.items() if check is LeaveCheck.WALK_IDS]
    counted = [sid for sid, check in plan.checks.items() if check is LeaveCheck.COUNT]
    assert walked and counted
    assert max(size[sid] for sid in walked) <= min(size[sid] for sid in counted)
    assert list(plan.counted) == sorted(counted, key=lambda sid: -size[sid])
    assert plan.walked_pages == sum(math.ceil(size[sid] / 100) for sid in walked)


def test_a_few_small_segments_are_all_walked_though_counting_some_would_save_a_second() -> None:
    plan = plan_leave_checks(_many([150, 1_200, 3_000, 4_000]), REAL_LIMITS, NOW)

    assert set(plan.checks.values()) == {LeaveCheck.WALK_IDS}
    assert plan.walked_pages == 2 + 12 + 30 + 40


def _seconds_of_walks_and_counts(
    walked: Sequence[SegmentToCheck], counted: int, walk: Quota, count: Quota
) -> float:
    pages = sum(math.ceil(segment.held_count / 100) for segment in walked)
    return max(walk.seconds_for(pages), count.seconds_for(counted))


def _every_choice_of_walks(segments: Sequence[SegmentToCheck]) -> List[List[SegmentToCheck]]:
    return [
        list(walked)
        for k in range(len(segments) + 1)
        for walked in itertools.combinations(segments, k)
    ]


def _random_segments(rng: random.Random) -> List[SegmentToCheck]:
    return _many([rng.randint(101, 2_500) for _ in range(rng.randint(1, 8))])


@pytest.mark.parametrize("seed", range(8))
def test_with_walks_and_counts_alone_the_plan_ends_soonest_and_within_that_time_walks_most(
    seed: int,
) -> None:
    """Against every choice of segments to walk (the passes' quota has no room for whole
    reads): none ends sooner, and none ending as soon, or within the walks' first steady
    window, walks more segments."""
    segments = _random_segments(random.Random(seed))
    walk, count = Quota(per_second=20, per_minute=120), Quota(per_second=1, per_minute=10)
    no_room = Quota(per_second=1_000, per_minute=len(segments))
    policy = dataclasses.replace(
        REAL_LIMITS, walk_quota=walk, count_quota=count, pass_quota=no_room
    )

    plan = plan_leave_checks(segments, policy, NOW)

    choices = _every_choice_of_walks(segments)
    soonest = min(
        _seconds_of_walks_and_counts(w, len(segments) - len(w), walk, count) for w in choices
    )
    allowed = max(soonest, walk.window_seconds)
    most = max(
        len(w)
        for w in choices
        if _seconds_of_walks_and_counts(w, len(segments) - len(w), walk, count) <= allowed
    )
    checks = Counter(plan.checks.values())
    assert checks[LeaveCheck.READ_WHOLE] == 0
    assert checks[LeaveCheck.WALK_IDS] == most
    assert plan.seconds <= allowed + 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_reading_segments_whole_on_what_the_passes_leave_never_makes_the_plan_slower(
    seed: int,
) -> None:
    rng = random.Random(seed)
    segments = _random_segments(rng)
    walk, count = Quota(per_second=10, per_minute=20), Quota(per_second=1, per_minute=3)
    passes = Quota(per_second=rng.choice([5, 10, 20]), per_minute=rng.choice([10, 20, 40]))
    policy = dataclasses.replace(REAL_LIMITS, walk_quota=walk, count_quota=count, pass_quota=passes)

    plan = plan_leave_checks(segments, policy, NOW)

    without_reads = min(
        max(
            _seconds_of_walks_and_counts(w, len(segments) - len(w), walk, count),
            passes.seconds_for(len(segments)),
        )
        for w in _every_choice_of_walks(segments)
    )
    assert plan.seconds <= max(without_reads, walk.window_seconds) + 1e-9


def test_segments_the_walks_cannot_take_in_time_are_read_whole_on_what_the_passes_leave() -> None:
    """100 segments of 1,000 members: their ids (1,000 pages) would take 60 s at 700 pages a
    minute and 15 counts 14 s; whole reads of the rest on the passes' quota take none."""
    plan = plan_leave_checks(_many([1_000] * 100), REAL_LIMITS, NOW)

    checks = Counter(plan.checks.values())
    assert checks[LeaveCheck.READ_WHOLE] > 0 and checks[LeaveCheck.WALK_IDS] > 0
    assert plan.walked_pages <= 700 and plan.pass_pages <= 700
    assert len(plan.counted) <= 15
    assert plan.seconds < 15


@pytest.mark.parametrize(
    "sizes, target_seconds",
    [
        (sizes_as_accounts_have_them(20, largest=20_000), 30),
        (sizes_as_accounts_have_them(100, largest=20_000), 30),
        ([1_000] * 100, 30),
        (sizes_as_accounts_have_them(500, largest=20_000), 120),
        ([500] * 500, 120),
    ],
    ids=["20 long tail", "100 long tail", "100 of 1,000", "500 long tail", "500 of 500"],
)
def test_every_segment_of_a_large_account_is_checked_within_the_targets_at_real_limits(
    sizes: List[int], target_seconds: float
) -> None:
    """The plan's own estimate at Klaviyo's limits; tests/benchmarks/leave_checks_benchmark.py
    times such runs against the simulator."""
    plan = plan_leave_checks(_many(sizes), REAL_LIMITS, NOW)

    assert LeaveCheck.NONE not in plan.checks.values()
    assert len(plan.checks) == len(sizes)
    assert plan.seconds <= target_seconds


# -- what a count says --------------------------------------------------------------------------


def test_a_count_is_compared_with_the_members_held_and_the_joins_it_can_have_seen() -> None:
    answered = NOW
    count = ProfileCount(value=10, answered_at=answered)
    before, after = answered - timedelta(minutes=5), answered + COUNT_CLOCK_MARGIN * 2

    assert not count_differs(count, held_count=10, join_times=[])
    assert count_differs(count, held_count=11, join_times=[])  # a leave
    # A join dated after the count was answered is not in it: no walk for it.
    assert not count_differs(count, held_count=10, join_times=[after])
    # One dated before it is: then the count says one member is missing.
    assert count_differs(count, held_count=10, join_times=[before])
    assert not count_differs(count, held_count=9, join_times=[before, after])
    assert not count_differs(ProfileCount(None, answered), held_count=3, join_times=[])


# -- a run makes the planned requests -----------------------------------------------------------


def _plans_made(monkeypatch: pytest.MonkeyPatch) -> List[LeavePlan]:
    """Record each plan a run makes."""
    made: List[LeavePlan] = []

    def recorded(*args: Any, **kwargs: Any) -> LeavePlan:
        made.append(plan_leave_checks(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(segment_listing, "plan_leave_checks", recorded)
    return made


def _by_segment(log: Sequence[Any], operation: str, **has: str) -> Counter:
    return Counter(
        record.path.split("/")[3]
        for record in log
        if record.operation == operation
        and all(name in record.query for name in has.get("query", "").split() if name)
        and not any(name in record.query for name in has.get("not_query", "").split())
    )


def test_a_no_change_run_makes_the_planned_requests_on_each_endpoint(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    counting_pays: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one_page = one_page_segment(account)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    before = {table: table_snapshot(pipeline, table) for table in WALK_TABLES}
    plans = _plans_made(monkeypatch)

    simulator.reset_counters()
    pipeline.run(source_for())

    (plan,) = plans
    checked = {kind: {s for s, c in plan.checks.items() if c is kind} for kind in LeaveCheck}
    settled = settled_segments(account)
    # Listed, the two largest (20 pages) would take a minute at 10 pages a minute; counted,
    # two seconds. The one-page segment is read whole by its pass.
    assert checked[LeaveCheck.COUNT] == set(settled[:2])
    assert checked[LeaveCheck.WALK_IDS] == set(settled[2:]) - {one_page}
    assert checked[LeaveCheck.READ_WHOLE] == {one_page}
    pages = {sid: max(1, math.ceil(len(account.members(sid)) / 100)) for sid in account.segments()}
    # An empty segment has no cursor: its pass reads it from the start, one page.
    whole = checked[LeaveCheck.READ_WHOLE] | {s for s in pages if not account.members(s)}
    log = simulator.request_log
    assert _by_segment(log, "get_segment_profiles", not_query="filter") == {
        sid: pages[sid] for sid in whole
    }
    assert _by_segment(log, "get_segment_profiles", query="filter") == dict.fromkeys(
        set(account.segments()) - whole, 1
    )
    assert simulator.counters["get_segment_profiles"] == plan.pass_pages
    assert _by_segment(log, "get_segment_relationships_profiles") == {
        sid: pages[sid] for sid in checked[LeaveCheck.WALK_IDS]
    }
    assert simulator.counters["get_segment_relationships_profiles"] == plan.walked_pages
    counts = _by_segment(log, "get_segment", query="additional-fields[segment]")
    assert counts == dict.fromkeys(checked[LeaveCheck.COUNT], 1) == dict.fromkeys(plan.counted, 1)
    assert {table: table_snapshot(pipeline, table) for table in WALK_TABLES} == before
