"""The in-memory account: mutation semantics, ground-truth copies, and the generator's shape."""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from klaviyo_source.simulator import Account, generate_account

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_membership_mutations() -> None:
    clock = Clock()
    acc = Account(clock=clock, seed=1)
    sid = acc.create_segment("S")
    pid = acc.add_profile(email="a@example.com")
    acc.join(sid, pid)
    assert acc.members(sid) == {pid: T0}
    clock.now = T0 + timedelta(hours=1)
    acc.join(sid, pid)  # already a member: no-op
    assert acc.members(sid)[pid] == T0
    older = T0 - timedelta(days=3)
    acc.join(sid, pid, at=older)  # explicit time: set (a late-visible join)
    assert acc.members(sid)[pid] == older
    acc.rejoin(sid, pid)
    assert acc.members(sid)[pid] == clock.now
    acc.leave(sid, pid)
    assert acc.members(sid) == {} and acc.profile_count(sid) == 0
    acc.leave(sid, pid)  # not a member: no-op
    acc.rejoin(sid, pid, at=older)
    assert acc.memberships() == {sid: {pid: older}}
    with pytest.raises(KeyError):
        acc.join("nope", pid)
    with pytest.raises(KeyError):
        acc.join(sid, "nope")
    with pytest.raises(ValueError):
        acc.join(sid, pid, at=datetime(2026, 1, 1))  # naive datetimes are refused


def test_segment_and_tag_mutations_bump_updated() -> None:
    clock = Clock()
    acc = Account(clock=clock, seed=2)
    tag = acc.create_tag("Loyalty")
    assert str(uuid.UUID(tag)) == tag and uuid.UUID(tag).version == 4
    sid = acc.create_segment("VIP", is_starred=True, tag_ids=[tag])
    assert re.fullmatch(r"[A-Za-z0-9]{6}", sid)
    assert acc.segments()[sid]["created"] == acc.segments()[sid]["updated"] == T0
    steps = [
        lambda: acc.rename_segment(sid, "VIP 2"),
        lambda: acc.set_processing(sid, True),
        lambda: acc.set_active(sid, False),
        lambda: acc.set_starred(sid, False),
        lambda: acc.untag_segment(sid, tag),
        lambda: acc.tag_segment(sid, tag),
    ]
    for i, step in enumerate(steps, start=1):
        clock.now = T0 + timedelta(minutes=i)
        step()
        assert acc.segments()[sid]["updated"] == clock.now
    attrs = acc.segments()[sid]
    assert (attrs["name"], attrs["is_processing"], attrs["is_active"], attrs["is_starred"]) == (
        "VIP 2",
        True,
        False,
        False,
    )
    acc.rename_tag(tag, "Loyal")
    assert acc.tags() == {tag: "Loyal"} and acc.segment_tags() == {(sid, tag)}
    acc.delete_tag(tag)
    assert acc.tags() == {} and acc.segment_tags() == set()
    acc.delete_segment(sid)
    assert acc.segments() == {} and acc.memberships() == {}


def test_profiles_and_ground_truth_are_copies() -> None:
    clock = Clock()
    acc = Account(clock=clock, seed=3)
    pid = acc.add_profile(
        email="x@example.com", properties={"nested": {"a": [1]}}, location={"city": "Boston"}
    )
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", pid)
    snapshot = acc.profiles()
    snapshot[pid]["properties"]["nested"]["a"].append(2)
    assert acc.profiles()[pid]["properties"] == {"nested": {"a": [1]}}
    assert acc.profiles()[pid]["location"]["city"] == "Boston"
    assert acc.profiles()[pid]["location"]["latitude"] is None
    clock.now = T0 + timedelta(days=1)
    acc.update_profile(pid, first_name="Ana")
    assert (
        acc.profiles()[pid]["updated"] == clock.now and acc.profiles()[pid]["first_name"] == "Ana"
    )
    with pytest.raises(TypeError):
        acc.add_profile(shoe_size=42)
    assert acc.now() == clock.now


def test_concurrent_mutation_is_safe() -> None:
    acc = Account(seed=4)
    sid = acc.create_segment("S")
    pids = [acc.add_profile(email=f"p{i}@example.com") for i in range(200)]

    def worker(chunk: list[str]) -> None:
        for pid in chunk:
            acc.join(sid, pid)
            acc.update_profile(pid, title="t")

    threads = [threading.Thread(target=worker, args=(pids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acc.profile_count(sid) == 200


def test_generator_is_deterministic_and_realistic() -> None:
    now = datetime(2026, 11, 20, tzinfo=timezone.utc)
    a = generate_account(seed=21, segments=12, tags=8, profiles=1500, memberships=4500, now=now)
    b = generate_account(seed=21, segments=12, tags=8, profiles=1500, memberships=4500, now=now)
    assert a.segments() == b.segments() and a.memberships() == b.memberships()
    assert a.profiles() == b.profiles() and a.tags() == b.tags()
    c = generate_account(seed=22, segments=12, tags=8, profiles=1500, memberships=4500, now=now)
    assert set(c.profiles()) != set(a.profiles())

    segs = a.segments()
    sizes = {s: a.profile_count(s) for s in segs}
    assert len(segs) == 12 and len(a.tags()) == 8 and len(a.profiles()) == 1500
    assert sum(sizes.values()) == 4500
    assert sum(1 for n in sizes.values() if n == 0) >= 1
    top = sorted(sizes.values(), reverse=True)
    assert top[0] + top[1] > 4500 / 2  # one or two large segments hold most memberships
    assert any(not s["is_active"] for s in segs.values())
    assert any(s["is_starred"] for s in segs.values())
    assert sum(s["is_processing"] for s in segs.values()) == 1
    tagged = {s for s, _ in a.segment_tags()}
    assert tagged and tagged != set(segs)
    for s in segs.values():
        assert s["created"] <= s["updated"] <= now
        assert s["definition"]["condition_groups"][0]["conditions"][0]["type"].startswith(
            "profile-"
        )

    joins = [t for members in a.memberships().values() for t in members.values()]
    assert max(joins) < now and max(joins) > now - timedelta(days=4)
    assert min(joins) < now - timedelta(days=600)
    biggest = max(sizes, key=lambda s: sizes[s])
    groups = [n for n in Counter(a.members(biggest).values()).values() if n > 1]
    assert sum(1 for n in groups if 150 <= n <= 400) >= 2
    per_profile = Counter(p for members in a.memberships().values() for p in members)
    assert max(per_profile.values()) >= 4


def test_generated_profiles_are_messy_like_real_ones() -> None:
    acc = generate_account(seed=5, segments=3, tags=2, profiles=600, memberships=600)
    profiles = list(acc.profiles().values())
    assert all(
        p["phone_number"] is None or re.fullmatch(r"\+\d{8,15}", p["phone_number"])
        for p in profiles
    )
    locations = [p["location"] for p in profiles]
    assert any(all(v is None for v in loc.values()) for loc in locations)
    assert any(isinstance(loc["latitude"], str) for loc in locations)
    assert any(isinstance(loc["latitude"], float) for loc in locations)
    text = repr([p["properties"] for p in profiles])
    assert "🎉" in text and "寿司" in text and "None" in text
    kinds: set[type[Any]] = {type(v) for p in profiles for v in p["properties"].values()}
    assert {dict, list, int, float, bool, str, type(None)} <= kinds
    assert any(p["predictive_analytics"]["historic_clv"] is None for p in profiles)
    assert any(
        isinstance(p["predictive_analytics"]["ranked_channel_affinity"], list) for p in profiles
    )
    consents = {p["subscriptions"]["email"]["marketing"]["consent"] for p in profiles}
    assert consents == {"SUBSCRIBED", "UNSUBSCRIBED", "NEVER_SUBSCRIBED"}
    assert any(p["email"] is None for p in profiles)
    names = {p["first_name"] for p in profiles}
    assert "娜" in names and "Zoë" in names
