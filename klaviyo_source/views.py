"""SQL views over the loaded tables: current members, membership history, growth, joins/leaves,
and Klaviyo's own daily member counts beside this export's.

The SQL is plain enough for DuckDB and PostgreSQL alike. `create_views` creates them in the
pipeline's dataset after a load; `view_definitions` returns the same statements for any other
warehouse (print them with `python -m klaviyo_source.views <schema>`).

Plain files cannot be merged into: the filesystem destination appends every version of a
merged row. Read over such files (`newest_versions=True`, or `--newest-versions` when printing),
the views keep only the newest loaded version of each key.
"""

import argparse
import logging
from typing import Callable, Dict, List

from dlt.common.pipeline import SupportsPipeline
from dlt.common.schema.utils import has_table_seen_data
from dlt.destinations.exceptions import DatabaseException

from . import settings

Qualify = Callable[[str], str]
logger = logging.getLogger(__name__)

# The key of every merged table: one current row per key, the newest loaded version.
MERGE_KEYS: Dict[str, str] = {
    settings.SEGMENTS_TABLE: "id",
    settings.MEMBERSHIPS_TABLE: "membership_id",
    settings.PERIODS_TABLE: "period_id",
    settings.PROFILES_TABLE: "id",
    settings.SEGMENT_REPORTS_TABLE: "report_id",
}

# How a re-join ends the period before it (rows.membership_row's `left_reason`).
REJOINED = "rejoined"
# Klaviyo's daily member counts beside this export's, when segment reports are loaded.
SIZE_BESIDE_REPORTS = "segment_size_vs_klaviyo_daily"


def appends_versions(pipeline: SupportsPipeline) -> bool:
    """Whether the pipeline's destination may keep several loaded versions of a merged row.

    Told by the destination's type, not its name, which a user may choose. A filesystem
    destination writing delta or iceberg tables does merge; reading the newest version of each
    key is right there as well, only slower.
    """
    destination = getattr(pipeline, "destination", None)
    return str(getattr(destination, "destination_type", "")).endswith(".filesystem")


def newest_version_of_each_key(qualified_table: str, key: str) -> str:
    """A derived table (without alias) of the newest loaded version of each `key`.

    A load's id grows with time, so the greatest `_dlt_load_id` is the newest version. The
    rows keep every column of the table, and gain `version_rank`.
    """
    return (
        f"(SELECT * FROM (SELECT v.*, ROW_NUMBER() OVER (PARTITION BY v.{key} "
        f"ORDER BY v._dlt_load_id DESC) AS version_rank FROM {qualified_table} AS v) AS ranked "
        "WHERE version_rank = 1)"
    )


def table_reader(qualify: Qualify, newest_only: bool) -> Qualify:
    """How a query names a loaded table: qualified, and for merged tables held in versions
    (`newest_only`) as the derived table of their newest versions."""

    def read(table: str) -> str:
        qualified = qualify(table)
        if newest_only and table in MERGE_KEYS:
            return newest_version_of_each_key(qualified, MERGE_KEYS[table])
        return qualified

    return read


def _current_members(table: Qualify, with_profiles: bool) -> str:
    email = ", p.email" if with_profiles else ""
    profiles = (
        f" LEFT JOIN {table(settings.PROFILES_TABLE)} AS p ON p.id = m.profile_id"
        if with_profiles
        else ""
    )
    return f"""
SELECT m.segment_id, s.name AS segment_name, m.profile_id{email},
       m.joined_group_at, m.first_seen_at
FROM {table(settings.MEMBERSHIPS_TABLE)} AS m
JOIN {table(settings.SEGMENTS_TABLE)} AS s ON s.id = m.segment_id AND s.deleted_at IS NULL{profiles}
WHERE m.is_member"""


def _history(table: Qualify) -> str:
    # A period lasts from its join until the member was found gone (the leave's upper bound);
    # an open period lasts until now.
    return f"""
SELECT h.segment_id, s.name AS segment_name, h.profile_id, h.joined_group_at,
       h.first_seen_at, h.last_seen_at, h.left_at_earliest, h.left_at_latest, h.left_reason,
       h.is_member,
       CAST(
           EXTRACT(EPOCH FROM (COALESCE(h.left_at_latest, CURRENT_TIMESTAMP) - h.joined_group_at))
           AS DOUBLE PRECISION
       ) / 86400.0 AS days_in_segment
FROM {table(settings.PERIODS_TABLE)} AS h
LEFT JOIN {table(settings.SEGMENTS_TABLE)} AS s ON s.id = h.segment_id"""


def _joins_leaves_daily(table: Qualify) -> str:
    # A join counts on the day of its `joined_group_at`; a leave on the day it was found (it
    # happened after `left_at_earliest`). Days are UTC days whatever the session's time zone.
    # A re-join is neither a leave nor a join: the member stayed, with a new join time. It ends
    # the period before it at the new join's time (`left_at_latest` = the new period's
    # `joined_group_at`), so on that same day the new period's start is taken back out of the
    # joins and counted as a re-join instead. New columns come last, so that the printed
    # `CREATE OR REPLACE VIEW` still replaces a view made by an earlier version.
    periods = table(settings.PERIODS_TABLE)
    return f"""
SELECT changes.segment_id, changes.day, CAST(SUM(changes.joins) AS BIGINT) AS joins,
       CAST(SUM(changes.leaves) AS BIGINT) AS leaves,
       CAST(SUM(changes.rejoins) AS BIGINT) AS rejoins, s.name AS segment_name
FROM (
    SELECT segment_id, CAST(joined_group_at AT TIME ZONE 'UTC' AS DATE) AS day, 1 AS joins,
           0 AS leaves, 0 AS rejoins
    FROM {periods} AS started
    UNION ALL
    SELECT segment_id, CAST(left_at_latest AT TIME ZONE 'UTC' AS DATE) AS day,
           CASE WHEN left_reason = '{REJOINED}' THEN -1 ELSE 0 END AS joins,
           CASE WHEN left_reason = '{REJOINED}' THEN 0 ELSE 1 END AS leaves,
           CASE WHEN left_reason = '{REJOINED}' THEN 1 ELSE 0 END AS rejoins
    FROM {periods} AS ended
    WHERE left_at_latest IS NOT NULL
) AS changes
LEFT JOIN {table(settings.SEGMENTS_TABLE)} AS s ON s.id = changes.segment_id
GROUP BY changes.segment_id, s.name, changes.day"""


def _size_daily(view: Qualify) -> str:
    return f"""
SELECT segment_id, day, joins, leaves,
       CAST(SUM(joins - leaves) OVER (
           PARTITION BY segment_id ORDER BY day ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
       ) AS BIGINT) AS members,
       rejoins, segment_name
FROM {view("segment_joins_leaves_daily")}"""


def _size_beside_reports(table: Qualify, view: Qualify) -> str:
    # Klaviyo's members at the end of each reported day beside this export's: the running sum
    # of the joins and leaves of `segment_joins_leaves_daily` up to that day. Shown from the
    # day of the segment's first export on; before it this export knows no leaves, so its
    # figure would only count members still present at that export. A change row sorts before
    # the report row of its day, so the sum includes that day's changes.
    days = view("segment_joins_leaves_daily")
    return f"""
SELECT summed.segment_id, summed.day, summed.klaviyo_members,
       CASE WHEN summed.day >= exported.first_day THEN summed.observed END AS observed_members,
       CASE WHEN summed.day >= exported.first_day
            THEN summed.observed - summed.klaviyo_members END AS members_difference,
       summed.members_added, summed.members_removed,
       CASE WHEN summed.day >= exported.first_day THEN COALESCE(changes.joins, 0) END AS joins,
       CASE WHEN summed.day >= exported.first_day THEN COALESCE(changes.leaves, 0) END AS leaves,
       s.name AS segment_name
FROM (
    SELECT day_rows.*, CAST(SUM(day_rows.delta) OVER (
               PARTITION BY day_rows.segment_id ORDER BY day_rows.day, day_rows.is_report
               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
           ) AS BIGINT) AS observed
    FROM (
        SELECT segment_id, date AS day, total_members AS klaviyo_members, members_added,
               members_removed, 0 AS delta, 1 AS is_report
        FROM {table(settings.SEGMENT_REPORTS_TABLE)} AS reported
        UNION ALL
        SELECT segment_id, day, CAST(NULL AS BIGINT), CAST(NULL AS BIGINT),
               CAST(NULL AS BIGINT), joins - leaves, 0
        FROM {days} AS changed
    ) AS day_rows
) AS summed
LEFT JOIN (
    SELECT segment_id, MIN(CAST(first_seen_at AT TIME ZONE 'UTC' AS DATE)) AS first_day
    FROM {table(settings.PERIODS_TABLE)} AS periods
    GROUP BY segment_id
) AS exported ON exported.segment_id = summed.segment_id
LEFT JOIN {days} AS changes ON changes.segment_id = summed.segment_id AND changes.day = summed.day
LEFT JOIN {table(settings.SEGMENTS_TABLE)} AS s ON s.id = summed.segment_id
WHERE summed.is_report = 1"""


def view_definitions(
    qualify: Qualify,
    with_profiles: bool = True,
    newest_versions: bool = False,
    with_reports: bool = False,
) -> Dict[str, str]:
    """`CREATE VIEW` bodies by view name, in the order they must be created.

    `qualify` names a table or view. `newest_versions`: the merged tables hold every loaded
    version of a row (the filesystem destination's files), and the views read only the newest.
    `with_reports`: `segment_reports_daily` is loaded, and Klaviyo's daily counts are set
    beside this export's.
    """
    table = table_reader(qualify, newest_versions)
    definitions = {
        "current_segment_members": _current_members(table, with_profiles),
        "segment_membership_history": _history(table),
        "segment_joins_leaves_daily": _joins_leaves_daily(table),
        "segment_size_daily": _size_daily(qualify),
    }
    if with_reports:
        definitions[SIZE_BESIDE_REPORTS] = _size_beside_reports(table, qualify)
    return definitions


def create_views(pipeline: SupportsPipeline) -> List[str]:
    """Create (or replace) the views in the pipeline's dataset; returns their names.

    Does nothing on destinations without SQL views (the filesystem destination): query the
    tables there, or apply `view_definitions(..., newest_versions=True)` in the engine that
    reads them. A view the destination refuses is reported, not raised: the load it follows
    has succeeded.
    """
    tables = pipeline.default_schema.tables  # type: ignore[attr-defined]
    if settings.PERIODS_TABLE not in tables or settings.SEGMENTS_TABLE not in tables:
        return []
    if appends_versions(pipeline):
        return []
    try:
        client = pipeline.sql_client()  # type: ignore[attr-defined]
    except Exception:  # destination without a SQL client
        return []
    if not getattr(client, "capabilities", None):
        return []
    with client:
        reports = tables.get(settings.SEGMENT_REPORTS_TABLE)
        definitions = view_definitions(
            client.make_qualified_table_name,
            with_profiles=settings.PROFILES_TABLE in tables,
            with_reports=reports is not None and has_table_seen_data(reports),
        )
        created = []
        for name, body in definitions.items():
            qualified = client.make_qualified_table_name(name)
            try:
                client.execute_sql(f"DROP VIEW IF EXISTS {qualified} CASCADE")
                client.execute_sql(f"CREATE VIEW {qualified} AS {body}")
            except DatabaseException as error:
                logger.warning(f"view {name} was not created: {' '.join(str(error).split())}")
                continue
            created.append(name)
    return created


def account_union_sql(datasets: Dict[str, str], view: str = "current_segment_members") -> str:
    """One query over the same view of several accounts' datasets, with an `account` column."""
    return "\nUNION ALL\n".join(
        f"SELECT '{account}' AS account, v.* FROM {dataset}.{view} AS v"
        for account, dataset in datasets.items()
    )


def _print_definitions() -> None:
    parser = argparse.ArgumentParser(description="Print the CREATE VIEW statements.")
    parser.add_argument("schema", nargs="?", default="klaviyo")
    parser.add_argument(
        "--newest-versions",
        action="store_true",
        help="the tables hold every loaded version of a row (filesystem destination files)",
    )
    parser.add_argument(
        "--without-reports",
        action="store_true",
        help=f"{settings.SEGMENT_REPORTS_TABLE} is not loaded (segment_reports = false)",
    )
    args = parser.parse_args()
    definitions = view_definitions(
        lambda name: f"{args.schema}.{name}",
        newest_versions=args.newest_versions,
        with_reports=not args.without_reports,
    )
    for view, sql in definitions.items():
        print(f"CREATE OR REPLACE VIEW {args.schema}.{view} AS{sql};\n")


if __name__ == "__main__":
    _print_definitions()
