"""A run's numbering of profiles, kept in SQLite: numbers count up in the order ids first come,
every id of every form has its own, and closing drops them all."""

import random
from datetime import datetime, timedelta, timezone
from typing import List

from klaviyo_source.profile_ids import ulid_key, ulid_of
from klaviyo_source.profile_numbers import ProfileNumbers
from klaviyo_source.simulator.account import make_ulid

KLAVIYO_ID = "01GDDKASAP8TKDDA2GRZDSVP4H"  # the API reference's example


def ulids(count: int, seed: int = 1) -> List[str]:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [make_ulid(start + timedelta(milliseconds=i // 3), rng) for i in range(count)]


def test_numbers_count_up_in_the_order_ids_first_come() -> None:
    a, b, c = ulids(3)
    numbers = ProfileNumbers()
    assert numbers.find([a, b]) == [None, None]
    assert numbers.number([a, b, a]) == [(0, True), (1, True), (0, False)]
    assert numbers.number([c, b]) == [(2, True), (1, False)]
    assert numbers.find([c, a, "missing"]) == [2, 0, None]
    assert len(numbers) == 3


def test_ids_of_any_form_each_have_their_own_number() -> None:
    # A 16-character id whose UTF-8 is a ULID's 16 key bytes must not be taken for that ULID.
    lookalike = "ABCDEFGHIJKLMNOP"
    ulid = ulid_of(lookalike.encode())
    assert ulid_key(ulid) == lookalike.encode()
    others = [
        lookalike,
        KLAVIYO_ID.lower(),
        KLAVIYO_ID[:-1],
        "8" + KLAVIYO_ID[1:],
        "P1",
        "",
        "é",
        "\ud800",  # a lone surrogate, which a JSON decoder may let through
        "\x00" * 17,
    ]
    ids = [KLAVIYO_ID, ulid, *others]
    numbers = ProfileNumbers()

    assert numbers.number(ids) == [(n, True) for n in range(len(ids))]
    assert numbers.find(list(reversed(ids))) == list(reversed(range(len(ids))))


def test_many_pages_of_ids_keep_their_numbers() -> None:
    """More ids than SQLite's page cache holds, listed again in another order."""
    ids = ulids(100_000, seed=5)  # about 2.7 MB of pages against a cache of 2
    numbers = ProfileNumbers()
    for start in range(0, len(ids), 100):
        numbered = numbers.number(ids[start : start + 100])
        assert numbered == [(start + i, True) for i in range(len(numbered))]
    order = list(range(len(ids)))
    random.Random(6).shuffle(order)
    again = numbers.number([ids[i] for i in order])
    assert again == [(i, False) for i in order]
    assert numbers.find(ids[:250]) == list(range(250))


def test_closing_drops_every_number() -> None:
    a, b = ulids(2, seed=3)
    numbers = ProfileNumbers()
    numbers.number([a, b])

    numbers.close()

    assert len(numbers) == 0
    assert numbers.find([a, b]) == [None, None]
    assert numbers.number([b]) == [(0, True)]
