"""Constants of the Klaviyo source: endpoints, page sizes, rate tiers, defaults and state keys.

Everything that is a fact about Klaviyo's API, or a default a user may override in
`.dlt/config.toml`, lives here and nowhere else.
"""

from datetime import date, timedelta
from typing import Dict, Final, Tuple

DEFAULT_BASE_URL: Final = "https://a.klaviyo.com"
DEFAULT_REVISION: Final = "2025-04-15"
MEDIA_TYPE: Final = "application/vnd.api+json"

# Largest page of the segment-profile endpoints (relationships too, from revision 2024-10-15).
SEGMENT_PROFILES_PAGE_SIZE: Final = 100
# Largest page of GET /api/profiles (its default is 20).
PROFILES_PAGE_SIZE: Final = 100
# Profile ids one `any(id,[...])` filter names: one page answers it whole. Klaviyo documents
# no longer limit for the list; a page's worth keeps each request's URL a few KB.
PROFILE_IDS_PER_REQUEST: Final = 100

# A late-visible join (one whose joined_group_at is older than the newest join already
# seen) is caught when it lies within this window behind a segment's cursor. One hour covers
# Klaviyo's asynchronous membership evaluation of a live segment while keeping a no-change
# run at one request per segment; anything older is caught by reconciliation.
DEFAULT_LOOKBACK: Final = timedelta(hours=1)

# The profile refresh re-reads this far behind its cursor (the previous run's start). It
# covers the time a Klaviyo profile edit takes to become visible to the `updated` filter and a
# difference between this machine's clock and Klaviyo's; what it re-reads unchanged is not
# loaded again, but costs one page per 100 profiles edited in the window.
DEFAULT_PROFILE_LOOKBACK: Final = timedelta(minutes=10)

# Rows a segment walk gathers before handing a table of them to dlt. dlt spends a fixed cost
# on every Arrow table it receives (schema inference and validation, a parquet row group), so
# larger tables export faster; but every extract worker holds a batch. Measured on 1M
# memberships with profiles, 5 workers: 1,000 rows 88 s (extract peak 228 MB), 10,000 rows
# 59 s (473 MB), in an older version. Membership rows wait as Arrow, not as Python rows, from
# every 2,000 (WALK_ARROW_ROWS): the extract peak at 1M fell from 285 to 244 MB, as fast.
# Profile rows are several times wider and their columns vary, so they come in tables of
# their own, smaller ones: 500 rather than 2,000 took the peak on to 213 MB, as fast, and keeps
# the parquet row groups a loader reads whole small (see pipelines/klaviyo_pipeline.py).
WALK_BATCH_ROWS: Final = 10_000
WALK_BATCH_PROFILES: Final = 500
# Membership rows a batch holds as Python rows before turning them into Arrow (see WalkBatch).
WALK_ARROW_ROWS: Final = 2_000

SEGMENT_ATTRIBUTES: Final[Tuple[str, ...]] = (
    "name",
    "definition",
    "created",
    "updated",
    "is_active",
    "is_processing",
    "is_starred",
)
# Profile fields that cost a stricter rate tier and so are off unless asked for.
OPTIONAL_PROFILE_FIELDS: Final[Tuple[str, ...]] = ("subscriptions", "predictive_analytics")

# How leaves are found (see leave_checks): "counts" checks every segment each run, reading a
# one-page segment whole with its pass, walking the member ids of small segments and counting
# the largest (profile_count, a 1/s tier) where walking them would take longer; "all" reads
# every segment whole; "off" never looks for leaves except on the full-walk schedule.
RECONCILE_MODES: Final[Tuple[str, ...]] = ("counts", "all", "off")
DEFAULT_RECONCILE: Final = "counts"
# Read each segment whole (/profiles, with joined_group_at) at least this often: a count can be
# fooled by a leave and a late join, and an id walk cannot see a re-join behind the lookback.
DEFAULT_FULL_RECONCILE_EVERY: Final = timedelta(hours=24)
# The segment-member endpoints filter on profile_id from this revision (any/equals).
PROFILE_ID_FILTER_SINCE: Final = "2025-10-15"

# Klaviyo's published rate tiers: (requests per second, requests per minute). The L tier's
# steady limit was 700 a minute in the specs before revision 2026-01-15.
L_TIER_STEADY_RAISED_IN: Final = "2026-01-15"
L_TIER_STEADY_BEFORE: Final = 700
RATE_TIERS: Final[Dict[str, Tuple[int, int]]] = {
    "XS": (1, 15),
    "S": (3, 60),
    "M": (10, 150),
    "L": (75, 750),
    "XL": (350, 3500),
    # POST /api/segment-series-reports (and -values-reports), with a daily cap on top.
    "REPORT": (1, 2),
}
REPORTS_PER_DAY: Final = 225
# Klaviyo's steady window: a 429 asking to wait longer than this is the daily cap speaking.
STEADY_WINDOW_SECONDS: Final = 60.0

# Klaviyo's segment reports (POST /api/segment-series-reports): the first revision that serves
# them (the SDKs pinned to 2024-10-15 list them, those of 2024-07-15 do not), the first day
# Klaviyo has figures for, and what one request may ask for.
SEGMENT_REPORTS_SINCE: Final = "2024-10-15"
SEGMENT_REPORTS_FIRST_DAY: Final = date(2023, 6, 1)
SEGMENT_REPORT_MAX_DAYS: Final = 60
SEGMENT_REPORT_MAX_SEGMENTS: Final = 100
SEGMENT_REPORT_STATISTICS: Final[Tuple[str, ...]] = (
    "members_added",
    "members_removed",
    "net_members_changed",
    "total_members",
)
# Days before the newest one loaded that every run reads again: Klaviyo's growth figures trail
# live membership (hours, at times a day or two), so a recent day's report may still change.
SEGMENT_REPORTS_SETTLE_DAYS: Final = 3
# How often a segment's settling days are read again, and how many segments a run reads again at
# most: the segments one steady window of the report tier (2 requests) covers. A run then never
# waits a minute on the reports, and 500 segments hourly spend 120 of the day's 225 requests.
DEFAULT_REPORT_REREAD_EVERY: Final = timedelta(hours=1)
SEGMENT_REPORT_REREADS_PER_RUN: Final = RATE_TIERS["REPORT"][1] * SEGMENT_REPORT_MAX_SEGMENTS

# State keys, kept stable: renaming one silently restarts every cursor.
CURSORS_STATE_KEY: Final = "joined_group_at"
RECONCILED_STATE_KEY: Final = "reconciled_at"
IDS_WALKED_STATE_KEY: Final = "ids_walked_at"
FAILURES_STATE_KEY: Final = "failed_segments"
# The profile refresh's cursor, in its resource's state; and its key among the run's failures
# (segment ids are alphanumeric, so it names no segment).
PROFILES_CURSOR_STATE_KEY: Final = "updated"
PROFILE_REFRESH_FAILURE: Final = "profile_refresh"

# The resource that keeps held profiles current.
PROFILE_REFRESH_RESOURCE: Final = "profile_refresh"
# In the segment_reports_daily resource's state: the days loaded per segment, the times of the
# report requests sent in the last day, what stopped this run's reports, if anything, and when
# each segment's days up to today were last read.
REPORT_DAYS_STATE_KEY: Final = "days_loaded"
REPORT_REQUESTS_STATE_KEY: Final = "requests_sent"
REPORT_FAILURE_STATE_KEY: Final = "failed"
REPORT_REREAD_STATE_KEY: Final = "read_again_at"

# Table names, shared by the resources and the reader of what the destination holds.
SEGMENTS_TABLE: Final = "segments"
TAGS_TABLE: Final = "tags"
SEGMENT_TAGS_TABLE: Final = "segment_tags"
MEMBERSHIPS_TABLE: Final = "segment_memberships"
PERIODS_TABLE: Final = "segment_membership_periods"
PROFILES_TABLE: Final = "profiles"
SEGMENT_REPORTS_TABLE: Final = "segment_reports_daily"
