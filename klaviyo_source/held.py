"""What earlier runs already loaded, read back from the pipeline's destination.

dlt's `merge` replaces a whole row, and Klaviyo never says when a profile leaves or a segment
disappears. So the source compares what Klaviyo shows now with what the destination holds:
to keep `first_seen_at` when a join is fetched again, to skip rows that did not change, and
to close the memberships of a deleted segment. Reads go through the pipeline's SQL client, which
works for SQL warehouses and (through DuckDB) the filesystem destination alike.
Before the first load, or outside a pipeline, nothing is held.
"""

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

import dlt
from dlt.common.pipeline import SupportsPipeline
from dlt.destinations.exceptions import DatabaseUndefinedRelation

from . import settings


@dataclass(frozen=True)
class HeldMembership:
    """One membership row as the destination holds it."""

    profile_id: str
    joined_group_at: datetime
    first_seen_at: datetime
    last_seen_at: datetime
    is_member: bool


_MEMBERSHIP_COLUMNS = ("profile_id", "joined_group_at", "first_seen_at", "last_seen_at", "is_member")


class HeldData:
    """Read-only view of the tables this source loaded before."""

    def __init__(self, pipeline: Optional[SupportsPipeline]) -> None:
        self._pipeline = pipeline
        # Made here, in the thread that runs the pipeline: building a SQL client resolves
        # configuration, which dlt does not allow from extract worker threads. Queries then
        # share it one at a time.
        self._client = pipeline.sql_client() if pipeline is not None else None  # type: ignore[attr-defined]
        self._lock = threading.Lock()

    @classmethod
    def of_current_pipeline(cls) -> "HeldData":
        """The destination of the pipeline that is running this source, if any."""
        try:
            pipeline = dlt.current.pipeline()
        except Exception:  # no pipeline is active (the source was iterated directly)
            return cls(None)
        if getattr(pipeline, "destination", None) is None:
            return cls(None)
        return cls(pipeline)

    def _known_columns(self, table: str) -> List[str]:
        """Columns the pipeline's schema has for a table; empty before its first load."""
        if self._pipeline is None or not self._pipeline.default_schema_name:
            return []
        schema = self._pipeline.default_schema  # type: ignore[attr-defined]
        return list(schema.tables.get(table, {}).get("columns", {}))

    def _rows(
        self, table: str, columns: Sequence[str], where: str = "", *args: Any
    ) -> List[Dict[str, Any]]:
        if not columns or not set(columns) <= set(self._known_columns(table)):
            return []
        with self._lock, self._client as client:  # type: ignore[union-attr]
            selected = ", ".join(client.escape_column_name(column) for column in columns)
            sql = f"SELECT {selected} FROM {client.make_qualified_table_name(table)} {where}"
            try:
                rows = client.execute_sql(sql, *args) or []
            except DatabaseUndefinedRelation:
                return []  # the schema knows the table but it was never loaded (or was dropped)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def live_segments(self) -> Dict[str, Dict[str, Any]]:
        """Segments loaded before and not marked deleted, by id, with every column held."""
        columns = [
            name
            for name in self._known_columns(settings.SEGMENTS_TABLE)
            if not name.startswith("_dlt_")
        ]
        rows = self._rows(settings.SEGMENTS_TABLE, columns, "WHERE deleted_at IS NULL")
        return {row["id"]: row for row in rows}

    def memberships(
        self, segment_id: str, joined_after: Optional[datetime] = None
    ) -> Dict[str, HeldMembership]:
        """Current memberships of a segment, optionally only those joined after a time."""
        where = "WHERE segment_id = %s AND is_member"
        args: List[Any] = [segment_id]
        if joined_after is not None:
            where += " AND joined_group_at > %s"
            args.append(joined_after)
        rows = self._rows(settings.MEMBERSHIPS_TABLE, _MEMBERSHIP_COLUMNS, where, *args)
        return {row["profile_id"]: HeldMembership(**row) for row in rows}
