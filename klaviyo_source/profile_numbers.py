"""Each profile's number in this run: the first quarter million in memory, the rest in a
temporary SQLite database.

A run numbers every profile it lists (`members_this_run`), and the numbering grows with the
account: 2.5M profiles took 65 MB even packed in memory (`profile_ids.ProfileIdMap`), the
one part of a 10M export's peak that still grew with it. In SQLite the numbers live in a
file (about 27 bytes a profile) that the operating system caches for the process, which
holds only SQLite's page cache (2 MB). SQLite costs CPU, though: several µs a listing in a
busy export against about 2 in memory (docs/performance.md, "Memory at 10M"), so an account
pays it only past its first `IN_MEMORY_PROFILES` profiles, which take about 7 MB.

The database is SQLite's temporary one: a file created only once the cache overflows, in
`SQLITE_TMPDIR`, else `TMPDIR`, else /var/tmp or /tmp, and unlinked as soon as it is opened,
so nothing is left behind however the process ends. It is written in one transaction that is
never committed, since nothing in it outlives the run.

Not thread-safe: its owner locks around it.
"""

import contextlib
import sqlite3
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import ScratchFileError
from .profile_ids import ProfileIdMap, ulid_key

# Profiles numbered in memory before SQLite takes the rest: about 7 MB (27 bytes each), and
# the CPU SQLite costs is paid only by larger accounts.
IN_MEMORY_PROFILES = 250_000
# Ids looked up or numbered in one statement: a page of members. SQLite keeps each
# statement's compiled form, one for each length up to this.
_IDS_A_STATEMENT = 100
# No canonical ULID's key is longer than 16 bytes, and any other id's is: it starts with
# these 17 bytes, so no two ids share a key whatever their form.
_OTHER_ID_MARK = bytes(17)


def _key(profile_id: str) -> bytes:
    """The id as the database keeps it: a canonical ULID as its 16 bytes, any other id
    marked (its UTF-8, lone surrogates kept, so that every string has a key of its own)."""
    return ulid_key(profile_id) or _OTHER_ID_MARK + profile_id.encode("utf-8", "surrogatepass")


class ProfileNumbers:
    """Profile id -> its number: 0, 1, 2, … in the order the ids first came.

    The first `IN_MEMORY_PROFILES` ids are numbered in memory, the rest in SQLite.
    """

    def __init__(self) -> None:
        self._in_memory = IN_MEMORY_PROFILES
        self._memory = ProfileIdMap("I")
        self._database: Optional[sqlite3.Connection] = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def number(self, profile_ids: Sequence[str]) -> List[Tuple[int, bool]]:
        """Each id's number, and whether it got it just now (an id twice gets it once)."""
        known = self._numbers_of(profile_ids)
        numbered: List[Tuple[int, bool]] = []
        spilled: List[Union[bytes, int]] = []
        for profile_id in profile_ids:
            number = known.get(profile_id)
            if number is not None:
                numbered.append((number, False))
                continue
            number = known[profile_id] = self._count
            self._count += 1
            if len(self._memory) < self._in_memory:
                self._memory.set(profile_id, number)
            else:
                spilled += (_key(profile_id), number)
            numbered.append((number, True))
        for start in range(0, len(spilled), 2 * _IDS_A_STATEMENT):
            rows = spilled[start : start + 2 * _IDS_A_STATEMENT]
            values = ",".join(["(?,?)"] * (len(rows) // 2))
            with _named_failures():
                self._opened().execute(f"INSERT INTO numbers VALUES {values}", rows)
        return numbered

    def find(self, profile_ids: Sequence[str]) -> List[Optional[int]]:
        """Each id's number, None for an id that has none."""
        known = self._numbers_of(profile_ids)
        return [known.get(profile_id) for profile_id in profile_ids]

    def close(self) -> None:
        """Drop every number; the file goes with the connection."""
        if self._database is not None:
            self._database.close()
        self._database = None
        self._memory = ProfileIdMap("I")
        self._count = 0

    def _numbers_of(self, profile_ids: Sequence[str]) -> Dict[str, int]:
        """The numbers of those ids that have one."""
        known: Dict[str, int] = {}
        elsewhere: List[str] = []
        for profile_id in profile_ids:
            number = self._memory.get(profile_id)
            if number is None:
                elsewhere.append(profile_id)
            else:
                known[profile_id] = number
        if self._database is not None:
            for start in range(0, len(elsewhere), _IDS_A_STATEMENT):
                some = elsewhere[start : start + _IDS_A_STATEMENT]
                numbers = self._spilled_numbers([_key(profile_id) for profile_id in some])
                known.update(
                    (profile_id, number)
                    for profile_id, number in zip(some, numbers, strict=True)
                    if number is not None
                )
        return known

    def _spilled_numbers(self, keys: List[bytes]) -> Sequence[Optional[int]]:
        """The number of each key in SQLite, or None.

        One row whose columns are the keys' numbers: each row a statement yields, like each
        statement, releases Python's GIL to the threads waiting for it.
        """
        lookups = ",".join(["(SELECT number FROM numbers WHERE key = ?)"] * len(keys))
        with _named_failures():
            (numbers,) = self._opened().execute(f"SELECT {lookups}", keys).fetchall()
        return numbers  # type: ignore[no-any-return]

    def _opened(self) -> sqlite3.Connection:
        if self._database is None:
            with _named_failures():
                self._database = _temporary_database()
        return self._database


def _temporary_database() -> sqlite3.Connection:
    # "" is SQLite's temporary database. Walks run in worker threads: the owner's lock
    # serializes every use, as check_same_thread=False requires.
    database = sqlite3.connect(
        "",
        isolation_level=None,
        check_same_thread=False,
        cached_statements=2 * _IDS_A_STATEMENT + 8,  # a lookup and an insert of each length
    )
    database.execute("PRAGMA journal_mode = OFF")
    database.execute("PRAGMA synchronous = OFF")
    database.execute(
        "CREATE TABLE numbers (key BLOB PRIMARY KEY, number INTEGER NOT NULL) WITHOUT ROWID"
    )
    # Committing the numbers would only write them out sooner: nothing outlives the run. One
    # open transaction measured a sixth faster than one for each page.
    database.execute("BEGIN")
    return database


@contextlib.contextmanager
def _named_failures() -> Iterator[None]:
    """SQLite's own errors (a full disk, an unwritable temporary folder) as one that says where
    the file is kept and how to move it."""
    try:
        yield
    except sqlite3.OperationalError as error:
        raise ScratchFileError(str(error)) from error
