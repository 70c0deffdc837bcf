"""Rows as Arrow tables, typed as their columns are declared.

dlt writes Arrow tables straight to parquet and loads them without its row-by-row normalizer,
which cost more CPU than everything else in an export. Column types come from the declared
columns; a profile attribute nobody declared (a field Klaviyo adds in a later revision) keeps
the type Arrow infers for it. JSON columns travel as JSON text (Arrow has no JSON type dlt
reads); the declared `json` type is what the destination gets, so dlt's notice about it is
silenced.
"""

import logging
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa
from dlt.common import json
from dlt.common import logger as dlt_logging
from dlt.common.schema.typing import TTableSchemaColumns

from .rows import Row, parse_datetime

logger = logging.getLogger(__name__)

_TIMESTAMP = pa.timestamp("us", tz="UTC")


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
