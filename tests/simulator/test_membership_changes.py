"""The account's membership change log: every join, re-join, leave and segment deletion, with
its time, so that counts per day (Klaviyo's segment reports) can be answered from it."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from klaviyo_source.simulator import Account, generate_account
from klaviyo_source.simulator.account import MembershipChange

START = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def test_each_kind_of_change_is_logged_at_its_time() -> None:
    clock = Clock()
    account = Account(clock=clock, seed=1)
    sid = account.create_segment("Buyers")
    ann, bob = account.add_profile(email="ann@x.io"), account.add_profile(email="bob@x.io")
    earlier = START - timedelta(days=3)
    account.join(sid, ann, at=earlier)
    clock.now += timedelta(hours=1)
    account.join(sid, bob)
    account.join(sid, bob)  # already a member, no new time: nothing happens
    clock.now += timedelta(hours=1)
    account.leave(sid, ann)
    account.leave(sid, ann)  # no longer a member: nothing happens
    clock.now += timedelta(hours=1)
    account.rejoin(sid, ann)
    clock.now += timedelta(hours=1)
    account.rejoin(sid, bob)
    clock.now += timedelta(hours=1)
    account.delete_segment(sid)
    hour = timedelta(hours=1)
    changes = account.membership_changes()
    assert changes[:5] == [
        MembershipChange(earlier, "join", sid, ann),
        MembershipChange(START + hour, "join", sid, bob),
        MembershipChange(START + 2 * hour, "leave", sid, ann),
        MembershipChange(START + 3 * hour, "join", sid, ann),
        MembershipChange(START + 4 * hour, "rejoin", sid, bob),
    ]
    # A deletion ends every membership at once; among themselves they have no order.
    assert set(changes[5:]) == {
        MembershipChange(START + 5 * hour, "delete", sid, ann),
        MembershipChange(START + 5 * hour, "delete", sid, bob),
    }


def test_replaying_the_log_gives_the_memberships_of_a_busy_account() -> None:
    clock = Clock()
    account = generate_account(
        seed=4, segments=5, tags=2, profiles=200, memberships=500, now=START, clock=clock
    )
    rng = random.Random(8)
    segments = sorted(account.segments())
    profiles = sorted(account.profiles())
    deleted = segments.pop()
    for _ in range(400):
        clock.now += timedelta(minutes=rng.randint(0, 90))
        sid, pid = rng.choice(segments), rng.choice(profiles)
        action = rng.choice(["join", "leave", "rejoin"])
        getattr(account, action)(sid, pid)
    account.delete_segment(deleted)

    state: dict[str, dict[str, datetime]] = {}
    for change in account.membership_changes():
        members = state.setdefault(change.segment_id, {})
        if change.kind in ("join", "rejoin"):
            assert (change.profile_id in members) == (change.kind == "rejoin"), change
            members[change.profile_id] = change.at
        else:
            assert change.profile_id in members, change
            del members[change.profile_id]
    assert state.pop(deleted) == {}
    assert state == account.memberships()
    one = account.membership_changes(segments[0])
    assert one and {c.segment_id for c in one} == {segments[0]}
    assert [c.at for c in one] == sorted(c.at for c in one)
