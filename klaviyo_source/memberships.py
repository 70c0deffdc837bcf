"""One segment's membership sync in one run: an incremental pass, then its leave check.

Incremental pass. Each segment keeps a cursor: the newest `joined_group_at` loaded for it. A
run asks for `greater-than(joined_group_at, cursor - lookback)` sorted by `joined_group_at`:
new joins and re-joins, plus a short window behind the cursor where late-visible joins and ties
land. Rows the destination already holds unchanged are not loaded again. The cursor moves only
once the whole pass was yielded, and dlt commits it together with the rows.

Leave checks. Klaviyo never says when a profile leaves. What the run planned for the segment
(`leave_checks`) is one of:

- read whole: the pass itself lists every member (`fields[profile]=joined_group_at` when
  profiles are off) and compares them with the members held. This finds leaves, re-joins and
  joins of any age; it is the scheduled full walk, and costs a one-page segment nothing extra;
- walk ids: after the pass, every member id is listed from `/relationships/profiles`, a quota
  of its own. A held id not listed has left; an id neither held nor loaded by the pass is a join
  the pass could not see (older than its lookback): its row is fetched from `/profiles` by
  `profile_id`, or, before the revision that filters on it, the segment is read whole instead.
  Re-joins come through the pass with their new `joined_group_at`;
- count: Klaviyo's `profile_count`, asked while the walks ran, against the members held plus
  the joins it can have seen; the ids are walked when they differ.

A leave happened after the membership was last seen present and before a walk saw it gone: both
bounds are kept. No segment is checked while it `is_processing`, when its membership is in flux.

One load holds each membership at most once. A member listed twice in one walk (it re-joined
while the walk ran) is loaded as first seen, and the cursor stops before its re-join so that
the next run loads the new period.
"""

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from requests.exceptions import RequestException

from . import settings
from .client import KlaviyoClient, resources_of
from .errors import (
    KlaviyoAPIError,
    KlaviyoAuthenticationError,
    KlaviyoConfigError,
    KlaviyoNotFound,
    KlaviyoPermissionError,
)
from .filters import joined_after, profile_id_in
from .held import HeldData, HeldMembership
from .leave_checks import LeaveCheck
from .member_pages import Member
from .members_this_run import MembersThisRun, Sighting
from .page_diff import diff_page, ended_membership, worth_a_look
from .profile_counts import ProfileCount, count_differs
from .profile_ids import JoinedTimes
from .rows import Row, parse_datetime
from .segment_listing import ListedSegment
from .walk_batch import WalkBatch

logger = logging.getLogger(__name__)

# Filters are sent in whole seconds: a second before a join keeps it inside `greater-than`.
CURSOR_BEFORE_REJOIN = timedelta(seconds=1)
# Held memberships ended at a time, when a reconciliation or a deleted segment ends many.
ENDED_AT_A_TIME = 10_000

# Whole held rows of some of a page's members, by profile id.
HeldRows = Callable[[List[str]], Mapping[str, HeldMembership]]


@dataclass(frozen=True)
class MembershipOptions:
    """What a membership sync asks Klaviyo for, and when it reconciles."""

    include_profiles: bool = True
    profile_additional_fields: Sequence[str] = ()
    lookback: timedelta = settings.DEFAULT_LOOKBACK
    reconcile: str = settings.DEFAULT_RECONCILE
    full_reconcile_every: Optional[timedelta] = settings.DEFAULT_FULL_RECONCILE_EVERY

    @classmethod
    def from_config(
        cls,
        include_profiles: bool,
        profile_additional_fields: Optional[Sequence[str]],
        lookback_minutes: float,
        reconcile: str,
        full_reconcile_every_hours: Optional[float],
    ) -> "MembershipOptions":
        """Options from the source's configuration, each bad value refused with its fix."""
        extra = list(profile_additional_fields or [])
        unknown = [name for name in extra if name not in settings.OPTIONAL_PROFILE_FIELDS]
        if unknown:
            raise KlaviyoConfigError(
                f"profile_additional_fields has {unknown}; allowed are "
                f"{list(settings.OPTIONAL_PROFILE_FIELDS)}. Fix [sources.klaviyo] "
                "profile_additional_fields."
            )
        if lookback_minutes < 0:
            raise KlaviyoConfigError(
                f"lookback_minutes is {lookback_minutes}; it must be 0 or more. Fix "
                "[sources.klaviyo] lookback_minutes."
            )
        if reconcile not in settings.RECONCILE_MODES:
            raise KlaviyoConfigError(
                f"reconcile is {reconcile!r}; it must be one of {list(settings.RECONCILE_MODES)}. "
                "Fix [sources.klaviyo] reconcile (or --reconcile)."
            )
        if full_reconcile_every_hours is not None and full_reconcile_every_hours <= 0:
            raise KlaviyoConfigError(
                f"full_reconcile_every_hours is {full_reconcile_every_hours}; it must be more "
                "than 0. Fix [sources.klaviyo] full_reconcile_every_hours."
            )
        return cls(
            include_profiles=include_profiles,
            profile_additional_fields=tuple(extra),
            lookback=timedelta(minutes=lookback_minutes),
            reconcile=reconcile,
            full_reconcile_every=(
                None
                if full_reconcile_every_hours is None
                else timedelta(hours=full_reconcile_every_hours)
            ),
        )

    def fields_profile(self) -> Optional[List[str]]:
        # Membership-only mode asks for the one attribute it needs, to keep pages small.
        return None if self.include_profiles else ["joined_group_at"]

    def additional_fields(self) -> Optional[List[str]]:
        if not self.include_profiles or not self.profile_additional_fields:
            return None
        return list(self.profile_additional_fields)


@dataclass
class SyncStats:
    """What one segment's sync did, for its log line and the count check."""

    requests: int = 0
    fetched: int = 0
    loaded: int = 0
    joined: int = 0
    left: int = 0
    newest: Optional[datetime] = None
    reconciled: bool = False  # every member was listed from /profiles
    ids_walked: bool = False  # every member id was listed from /relationships/profiles


@dataclass
class SegmentSync:
    """Everything one segment's sync needs; `run()` yields its table rows page by page."""

    client: KlaviyoClient
    segment_id: str
    cursor: Optional[datetime]
    reconciled_at: Optional[datetime]
    held: HeldData
    held_count: int
    options: MembershipOptions
    now: datetime
    members: MembersThisRun
    load_id: str
    leave_check: LeaveCheck = LeaveCheck.NONE
    profile_count: Optional["Future[ProfileCount]"] = None
    ids_walked_at: Optional[datetime] = None

    def __post_init__(self) -> None:
        self.stats = SyncStats()
        self._batch = WalkBatch(self.load_id)
        # The earliest join seen a second time in this walk (a re-join while it ran).
        self._rejoined_during_walk: Optional[datetime] = None
        # Whether the pass is over: walks after it list its re-joins again as repeats.
        self._passed = False
        # The memberships the walks loaded as new, for the count check. A count is asked after
        # the run started, so every join dated before that is in it: those are only counted.
        # Keeping each one's time grew with the segment (a datetime a membership).
        self._joins_before_start = 0
        # When each of the others joined (the run's own joins: few).
        self._join_times: List[datetime] = []
        self._held_joined: Optional[JoinedTimes] = None

    def run(self) -> Iterator[Any]:
        if self.leave_check is LeaveCheck.READ_WHOLE and self.cursor is not None:
            yield from self._read_whole()
        else:
            yield from self._incremental_pass()
        self._passed = True
        if self.leave_check is LeaveCheck.WALK_IDS or (
            self.leave_check is LeaveCheck.COUNT and self._count_differs()
        ):
            yield from self._walk_ids()
        yield from self._batch.flush()

    def gathered(self) -> Iterator[Any]:
        """Rows fetched but not handed on yet: after a failure they still load."""
        yield from self._batch.flush()

    @property
    def walked_in_full(self) -> bool:
        """Whether this run listed every current member from /profiles (with its join time)."""
        return self.cursor is None or self.stats.reconciled

    # -- incremental ------------------------------------------------------------------------

    def _walk(self, filter: Optional[str]) -> Iterator[List[Member]]:
        pages = self.client.get_segment_profiles(
            self.segment_id,
            filter=filter,
            sort="joined_group_at",
            fields_profile=self.options.fields_profile(),
            additional_fields_profile=self.options.additional_fields(),
        )
        for members in pages:
            self.stats.requests += 1
            self.stats.fetched += len(members)
            yield members

    def _incremental_pass(self) -> Iterator[Any]:
        since = None if self.cursor is None else self.cursor - self.options.lookback
        # An id walk reads when every held member joined anyway; read once, it serves the pass
        # too, which then looks up held rows only for members that changed. Each lookup is a
        # query, and walks take turns at the destination.
        every_held = (
            self._every_held()
            if self.leave_check is LeaveCheck.WALK_IDS and self.cursor is not None
            else None
        )
        for members in self._walk(None if since is None else joined_after(since)):
            if every_held is None:
                yield from self._page_changes(members)
            else:
                joined = {m.id: every_held[m.id] for m in members if m.id in every_held}
                yield from self._changes(members, joined, self._held_rows)

    def _every_held(self) -> JoinedTimes:
        """When each held member joined, read once a run (an id walk takes from it)."""
        if self._held_joined is None:
            self._held_joined = self.held.joined_times(self.segment_id)
        return self._held_joined

    def _page_changes(self, members: List[Member]) -> Iterator[Any]:
        """`_changes` of a page whose held rows are read with one lookup."""
        held = (
            self.held.members_among(self.segment_id, [member.id for member in members])
            if self.held_count
            else {}
        )
        joined = {profile_id: row.joined_group_at for profile_id, row in held.items()}
        yield from self._changes(members, joined, _already_read(held))

    def _changes(
        self, members: List[Member], held_joined: Mapping[str, datetime], held_rows: HeldRows
    ) -> Iterator[Any]:
        """Rows for the members of one page that are new, re-joined or not yet loaded.

        `held_joined` says when each held member joined; `held_rows` gives whole held rows,
        asked only for the few members whose row is needed (a re-join, a reload).
        """
        for member in members:
            joined = parse_datetime(member.joined_group_at)
            if self.stats.newest is None or joined > self.stats.newest:
                self.stats.newest = joined
        listed = worth_a_look(members, held_joined, reloading=self.cursor is None)
        sightings = self.members.sight(self.segment_id, [listing.id for listing in listed])
        # Repeats load nothing, so their held rows are not read.
        was_held = [
            listing.id
            for listing, sighting in zip(listed, sightings, strict=True)
            if listing.held_join is not None and sighting is not Sighting.REPEAT
        ]
        for listing, sighting in zip(listed, sightings, strict=True):
            if listing.held_join is None and sighting is not Sighting.REPEAT:
                if listing.joined <= self.now:
                    self._joins_before_start += 1
                else:
                    self._join_times.append(listing.joined)
        diff = diff_page(
            self.segment_id,
            listed,
            sightings,
            held_rows(was_held) if was_held else {},
            self.now,
            self.reconciled_at,
            self.options.include_profiles,
        )
        self.stats.joined += diff.joins
        for joined in diff.repeated_joins:
            self._seen_again(joined)
        yield from self._emit(diff.memberships, diff.ended_earlier, diff.profiles)

    def _seen_again(self, joined: datetime) -> None:
        """A member listed a second time in one walk: its first sighting is the one loaded.

        Keyset paging over a live segment lists a member again when it re-joins while the walk
        runs. Its new period waits for the next run, whose incremental pass must then start
        before this join. A repeat older than the lookback window cannot be such a re-join, and
        one in a walk after the pass joined after the pass, so the next pass lists it anyway.
        """
        if self._passed or joined < self.now - self.options.lookback:
            return
        if self._rejoined_during_walk is None or joined < self._rejoined_during_walk:
            self._rejoined_during_walk = joined

    @property
    def cursor_limit(self) -> Optional[datetime]:
        """Where the cursor must stop so the next run lists this walk's re-joins again."""
        if self._rejoined_during_walk is None:
            return None
        return self._rejoined_during_walk - CURSOR_BEFORE_REJOIN

    def _emit(
        self, memberships: List[Row], ended_earlier: List[Row], profiles: List[Row]
    ) -> Iterator[Any]:
        self.stats.loaded += len(memberships)
        yield from self._batch.add(memberships, ended_earlier, profiles)

    # -- leave checks -----------------------------------------------------------------------

    def _read_whole(self) -> Iterator[Any]:
        """List every current member from /profiles; what is held but gone has left."""
        self.stats.reconciled = True
        # Only join times are held for the whole segment; whole rows are read for the few
        # members that need one.
        remaining = self.held.joined_times(self.segment_id)
        for members in self._walk(None):
            page_joined = {m.id: remaining.pop(m.id) for m in members if m.id in remaining}
            # After the pass, joins it loaded a moment ago are not held yet; they come back as
            # repeats and are skipped.
            yield from self._changes(members, page_joined, self._held_rows)
        yield from self._end_leaves(list(remaining))

    def _count_differs(self) -> bool:
        """Whether Klaviyo's profile_count disagrees with what is held and was just loaded."""
        if self.profile_count is None:
            return True  # planned to be counted without a count: walk, to be sure
        count = self.profile_count.result()  # raises what asking for it raised
        self.stats.requests += 1
        # The joins before the run's start are in the count as surely as the held members.
        return count_differs(count, self.held_count + self._joins_before_start, self._join_times)

    def _walk_ids(self) -> Iterator[Any]:
        """List every member id; end the held ones not listed, fetch the joins the pass missed.

        Sorted by `joined_group_at`, keyset paging lists every member present throughout at
        least once: a re-join moves a member later, never before the page being read.
        """
        remaining = self._every_held()
        # Ids neither held nor listed before in this walk, in the order first listed.
        unheld: Dict[str, None] = {}
        pages = self.client.get_segment_relationships_profiles(
            self.segment_id, sort="joined_group_at"
        )
        for page in pages:
            self.stats.requests += 1
            for resource in resources_of(page):
                self.stats.fetched += 1
                profile_id = resource["id"]
                if remaining.pop(profile_id, None) is None:
                    unheld.setdefault(profile_id)
        # The pass loaded some of them this run; the others joined out of its sight, or
        # re-joined during this walk.
        unseen = list(unheld)
        loaded = self.members.listed_in(self.segment_id, unseen)
        missed = [pid for pid, loaded_now in zip(unseen, loaded, strict=True) if not loaded_now]
        if missed and not self._filters_by_profile_id():
            logger.info(
                f"segment {self.segment_id}: {len(missed)} members joined out of the "
                f"incremental pass's sight; revision {self.client.revision} cannot fetch them "
                f"by id (from {settings.PROFILE_ID_FILTER_SINCE}), so the segment is read whole"
            )
            yield from self._read_whole()
            return
        self.stats.ids_walked = True
        size = settings.SEGMENT_PROFILES_PAGE_SIZE
        for start in range(0, len(missed), size):
            for members in self._walk(profile_id_in(missed[start : start + size])):
                yield from self._page_changes(members)
        yield from self._end_leaves(list(remaining))

    def _filters_by_profile_id(self) -> bool:
        return self.client.revision[:10] >= settings.PROFILE_ID_FILTER_SINCE

    def _end_leaves(self, gone: List[str]) -> Iterator[Any]:
        """End the held memberships a walk of every member no longer listed.

        A member the pass loaded this run and the walk no longer lists left during the run:
        its row of this load stands, and the next check ends it. Leaves are dated by the run's
        start, which the profile refresh counts on (it asks next run for the profiles that
        left since then); one made after the run started and before the walk came by is dated
        that much early.
        """
        loaded = self.members.listed_in(self.segment_id, gone)
        left = [pid for pid, loaded_now in zip(gone, loaded, strict=True) if not loaded_now]
        for rows in _held_in_chunks(self.held, self.segment_id, left):
            ended = [self._ended(membership, self.now, "left") for membership in rows.values()]
            self.stats.left += len(ended)
            yield from self._emit(ended, [], [])

    def _held_rows(self, profile_ids: List[str]) -> Mapping[str, HeldMembership]:
        return self.held.members_among(self.segment_id, profile_ids)

    def _ended(self, held: HeldMembership, before: datetime, reason: str) -> Row:
        # Any walk that listed every member saw this one present then.
        seen = [when for when in (self.reconciled_at, self.ids_walked_at) if when is not None]
        return ended_membership(self.segment_id, held, before, reason, max(seen, default=None))


def _already_read(rows: Mapping[str, HeldMembership]) -> HeldRows:
    """Whole held rows of a page, read already with the page's lookup."""
    return lambda _profile_ids: rows


def _held_in_chunks(
    held: HeldData, segment_id: str, profile_ids: List[str]
) -> Iterator[Dict[str, HeldMembership]]:
    """Whole held rows of many members, `ENDED_AT_A_TIME` at a time."""
    for start in range(0, len(profile_ids), ENDED_AT_A_TIME):
        yield held.members_among(segment_id, profile_ids[start : start + ENDED_AT_A_TIME])


def close_segment(
    segment_id: str,
    held: HeldData,
    closed_at: datetime,
    load_id: str,
    members: Optional[MembersThisRun] = None,
) -> Iterator[Any]:
    """End every membership the destination holds for a segment Klaviyo no longer has.

    With `members`, those this run listed already are left to the next run, whose listing
    finds the segment gone and ends them then: a load holds each membership once.
    """
    held_ids = list(held.joined_times(segment_id))
    if members is not None:
        listed = members.listed_in(segment_id, held_ids)
        held_ids = [pid for pid, seen in zip(held_ids, listed, strict=True) if not seen]
    batch = WalkBatch(load_id)
    for rows in _held_in_chunks(held, segment_id, held_ids):
        ended = [
            ended_membership(segment_id, membership, closed_at, "segment_deleted", None)
            for membership in rows.values()
        ]
        yield from batch.add(ended, [], [])
    yield from batch.flush()


def next_cursor(
    cursor: Optional[datetime],
    newest: Optional[datetime],
    now: datetime,
    limit: Optional[datetime] = None,
) -> Optional[datetime]:
    """The cursor after a complete pass: the newest join seen, never in the future.

    A cursor in the future would make every later `greater-than` filter fail with a 400.
    `limit` keeps it before a join the pass saw but did not load.
    """
    candidates = [value for value in (cursor, newest) if value is not None]
    if not candidates:
        return None
    moved = min(max(candidates), now)
    return moved if limit is None else min(moved, limit)


def sync_listed_segment(
    client: KlaviyoClient, listed: ListedSegment, options: MembershipOptions
) -> Iterator[Any]:
    """Sync one listed segment and move its cursor; a failure is recorded, not raised.

    Runs in an extract worker thread: it touches nothing of dlt's, only `listed.run` (see
    `run` for why that is safe). Its reads of the destination share one connection.
    """
    with listed.run.held.kept_open():
        yield from _sync_segment(client, listed, options)


def _sync_segment(
    client: KlaviyoClient, listed: ListedSegment, options: MembershipOptions
) -> Iterator[Any]:
    run = listed.run
    if not listed.selected:
        return  # kept in `segments` for its attributes; its members are not exported
    if listed.deleted_at is not None:
        yield from close_segment(listed.id, run.held, listed.deleted_at, run.load_id)
        run.progress.forget(listed.id)
        run.progress.finished(
            0,
            lambda tally: logger.info(
                f"segment {listed.id} ({listed.name}) was deleted: its members are ended [{tally}]"
            ),
        )
        return
    cursor = run.progress.cursor(listed.id)
    if cursor is not None and listed.held_count == 0 and run.held.available:
        # The destination lost what the cursor covers (a new database file, a dropped table):
        # a cursor must never stand past data that is not loaded.
        logger.info(f"segment {listed.id}: nothing held any more, reading it from the start")
        cursor = None
    sync = SegmentSync(
        client=client,
        segment_id=listed.id,
        cursor=cursor,
        reconciled_at=run.progress.reconciled_at(listed.id),
        held=run.held,
        held_count=listed.held_count,
        options=options,
        now=run.started,
        members=run.members,
        load_id=run.load_id,
        leave_check=listed.leave_check,
        profile_count=listed.profile_count,
        ids_walked_at=run.progress.ids_walked_at(listed.id),
    )
    try:
        yield from sync.run()
    except (KlaviyoAuthenticationError, KlaviyoPermissionError):
        raise  # the key is wrong for every segment: stop the run with Klaviyo's reason
    except KlaviyoNotFound as error:
        # What the walk fetched was true when fetched, deleted or not, and other walks count
        # on the profile rows among it.
        yield from sync.gathered()
        if not _deleted_in_klaviyo(client, listed.id):
            # A 404 from one page of a segment that exists is a failed walk, not its end.
            reason = (
                f"segment {listed.id} ({listed.name}): {error} The segment still exists: its "
                "walk failed, and the next run reads it again from its cursor."
            )
            run.progress.failed(listed.id, reason)
            run.progress.finished(0, lambda tally: logger.error(f"{reason} [{tally}]"))
            return
        closed_at = datetime.now(timezone.utc)
        yield from close_segment(listed.id, run.held, closed_at, run.load_id, run.members)
        run.progress.forget(listed.id)
        run.progress.finished(
            0,
            lambda tally: logger.warning(
                f"segment {listed.id} was deleted during its walk: its members are ended [{tally}]"
            ),
        )
        return
    except (KlaviyoAPIError, RequestException) as error:
        # Keep the other segments' progress, and the pages this one fetched; it keeps its old
        # cursor and is fetched again from there by the next run.
        reason = f"segment {listed.id} ({listed.name}): {error}"
        run.progress.failed(listed.id, reason)
        run.progress.finished(0, lambda tally: logger.error(f"{reason} [{tally}]"))
        yield from sync.gathered()
        return
    moved = next_cursor(
        sync.cursor, sync.stats.newest, datetime.now(timezone.utc), sync.cursor_limit
    )
    run.progress.walked(
        listed.id,
        moved,
        run.started if sync.walked_in_full else None,
        run.started if sync.stats.ids_walked else None,
    )
    run.progress.finished(
        sync.stats.loaded, lambda tally: log_sync(listed.id, listed.name, sync.stats, tally)
    )


def _deleted_in_klaviyo(client: KlaviyoClient, segment_id: str) -> bool:
    """Whether the segment's own GET confirms it gone (404) after a page of it answered 404.

    Anything else (the segment, another error) leaves it standing: only a confirmed deletion
    may end its memberships.
    """
    try:
        client.get_segment(segment_id)
    except KlaviyoNotFound:
        return True
    except (KlaviyoAPIError, RequestException):
        return False
    return False


def log_sync(segment_id: str, name: Optional[str], stats: SyncStats, tally: str) -> None:
    reconciled = ""
    if stats.reconciled:
        reconciled = f", read whole: {stats.left} left"
    elif stats.ids_walked:
        reconciled = f", ids walked: {stats.left} left"
    logger.info(
        f"segment {segment_id} ({name or '?'}): {stats.loaded} rows loaded, {stats.joined} joined"
        f"{reconciled}; {stats.fetched} fetched in {stats.requests} requests [{tally}]"
    )
