"""Klaviyo's per-account rate limits as fixed windows (burst 1 s, steady 60 s, daily 24 h).

Each request is charged to one or more buckets (its endpoint's tier plus, for costly
``additional-fields``, a bucket shared across endpoints). Window lengths are divided by
``time_scale`` so tests can trip limits quickly: with ``time_scale=60`` a 60 s window lasts 1 s.
Throttled requests are not counted.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BURST = 1.0
STEADY = 60.0
DAILY = 86400.0


@dataclass(frozen=True)
class Window:
    """A fixed window: at most ``limit`` requests per ``seconds`` (nominal, before scaling)."""

    limit: int
    seconds: float


@dataclass(frozen=True)
class Charge:
    """The windows of one bucket a request is charged to."""

    bucket: str
    windows: tuple[Window, ...]


_TIERS: dict[str, tuple[Window, ...]] = {
    "XS": (Window(1, BURST), Window(15, STEADY)),
    "S": (Window(3, BURST), Window(60, STEADY)),
    "M": (Window(10, BURST), Window(150, STEADY)),
    "XL": (Window(350, BURST), Window(3500, STEADY)),
    "WRITE": (Window(1, BURST), Window(15, STEADY), Window(100, DAILY)),
}
_LARGE = {steady: (Window(75, BURST), Window(steady, STEADY)) for steady in (700, 750)}


def tier_windows(tier: str, large_steady: int = 750) -> tuple[Window, ...]:
    """Windows of a published tier (XS, S, M, L, XL) or ``WRITE`` (1/s, 15/m, 100/d).
    ``large_steady`` is L's per-minute limit (700 before revision 2026-01-15, then 750)."""
    if tier == "L":
        found = _LARGE.get(large_steady)
        return found if found is not None else (Window(75, BURST), Window(large_steady, STEADY))
    return _TIERS[tier]


@dataclass(frozen=True)
class Decision:
    """Outcome of a check: either allowed with ``RateLimit-*`` values or throttled."""

    allowed: bool
    retry_after: int = 0
    limit: int = 0
    remaining: int = 0
    reset: int = 0

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers for an allowed request (steady window of the endpoint)."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


class RateLimiter:
    """Fixed-window counters shared by every key of the account."""

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = float(time_scale)
        self.enabled = enabled
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, float], tuple[int, int]] = {}

    def reset(self) -> None:
        """Forget all counts."""
        with self._lock:
            self._counts.clear()

    def _position(self, seconds: float) -> tuple[int, float]:
        """(window index, real seconds left in it) for a nominal window length."""
        scaled = (self._clock() - self._start) * self.time_scale
        index = int(scaled // seconds)
        left_real = ((index + 1) * seconds - scaled) / self.time_scale
        return index, left_real

    def check(self, charges: Sequence[Charge]) -> Decision:
        """Charge a request; the first charge's steady window feeds the ``RateLimit-*`` values."""
        with self._lock:
            states: list[tuple[tuple[str, float], int, int, Window, float]] = []
            for charge in charges:
                for window in charge.windows:
                    key = (charge.bucket, window.seconds)
                    index, left = self._position(window.seconds)
                    prev_index, count = self._counts.get(key, (index, 0))
                    if prev_index != index:
                        count = 0
                    states.append((key, index, count, window, left))
            if self.enabled:
                blocked = [left for _, _, count, w, left in states if count >= w.limit]
                if blocked:
                    return Decision(False, retry_after=max(1, math.ceil(max(blocked))))
                for key, index, count, _, _ in states:
                    self._counts[key] = (index, count + 1)
            primary = [s for s in states if s[0][0] == charges[0].bucket]
            steady = next((s for s in primary if s[3].seconds == STEADY), primary[-1])
            used = steady[2] + 1 if self.enabled else 0
            return Decision(
                True,
                limit=steady[3].limit,
                remaining=max(0, steady[3].limit - used),
                reset=max(1, math.ceil(steady[4])),
            )
