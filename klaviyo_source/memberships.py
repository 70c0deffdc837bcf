"""Incremental walk of one segment's members, with its own `joined_group_at` cursor.

Each segment keeps a cursor: the newest `joined_group_at` loaded for it. A run asks for
`greater-than(joined_group_at, cursor - lookback)` sorted by `joined_group_at`, so it fetches
new joins and re-joins, plus a short window behind the cursor where late-visible joins and
ties land. Rows in that window that the destination already holds unchanged are not loaded
again. The cursor only moves once the whole walk of a segment has been yielded, and dlt commits
it together with the rows, so it never passes data that was not loaded.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Dict, Iterator, List, Optional, Sequence

from dlt.common import logger

from . import settings
from .client import KlaviyoClient
from .filters import joined_after
from .held import HeldData, HeldMembership
from .rows import Row, as_memberships, as_profiles, membership_row, parse_datetime, profile_row


@dataclass(frozen=True)
class MembershipOptions:
    """What a membership walk asks for and how far behind the cursor it looks."""

    include_profiles: bool = True
    profile_additional_fields: Sequence[str] = ()
    lookback: timedelta = settings.DEFAULT_LOOKBACK

    def fields_profile(self) -> Optional[List[str]]:
        # Membership-only mode asks for the one attribute it needs, to keep pages small.
        return None if self.include_profiles else ["joined_group_at"]

    def additional_fields(self) -> Optional[List[str]]:
        if not self.include_profiles or not self.profile_additional_fields:
            return None
        return list(self.profile_additional_fields)


@dataclass
class WalkStats:
    """What one segment's walk did, for its log line."""

    pages: int = 0
    fetched: int = 0
    loaded: int = 0
    newest: Optional[datetime] = None


def since_for(cursor: Optional[datetime], lookback: timedelta) -> Optional[datetime]:
    return None if cursor is None else cursor - lookback


def walk_segment(
    client: KlaviyoClient,
    segment_id: str,
    cursor: Optional[datetime],
    held: HeldData,
    options: MembershipOptions,
    seen_at: datetime,
    stats: WalkStats,
) -> Iterator[Any]:
    """Yield pages of changed membership rows (and profile rows) of one segment.

    `stats.newest` ends as the newest `joined_group_at` seen, over all rows (Klaviyo's sort is
    known to be slightly off at times, so the last row is not trusted to be the newest).
    """
    since = since_for(cursor, options.lookback)
    known: Dict[str, HeldMembership] = held.memberships(segment_id, joined_after=since)
    pages = client.get_segment_profiles(
        segment_id,
        filter=None if since is None else joined_after(since),
        sort="joined_group_at",
        fields_profile=options.fields_profile(),
        additional_fields_profile=options.additional_fields(),
    )
    for document in pages:
        stats.pages += 1
        memberships: List[Row] = []
        profiles: List[Row] = []
        for resource in document.get("data") or []:
            stats.fetched += 1
            profile_id = resource["id"]
            joined = parse_datetime(resource["attributes"]["joined_group_at"])
            if stats.newest is None or joined > stats.newest:
                stats.newest = joined
            previous = known.get(profile_id)
            same_period = previous is not None and previous.joined_group_at == joined
            if same_period and cursor is not None:
                continue  # fetched again by the lookback window, already loaded as it is
            first_seen = previous.first_seen_at if same_period and previous else seen_at
            memberships.append(membership_row(segment_id, profile_id, joined, first_seen, seen_at))
            if options.include_profiles:
                profiles.append(profile_row(resource))
        stats.loaded += len(memberships)
        if memberships:
            yield as_memberships(memberships)
        if profiles:
            yield as_profiles(profiles)


def close_segment_memberships(
    segment_id: str, held: HeldData, closed_at: datetime, reason: str
) -> Iterator[Any]:
    """Mark every membership the destination holds for a segment as ended."""
    batch: List[Row] = []
    for membership in held.memberships(segment_id).values():
        batch.append(
            membership_row(
                segment_id,
                membership.profile_id,
                membership.joined_group_at,
                membership.first_seen_at,
                membership.last_seen_at,
                left_detected_at=closed_at,
                left_reason=reason,
            )
        )
        if len(batch) >= 1000:
            yield as_memberships(batch)
            batch = []
    if batch:
        yield as_memberships(batch)


def next_cursor(
    cursor: Optional[datetime], newest: Optional[datetime], now: datetime
) -> Optional[datetime]:
    """The cursor after a complete walk: the newest join seen, never in the future.

    A cursor in the future would make every later `greater-than` filter fail with a 400.
    """
    candidates = [value for value in (cursor, newest) if value is not None]
    if not candidates:
        return None
    return min(max(candidates), now)


def log_walk(segment_id: str, name: Optional[str], stats: WalkStats) -> None:
    logger.info(
        f"segment {segment_id} ({name or '?'}): {stats.loaded} new or changed memberships "
        f"of {stats.fetched} fetched in {stats.pages} requests"
    )
