"""Rate budgets shared by every thread of a run: one burst and one steady window per endpoint.

Klaviyo counts requests per account and per endpoint in a 1 s burst window and a 60 s steady
window; some options (`profile_count`, `predictive_analytics`) are charged to a stricter global
budget on top. Requests wait here for room in every budget they draw on, so a run paces itself
instead of collecting 429s; when a 429 still arrives (another integration spends the same
quota), its `Retry-After` pauses that budget for every thread, not only the one that got it.
"""

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from pyrate_limiter import Duration, Limiter, Rate
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from . import settings

_THROTTLED_IN = re.compile(r"available in (\d+) second")


@dataclass(frozen=True)
class Budget:
    """A named quota and the tier it follows, e.g. ("get_segment_profiles", "L")."""

    name: str
    tier: str


def budgets_for(method: str, url: str) -> List[Budget]:
    """The budgets one request draws on, from its method, path and query."""
    parts = urlsplit(url)
    segments = [part for part in parts.path.split("/") if part][1:]  # drop the leading "api"
    query = parse_qs(parts.query)
    if not segments:
        return []
    if method in ("POST", "PATCH"):
        return [Budget("segment_writes", "XS")]
    if method == "DELETE":
        return [Budget("delete_segment", "S")]
    if segments[0] == "tags":
        return [Budget("get_tags", "S")]
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


class RateLimiter:
    """Blocking per-budget limiter for a share of the account's published quota.

    `share` is the fraction of each published limit this run may use (other integrations
    spend the rest); `time_scale` shortens the windows for simulators that run time faster.
    """

    def __init__(self, share: float = 1.0, time_scale: float = 1.0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"rate_limit_share must be in (0, 1], got {share}")
        if time_scale <= 0:
            raise ValueError(f"rate_limit_time_scale must be positive, got {time_scale}")
        self.share = share
        self.time_scale = time_scale
        self._limiters: Dict[str, Limiter] = {}
        self._paused_until: Dict[str, float] = {}
        self._lock = threading.Lock()
        self.waited_seconds = 0.0
        self.throttled = 0

    def limits(self, tier: str) -> Tuple[int, int]:
        """(per second, per minute) allowed for a tier at this run's share of the quota."""
        per_second, per_minute = settings.RATE_TIERS[tier]
        return max(1, math.floor(per_second * self.share)), max(
            1, math.floor(per_minute * self.share)
        )

    def _limiter(self, budget: Budget) -> Limiter:
        with self._lock:
            limiter = self._limiters.get(budget.name)
            if limiter is None:
                per_second, per_minute = self.limits(budget.tier)
                second = max(1, int(int(Duration.SECOND) / self.time_scale))
                minute = max(1, int(int(Duration.MINUTE) / self.time_scale))
                limiter = Limiter(
                    [Rate(per_second, second), Rate(per_minute, minute)], buffer_ms=5
                )
                self._limiters[budget.name] = limiter
            return limiter

    def acquire(self, budgets: List[Budget]) -> None:
        """Block until every budget has room for one more request, then spend it."""
        started = time.monotonic()
        for budget in budgets:
            pause = self._paused_until.get(budget.name, 0.0) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._limiter(budget).try_acquire(budget.name)
        self.waited_seconds += time.monotonic() - started

    def pause(self, budgets: List[Budget], seconds: float) -> None:
        """Hold every thread off these budgets for `seconds` (after a 429)."""
        until = time.monotonic() + seconds
        with self._lock:
            self.throttled += 1
            for budget in budgets:
                self._paused_until[budget.name] = max(self._paused_until.get(budget.name, 0), until)


def retry_after_seconds(response: Response) -> Optional[float]:
    """Seconds a 429 asks us to wait: `Retry-After`, else the "available in N seconds" detail."""
    header = response.headers.get("Retry-After")
    if header and header.strip().isdigit():
        return float(header)
    match = _THROTTLED_IN.search(response.text or "")
    return float(match.group(1)) if match else None


class RateLimitedAdapter(HTTPAdapter):
    """Transport adapter that spends the budgets of every attempt, retries included."""

    def __init__(self, limiter: Optional[RateLimiter], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limiter = limiter

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        budgets = budgets_for(request.method or "GET", request.url or "")
        if self.limiter is not None:
            self.limiter.acquire(budgets)
        response = super().send(request, *args, **kwargs)
        if response.status_code == 429:
            wait = retry_after_seconds(response)
            if wait is not None:
                # dlt's retry honours Retry-After but not Klaviyo's "available in N seconds"
                # detail, which is all some 429s carry.
                response.headers.setdefault("Retry-After", str(int(math.ceil(wait))))
                if self.limiter is not None:
                    self.limiter.pause(budgets, wait)
        return response
