"""The compact maps keyed by profile ids: every id told apart exactly, whatever its form, and
every join time given back equal and alike."""

import random
import struct
from datetime import datetime, timedelta, timezone
from typing import Dict, List
from zoneinfo import ZoneInfo

import pytest

from klaviyo_source.profile_ids import JoinedTimes, ProfileIdMap, ulid_key, ulid_of
from klaviyo_source.simulator.account import make_ulid

KLAVIYO_ID = "01GDDKASAP8TKDDA2GRZDSVP4H"  # the API reference's example


def ulids(count: int, seed: int = 1) -> List[str]:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [make_ulid(start + timedelta(milliseconds=i // 3), rng) for i in range(count)]


def test_a_ulid_is_kept_as_16_bytes_that_give_back_the_same_id() -> None:
    for profile_id in [KLAVIYO_ID, "00000000000000000000000000", "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"]:
        key = ulid_key(profile_id)
        assert key is not None and len(key) == 16
        assert ulid_of(key) == profile_id
    assert ulid_key("00000000000000000000000000") == bytes(16)
    assert ulid_key("7ZZZZZZZZZZZZZZZZZZZZZZZZZ") == b"\xff" * 16
    keys = {ulid_key(profile_id) for profile_id in ulids(5000)}
    assert len(keys) == 5000


@pytest.mark.parametrize(
    "profile_id",
    [
        KLAVIYO_ID.lower(),  # another string, though Crockford would read it alike
        KLAVIYO_ID[:-1],
        KLAVIYO_ID + "0",
        "8" + KLAVIYO_ID[1:],  # 130 bits
        KLAVIYO_ID[:5] + "I" + KLAVIYO_ID[6:],  # letters Crockford leaves out
        KLAVIYO_ID[:5] + "U" + KLAVIYO_ID[6:],
        KLAVIYO_ID[:5] + "_" + KLAVIYO_ID[6:],  # int() would skip an underscore
        KLAVIYO_ID[:5] + " " + KLAVIYO_ID[6:],
        KLAVIYO_ID[:5] + "é" + KLAVIYO_ID[6:],
        "P1",
        "",
    ],
)
def test_an_id_of_any_other_form_is_kept_as_it_is(profile_id: str) -> None:
    assert ulid_key(profile_id) is None
    numbers = ProfileIdMap("I")
    numbers.set(KLAVIYO_ID, 1)
    numbers.set(profile_id, 2)
    assert numbers.get(profile_id) == 2 and numbers.get(KLAVIYO_ID) == 1
    assert len(numbers) == 2 and sorted(numbers) == sorted([KLAVIYO_ID, profile_id])
    assert numbers.pop(profile_id) == 2 and profile_id not in numbers


def test_the_map_agrees_with_a_dict_through_growth_and_removals() -> None:
    rng = random.Random(7)
    canonical = ulids(6000)
    others = [f"custom-{i}" for i in range(300)] + [pid.lower() for pid in canonical[:300]]
    ids = canonical + others
    rng.shuffle(ids)
    numbers = ProfileIdMap("I")
    model: Dict[str, int] = {}
    for step in range(40_000):
        profile_id = rng.choice(ids)
        action = rng.random()
        if action < 0.6:
            value = rng.randrange(2**32)
            numbers.set(profile_id, value)
            model[profile_id] = value
        elif action < 0.8:
            assert numbers.pop(profile_id) == model.pop(profile_id, None)
        else:
            assert numbers.get(profile_id) == model.get(profile_id)
            assert (profile_id in numbers) == (profile_id in model)
        if step % 5000 == 0:
            assert len(numbers) == len(model)
    assert len(numbers) == len(model)
    assert sorted(numbers) == sorted(model)
    assert all(numbers.get(profile_id) == value for profile_id, value in model.items())


def test_bytes_that_straddle_two_entries_are_no_entry() -> None:
    """A bucket is entries back to back: the end of one key, its value and the start of the
    next key read as 16 bytes may be the key of an id that is not there."""
    numbers = ProfileIdMap("I")
    first, second = ulids(2, seed=3)
    numbers.set(first, 0x01020304)
    numbers.set(second, 0x05060708)
    first_key, second_key = ulid_key(first), ulid_key(second)
    assert first_key is not None and second_key is not None
    straddling = ulid_of(first_key[8:] + struct.pack("<I", 0x01020304) + second_key[:4])
    assert straddling not in numbers and numbers.get(straddling) is None
    assert numbers.pop(straddling) is None and len(numbers) == 2
    numbers.set(straddling, 9)
    assert numbers.get(straddling) == 9
    assert numbers.get(first) == 0x01020304 and numbers.get(second) == 0x05060708


def test_a_map_of_64_bit_values_keeps_them_whole() -> None:
    micros = ProfileIdMap("q")
    for i, profile_id in enumerate(ulids(100)):
        micros.set(profile_id, (-1) ** i * (2**62 + i))
    assert [micros.get(pid) for pid in ulids(100)] == [(-1) ** i * (2**62 + i) for i in range(100)]


def test_join_times_come_back_equal_and_alike() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    utc = datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
    times = {
        "01HQ00000000000000000000A0": utc,
        "01HQ00000000000000000000A1": datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=timezone.utc),
        "01HQ00000000000000000000A2": utc.astimezone(berlin),  # another zone object
        "01HQ00000000000000000000A3": datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=berlin),
        "01HQ00000000000000000000A4": datetime(2024, 3, 1, 12, 30),  # naive
        "not-a-ulid": utc + timedelta(microseconds=1),
    }
    joined = JoinedTimes()
    for profile_id, when in times.items():
        joined[profile_id] = when
    assert joined == times and len(joined) == len(times)
    for profile_id, when in times.items():
        kept = joined[profile_id]
        assert (kept, kept.tzinfo, kept.fold, kept.utcoffset()) == (
            when,
            when.tzinfo,
            when.fold,
            when.utcoffset(),
        )
    assert sorted(joined) == sorted(times)
    assert joined.pop("01HQ00000000000000000000A0") == utc
    assert "01HQ00000000000000000000A0" not in joined and len(joined) == len(times) - 1
    with pytest.raises(KeyError):
        joined.pop("01HQ00000000000000000000A0")
    assert joined.pop("01HQ00000000000000000000A0", utc) is utc
    assert joined.pop("01HQ00000000000000000000A2") == times["01HQ00000000000000000000A2"]


def test_a_time_replaced_in_another_form_is_kept_once() -> None:
    joined = JoinedTimes()
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    joined[KLAVIYO_ID] = when
    joined[KLAVIYO_ID] = when.astimezone(ZoneInfo("Asia/Tokyo"))
    assert len(joined) == 1 and list(joined) == [KLAVIYO_ID]
    assert joined[KLAVIYO_ID].tzinfo == ZoneInfo("Asia/Tokyo")
    joined[KLAVIYO_ID] = when
    assert len(joined) == 1 and joined[KLAVIYO_ID].tzinfo is timezone.utc


def test_a_segment_of_members_pops_as_a_reconciliation_pops_it() -> None:
    members = ulids(3000, seed=5)
    start = datetime(2023, 5, 1, tzinfo=timezone.utc)
    times = {pid: start + timedelta(seconds=i, microseconds=i) for i, pid in enumerate(members)}
    remaining = JoinedTimes()
    for profile_id, when in times.items():
        remaining[profile_id] = when
    listed = members[::2] + ulids(50, seed=6)  # still members, and some the destination lacks
    page_joined = {pid: remaining.pop(pid) for pid in listed if pid in remaining}
    assert page_joined == {pid: times[pid] for pid in members[::2]}
    assert sorted(remaining) == sorted(members[1::2]) and len(remaining) == 1500
