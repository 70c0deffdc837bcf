"""WalkBatch: every gathered row reaches exactly one Arrow table, tables stay within size."""

from datetime import datetime, timezone
from typing import Any, Dict, List

import pyarrow as pa

from klaviyo_source import settings
from klaviyo_source.rows import membership_row
from klaviyo_source.walk_batch import WalkBatch
from klaviyo_source.walk_tables import WALK_TABLES

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _memberships(count: int) -> List[Dict[str, Any]]:
    return [membership_row("SEG", f"P{n}", NOW, NOW, NOW) for n in range(count)]


def _tables(items: List[Any]) -> Dict[str, List[pa.Table]]:
    by_name: Dict[str, List[pa.Table]] = {}
    for item in items:
        by_name.setdefault(item.meta.table_name, []).append(item.data)
    return by_name


def test_tables_stay_within_their_sizes_and_keep_every_row() -> None:
    batch = WalkBatch("load-1", size=50, profiles_size=7)
    items: List[Any] = []
    for page in range(6):  # 6 pages of 20 memberships, 4 new profiles each
        rows = _memberships(120)[page * 20 : (page + 1) * 20]
        new_profiles = [
            {"id": f"P{page}-{n}", "email": f"{page}-{n}@example.com"} for n in range(4)
        ]
        items += list(batch.add(rows, [], new_profiles))
    items += list(batch.flush())

    tables = _tables(items)
    memberships = tables[settings.MEMBERSHIPS_TABLE]
    profiles = tables[settings.PROFILES_TABLE]
    # Full tables until the last: a flush of profiles does not cut the memberships' short.
    assert [table.num_rows for table in memberships] == [50, 50, 20]
    assert [table.num_rows for table in profiles] == [7, 7, 7, 3]
    assert sum(table.num_rows for table in tables[settings.PERIODS_TABLE]) == 120
    profile_ids = [i for table in profiles for i in table.column("id").to_pylist()]
    assert sorted(profile_ids) == sorted(f"P{p}-{n}" for p in range(6) for n in range(4))
    # Profiles fill their smaller tables first: they are handed on before memberships are.
    assert len(profiles) > len(memberships)
    load_ids = {i for table in profiles for i in table.column("_dlt_load_id").to_pylist()}
    assert load_ids == {"load-1"}


def test_memberships_turned_into_arrow_as_they_come_keep_their_order_and_table_sizes() -> None:
    # 13 divides neither the table size nor a page: tables are cut across the Arrow pieces.
    batch = WalkBatch("load-1", size=50, profiles_size=7, arrow_every=13)
    rows = _memberships(137)
    rejoined = membership_row("SEG", "P0", NOW, NOW, NOW, left_at_latest=NOW, left_reason="x")
    items: List[Any] = []
    for start in range(0, len(rows), 9):
        ended = [rejoined] if start == 0 else []
        items += list(batch.add(rows[start : start + 9], ended, []))
    items += list(batch.flush())

    tables = _tables(items)
    memberships = tables[settings.MEMBERSHIPS_TABLE]
    assert [table.num_rows for table in memberships] == [50, 50, 37]
    handed_on = [i for table in memberships for i in table.column("membership_id").to_pylist()]
    assert handed_on == [row["membership_id"] for row in rows]
    periods = tables[settings.PERIODS_TABLE]
    assert sum(table.num_rows for table in periods) == 138
    assert [r for t in periods for r in t.column("left_reason").to_pylist()].count("x") == 1


def test_a_period_id_is_the_membership_id_and_the_join_in_iso_8601_with_microseconds() -> None:
    joins = [
        datetime(2024, 5, 1, 3, 4, 5, tzinfo=timezone.utc),
        datetime(2024, 5, 1, 3, 4, 5, 123, tzinfo=timezone.utc),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
        NOW,
    ]
    rows = [membership_row("SEG", f"P{n}", joined, NOW, NOW) for n, joined in enumerate(joins)]
    batch = WalkBatch("load-1")
    periods = _tables(list(batch.add(rows, [], [])) + list(batch.flush()))
    period_ids = periods[settings.PERIODS_TABLE][0].column("period_id").to_pylist()

    assert period_ids == [
        f"SEG:P{n}:{joined.isoformat(timespec='microseconds')}" for n, joined in enumerate(joins)
    ]
    assert period_ids[0] == "SEG:P0:2024-05-01T03:04:05.000000+00:00"


def test_every_table_carries_the_load_id_and_no_row_id() -> None:
    batch = WalkBatch("load-1")
    profiles = [{"id": f"P{n}", "email": f"{n}@example.com"} for n in range(3)]
    tables = _tables(list(batch.add(_memberships(3), [], profiles)) + list(batch.flush()))

    assert set(tables) == set(WALK_TABLES)
    for (table,) in tables.values():
        assert table.column("_dlt_load_id").to_pylist() == ["load-1"] * table.num_rows
        assert "_dlt_id" not in table.column_names
