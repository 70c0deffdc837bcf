"""JSON:API serialisation of segments, tags, tag groups and profiles.

Resources follow the spec's ``*ResponseObjectResource`` shapes: ``{type, id, attributes,
relationships{name: {links{self, related}[, data]}}, links{self}}`` with trailing-slash URLs on
the simulator's own host. Sparse fieldsets cut attributes only; empty attributes become
``null``. Profiles are pre-serialised per (profile, fieldset) and cached as byte fragments so
a page of members is assembled by joining bytes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from .account import PROFILE_SCALAR_FIELDS, Account, SegmentRecord

DEFAULT_TAG_GROUP_ID = "4b0c0d7e-8f1a-4c2b-9d3e-5f6a7b8c9d0e"
DEFAULT_TAG_GROUP = {"name": "Default", "exclusive": False, "default": True}
FieldTree = dict[str, Any]


def iso(value: datetime) -> str:
    """API datetime format: ``2025-01-04T08:15:32+00:00`` (fraction only when non-zero)."""
    return value.astimezone(timezone.utc).isoformat()


def sort_key_time(value: datetime | None) -> str:
    """Fixed-width UTC string that sorts chronologically (``""`` for ``None``)."""
    if value is None:
        return ""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; datetimes as ISO 8601 with offset."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_default).encode()


def field_tree(paths: Iterable[str]) -> FieldTree:
    """``["location.city", "email"]`` -> ``{"location": {"city": True}, "email": True}``."""
    tree: FieldTree = {}
    for path in paths:
        parts = path.split(".")
        node = tree
        for depth, part in enumerate(parts):
            if depth == len(parts) - 1:
                node[part] = True
                break
            child = node.get(part)
            if child is True:
                break
            if child is None:
                child = {}
                node[part] = child
            node = child
    return tree


def project(value: Any, tree: FieldTree | bool) -> Any:
    """Keep only the selected sub-fields of a nested value."""
    if tree is True or not isinstance(value, dict) or not isinstance(tree, dict):
        return value
    return {k: project(v, tree[k]) for k, v in value.items() if k in tree}


def select(attrs: dict[str, Any], tree: FieldTree | None) -> dict[str, Any] | None:
    """Apply a sparse fieldset to attributes; ``None`` when nothing is left."""
    if tree is not None:
        attrs = {k: project(v, tree[k]) for k, v in attrs.items() if k in tree}
    return attrs or None


def _rel(base: str, kind: str, rid: str, name: str) -> dict[str, Any]:
    return {
        "links": {
            "self": f"{base}/api/{kind}/{rid}/relationships/{name}/",
            "related": f"{base}/api/{kind}/{rid}/{name}/",
        }
    }


def segment_resource(
    base: str,
    sid: str,
    rec: SegmentRecord,
    *,
    fields: FieldTree | None,
    with_flow_triggers: bool,
    tag_ids: list[str] | None = None,
    include_flow_triggers: bool = False,
    profile_count: int | None = None,
) -> dict[str, Any]:
    """A segment resource; ``tag_ids`` (when included) fills ``relationships.tags.data``."""
    attrs = rec.attributes()
    if profile_count is not None:
        attrs["profile_count"] = profile_count
    relationships: dict[str, Any] = {
        "profiles": _rel(base, "segments", sid, "profiles"),
        "tags": _rel(base, "segments", sid, "tags"),
    }
    if tag_ids is not None:
        relationships["tags"]["data"] = [{"type": "tag", "id": tid} for tid in tag_ids]
    if with_flow_triggers:
        relationships["flow-triggers"] = _rel(base, "segments", sid, "flow-triggers")
        if include_flow_triggers:
            relationships["flow-triggers"]["data"] = []
    return {
        "type": "segment",
        "id": sid,
        "attributes": select(attrs, fields),
        "relationships": relationships,
        "links": {"self": f"{base}/api/segments/{sid}/"},
    }


def tag_resource(
    base: str, tid: str, name: str, *, fields: FieldTree | None, include_group: bool = False
) -> dict[str, Any]:
    """A tag resource; ``include_group`` adds ``relationships.tag-group.data``."""
    relationships: dict[str, Any] = {
        rel: _rel(base, "tags", tid, rel)
        for rel in ("tag-group", "lists", "segments", "campaigns", "flows")
    }
    if include_group:
        relationships["tag-group"]["data"] = {"type": "tag-group", "id": DEFAULT_TAG_GROUP_ID}
    return {
        "type": "tag",
        "id": tid,
        "attributes": select({"name": name}, fields),
        "relationships": relationships,
        "links": {"self": f"{base}/api/tags/{tid}/"},
    }


def tag_group_resource(base: str, *, fields: FieldTree | None) -> dict[str, Any]:
    """The account's Default tag group (every tag belongs to it)."""
    gid = DEFAULT_TAG_GROUP_ID
    return {
        "type": "tag-group",
        "id": gid,
        "attributes": select(dict(DEFAULT_TAG_GROUP), fields),
        "relationships": {"tags": _rel(base, "tag-groups", gid, "tags")},
        "links": {"self": f"{base}/api/tag-groups/{gid}/"},
    }


class ProfileVariant:
    """One way of rendering profiles: fieldset, additional fields, with/without joined_group_at."""

    def __init__(
        self, vid: int, fields: FieldTree | None, additional: frozenset[str], with_jga: bool
    ) -> None:
        self.vid = vid
        self.fields = fields
        self.additional = additional
        # joined_group_at is shown unless a fieldset leaves it out
        self.with_jga = with_jga and (fields is None or "joined_group_at" in fields)


_BEFORE_JGA = (*PROFILE_SCALAR_FIELDS, "location", "properties")
_AFTER_JGA = ("subscriptions", "predictive_analytics")


class ProfileRenderer:
    """Caches each profile's serialised fragments per variant, keyed on the profile revision."""

    MAX_ENTRIES = 2_000_000

    def __init__(self, base: str) -> None:
        self.base = base
        self._variants: dict[tuple[Any, ...], ProfileVariant] = {}
        self._variants_lock = threading.Lock()
        self._cache: dict[tuple[str, int], tuple[int, bytes, bytes]] = {}

    def variant(
        self, fields: list[str] | None, additional: frozenset[str], with_jga: bool
    ) -> ProfileVariant:
        """Interned variant for a request's fieldset and additional fields."""
        key = (tuple(sorted(fields)) if fields is not None else None, additional, with_jga)
        with self._variants_lock:
            found = self._variants.get(key)
            if found is None:
                tree = field_tree(fields) if fields is not None else None
                found = ProfileVariant(len(self._variants), tree, additional, with_jga)
                self._variants[key] = found
            return found

    def _fragments(
        self, pid: str, profile: dict[str, Any], v: ProfileVariant
    ) -> tuple[bytes, bytes]:
        def frags(names: Iterable[str]) -> list[bytes]:
            out = []
            for name in names:
                if name in _AFTER_JGA and name not in v.additional:
                    continue
                if v.fields is not None and name not in v.fields:
                    continue
                value = profile[name]
                if v.fields is not None:
                    value = project(value, v.fields[name])
                out.append(dumps(name) + b":" + dumps(value))
            return out

        before, after = frags(_BEFORE_JGA), frags(_AFTER_JGA)
        base = self.base
        head = b'{"type":"profile","id":' + dumps(pid) + b',"attributes":'
        tail_rel = (
            b',"relationships":'
            + dumps(
                {
                    rel: _rel(base, "profiles", pid, rel)
                    for rel in ("lists", "segments", "push-tokens")
                }
            )
            + b',"links":'
            + dumps({"self": f"{base}/api/profiles/{pid}/"})
            + b"}"
        )
        if v.with_jga:
            head += b"{" + b"".join(f + b"," for f in before)
            tail = b"".join(b"," + f for f in after) + b"}" + tail_rel
            return head, tail
        if not before and not after:
            return head + b"null" + tail_rel, b""
        return head + b"{" + b",".join(before + after) + b"}" + tail_rel, b""

    def row_parts(self, account: Account, pid: str, v: ProfileVariant) -> tuple[bytes, bytes]:
        """(head, tail) for one profile; with ``with_jga`` the caller puts the
        ``"joined_group_at":"…"`` fragment between them. Caller holds ``account.lock``."""
        rev = account.peek_profile_rev(pid)
        key = (pid, v.vid)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == rev:
            return hit[1], hit[2]
        head, tail = self._fragments(pid, account.peek_profile(pid), v)
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = (rev, head, tail)
        return head, tail
