"""Profiles stay current: after each run every member's profile row holds Klaviyo's attributes,
whether or not any of its memberships changed; deleted profiles are marked."""

import json
import math
from datetime import datetime, timedelta
from typing import Callable, List

import dlt
import pytest
from dlt.pipeline.helpers import pipeline_drop
from expected import loaded_profiles, member_ids, query, true_profiles
from scenarios import assert_profiles_are_current

from klaviyo_source import profile_refresh, settings
from klaviyo_source.export import ExportFailed, KlaviyoExport
from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account
from klaviyo_source.summary import failed_segments

PAGE = settings.PROFILES_PAGE_SIZE


@pytest.fixture
def account() -> Account:
    """Small, so each run takes about a second, with more members than a page holds."""
    return generate_account(seed=5, segments=5, tags=3, profiles=400, memberships=900)


def _cursor(pipeline: dlt.Pipeline) -> datetime:
    resources = pipeline.state["sources"]["klaviyo"]["resources"]
    stored = resources[settings.PROFILE_REFRESH_RESOURCE][settings.PROFILES_CURSOR_STATE_KEY]
    return datetime.fromisoformat(stored)


def _listing_pages(account: Account, since: datetime) -> int:
    """Pages of `updated` since the window's start a refresh reads, from the truth alone:
    the filter starts a whole second before it, rounded down."""
    bound = since.replace(microsecond=0) - timedelta(seconds=1)
    updated = [profile["updated"] for profile in account.profiles().values()]
    return max(1, math.ceil(sum(1 for value in updated if value > bound) / PAGE))


def _requests(simulator: KlaviyoSimulator) -> List[str]:
    """The filters of this run's GET /api/profiles requests."""
    return [
        r.query.get("filter", "") for r in simulator.request_log if r.operation == "get_profiles"
    ]


def _loaded_by_last_run(pipeline: dlt.Pipeline) -> int:
    (count,) = query(
        pipeline,
        "SELECT COUNT(*) FROM profiles WHERE _dlt_load_id = (SELECT MAX(load_id) FROM _dlt_loads)",
    )[0]
    return int(count)


def _edit(account: Account, profile_ids: List[str], tag: str) -> None:
    for n, profile_id in enumerate(profile_ids):
        account.update_profile(
            profile_id,
            email=f"{tag}.{n}@example.com",
            phone_number=f"+1555000{n:04d}",
            first_name=f"{tag} {n}",
            last_name="Edited",
            location={"city": f"{tag} City", "latitude": "12.5", "longitude": -3.25},
            properties={"edit": tag, "n": n},
        )


def test_members_edited_between_runs_are_current_and_outsiders_stay_out(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    # A first export fetches every member through the walks: the refresh lists nothing.
    assert _requests(simulator) == []
    cursor = _cursor(pipeline)
    members = sorted(member_ids(account))
    outsiders = sorted(set(account.profiles()) - set(members))[:3]
    _edit(account, members[::3], "member")
    _edit(account, outsiders, "outsider")
    simulator.request_log.clear()

    # No membership changes and no reconciliation: only the refresh can bring the edits.
    pipeline.run(source_for(reconcile="off"))

    assert_profiles_are_current(pipeline, account)
    assert not set(outsiders) & set(loaded_profiles(pipeline))
    assert len(_requests(simulator)) == _listing_pages(
        account, cursor - settings.DEFAULT_PROFILE_LOOKBACK
    )
    # Profiles the window lists again unchanged are not loaded again.
    assert _loaded_by_last_run(pipeline) == len(members[::3])


def test_a_run_without_edits_asks_once_and_loads_no_profile(
    simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    first = _cursor(pipeline)
    simulator.request_log.clear()

    pipeline.run(source_for(reconcile="off"))

    assert [f.startswith("greater-than(updated,") for f in _requests(simulator)] == [True]
    assert _loaded_by_last_run(pipeline) == 0
    assert _cursor(pipeline) > first


def test_a_profile_updated_at_the_cursors_instant_is_listed(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    cursor = _cursor(pipeline)
    members = sorted(member_ids(account))
    account.update_profile(members[0], email="at.the.cursor@example.com", updated=cursor)

    pipeline.run(source_for(reconcile="off", profile_lookback_minutes=0))

    assert loaded_profiles(pipeline)[members[0]]["email"] == "at.the.cursor@example.com"
    # The window may also start on a whole second, which a strict `greater-than` on whole
    # seconds would pass over.
    cursor = _cursor(pipeline)
    whole_second = cursor.replace(microsecond=0)
    account.update_profile(members[1], email="whole.second@example.com", updated=whole_second)
    to_whole_second = (cursor - whole_second) / timedelta(minutes=1)

    pipeline.run(source_for(reconcile="off", profile_lookback_minutes=to_whole_second))

    assert loaded_profiles(pipeline)[members[1]]["email"] == "whole.second@example.com"
    assert_profiles_are_current(pipeline, account)


def test_a_deleted_profile_is_marked_and_its_attributes_dropped(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    memberships = account.memberships()
    # Members of settled segments only: a processing segment is not looked at for leaves.
    processing = {sid for sid, s in account.segments().items() if s["is_processing"]}
    settled = sorted(member_ids(account) - {p for sid in processing for p in memberships[sid]})
    deleted, gone_from_segments = settled[3], settled[4]
    account.delete_profile(deleted)
    for segment_id, segment_members in memberships.items():
        if gone_from_segments in segment_members:
            account.leave(segment_id, gone_from_segments)
    _edit(account, [gone_from_segments], "left")

    # The reconciliation finds both gone from their segments; the next run asks Klaviyo.
    pipeline.run(source_for())
    simulator.request_log.clear()
    pipeline.run(source_for())

    checked = [f for f in _requests(simulator) if f.startswith("any(id,")]
    assert len(checked) == 1 and deleted in checked[0] and gone_from_segments in checked[0]
    rows = {
        row[0]: row[1:]
        for row in query(
            pipeline, "SELECT id, deleted_at, email, first_name, properties FROM profiles"
        )
    }
    deleted_at, email, first_name, properties = rows[deleted]
    assert deleted_at is not None and (email, first_name, properties) == (None, None, None)
    assert rows[gone_from_segments][0] is None
    assert (
        loaded_profiles(pipeline)[gone_from_segments]
        == true_profiles(account, [gone_from_segments])[gone_from_segments]
    )
    assert [r for r in rows.values() if r[0] is not None] == [rows[deleted]]
    assert_profiles_are_current(pipeline, account)
    simulator.request_log.clear()

    # Checked once: no later run asks for them again.
    pipeline.run(source_for())

    assert [f for f in _requests(simulator) if f.startswith("any(id,")] == []


def test_a_destination_without_a_refresh_cursor_catches_up_by_id(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipeline that loaded profiles before the refresh existed (or whose refresh cursor
    was dropped) may hold stale rows: each held profile is fetched once, by id."""
    # Held ids are read a page's worth at a time here, so that they take several reads.
    monkeypatch.setattr(profile_refresh, "HELD_IDS_AT_A_TIME", PAGE)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    pipeline_drop(
        pipeline, state_paths=f"resources.{settings.PROFILE_REFRESH_RESOURCE}", state_only=True
    )()
    members = sorted(member_ids(account))
    _edit(account, members[::11], "stale")
    account.delete_profile(members[5])
    held = len(loaded_profiles(pipeline))
    simulator.request_log.clear()

    pipeline.run(source_for(reconcile="off"))

    requests = _requests(simulator)
    assert len(requests) == math.ceil(held / PAGE)
    assert all(f.startswith("any(id,") for f in requests)
    assert_profiles_are_current(pipeline, account)
    (deleted_at,) = query(pipeline, f"SELECT deleted_at FROM profiles WHERE id = '{members[5]}'")[0]
    assert deleted_at is not None


def test_refreshed_profiles_carry_the_additional_fields_asked_for(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    options = {"profile_additional_fields": ["subscriptions"], "reconcile": "off"}
    pipeline.run(source_for(**options))
    profile_id = sorted(member_ids(account))[2]
    subscriptions = account.profiles()[profile_id]["subscriptions"]
    subscriptions["email"]["marketing"]["consent"] = "UNSUBSCRIBED"
    account.update_profile(profile_id, subscriptions=subscriptions)

    pipeline.run(source_for(**options))

    (loaded,) = query(pipeline, f"SELECT subscriptions FROM profiles WHERE id = '{profile_id}'")[0]
    loaded = json.loads(loaded) if isinstance(loaded, str) else loaded
    assert loaded["email"]["marketing"]["consent"] == "UNSUBSCRIBED"


def test_a_refresh_failing_beyond_its_retries_fails_the_run_and_keeps_its_cursor(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME__REQUEST_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0.01")
    pipeline = make_pipeline()
    pipeline.run(source_for())
    cursor = _cursor(pipeline)
    members = sorted(member_ids(account))
    _edit(account, members[::9], "late")
    simulator.inject_fault("status", status=503, times=1000, path_contains="/api/profiles?")

    with pytest.raises(ExportFailed) as failed:
        KlaviyoExport(pipeline).run(source_for(reconcile="off"))

    message = str(failed.value)
    assert "\n" not in message and "503" in message
    assert message.startswith("the profile refresh failed;")  # not a segment's failure
    assert set(failed_segments(pipeline)) == {settings.PROFILE_REFRESH_FAILURE}
    assert _cursor(pipeline) == cursor
    simulator.clear_faults()

    KlaviyoExport(pipeline).run(source_for(reconcile="off"))

    assert failed_segments(pipeline) == {}
    assert_profiles_are_current(pipeline, account)
    assert _cursor(pipeline) > cursor


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_server_without_the_profiles_listing_keeps_the_walks_and_the_cursor(
    status: int,
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy or stand-in that does not serve GET /api/profiles: the walks still load every
    # member's profile, nothing fails, and the refresh cursor waits for an endpoint to read.
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0.01")
    pipeline = make_pipeline()
    pipeline.run(source_for())
    cursor = _cursor(pipeline)
    simulator.inject_fault("status", status=status, times=1000, path_contains="/api/profiles?")

    KlaviyoExport(pipeline).run(source_for(reconcile="off"))

    assert failed_segments(pipeline) == {}
    assert _cursor(pipeline) == cursor
    held = loaded_profiles(pipeline)
    assert set(held) >= member_ids(account)


def test_the_refresh_alone_starts_the_run_and_keeps_profiles_current(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    _edit(account, sorted(member_ids(account))[::5], "alone")
    simulator.request_log.clear()

    pipeline.run(source_for().with_resources(settings.PROFILE_REFRESH_RESOURCE))

    assert {r.operation for r in simulator.request_log} == {"get_profiles"}
    assert_profiles_are_current(pipeline, account)
