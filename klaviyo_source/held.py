"""What earlier runs already loaded, read back from the pipeline's destination.

dlt's `merge` replaces a whole row, and Klaviyo never says when a profile leaves or a segment
disappears. So the source compares what Klaviyo shows now with what the destination holds:
to keep `first_seen_at` when a join is fetched again, to skip rows that did not change, and
to close the memberships of a deleted segment. It also tells, of each table, whether it is still
empty (and so can be appended to rather than merged into) and which columns it has. Reads go
through the pipeline's SQL client, which
works for SQL warehouses and (through DuckDB) the filesystem destination alike.
Before the first load, or outside a pipeline, nothing is held.
"""

import contextlib
import threading
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence

import dlt
from dlt.destinations.exceptions import DatabaseUndefinedRelation
from dlt.destinations.sql_client import SqlClientBase

from . import settings
from .profile_ids import JoinedTimes
from .views import appends_versions, newest_version_of_each_key

# Rows read from the destination at a time when a whole segment is read.
FETCH_ROWS = 10_000
# Profile ids one lookup query names (each is a bound parameter).
LOOKUP_IDS = 1_000


@dataclass(frozen=True, slots=True)
class HeldMembership:
    """One current membership as the destination holds it."""

    profile_id: str
    joined_group_at: datetime
    first_seen_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class HeldProfile:
    """What the destination holds of one profile: when Klaviyo last updated it, as loaded,
    and whether it was found deleted."""

    updated: Optional[datetime]
    deleted: bool


_MEMBERSHIP_COLUMNS = ("profile_id", "joined_group_at", "first_seen_at", "last_seen_at")
_CURRENT = "segment_id = %s AND is_member"
_KEYS = {
    settings.SEGMENTS_TABLE: "id",
    settings.MEMBERSHIPS_TABLE: "membership_id",
    settings.PROFILES_TABLE: "id",
}
# Every table whose rows or columns a run reads back.
_TABLES = (
    settings.SEGMENTS_TABLE,
    settings.MEMBERSHIPS_TABLE,
    settings.PERIODS_TABLE,
    settings.PROFILES_TABLE,
)


@dataclass(frozen=True)
class HeldTable:
    """What the destination holds of one table: its columns, and whether it has a row."""

    columns: FrozenSet[str]
    has_rows: bool


class HeldData:
    """Read-only view of the tables this source loaded before, shared by parallel walks.

    Made once a run, in the pipeline's thread (see `run.start_run`): it asks the pipeline for
    its SQL client there, and reads then which tables the destination has, with their columns.
    After that it touches nothing of the pipeline's. Walks in extract worker threads only run
    queries, one at a time under a lock, on that one client: building a client resolves
    configuration, which dlt does not allow from worker threads, and reading the pipeline's
    schema from one reloads it in place under the pipeline's feet.
    """

    def __init__(self, sql_client: Optional[SqlClientBase[Any]], appends_versions: bool) -> None:
        self._client = sql_client
        # Reentrant: a walk abandoned mid-way (a failed run) ends its `kept_open` block when the
        # collector finalizes it, in whatever thread it runs, maybe one inside a query here.
        # That thread is then in a block of its own, so the connection stays open under it.
        self._lock = threading.RLock()
        # How many `kept_open` blocks are running: the connection stays open while any is.
        self._keepers = 0
        # Plain files cannot be merged into: the filesystem destination appends every version
        # of a row, so only each key's newest load counts.
        self._appends_versions = appends_versions
        with self.kept_open():
            self.tables: Mapping[str, HeldTable] = MappingProxyType(self._read_tables(_TABLES))

    @classmethod
    def of_current_pipeline(cls) -> "HeldData":
        """The destination of the pipeline that is running this source, if any."""
        try:
            pipeline = dlt.current.pipeline()
        except Exception:  # no pipeline is active (the source was iterated directly)
            return cls(None, appends_versions=False)
        destination = getattr(pipeline, "destination", None)
        if destination is None:
            return cls(None, appends_versions=False)
        return cls(
            pipeline.sql_client(),  # type: ignore[attr-defined]
            appends_versions=appends_versions(pipeline),
        )

    @contextlib.contextmanager
    def kept_open(self) -> Iterator[None]:
        """Run the queries inside on one connection, shared with any other open block.

        Opening a connection costs more than most of these queries (a DuckDB file is opened
        and its configuration applied each time), so a walk or the run's setup keeps one open
        for all of its reads. The last block to end closes it: no connection outlives the
        extract, and the load finds the destination as it left it.
        """
        if self._client is None:
            yield
            return
        with self._lock:
            if self._keepers == 0:
                self._client.open_connection()
            self._keepers += 1
        try:
            yield
        finally:
            with self._lock:
                self._keepers -= 1
                if self._keepers == 0:
                    self._client.close_connection()

    @contextlib.contextmanager
    def _connected(self, client: SqlClientBase[Any]) -> Iterator[SqlClientBase[Any]]:
        """`client` on the connection kept open, or on one opened for this query alone."""
        if self._keepers:
            yield client
        else:
            with client:
                yield client

    @property
    def available(self) -> bool:
        """Whether a destination can be read at all (False outside a pipeline)."""
        return self._client is not None

    def _known_columns(self, table: str) -> FrozenSet[str]:
        """Columns the destination has for a table; none before its first load."""
        held = self.tables.get(table)
        return held.columns if held is not None else frozenset()

    def _fetch(self, table: str, needs: Sequence[str], sql: str, *args: Any) -> List[Sequence[Any]]:
        """Run `sql` with `{table}` standing for the table; no rows if it was never loaded."""
        with self._fetching(table, needs, sql, *args) as cursor:
            return [] if cursor is None else list(cursor.fetchall() or [])

    @contextlib.contextmanager
    def _fetching(self, table: str, needs: Sequence[str], sql: str, *args: Any) -> Iterator[Any]:
        """`_cursor` over a table this source loaded, or None if it lacks the `needs` columns."""
        if not needs or not set(needs) <= set(self._known_columns(table)):
            yield None
            return
        with self._cursor(table, sql, *args, newest_versions=self._appends_versions) as cursor:
            yield cursor

    @contextlib.contextmanager
    def _cursor(
        self, table: str, sql: str, *args: Any, newest_versions: bool = False
    ) -> Iterator[Any]:
        """A cursor over `sql` run on `table`, or None if the table was never loaded."""
        if self._client is None:
            yield None
            return
        with self._lock, self._connected(self._client) as client:
            qualified = client.make_qualified_table_name(table)
            if newest_versions:
                qualified = f"{newest_version_of_each_key(qualified, _KEYS[table])} AS newest"
            with contextlib.ExitStack() as stack:
                try:
                    cursor = stack.enter_context(
                        client.execute_query(sql.format(table=qualified), *args)
                    )
                except DatabaseUndefinedRelation:
                    cursor = None  # never loaded, or dropped
                yield cursor

    def _memberships(self, where: str, *args: Any) -> Dict[str, HeldMembership]:
        sql = f"SELECT {', '.join(_MEMBERSHIP_COLUMNS)} FROM {{table}} WHERE {where}"
        rows = self._fetch(
            settings.MEMBERSHIPS_TABLE, (*_MEMBERSHIP_COLUMNS, "is_member"), sql, *args
        )
        return {row[0]: HeldMembership(*row) for row in rows}

    def _read_tables(self, tables: Sequence[str]) -> Dict[str, HeldTable]:
        """Those of `tables` the destination has, by name, read with one query each.

        Asked of the destination itself, not of the pipeline's schema: a pipeline restored
        without its schema would otherwise take tables full of rows for new ones. The columns
        are those the query's result names, which every SQL destination gives.
        """
        held = {}
        for table in tables:
            with self._cursor(table, "SELECT * FROM {table} LIMIT 1") as cursor:
                if cursor is not None:
                    columns = frozenset(column[0] for column in cursor.description or ())
                    held[table] = HeldTable(columns, has_rows=cursor.fetchone() is not None)
        return held

    def live_segments(self) -> Dict[str, Dict[str, Any]]:
        """Segments loaded before and not marked deleted, by id, with every column held."""
        columns = sorted(
            name
            for name in self._known_columns(settings.SEGMENTS_TABLE)
            if not name.startswith("_dlt_")
        )
        sql = f"SELECT {', '.join(columns)} FROM {{table}} WHERE deleted_at IS NULL"
        held = [
            dict(zip(columns, row, strict=True))
            for row in self._fetch(settings.SEGMENTS_TABLE, columns, sql)
        ]
        return {row["id"]: row for row in held}

    def member_counts(self) -> Dict[str, int]:
        """Current members held per segment."""
        sql = "SELECT segment_id, COUNT(*) FROM {table} WHERE is_member GROUP BY segment_id"
        rows = self._fetch(settings.MEMBERSHIPS_TABLE, ("segment_id", "is_member"), sql)
        return {segment_id: int(count) for segment_id, count in rows}

    def joined_times(self, segment_id: str) -> JoinedTimes:
        """When each current member of a segment joined, by profile id.

        All a full walk needs to compare, read in chunks into a compact map (`JoinedTimes`)
        rather than a dict or whole held rows. A reconciliation holds this for every segment
        it walks at once, one for each extract worker; each belongs to its walk's thread
        alone.
        """
        needs = ("profile_id", "joined_group_at", "is_member")
        sql = f"SELECT profile_id, joined_group_at FROM {{table}} WHERE {_CURRENT}"
        joined = JoinedTimes()
        with self._fetching(settings.MEMBERSHIPS_TABLE, needs, sql, segment_id) as cursor:
            while cursor is not None and (chunk := cursor.fetchmany(FETCH_ROWS)):
                for profile_id, joined_at in chunk:
                    joined[profile_id] = joined_at
        return joined

    def profiles_among(self, profile_ids: Sequence[str]) -> Dict[str, HeldProfile]:
        """The held profiles among `profile_ids`, by id."""
        held: Dict[str, HeldProfile] = {}
        deleted = self._deleted_column()
        for start in range(0, len(profile_ids), LOOKUP_IDS):
            some = profile_ids[start : start + LOOKUP_IDS]
            marks = ", ".join(["%s"] * len(some))
            sql = f"SELECT id, updated, {deleted} FROM {{table}} WHERE id IN ({marks})"
            for profile_id, updated, deleted_at in self._fetch(
                settings.PROFILES_TABLE, ("id", "updated"), sql, *some
            ):
                held[profile_id] = HeldProfile(updated, deleted_at is not None)
        return held

    def live_profile_ids(self, after: str, limit: int) -> List[str]:
        """Up to `limit` held profiles not found deleted, the next by id after `after`."""
        sql = (
            f"SELECT id FROM {{table}} WHERE {self._deleted_column()} IS NULL AND id > %s "
            f"ORDER BY id LIMIT {int(limit)}"
        )
        rows = self._fetch(settings.PROFILES_TABLE, ("id",), sql, after)
        return [profile_id for (profile_id,) in rows]

    def profiles_that_left(self, since: datetime) -> List[str]:
        """Profiles none of whose held memberships is current, the last ended at `since` or
        later."""
        sql = (
            "SELECT profile_id FROM {table} GROUP BY profile_id "
            "HAVING MAX(CASE WHEN is_member THEN 1 ELSE 0 END) = 0 AND MAX(left_at_latest) >= %s"
        )
        needs = ("profile_id", "is_member", "left_at_latest")
        rows = self._fetch(settings.MEMBERSHIPS_TABLE, needs, sql, since)
        return [profile_id for (profile_id,) in rows]

    def _deleted_column(self) -> str:
        # Profiles loaded before deletions were marked have no such column yet.
        held = self._known_columns(settings.PROFILES_TABLE)
        return "deleted_at" if "deleted_at" in held else "NULL"

    def members_among(
        self, segment_id: str, profile_ids: Sequence[str]
    ) -> Dict[str, HeldMembership]:
        """Current memberships of a segment for some profiles: a page, or those gone from it."""
        held: Dict[str, HeldMembership] = {}
        for start in range(0, len(profile_ids), LOOKUP_IDS):
            some = profile_ids[start : start + LOOKUP_IDS]
            marks = ", ".join(["%s"] * len(some))
            held.update(
                self._memberships(f"{_CURRENT} AND profile_id IN ({marks})", segment_id, *some)
            )
        return held
