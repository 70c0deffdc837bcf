"""Profiles leaving segments: found by the next run however the segment is checked, dated within
bounds, kept as history."""

import math
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, Dict, List, Tuple

import dlt
import pytest
from expected import loaded_memberships, query, true_memberships, utc
from scenarios import one_page_segment, settled_segments

from klaviyo_source import held, memberships, settings
from klaviyo_source.simulator import Account, KlaviyoSimulator

Leaves = Dict[Tuple[str, str], datetime]


def _leave(account: Account, segment_id: str, profile_id: str, leaves: Leaves) -> None:
    account.leave(segment_id, profile_id)
    leaves[(segment_id, profile_id)] = datetime.now(timezone.utc)


def _assert_leaves_within_bounds(pipeline: dlt.Pipeline, leaves: Leaves) -> None:
    """Every true leave is recorded as ended, between last seen and found gone."""
    rows = query(
        pipeline,
        "SELECT segment_id, profile_id, is_member, left_at_earliest, left_at_latest, left_reason "
        "FROM segment_memberships",
    )
    recorded = {(r[0], r[1]): r[2:] for r in rows}
    for key, left_at in leaves.items():
        is_member, earliest, latest, reason = recorded[key]
        if is_member:
            continue  # re-joined since: its earlier period is checked in the history table
        assert reason == "left", key
        assert utc(earliest) <= left_at <= utc(latest), key


def _walked_in_full(simulator: KlaviyoSimulator, among: List[str]) -> set:
    """Segments of `among` whose members were listed without a filter this run."""
    return {
        record.path.split("/")[3]
        for record in simulator.request_log
        if record.operation == "get_segment_profiles" and "filter" not in record.query
    } & set(among)


def test_a_leave_is_found_and_dated_within_its_bounds(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = settled_segments(account)[0]
    leaver = next(iter(account.members(segment_id)))
    leaves: Leaves = {}
    _leave(account, segment_id, leaver, leaves)

    pipeline.run(source_for())

    assert loaded_memberships(pipeline) == true_memberships(account)
    _assert_leaves_within_bounds(pipeline, leaves)
    periods = query(
        pipeline,
        "SELECT left_at_latest FROM segment_membership_periods "
        f"WHERE segment_id = '{segment_id}' AND profile_id = '{leaver}'",
    )
    assert len(periods) == 1 and periods[0][0] is not None


def _requests_of(simulator: KlaviyoSimulator, operation: str, segment_id: str) -> list:
    return [
        record
        for record in simulator.request_log
        if record.operation == operation and record.path.split("/")[3] == segment_id
    ]


def _outsiders(account: Account, segment_id: str, count: int) -> List[str]:
    members = account.members(segment_id)
    return [pid for pid in sorted(account.profiles()) if pid not in members][:count]


def test_leaves_in_small_and_large_segments_are_all_found_by_the_next_run(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    counting_pays: None,
) -> None:
    """A one-page segment is read whole by its pass, small segments have their ids walked, the
    two largest are counted (their counts differ, so their ids are walked too)."""
    one_page = one_page_segment(account)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    settled = settled_segments(account)
    leaves: Leaves = {}
    for segment_id in settled:
        for profile_id in sorted(account.members(segment_id))[:2]:
            _leave(account, segment_id, profile_id, leaves)

    simulator.reset_counters()
    pipeline.run(source_for())

    assert loaded_memberships(pipeline) == true_memberships(account)
    _assert_leaves_within_bounds(pipeline, leaves)
    assert {key for key, row in _ended(pipeline).items() if row == "left"} == set(leaves)
    (pass_of_one_page,) = _requests_of(simulator, "get_segment_profiles", one_page)
    assert "filter" not in pass_of_one_page.query
    assert _requests_of(simulator, "get_segment_relationships_profiles", one_page) == []
    for large in settled[:2]:
        assert len(_requests_of(simulator, "get_segment", large)) == 1  # its count
    for segment_id in set(settled) - {one_page}:
        pages = _requests_of(simulator, "get_segment_relationships_profiles", segment_id)
        assert len(pages) == math.ceil(len(account.members(segment_id)) / 100)


def _ended(pipeline: dlt.Pipeline) -> Dict[Tuple[str, str], str]:
    rows = query(
        pipeline,
        "SELECT segment_id, profile_id, left_reason FROM segment_memberships WHERE NOT is_member",
    )
    return {(segment_id, profile_id): reason for segment_id, profile_id, reason in rows}


@pytest.mark.parametrize("revision", ["2025-10-15", settings.DEFAULT_REVISION])
def test_an_id_walk_finds_joins_behind_the_lookback_with_their_join_time(
    revision: str,
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    """From revision 2025-10-15 their rows are fetched by profile_id; before it, the segment is
    read whole, which also finds them."""
    pipeline = make_pipeline()
    pipeline.run(source_for(revision=revision))
    segment_id = settled_segments(account)[1]  # the largest holds every profile already
    cursor = max(account.members(segment_id).values())
    behind = cursor - settings.DEFAULT_LOOKBACK - timedelta(hours=2)
    late = _outsiders(account, segment_id, 3)
    assert len(late) == 3
    for profile_id in late:
        account.join(segment_id, profile_id, at=behind)
    leaver = sorted(account.members(segment_id))[-1]
    leaves: Leaves = {}
    _leave(account, segment_id, leaver, leaves)

    simulator.reset_counters()
    pipeline.run(source_for(revision=revision))

    assert loaded_memberships(pipeline) == true_memberships(account)
    assert {pid: loaded_memberships(pipeline)[segment_id][pid] for pid in late} == dict.fromkeys(
        late, behind
    )
    _assert_leaves_within_bounds(pipeline, leaves)
    passes = _requests_of(simulator, "get_segment_profiles", segment_id)
    by_id = [r for r in passes if "any(profile_id" in r.query.get("filter", "")]
    read_whole = [r for r in passes if "filter" not in r.query]
    if revision >= settings.PROFILE_ID_FILTER_SINCE:
        assert len(by_id) == 1 and all(pid in by_id[0].query["filter"] for pid in late)
        assert read_whole == []
    else:
        assert by_id == []
        assert len(read_whole) == math.ceil(len(account.members(segment_id)) / 100)


def test_a_leave_a_late_join_hides_from_the_count_is_found_by_the_scheduled_full_walk(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    counting_pays: None,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    counted = settled_segments(account)[1]  # the largest holds every profile already
    leaves: Leaves = {}
    _leave(account, counted, sorted(account.members(counted))[0], leaves)
    cursor = max(account.members(counted).values())
    (late,) = _outsiders(account, counted, 1)
    joined_at = cursor - settings.DEFAULT_LOOKBACK - timedelta(hours=2)
    account.join(counted, late, at=joined_at)

    simulator.reset_counters()
    pipeline.run(source_for())

    # The count equals the members held: the leave and the late join cancel out.
    assert len(_requests_of(simulator, "get_segment", counted)) == 1
    assert _requests_of(simulator, "get_segment_relationships_profiles", counted) == []
    assert _ended(pipeline) == {}

    pipeline.run(source_for(full_reconcile_every_hours=1 / 3600))

    assert loaded_memberships(pipeline) == true_memberships(account)
    assert loaded_memberships(pipeline)[counted][late] == joined_at
    _assert_leaves_within_bounds(pipeline, leaves)


def test_many_leaves_in_the_largest_segment(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    big = settled_segments(account)[0]
    leaves: Leaves = {}
    for profile_id in list(account.members(big))[::3]:
        _leave(account, big, profile_id, leaves)
    assert len(leaves) > 200

    pipeline.run(source_for())

    assert loaded_memberships(pipeline) == true_memberships(account)
    _assert_leaves_within_bounds(pipeline, leaves)


def test_held_members_are_read_in_chunks_and_every_leave_and_closure_is_ended(
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reconciliation and a deleted segment read held rows a chunk at a time, losing none."""
    monkeypatch.setattr(held, "FETCH_ROWS", 13)
    monkeypatch.setattr(held, "LOOKUP_IDS", 7)
    monkeypatch.setattr(memberships, "ENDED_AT_A_TIME", 50)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    big, doomed = settled_segments(account)[:2]
    leaves: Leaves = {}
    for profile_id in list(account.members(big))[::3]:
        _leave(account, big, profile_id, leaves)
    doomed_members = set(account.members(doomed))
    account.delete_segment(doomed)
    assert len(leaves) > 50 and len(doomed_members) > 50

    pipeline.run(source_for(reconcile="all"))

    assert loaded_memberships(pipeline) == true_memberships(account)
    _assert_leaves_within_bounds(pipeline, leaves)
    closed = query(
        pipeline,
        "SELECT profile_id FROM segment_memberships "
        f"WHERE segment_id = '{doomed}' AND NOT is_member AND left_reason = 'segment_deleted'",
    )
    assert {row[0] for row in closed} == doomed_members


def test_leave_then_rejoin_opens_a_new_period(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = settled_segments(account)[0]
    profile_id = next(iter(account.members(segment_id)))
    leaves: Leaves = {}
    _leave(account, segment_id, profile_id, leaves)
    pipeline.run(source_for())
    _assert_leaves_within_bounds(pipeline, leaves)

    rejoined_at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=2)
    account.join(segment_id, profile_id, at=rejoined_at)
    pipeline.run(source_for())

    assert loaded_memberships(pipeline) == true_memberships(account)
    periods = query(
        pipeline,
        "SELECT joined_group_at, left_at_latest, left_reason FROM segment_membership_periods "
        f"WHERE segment_id = '{segment_id}' AND profile_id = '{profile_id}' "
        "ORDER BY joined_group_at",
    )
    assert len(periods) == 2
    (first_joined, first_left, first_reason), (second_joined, second_left, _) = periods
    assert first_reason == "left" and first_left is not None
    assert utc(second_joined) == rejoined_at and second_left is None


def test_join_leave_join_between_two_runs_closes_the_earlier_period(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = settled_segments(account)[0]
    profile_id = next(iter(account.members(segment_id)))
    before = datetime.now(timezone.utc)
    account.leave(segment_id, profile_id)
    rejoined_at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    account.join(segment_id, profile_id, at=rejoined_at)

    pipeline.run(source_for())

    assert loaded_memberships(pipeline) == true_memberships(account)
    periods = query(
        pipeline,
        "SELECT joined_group_at, last_seen_at, left_at_latest, left_reason "
        "FROM segment_membership_periods "
        f"WHERE segment_id = '{segment_id}' AND profile_id = '{profile_id}' "
        "ORDER BY joined_group_at",
    )
    assert len(periods) == 2
    closed, current = periods
    assert closed[3] == "rejoined" and utc(closed[2]) == rejoined_at
    assert utc(closed[1]) <= before
    assert utc(current[0]) == rejoined_at and current[2] is None


def _rejoin_once_the_walk_has_started(
    simulator: KlaviyoSimulator, segment_id: str, profile_id: str
) -> Tuple[threading.Thread, List[int]]:
    """Re-join a member as soon as the first page of its segment was served.

    Returns the thread and, once it ran, how many pages had been served at that moment.
    """
    pages_served_then: List[int] = []

    def pages() -> int:
        return sum(
            1
            for record in list(simulator.request_log)
            if record.operation == "get_segment_profiles" and segment_id in record.path
        )

    def rejoin() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pages() == 0:
            time.sleep(0.002)
        simulator.account.rejoin(segment_id, profile_id)
        pages_served_then.append(pages())

    thread = threading.Thread(target=rejoin, daemon=True)
    thread.start()
    return thread, pages_served_then


def test_a_member_listed_twice_in_one_walk_is_loaded_once_and_its_rejoin_next_run(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    segment_id = settled_segments(account)[0]
    members = account.members(segment_id)
    assert len(members) > 200, "the walk needs several pages"
    first_listed = min(members, key=lambda profile_id: (members[profile_id], profile_id))
    first_joined = members[first_listed]
    # The second page is held back long enough for the re-join to land before it is read:
    # keyset paging then lists the member again on the last page, with its new join.
    simulator.inject_fault("slow", times=1, path_contains="page%5Bcursor%5D", delay=1.0)
    rejoiner, pages_served_then = _rejoin_once_the_walk_has_started(
        simulator, segment_id, first_listed
    )
    pipeline = make_pipeline()

    pipeline.run(source_for(segment_ids=[segment_id]))
    rejoiner.join()

    assert pages_served_then == [1]
    rejoined_at = account.members(segment_id)[first_listed]
    for table, key in (
        ("segment_memberships", "membership_id"),
        ("segment_membership_periods", "period_id"),
    ):
        repeated = query(pipeline, f"SELECT {key} FROM {table} GROUP BY 1 HAVING count(*) > 1")
        assert repeated == [], table
    loaded = loaded_memberships(pipeline)[segment_id]
    assert loaded[first_listed] == first_joined  # its first sighting
    cursor = pipeline.state["sources"]["klaviyo"]["resources"]["segment_memberships"][
        "joined_group_at"
    ][segment_id]
    assert datetime.fromisoformat(cursor) < rejoined_at

    pipeline.run(source_for(segment_ids=[segment_id]))

    assert loaded_memberships(pipeline)[segment_id] == account.members(segment_id)
    periods = query(
        pipeline,
        "SELECT joined_group_at, left_at_latest, left_reason FROM segment_membership_periods "
        f"WHERE segment_id = '{segment_id}' AND profile_id = '{first_listed}' "
        "ORDER BY joined_group_at",
    )
    assert [(utc(joined), reason) for joined, _, reason in periods] == [
        (first_joined, "rejoined"),
        (rejoined_at, None),
    ]
    assert utc(periods[0][1]) == rejoined_at


def test_emptied_segment_ends_every_membership(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = settled_segments(account)[-1]
    leaves: Leaves = {}
    for profile_id in list(account.members(segment_id)):
        _leave(account, segment_id, profile_id, leaves)

    pipeline.run(source_for())

    current = query(
        pipeline,
        f"SELECT count(*) FROM segment_memberships WHERE segment_id = '{segment_id}' AND is_member",
    )
    assert current[0][0] == 0
    assert loaded_memberships(pipeline) == true_memberships(account)
    _assert_leaves_within_bounds(pipeline, leaves)


def test_deleted_segment_closes_its_history(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = settled_segments(account)[0]
    members = set(account.members(segment_id))
    account.delete_segment(segment_id)

    pipeline.run(source_for())

    periods = query(
        pipeline,
        "SELECT profile_id, left_reason, left_at_latest FROM segment_membership_periods "
        f"WHERE segment_id = '{segment_id}'",
    )
    assert {row[0] for row in periods} == members
    assert all(reason == "segment_deleted" and left for _, reason, left in periods)


def test_processing_segment_is_not_marked_until_it_settles(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = settled_segments(account)[0]
    profile_id = next(iter(account.members(segment_id)))
    account.set_processing(segment_id, True)
    leaves: Leaves = {}
    _leave(account, segment_id, profile_id, leaves)

    pipeline.run(source_for(reconcile="all"))
    still = query(
        pipeline,
        "SELECT is_member FROM segment_memberships "
        f"WHERE segment_id = '{segment_id}' AND profile_id = '{profile_id}'",
    )
    assert still == [(True,)]

    account.set_processing(segment_id, False)
    pipeline.run(source_for())
    assert loaded_memberships(pipeline) == true_memberships(account)
    _assert_leaves_within_bounds(pipeline, leaves)


@pytest.mark.parametrize("seed", [3, 5])
def test_any_mix_of_changes_ends_equal_to_the_truth(
    seed: int, account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    import random

    rng = random.Random(seed)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    leaves: Leaves = {}
    profiles = list(account.profiles())
    for _ in range(3):
        now = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
        for segment_id in settled_segments(account):
            members = list(account.members(segment_id))
            for profile_id in rng.sample(members, min(len(members), rng.randint(0, 6))):
                _leave(account, segment_id, profile_id, leaves)
            for profile_id in rng.sample(profiles, 5):
                if profile_id not in account.members(segment_id):
                    account.join(segment_id, profile_id, at=now)
            if members and rng.random() < 0.5:
                account.rejoin(segment_id, rng.choice(list(account.members(segment_id))), at=now)
        pipeline.run(source_for(reconcile=rng.choice(["counts", "all"])))
        assert loaded_memberships(pipeline) == true_memberships(account)
        _assert_leaves_within_bounds(pipeline, leaves)
    duplicates = query(
        pipeline,
        "SELECT membership_id FROM segment_memberships GROUP BY membership_id HAVING count(*) > 1",
    )
    assert duplicates == []
