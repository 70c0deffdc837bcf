"""A run's numbering of profiles, in memory and then in SQLite: numbers count up in the order
ids first come, every id of every form has its own wherever it is kept, and closing drops them
all."""

import os
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List

import pytest

from klaviyo_source import profile_numbers
from klaviyo_source.profile_ids import ulid_key, ulid_of
from klaviyo_source.profile_numbers import ProfileNumbers
from klaviyo_source.simulator.account import make_ulid

KLAVIYO_ID = "01GDDKASAP8TKDDA2GRZDSVP4H"  # the API reference's example


@pytest.fixture(params=[0, 2, 250_000], ids=["all-in-sqlite", "two-in-memory", "all-in-memory"])
def in_memory(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many profiles are numbered in memory before SQLite takes the rest."""
    monkeypatch.setattr(profile_numbers, "IN_MEMORY_PROFILES", request.param)
    return int(request.param)


def ulids(count: int, seed: int = 1) -> List[str]:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [make_ulid(start + timedelta(milliseconds=i // 3), rng) for i in range(count)]


def test_numbers_count_up_in_the_order_ids_first_come(in_memory: int) -> None:
    a, b, c = ulids(3)
    numbers = ProfileNumbers()
    assert numbers.find([a, b]) == [None, None]
    assert numbers.number([a, b, a]) == [(0, True), (1, True), (0, False)]
    assert numbers.number([c, b]) == [(2, True), (1, False)]
    assert numbers.find([c, a, "missing"]) == [2, 0, None]
    assert len(numbers) == 3


def test_ids_of_any_form_each_have_their_own_number(in_memory: int) -> None:
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


def test_many_pages_of_ids_keep_their_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """More ids than SQLite's page cache holds, beyond a few thousand in memory, listed again
    in another order."""
    monkeypatch.setattr(profile_numbers, "IN_MEMORY_PROFILES", 5_000)
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


def test_closing_drops_every_number(in_memory: int) -> None:
    a, b = ulids(2, seed=3)
    numbers = ProfileNumbers()
    numbers.number([a, b])

    numbers.close()

    assert len(numbers) == 0
    assert numbers.find([a, b]) == [None, None]
    assert numbers.number([b]) == [(0, True)]


FULL_DISK_CASE = """
import resource, signal
from klaviyo_source import profile_numbers
from klaviyo_source.errors import ScratchFileError
from klaviyo_source.profile_numbers import ProfileNumbers
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
profile_numbers.IN_MEMORY_PROFILES = 0
numbers = ProfileNumbers()
try:
    for start in range(0, 300_000, 100):
        numbers.number([f"profile-{i}" for i in range(start, start + 100)])
except ScratchFileError as error:
    print(error)
else:
    print("numbered everything")
"""


def test_a_temporary_file_that_cannot_grow_fails_with_the_folder_to_move_it_to(
    tmp_path: Path,
) -> None:
    """The numbers outgrow SQLite's cache into a file of at most 256 KB, as on a full disk."""
    environment = {**os.environ, "TMPDIR": str(tmp_path), "SQLITE_TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CASE],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith("This run's temporary file of listed profiles failed (")
    assert "point one of them at a writable folder" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # SQLite's file is gone with the process
