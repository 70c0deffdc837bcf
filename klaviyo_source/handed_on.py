"""Which memberships and profiles this run has already handed to dlt, across parallel walks.

A load holds each key at most once, so the destination need not deduplicate it: that
deduplication is a window over every staged row, and at a million memberships it was half of
the load's time and most of DuckDB's memory. A profile in twenty segments is listed twenty
times and loaded once.

Each profile id is kept once, with one bit for every segment it was handed on in: about 150
bytes a profile, where a set of ids per segment walk cost about 115 bytes a membership.
"""

import enum
import threading
from typing import Dict, List, Sequence


class Take(enum.Enum):
    """What handing on one listed member means for this run."""

    REPEAT = "already handed on in this segment"
    MEMBERSHIP = "new membership of a profile already handed on"
    PROFILE = "new membership of a profile not handed on before"


class HandedOn:
    """Memberships and profiles handed on in this run; safe to share between threads."""

    def __init__(self) -> None:
        self._segment_bits: Dict[str, int] = {}
        self._profile_segments: Dict[str, int] = {}  # profile id -> bits of its segments
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._segment_bits.clear()
            self._profile_segments.clear()

    def take(self, segment_id: str, profile_ids: Sequence[str]) -> List[Take]:
        """Mark these members of `segment_id` handed on; say for each what it was before."""
        with self._lock:
            bit = self._bit(segment_id)
            taken = []
            for profile_id in profile_ids:
                segments = self._profile_segments.get(profile_id, 0)
                if segments & bit:
                    taken.append(Take.REPEAT)
                    continue
                self._profile_segments[profile_id] = segments | bit
                taken.append(Take.MEMBERSHIP if segments else Take.PROFILE)
            return taken

    def taken_in(self, segment_id: str, profile_ids: Sequence[str]) -> List[bool]:
        """Whether each member of `segment_id` was handed on in this run."""
        with self._lock:
            bit = self._bit(segment_id)
            return [bool(self._profile_segments.get(pid, 0) & bit) for pid in profile_ids]

    def _bit(self, segment_id: str) -> int:
        bit = self._segment_bits.get(segment_id)
        if bit is None:
            bit = self._segment_bits[segment_id] = 1 << len(self._segment_bits)
        return bit
