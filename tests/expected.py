"""Reads what a pipeline loaded into DuckDB and what the simulator holds, in comparable shapes."""

import json
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Set, Tuple

import dlt

from klaviyo_source.simulator import Account

Memberships = Dict[str, Dict[str, datetime]]


def utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


def query(pipeline: dlt.Pipeline, sql: str) -> List[Tuple[Any, ...]]:
    with pipeline.sql_client() as client:
        return [tuple(row) for row in client.execute_sql(sql) or []]


def loaded_memberships(pipeline: dlt.Pipeline) -> Memberships:
    """Current members per segment, as loaded."""
    result: Memberships = {}
    rows = query(
        pipeline,
        "SELECT segment_id, profile_id, joined_group_at FROM segment_memberships WHERE is_member",
    )
    for segment_id, profile_id, joined in rows:
        result.setdefault(segment_id, {})[profile_id] = utc(joined)
    return result


def true_memberships(account: Account) -> Memberships:
    """Current members per live segment, leaving out empty segments as a table would."""
    return {segment_id: members for segment_id, members in account.memberships().items() if members}


def loaded_segments(pipeline: dlt.Pipeline) -> Dict[str, Dict[str, Any]]:
    rows = query(
        pipeline,
        "SELECT id, name, is_active, is_processing, is_starred, created, updated, deleted_at "
        "FROM segments",
    )
    return {
        row[0]: {
            "name": row[1],
            "is_active": row[2],
            "is_processing": row[3],
            "is_starred": row[4],
            "created": utc(row[5]) if row[5] else None,
            "updated": utc(row[6]) if row[6] else None,
            "deleted_at": row[7],
        }
        for row in rows
    }


def true_segments(account: Account) -> Dict[str, Dict[str, Any]]:
    return {
        segment_id: {
            "name": attributes["name"],
            "is_active": attributes["is_active"],
            "is_processing": attributes["is_processing"],
            "is_starred": attributes["is_starred"],
            "created": utc(attributes["created"]) if attributes["created"] else None,
            "updated": utc(attributes["updated"]) if attributes["updated"] else None,
            "deleted_at": None,
        }
        for segment_id, attributes in account.segments().items()
    }


def loaded_segment_tags(pipeline: dlt.Pipeline) -> Set[Tuple[str, str]]:
    return {
        (row[0], row[1]) for row in query(pipeline, "SELECT segment_id, tag_id FROM segment_tags")
    }


def loaded_tags(pipeline: dlt.Pipeline) -> Dict[str, str]:
    return {row[0]: row[1] for row in query(pipeline, "SELECT id, name FROM tags")}


def table_snapshot(pipeline: dlt.Pipeline, table: str) -> List[Tuple[Any, ...]]:
    """Every row of a table without dlt's load bookkeeping, sorted, to compare two runs."""
    with pipeline.sql_client() as client:
        columns = [
            name
            for name in pipeline.default_schema.tables[table]["columns"]
            if not name.startswith("_dlt_")
        ]
        quoted = ", ".join(f'"{name}"' for name in columns)
        return sorted(
            (tuple(row) for row in client.execute_sql(f"SELECT {quoted} FROM {table}") or []),
            key=repr,
        )


_PROFILE_TEXT = ("email", "phone_number", "external_id", "first_name", "last_name", "organization")
_PROFILE_TIMES = ("created", "updated", "last_event_date")
_LOCATION_NUMBERS = ("latitude", "longitude")


def loaded_profiles(pipeline: dlt.Pipeline) -> Dict[str, Dict[str, Any]]:
    """Profile attributes as loaded: timestamps in UTC, JSON parsed, coordinates as floats."""
    columns = [
        *_PROFILE_TEXT,
        *_PROFILE_TIMES,
        "location__city",
        *(f"location__{name}" for name in _LOCATION_NUMBERS),
        "properties",
    ]
    rows = query(pipeline, f"SELECT id, {', '.join(columns)} FROM profiles")
    loaded = {}
    for profile_id, *values in rows:
        row = dict(zip(columns, values, strict=True))
        for name in _PROFILE_TIMES:
            row[name] = utc(row[name]) if row[name] is not None else None
        properties = row["properties"]
        row["properties"] = json.loads(properties) if isinstance(properties, str) else properties
        loaded[profile_id] = row
    return loaded


def true_profiles(account: Account, profile_ids: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """The same attributes from the simulator, for the given profiles."""
    profiles = account.profiles()
    expected = {}
    for profile_id in profile_ids:
        truth = profiles[profile_id]
        location = truth.get("location") or {}
        row: Dict[str, Any] = {name: truth.get(name) for name in _PROFILE_TEXT}
        for name in _PROFILE_TIMES:
            row[name] = utc(truth[name]) if truth.get(name) is not None else None
        row["location__city"] = location.get("city")
        for name in _LOCATION_NUMBERS:
            value = location.get(name)
            row[f"location__{name}"] = float(value) if value not in (None, "") else None
        row["properties"] = truth.get("properties") or {}
        expected[profile_id] = row
    return expected


def member_ids(account: Account) -> Set[str]:
    """Profiles in at least one segment: the ones a full export loads."""
    return {profile_id for members in account.memberships().values() for profile_id in members}
