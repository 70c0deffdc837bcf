"""Klaviyo's daily segment reports as the table `segment_reports_daily`.

`POST /api/segment-series-reports` gives, per segment and day, `members_added`,
`members_removed`, `net_members_changed` and `total_members`, from 2023-06-01 on: days long
before this pipeline's first export, and leaves the membership walks can only bound. One
request covers up to 100 segments and 60 days, at 1/s, 2/min and 225 a day, so a backfill of
N days for S segments costs ceil(S/100) * ceil(N/60) requests.

The days loaded for each segment form one unbroken range, kept in the resource's dlt state at
`resources.segment_reports_daily.days_loaded.<segment id>` = [first, last]. Each run:

1. reads again, oldest window first, a loaded segment's last days up to today (a report for
   a recent day may still change while Klaviyo catches up), so its range never breaks: each
   segment once an hour (`segment_reports_reread_minutes`), the longest unread first, and no
   more segments than two requests cover, so that no run waits a minute on the reports;
2. backfills, newest window first, down to each segment's first day: the latest of its
   creation, the configured start and 2023-06-01;
3. stops cleanly once the day's requests are spent, by its own count (`requests_sent`, the
   last day's requests, in the same state) or by Klaviyo's word (a 429 that asks to wait past
   the steady window); the next run goes on from there. That is not a failure of the run.

Days are Klaviyo's: it reads a timeframe in the account's time zone (UTC for the simulator), so
for another zone a `date` is that zone's day. A row of today is what Klaviyo counted so far.

The resource's generator runs in the pipeline's thread, and it alone reads and writes that
state; each request runs in one of dlt's extract workers, handed over as a callable, so that the
half minute between two report requests holds up no membership walk.
"""

import functools
import logging
import math
import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    FrozenSet,
    Generic,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import dlt
import pyarrow as pa
from dlt.common.pipeline import SupportsPipeline
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.destinations.exceptions import DatabaseUndefinedRelation

from . import settings
from .client import KlaviyoClient
from .errors import KlaviyoConfigError, KlaviyoDailyQuotaSpent, endpoint_not_served
from .filters import quoted
from .rows import Row, parse_datetime
from .segment_listing import ListedSegment

logger = logging.getLogger(__name__)

T = TypeVar("T")
Days = Tuple[date, date]  # first and last day, both included

REPORT_COLUMNS: TTableSchemaColumns = {
    "report_id": {"data_type": "text", "nullable": False},
    "segment_id": {"data_type": "text", "nullable": False},
    "date": {"data_type": "date", "nullable": False},
    "members_added": {"data_type": "bigint"},
    "members_removed": {"data_type": "bigint"},
    "net_members_changed": {"data_type": "bigint"},
    "total_members": {"data_type": "bigint"},
    # When the run that read the figures started: a recent day's may have changed since.
    "reported_at": {"data_type": "timestamp"},
    "_dlt_load_id": {"data_type": "text", "nullable": False},
}
# The rows of a request travel as one Arrow table: dlt writes it as it is, and DuckDB loads
# parquet several times faster than rows of values. dlt adds no `_dlt_load_id` to Arrow
# tables, so each carries the run's (newest-version reading of plain files needs it).
_ARROW_SCHEMA = pa.schema(
    [
        pa.field("report_id", pa.string(), nullable=False),
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("date", pa.date32(), nullable=False),
        *(pa.field(name, pa.int64()) for name in settings.SEGMENT_REPORT_STATISTICS),
        pa.field("reported_at", pa.timestamp("us", tz="UTC")),
        pa.field("_dlt_load_id", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class ReportOptions:
    """Which segments' reports a run reads, from which day, and how often it reads a
    segment's settling days again."""

    segment_filter: Optional[str]
    start: date = settings.SEGMENT_REPORTS_FIRST_DAY
    settle_days: int = settings.SEGMENT_REPORTS_SETTLE_DAYS
    reread_every: timedelta = settings.DEFAULT_REPORT_REREAD_EVERY

    @classmethod
    def from_config(
        cls, segment_filter: Optional[str], start: Optional[str], reread_minutes: float
    ) -> "ReportOptions":
        """Options from the source's configuration; a start that is no date is refused."""
        if not reread_minutes >= 0:  # also refuses NaN
            raise KlaviyoConfigError(
                f"segment_reports_reread_minutes {reread_minutes!r} is negative: set it to 0 "
                "(every run) or more in [sources.klaviyo]."
            )
        reread_every = timedelta(minutes=reread_minutes)
        if start is None:
            return cls(segment_filter, reread_every=reread_every)
        try:
            day = date.fromisoformat(str(start).strip()[:10])
        except ValueError:
            raise KlaviyoConfigError(
                f"segment_reports_start {start!r} is not a date: write it as YYYY-MM-DD in "
                "[sources.klaviyo] segment_reports_start."
            ) from None
        # Klaviyo has no figures before its first day: an earlier start means that day.
        first = max(day, settings.SEGMENT_REPORTS_FIRST_DAY)
        return cls(segment_filter, first, reread_every=reread_every)


def reports_wanted(enabled: bool, revision: str) -> bool:
    """Whether this run reads segment reports: asked for, and served at `revision`."""
    if not enabled:
        return False
    if revision[:10] < settings.SEGMENT_REPORTS_SINCE:
        logger.info(
            f"{settings.SEGMENT_REPORTS_TABLE} is skipped: Klaviyo serves segment reports from "
            f"revision {settings.SEGMENT_REPORTS_SINCE}, and [sources.klaviyo] revision is "
            f"{revision}."
        )
        return False
    return True


# -- what to ask for ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportedSegment:
    """A segment whose reports are read, from `first_day` on."""

    id: str
    first_day: date


@dataclass(frozen=True)
class ReportRequest:
    """One series request: the days `first` to `last` of up to 100 segments."""

    first: date
    last: date
    segment_ids: Tuple[str, ...]

    def timeframe(self) -> Dict[str, str]:
        """Whole days: from the first one's midnight to the midnight after the last one."""
        end = self.last + timedelta(days=1)
        return {"start": f"{self.first}T00:00:00+00:00", "end": f"{end}T00:00:00+00:00"}

    def filter(self) -> str:
        return f"any(segment_id,[{','.join(quoted(sid) for sid in self.segment_ids)}])"


def rereads_due(
    loaded: Sequence[str],
    read_again_at: Mapping[str, datetime],
    now: datetime,
    every: timedelta,
    at_most: int = settings.SEGMENT_REPORT_REREADS_PER_RUN,
) -> FrozenSet[str]:
    """The loaded segments whose last days this run reads again: those not read again for
    `every`, the longest unread first, at most `at_most` of them."""
    due = [
        segment_id
        for segment_id in loaded
        if segment_id not in read_again_at or now - read_again_at[segment_id] >= every
    ]
    never = datetime.min.replace(tzinfo=timezone.utc)
    due.sort(key=lambda segment_id: (read_again_at.get(segment_id, never), segment_id))
    return frozenset(due[:at_most])


def plan_requests(
    segments: Sequence[ReportedSegment],
    loaded: Mapping[str, Days],
    today: date,
    settle_days: int = settings.SEGMENT_REPORTS_SETTLE_DAYS,
    reread: Optional[Collection[str]] = None,
) -> List[ReportRequest]:
    """Every request a run makes, in order: the re-reads, then the backfill, newest first.

    `reread` names the loaded segments whose last days are read again (all if None). Segments
    that need the same days share requests. A segment's days stay one range whatever request a
    run stops at: re-reads go forwards from its range, backfills backwards.
    """
    rereads: Dict[date, List[ReportedSegment]] = {}
    backfills: Dict[date, List[ReportedSegment]] = {}  # by the newest day still missing
    for segment in segments:
        if segment.first_day > today:
            continue
        days = loaded.get(segment.id)
        if days is None:
            backfills.setdefault(today, []).append(segment)
            continue
        first, last = days
        if reread is None or segment.id in reread:
            settling = last - timedelta(days=settle_days - 1)
            rereads.setdefault(max(segment.first_day, first, settling), []).append(segment)
        if first > segment.first_day:
            backfills.setdefault(first - timedelta(days=1), []).append(segment)
    requests = [
        request for start in sorted(rereads) for request in _forwards(start, today, rereads[start])
    ]
    backfill = [
        request for newest in backfills for request in _backwards(newest, backfills[newest])
    ]
    backfill.sort(key=lambda request: request.last, reverse=True)
    return requests + backfill


def _forwards(start: date, today: date, segments: List[ReportedSegment]) -> Iterator[ReportRequest]:
    """Windows from `start` to today, oldest first."""
    first = start
    while first <= today:
        last = min(first + timedelta(days=settings.SEGMENT_REPORT_MAX_DAYS - 1), today)
        yield from _batches(first, last, segments)
        first = last + timedelta(days=1)


def _backwards(newest: date, segments: List[ReportedSegment]) -> Iterator[ReportRequest]:
    """Windows from `newest` back to the segments' first days, newest first; a window names
    only the segments that still need its days."""
    last = newest
    while needing := [segment for segment in segments if segment.first_day <= last]:
        longest = last - timedelta(days=settings.SEGMENT_REPORT_MAX_DAYS - 1)
        first = max(longest, min(segment.first_day for segment in needing))
        yield from _batches(first, last, needing)
        last = first - timedelta(days=1)


def _batches(first: date, last: date, segments: List[ReportedSegment]) -> Iterator[ReportRequest]:
    ids = sorted(segment.id for segment in segments)
    size = settings.SEGMENT_REPORT_MAX_SEGMENTS
    for start in range(0, len(ids), size):
        yield ReportRequest(first, last, tuple(ids[start : start + size]))


# -- what Klaviyo answers -------------------------------------------------------------------


def reported_segments(resources: Sequence[Mapping[str, Any]], start: date) -> List[ReportedSegment]:
    """Listed segments, each from the latest of its creation day and the start."""
    found: Dict[str, ReportedSegment] = {}
    for resource in resources:
        created = (resource.get("attributes") or {}).get("created")
        first_day = start
        if created:
            first_day = max(first_day, parse_datetime(created).date())
        found.setdefault(resource["id"], ReportedSegment(resource["id"], first_day))
    return list(found.values())


def list_reported_segments(client: KlaviyoClient, options: ReportOptions) -> List[ReportedSegment]:
    """The selected segments, listed for the reports alone (`SegmentsListed` saves that)."""
    pages = client.get_segments(filter=options.segment_filter, fields_segment=["created"])
    return reported_segments([r for page in pages for r in page.get("data") or []], options.start)


class SegmentsListed:
    """The live segments this run's segment listing found, handed on to the reports.

    Both sides run in the pipeline's thread: the listing publishes the segments once it has
    read them whole, and the reports wait for them instead of listing them a second time.
    """

    LISTING = "segment_listing"

    def __init__(self) -> None:
        self._resources: Optional[List[Dict[str, Any]]] = None

    def publish(self, listed: Sequence[ListedSegment]) -> None:
        self._resources = [segment.resource for segment in listed if segment.resource]

    @property
    def ready(self) -> bool:
        return self._resources is not None

    def coming(self) -> bool:
        """Whether this run extracts the listing at all (not when the reports run alone)."""
        extracted = dlt.current.source().resources.extracted
        return any(resource.name == self.LISTING for resource in extracted)

    def reported(self, start: date) -> List[ReportedSegment]:
        return reported_segments(self._resources or [], start)


def report_rows(
    document: Mapping[str, Any], first_days: Mapping[str, date], reported_at: datetime
) -> List[Row]:
    """Rows of a series report: one per segment asked for and day from its first day.

    A day is the date Klaviyo gives it, in the account's time zone: the offset of its
    `date_times` is not applied.
    """
    attributes = (document.get("data") or {}).get("attributes") or {}
    days = [date.fromisoformat(str(stamp)[:10]) for stamp in attributes.get("date_times") or []]
    rows: List[Row] = []
    for result in attributes.get("results") or []:
        segment_id = str((result.get("groupings") or {}).get("segment_id"))
        first_day = first_days.get(segment_id)
        if first_day is None:
            continue  # not a segment this request named
        statistics = result.get("statistics") or {}
        for index, day in enumerate(days):
            if day < first_day:
                continue
            row: Row = {"report_id": f"{segment_id}:{day}", "segment_id": segment_id, "date": day}
            for name in settings.SEGMENT_REPORT_STATISTICS:
                values = statistics.get(name) or []
                value = values[index] if index < len(values) else None
                row[name] = None if value is None else int(value)
            row["reported_at"] = reported_at
            rows.append(row)
    return rows


def fetch_report(
    client: KlaviyoClient,
    request: ReportRequest,
    first_days: Mapping[str, date],
    reported_at: datetime,
    load_id: str,
) -> pa.Table:
    """One request's rows, as an Arrow table stamped with the run's load id."""
    document = client.query_segment_series(
        settings.SEGMENT_REPORT_STATISTICS,
        request.timeframe(),
        "daily",
        filter=request.filter(),
    )
    rows = report_rows(document, first_days, reported_at)
    for row in rows:
        row["_dlt_load_id"] = load_id
    return pa.Table.from_pylist(rows, schema=_ARROW_SCHEMA)


# -- what is loaded, what is spent: the resource's state ------------------------------------


class LoadedDays:
    """The days loaded of each segment, one range each, kept in the resource's state."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self._days: Dict[str, List[str]] = state.setdefault(settings.REPORT_DAYS_STATE_KEY, {})
        self._read_again: Dict[str, str] = state.setdefault(settings.REPORT_REREAD_STATE_KEY, {})

    def ranges(self) -> Dict[str, Days]:
        return {
            segment_id: (date.fromisoformat(first), date.fromisoformat(last))
            for segment_id, (first, last) in self._days.items()
        }

    def record(self, request: ReportRequest, today: date, started: datetime) -> None:
        """A request's days are loaded for each of its segments; a request up to today is
        each one's reading again of its last days."""
        for segment_id in request.segment_ids:
            if request.last >= today:
                self._read_again[segment_id] = started.isoformat()
            first, last = request.first, request.last
            if segment_id in self._days:
                held_first, held_last = self._days[segment_id]
                first = min(first, date.fromisoformat(held_first))
                last = max(last, date.fromisoformat(held_last))
            self._days[segment_id] = [first.isoformat(), last.isoformat()]

    def forget(self) -> None:
        self._days.clear()
        self._read_again.clear()

    def read_again_at(self) -> Dict[str, datetime]:
        """When each segment's days up to today were last read."""
        return {segment_id: parse_datetime(at) for segment_id, at in self._read_again.items()}


class DailyQuota:
    """Report requests sent in the last day, kept in the resource's state, against the cap.

    The day is a sliding one: it can hold no more requests than any fixed day within it.
    """

    def __init__(self, state: Dict[str, Any], cap: int, day: timedelta) -> None:
        self._sent: List[str] = state.setdefault(settings.REPORT_REQUESTS_STATE_KEY, [])
        self.cap = cap
        self._day = day

    @classmethod
    def of_client(cls, state: Dict[str, Any], client: KlaviyoClient) -> "DailyQuota":
        """This source's share of the daily cap, on the client's (simulator's) clock."""
        limiter = client.rate_limiter
        share = limiter.share if limiter is not None else 1.0
        scale = limiter.time_scale if limiter is not None else 1.0
        cap = max(1, math.floor(settings.REPORTS_PER_DAY * share))
        return cls(state, cap, timedelta(days=1) / scale)

    def remaining(self, now: datetime) -> int:
        since = now - self._day
        self._sent[:] = [sent for sent in self._sent if parse_datetime(sent) > since]
        return max(0, self.cap - len(self._sent))

    def spend(self, now: datetime) -> None:
        self._sent.append(now.isoformat())


def failed_segment_reports(pipeline: SupportsPipeline) -> Optional[str]:
    """Why the last run's segment reports stopped short, if they failed."""
    resources = pipeline.state.get("sources", {}).get("klaviyo", {}).get("resources", {})
    failure = resources.get(settings.SEGMENT_REPORTS_TABLE, {}).get(
        settings.REPORT_FAILURE_STATE_KEY
    )
    return str(failure) if failure else None


def _destination_holds_rows(table: str) -> bool:
    """Whether the running pipeline's destination holds a row of `table` (True when no
    destination can be asked: the state is then all there is)."""
    try:
        client = dlt.current.pipeline().sql_client()  # type: ignore[attr-defined]
    except Exception:  # no pipeline, or a destination without SQL: nothing to ask
        return True
    with client:
        qualified = client.make_qualified_table_name(table)
        try:
            with client.execute_query(f"SELECT 1 FROM {qualified} LIMIT 1") as cursor:
                return cursor.fetchone() is not None
        except DatabaseUndefinedRelation:
            return False


# -- the resource ----------------------------------------------------------------------------


class WorkerCall(Generic[T]):
    """A call dlt runs in an extract worker, while the pipeline's thread polls `done`.

    With `loads`, what the call returns goes on to dlt as rows; either way it stays in `value`.
    An error is kept in `error` for the pipeline's thread to decide about.
    """

    def __init__(self, work: Callable[[], T], *, loads: bool = False) -> None:
        self._work = work
        self._loads = loads
        self._done = threading.Event()
        self.value: Optional[T] = None
        self.error: Optional[Exception] = None

    def __call__(self) -> Optional[T]:
        try:
            self.value = self._work()
            return self.value if self._loads else None
        except Exception as error:  # handed to the pipeline's thread, which decides
            self.error = error
            return None
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()


def _in_worker(call: WorkerCall[Any]) -> Iterator[Any]:
    """Hand `call` to dlt's worker pool, and give the pipeline's thread back until it is done."""
    yield call
    while not call.done:
        yield None


def daily_segment_reports(
    client: KlaviyoClient, options: ReportOptions, started: datetime, listed: SegmentsListed
) -> Iterator[Any]:
    """The `segment_reports_daily` resource; see the module's docstring."""
    state = dlt.current.resource_state(settings.SEGMENT_REPORTS_TABLE)
    state.pop(settings.REPORT_FAILURE_STATE_KEY, None)
    loaded = LoadedDays(state)
    if loaded.ranges() and not _destination_holds_rows(settings.SEGMENT_REPORTS_TABLE):
        logger.info(f"{settings.SEGMENT_REPORTS_TABLE} holds no row: its days are read anew")
        loaded.forget()
    if listed.coming():
        while not listed.ready:
            yield None
        segments = listed.reported(options.start)
    else:
        listing = WorkerCall(functools.partial(list_reported_segments, client, options))
        yield from _in_worker(listing)
        if listing.error is not None or listing.value is None:
            _failed(state, listing.error)
            return
        segments = listing.value
    ranges = loaded.ranges()
    held = [segment.id for segment in segments if segment.id in ranges]
    reread = rereads_due(held, loaded.read_again_at(), started, options.reread_every)
    requests = plan_requests(segments, ranges, started.date(), options.settle_days, reread)
    first_days = {segment.id: segment.first_day for segment in segments}
    load_id = dlt.current.load_package_state()["load_id"]
    yield from _read_reports(client, requests, first_days, (started, load_id), state)


def _read_reports(
    client: KlaviyoClient,
    requests: List[ReportRequest],
    first_days: Mapping[str, date],
    stamps: Tuple[datetime, str],
    state: Dict[str, Any],
) -> Iterator[Any]:
    """Send the planned requests in order, each in a worker; record each one's days once
    it answered, and stop at the daily cap, at a revision without reports or at a failure."""
    loaded = LoadedDays(state)
    quota = DailyQuota.of_client(state, client)
    rows = 0
    for done, request in enumerate(requests):
        if quota.remaining(datetime.now(timezone.utc)) == 0:
            _quota_spent(done, len(requests), rows, f"{quota.cap} requests in the last day")
            return
        fetch = functools.partial(fetch_report, client, request, first_days, *stamps)
        call = WorkerCall(fetch, loads=True)
        yield from _in_worker(call)
        if isinstance(call.error, KlaviyoDailyQuotaSpent):
            _quota_spent(done, len(requests), rows, "Klaviyo answered 429 for longer than a minute")
            return
        quota.spend(datetime.now(timezone.utc))
        if endpoint_not_served(call.error):
            logger.warning(
                f"{settings.SEGMENT_REPORTS_TABLE} is skipped: Klaviyo does not serve segment "
                f"reports at revision {client.revision} ({call.error}). Set [sources.klaviyo] "
                "revision to a newer one, or segment_reports = false."
            )
            return
        if call.error is not None:
            _failed(state, call.error)
            return
        loaded.record(request, stamps[0].date(), stamps[0])
        rows += call.value.num_rows if call.value is not None else 0
    logger.info(
        f"{settings.SEGMENT_REPORTS_TABLE}: {rows} rows in {len(requests)} requests; every "
        "selected segment's days are loaded up to today"
    )


def _quota_spent(done: int, planned: int, rows: int, why: str) -> None:
    logger.warning(
        f"{settings.SEGMENT_REPORTS_TABLE}: {rows} rows in {done} requests, then the day's "
        f"report requests were spent ({why}). Not a failure: the {planned - done} request(s) "
        "left wait for a later run, which goes on from here."
    )


def _failed(state: Dict[str, Any], error: Optional[Exception]) -> None:
    reason = (
        f"Segment reports stopped: {error} The days not loaded yet are read by the next run; "
        "set [sources.klaviyo] segment_reports = false to export without them."
    )
    state[settings.REPORT_FAILURE_STATE_KEY] = reason
    logger.error(reason)
