"""SQL views over the loaded tables: current members, membership history, growth, joins/leaves.

The SQL is plain enough for DuckDB and PostgreSQL alike. `create_views` creates them in the
pipeline's dataset after a load; `view_definitions` returns the same statements for any other
warehouse (print them with `python -m klaviyo_source.views <schema>`).
"""

import logging
import sys
from typing import Callable, Dict, List

from dlt.common.pipeline import SupportsPipeline
from dlt.destinations.exceptions import DatabaseException

from . import settings

Qualify = Callable[[str], str]
logger = logging.getLogger(__name__)


def _current_members(q: Qualify, with_profiles: bool) -> str:
    email = ", p.email" if with_profiles else ""
    profiles = (
        f" LEFT JOIN {q(settings.PROFILES_TABLE)} AS p ON p.id = m.profile_id"
        if with_profiles
        else ""
    )
    return f"""
SELECT m.segment_id, s.name AS segment_name, m.profile_id{email},
       m.joined_group_at, m.first_seen_at
FROM {q(settings.MEMBERSHIPS_TABLE)} AS m
JOIN {q(settings.SEGMENTS_TABLE)} AS s ON s.id = m.segment_id AND s.deleted_at IS NULL{profiles}
WHERE m.is_member"""


def _history(q: Qualify) -> str:
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
FROM {q(settings.PERIODS_TABLE)} AS h
LEFT JOIN {q(settings.SEGMENTS_TABLE)} AS s ON s.id = h.segment_id"""


def _joins_leaves_daily(q: Qualify) -> str:
    # A leave counts on the day it was found; it happened after `left_at_earliest`. Days are
    # UTC days whatever the session's time zone.
    return f"""
SELECT segment_id, day, CAST(SUM(joins) AS BIGINT) AS joins,
       CAST(SUM(leaves) AS BIGINT) AS leaves
FROM (
    SELECT segment_id, CAST(joined_group_at AT TIME ZONE 'UTC' AS DATE) AS day, 1 AS joins,
           0 AS leaves
    FROM {q(settings.PERIODS_TABLE)}
    UNION ALL
    SELECT segment_id, CAST(left_at_latest AT TIME ZONE 'UTC' AS DATE) AS day, 0 AS joins,
           1 AS leaves
    FROM {q(settings.PERIODS_TABLE)} WHERE left_at_latest IS NOT NULL
) AS changes
GROUP BY segment_id, day"""


def _size_daily(q: Qualify) -> str:
    return f"""
SELECT segment_id, day, joins, leaves,
       CAST(SUM(joins - leaves) OVER (
           PARTITION BY segment_id ORDER BY day ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
       ) AS BIGINT) AS members
FROM {q("segment_joins_leaves_daily")}"""


def view_definitions(qualify: Qualify, with_profiles: bool = True) -> Dict[str, str]:
    """`CREATE VIEW` bodies by view name, in the order they must be created."""
    return {
        "current_segment_members": _current_members(qualify, with_profiles),
        "segment_membership_history": _history(qualify),
        "segment_joins_leaves_daily": _joins_leaves_daily(qualify),
        "segment_size_daily": _size_daily(qualify),
    }


def create_views(pipeline: SupportsPipeline) -> List[str]:
    """Create (or replace) the views in the pipeline's dataset; returns their names.

    Does nothing on destinations without SQL views (the filesystem destination): query the
    tables there, or apply `view_definitions` in the engine that reads them. A view the
    destination refuses is reported, not raised: the load it follows has succeeded.
    """
    tables = pipeline.default_schema.tables  # type: ignore[attr-defined]
    if settings.PERIODS_TABLE not in tables or settings.SEGMENTS_TABLE not in tables:
        return []
    try:
        client = pipeline.sql_client()  # type: ignore[attr-defined]
    except Exception:  # destination without a SQL client
        return []
    if not getattr(client, "capabilities", None) or client.__class__.__name__.startswith(
        "Filesystem"
    ):
        return []
    with client:
        definitions = view_definitions(
            client.make_qualified_table_name, with_profiles=settings.PROFILES_TABLE in tables
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


if __name__ == "__main__":
    schema = sys.argv[1] if len(sys.argv) > 1 else "klaviyo"
    for view, sql in view_definitions(lambda name: f"{schema}.{name}").items():
        print(f"CREATE OR REPLACE VIEW {schema}.{view} AS{sql};\n")
