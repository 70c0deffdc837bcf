"""What a run's record of listed members says, for ids of every form, and that parallel walks
and the profile refresh sharing it each get one first listing of a profile and of a
membership, however their threads interleave."""

import random
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Callable, List, Tuple

import pytest

from klaviyo_source import profile_numbers
from klaviyo_source.members_this_run import MembersThisRun, Sighting
from klaviyo_source.simulator.account import make_ulid

NEW_PROFILE, NEW_MEMBERSHIP, REPEAT = (
    Sighting.NEW_PROFILE,
    Sighting.NEW_MEMBERSHIP,
    Sighting.REPEAT,
)


@pytest.fixture(autouse=True, params=[0, 1000, None], ids=["in-sqlite", "spilled", "in-memory"])
def numbered_where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case runs with the profiles numbered in SQLite, in memory, and in both (the first
    thousand in memory)."""
    if request.param is not None:
        monkeypatch.setattr(profile_numbers, "IN_MEMORY_PROFILES", request.param)


def ulids(count: int, seed: int = 1) -> List[str]:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [make_ulid(start + timedelta(seconds=i), rng) for i in range(count)]


def test_first_listing_of_a_profile_then_of_its_memberships_then_repeats() -> None:
    a, b, c = ulids(3)
    members = MembersThisRun()
    assert members.sight("S1", [a, b, a]) == [NEW_PROFILE, NEW_PROFILE, REPEAT]
    assert members.sight("S2", [b, c]) == [NEW_MEMBERSHIP, NEW_PROFILE]
    assert members.sight("S1", [a, b, c]) == [REPEAT, REPEAT, NEW_MEMBERSHIP]
    assert members.sight("S2", [a]) == [NEW_MEMBERSHIP]
    assert members.listed_in("S1", [a, b, c]) == [True, True, True]
    assert members.listed_in("S2", [a, b, c]) == [True, True, True]
    assert members.listed_in("S3", [a, b, c]) == [False, False, False]


def test_ids_that_are_no_ulids_are_told_apart_exactly() -> None:
    (ulid,) = ulids(1)
    others = [ulid.lower(), ulid[:-1], "P1", "p1", "", "8" + ulid[1:]]
    members = MembersThisRun()
    assert members.sight("S1", [ulid, *others]) == [NEW_PROFILE] * (1 + len(others))
    assert members.sight("S1", [*others, ulid]) == [REPEAT] * (1 + len(others))
    assert members.sight("S2", others[:2]) == [NEW_MEMBERSHIP] * 2
    assert members.listed_in("S2", [ulid, *others]) == [False, True, True] + [False] * 4


def test_the_profile_refresh_claims_what_no_walk_listed_and_walks_skip_its_rows() -> None:
    listed, claimed, untouched = ulids(3, seed=2)
    members = MembersThisRun()
    members.sight("S1", [listed])
    assert members.claim_profiles([listed, claimed, claimed]) == [False, True, False]
    assert members.claim_profiles([claimed]) == [False]
    # A claimed profile's membership is loaded; its row was written by the refresh.
    assert members.sight("S1", [claimed, untouched]) == [NEW_MEMBERSHIP, NEW_PROFILE]
    assert members.sight("S1", [claimed]) == [REPEAT]
    assert members.claim_profiles([untouched]) == [False]


def test_a_claim_alone_lists_the_profile_in_no_segment() -> None:
    (claimed,) = ulids(1, seed=4)
    members = MembersThisRun()
    assert members.claim_profiles([claimed]) == [True]
    members.sight("S1", [])
    assert members.listed_in("S1", [claimed]) == [False]


def _in_parallel(jobs: List[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_parallel_walks_and_a_refresh_get_one_first_listing_each() -> None:
    """Five walks over overlapping segments, each listing its pages twice (re-joins while it
    runs), and a refresh claiming profiles meanwhile: each profile is first met once, by a walk
    or by the refresh, and each membership is first listed once."""
    rng = random.Random(11)
    profiles = ulids(4000, seed=9) + [f"custom-{i}" for i in range(200)]
    segments = {f"S{k}": rng.sample(profiles, 1500) for k in range(5)}
    seen: List[Tuple[str, str, Sighting]] = []
    claims: List[Tuple[str, bool]] = []
    lock = threading.Lock()
    members = MembersThisRun()

    def walk(segment_id: str) -> Callable[[], None]:
        listed = segments[segment_id] + segments[segment_id][:300]

        def run() -> None:
            for start in range(0, len(listed), 50):
                page = listed[start : start + 50]
                found = members.sight(segment_id, page)
                with lock:
                    seen.extend((segment_id, pid, s) for pid, s in zip(page, found, strict=True))

        return run

    def refresh() -> None:
        order = list(profiles)
        random.Random(12).shuffle(order)
        for start in range(0, len(order), 100):
            page = order[start : start + 100]
            with lock:
                claims.extend(zip(page, members.claim_profiles(page), strict=True))

    _in_parallel([walk(segment_id) for segment_id in segments] + [refresh])

    firsts = Counter(pid for _, pid, s in seen if s is NEW_PROFILE)
    firsts.update(pid for pid, claimed in claims if claimed)
    assert firsts == Counter(profiles)
    memberships = Counter((sid, pid) for sid, pid, s in seen if s is not REPEAT)
    assert memberships == Counter((sid, pid) for sid, ids in segments.items() for pid in ids)
    assert sum(1 for *_, s in seen if s is REPEAT) == 300 * len(segments)
    for segment_id, ids in segments.items():
        outsiders = [pid for pid in profiles if pid not in set(ids)]
        assert members.listed_in(segment_id, ids) == [True] * len(ids)
        assert members.listed_in(segment_id, outsiders) == [False] * len(outsiders)


def test_an_ended_record_refuses_every_use_rather_than_take_members_for_new() -> None:
    a, b = ulids(2)
    members = MembersThisRun()
    members.sight("S1", [a])
    members.claim_profiles([b])

    members.end()

    for use in (
        lambda: members.sight("S1", [a]),
        lambda: members.listed_in("S1", [a]),
        lambda: members.claim_profiles([b]),
    ):
        with pytest.raises(RuntimeError, match="used after its extract"):
            use()
