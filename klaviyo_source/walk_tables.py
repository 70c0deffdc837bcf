"""The three tables a membership walk fills: their keys, columns and how each is written.

A walk writes `segment_memberships`, `segment_membership_periods` and `profiles` (the profile
refresh writes `profiles` too). Each table is merged on a single-column key, or appended to
while the destination holds no row of it. Rows reach them as Arrow tables (`walk_batch.py`),
which skip the columns dlt's normalizer would add, so each carries `_dlt_load_id` itself and
no `_dlt_id`: each table has a key of its own.
"""

from typing import Collection, Dict

from dlt.common.schema.typing import TTableSchemaColumns, TWriteDispositionConfig
from dlt.extract import DltResource

from . import settings
from .rows import MEMBERSHIP_COLUMNS, PERIOD_COLUMNS, PROFILE_COLUMNS

LOAD_ID_COLUMN = "_dlt_load_id"
_BOOKKEEPING_COLUMNS: TTableSchemaColumns = {
    LOAD_ID_COLUMN: {"data_type": "text", "nullable": False},
}

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
