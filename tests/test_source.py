"""The source against the simulator, loaded into a real DuckDB file and compared with the truth."""

import inspect
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Callable, Dict, List, Mapping, Optional

import dlt
import pytest
from expected import (
    loaded_memberships,
    loaded_profiles,
    loaded_segment_tags,
    loaded_segments,
    loaded_tags,
    member_ids,
    query,
    table_snapshot,
    true_memberships,
    true_profiles,
    true_segments,
    utc,
)
from scenarios import largest_segment

from klaviyo_source import settings
from klaviyo_source.errors import KlaviyoConfigError
from klaviyo_source.simulator import Account, KlaviyoSimulator
from klaviyo_source.walk_tables import WALK_TABLES

LOOKBACK = settings.DEFAULT_LOOKBACK


def _cursor_state(pipeline: dlt.Pipeline) -> Dict[str, str]:
    resources = pipeline.state["sources"]["klaviyo"]["resources"]
    return dict(resources["segment_memberships"][settings.CURSORS_STATE_KEY])


def _expected_profile_pages(
    account: Account, cursors: Mapping[str, Optional[datetime]], page_size: int = 100
) -> int:
    """Requests an incremental walk of every live segment must make, from the truth alone."""
    total = 0
    for segment_id, members in account.memberships().items():
        cursor = cursors.get(segment_id)
        if cursor is None:
            rows = len(members)
        else:
            since = (cursor - LOOKBACK).replace(microsecond=0)
            rows = sum(1 for joined in members.values() if joined > since)
        total += max(1, math.ceil(rows / page_size))
    return total


def _outsiders(account: Account, segment_id: str, count: int) -> List[str]:
    members = account.members(segment_id)
    return [profile_id for profile_id in account.profiles() if profile_id not in members][:count]


def test_first_run_loads_every_table_as_the_truth(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())

    assert loaded_segments(pipeline) == true_segments(account)
    assert loaded_tags(pipeline) == account.tags()
    assert loaded_segment_tags(pipeline) == account.segment_tags()
    assert loaded_memberships(pipeline) == true_memberships(account)

    loaded = loaded_profiles(pipeline)
    assert set(loaded) == member_ids(account)
    assert loaded == true_profiles(account, loaded)
    # JSON objects, not JSON strings that spell one.
    kinds = {kind for (kind,) in query(pipeline, "SELECT json_type(properties) FROM profiles")}
    assert "OBJECT" in kinds and kinds <= {"OBJECT", None}


def test_each_segment_keeps_its_own_cursor(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())

    cursors = _cursor_state(pipeline)
    for segment_id, members in account.memberships().items():
        if members:
            assert datetime.fromisoformat(cursors[segment_id]) == max(members.values())
        else:
            assert segment_id not in cursors


def test_a_cursor_over_rows_the_destination_lost_is_not_trusted(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    big = largest_segment(account)
    with pipeline.sql_client() as client:
        # Someone deleted the segment's rows; the pipeline's state still holds its cursor.
        client.execute_sql("DELETE FROM segment_memberships WHERE segment_id = %s", big)
    cursors = _cursor_state(pipeline)
    assert big in cursors
    simulator.request_log.clear()

    pipeline.run(source_for(reconcile="off"))

    walks = [r for r in simulator.request_log if r.operation == "get_segment_profiles"]
    walked = {sid: [r for r in walks if f"/segments/{sid}/" in r.path] for sid in cursors}
    assert len(walked[big]) > 1 and all("filter" not in r.query for r in walked[big])
    # Every other segment still starts from its cursor: one filtered page.
    assert all(
        len(requests) == 1 and "filter" in requests[0].query
        for sid, requests in walked.items()
        if sid != big
    )
    assert loaded_memberships(pipeline) == true_memberships(account)


def test_second_run_fetches_only_new_pages_and_matches_the_truth(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    cursors = {sid: max(m.values()) for sid, m in account.memberships().items() if m}
    first_seen = dict(
        query(pipeline, "SELECT membership_id, first_seen_at FROM segment_memberships")
    )

    now = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5)
    big = largest_segment(account)
    small = min(
        (sid for sid, members in account.memberships().items() if members and sid != big),
        key=lambda sid: len(account.members(sid)),
    )
    newcomer, late = _outsiders(account, small, 2)
    account.join(small, newcomer, at=now)
    # Late-visible: joined before the newest join already loaded, but inside the lookback.
    account.join(small, late, at=cursors[small] - timedelta(minutes=20))
    rejoiner = next(iter(account.members(big)))
    account.rejoin(big, rejoiner, at=now)
    # 250 joins sharing one timestamp span three pages of 100.
    for profile_id in _outsiders(account, big, 250):
        account.join(big, profile_id, at=now - timedelta(seconds=1))
    created = account.create_segment("Created between runs")
    for profile_id in list(account.profiles())[:130]:
        account.join(created, profile_id, at=now - timedelta(days=3))

    simulator.reset_counters()
    pipeline.run(source_for())

    assert loaded_memberships(pipeline) == true_memberships(account)
    assert loaded_segments(pipeline) == true_segments(account)
    assert simulator.counters["get_segment_profiles"] == _expected_profile_pages(account, cursors)
    rejoined = query(
        pipeline,
        f"SELECT joined_group_at FROM segment_memberships WHERE membership_id = '{big}:{rejoiner}'",
    )
    assert utc(rejoined[0][0]) == now
    # Rows fetched again by the lookback window keep the time they were first seen.
    for membership_id, seen in query(
        pipeline, "SELECT membership_id, first_seen_at FROM segment_memberships"
    ):
        if membership_id in first_seen and membership_id != f"{big}:{rejoiner}":
            assert seen == first_seen[membership_id]


@pytest.mark.parametrize("reconcile", ["off", "counts"])
def test_no_change_run_makes_one_request_per_segment_and_changes_nothing(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    reconcile: str,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for(reconcile=reconcile))
    before = {table: table_snapshot(pipeline, table) for table in _DATA_TABLES}
    cursors = {sid: max(m.values()) if m else None for sid, m in account.memberships().items()}

    simulator.reset_counters()
    pipeline.run(source_for(reconcile=reconcile))

    segment_count = len(account.segments())
    segments = account.segments()
    checked_pages = sum(
        math.ceil(len(members) / 100)
        for sid, members in account.memberships().items()
        if members and not segments[sid]["is_processing"]
    )
    assert simulator.counters["get_segments"] == math.ceil(segment_count / 10)
    assert simulator.counters["get_segment_profiles"] == _expected_profile_pages(account, cursors)
    assert simulator.counters["get_segment_profiles"] == segment_count
    # "counts" checks each settled segment with members for leaves; these are small enough for
    # their member ids to be walked sooner than counted (tests/test_leave_checks.py counts too).
    assert simulator.counters["get_segment_relationships_profiles"] == (
        checked_pages if reconcile == "counts" else 0
    )
    assert simulator.counters["get_segment"] == 0
    assert {table: table_snapshot(pipeline, table) for table in _DATA_TABLES} == before


_DATA_TABLES = (
    "segments",
    "tags",
    "segment_tags",
    "segment_memberships",
    "segment_membership_periods",
    "profiles",
)


def test_deleted_segment_ends_its_memberships_and_rename_updates_the_row(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    populated = [sid for sid, members in account.memberships().items() if members]
    doomed, renamed = populated[0], populated[1]
    doomed_members = set(account.members(doomed))
    account.delete_segment(doomed)
    account.rename_segment(renamed, "Renamed segment")

    pipeline.run(source_for())

    segments = loaded_segments(pipeline)
    assert segments[doomed]["deleted_at"] is not None
    assert segments[renamed]["name"] == "Renamed segment"
    rows = query(
        pipeline,
        "SELECT profile_id, is_member, left_reason, left_at_latest FROM segment_memberships "
        f"WHERE segment_id = '{doomed}'",
    )
    assert {row[0] for row in rows} == doomed_members
    assert all(
        not is_member and reason == "segment_deleted" and left
        for _, is_member, reason, left in rows
    )
    assert loaded_memberships(pipeline) == true_memberships(account)


def test_tag_removed_from_a_segment_leaves_the_link_table(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id, tag_id = sorted(account.segment_tags())[0]
    account.untag_segment(segment_id, tag_id)

    pipeline.run(source_for())

    assert (segment_id, tag_id) not in loaded_segment_tags(pipeline)
    assert loaded_segment_tags(pipeline) == account.segment_tags()


def test_optional_profile_fields_load_typed(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for(profile_additional_fields=["subscriptions", "predictive_analytics"]))

    columns = pipeline.default_schema.tables["profiles"]["columns"]
    assert columns["predictive_analytics__historic_clv"]["data_type"] == "double"
    assert columns["predictive_analytics__expected_date_of_next_order"]["data_type"] == "timestamp"
    assert columns["subscriptions"]["data_type"] == "json"
    rows = query(
        pipeline,
        "SELECT id, subscriptions, predictive_analytics__historic_clv, "
        "predictive_analytics__expected_date_of_next_order, "
        "predictive_analytics__ranked_channel_affinity FROM profiles",
    )
    truth = account.profiles()
    assert {row[0] for row in rows} == member_ids(account)
    for profile_id, subscriptions, clv, next_order, affinity in rows:
        predicted = truth[profile_id]["predictive_analytics"]
        consent = json.loads(subscriptions)["email"]["marketing"]["consent"]
        assert consent == truth[profile_id]["subscriptions"]["email"]["marketing"]["consent"]
        assert clv == predicted["historic_clv"]
        expected_next = predicted["expected_date_of_next_order"]
        assert (utc(next_order) if next_order else None) == expected_next
        loaded_affinity = json.loads(affinity) if affinity is not None else None
        assert loaded_affinity == predicted["ranked_channel_affinity"]


def test_membership_only_mode_asks_for_joined_group_at_alone(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for(include_profiles=False))

    assert loaded_memberships(pipeline) == true_memberships(account)
    assert "profiles" not in pipeline.default_schema.tables
    profile_requests = [r for r in simulator.request_log if r.operation == "get_segment_profiles"]
    assert profile_requests
    assert all(r.query.get("fields[profile]") == "joined_group_at" for r in profile_requests)


@pytest.mark.parametrize("selector", ["ids", "names", "is_starred"])
def test_segment_selection(
    account: Account, source_for: Callable, make_pipeline: Callable, selector: str
) -> None:
    segments = account.segments()
    chosen = sorted(segments)[:2]
    options: Dict[str, object]
    if selector == "ids":
        options = {"segment_ids": chosen}
    elif selector == "names":
        options = {"segment_names": [segments[sid]["name"] for sid in chosen]}
    else:
        chosen = [sid for sid, attrs in segments.items() if attrs["is_starred"]]
        options = {"is_starred": True}
    assert chosen, "the generated account must have segments to select"
    pipeline = make_pipeline()
    pipeline.run(source_for(**options))

    assert set(loaded_segments(pipeline)) == set(chosen)
    truth = {sid: m for sid, m in true_memberships(account).items() if sid in chosen}
    assert loaded_memberships(pipeline) == truth


def test_unknown_segment_id_fails_before_anything_is_written(
    source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    with pytest.raises(Exception) as raised:
        pipeline.run(source_for(segment_ids=["NoSuch"]))
    cause: BaseException = raised.value
    while cause.__cause__ is not None and not isinstance(cause, KlaviyoConfigError):
        cause = cause.__cause__
    assert isinstance(cause, KlaviyoConfigError)
    assert "NoSuch" in str(cause)
    assert "segments" not in pipeline.dataset().tables


def test_segment_leaving_the_selection_keeps_its_row_current_and_is_not_walked(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for(is_active=True))
    active = [sid for sid, attrs in account.segments().items() if attrs["is_active"]]
    dropped = next(sid for sid in active if account.members(sid))
    members_before = loaded_memberships(pipeline)[dropped]
    account.set_active(dropped, False)

    simulator.reset_counters()
    pipeline.run(source_for(is_active=True))

    assert loaded_segments(pipeline)[dropped]["is_active"] is False
    assert loaded_segments(pipeline)[dropped]["deleted_at"] is None
    assert loaded_memberships(pipeline)[dropped] == members_before
    walked = {
        r.path.split("/")[3] for r in simulator.request_log if r.operation == "get_segment_profiles"
    }
    assert dropped not in walked


_WALK_TABLE_KEYS = {table: key for table, (key, _) in WALK_TABLES.items()}


def _write_dispositions(pipeline: dlt.Pipeline) -> Dict[str, Optional[str]]:
    tables = pipeline.default_schema.tables
    return {name: tables[name]["write_disposition"] for name in _WALK_TABLE_KEYS}


def _repeated_keys(pipeline: dlt.Pipeline) -> Dict[str, int]:
    """Rows per walk table that share their key with another row (0 everywhere when sound)."""
    return {
        table: query(pipeline, f"SELECT COUNT(*) - COUNT(DISTINCT {key}) FROM {table}")[0][0]
        for table, key in _WALK_TABLE_KEYS.items()
    }


def test_walk_tables_are_appended_to_while_empty_and_merged_into_once_they_hold_rows(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())

    assert set(_write_dispositions(pipeline).values()) == {"append"}
    # An append stages nothing: no copy of a walk table in the staging dataset.
    staged = query(
        pipeline,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'klaviyo_staging'",
    )
    assert not {name for (name,) in staged} & set(_WALK_TABLE_KEYS)

    big = largest_segment(account)
    leaver, rejoiner = list(account.members(big))[:2]
    small = min(account.memberships(), key=lambda sid: len(account.members(sid)))
    account.join(small, _outsiders(account, small, 1)[0])
    account.leave(big, leaver)
    account.rejoin(big, rejoiner)
    pipeline.run(source_for(reconcile="all"))

    assert set(_write_dispositions(pipeline).values()) == {"merge"}
    assert _repeated_keys(pipeline) == dict.fromkeys(_WALK_TABLE_KEYS, 0)
    assert loaded_memberships(pipeline) == true_memberships(account)
    left = query(
        pipeline,
        f"SELECT is_member, left_reason FROM segment_memberships "
        f"WHERE membership_id = '{big}:{leaver}'",
    )
    assert left == [(False, "left")]


def _columns(pipeline: dlt.Pipeline, table: str) -> Dict[str, str]:
    rows = query(
        pipeline,
        "SELECT column_name, is_nullable FROM information_schema.columns "
        f"WHERE table_schema = 'klaviyo' AND table_name = '{table}'",
    )
    return dict(rows)


def test_walk_tables_carry_no_row_id(source_for: Callable, make_pipeline: Callable) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())

    assert all("_dlt_id" not in _columns(pipeline, table) for table in _WALK_TABLE_KEYS)
    assert all(_columns(pipeline, table) for table in _WALK_TABLE_KEYS)


def test_tables_holding_rows_are_merged_into_even_when_the_pipeline_forgot_them(
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    # The working folder is lost (an ephemeral runner) and nothing is restored from the
    # destination: the new pipeline's schema knows none of the tables its destination holds.
    pipeline.drop()
    monkeypatch.setenv("RESTORE_FROM_DESTINATION", "false")
    pipeline = make_pipeline()
    pipeline.run(source_for())

    assert set(_write_dispositions(pipeline).values()) == {"merge"}
    assert _repeated_keys(pipeline) == dict.fromkeys(_WALK_TABLE_KEYS, 0)
    assert loaded_memberships(pipeline) == true_memberships(account)


def test_reads_of_the_destination_share_a_connection_that_closes_with_the_extract(
    account: Account, source_for: Callable, make_pipeline: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a DuckDB connection costs more than most of a walk's queries: the run's setup,
    each walk and the profile refresh read on one kept open, closed once the last is done."""
    from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient

    opened: List[str] = []
    closed: List[str] = []
    queries: List[str] = []

    def source_reads() -> bool:
        return any("klaviyo_source/held.py" in frame.filename for frame in inspect.stack(0))

    def counted(calls: List[str], method: Callable) -> Callable:
        def wrapper(self: DuckDbSqlClient, *args: object, **kwargs: object) -> object:
            if source_reads():
                calls.append(method.__name__)
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        DuckDbSqlClient, "open_connection", counted(opened, DuckDbSqlClient.open_connection)
    )
    monkeypatch.setattr(
        DuckDbSqlClient, "close_connection", counted(closed, DuckDbSqlClient.close_connection)
    )
    monkeypatch.setattr(
        DuckDbSqlClient, "execute_query", counted(queries, DuckDbSqlClient.execute_query)
    )
    pipeline = make_pipeline()
    pipeline.run(source_for())
    for calls in (opened, closed, queries):
        calls.clear()

    pipeline.run(source_for(reconcile="all"))

    live = len(account.segments())
    # Setup (tables, counts, held segments), every walk and the refresh: each at most once.
    assert len(opened) <= 2 + live < len(queries)
    assert len(closed) == len(opened)  # nothing left open for the load or after the run
    assert loaded_memberships(pipeline) == true_memberships(account)
