"""Scenarios shared by the tests and the concurrency soak: which segments a test changes, an
account changed in every way a run must notice, and the check that a run recorded each change
exactly."""

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional, Sequence, Set, Tuple

import dlt
from expected import (
    loaded_memberships,
    loaded_profiles,
    member_ids,
    query,
    true_memberships,
    true_profiles,
    utc,
)

from klaviyo_source.simulator import Account, generate_account

Key = Tuple[str, str]  # (segment id, profile id)


def largest_segment(account: Account) -> str:
    return max(account.memberships().items(), key=lambda item: len(item[1]))[0]


def settled_segments(account: Account) -> List[str]:
    """Segments with members that are not processing (so their leaves are looked for),
    largest first."""
    segments = account.segments()
    return sorted(
        (
            segment_id
            for segment_id, members in account.memberships().items()
            if members and not segments[segment_id]["is_processing"]
        ),
        key=lambda segment_id: (-len(account.members(segment_id)), segment_id),
    )


def sizes_as_accounts_have_them(segments: int, largest: int, smallest: int = 5) -> List[int]:
    """Segment sizes with a long tail: the n-th largest holds 1/n of the largest (Zipf)."""
    return [max(smallest, largest // rank) for rank in range(1, segments + 1)]


def account_of_sizes(sizes: Sequence[int], seed: int) -> Account:
    """An account with one segment of each size, every member joined days ago."""
    rng = random.Random(seed)
    account = generate_account(
        seed=seed, segments=0, tags=0, profiles=max(sizes, default=0), memberships=0
    )
    profiles = sorted(account.profiles())
    joined_at = account.now().replace(microsecond=0) - timedelta(days=2)
    for index, size in enumerate(sizes):
        segment_id = account.create_segment(f"Segment {index + 1}")
        for rank, profile_id in enumerate(rng.sample(profiles, size)):
            account.join(segment_id, profile_id, at=joined_at - timedelta(minutes=rank))
    return account


def one_page_segment(account: Account, members: int = 60) -> str:
    """A new segment small enough for one page, its members joined a day ago."""
    segment_id = account.create_segment(f"{members} members")
    joined_at = account.now().replace(microsecond=0) - timedelta(days=1)
    for profile_id in sorted(account.profiles())[:members]:
        account.join(segment_id, profile_id, at=joined_at)
    return segment_id


def roomiest_segments(account: Account, count: int = 1) -> List[str]:
    """Populated segments with the most profiles not yet in them, roomiest first."""
    populated = sorted(true_memberships(account).items(), key=lambda item: len(item[1]))
    assert len(populated) >= count
    return [segment_id for segment_id, _ in populated[:count]]


def join_outsiders(
    account: Account, segment_id: str, count: int, at: Optional[datetime] = None
) -> List[str]:
    """`count` profiles not yet in the segment join it (a moment ago, unless `at`)."""
    members = account.members(segment_id)
    outsiders = [pid for pid in account.profiles() if pid not in members][:count]
    assert len(outsiders) == count, "the segment has too few outsiders for this test"
    joined = at if at is not None else account.now() - timedelta(seconds=2)
    for profile_id in outsiders:
        account.join(segment_id, profile_id, at=joined)
    return outsiders


@dataclass
class Changes:
    """What changed in the account between two runs, to check the next run against."""

    left: Set[Key]
    rejoined: Set[Key]
    deleted_segment: str
    deleted_members: Set[str]


def first_seen_at(pipeline: dlt.Pipeline) -> Dict[Key, datetime]:
    rows = query(
        pipeline,
        "SELECT segment_id, profile_id, first_seen_at FROM segment_memberships WHERE is_member",
    )
    return {(segment_id, profile_id): utc(seen) for segment_id, profile_id, seen in rows}


def change_account(account: Account, rng: random.Random, delete: bool) -> Changes:
    """Leaves, joins and re-joins in every settled segment with members (a processing one is
    reconciled once it settles), and profile edits; with `delete`, one segment deleted."""
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
    joined: Set[str] = set()
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
                joined.add(profile_id)
    rejoining = {profile_id for _, profile_id in rejoined}
    edit_profiles(account, rng, rejoining, rejoining | joined)
    return Changes(left, rejoined, deleted, deleted_members)


def edit_profiles(
    account: Account, rng: random.Random, rejoining: Set[str], listed: Set[str]
) -> None:
    """Edit held profiles that re-join (the next run's walks list them too: a walk or the
    refresh writes the row, whichever comes first), members no walk lists (`listed` are
    those a walk does; only the refresh sees the others) and profiles in no segment (kept out
    of `profiles`)."""
    members = member_ids(account)
    quiet = sorted(members - listed)
    outside = sorted(set(account.profiles()) - members)
    edited = set(rng.sample(sorted(rejoining), min(4, len(rejoining))))
    edited |= set(rng.sample(quiet, min(8, len(quiet))))
    edited |= set(rng.sample(outside, min(2, len(outside))))
    for profile_id in sorted(edited):
        tag = rng.randrange(10**6)
        account.update_profile(
            profile_id,
            email=f"edited.{tag}@example.com",
            last_name=f"Edited {tag}",
            location={"city": f"City {tag}", "latitude": rng.uniform(-60, 60)},
            properties={"edit": tag},
        )


def assert_run_was_exact(
    pipeline: dlt.Pipeline,
    account: Account,
    before: Dict[Key, datetime],
    changes: Changes,
) -> None:
    """The run's tables equal the truth, and every change left its history behind."""
    assert loaded_memberships(pipeline) == true_memberships(account)
    # A member that did not change keeps the first sighting of its membership.
    first_seen = first_seen_at(pipeline)
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
    assert_profiles_are_current(pipeline, account)


def assert_profiles_are_current(pipeline: dlt.Pipeline, account: Account) -> None:
    """Every current member's profile row holds Klaviyo's attributes now; one row a profile,
    and none of a profile that never was a member."""
    members = member_ids(account)
    loaded = loaded_profiles(pipeline)
    assert {pid: loaded.get(pid) for pid in members} == true_profiles(account, members)
    assert query(pipeline, "SELECT id FROM profiles GROUP BY id HAVING COUNT(*) > 1") == []
    ever_members = {
        pid for (pid,) in query(pipeline, "SELECT DISTINCT profile_id FROM segment_memberships")
    }
    assert set(loaded) <= ever_members
