"""Builds Klaviyo filter expressions (`equals(...)`, `any(...)`, `greater-than(...)`).

Values are quoted the way Klaviyo's filter grammar wants them: strings in double quotes with
`\\` and `"` escaped, booleans bare, datetimes bare RFC 3339 in UTC with `Z`.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import List, Optional, Sequence, Tuple


def quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def filter_datetime(value: datetime) -> str:
    """UTC, `Z`, whole seconds rounded down.

    `+00:00` is rejected in filters (a raw `+` decodes to a space), and rounding down only
    widens a `greater-than` window, so nothing at the bound is missed.
    """
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def joined_after(since: datetime) -> str:
    return f"greater-than(joined_group_at,{filter_datetime(since)})"


def profile_id_in(profile_ids: Sequence[str]) -> str:
    """Members among these profiles (revision 2025-10-15 on; see settings)."""
    return f"any(profile_id,[{','.join(quoted(value) for value in profile_ids)}])"


def updated_since(since: datetime) -> str:
    """Profiles updated at `since` or later.

    `greater-than` is strict and filters take whole seconds: a bound one second before the
    rounded-down `since` keeps a profile updated at exactly `since`, even a whole second.
    """
    return f"greater-than(updated,{filter_datetime(since - timedelta(seconds=1))})"


def any_id(ids: Sequence[str]) -> str:
    return f"any(id,[{','.join(quoted(value) for value in ids)}])"


def all_of(expressions: Sequence[str]) -> Optional[str]:
    """Combine expressions with `and(...)`; None when there is nothing to filter on."""
    if not expressions:
        return None
    if len(expressions) == 1:
        return expressions[0]
    return f"and({','.join(expressions)})"


@dataclass(frozen=True)
class SegmentSelection:
    """The segments a user configured: the listing's `filter`, and the names it asks for.

    The names travel with the filter so that whoever reads the listing can tell a name that
    matches no segment (a typo, a renamed segment) from a name that selects one.
    """

    filter: Optional[str]
    names: Tuple[str, ...] = ()


def segment_selection(
    segment_ids: Optional[Sequence[str]] = None,
    segment_names: Optional[Sequence[str]] = None,
    is_active: Optional[bool] = None,
    is_starred: Optional[bool] = None,
) -> SegmentSelection:
    """What GET /api/segments must be asked for to select the segments a user configured."""
    expressions: List[str] = []
    if segment_ids:
        expressions.append(f"any(id,[{','.join(quoted(value) for value in segment_ids)}])")
    if segment_names:
        expressions.append(f"any(name,[{','.join(quoted(value) for value in segment_names)}])")
    if is_active is not None:
        expressions.append(f"equals(is_active,{str(is_active).lower()})")
    if is_starred is not None:
        expressions.append(f"equals(is_starred,{str(is_starred).lower()})")
    return SegmentSelection(all_of(expressions), tuple(segment_names or ()))
