"""Klaviyo segments, tags and per-segment profile membership, loaded incrementally with dlt.

Tables: `segments` (merge on id, `deleted_at` once Klaviyo no longer has it), `tags` and
`segment_tags` (current links), `segment_memberships` (one row per segment and profile, merged
on `membership_id`) and `profiles` (merged on id). Memberships load incrementally on
`joined_group_at` with one cursor per segment in dlt state, at
`sources.klaviyo.resources.segment_memberships.joined_group_at.<segment id>`; `profile_refresh`
keeps the held profiles current from a cursor on their `updated`.
`segment_reports_daily` holds Klaviyo's own daily figures per segment (merged on `report_id`),
from before the first export on (see `segment_reports`).
"""

from datetime import datetime, timezone
from typing import Any, Iterator, List, Optional, Sequence

import dlt
from dlt.extract import DltResource

from . import settings
from .client import KlaviyoClient
from .errors import KlaviyoConfigError
from .filters import segment_selection
from .leave_checks import LeavePolicy
from .memberships import MembershipOptions, sync_listed_segment
from .profile_refresh import profile_lookback, refresh_profiles
from .quota import RateLimiter
from .rows import (
    SEGMENT_COLUMNS,
    SEGMENT_TAG_COLUMNS,
    TAG_COLUMNS,
    Row,
    deleted_segment_row,
    segment_row,
    segment_tag_ids,
    tag_row,
)
from .run import RunStart
from .segment_listing import ListedSegment, list_segments
from .segment_reports import (
    REPORT_COLUMNS,
    ReportOptions,
    SegmentsListed,
    daily_segment_reports,
    reports_wanted,
)
from .walk_tables import declare_walk_tables

__all__ = ["klaviyo", "KlaviyoClient", "KlaviyoConfigError"]

WALKING_RESOURCE = settings.MEMBERSHIPS_TABLE


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
    profile_lookback_minutes: float = settings.DEFAULT_PROFILE_LOOKBACK.total_seconds() / 60,
    reconcile: str = settings.DEFAULT_RECONCILE,
    full_reconcile_every_hours: Optional[float] = (
        settings.DEFAULT_FULL_RECONCILE_EVERY.total_seconds() / 3600
    ),
    segment_reports: bool = True,
    segment_reports_start: Optional[str] = None,
    segment_reports_reread_minutes: float = (
        settings.DEFAULT_REPORT_REREAD_EVERY.total_seconds() / 60
    ),
    rate_limit_share: float = 1.0,
    rate_limit_time_scale: float = 1.0,
    allow_insecure_http: bool = False,
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
        profile_lookback_minutes: How far behind its cursor the profile refresh lists again.
        reconcile: How leaves are found: "counts" (check every segment each run: walk the
            member ids of small ones, count the largest), "all" (read every segment whole
            now), "off" (only the scheduled full walks).
        full_reconcile_every_hours: Walk each segment in full at least this often; None: never.
        segment_reports: Load Klaviyo's daily segment reports into `segment_reports_daily`
            (from revision 2024-10-15; 225 requests a day, spent over as many runs as needed).
        segment_reports_start: First day (YYYY-MM-DD) of those reports; unset: 2023-06-01,
            the first day Klaviyo has.
        segment_reports_reread_minutes: Read a segment's last three days again (Klaviyo's
            figures for them may still change) at most this often; 0: every run.
        rate_limit_share: Share of each rate-limit window of the account this source may use.
        rate_limit_time_scale: Speed-up of a simulator's clock; 1 against Klaviyo.
        allow_insecure_http: Accept a plain http base_url on another machine (the key would
            travel unencrypted); http to this machine needs no opt-in.
    """
    options = MembershipOptions.from_config(
        include_profiles,
        profile_additional_fields,
        lookback_minutes,
        reconcile,
        full_reconcile_every_hours,
    )
    try:
        limiter = RateLimiter(rate_limit_share, rate_limit_time_scale, revision=revision)
    except ValueError as error:
        raise KlaviyoConfigError(f"{error}. Fix it in [sources.klaviyo].") from error
    client = KlaviyoClient(
        api_key, base_url, revision, rate_limiter=limiter, allow_insecure_http=allow_insecure_http
    )
    leave_policy = LeavePolicy.for_account(
        options.reconcile,
        options.full_reconcile_every,
        revision,
        rate_limit_share,
        pass_tier="M" if "predictive_analytics" in (options.additional_fields() or []) else "L",
    )
    refresh_lookback = profile_lookback(profile_lookback_minutes)
    selection = segment_selection(segment_ids, segment_names, is_active, is_starred)
    report_options = ReportOptions.from_config(
        selection.filter, segment_reports_start, segment_reports_reread_minutes
    )
    listed_for_reports = SegmentsListed()
    started = datetime.now(timezone.utc)
    run_start = RunStart(started, WALKING_RESOURCE)

    @dlt.resource(name="segment_listing", selected=False)
    def segment_listing() -> Iterator[ListedSegment]:
        # Run setup, in the pipeline's thread before any segment is walked: everything the
        # parallel walks need from dlt is read here, once, and travels with each segment.
        run = run_start()
        yield from list_segments(
            client,
            selection,
            segment_ids or [],
            run,
            leave_policy,
            on_listed=listed_for_reports.publish,
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

    # Fills three tables, declared by walk_tables.declare_walk_tables. Each segment's walk runs
    # in an extract worker thread; the walks share only `listed.run` and the client.
    @dlt.transformer(
        name=WALKING_RESOURCE,
        data_from=segment_listing,
        write_disposition="merge",
        parallelized=True,
    )
    def segment_memberships(listed: ListedSegment) -> Iterator[object]:
        yield from sync_listed_segment(client, listed, options)

    @dlt.resource(
        name=settings.SEGMENT_REPORTS_TABLE,
        write_disposition="merge",
        primary_key="report_id",
        columns=REPORT_COLUMNS,
        selected=reports_wanted(segment_reports, revision),
    )
    def segment_reports_daily() -> Iterator[Any]:
        # Runs in the pipeline's thread, which alone touches its state; requests go to workers.
        yield from daily_segment_reports(client, report_options, started, listed_for_reports)

    # Keeps the held profiles current; shares the run with the walks (see profile_refresh).
    @dlt.resource(name=settings.PROFILE_REFRESH_RESOURCE)
    def profile_refresh() -> Iterator[Any]:
        yield from refresh_profiles(
            client, run_start, refresh_lookback, options.additional_fields()
        )

    walks = declare_walk_tables(segment_memberships)
    if not options.include_profiles:
        return segments, tags, segment_tags, walks, segment_reports_daily
    return segments, tags, segment_tags, walks, profile_refresh, segment_reports_daily
