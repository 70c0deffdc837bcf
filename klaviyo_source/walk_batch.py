"""A walk's rows gathered into batches and handed to dlt as Arrow tables, one per walk table.

Every membership row is also the row of its period, so a batch holds memberships and, apart,
only the periods no membership row describes any more (one a re-join ended).
"""

from typing import Any, Iterator, List, Optional, Sequence

import dlt
import pyarrow as pa
import pyarrow.compute as pc

from . import settings
from .arrow_tables import arrow_table
from .rows import MEMBERSHIP_COLUMNS, PROFILE_COLUMNS, PROFILE_OPTIONAL_TYPES, Row
from .walk_tables import LOAD_ID_COLUMN


class WalkBatch:
    """Rows of one walk, handed to dlt as Arrow tables of at most `size` rows each.

    Profiles, wider rows, go in tables of at most `profiles_size` rows.

    Every membership row is also the row of its period, so a batch holds memberships and,
    apart, only the periods no membership row describes any more (one a re-join ended).
    Membership rows are turned into Arrow every `arrow_every` rows while the batch fills: as
    Python rows they take several times the memory, and every extract worker holds a batch.
    Each table is stamped with the run's `load_id` and routed to its walk table.
    """

    def __init__(
        self,
        load_id: str,
        size: int = settings.WALK_BATCH_ROWS,
        profiles_size: int = settings.WALK_BATCH_PROFILES,
        arrow_every: int = settings.WALK_ARROW_ROWS,
    ) -> None:
        self.load_id = load_id
        self.size = size
        self.profiles_size = profiles_size
        self.arrow_every = arrow_every
        self._memberships: List[Row] = []
        self._membership_tables: List[pa.Table] = []
        self._ended_earlier: List[Row] = []
        self._profiles: List[Row] = []

    def add(
        self, memberships: Sequence[Row], ended_earlier: Sequence[Row], profiles: Sequence[Row]
    ) -> Iterator[Any]:
        """Gather rows; yields tables while a batch is full.

        `ended_earlier`: membership rows of periods that ended before a membership's re-join.
        """
        self._memberships.extend(memberships)
        if len(self._memberships) >= self.arrow_every:
            self._memberships_to_arrow()
        self._ended_earlier.extend(ended_earlier)
        self._profiles.extend(profiles)
        # Each kind is handed on when its own batch is full: a flush of one would otherwise
        # cut the other's tables short.
        while max(self._held_memberships(), len(self._ended_earlier)) >= self.size:
            yield from self._take_memberships(self.size)
        while len(self._profiles) >= self.profiles_size:
            yield from self._take_profiles(self.profiles_size)

    def flush(self) -> Iterator[Any]:
        """Yield every row gathered."""
        yield from self._take_memberships(None)
        yield from self._take_profiles(None)

    def _held_memberships(self) -> int:
        return sum(table.num_rows for table in self._membership_tables) + len(self._memberships)

    def _memberships_to_arrow(self) -> None:
        if self._memberships:
            table = arrow_table(self._memberships, MEMBERSHIP_COLUMNS)
            self._membership_tables.append(table)
            self._memberships = []

    def _taken_membership_table(self, limit: Optional[int]) -> pa.Table:
        """Up to `limit` held memberships as one table; the rest stay held."""
        self._memberships_to_arrow()
        if not self._membership_tables:
            return arrow_table([], MEMBERSHIP_COLUMNS)
        held = pa.concat_tables(self._membership_tables)
        taken = held if limit is None else held.slice(0, limit)
        rest = held.slice(taken.num_rows)
        self._membership_tables = [rest] if rest.num_rows else []
        return taken

    def _take_memberships(self, limit: Optional[int]) -> Iterator[Any]:
        membership_table = self._taken_membership_table(limit)
        ended_earlier, self._ended_earlier = _split(self._ended_earlier, limit)
        if membership_table.num_rows:
            yield self._routed(membership_table, settings.MEMBERSHIPS_TABLE)
        if membership_table.num_rows or ended_earlier:
            periods = pa.concat_tables(
                [membership_table, arrow_table(ended_earlier, MEMBERSHIP_COLUMNS)]
            )
            yield self._routed(with_period_ids(periods), settings.PERIODS_TABLE)

    def _take_profiles(self, limit: Optional[int]) -> Iterator[Any]:
        profiles, self._profiles = _split(self._profiles, limit)
        if profiles:
            table = arrow_table(profiles, PROFILE_COLUMNS, PROFILE_OPTIONAL_TYPES)
            yield self._routed(table, settings.PROFILES_TABLE)

    def _routed(self, table: pa.Table, table_name: str) -> Any:
        table = table.append_column(
            pa.field(LOAD_ID_COLUMN, pa.string(), nullable=False),
            pa.array([self.load_id] * table.num_rows, pa.string()),
        )
        return dlt.mark.with_table_name(table, table_name)


def _split(rows: List[Row], limit: Optional[int]) -> tuple[List[Row], List[Row]]:
    if limit is None or len(rows) <= limit:
        return rows, []
    return rows[:limit], rows[limit:]


def with_period_ids(memberships: pa.Table) -> pa.Table:
    """Membership rows as period rows: `period_id` put first.

    A period is a membership from one join: its id is the membership's plus the join time in
    ISO 8601 with microseconds (`...:2024-05-01T03:04:05.000123+00:00`).
    """
    # The UTC clock reading written without a zone (`2024-05-01 03:04:05.000123`, always six
    # digits) is the same text as `strftime` gives, at a tenth of its cost.
    clock = memberships.column("joined_group_at").cast(pa.timestamp("us")).cast(pa.string())
    stamps = pc.binary_join_element_wise(pc.replace_substring(clock, " ", "T"), "+00:00", "")
    ids = pc.binary_join_element_wise(memberships.column("membership_id"), stamps, ":")
    return memberships.add_column(0, pa.field("period_id", pa.string(), nullable=False), ids)
