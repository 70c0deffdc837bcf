"""Rate budgets shared by every thread of a run: one burst and one steady window per endpoint.

Klaviyo counts requests per account and per endpoint in a 1 s burst window and a 60 s steady
window; some options (`profile_count`, `predictive_analytics`) are charged to a stricter global
budget on top, and segment writes also have a daily cap. Requests wait here for room in every
budget they draw on, so a run paces itself instead of collecting 429s. What the pacing cannot
know, Klaviyo tells: when another integration spends the same quota, a response's
`RateLimit-Remaining: 0` or a 429 pauses that budget for every thread, not only the one that
got it, for `RateLimit-Reset` / `Retry-After` seconds, or with a shared exponential backoff when
a 429 says nothing.

The windows are sliding (pyrate-limiter's log buckets), which is stricter than Klaviyo's fixed
windows: no fixed window can then hold more requests than the limit (`BUFFER_MS` covers latency).
"""

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from pyrate_limiter import Limiter, Rate
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from . import settings

_THROTTLED_IN = re.compile(r"available in (\d+) second")

# Klaviyo's POST/PATCH segment limit (klaviyo-api.md §4): the XS tier plus 100 a day.
WRITE_TIER = "WRITE"
WRITES_PER_DAY = 100
# Klaviyo's segment reports: 1/s, 2/m and a daily cap (settings.REPORTS_PER_DAY).
REPORT_TIER = "REPORT"
_DAY_SECONDS = 86400.0
# Longest pause a `Retry-After` or `RateLimit-Reset` can credibly ask for: the steady window.
# Resuming earlier than Klaviyo says only collects another 429, so these are not cut to
# `request_max_retry_delay`; a larger value is not believed.
MAX_STATED_WAIT = 60.0
# Added to every wait for room: requests sent a window apart can still arrive closer together
# (latency varies), and Klaviyo's windows are fixed, so without a margin the (n+1)th request
# could land in the first one's window. Real milliseconds, at most a quarter of the shortest
# window, so that a simulator's shortened windows are not stretched out of proportion.
BUFFER_MS = 30


@dataclass(frozen=True)
class Budget:
    """A named quota and the tier it follows, e.g. ("get_segment_profiles", "L")."""

    name: str
    tier: str


def _api_path(path: str) -> List[str]:
    """Path parts after `/api/`, so a base_url behind a proxy prefix is budgeted the same."""
    parts = [part for part in path.split("/") if part]
    if "api" in parts:
        return parts[len(parts) - parts[::-1].index("api") :]
    return parts


def budgets_for(method: str, url: str) -> List[Budget]:
    """The budgets one request draws on, from its method, path and query.

    The first budget is the endpoint's own: Klaviyo's `RateLimit-*` headers describe it.
    """
    parts = urlsplit(url)
    segments = _api_path(parts.path)
    query = parse_qs(parts.query)
    if not segments:
        return []
    if method == "POST" and segments == ["segment-series-reports"]:
        return [Budget("query_segment_series", REPORT_TIER)]
    if method == "POST":
        return [Budget("create_segment", WRITE_TIER)]
    if method == "PATCH":
        return [Budget("update_segment", WRITE_TIER)]
    if method == "DELETE":
        return [Budget("delete_segment", "S")]
    if segments[0] == "tags":
        return [Budget("get_tags", "S")]
    if segments == ["profiles"]:
        budgets = [Budget("get_profiles", "L")]
        if "predictive_analytics" in ",".join(query.get("additional-fields[profile]", [])):
            budgets.append(Budget("predictive_analytics", "M"))
        return budgets
    if segments[0] != "segments":
        return [Budget("other", "L")]
    if len(segments) == 1:
        return [Budget("get_segments", "L")]
    if len(segments) == 2:
        budgets = [Budget("get_segment", "L")]
        if "profile_count" in ",".join(query.get("additional-fields[segment]", [])):
            budgets.append(Budget("profile_count", "XS"))
        return budgets
    tail = "/".join(segments[2:])
    if tail in ("tags", "relationships/tags"):
        return [Budget(f"get_segment_{tail.replace('/', '_')}", "S")]
    budgets = [Budget(f"get_segment_{tail.replace('/', '_')}", "L")]
    if "predictive_analytics" in ",".join(query.get("additional-fields[profile]", [])):
        budgets.append(Budget("predictive_analytics", "M"))
    return budgets


def tier_windows(tier: str, revision: str = settings.DEFAULT_REVISION) -> List[Tuple[int, float]]:
    """(requests, seconds) windows of a published tier, before this run's share and scale."""
    if tier == WRITE_TIER:
        per_second, per_minute = settings.RATE_TIERS["XS"]
        return [(per_second, 1.0), (per_minute, 60.0), (WRITES_PER_DAY, _DAY_SECONDS)]
    if tier == REPORT_TIER:
        per_second, per_minute = settings.RATE_TIERS[REPORT_TIER]
        return [(per_second, 1.0), (per_minute, 60.0), (settings.REPORTS_PER_DAY, _DAY_SECONDS)]
    per_second, per_minute = settings.RATE_TIERS[tier]
    if tier == "L" and revision[:10] < settings.L_TIER_STEADY_RAISED_IN:
        per_minute = settings.L_TIER_STEADY_BEFORE
    return [(per_second, 1.0), (per_minute, 60.0)]


def _ordered(rates: List[Rate]) -> List[Rate]:
    """Drop windows another window already implies; pyrate-limiter refuses redundant ones.

    A longer window allowing no more requests than a shorter one makes the shorter redundant;
    a longer window allowing a higher rate than a shorter one is itself redundant.
    """
    kept: List[Rate] = []
    for rate in sorted(rates, key=lambda rate: rate.interval):
        while kept and rate.limit <= kept[-1].limit:
            kept.pop()
        if kept and rate.limit / rate.interval > kept[-1].limit / kept[-1].interval:
            continue
        kept.append(rate)
    return kept


@dataclass
class RateStats:
    """What pacing and throttling cost a run, for its log and for tests."""

    requests: int = 0
    throttled: int = 0  # 429s received
    throttled_without_wait: int = 0  # 429s with neither Retry-After nor "available in N s"
    exhausted: int = 0  # responses whose RateLimit-Remaining left no room: budget paused
    waited_seconds: float = 0.0  # time requests spent waiting for room or for a pause


class RateLimiter:
    """Blocking per-budget limiter for a share of the account's published quota.

    `share` is the fraction of each published limit this run may use (other integrations
    spend the rest); `time_scale` shortens the windows for simulators that run time faster.
    `pace=False` keeps only the pauses Klaviyo asks for (a client without a configured budget).
    `revision` picks the published limits that revision documents.
    `clock` and `sleep` time the pauses (a 429's or an exhausted window's) and the waits
    counted in `stats`; tests pass a controlled clock to check exact waits. Pacing itself is
    pyrate-limiter's and keeps to its own clock.
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
        self._limiters: Dict[str, Limiter] = {}
        self._paused_until: Dict[str, float] = {}
        self._backoff_streak: Dict[str, int] = {}
        self._in_flight: Dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def waited_seconds(self) -> float:
        return self.stats.waited_seconds

    @property
    def throttled(self) -> int:
        return self.stats.throttled

    def rates(self, tier: str) -> List[Rate]:
        """The windows this run keeps to for a tier: its share of each, on the scaled clock.

        A share below one request per window stretches the window instead (XS at share 0.5 is
        one request per 2 s, not one per second).
        """
        rates = []
        for limit, seconds in tier_windows(tier, self.revision):
            allowed = limit * self.share
            count = math.floor(allowed) if allowed >= 1 else 1
            window = seconds if allowed >= 1 else seconds / allowed
            rates.append(Rate(count, max(1, round(window * 1000 / self.time_scale))))
        return _ordered(rates)

    def _limiter(self, budget: Budget) -> Limiter:
        with self._lock:
            limiter = self._limiters.get(budget.name)
            if limiter is None:
                rates = self.rates(budget.tier)
                buffer_ms = max(1, min(BUFFER_MS, rates[0].interval // 4))
                limiter = Limiter(rates, buffer_ms=buffer_ms)
                self._limiters[budget.name] = limiter
            return limiter

    def paused_for(self, budgets: List[Budget]) -> float:
        """Seconds left before these budgets may be spent again (0 when none is paused)."""
        now = self._clock()
        with self._lock:
            until = max((self._paused_until.get(b.name, 0.0) for b in budgets), default=0.0)
        return max(0.0, until - now)

    def acquire(self, budgets: List[Budget]) -> None:
        """Block until every budget has room for one more request, then spend it."""
        started = self._clock()
        with self._lock:
            self.stats.requests += 1
        while True:
            # Pauses first: a thread that took room before a pause would send after it, at
            # the same moment as every other such thread, and overrun the window it resumes in.
            while (pause := self.paused_for(budgets)) > 0:
                self._sleep(pause)
            if self.pace:
                for budget in budgets:
                    self._limiter(budget).try_acquire(budget.name)
            if self.paused_for(budgets) == 0:
                break
            # Another thread's 429 paused the budget while this one waited for room: the room
            # taken is given up, and taken again once the pause is over.
        waited = self._clock() - started
        with self._lock:
            self.stats.waited_seconds += waited

    def pause(self, budgets: List[Budget], seconds: float) -> None:
        """Hold every thread off these budgets for `seconds` (a pause never gets shorter)."""
        until = self._clock() + seconds
        with self._lock:
            for budget in budgets:
                self._paused_until[budget.name] = max(self._paused_until.get(budget.name, 0), until)

    def request_started(self, budgets: List[Budget]) -> None:
        """Count a request of these budgets as on its way (see `on_response`)."""
        with self._lock:
            for budget in budgets[:1]:
                self._in_flight[budget.name] = self._in_flight.get(budget.name, 0) + 1

    def request_finished(self, budgets: List[Budget]) -> None:
        with self._lock:
            for budget in budgets[:1]:
                self._in_flight[budget.name] = max(0, self._in_flight.get(budget.name, 0) - 1)

    def on_response(self, budgets: List[Budget], response: Response) -> None:
        """Follow Klaviyo's `RateLimit-*` headers on a response that was not a 429.

        When `RateLimit-Remaining` leaves no room for the requests of the endpoint already on
        their way, its steady window is spent (by this run, by another integration, or because
        Klaviyo's limit is lower than the published one): pause it until `RateLimit-Reset`
        rather than collect 429s.
        """
        if not budgets:
            return
        with self._lock:
            self._backoff_streak.pop(budgets[0].name, None)
            in_flight = self._in_flight.get(budgets[0].name, 0)
        remaining = _header_number(response, "RateLimit-Remaining")
        reset = _header_number(response, "RateLimit-Reset")
        if remaining is not None and remaining <= in_flight and reset is not None and reset > 0:
            with self._lock:
                self.stats.exhausted += 1
            self.pause(budgets[:1], min(reset, MAX_STATED_WAIT))

    def on_throttled(
        self, budgets: List[Budget], response: Response, backoff_factor: float, max_delay: float
    ) -> float:
        """Pause the budgets after a 429 and return the pause: Klaviyo's wait, else a backoff.

        A stated wait is kept to (up to `MAX_STATED_WAIT`). Without one, the pause doubles with
        each throttled wave on the budget (`backoff_factor * 2**n`, at most `max_delay`); 429s
        of requests already in flight when the budget was paused belong to the same wave and do
        not double it again.
        """
        stated = retry_after_seconds(response)
        with self._lock:
            self.stats.throttled += 1
            if stated is None:
                self.stats.throttled_without_wait += 1
        if stated is not None:
            wait = min(stated, MAX_STATED_WAIT)
        else:
            key = budgets[0].name if budgets else ""
            with self._lock:
                paused = self._paused_until.get(key, 0.0) > self._clock()
                streak = self._backoff_streak.get(key, 0) + (0 if paused else 1)
                self._backoff_streak[key] = max(streak, 1)
            wait = min(backoff_factor * 2 ** (max(streak, 1) - 1), max_delay)
        self.pause(budgets, wait)
        return wait


def _header_number(response: Response, name: str) -> Optional[float]:
    value = response.headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # the syntax is undocumented; an unreadable value is no instruction


def retry_after_seconds(response: Response) -> Optional[float]:
    """Seconds a 429 asks us to wait: `Retry-After`, else the "available in N seconds" detail."""
    header = response.headers.get("Retry-After")
    if header and header.strip().isdigit():
        return float(header)
    match = _THROTTLED_IN.search(response.text or "")
    return float(match.group(1)) if match else None


class RateLimitedAdapter(HTTPAdapter):
    """Transport adapter that spends the budgets of every attempt, retries included.

    It also reads Klaviyo's answer about the quota: `RateLimit-*` headers and 429s pause the
    budget for every thread. `answered` turns true once any HTTP response came back, which
    tells an unreachable base_url (fail at once) from a dropped connection (retry).
    """

    def __init__(
        self,
        limiter: Optional[RateLimiter],
        backoff_factor: float = 1.0,
        max_delay: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.limiter = limiter if limiter is not None else RateLimiter(pace=False)
        self.backoff_factor = backoff_factor
        self.max_delay = max_delay
        self.answered = False

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        budgets = budgets_for(request.method or "GET", request.url or "")
        self.limiter.acquire(budgets)
        self.limiter.request_started(budgets)
        try:
            response = super().send(request, *args, **kwargs)
        finally:
            self.limiter.request_finished(budgets)
        self.answered = True
        if response.status_code == 429:
            self.limiter.on_throttled(budgets, response, self.backoff_factor, self.max_delay)
        else:
            self.limiter.on_response(budgets, response)
        return response
