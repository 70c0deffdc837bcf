"""Parallel segment walks under any thread schedule: exact tables, and nothing of dlt's touched.

Segments are walked in dlt's extract worker threads. Everything a walk needs from dlt (state,
load id, what the destination holds) is fixed in the pipeline's own thread before the first
walk starts; these tests hold the source to that, and to the truth, under schedules that
switch threads as often as the interpreter allows.
"""

import random
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, Iterator, List, Set, Tuple

import dlt
import pytest
from dlt.common.configuration.container import Container
from dlt.common.storages.live_schema_storage import LiveSchemaStorage
from expected import loaded_memberships, query, true_memberships, utc

from klaviyo_source.simulator import Account

Key = Tuple[str, str]  # (segment id, profile id)


@pytest.fixture
def switching_often() -> Iterator[None]:
    """Switch threads every microsecond: interleavings that are rare become the rule."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclass
class Changes:
    """What changed in the account between two runs, to check the next run against."""

    left: Set[Key]
    rejoined: Set[Key]
    deleted_segment: str
    deleted_members: Set[str]


def _first_seen(pipeline: dlt.Pipeline) -> Dict[Key, datetime]:
    rows = query(
        pipeline,
        "SELECT segment_id, profile_id, first_seen_at FROM segment_memberships WHERE is_member",
    )
    return {(segment_id, profile_id): utc(seen) for segment_id, profile_id, seen in rows}


def _change(account: Account, rng: random.Random, delete: bool) -> Changes:
    """Leaves, joins and re-joins in every settled segment with members (a processing one is
    reconciled once it settles); with `delete`, one of them deleted."""
    processing = {sid for sid, segment in account.segments().items() if segment["is_processing"]}
    segments = sorted(
        sid for sid, members in account.memberships().items() if members and sid not in processing
    )
    deleted = segments.pop(rng.randrange(len(segments))) if delete else ""
    deleted_members = set(account.members(deleted)) if deleted else set()
    if deleted:
        account.delete_segment(deleted)
    joined_at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    profiles = sorted(account.profiles())
    left: Set[Key] = set()
    rejoined: Set[Key] = set()
    for segment_id in segments:
        members = sorted(account.members(segment_id))
        for profile_id in rng.sample(members, min(len(members) - 1, rng.randint(1, 5))):
            account.leave(segment_id, profile_id)
            left.add((segment_id, profile_id))
        staying = sorted(set(account.members(segment_id)))
        profile_id = rng.choice(staying)
        account.rejoin(segment_id, profile_id, at=joined_at)
        rejoined.add((segment_id, profile_id))
        for profile_id in rng.sample(profiles, 4):
            # One that just left and joins again is a re-join, not a join: kept apart.
            if profile_id not in account.members(segment_id) and (
                (segment_id, profile_id) not in left
            ):
                account.join(segment_id, profile_id, at=joined_at)
    return Changes(left, rejoined, deleted, deleted_members)


def _assert_run_was_exact(
    pipeline: dlt.Pipeline,
    account: Account,
    before: Dict[Key, datetime],
    changes: Changes,
) -> None:
    """The run's tables equal the truth, and every change left its history behind."""
    assert loaded_memberships(pipeline) == true_memberships(account)
    # A member that did not change keeps the first sighting of its membership.
    first_seen = _first_seen(pipeline)
    unchanged = set(before) & set(first_seen) - changes.rejoined
    assert {key: first_seen[key] for key in unchanged} == {key: before[key] for key in unchanged}
    ended = {
        (segment_id, profile_id): reason
        for segment_id, profile_id, reason in query(
            pipeline,
            "SELECT segment_id, profile_id, left_reason FROM segment_memberships "
            "WHERE NOT is_member",
        )
    }
    assert {key: ended.get(key) for key in changes.left} == dict.fromkeys(changes.left, "left")
    closed = {
        profile_id
        for (segment_id, profile_id), reason in ended.items()
        if segment_id == changes.deleted_segment and reason == "segment_deleted"
    }
    assert closed == changes.deleted_members
    # A re-join closes the period before it as re-joined.
    rejoin_closed = {
        (segment_id, profile_id)
        for segment_id, profile_id in query(
            pipeline,
            "SELECT segment_id, profile_id FROM segment_membership_periods "
            "WHERE left_reason = 'rejoined'",
        )
    }
    assert changes.rejoined <= rejoin_closed


def _read_mid_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay the schedule in which a walk reads the pipeline's schema while it is refilled.

    Reading `pipeline.default_schema` reloads the live schema and refills the one shared
    object in place: its tables are emptied, then filled again. A thread that reads between
    the two steps sees a schema without tables. Here every read from outside the pipeline's
    thread lands in that gap, so a walk that reads the schema at all meets it.
    """
    read = LiveSchemaStorage.__getitem__

    def read_in_the_gap(storage: LiveSchemaStorage, name: str) -> Any:
        schema = read(storage, name)
        if threading.current_thread() is threading.main_thread():
            return schema
        emptied = schema.clone()
        emptied._reset_schema(schema.name, schema._normalizers_config)
        return emptied

    monkeypatch.setattr(LiveSchemaStorage, "__getitem__", read_in_the_gap)


def test_a_walk_that_reads_while_the_schema_is_refilled_still_loads_the_truth(
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    before = _first_seen(pipeline)
    changes = _change(account, random.Random(1), delete=True)

    _read_mid_refill(monkeypatch)
    pipeline.run(source_for(reconcile="all"))

    _assert_run_was_exact(pipeline, account, before, changes)


def _dlt_context_reads_from_walk_threads(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Record each lookup of dlt's injected context (state, pipeline, load package, config
    sections) that source code makes outside the pipeline's thread; returns where each came
    from."""
    calls: List[str] = []
    lookup = Container.__getitem__

    def recorded(container: Container, spec: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            stack = traceback.extract_stack()
            ours = [frame for frame in stack if "klaviyo_source" in frame.filename]
            if ours:
                calls.append(f"{spec.__name__} from {ours[-1].name}:{ours[-1].lineno}")
        return lookup(container, spec)

    monkeypatch.setattr(Container, "__getitem__", recorded)
    return calls


def test_walk_threads_touch_neither_dlt_state_nor_context(
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    _change(account, random.Random(2), delete=True)
    schema_reads: List[str] = []
    schema_of = vars(dlt.Pipeline)["default_schema"].fget

    def default_schema(self: dlt.Pipeline) -> Any:
        if threading.current_thread() is not threading.main_thread():
            schema_reads.append(threading.current_thread().name)
        return schema_of(self)

    monkeypatch.setattr(dlt.Pipeline, "default_schema", property(default_schema))
    context_reads = _dlt_context_reads_from_walk_threads(monkeypatch)

    pipeline.run(source_for(reconcile="all"))

    assert schema_reads == []
    assert context_reads == []
    assert loaded_memberships(pipeline) == true_memberships(account)


@pytest.mark.parametrize("seed", [7, 8])
def test_runs_with_every_kind_of_change_stay_exact_when_threads_switch_constantly(
    seed: int,
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    switching_often: None,
) -> None:
    rng = random.Random(seed)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    for run in range(3):
        before = _first_seen(pipeline)
        changes = _change(account, rng, delete=run == 1)
        pipeline.run(source_for(reconcile="all"))
        _assert_run_was_exact(pipeline, account, before, changes)
