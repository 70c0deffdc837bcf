"""Klaviyo segments, tags and per-segment profile membership, loaded incrementally with dlt.

Tables: `segments` (merge on id, `deleted_at` once Klaviyo no longer has it), `tags` and
`segment_tags` (current links), `segment_memberships` (one row per segment and profile, merged
on `membership_id`) and `profiles` (merged on id). Memberships load incrementally on
`joined_group_at` with one cursor per segment in dlt state, at
`sources.klaviyo.resources.segment_memberships.joined_group_at.<segment id>`.
"""

from datetime import datetime, timedelta, timezone
from typing import Iterator, List, Optional, Sequence

import dlt
from dlt.common import logger
from dlt.extract import DltResource
from requests.exceptions import RequestException

from . import settings
from .client import KlaviyoClient
from .errors import (
    KlaviyoAPIError,
    KlaviyoAuthenticationError,
    KlaviyoConfigError,
    KlaviyoNotFound,
    KlaviyoPermissionError,
)
from .filters import segment_selection
from .held import HeldData
from .memberships import (
    MembershipOptions,
    WalkStats,
    close_segment_memberships,
    log_walk,
    next_cursor,
    walk_segment,
)
from .rate_limits import RateLimiter
from .rows import (
    SEGMENT_COLUMNS,
    SEGMENT_TAG_COLUMNS,
    TAG_COLUMNS,
    Row,
    deleted_segment_row,
    parse_datetime,
    segment_row,
    segment_tag_ids,
    tag_row,
)
from .segment_listing import ListedSegment, list_segments

__all__ = ["klaviyo", "KlaviyoClient", "KlaviyoConfigError"]


def _options(
    include_profiles: bool, profile_additional_fields: Optional[Sequence[str]], lookback_minutes: float
) -> MembershipOptions:
    extra = list(profile_additional_fields or [])
    unknown = [name for name in extra if name not in settings.OPTIONAL_PROFILE_FIELDS]
    if unknown:
        raise KlaviyoConfigError(
            f"profile_additional_fields has {unknown}; allowed are "
            f"{list(settings.OPTIONAL_PROFILE_FIELDS)}. Fix [sources.klaviyo] profile_additional_fields."
        )
    if lookback_minutes < 0:
        raise KlaviyoConfigError(
            f"lookback_minutes is {lookback_minutes}; it must be 0 or more. Fix "
            "[sources.klaviyo] lookback_minutes."
        )
    return MembershipOptions(include_profiles, tuple(extra), timedelta(minutes=lookback_minutes))


@dlt.source(name="klaviyo", section="klaviyo")
def klaviyo(
    api_key: str = dlt.secrets.value,
    base_url: str = settings.DEFAULT_BASE_URL,
    revision: str = settings.DEFAULT_REVISION,
    segment_ids: Optional[List[str]] = None,
    segment_names: Optional[List[str]] = None,
    is_active: Optional[bool] = None,
    is_starred: Optional[bool] = None,
    include_profiles: bool = True,
    profile_additional_fields: Optional[List[str]] = None,
    lookback_minutes: float = settings.DEFAULT_LOOKBACK.total_seconds() / 60,
    rate_limit_share: float = 1.0,
    rate_limit_time_scale: float = 1.0,
) -> Sequence[DltResource]:
    """Segments, tags, segment tags, memberships and profiles of one Klaviyo account.

    Args:
        api_key: A private key with segments:read, profiles:read and tags:read.
        base_url: Klaviyo's API host; point it at a proxy or the bundled simulator.
        revision: The `revision` header sent with every request.
        segment_ids, segment_names, is_active, is_starred: Which segments to export (all if unset).
        include_profiles: False loads memberships only (`fields[profile]=joined_group_at`).
        profile_additional_fields: Any of "subscriptions", "predictive_analytics" (stricter limits).
        lookback_minutes: How far behind each segment's cursor a run looks again for late joins.
        rate_limit_share: Share of the account's published rate limits this source may use.
        rate_limit_time_scale: Speed-up of a simulator's clock; 1 against Klaviyo.
    """
    options = _options(include_profiles, profile_additional_fields, lookback_minutes)
    try:
        limiter = RateLimiter(rate_limit_share, rate_limit_time_scale)
    except ValueError as error:
        raise KlaviyoConfigError(f"{error}. Fix it in [sources.klaviyo].") from error
    client = KlaviyoClient(api_key, base_url, revision, rate_limiter=limiter)
    selection = segment_selection(segment_ids, segment_names, is_active, is_starred)
    run_started = datetime.now(timezone.utc)

    @dlt.resource(name="segment_listing", selected=False)
    def segment_listing() -> Iterator[ListedSegment]:
        # Failures are per run: a segment that failed last time and works now is no failure.
        dlt.current.source_state()[settings.FAILURES_STATE_KEY] = {}
        yield from list_segments(
            client, selection, segment_ids or [], HeldData.of_current_pipeline(), run_started
        )

    @dlt.transformer(
        data_from=segment_listing,
        write_disposition="merge",
        primary_key="id",
        columns=SEGMENT_COLUMNS,
    )
    def segments(listed: ListedSegment) -> Iterator[Row]:
        if listed.resource is not None:
            yield segment_row(listed.resource)
        elif listed.held_row is not None and listed.deleted_at is not None:
            yield deleted_segment_row(listed.held_row, listed.deleted_at)

    @dlt.transformer(
        data_from=segment_listing, write_disposition="replace", columns=SEGMENT_TAG_COLUMNS
    )
    def segment_tags(listed: ListedSegment) -> Iterator[List[Row]]:
        if listed.resource is not None:
            yield [
                {"segment_id": listed.id, "tag_id": tag_id}
                for tag_id in segment_tag_ids(listed.resource)
            ]

    @dlt.resource(write_disposition="replace", primary_key="id", columns=TAG_COLUMNS)
    def tags() -> Iterator[List[Row]]:
        for document in client.get_tags():
            yield [tag_row(resource) for resource in document.get("data") or []]

    # Hints are set per page (rows.as_memberships / as_profiles): this resource fills two tables.
    @dlt.transformer(data_from=segment_listing, write_disposition="merge", parallelized=True)
    def segment_memberships(listed: ListedSegment) -> Iterator[object]:
        cursors = dlt.current.resource_state().setdefault(settings.CURSORS_STATE_KEY, {})
        failures = dlt.current.source_state()[settings.FAILURES_STATE_KEY]
        held = listed.held
        if listed.deleted_at is not None:
            yield from close_segment_memberships(
                listed.id, held, listed.deleted_at, "segment_deleted"
            )
            cursors.pop(listed.id, None)
            return
        stored = cursors.get(listed.id)
        cursor = parse_datetime(stored) if stored else None
        stats = WalkStats()
        try:
            yield from walk_segment(client, listed.id, cursor, held, options, run_started, stats)
        except (KlaviyoAuthenticationError, KlaviyoPermissionError):
            raise  # the key is wrong for every segment: stop the run with Klaviyo's reason
        except KlaviyoNotFound:
            logger.warning(f"segment {listed.id} was deleted during the run; next run marks it")
            return
        except (KlaviyoAPIError, RequestException) as error:
            # Keep the other segments' progress; this one keeps its old cursor and is
            # fetched again from there by the next run.
            failures[listed.id] = f"segment {listed.id} ({listed.name}): {error}"
            logger.error(failures[listed.id])
            return
        moved = next_cursor(cursor, stats.newest, datetime.now(timezone.utc))
        if moved is not None:
            cursors[listed.id] = moved.isoformat()
        log_walk(listed.id, listed.name, stats)

    return segments, tags, segment_tags, segment_memberships

