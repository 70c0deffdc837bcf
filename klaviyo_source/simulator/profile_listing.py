"""GET /api/profiles: which profiles a filter keeps and in what order a sort lists them.

The answer is a list of unique ``(primary, profile id)`` keys in ascending order, the shape
``paging.paginate`` pages through. Building it costs a pass over every profile, so each
(sort, filter) list is kept until the account changes (``Account.version``), which makes
walking a large account page by page linear rather than quadratic.

Where the spec is silent the simulator chooses, and says so here:

- without ``sort`` profiles come in id order (ULIDs, so roughly by creation);
- a profile without the sorted value (no email, no suppression) sorts before every profile
  that has one, the order of an empty string;
- a suppression-timestamp sort orders by the profile's earliest suppression of that kind;
- a filter on a suppression field keeps a profile when any of its suppressions matches.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .account import Account
from .filters import PROFILE_FILTERS, Condition, matches
from .paging import Key
from .render import sort_key_time

_EMAIL_MARKETING = "subscriptions.email.marketing."
PROFILE_SORTS: frozenset[str] = frozenset(
    {
        "id",
        "created",
        "updated",
        "email",
        f"{_EMAIL_MARKETING}suppression.timestamp",
        f"{_EMAIL_MARKETING}list_suppressions.timestamp",
    }
)
_CACHE_SIZE = 32


def _suppressions(profile: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """``suppression`` or ``list_suppressions`` of a profile; tests may store partial
    subscriptions, so a missing level means no suppressions."""
    marketing = (profile.get("subscriptions") or {}).get("email", {}).get("marketing", {})
    items = marketing.get(kind) or []
    return [item for item in items if isinstance(item, dict)]


class ProfileIndex:
    """Filtered, sorted profile keys of one account, cached per (sort, filter)."""

    def __init__(self, exchange_id: Callable[[str], str]) -> None:
        self._exchange_id = exchange_id
        self._cache: OrderedDict[tuple[str, str], tuple[int, list[Key]]] = OrderedDict()
        self._lock = threading.Lock()

    def values(self, pid: str, profile: dict[str, Any], field: str) -> list[Any]:
        """Every value a filter on ``field`` can match for one profile."""
        if field == "id":
            return [pid]
        if field == "_kx":
            return [self._exchange_id(pid)]
        if field.startswith(_EMAIL_MARKETING):
            kind, _, leaf = field[len(_EMAIL_MARKETING) :].partition(".")
            found = [item.get(leaf) for item in _suppressions(profile, kind)]
        else:
            found = [profile.get(field)]
        if PROFILE_FILTERS[field].type == "datetime":
            # A value stored as anything but a datetime cannot be compared with one.
            return [value for value in found if isinstance(value, datetime)]
        return found

    def matches(self, pid: str, profile: dict[str, Any], conditions: list[Condition]) -> bool:
        """Whether one profile passes every (ANDed) condition."""
        for cond in conditions:
            expected = cond.value.python()
            if not any(
                matches(cond.op, value, expected) for value in self.values(pid, profile, cond.field)
            ):
                return False
        return True

    @staticmethod
    def primary(pid: str, profile: dict[str, Any], sort: str) -> str:
        """The sort value of a profile as a string that orders correctly."""
        if sort == "id":
            return pid
        if sort in ("created", "updated"):
            return sort_key_time(profile.get(sort))
        if sort == "email":
            return str(profile.get("email") or "")
        kind = sort[len(_EMAIL_MARKETING) :].partition(".")[0]
        stamps = [
            item["timestamp"]
            for item in _suppressions(profile, kind)
            if isinstance(item.get("timestamp"), datetime)
        ]
        return sort_key_time(min(stamps)) if stamps else ""

    def keys(
        self, account: Account, sort: str, conditions: list[Condition], filter_text: str
    ) -> list[Key]:
        """Ascending keys of the profiles the conditions keep. Caller holds ``account.lock``."""
        cache_key = (sort, filter_text)
        with self._lock:
            hit = self._cache.get(cache_key)
            if hit is not None and hit[0] == account.version:
                self._cache.move_to_end(cache_key)
                return hit[1]
        keys = [
            (self.primary(pid, profile, sort), pid)
            for pid, profile in account.peek_profiles().items()
            if not conditions or self.matches(pid, profile, conditions)
        ]
        keys.sort()
        with self._lock:
            self._cache[cache_key] = (account.version, keys)
            self._cache.move_to_end(cache_key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return keys
