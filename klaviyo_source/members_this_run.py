"""Which members this run has already listed, across its parallel segment walks.

A load holds each key at most once, so the destination need not deduplicate it: that
deduplication is a window over every staged row, and at a million memberships it was half of
the load's time and most of DuckDB's memory. A profile in twenty segments is listed twenty
times and its profile row loaded once; a member listed twice in one walk (it re-joined while
the walk ran) is loaded once.

Each profile id is kept once, with one bit for every segment it was listed in: about 150
bytes a profile, where a set of ids per segment walk cost about 115 bytes a membership.

The profile refresh (`profile_refresh`) writes profile rows too. It claims a profile's row
here, with a bit of its own, before writing it: a profile a walk listed first is left to the
walk, and a walk that lists a claimed profile writes its membership but not its profile row.
Either way one load holds each profile row once.
"""

import enum
import threading
from typing import Dict, List, Sequence


class Sighting(enum.Enum):
    """What listing one member means for this run."""

    REPEAT = "listed before in this segment"
    NEW_MEMBERSHIP = "first listing in this segment of a profile listed in another"
    NEW_PROFILE = "first listing of the profile in this run"


# The bit of a profile whose row the profile refresh wrote; segments take the bits above it.
_REFRESHED = 1


class MembersThisRun:
    """The members each segment walk of this run listed; safe to share between threads."""

    def __init__(self) -> None:
        self._segment_bits: Dict[str, int] = {}
        self._profile_segments: Dict[str, int] = {}  # profile id -> bits of its segments
        self._lock = threading.Lock()

    def sight(self, segment_id: str, profile_ids: Sequence[str]) -> List[Sighting]:
        """Mark these members of `segment_id` listed; say for each what it was before."""
        with self._lock:
            bit = self._bit(segment_id)
            sightings = []
            for profile_id in profile_ids:
                segments = self._profile_segments.get(profile_id, 0)
                if segments & bit:
                    sightings.append(Sighting.REPEAT)
                    continue
                self._profile_segments[profile_id] = segments | bit
                sightings.append(Sighting.NEW_MEMBERSHIP if segments else Sighting.NEW_PROFILE)
            return sightings

    def listed_in(self, segment_id: str, profile_ids: Sequence[str]) -> List[bool]:
        """Whether each member of `segment_id` was listed in this run."""
        with self._lock:
            bit = self._bit(segment_id)
            return [bool(self._profile_segments.get(pid, 0) & bit) for pid in profile_ids]

    def claim_profiles(self, profile_ids: Sequence[str]) -> List[bool]:
        """For the profile refresh: whether each profile's row is still to be written in
        this run, claiming it if so. A profile a walk listed, or claimed before, is not."""
        with self._lock:
            claimed = []
            for profile_id in profile_ids:
                free = profile_id not in self._profile_segments
                if free:
                    self._profile_segments[profile_id] = _REFRESHED
                claimed.append(free)
            return claimed

    def _bit(self, segment_id: str) -> int:
        bit = self._segment_bits.get(segment_id)
        if bit is None:
            bit = self._segment_bits[segment_id] = _REFRESHED << (len(self._segment_bits) + 1)
        return bit
