"""The three tables a membership walk fills, and the Arrow tables that fill them.

A walk writes `segment_memberships`, `segment_membership_periods` and `profiles`. Its rows are
gathered into batches (`WalkBatch`) and handed to dlt as Arrow tables: dlt writes those straight
to parquet and loads them without its row-by-row normalizer, which cost more CPU than
everything else in an export. Arrow tables skip the columns dlt's normalizer would add, so each
carries `_dlt_load_id` (the run's load id) itself. They carry no `_dlt_id`: each table has a
key of its own, and a copy of it made a DuckDB file a third larger.

Column types come from the declared columns; a profile attribute nobody declared (a field
Klaviyo adds in a later revision) keeps the type Arrow infers for it.
"""

import logging
from datetime import datetime
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence

import dlt
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common import json
from dlt.common import logger as dlt_logging
from dlt.common.schema.typing import TTableSchemaColumns, TWriteDispositionConfig
from dlt.extract import DltResource

from . import settings
from .rows import (
    MEMBERSHIP_COLUMNS,
    PERIOD_COLUMNS,
    PROFILE_COLUMNS,
    PROFILE_OPTIONAL_TYPES,
    Row,
    parse_datetime,
)

logger = logging.getLogger(__name__)

LOAD_ID_COLUMN = "_dlt_load_id"
_BOOKKEEPING_COLUMNS: TTableSchemaColumns = {
    LOAD_ID_COLUMN: {"data_type": "text", "nullable": False},
}

_TIMESTAMP = pa.timestamp("us", tz="UTC")

# A run loads each key once (see members_this_run): the staged rows are deduplicated already,
# and dlt's window that would deduplicate them again over a million rows was half of the
# load's time and made DuckDB need twice the memory.
_MERGE_DEDUPLICATED_ROWS: TWriteDispositionConfig = {
    "disposition": "merge",
    "strategy": "delete-insert",
    "deduplicated": True,
}

# table name -> (key, declared columns)
WALK_TABLES: Dict[str, tuple[str, TTableSchemaColumns]] = {
    settings.MEMBERSHIPS_TABLE: ("membership_id", MEMBERSHIP_COLUMNS),
    settings.PERIODS_TABLE: ("period_id", PERIOD_COLUMNS),
    settings.PROFILES_TABLE: ("id", PROFILE_COLUMNS),
}


def declare_walk_tables(
    resource: DltResource,
    appended: Collection[str] = frozenset(),
    tables: Collection[str] = tuple(WALK_TABLES),
) -> DltResource:
    """Give the walking resource its three tables, each with its own key and columns.

    Each table is a variant of the resource, declared once: hints given with every page
    would make dlt validate the table schema again for every page. None of the tables takes
    its columns from the resource itself: dlt would give the profiles table the memberships'
    columns too. A loader file format chosen for the run (`pipeline.run(loader_file_format=
    ...)`) reaches only the resource's own hints, so each run passes it on to the tables.

    The tables in `appended` are appended to rather than merged into: those the destination
    holds no row of (see `HeldData.tables`). A load holds each key once, so
    into an empty table appending gives what a merge would, without a merge's staged copy of
    every row and its delete: at 1M memberships with profiles the load took 3.5 s instead of
    6 to 7.

    Another resource writing one of these tables (the profile refresh writes `profiles`)
    declares it alike, naming it in `tables`.
    """
    file_format = resource.compute_table_schema().get("file_format")
    for table_name, (key, columns) in WALK_TABLES.items():
        if table_name not in tables:
            continue
        resource.apply_hints(
            table_name=table_name,
            write_disposition=("append" if table_name in appended else _MERGE_DEDUPLICATED_ROWS),
            primary_key=key,
            columns={**columns, **_BOOKKEEPING_COLUMNS},
            file_format=file_format,
            create_table_variant=True,
        )
    return resource


class _JsonColumnNotice(logging.Filter):
    """Drops dlt's notice, repeated for every profiles table, that a JSON column came as text.

    JSON columns travel in Arrow tables as JSON text by design (Arrow has no JSON type dlt
    reads), and the declared `json` type is the one the destination gets.
    """

    def __init__(self, resource_name: str) -> None:
        super().__init__()
        self.resource_name = resource_name

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith(f"In resource: {self.resource_name}, when merging arrow schema")
        )


def quiet_json_column_notices(resource_name: str) -> None:
    """Silence that notice for the walking resource on dlt's logger, once per process."""
    dlt_logger = dlt_logging.LOGGER
    if dlt_logger is None:
        return
    if not any(
        isinstance(existing, _JsonColumnNotice) and existing.resource_name == resource_name
        for existing in dlt_logger.filters
    ):
        dlt_logger.addFilter(_JsonColumnNotice(resource_name))


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


def arrow_table(
    rows: Sequence[Row], columns: TTableSchemaColumns, other_types: Optional[Dict[str, str]] = None
) -> pa.Table:
    """One Arrow table of `rows`: declared columns first, typed as declared, then the rest.

    A column outside `columns` takes its type from `other_types`, else from Arrow's inference.
    """
    names = list(columns)
    seen = set(names)
    for row in rows:
        for name in row:
            if name not in seen:
                seen.add(name)
                names.append(name)
    fields = []
    arrays = []
    for name in names:
        hint = columns.get(name) or {}
        data_type = hint.get("data_type") or (other_types or {}).get(name)
        array = _array([row.get(name) for row in rows], data_type)
        arrays.append(array)
        fields.append(pa.field(name, array.type, nullable=hint.get("nullable", True)))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _array(values: List[Any], data_type: Optional[str]) -> pa.Array:
    if data_type is None:
        return _inferred(values)
    if data_type == "timestamp":
        return _timestamps(values)
    if data_type == "double":
        return pa.array([_number(value) for value in values], pa.float64())
    if data_type in ("text", "json"):
        return _texts(values)
    if data_type == "bool":
        return pa.array(values, pa.bool_())
    raise ValueError(f"no Arrow type for the column type {data_type!r}")


def _texts(values: List[Any]) -> pa.Array:
    try:
        # Nearly always text already: converted in C, without a Python call per value.
        return pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_text(value) for value in values], pa.string())


def _inferred(values: List[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed kinds (a number in one row, text in the next): keep every value, as text.
        return _texts(values)


def _text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _number(value: Any) -> Optional[float]:
    """Klaviyo sends coordinates as numbers or numeric strings; anything else is unknown."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _timestamps(values: List[Any]) -> pa.Array:
    try:
        # Datetimes (every timestamp this source computes) convert in C; a text value raises.
        return pa.array(values, _TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    try:
        # Arrow parses ISO 8601 with an offset or Z in C, far faster than one call per value.
        return pa.array(values, pa.string()).cast(_TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_datetime(value) for value in values], _TIMESTAMP)


def _datetime(value: Any) -> Optional[datetime]:
    """One value Arrow could not parse (no offset, nanoseconds): parsed here, else dropped."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return parse_datetime(str(value))
    except ValueError:
        logger.warning(f"{value!r} is not a date and time; it is loaded as null")
        return None
