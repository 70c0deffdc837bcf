"""Each profile's number in this run, kept in a temporary SQLite database rather than in memory.

A run numbers every profile it lists (`members_this_run`), and the numbering grows with the
account: 2.5M profiles took 65 MB even packed in memory (`profile_ids.ProfileIdMap`), the
one part of a 10M export's peak that still grew with it. In SQLite the numbers live in a
file that the operating system caches for the process, which holds only SQLite's page cache
(2 MB). A listing costs about a microsecond more (docs/performance.md, "Memory at 10M").

The database is SQLite's temporary one: created in the system's temporary folder (`TMPDIR`
or `SQLITE_TMPDIR`) only once the cache overflows, unlinked as soon as it is opened, so
nothing is left behind however the process ends. It is written in one transaction that is
never committed, since nothing in it outlives the run.

Not thread-safe: its owner locks around it.
"""

import sqlite3
from typing import Dict, List, Optional, Sequence, Tuple

from .profile_ids import ulid_key

# Ids looked up in one query: a page of members.
_LOOKUP_IDS = 100
# No canonical ULID's key is longer than 16 bytes, and any other id's is: it starts with
# these 17 bytes, so no two ids share a key whatever their form.
_OTHER_ID_MARK = bytes(17)


def _key(profile_id: str) -> bytes:
    """The id as the database keeps it: a canonical ULID as its 16 bytes, any other id
    marked (its UTF-8, lone surrogates kept, so that every string has a key of its own)."""
    return ulid_key(profile_id) or _OTHER_ID_MARK + profile_id.encode("utf-8", "surrogatepass")


class ProfileNumbers:
    """Profile id -> its number: 0, 1, 2, … in the order the ids first came."""

    def __init__(self) -> None:
        self._database: Optional[sqlite3.Connection] = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def number(self, profile_ids: Sequence[str]) -> List[Tuple[int, bool]]:
        """Each id's number, and whether it got it just now (an id twice gets it once)."""
        keys = [_key(profile_id) for profile_id in profile_ids]
        known = self._numbers_of(keys)
        numbered: List[Tuple[int, bool]] = []
        new_rows: List[Tuple[bytes, int]] = []
        for key in keys:
            number = known.get(key)
            if number is None:
                number = known[key] = self._count
                self._count += 1
                new_rows.append((key, number))
                numbered.append((number, True))
            else:
                numbered.append((number, False))
        if new_rows:
            self._opened().executemany("INSERT INTO numbers VALUES (?, ?)", new_rows)
        return numbered

    def find(self, profile_ids: Sequence[str]) -> List[Optional[int]]:
        """Each id's number, None for an id that has none."""
        keys = [_key(profile_id) for profile_id in profile_ids]
        known = self._numbers_of(keys)
        return [known.get(key) for key in keys]

    def close(self) -> None:
        """Drop every number; the file goes with the connection."""
        if self._database is not None:
            self._database.close()
        self._database = None
        self._count = 0

    def _numbers_of(self, keys: List[bytes]) -> Dict[bytes, int]:
        if not self._count:
            return {}
        database = self._opened()
        known: Dict[bytes, int] = {}
        for start in range(0, len(keys), _LOOKUP_IDS):
            chunk = keys[start : start + _LOOKUP_IDS]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, number FROM numbers WHERE key IN ({marks})"
            known.update(database.execute(query, chunk).fetchall())
        return known

    def _opened(self) -> sqlite3.Connection:
        if self._database is None:
            # "" is SQLite's temporary database. Walks run in worker threads: the owner's
            # lock serializes every use, as check_same_thread=False requires.
            database = sqlite3.connect("", isolation_level=None, check_same_thread=False)
            database.execute("PRAGMA journal_mode = OFF")
            database.execute("PRAGMA synchronous = OFF")
            database.execute(
                "CREATE TABLE numbers (key BLOB PRIMARY KEY, number INTEGER NOT NULL) WITHOUT ROWID"
            )
            # Committing the numbers would only write them out sooner: nothing outlives the
            # run. One open transaction measured a fifth faster than one for each page.
            database.execute("BEGIN")
            self._database = database
        return self._database
