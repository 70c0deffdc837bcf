"""diff_page: what one page of a segment's members brings to the tables, compared with what
is held; pure, so every rule is checked here without a server."""

from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional

import msgspec

from klaviyo_source.held import HeldMembership
from klaviyo_source.member_pages import Member
from klaviyo_source.members_this_run import Sighting
from klaviyo_source.page_diff import (
    ListedMember,
    PageDiff,
    diff_page,
    ended_membership,
    worth_a_look,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
EARLIER = NOW - timedelta(days=30)
JOINED = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _member(profile_id: str, joined: datetime = JOINED) -> Member:
    attributes = {"email": f"{profile_id}@example.com", "joined_group_at": joined.isoformat()}
    return Member(profile_id, joined.isoformat(), msgspec.Raw(msgspec.json.encode(attributes)))


def _held(profile_id: str, joined: datetime = JOINED) -> HeldMembership:
    return HeldMembership(profile_id, joined, first_seen_at=EARLIER, last_seen_at=EARLIER)


def _diff(
    listed: List[ListedMember],
    sightings: List[Sighting],
    held: Optional[Dict[str, HeldMembership]] = None,
    include_profiles: bool = True,
) -> PageDiff:
    return diff_page("SEG", listed, sightings, held or {}, NOW, None, include_profiles)


def test_members_held_with_the_same_join_are_passed_over_unless_reloading() -> None:
    page = [_member("P1"), _member("P2", JOINED + timedelta(hours=1)), _member("P3")]
    held_joined = {"P1": JOINED, "P2": JOINED}

    assert [m.id for m in worth_a_look(page, held_joined, reloading=False)] == ["P2", "P3"]
    assert [m.id for m in worth_a_look(page, held_joined, reloading=True)] == ["P1", "P2", "P3"]


def test_a_new_member_joins_now_with_its_profile() -> None:
    listed = worth_a_look([_member("P1")], {}, reloading=False)

    diff = _diff(listed, [Sighting.NEW_PROFILE])

    assert diff.joins == 1 and diff.ended_earlier == [] and diff.repeated_joins == []
    (row,) = diff.memberships
    assert (row["membership_id"], row["joined_group_at"]) == ("SEG:P1", JOINED)
    assert (row["first_seen_at"], row["last_seen_at"], row["is_member"]) == (NOW, NOW, True)
    assert diff.profiles == [{"id": "P1", "email": "P1@example.com"}]


def test_a_profile_row_comes_only_with_its_first_listing_in_the_run_and_only_if_asked() -> None:
    listed = worth_a_look([_member("P1"), _member("P2")], {}, reloading=False)

    assert _diff(listed, [Sighting.NEW_MEMBERSHIP, Sighting.NEW_PROFILE]).profiles == [
        {"id": "P2", "email": "P2@example.com"}
    ]
    no_profiles = _diff(listed, [Sighting.NEW_PROFILE] * 2, include_profiles=False)
    assert no_profiles.profiles == [] and len(no_profiles.memberships) == 2


def test_a_reloaded_member_keeps_its_first_sighting_and_is_no_join() -> None:
    listed = worth_a_look([_member("P1")], {"P1": JOINED}, reloading=True)

    diff = _diff(listed, [Sighting.NEW_PROFILE], {"P1": _held("P1")})

    assert diff.joins == 0 and diff.ended_earlier == []
    assert [row["first_seen_at"] for row in diff.memberships] == [EARLIER]


def test_a_rejoin_ends_the_held_period_before_the_new_join() -> None:
    rejoined = JOINED + timedelta(days=40)
    listed = worth_a_look([_member("P1", rejoined)], {"P1": JOINED}, reloading=False)

    diff = _diff(listed, [Sighting.NEW_PROFILE], {"P1": _held("P1")})

    assert diff.joins == 0
    (ended,) = diff.ended_earlier
    assert (ended["joined_group_at"], ended["left_reason"], ended["is_member"]) == (
        JOINED,
        "rejoined",
        False,
    )
    assert (ended["left_at_earliest"], ended["left_at_latest"]) == (EARLIER, rejoined)
    (current,) = diff.memberships
    assert (current["joined_group_at"], current["first_seen_at"]) == (rejoined, NOW)


def test_a_member_listed_again_in_the_run_loads_nothing_and_is_reported() -> None:
    listed = worth_a_look([_member("P1"), _member("P2")], {}, reloading=False)

    diff = _diff(listed, [Sighting.REPEAT, Sighting.NEW_PROFILE])

    assert [row["profile_id"] for row in diff.memberships] == ["P2"]
    assert diff.repeated_joins == [JOINED] and diff.joins == 1


def test_an_ended_membership_was_last_seen_at_the_latest_full_walk_that_found_it() -> None:
    walked = EARLIER + timedelta(days=10)
    held = _held("P1")

    seen_by_walk = ended_membership("SEG", held, NOW, "left", walked)
    never_walked = ended_membership("SEG", held, NOW, "left", None)
    walked_before_first_seen = ended_membership("SEG", held, NOW, "left", EARLIER - timedelta(1))

    assert seen_by_walk["left_at_earliest"] == walked
    assert never_walked["left_at_earliest"] == EARLIER
    assert walked_before_first_seen["left_at_earliest"] == EARLIER
    assert seen_by_walk["left_at_latest"] == NOW and seen_by_walk["left_reason"] == "left"
