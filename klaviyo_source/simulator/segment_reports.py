"""Klaviyo's segment reports: ``POST /api/segment-series-reports`` (figures per interval) and
``POST /api/segment-values-reports`` (figures for a whole timeframe), answered from the
account's membership change log.

Request bodies are checked as the specs (2024-10-15 onwards) describe them: ``data.type``,
``attributes.statistics`` (``members_added``, ``members_removed``, ``net_members_changed``,
``total_members``), a ``timeframe`` (a ``key`` or a custom ``start``/``end``, at most a year,
no data before 2023-06-01), the series' ``interval`` (hourly up to 7 days, daily up to 60,
monthly up to 52 weeks) and a ``filter`` on ``segment_id`` (``equals`` or ``any`` of at most
100 ids, one filter per attribute). Anything else is a 400 ``invalid`` naming the field.

Figures follow the change log: a join adds a member, a leave or the segment's deletion removes
one, a re-join of a member does neither; ``total_members`` counts the members at the end of
each interval. A report trails live membership by ``ReportSettings.lag``: later changes are not
counted yet. Custom timeframes ignore the offsets they are given (the specs: "the company
timezone is used"); the simulated company's time zone is UTC. An interval's figures cover the
part of it inside the timeframe, and a day still under way counts what happened so far.
Deleted segments and ids the account never had are left out of the results.

Choices where Klaviyo documents nothing (inferred): a custom timeframe is ``[start, end)``;
``last_N_days`` are the N whole days before today; weeks start on Monday; the error texts.
"""

from __future__ import annotations

import bisect
import calendar
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from .account import Account
from .errors import ApiError, invalid
from .filters import FieldSpec, check_filter, parse_datetime, parse_filter
from .rate_limits import BURST, DAILY, STEADY, Window

SERIES_OPERATION = "query_segment_series"
VALUES_OPERATION = "query_segment_values"
SERIES_TYPE = "segment-series-report"
VALUES_TYPE = "segment-values-report"
# The first revision whose spec has both endpoints (2024-07-15's reporting has none of them).
REPORTS_SINCE = "2024-10-15"
STATISTICS = ("members_added", "members_removed", "net_members_changed", "total_members")
DATA_FLOOR = datetime(2023, 6, 1, tzinfo=timezone.utc)
FLOOR_DETAIL = "Data is unavailable before June 1st, 2023. Please use a time frame after this date."
MAX_TIMEFRAME = timedelta(days=366)  # "Max length: 1 year", leap years included
MAX_PER_INTERVAL = {
    "hourly": (timedelta(days=7), "7 days"),
    "daily": (timedelta(days=60), "60 days"),
    "weekly": (MAX_TIMEFRAME, "1 year"),
    "monthly": (timedelta(weeks=52), "52 weeks"),
}
TIMEFRAME_KEYS = (
    "last_12_months",
    "last_30_days",
    "last_365_days",
    "last_3_months",
    "last_7_days",
    "last_90_days",
    "last_month",
    "last_week",
    "last_year",
    "this_month",
    "this_week",
    "this_year",
    "today",
    "yesterday",
)
MAX_IDS_PER_ANY = 100
_OFFSET = re.compile(r"(Z|[+-]\d{2}:\d{2})$")
_FILTERS = {"segment_id": FieldSpec.of("string", ("equals",), ("any",))}
# x-klaviyo-ratelimit of both endpoints: 1/s, 2/m and 225 a day.
DAILY_LIMIT = 225
# How far reports trail live membership unless configured otherwise.
DEFAULT_LAG = timedelta(minutes=10)


@dataclass
class ReportSettings:
    """How the simulated reports behave: their lag, and the daily cap of each endpoint.

    Both may be changed while the simulator serves (``simulator.reports.lag = ...``).
    """

    lag: timedelta = DEFAULT_LAG
    daily_limit: int = DAILY_LIMIT

    def windows(self) -> tuple[Window, ...]:
        """The rate windows each report endpoint is charged to."""
        return (Window(1, BURST), Window(2, STEADY), Window(self.daily_limit, DAILY))


@dataclass(frozen=True)
class ReportQuery:
    """A checked report request."""

    statistics: tuple[str, ...]
    start: datetime
    end: datetime
    segment_ids: tuple[str, ...] | None  # None: every segment
    interval: str | None = None  # series only


@dataclass
class _History:
    """One segment's counted changes in time order, with running sums for fast intervals."""

    times: list[datetime] = field(default_factory=list)
    added: list[int] = field(default_factory=lambda: [0])
    removed: list[int] = field(default_factory=lambda: [0])

    def add(self, at: datetime, kind: str) -> None:
        joined = kind == "join"
        self.times.append(at)
        self.added.append(self.added[-1] + joined)
        self.removed.append(self.removed[-1] + (not joined))

    def figures(self, start: datetime, end: datetime, cutoff: datetime) -> dict[str, int]:
        """Figures of ``[start, end)``, counting changes up to ``cutoff`` only."""
        counted = bisect.bisect_right(self.times, cutoff)
        first = min(bisect.bisect_left(self.times, start), counted)
        last = min(bisect.bisect_left(self.times, end), counted)
        added = self.added[last] - self.added[first]
        removed = self.removed[last] - self.removed[first]
        return {
            "members_added": added,
            "members_removed": removed,
            "net_members_changed": added - removed,
            "total_members": self.added[last] - self.removed[last],
        }


class SegmentReports:
    """Answers both report operations for one account."""

    def __init__(self, account: Account, settings: ReportSettings) -> None:
        self.account = account
        self.settings = settings
        self._lock = threading.Lock()
        self._histories: tuple[int, dict[str, _History]] = (-1, {})

    def series(self, body: bytes) -> dict[str, Any]:
        """The document of ``POST /api/segment-series-reports``."""
        query = parse_request(body, SERIES_TYPE, self.account.now())
        starts = interval_starts(query.start, query.end, query.interval or "daily")
        bounds = [*starts[1:], query.end]
        results = []
        for segment_id, history in self._selected(query):
            figures = [
                history.figures(max(lo, query.start), hi, self._cutoff())
                for lo, hi in zip(starts, bounds, strict=True)
            ]
            results.append(
                {
                    "groupings": {"segment_id": segment_id},
                    "statistics": {
                        name: [figure[name] for figure in figures] for name in query.statistics
                    },
                }
            )
        attributes = {"results": results, "date_times": [_iso(start) for start in starts]}
        return {"data": {"type": SERIES_TYPE, "attributes": attributes}}

    def values(self, body: bytes) -> dict[str, Any]:
        """The document of ``POST /api/segment-values-reports``."""
        query = parse_request(body, VALUES_TYPE, self.account.now())
        results = []
        for segment_id, history in self._selected(query):
            figures = history.figures(query.start, query.end, self._cutoff())
            results.append(
                {
                    "groupings": {"segment_id": segment_id},
                    "statistics": {name: figures[name] for name in query.statistics},
                }
            )
        return {"data": {"type": VALUES_TYPE, "attributes": {"results": results}}}

    def _cutoff(self) -> datetime:
        return self.account.now() - self.settings.lag

    def _selected(self, query: ReportQuery) -> list[tuple[str, _History]]:
        """The live segments the query names (all when it names none), with their histories."""
        histories = self._all_histories()
        live = self.account.segments()
        wanted = sorted(live) if query.segment_ids is None else query.segment_ids
        return [(sid, histories.get(sid, _History())) for sid in wanted if sid in live]

    def _all_histories(self) -> dict[str, _History]:
        """Every segment's counted changes, rebuilt only when the account changed."""
        with self._lock:
            version, histories = self._histories
            if version == self.account.version:
                return histories
        with self.account.lock:
            version = self.account.version
            changes = self.account.membership_changes()
        histories = {}
        for change in changes:
            if change.kind != "rejoin":
                histories.setdefault(change.segment_id, _History()).add(change.at, change.kind)
        with self._lock:
            self._histories = (version, histories)
        return histories


# ---------------------------------------------------------------------------- requests
def parse_request(body: bytes, report_type: str, now: datetime) -> ReportQuery:
    """Check a report request's body; raise the 400 Klaviyo would answer."""
    attributes = _attributes(body, report_type)
    series = report_type == SERIES_TYPE
    allowed = {"statistics", "timeframe", "filter", *(("interval",) if series else ())}
    for name in attributes:
        if name not in allowed:
            raise invalid(
                f"'{name}' is not a valid field for the resource '{report_type}'.",
                pointer=f"/data/attributes/{name}",
            )
    statistics = _statistics(attributes.get("statistics"))
    start, end = _timeframe(attributes.get("timeframe"), now)
    interval = _interval(attributes.get("interval"), end - start) if series else None
    return ReportQuery(statistics, start, end, _segment_ids(attributes.get("filter")), interval)


def _attributes(body: bytes, report_type: str) -> dict[str, Any]:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise invalid(
            "JSON parse error: the request body is not valid JSON.", pointer="/data/"
        ) from None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, dict):
        raise invalid("The request body must contain a 'data' object.", pointer="/data")
    if data.get("type") != report_type:
        raise invalid(f"Invalid resource type; expected '{report_type}'.", pointer="/data/type")
    attributes = data.get("attributes")
    if not isinstance(attributes, dict):
        raise invalid("'attributes' must be an object.", pointer="/data/attributes")
    return attributes


def _statistics(value: Any) -> tuple[str, ...]:
    pointer = "/data/attributes/statistics"
    if value is None:
        raise invalid("'statistics' is required.", pointer=pointer)
    if not isinstance(value, list) or not value:
        raise invalid("'statistics' must be a non-empty list.", pointer=pointer)
    for name in value:
        if name not in STATISTICS:
            raise invalid(f"'{name}' is not a valid statistic for this report.", pointer=pointer)
    return tuple(dict.fromkeys(value))


def _timeframe(value: Any, now: datetime) -> tuple[datetime, datetime]:
    pointer = "/data/attributes/timeframe"
    if value is None:
        raise invalid("'timeframe' is required.", pointer=pointer)
    if not isinstance(value, dict):
        raise invalid("'timeframe' must be an object.", pointer=pointer)
    if "key" in value:
        if set(value) != {"key"}:
            raise invalid(
                "A timeframe has either a 'key' or a 'start' and an 'end'.", pointer=pointer
            )
        if value["key"] not in TIMEFRAME_KEYS:
            raise invalid(
                f"'{value['key']}' is not a valid timeframe key.", pointer=f"{pointer}/key"
            )
        start, end = timeframe_of_key(value["key"], now)
    else:
        start = _wall_clock(value, "start", pointer)
        end = _wall_clock(value, "end", pointer)
        for name in value:
            if name not in ("start", "end"):
                raise invalid(
                    f"'{name}' is not a valid field of a timeframe.", pointer=f"{pointer}/{name}"
                )
        if start >= end:
            raise invalid("The timeframe's start must be before its end.", pointer=pointer)
    if start < DATA_FLOOR:
        raise invalid(FLOOR_DETAIL, pointer=pointer)
    if end - start > MAX_TIMEFRAME:
        raise invalid("The time frame cannot be longer than 1 year.", pointer=pointer)
    return start, end


def _wall_clock(timeframe: dict[str, Any], name: str, pointer: str) -> datetime:
    """A custom timeframe's bound as the company's wall-clock time: its offset is ignored."""
    value = timeframe.get(name)
    if value is None:
        raise invalid(f"A custom timeframe needs '{name}'.", pointer=f"{pointer}/{name}")
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return parse_datetime(_OFFSET.sub("", value))
    except ValueError:
        raise invalid(f"'{name}' must be a datetime.", pointer=f"{pointer}/{name}") from None


def _interval(value: Any, length: timedelta) -> str:
    pointer = "/data/attributes/interval"
    if value is None:
        raise invalid("'interval' is required.", pointer=pointer)
    if value not in MAX_PER_INTERVAL:
        raise invalid(f"'{value}' is not a valid interval.", pointer=pointer)
    longest, said = MAX_PER_INTERVAL[value]
    if length > longest:
        raise invalid(
            f"If {value} is used, the timeframe cannot be longer than {said}.", pointer=pointer
        )
    return str(value)


def _segment_ids(value: Any) -> tuple[str, ...] | None:
    pointer = "/data/attributes/filter"
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("'filter' must be a string.", pointer=pointer)
    try:
        conditions = parse_filter(value)
        check_filter(conditions, _FILTERS, datetime.now(timezone.utc))
    except ApiError as error:
        raise invalid(error.detail, pointer=pointer) from None
    if len(conditions) > 1:
        raise invalid("Only one filter can be used per attribute.", pointer=pointer)
    ids = conditions[0].value.python()
    ids = ids if isinstance(ids, list) else [ids]
    if len(ids) > MAX_IDS_PER_ANY:
        raise invalid(f"Max of {MAX_IDS_PER_ANY} segment ids per ANY filter.", pointer=pointer)
    return tuple(dict.fromkeys(ids))


# ---------------------------------------------------------------------------- time
def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=timezone.utc)


def _months_before(day: date, months: int) -> date:
    month_index = day.year * 12 + day.month - 1 - months
    year, month = divmod(month_index, 12)
    return date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


def timeframe_of_key(key: str, now: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` of a predefined timeframe at ``now`` (the company's time zone: UTC)."""
    today = now.date()
    monday = today - timedelta(days=today.weekday())
    first_of_month = today.replace(day=1)
    first_of_year = today.replace(month=1, day=1)
    days = {"last_7_days": 7, "last_30_days": 30, "last_90_days": 90, "last_365_days": 365}
    if key in days:
        return _midnight(today - timedelta(days=days[key])), _midnight(today)
    ranges = {
        "today": (today, None),
        "yesterday": (today - timedelta(days=1), today),
        "this_week": (monday, None),
        "last_week": (monday - timedelta(days=7), monday),
        "this_month": (first_of_month, None),
        "last_month": (_months_before(first_of_month, 1), first_of_month),
        "this_year": (first_of_year, None),
        "last_year": (first_of_year.replace(year=today.year - 1), first_of_year),
        "last_3_months": (_months_before(today, 3), today),
        "last_12_months": (_months_before(today, 12), today),
    }
    first, last = ranges[key]
    return _midnight(first), (now if last is None else _midnight(last))


def interval_starts(start: datetime, end: datetime, interval: str) -> list[datetime]:
    """The start of every interval that overlaps ``[start, end)``, the first one aligned to
    its interval (the hour, the day, Monday, the 1st)."""
    if interval == "hourly":
        first = start.replace(minute=0, second=0, microsecond=0)
    else:
        first = _midnight(start.date())
        if interval == "weekly":
            first -= timedelta(days=first.weekday())
        elif interval == "monthly":
            first = first.replace(day=1)
    starts = []
    current = first
    while current < end:
        starts.append(current)
        if interval == "monthly":
            year, month = divmod(current.year * 12 + current.month, 12)
            current = current.replace(year=year, month=month + 1)
        else:
            step = {"hourly": timedelta(hours=1), "daily": timedelta(days=1)}
            current += step.get(interval, timedelta(weeks=1))
    return starts


def _iso(value: datetime) -> str:
    return value.isoformat()
