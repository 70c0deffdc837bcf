"""Klaviyo's rate limits as a run learns them from Klaviyo, shared by every thread of the run.

Klaviyo counts an account's requests to each budget in fixed windows, a 1 s burst window and a
60 s steady window, and answers every request that is not a 429 with the state of the steady
one: `RateLimit-Limit`, `RateLimit-Remaining` (what is left, this request counted) and
`RateLimit-Reset` (whole seconds until the window resets) (klaviyo-api.md §10). A budget starts
from its published tier; once answered, its steady window follows those headers. So a run
spends what is left of a window at the burst rate and then waits for the reset, where pacing
evenly would leave the rest of the window unspent, and it stops where another integration left
the window spent. A 429's `Retry-After` is the last word: the budget pauses for it, for every
thread.

What no header describes (the burst window, the daily cap on writes, the quotas of costly
options, every window of a server that sends no headers) is counted here at the published tier.
A request counts from when it is let go until its answer comes back, since it reached Klaviyo
somewhere in between: so no window of that length, fixed or sliding, however aligned, can hold
more of this run's requests than the limit, whatever the latency or the thread scheduling.

Either way, requests in flight count against every budget they spend: `Remaining` is read as
the room left for the requests not yet answered. The model holds for sliding windows too: there
`Reset` is when the count next drops, and each answer says by how much.
"""

import bisect
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from requests import Response

from . import settings
from .endpoints import Budget, tier_windows

_THROTTLED_IN = re.compile(r"available in (\d+) second")

# Longest pause a `Retry-After` or `RateLimit-Reset` can credibly ask for: the steady window.
# Resuming earlier than Klaviyo says only collects another 429, so these are not cut to
# `request_max_retry_delay`; a larger value is not believed.
MAX_STATED_WAIT = 60.0
# Real seconds a thread waiting for another request's answer sleeps before it looks again; an
# answer wakes it sooner. Only a bound: every request let go is answered or given up.
_ANSWER_WAIT = 1.0


@dataclass
class RateStats:
    """What pacing and throttling cost a run, for its log and for tests."""

    requests: int = 0
    throttled: int = 0  # 429s received
    throttled_without_wait: int = 0  # 429s with neither Retry-After nor "available in N s"
    exhausted: int = 0  # answers whose RateLimit-Remaining left this run no room
    waited_seconds: float = 0.0  # time requests spent waiting for room or for a pause


class Headers(NamedTuple):
    """Klaviyo's `RateLimit-*` headers of one answer."""

    limit: int
    remaining: int
    reset: float

    @classmethod
    def of(cls, response: Response) -> Optional["Headers"]:
        """The headers, or None when any is missing or unreadable (their syntax is undocumented:
        an unreadable value is no instruction)."""
        limit = _header_number(response, "RateLimit-Limit")
        remaining = _header_number(response, "RateLimit-Remaining")
        reset = _header_number(response, "RateLimit-Reset")
        if limit is None or remaining is None or reset is None or min(limit, remaining, reset) < 0:
            return None
        return cls(int(limit), int(remaining), min(reset, MAX_STATED_WAIT))


@dataclass
class _SteadyWindow:
    """A budget's steady window as Klaviyo's answers describe it, on this run's clock.

    Within a window the count only grows, so the lowest `Remaining` answered is the latest
    count known; every request not yet answered may still be missing from it. So the room left
    is that `Remaining` less the requests in flight, and never more than what is left of this
    run's share of the window.

    `RateLimit-Reset` counts whole seconds, so an answer places the window's end between its
    request's sending plus `Reset - 1` and its arrival plus `Reset`; the earliest of the latter
    bounds is kept. An answer whose lower bound lies past the window held is about a later
    window (Klaviyo reset sooner, or its window slides); one to a request sent before this run
    moved on, with a lower bound before the window began, is about an earlier one.
    """

    limit: int
    allowance: Optional[int]  # requests of the window this run may send; None: all there are
    remaining: int  # the lowest RateLimit-Remaining answered in this window
    ends_by: float  # the window has reset by then
    spent: int  # requests this run sent that may count in this window
    end_known: bool = True  # ends_by comes from an answer in this window, not from a guess
    began_by: float = -math.inf  # the window before it had ended by then
    moved_on_at: float = -math.inf  # when this run moved on to the window
    probe: int = 0  # 1 when the window reset with no room known: one request asks how much

    def room(self, in_flight: int) -> int:
        """Requests this run may still send in the window."""
        room = self.remaining - in_flight
        if self.allowance is not None:
            room = min(room, self.allowance - self.spent)
        return room + self.probe

    def move_on(self, now: float, seconds: float, in_flight: int) -> None:
        """Take the window to have reset at `ends_by`, as Klaviyo said it would.

        Requests still in flight may count in the new window; the old window's `Remaining`
        stays as a floor until an answer from the new one comes.
        """
        self.probe = 1 if self.room(in_flight) <= 0 else 0
        self.began_by = self.ends_by
        self.ends_by = now + seconds  # a guess until an answer from the new window comes
        self.end_known = False
        self.moved_on_at = now
        self.spent = in_flight

    def follow(
        self,
        headers: Headers,
        allowance: Optional[int],
        in_flight: int,
        sent_at: float,
        now: float,
    ) -> bool:
        """Take in an answer's headers; False if they describe an earlier window."""
        ends_after = sent_at + headers.reset - 1
        ends_by = now + headers.reset
        if sent_at < self.moved_on_at and ends_after < self.began_by:
            return False
        self.limit, self.allowance = headers.limit, allowance
        if self.end_known and ends_after >= self.ends_by:
            self.began_by, self.moved_on_at = self.ends_by, now
            self.ends_by, self.remaining = ends_by, headers.remaining
            self.spent = in_flight + 1
        elif not self.end_known:
            self.ends_by, self.end_known, self.remaining = ends_by, True, headers.remaining
        else:
            self.ends_by = min(self.ends_by, ends_by)
            self.remaining = min(self.remaining, headers.remaining)
        self.probe = 0
        return True


@dataclass
class _Quota:
    """One budget's state: what this run counts itself, and what Klaviyo said of it."""

    budget: Budget
    windows: List[Tuple[int, float]]  # counted here: (requests, seconds) burst, steady(, daily)
    published_limit: int  # the tier's steady limit, before any share
    steady_seconds: float
    answered: List[float] = field(default_factory=list)  # when answers came, oldest first
    in_flight: int = 0
    steady: Optional[_SteadyWindow] = None  # once an answer described it
    paused_until: float = 0.0
    backoff_streak: int = 0

    def counted_windows(self) -> List[Tuple[int, float]]:
        """The windows counted here: the steady one only while no answer has described it."""
        if self.steady is None:
            return self.windows
        return [window for index, window in enumerate(self.windows) if index != 1]

    def wait(self, now: float, pace: bool) -> Optional[float]:
        """0 if a request may go now, else seconds to wait, or None: wait for an answer."""
        if now < self.paused_until:
            return self.paused_until - now
        waits: List[Optional[float]] = [self._steady_wait(now)]
        if pace:
            waits += [
                self._counted_wait(now, limit, seconds) for limit, seconds in self.counted_windows()
            ]
        timed = [wait for wait in waits if wait]
        if timed:
            return max(timed)
        return None if None in waits else 0.0

    def _steady_wait(self, now: float) -> Optional[float]:
        window = self.steady
        if window is None:
            return 0.0
        if now >= window.ends_by:
            window.move_on(now, self.steady_seconds, self.in_flight)
        if window.room(self.in_flight) > 0:
            return 0.0
        if window.end_known:
            return window.ends_by - now
        return None  # the request sent into the new window will say how much room it has

    def _counted_wait(self, now: float, limit: int, seconds: float) -> Optional[float]:
        first = bisect.bisect_right(self.answered, now - seconds)
        recent = len(self.answered) - first
        must_leave = self.in_flight + recent - limit + 1
        if must_leave <= 0:
            return 0.0
        if must_leave > recent:
            return None  # requests on their way count until answered, and a window after that
        return self.answered[first + must_leave - 1] + seconds - now

    def send(self) -> None:
        self.in_flight += 1
        if self.steady is not None:
            self.steady.spent += 1

    def answer(self, now: float) -> None:
        self.in_flight -= 1
        self.answered.append(now)
        longest = max(seconds for _, seconds in self.windows)
        if self.answered[0] <= now - longest:
            del self.answered[: bisect.bisect_right(self.answered, now - longest)]


class Ticket(NamedTuple):
    """A request let go: the quotas it spends and when it went."""

    quotas: Tuple[_Quota, ...]
    sent_at: float


class RateLimiter:
    """Per-budget quotas for a share of what Klaviyo grants, shared by every thread of a run.

    `share` is the fraction of each window this run may use (of the limit Klaviyo names, of a
    published tier while none is named), whatever other integrations use; two runs at 0.5
    each share the account's quota. Where Klaviyo's windows slide, only `Remaining` bounds it.
    `time_scale` shortens the published windows for simulators that run time faster; what
    Klaviyo states (`RateLimit-Reset`, `Retry-After`) is in real seconds already. `pace=False`
    keeps only what Klaviyo's answers ask for (a client without a configured budget).
    `revision` picks the published limits that revision documents. `clock` and `sleep` time
    every wait; tests pass a controlled clock to check exact waits.
    """

    def __init__(
        self,
        share: float = 1.0,
        time_scale: float = 1.0,
        pace: bool = True,
        revision: str = settings.DEFAULT_REVISION,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"rate_limit_share must be in (0, 1], got {share}")
        if time_scale <= 0:
            raise ValueError(f"rate_limit_time_scale must be positive, got {time_scale}")
        self.share = share
        self.time_scale = time_scale
        self.pace = pace
        self.revision = revision
        self._clock = clock
        self._sleep = sleep
        self.stats = RateStats()
        self._quotas: Dict[str, _Quota] = {}
        self._changed = threading.Condition()

    def windows(self, tier: str) -> List[Tuple[int, float]]:
        """(requests, seconds) windows this run counts for a tier: its share, on the scaled clock.

        A share below one request per window stretches the window instead (XS at share 0.5 is
        one request per 2 s, not one per second).
        """
        kept = []
        for limit, seconds in tier_windows(tier, self.revision):
            allowed = limit * self.share
            count = math.floor(allowed) if allowed >= 1 else 1
            window = seconds if allowed >= 1 else seconds / allowed
            kept.append((count, window / self.time_scale))
        return kept

    def allowance(self, limit: int) -> Optional[int]:
        """Requests of a steady window of `limit` this run may send; None: what Klaviyo has."""
        return None if self.share == 1 else max(1, math.floor(limit * self.share))

    def _quota(self, budget: Budget) -> _Quota:
        quota = self._quotas.get(budget.name)
        if quota is None:
            published = tier_windows(budget.tier, self.revision)
            quota = _Quota(
                budget,
                self.windows(budget.tier),
                published_limit=published[1][0],
                steady_seconds=published[1][1] / self.time_scale,
            )
            self._quotas[budget.name] = quota
        return quota

    def paused_for(self, budgets: Sequence[Budget]) -> float:
        """Seconds left before these budgets may be spent again (0 when none is paused)."""
        with self._changed:
            now = self._clock()
            until = max(
                (self._quotas[b.name].paused_until for b in budgets if b.name in self._quotas),
                default=0.0,
            )
        return max(0.0, until - now)

    def acquire(self, budgets: Sequence[Budget]) -> Ticket:
        """Block until every budget has room for one more request, then count it as sent.

        `budgets[0]` is the endpoint's own. `release` (or `release_throttled`) must follow,
        whatever becomes of the request.
        """
        started = self._clock()
        with self._changed:
            quotas = tuple(self._quota(budget) for budget in budgets)
            self.stats.requests += 1
        while True:
            with self._changed:
                now = self._clock()
                waits = [quota.wait(now, self.pace) for quota in quotas]
                timed = [wait for wait in waits if wait]
                if not timed and None not in waits:
                    for quota in quotas:
                        quota.send()
                    self.stats.waited_seconds += now - started
                    return Ticket(quotas, now)
                if not timed:
                    self._changed.wait(_ANSWER_WAIT)
                    continue
            self._sleep(max(timed))

    def release(self, ticket: Ticket, response: Optional[Response]) -> None:
        """Count a request as answered (`response` None: given up) and follow its headers.

        The headers describe one budget's steady window: the one whose limit they name, else
        the endpoint's own.
        """
        with self._changed:
            now = self._clock()
            for quota in ticket.quotas:
                quota.answer(now)
                if response is not None:
                    quota.backoff_streak = 0
            headers = Headers.of(response) if response is not None else None
            if headers is not None and ticket.quotas:
                self._follow(self._described(ticket.quotas, headers), headers, ticket, now)
            self._changed.notify_all()

    def _described(self, quotas: Sequence[_Quota], headers: Headers) -> _Quota:
        for quota in quotas:
            known = quota.steady.limit if quota.steady else quota.published_limit
            if known == headers.limit:
                return quota
        return quotas[0]

    def _follow(self, quota: _Quota, headers: Headers, ticket: Ticket, now: float) -> None:
        allowance = self.allowance(headers.limit)
        window = quota.steady
        if window is None:
            # The first answer: every request sent so far is this one or still in flight.
            window = quota.steady = _SteadyWindow(
                headers.limit,
                allowance,
                headers.remaining,
                now + headers.reset,
                spent=quota.in_flight + 1,
            )
        elif not window.follow(headers, allowance, quota.in_flight, ticket.sent_at, now):
            return
        if window.room(quota.in_flight) <= 0:
            self.stats.exhausted += 1

    def release_throttled(
        self, ticket: Ticket, response: Response, backoff_factor: float, max_delay: float
    ) -> float:
        """Pause the budgets after a 429 and return the pause: Klaviyo's wait, else a backoff.

        A stated wait is kept to (up to `MAX_STATED_WAIT`). Without one, the pause doubles with
        each throttled wave on the budget (`backoff_factor * 2**n`, at most `max_delay`); 429s
        of requests already in flight when the budget was paused belong to the same wave and do
        not double it again.
        """
        stated = retry_after_seconds(response)
        with self._changed:
            now = self._clock()
            self.stats.throttled += 1
            if stated is not None:
                wait = min(stated, MAX_STATED_WAIT)
            else:
                self.stats.throttled_without_wait += 1
                wait = self._backoff(ticket.quotas, now, backoff_factor, max_delay)
            for quota in ticket.quotas:
                quota.answer(now)
                quota.paused_until = max(quota.paused_until, now + wait)
            self._changed.notify_all()
        return wait

    @staticmethod
    def _backoff(quotas: Sequence[_Quota], now: float, factor: float, max_delay: float) -> float:
        if not quotas:
            return min(factor, max_delay)
        first = quotas[0]
        paused = first.paused_until > now
        first.backoff_streak = max(1, first.backoff_streak + (0 if paused else 1))
        return min(factor * 2 ** (first.backoff_streak - 1), max_delay)


def _header_number(response: Response, name: str) -> Optional[float]:
    value = response.headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def retry_after_seconds(response: Response) -> Optional[float]:
    """Seconds a 429 asks us to wait: `Retry-After`, else the "available in N seconds" detail."""
    header = response.headers.get("Retry-After")
    if header and header.strip().isdigit():
        return float(header)
    match = _THROTTLED_IN.search(response.text or "")
    return float(match.group(1)) if match else None
