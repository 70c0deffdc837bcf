"""Klaviyo ``filter`` expressions: parse, check against an endpoint's allowed fields/operators,
and evaluate.

Grammar (docs/klaviyo-api.md §7): ``op(field,value)``; ``and(e1,e2,…)`` or a top-level comma
for AND; values are quoted strings ('…' or "…", backslash escapes), ``true``/``false``,
numbers, unquoted RFC 3339 datetimes or dates, and ``[…]`` lists. ``null`` is reserved and
``or``/``not`` are undocumented, so both are rejected. Any problem raises the 400
``invalid`` error with ``source.parameter = "filter"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import ApiError, invalid_filter

OPERATORS = frozenset(
    {
        "equals",
        "less-than",
        "less-or-equal",
        "greater-than",
        "greater-or-equal",
        "contains",
        "contains-any",
        "contains-all",
        "ends-with",
        "starts-with",
        "any",
        "has",
    }
)
_BARE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:.+-_")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER_RE = re.compile(r"^-?\d+(\.\d+)?$")
_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?(Z|[+-]\d{2}:\d{2})?)?$"
)


@dataclass(frozen=True)
class Literal:
    """A parsed value: ``kind`` is str, bool, num, dt or list."""

    kind: str
    value: Any

    def python(self) -> Any:
        """Plain Python value (lists of plain values)."""
        if self.kind == "list":
            return [item.python() for item in self.value]
        return self.value


@dataclass(frozen=True)
class Condition:
    """One ``op(field,value)`` term; terms of a filter are ANDed."""

    op: str
    field: str
    value: Literal


@dataclass(frozen=True)
class FieldSpec:
    """What one filterable field allows (from ``x-klaviyo-filters``)."""

    type: str  # "string" | "datetime" | "boolean"
    single: frozenset[str]
    list_ops: frozenset[str] = frozenset()

    @staticmethod
    def of(type_: str, single: Sequence[str] = (), list_ops: Sequence[str] = ()) -> FieldSpec:
        """Convenience constructor from sequences."""
        return FieldSpec(type_, frozenset(single), frozenset(list_ops))


def parse_datetime(text: str) -> datetime:
    """Parse an RFC 3339 datetime or date (naive values are UTC); ``ValueError`` if bad."""
    m = _DATETIME_RE.match(text)
    if m is None:
        raise ValueError(text)
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    tz = timezone.utc
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        if offset >= timedelta(hours=24):
            raise ValueError(text)
        tz = timezone(sign * offset)
    value = datetime(
        int(year),
        int(month),
        int(day),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        int((fraction or "0").ljust(6, "0")),
        tzinfo=tz,
    )
    return value.astimezone(timezone.utc)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self) -> ApiError:
        return invalid_filter()

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail()
        self.pos += 1

    def name(self) -> str:
        self.skip_ws()
        m = _NAME_RE.match(self.text, self.pos)
        if m is None:
            raise self.fail()
        self.pos = m.end()
        return m.group(0)

    def parse(self) -> list[Condition]:
        conditions = self.expressions()
        if self.peek() != "":
            raise self.fail()
        return conditions

    def expressions(self) -> list[Condition]:
        conditions = self.expression()
        while self.peek() == ",":
            self.pos += 1
            conditions.extend(self.expression())
        return conditions

    def expression(self) -> list[Condition]:
        op = self.name()
        self.expect("(")
        if op == "and":
            conditions = self.expressions()
            self.expect(")")
            return conditions
        if op not in OPERATORS:
            raise invalid_filter(f"'{op}' is not a valid filter operator.")
        field = self.name()
        self.expect(",")
        value = self.value()
        self.expect(")")
        return [Condition(op, field, value)]

    def value(self) -> Literal:
        char = self.peek()
        if char == "[":
            self.pos += 1
            items: list[Literal] = []
            if self.peek() == "]":
                self.pos += 1
                return Literal("list", items)
            while True:
                item = self.value()
                if item.kind == "list":
                    raise self.fail()
                items.append(item)
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return Literal("list", items)
        if char in ("'", '"'):
            return Literal("str", self.quoted(char))
        return self.bare()

    def quoted(self, quote: str) -> str:
        self.pos += 1
        out: list[str] = []
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\\" and self.pos + 1 < len(text):
                out.append(text[self.pos + 1])
                self.pos += 2
                continue
            if char == quote:
                self.pos += 1
                return "".join(out)
            out.append(char)
            self.pos += 1
        raise self.fail()

    def bare(self) -> Literal:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in _BARE_CHARS:
            self.pos += 1
        token = text[start : self.pos]
        if token == "" or self.peek() not in (",", ")", "]"):
            raise self.fail()
        if token in ("true", "false"):
            return Literal("bool", token == "true")
        if token == "null":
            raise self.fail()
        if _NUMBER_RE.match(token):
            return Literal("num", float(token) if "." in token else int(token))
        try:
            return Literal("dt", parse_datetime(token))
        except ValueError:
            raise self.fail() from None


def parse_filter(text: str) -> list[Condition]:
    """Parse a filter string into ANDed conditions (400 on any syntax problem)."""
    if text.strip() == "":
        raise invalid_filter()
    return _Parser(text).parse()


_KIND_FOR_TYPE = {"string": "str", "datetime": "dt", "boolean": "bool"}


def check_filter(conditions: list[Condition], allowed: dict[str, FieldSpec], now: datetime) -> None:
    """Validate fields, operators and value types; reject future ``greater-than`` datetimes."""
    for cond in conditions:
        spec = allowed.get(cond.field)
        if spec is None:
            raise invalid_filter(f"'{cond.field}' is not a valid field for this filter.")
        is_list = cond.value.kind == "list"
        if is_list:
            ok = cond.op in spec.list_ops
        else:
            # Klaviyo documents equals(name,['x']) as a list operator; scalars work as well.
            ok = cond.op in spec.single or (cond.op == "equals" and "equals" in spec.list_ops)
        if not ok:
            raise invalid_filter(
                f"Filter operation '{cond.op}' not allowed for field '{cond.field}'."
            )
        items = cond.value.value if is_list else [cond.value]
        if is_list and not items:
            raise invalid_filter()
        want = _KIND_FOR_TYPE[spec.type]
        for item in items:
            if item.kind != want:
                raise invalid_filter()
        if cond.op == "greater-than" and spec.type == "datetime" and cond.value.value > now:
            raise invalid_filter(
                "Invalid filter provided. A greater-than datetime cannot be in the future."
            )


def matches(op: str, actual: Any, expected: Any) -> bool:
    """Evaluate one operator against a field value (None never matches comparisons)."""
    if op in ("equals", "any"):
        if isinstance(expected, list):
            return actual in expected
        return bool(actual == expected)
    if actual is None:
        return False
    if op == "greater-than":
        return bool(actual > expected)
    if op == "greater-or-equal":
        return bool(actual >= expected)
    if op == "less-than":
        return bool(actual < expected)
    if op == "less-or-equal":
        return bool(actual <= expected)
    if op == "contains":
        return expected in actual
    if op == "starts-with":
        return bool(actual.startswith(expected))
    if op == "ends-with":
        return bool(actual.endswith(expected))
    return False


# ---------------------------------------------------------------------- per-endpoint specs
SEGMENT_FILTERS: dict[str, FieldSpec] = {
    "name": FieldSpec.of("string", (), ("any", "equals")),
    "id": FieldSpec.of("string", ("equals",), ("any", "equals")),
    "created": FieldSpec.of("datetime", ("greater-than",)),
    "updated": FieldSpec.of("datetime", ("greater-than",)),
    "is_active": FieldSpec.of("boolean", ("equals",), ("any", "equals")),
    "is_starred": FieldSpec.of("boolean", ("equals",)),
}

_JGA_OPS = ("greater-or-equal", "greater-than", "less-or-equal", "less-than")
MEMBER_FILTERS_BEFORE_2025_10: dict[str, FieldSpec] = {
    "email": FieldSpec.of("string", (), ("any", "equals")),
    "phone_number": FieldSpec.of("string", (), ("any", "equals")),
    "push_token": FieldSpec.of("string", (), ("any", "equals")),
    "_kx": FieldSpec.of("string", ("equals",)),
    "joined_group_at": FieldSpec.of("datetime", _JGA_OPS),
}
MEMBER_FILTERS: dict[str, FieldSpec] = {
    "profile_id": FieldSpec.of("string", (), ("any", "equals")),
    **MEMBER_FILTERS_BEFORE_2025_10,
}

TAG_FILTERS: dict[str, FieldSpec] = {
    "name": FieldSpec.of("string", ("contains", "ends-with", "equals", "starts-with"), ("equals",)),
}

# GET /api/profiles: the same fields and operators in the 2024-06-15, 2025-04-15 and
# 2026-07-15 specs. ``created``/``updated`` take only greater-than and less-than there, unlike
# joined_group_at; the suppression timestamps take all four comparisons.
_SUPPRESSION_OPS = ("greater-or-equal", "greater-than", "less-or-equal", "less-than")
_LIST_SUPPRESSIONS = "subscriptions.email.marketing.list_suppressions"
_SUPPRESSION = "subscriptions.email.marketing.suppression"
PROFILE_FILTERS: dict[str, FieldSpec] = {
    "id": FieldSpec.of("string", ("equals",), ("any", "equals")),
    "email": FieldSpec.of("string", (), ("any", "equals")),
    "phone_number": FieldSpec.of("string", (), ("any", "equals")),
    "external_id": FieldSpec.of("string", (), ("any", "equals")),
    "_kx": FieldSpec.of("string", ("equals",)),
    "created": FieldSpec.of("datetime", ("greater-than", "less-than")),
    "updated": FieldSpec.of("datetime", ("greater-than", "less-than")),
    f"{_LIST_SUPPRESSIONS}.reason": FieldSpec.of("string", ("equals",)),
    f"{_LIST_SUPPRESSIONS}.timestamp": FieldSpec.of("datetime", _SUPPRESSION_OPS),
    f"{_LIST_SUPPRESSIONS}.list_id": FieldSpec.of("string", ("equals",)),
    f"{_SUPPRESSION}.reason": FieldSpec.of("string", ("equals",)),
    f"{_SUPPRESSION}.timestamp": FieldSpec.of("datetime", _SUPPRESSION_OPS),
}
