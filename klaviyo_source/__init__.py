"""Klaviyo segments, tags and per-segment profile membership, loaded incrementally with dlt.

Tables: `segments` (merge on id, `deleted_at` once Klaviyo no longer has it), `tags` and
`segment_tags` (current links), `segment_memberships` (one row per segment and profile, merged
on `membership_id`) and `profiles` (merged on id). Memberships load incrementally on
`joined_group_at` with one cursor per segment in dlt state, at
`sources.klaviyo.resources.segment_memberships.joined_group_at.<segment id>`.
"""

from datetime import datetime, timezone
from typing import Iterator, List, Optional, Sequence, Set

import dlt
from dlt.extract import DltResource

from . import settings
from .client import KlaviyoClient
from .errors import KlaviyoConfigError
from .filters import segment_selection
from .handed_on import HandedOn
from .held import HeldData
from .memberships import MembershipOptions, sync_listed_segment
from .rate_limits import RateLimiter
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
from .segment_listing import ListedSegment, list_segments
from .walk_tables import (
    ROW_ID_COLUMN,
    WALK_TABLES,
    RowStamps,
    declare_walk_tables,
    quiet_json_column_notices,
)

__all__ = ["klaviyo", "KlaviyoClient", "KlaviyoConfigError"]


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
    reconcile: str = settings.DEFAULT_RECONCILE,
    full_reconcile_every_hours: Optional[float] = (
        settings.DEFAULT_FULL_RECONCILE_EVERY.total_seconds() / 3600
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
        reconcile: How leaves are found: "counts" (walk segments whose profile_count differs
            from the members held), "all" (walk every segment now), "off".
        full_reconcile_every_hours: Walk each segment in full at least this often; None: never.
        rate_limit_share: Share of the account's published rate limits this source may use.
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
    selection = segment_selection(segment_ids, segment_names, is_active, is_starred)
    run_started = datetime.now(timezone.utc)
    handed_on = HandedOn()
    row_id_tables: Set[str] = set()  # see RowStamps; found anew by each run

    @dlt.resource(name="segment_listing", selected=False)
    def segment_listing() -> Iterator[ListedSegment]:
        # Failures are per run: a segment that failed last time and works now is no failure.
        dlt.current.source_state()[settings.FAILURES_STATE_KEY] = {}
        handed_on.clear()
        held = HeldData.of_current_pipeline()
        held_tables = held.tables(list(WALK_TABLES))
        # The run has set its file format by now, on the source's copy of the resource.
        declare_walk_tables(
            dlt.current.source().resources["segment_memberships"],
            appended={
                name
                for name in WALK_TABLES
                if name not in held_tables or not held_tables[name].has_rows
            },
        )
        quiet_json_column_notices("segment_memberships")
        row_id_tables.clear()
        row_id_tables.update(
            name for name, table in held_tables.items() if ROW_ID_COLUMN in table.columns
        )
        yield from list_segments(client, selection, segment_ids or [], held, run_started)

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

    # Fills three tables, declared by walk_tables.declare_walk_tables.
    @dlt.transformer(data_from=segment_listing, write_disposition="merge", parallelized=True)
    def segment_memberships(listed: ListedSegment) -> Iterator[object]:
        yield from sync_listed_segment(
            client,
            listed,
            options,
            dlt.current.resource_state(),
            dlt.current.source_state()[settings.FAILURES_STATE_KEY],
            run_started,
            handed_on,
            RowStamps(dlt.current.load_package_state()["load_id"], frozenset(row_id_tables)),
        )

    return segments, tags, segment_tags, declare_walk_tables(segment_memberships)
