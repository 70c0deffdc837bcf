"""Klaviyo's per-account rate limits: burst 1 s, steady 60 s and daily 24 h windows.

Each request is charged to one or more buckets (its endpoint's tier plus, for costly
``additional-fields``, a bucket shared across endpoints). Window lengths are divided by
``time_scale`` so tests can trip limits quickly: with ``time_scale=60`` a 60 s window lasts 1 s.
Throttled requests are not counted.

Klaviyo documents fixed windows (``windows="fixed"``, the default): counts start again at
every multiple of the window's length since the limiter started, and ``RateLimit-Reset`` is the
time left in the steady window. ``windows="sliding"`` counts instead the requests of the last
window's length, for clients that must not rely on fixed windows: there ``RateLimit-Reset`` and
``Retry-After`` are the time until the oldest counted request leaves the window, the moment the
count next drops.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BURST = 1.0
STEADY = 60.0
DAILY = 86400.0
WINDOW_KINDS = ("fixed", "sliding")


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
        """``RateLimit-*`` headers for an allowed request (steady window of the endpoint);
        none when limits are off, since there is no window to describe."""
        if self.limit == 0:
            return {}
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


@dataclass(frozen=True)
class Charged:
    """An allowed request as a bucket counted it: ``at`` scaled seconds after the start."""

    bucket: str
    at: float


@dataclass(frozen=True)
class _State:
    """One window of one bucket at the moment of a check."""

    bucket: str
    window: Window
    count: int  # requests counted in the window
    frees_in: float  # real seconds until the count drops


class RateLimiter:
    """Rate-limit counters shared by every key of the account, in fixed or sliding windows."""

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        windows: str = "fixed",
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if windows not in WINDOW_KINDS:
            raise ValueError(f"windows must be one of {WINDOW_KINDS}, got {windows!r}")
        self.time_scale = float(time_scale)
        self.enabled = enabled
        self.windows = windows
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, float], tuple[int, int]] = {}  # fixed: (index, count)
        self._arrivals: dict[tuple[str, float], deque[float]] = {}  # sliding: scaled times
        self.charged: list[Charged] = []  # every allowed request, while limits are enforced

    def reset(self) -> None:
        """Forget all counts and the record of charges."""
        with self._lock:
            self._counts.clear()
            self._arrivals.clear()
            self.charged.clear()

    def elapsed(self) -> float:
        """Real seconds since the limiter started: fixed windows begin at its multiples of
        their scaled length."""
        return self._clock() - self._start

    def _now(self) -> float:
        """Scaled seconds since the limiter started."""
        return (self._clock() - self._start) * self.time_scale

    def _state(self, bucket: str, window: Window, now: float) -> _State:
        key = (bucket, window.seconds)
        if self.windows == "sliding":
            arrivals = self._arrivals.setdefault(key, deque())
            while arrivals and arrivals[0] <= now - window.seconds:
                arrivals.popleft()
            frees_at = arrivals[0] + window.seconds if arrivals else now + window.seconds
            return _State(bucket, window, len(arrivals), (frees_at - now) / self.time_scale)
        index = int(now // window.seconds)
        counted_index, count = self._counts.get(key, (index, 0))
        left = ((index + 1) * window.seconds - now) / self.time_scale
        return _State(bucket, window, count if counted_index == index else 0, left)

    def _count(self, state: _State, now: float) -> None:
        key = (state.bucket, state.window.seconds)
        if self.windows == "sliding":
            self._arrivals[key].append(now)
        else:
            self._counts[key] = (int(now // state.window.seconds), state.count + 1)

    def check(self, charges: Sequence[Charge]) -> Decision:
        """Charge a request; the first charge's steady window feeds the ``RateLimit-*`` values."""
        if not self.enabled:
            return Decision(True)
        with self._lock:
            now = self._now()
            states = [
                self._state(charge.bucket, window, now)
                for charge in charges
                for window in charge.windows
            ]
            if self.enabled:
                blocked = [state.frees_in for state in states if state.count >= state.window.limit]
                if blocked:
                    return Decision(False, retry_after=max(1, math.ceil(max(blocked))))
                for state in states:
                    self._count(state, now)
                self.charged.extend(Charged(charge.bucket, now) for charge in charges)
            primary = [state for state in states if state.bucket == charges[0].bucket]
            steady = next((s for s in primary if s.window.seconds == STEADY), primary[-1])
            used = steady.count + 1 if self.enabled else 0
            if self.windows == "sliding" and steady.count == 0:
                frees_in = steady.window.seconds / self.time_scale  # this request is the oldest
            else:
                frees_in = steady.frees_in
            return Decision(
                True,
                limit=steady.window.limit,
                remaining=max(0, steady.window.limit - used),
                reset=max(1, math.ceil(frees_in)),
            )
