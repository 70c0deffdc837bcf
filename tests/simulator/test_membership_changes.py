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


def test_daily_figures_count_joins_leaves_and_members_per_utc_day() -> None:
    clock = Clock()  # 2026-05-04 12:00 UTC
    account = Account(clock=clock, seed=2)
    sid = account.create_segment("Regulars")
    ann, bob, cy = (account.add_profile(email=f"{n}@x.io") for n in ("ann", "bob", "cy"))
    day = START.date()
    account.join(sid, ann, at=START - timedelta(days=2, hours=1))  # 05-02 11:00
    account.join(sid, bob, at=START - timedelta(days=1, hours=12, seconds=1))  # 05-02 23:59:59
    clock.now = START - timedelta(hours=12)  # 05-04 00:00, the first instant of the day
    account.leave(sid, ann)
    account.join(sid, cy)
    account.rejoin(sid, bob)  # already a member: neither added nor removed
    clock.now = START + timedelta(hours=11)  # 05-04 23:00
    account.rejoin(sid, ann)
    clock.now = START + timedelta(hours=13)  # 05-05 01:00
    account.leave(sid, cy)

    figures = account.daily_membership_stats(sid, day - timedelta(days=3), day + timedelta(days=1))
    assert [tuple(f)[1:] for f in figures] == [
        (0, 0, 0, 0),  # 05-01
        (2, 0, 2, 2),  # 05-02
        (0, 0, 0, 2),  # 05-03
        (2, 1, 1, 3),  # 05-04
        (0, 1, -1, 2),  # 05-05
    ]
    assert [f.day for f in figures] == [day + timedelta(days=n) for n in range(-3, 2)]
    # Two and a half hours behind, the leave at 01:00 and the re-join at 23:00 are not in yet.
    lagging = account.daily_membership_stats(
        sid, day, day + timedelta(days=1), lag=timedelta(minutes=150)
    )
    assert [tuple(f)[1:] for f in lagging] == [(1, 1, 0, 2), (0, 0, 0, 2)]


def test_daily_figures_add_up_to_the_live_member_count() -> None:
    clock = Clock()
    account = generate_account(
        seed=6, segments=3, tags=1, profiles=120, memberships=200, now=START, clock=clock
    )
    rng = random.Random(3)
    profiles = sorted(account.profiles())
    for _ in range(300):
        clock.now += timedelta(minutes=rng.randint(1, 200))
        sid, pid = rng.choice(sorted(account.segments())), rng.choice(profiles)
        getattr(account, rng.choice(["join", "leave", "rejoin"]))(sid, pid)
    for sid in account.segments():
        first = min(c.at for c in account.membership_changes(sid)).date()
        figures = account.daily_membership_stats(sid, first, clock.now.date())
        assert figures[-1].total_members == account.profile_count(sid)
        running = 0
        for f in figures:
            running += f.net_members_changed
            assert f.total_members == running
            assert f.net_members_changed == f.members_added - f.members_removed
