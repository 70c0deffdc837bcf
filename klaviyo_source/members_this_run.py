"""Which members this run has already listed, across its parallel segment walks.

A load holds each key at most once, so the destination need not deduplicate it: that
deduplication is a window over every staged row, and at a million memberships it was half of
the load's time and most of DuckDB's memory. A profile in twenty segments is listed twenty
times and its profile row loaded once; a member listed twice in one walk (it re-joined while
the walk ran) is loaded once.

Each profile id gets a number of its own (`profile_numbers`: in memory for a run's first 250,000
profiles, off the heap in a temporary SQLite database past them); each segment keeps the numbers
of its members in a Roaring bitmap, at most 2 bytes a membership. A dict of profile ids to
segment bits, and later the ids packed in memory, grew with the account far more
(docs/performance.md, "Memory at 10M").

The profile refresh (`profile_refresh`) writes profile rows too. It claims a profile's row
here before writing it, which gives the profile a number in no segment: a profile a walk
listed first is left to the walk, and a walk that lists a claimed profile writes its
membership but not its profile row. Either way one load holds each profile row once.

The record is needed only while the run extracts; `end` drops it before the load, so the
memory it took serves normalize and load (see `run.runs_started`).
"""

import enum
import threading
from typing import Dict, List, Sequence

from pyroaring import BitMap

from .profile_numbers import ProfileNumbers


class Sighting(enum.Enum):
    """What listing one member means for this run."""

    REPEAT = "listed before in this segment"
    NEW_MEMBERSHIP = "first listing in this segment of a profile listed in another"
    NEW_PROFILE = "first listing of the profile in this run"


class MembersThisRun:
    """The members each segment walk of this run listed; safe to share between threads.

    A profile has a number from its first listing, or from the profile refresh's claim: a
    profile with a number has its row written in this run.
    """

    def __init__(self) -> None:
        self._numbers = ProfileNumbers()
        self._segment_members: Dict[str, BitMap] = {}
        self._ended = False
        self._lock = threading.Lock()

    def end(self) -> None:
        """Drop the record: the run's extract is over. Any later use raises, since an empty
        record would take every member for new and load it twice."""
        with self._lock:
            self._ended = True
            self._numbers.close()
            self._segment_members = {}

    def _check_running(self) -> None:
        if self._ended:
            raise RuntimeError("this run's record of listed members was used after its extract")

    def sight(self, segment_id: str, profile_ids: Sequence[str]) -> List[Sighting]:
        """Mark these members of `segment_id` listed; say for each what it was before."""
        with self._lock:
            self._check_running()
            members = self._segment_members.setdefault(segment_id, BitMap())
            sightings = []
            for number, new in self._numbers.number(profile_ids):
                if new:
                    sightings.append(Sighting.NEW_PROFILE)
                elif number in members:
                    sightings.append(Sighting.REPEAT)
                    continue
                else:
                    sightings.append(Sighting.NEW_MEMBERSHIP)
                members.add(number)
            return sightings

    def listed_in(self, segment_id: str, profile_ids: Sequence[str]) -> List[bool]:
        """Whether each member of `segment_id` was listed in this run."""
        with self._lock:
            self._check_running()
            members = self._segment_members.get(segment_id)
            if members is None:
                return [False] * len(profile_ids)
            numbers = self._numbers.find(profile_ids)
            return [number is not None and number in members for number in numbers]

    def claim_profiles(self, profile_ids: Sequence[str]) -> List[bool]:
        """For the profile refresh: whether each profile's row is still to be written in
        this run, claiming it if so. A profile a walk listed, or claimed before, is not."""
        with self._lock:
            self._check_running()
            return [new for _, new in self._numbers.number(profile_ids)]
