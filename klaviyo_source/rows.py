"""Shapes Klaviyo's JSON:API resources into flat table rows, and declares those tables' columns.

Rows are named after Klaviyo's attributes: the envelope (`type`, `attributes`, `links`,
`relationships`) is dropped and `id` sits beside the attributes. Free-form JSON (a segment's
`definition`, a profile's `properties` and `subscriptions`) stays one JSON column; `location`
and `predictive_analytics` flatten into `location__city`-style columns.
"""

from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from dlt.common import json
from dlt.common.schema.typing import TTableSchemaColumns

from . import settings

Row = Dict[str, Any]


def parse_datetime(value: str) -> datetime:
    """Klaviyo datetimes come with `Z`, offsets and fractions of any length; return UTC.

    A value without an offset is taken to be UTC, Klaviyo's own zone.
    """
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def membership_key(segment_id: str, profile_id: str) -> str:
    """Single-column key of a membership (compound merge keys are unsafe in dlt, #4244)."""
    return f"{segment_id}:{profile_id}"


def segment_row(resource: Dict[str, Any]) -> Row:
    attributes = resource.get("attributes") or {}
    row: Row = {"id": resource["id"]}
    for name in settings.SEGMENT_ATTRIBUTES:
        row[name] = attributes.get(name)
    row["deleted_at"] = None
    return row


def deleted_segment_row(held_row: Row, deleted_at: datetime) -> Row:
    """The last known row of a segment Klaviyo no longer has, marked deleted."""
    row = {name: value for name, value in held_row.items() if not name.startswith("_dlt_")}
    if isinstance(row.get("definition"), str):
        row["definition"] = json.loads(row["definition"])
    row["deleted_at"] = deleted_at
    return row


def segment_tag_ids(resource: Dict[str, Any]) -> List[str]:
    """Tag ids linked to a segment, from a listing made with `include=tags`."""
    tags = (resource.get("relationships") or {}).get("tags") or {}
    return [link["id"] for link in tags.get("data") or []]


def tag_row(resource: Dict[str, Any]) -> Row:
    return {"id": resource["id"], "name": (resource.get("attributes") or {}).get("name")}


def profile_row(profile_id: str, attributes: Dict[str, Any]) -> Row:
    """A profile's row from its id and attributes, without the segment-specific `joined_group_at`.

    `location` and `predictive_analytics` flatten one level (`location__city`); any other
    object or list (`properties`, `subscriptions`, `ranked_channel_affinity`) is JSON text.
    """
    row: Row = {"id": profile_id}
    for name, value in attributes.items():
        if name == "joined_group_at":
            continue
        if name in _FLATTENED_PROFILE_OBJECTS and isinstance(value, dict):
            for field, field_value in value.items():
                row[f"{name}__{field}"] = _json_text(field_value)
        else:
            row[name] = _json_text(value)
    return row


_FLATTENED_PROFILE_OBJECTS = ("location", "predictive_analytics")


def deleted_profile_row(profile_id: str, deleted_at: datetime) -> Row:
    """A profile Klaviyo no longer has: its id and when that was found, nothing else.

    Klaviyo deletes a profile on a data-privacy request; its attributes go with it here too.
    """
    return {"id": profile_id, "deleted_at": deleted_at}


def _json_text(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def membership_row(
    segment_id: str,
    profile_id: str,
    joined_group_at: datetime,
    first_seen_at: datetime,
    last_seen_at: datetime,
    left_at_latest: Optional[datetime] = None,
    left_reason: Optional[str] = None,
) -> Row:
    """A membership; an ended one left between `left_at_earliest` and `left_at_latest`.

    Klaviyo never dates a leave: it happened after the membership was last seen present and
    before its absence was seen (or before a re-join).
    """
    return {
        "membership_id": membership_key(segment_id, profile_id),
        "segment_id": segment_id,
        "profile_id": profile_id,
        "joined_group_at": joined_group_at,
        "first_seen_at": first_seen_at,
        "last_seen_at": last_seen_at,
        "is_member": left_at_latest is None,
        "left_at_earliest": None if left_at_latest is None else last_seen_at,
        "left_at_latest": left_at_latest,
        "left_reason": left_reason,
    }


SEGMENT_COLUMNS: TTableSchemaColumns = {
    "id": {"data_type": "text", "nullable": False},
    "name": {"data_type": "text"},
    "definition": {"data_type": "json"},
    "created": {"data_type": "timestamp"},
    "updated": {"data_type": "timestamp"},
    "is_active": {"data_type": "bool"},
    "is_processing": {"data_type": "bool"},
    "is_starred": {"data_type": "bool"},
    "deleted_at": {"data_type": "timestamp"},
}
TAG_COLUMNS: TTableSchemaColumns = {
    "id": {"data_type": "text", "nullable": False},
    "name": {"data_type": "text"},
}
SEGMENT_TAG_COLUMNS: TTableSchemaColumns = {
    "segment_id": {"data_type": "text", "nullable": False},
    "tag_id": {"data_type": "text", "nullable": False},
}
MEMBERSHIP_COLUMNS: TTableSchemaColumns = {
    "membership_id": {"data_type": "text", "nullable": False},
    "segment_id": {"data_type": "text", "nullable": False},
    "profile_id": {"data_type": "text", "nullable": False},
    "joined_group_at": {"data_type": "timestamp"},
    "first_seen_at": {"data_type": "timestamp"},
    "last_seen_at": {"data_type": "timestamp"},
    "is_member": {"data_type": "bool"},
    "left_at_earliest": {"data_type": "timestamp"},
    "left_at_latest": {"data_type": "timestamp"},
    "left_reason": {"data_type": "text"},
}
PERIOD_COLUMNS: TTableSchemaColumns = {
    "period_id": {"data_type": "text", "nullable": False},
    **MEMBERSHIP_COLUMNS,
}
PROFILE_COLUMNS: TTableSchemaColumns = {
    "id": {"data_type": "text", "nullable": False},
    **{
        name: {"data_type": "text"}
        for name in (
            "email",
            "phone_number",
            "external_id",
            "first_name",
            "last_name",
            "organization",
            "locale",
            "title",
            "image",
        )
    },
    "created": {"data_type": "timestamp"},
    "updated": {"data_type": "timestamp"},
    "last_event_date": {"data_type": "timestamp"},
    **{
        f"location__{name}": {"data_type": "text"}
        for name in ("address1", "address2", "city", "country", "region", "zip", "timezone", "ip")
    },
    # Klaviyo sends coordinates as strings or numbers; one numeric column keeps them queryable.
    "location__latitude": {"data_type": "double"},
    "location__longitude": {"data_type": "double"},
    "properties": {"data_type": "json"},
    "subscriptions": {"data_type": "json"},
    # When this pipeline found the profile gone from Klaviyo; its attributes are emptied then.
    "deleted_at": {"data_type": "timestamp"},
}
# Types of the profile columns that exist only when `predictive_analytics` is asked for.
PROFILE_OPTIONAL_TYPES: Dict[str, str] = {
    **{
        f"predictive_analytics__{name}": "double"
        for name in (
            "historic_clv",
            "predicted_clv",
            "total_clv",
            "historic_number_of_orders",
            "predicted_number_of_orders",
            "average_days_between_orders",
            "average_order_value",
            "churn_probability",
        )
    },
    "predictive_analytics__expected_date_of_next_order": "timestamp",
    "predictive_analytics__ranked_channel_affinity": "json",
}
