"""Request handling independent of the socket layer: routing, auth, revision, scopes, rate
limits, parameter validation and every operation, producing status + headers + body (the
segment reports' bodies are checked and answered in ``segment_reports``).

Checks run in this order: route (404/405), ``Authorization`` (401), ``revision`` (400/404),
scopes (403), ``Accept`` (406), rate limits (429), request media type (415), parameters and
body (400), resource lookup (404).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from . import errors
from .account import Account, SegmentRecord
from .errors import ApiError, invalid
from .filters import (
    MEMBER_FILTERS,
    MEMBER_FILTERS_BEFORE_2025_10,
    PROFILE_FILTERS,
    SEGMENT_FILTERS,
    TAG_FILTERS,
    Condition,
    FieldSpec,
    check_filter,
    matches,
    parse_filter,
)
from .paging import Key, Page, decode_cursor, encode_cursor, fingerprint, paginate
from .profile_listing import PROFILE_SORTS, ProfileIndex
from .rate_limits import Charge, Decision, RateLimiter, tier_windows
from .render import (
    ProfileRenderer,
    dumps,
    field_tree,
    iso,
    segment_resource,
    sort_key_time,
    tag_group_resource,
    tag_resource,
)
from .revisions import WRITE_ENDPOINTS_SINCE, Revision, parse_revision
from .segment_reports import (
    REPORTS_SINCE,
    SERIES_OPERATION,
    VALUES_OPERATION,
    ReportSettings,
    SegmentReports,
)
from .spec_tables import (
    FLOW_FIELDS,
    OPERATION_SCOPES,
    OPERATION_TIER,
    PROFILE_FIELDS_BY_ERA,
    SEGMENT_FIELDS,
    TAG_FIELDS,
    TAG_GROUP_FIELDS,
)

JSON_API = "application/vnd.api+json"
CONDITION_TYPES = frozenset(
    {
        "profile-group-membership",
        "profile-has-custom-object",
        "profile-marketing-consent",
        "profile-metric",
        "profile-metric-funnel",
        "profile-permissions",
        "profile-postal-code-distance",
        "profile-predictive-analytics",
        "profile-property",
        "profile-region",
    }
)
_ACCEPTABLE = frozenset({"*/*", "application/*", "application/json", JSON_API})
_BODY_TYPES = frozenset({"application/json", JSON_API})
_VIEW_CACHE_SIZE = 128
# Operations listing profiles, where predictive_analytics costs the M tier on top.
_PROFILE_LISTINGS = ("get_segment_profiles", "get_profiles")


@dataclass
class Request:
    """A parsed HTTP request (header names lower-case)."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Response:
    """What to send back, plus bookkeeping for counters and the request log."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    operation: str | None = None
    api_key: str | None = None
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Ctx:
    """Everything an operation handler needs."""

    account: Account
    base: str
    rev: Revision
    path: str  # canonical path without trailing slash, e.g. /api/segments/Y6nRLr/profiles
    pairs: list[tuple[str, str]]
    query: dict[str, str]
    segment_id: str | None
    body: bytes


@dataclass
class _View:
    """Filtered members in ascending key order, plus rendered rows per profile variant.

    A view lives only as long as ``Account.version`` is unchanged, so its cached rows can
    never be stale."""

    keys: list[Key]
    jga: list[bytes]
    rows: dict[int, list[bytes | None]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- routing
_ROUTES: dict[tuple[str, ...], dict[str, str]] = {
    ("segments",): {"GET": "get_segments", "POST": "create_segment"},
    ("segments", "{id}"): {
        "GET": "get_segment",
        "PATCH": "update_segment",
        "DELETE": "delete_segment",
    },
    ("segments", "{id}", "profiles"): {"GET": "get_segment_profiles"},
    ("segments", "{id}", "relationships", "profiles"): {
        "GET": "get_segment_relationships_profiles"
    },
    ("segments", "{id}", "tags"): {"GET": "get_segment_tags"},
    ("segments", "{id}", "relationships", "tags"): {"GET": "get_segment_relationships_tags"},
    ("tags",): {"GET": "get_tags"},
    ("profiles",): {"GET": "get_profiles"},
    ("segment-series-reports",): {"POST": SERIES_OPERATION},
    ("segment-values-reports",): {"POST": VALUES_OPERATION},
}
_REPORTS = (SERIES_OPERATION, VALUES_OPERATION)


def route(path: str) -> tuple[dict[str, str], str | None, str] | None:
    """(method -> operation, segment id, canonical path) or ``None`` for an unknown path."""
    if path.endswith("/"):
        path = path[:-1]
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != "api":
        return None
    rest = parts[2:]
    if any(p == "" for p in rest):
        return None
    sid: str | None = None
    if len(rest) >= 2 and rest[0] == "segments":
        sid = unquote(rest[1])
        pattern = (rest[0], "{id}", *rest[2:])
    else:
        pattern = tuple(rest)
    methods = _ROUTES.get(pattern)
    if methods is None:
        return None
    return methods, sid, path


# ---------------------------------------------------------------------------- parameters
def _split(value: str) -> list[str]:
    return value.split(",")


def check_known(query: dict[str, str], allowed: set[str]) -> None:
    """400 for any query parameter the operation does not define."""
    for name in query:
        if name not in allowed:
            raise invalid(f"'{name}' is not a valid query parameter.", parameter=name)


def parse_fields(
    query: dict[str, str], rtype: str, enum: frozenset[str], rev: Revision
) -> list[str] | None:
    """``fields[rtype]`` as a list (``None`` when absent); 400 for names outside the enum."""
    param = f"fields[{rtype}]"
    value = query.get(param)
    if value is None:
        return None
    names = _split(value)
    for name in names:
        if name not in enum or (name == "id" and not rev.fields_allow_id):
            raise invalid(
                f"'{name}' is not a valid field for the resource '{rtype}'.", parameter=param
            )
    return names


def parse_include(query: dict[str, str], allowed: set[str]) -> set[str]:
    """``include`` values; 400 naming the first one not allowed."""
    value = query.get("include")
    if value is None:
        return set()
    names = _split(value)
    for name in names:
        if name not in allowed:
            raise invalid(
                f"'{name}' is not an allowed include parameter for this resource.",
                parameter="include",
            )
    return set(names)


def parse_additional(query: dict[str, str], rtype: str, allowed: set[str]) -> frozenset[str]:
    """``additional-fields[rtype]`` values."""
    param = f"additional-fields[{rtype}]"
    value = query.get(param)
    if value is None:
        return frozenset()
    names = _split(value)
    for name in names:
        if name not in allowed:
            raise invalid(
                f"'{name}' is not a valid additional field for the resource '{rtype}'.",
                parameter=param,
            )
    return frozenset(names)


def parse_sort(query: dict[str, str], allowed: set[str]) -> tuple[str | None, bool]:
    """(field or ``None``, descending)."""
    value = query.get("sort")
    if value is None:
        return None, False
    descending = value.startswith("-")
    name = value[1:] if descending else value
    if name not in allowed:
        raise invalid(f"'{value}' is not a valid sort field for this resource.", parameter="sort")
    return name, descending


def parse_page_size(query: dict[str, str], default: int, maximum: int) -> int:
    """``page[size]`` within 1..maximum."""
    value = query.get("page[size]")
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= maximum:
        raise invalid(
            f"Page size must be an integer between 1 and {maximum}.", parameter="page[size]"
        )
    return int(value)


def parse_conditions(
    query: dict[str, str], allowed: dict[str, FieldSpec], now: datetime
) -> list[Condition]:
    """Parsed and checked ``filter`` (empty when absent)."""
    text = query.get("filter")
    if text is None:
        return []
    conditions = parse_filter(text)
    check_filter(conditions, allowed, now)
    return conditions


def exchange_id(profile_id: str) -> str:
    """The simulator's ``_kx`` value for a profile (Klaviyo's is an opaque exchange id)."""
    return "kx" + profile_id[::-1].lower()


# ---------------------------------------------------------------------------- the API
class Api:
    """Turns ``Request`` into ``Response`` for one account."""

    def __init__(
        self,
        account: Account,
        api_keys: dict[str, set[str]],
        limiter: RateLimiter,
        base_url: str,
        reports: ReportSettings | None = None,
    ) -> None:
        self.account = account
        self.api_keys = api_keys
        self.limiter = limiter
        self.base = base_url
        self.reports = SegmentReports(account, reports or ReportSettings())
        self.profiles = ProfileRenderer(base_url)
        self.profile_index = ProfileIndex(exchange_id)
        self._views: OrderedDict[tuple[Any, ...], tuple[int, _View]] = OrderedDict()
        self._views_lock = threading.Lock()
        self._handlers: dict[str, Callable[[Ctx], Response]] = {
            "get_segments": self.get_segments,
            "get_segment": self.get_segment,
            "get_segment_profiles": self.get_segment_profiles,
            "get_segment_relationships_profiles": self.get_segment_relationships_profiles,
            "get_segment_tags": self.get_segment_tags,
            "get_segment_relationships_tags": self.get_segment_relationships_tags,
            "get_tags": self.get_tags,
            "create_segment": self.create_segment,
            "update_segment": self.update_segment,
            "delete_segment": self.delete_segment,
            "get_profiles": self.get_profiles,
            SERIES_OPERATION: self.query_segment_series,
            VALUES_OPERATION: self.query_segment_values,
        }

    # ------------------------------------------------------------------ entry point
    def handle(self, req: Request) -> Response:
        """Process one request; client errors become error responses, never exceptions."""
        pairs = parse_qsl(req.query_string, keep_blank_values=True)
        query = dict(pairs)
        resp = Response(500, query=query)
        decision: Decision | None = None
        try:
            matched = route(req.path)
            if matched is None:
                raise errors.not_found()
            methods, sid, path = matched
            operation = methods.get(req.method)
            if operation is None:
                raise errors.method_not_allowed(req.method, sorted(methods))
            resp.operation = operation
            key = self._authenticate(req.headers.get("authorization"))
            resp.api_key = key
            rev = parse_revision(req.headers.get("revision"), self.account.now().date())
            if operation in ("create_segment", "update_segment", "delete_segment") and (
                rev.name < WRITE_ENDPOINTS_SINCE
            ):
                raise errors.not_found("No valid revisions found for method.")
            if operation in _REPORTS and rev.name < REPORTS_SINCE:
                raise errors.not_found("No valid revisions found for method.")
            missing = [s for s in OPERATION_SCOPES[operation] if s not in self.api_keys[key]]
            if missing:
                raise errors.permission_denied(missing)
            self._check_accept(req.headers.get("accept"))
            decision = self.limiter.check(self._charges(operation, query, rev))
            if not decision.allowed:
                raise errors.throttled(decision.retry_after)
            if req.method in ("POST", "PATCH"):
                self._check_content_type(req.headers.get("content-type"))
            ctx = Ctx(self.account, self.base, rev, path, pairs, query, sid, req.body)
            out = self._handlers[operation](ctx)
            out.operation, out.api_key, out.query = operation, key, query
            out.headers.update(decision.headers())
            return out
        except ApiError as exc:
            resp.status = exc.status
            resp.body = exc.body()
            resp.headers["Content-Type"] = JSON_API
            resp.headers.update(exc.headers)
            if decision is not None and decision.allowed:
                resp.headers.update(decision.headers())
            return resp

    def identify(self, req: Request) -> Response:
        """Operation and known key of a request, without running it (for faulted requests)."""
        resp = Response(200, query=dict(parse_qsl(req.query_string, keep_blank_values=True)))
        matched = route(req.path)
        if matched is not None:
            resp.operation = matched[0].get(req.method)
        try:
            resp.api_key = self._authenticate(req.headers.get("authorization"))
        except ApiError:
            resp.api_key = None
        return resp

    def _authenticate(self, header: str | None) -> str:
        """Return the key. Missing header or another scheme (``Bearer`` included) gives 401
        ``not_authenticated``; a key the account does not know gives 401
        ``authentication_failed`` (DRF's code for bad credentials)."""
        prefix = "Klaviyo-API-Key "
        if header is None or not header.startswith(prefix) or not header[len(prefix) :].strip():
            raise errors.not_authenticated()
        key = header[len(prefix) :].strip()
        if key not in self.api_keys:
            raise errors.authentication_failed()
        return key

    @staticmethod
    def _check_accept(header: str | None) -> None:
        if header is None or header.strip() == "":
            return
        for part in header.split(","):
            media = part.split(";")[0].strip().lower()
            if media in _ACCEPTABLE:
                return
        raise errors.not_acceptable()

    @staticmethod
    def _check_content_type(header: str | None) -> None:
        media = (header or "").split(";")[0].strip().lower()
        if media not in _BODY_TYPES:
            raise errors.unsupported_media_type(header or "")

    def _charges(self, operation: str, query: dict[str, str], rev: Revision) -> list[Charge]:
        if operation in _REPORTS:
            return [Charge(operation, self.reports.settings.windows())]
        tier = OPERATION_TIER[operation]
        charges = [Charge(operation, tier_windows(tier, rev.large_steady_limit))]
        if operation == "get_segment" and "profile_count" in _split(
            query.get("additional-fields[segment]", "")
        ):
            charges.append(Charge("additional-fields:profile_count", tier_windows("XS")))
        if operation in _PROFILE_LISTINGS and "predictive_analytics" in _split(
            query.get("additional-fields[profile]", "")
        ):
            charges.append(Charge("additional-fields:predictive_analytics", tier_windows("M")))
        return charges

    # ------------------------------------------------------------------ helpers
    def _url(self, path: str, pairs: list[tuple[str, str]]) -> str:
        url = f"{self.base}{path}/"
        return f"{url}?{urlencode(pairs)}" if pairs else url

    def _page_links(
        self, ctx: Ctx, next_cursor: str | None, prev_cursor: str | None
    ) -> dict[str, str | None]:
        """``self`` repeats the request's query; ``next``/``prev`` repeat it without any
        ``page[cursor]`` and append the new one (base64url needs no further encoding)."""
        base_pairs = [(k, v) for k, v in ctx.pairs if k != "page[cursor]"]
        stem = self._url(ctx.path, base_pairs)
        stem += "&" if base_pairs else "?"
        return {
            "self": self._url(ctx.path, ctx.pairs),
            "next": f"{stem}page%5Bcursor%5D={next_cursor}" if next_cursor else None,
            "prev": f"{stem}page%5Bcursor%5D={prev_cursor}" if prev_cursor else None,
        }

    @staticmethod
    def _page_cursors(page: Page, fp: str, keys: Sequence[Key]) -> tuple[str | None, str | None]:
        """The cursors of the pages after and before `page` of `keys`, where there are any."""
        if not page.indices:
            return None, None
        after = encode_cursor("n", fp, keys[page.indices[-1]]) if page.has_next else None
        before = encode_cursor("p", fp, keys[page.indices[0]]) if page.has_prev else None
        return after, before

    @staticmethod
    def _cursor(ctx: Ctx, fp: str) -> tuple[str, Key] | None:
        token = ctx.query.get("page[cursor]")
        if token is None:
            return None
        return decode_cursor(token, fp)

    @staticmethod
    def _ok(body: bytes, status: int = 200) -> Response:
        return Response(status, body, {"Content-Type": JSON_API})

    def _segment_record(self, sid: str | None) -> SegmentRecord:
        rec = self.account.peek_segments().get(sid or "")
        if rec is None:
            raise errors.not_found()
        return rec

    def _sorted_tag_ids(self, sid: str) -> list[str]:
        return sorted(self.account.peek_segment_tag_ids(sid))

    # ------------------------------------------------------------------ segments
    def _segment_params(
        self, ctx: Ctx, extra: set[str], segment_enum: frozenset[str]
    ) -> tuple[list[str] | None, list[str] | None, set[str]]:
        rev = ctx.rev
        allowed = {"fields[segment]", "fields[tag]", "include", *extra}
        includes = {"tags"}
        if rev.has_flow_triggers:
            allowed.add("fields[flow]")
            includes.add("flow-triggers")
        check_known(ctx.query, allowed)
        seg_fields = parse_fields(ctx.query, "segment", segment_enum, rev)
        tag_fields = parse_fields(ctx.query, "tag", TAG_FIELDS, rev)
        if rev.has_flow_triggers:
            parse_fields(ctx.query, "flow", FLOW_FIELDS, rev)
        include = parse_include(ctx.query, includes)
        return seg_fields, tag_fields, include

    def get_segments(self, ctx: Ctx) -> Response:
        """GET /api/segments."""
        extra = {"filter", "page[cursor]", "sort"}
        if ctx.rev.has_list_page_size:
            extra.add("page[size]")
        seg_fields, tag_fields, include = self._segment_params(ctx, extra, SEGMENT_FIELDS)
        sort, desc = parse_sort(ctx.query, {"created", "id", "name", "updated"})
        conditions = parse_conditions(ctx.query, SEGMENT_FILTERS, self.account.now())
        size = parse_page_size(ctx.query, 10, 10)
        fp = fingerprint("segments", ctx.query.get("sort", ""), ctx.query.get("filter", ""))
        cursor = self._cursor(ctx, fp)
        seg_tree = field_tree(seg_fields) if seg_fields is not None else None
        tag_tree = field_tree(tag_fields) if tag_fields is not None else None
        with self.account.lock:
            rows: list[tuple[Key, str, SegmentRecord]] = []
            for sid, rec in self.account.peek_segments().items():
                values = {
                    "id": sid,
                    "name": rec.name,
                    "created": rec.created,
                    "updated": rec.updated,
                    "is_active": rec.is_active,
                    "is_starred": rec.is_starred,
                }
                if all(matches(c.op, values[c.field], c.value.python()) for c in conditions):
                    if sort in ("created", "updated"):
                        primary = sort_key_time(values[sort])  # type: ignore[arg-type]
                    elif sort == "name":
                        primary = rec.name
                    else:
                        primary = sid
                    rows.append(((primary, sid), sid, rec))
            rows.sort(key=lambda r: r[0])
            keys = [r[0] for r in rows]
            page = paginate(keys, size, desc, cursor)
            data: list[dict[str, Any]] = []
            included: dict[str, dict[str, Any]] = {}
            for i in page.indices:
                _, sid, rec = rows[i]
                tag_ids = self._sorted_tag_ids(sid) if "tags" in include else None
                data.append(
                    segment_resource(
                        ctx.base,
                        sid,
                        rec,
                        fields=seg_tree,
                        with_flow_triggers=ctx.rev.has_flow_triggers,
                        tag_ids=tag_ids,
                        include_flow_triggers="flow-triggers" in include,
                    )
                )
                for tid in tag_ids or ():
                    if tid not in included:
                        included[tid] = tag_resource(
                            ctx.base, tid, self.account.peek_tags()[tid], fields=tag_tree
                        )
        next_c, prev_c = self._page_cursors(page, fp, keys)
        doc: dict[str, Any] = {"data": data}
        if include:
            doc["included"] = list(included.values())
        doc["links"] = self._page_links(ctx, next_c, prev_c)
        return self._ok(dumps(doc))

    def get_segment(self, ctx: Ctx) -> Response:
        """GET /api/segments/{id}."""
        seg_fields, tag_fields, include = self._segment_params(
            ctx, {"additional-fields[segment]"}, SEGMENT_FIELDS | {"profile_count"}
        )
        additional = parse_additional(ctx.query, "segment", {"profile_count"})
        seg_tree = field_tree(seg_fields) if seg_fields is not None else None
        tag_tree = field_tree(tag_fields) if tag_fields is not None else None
        with self.account.lock:
            rec = self._segment_record(ctx.segment_id)
            sid = ctx.segment_id or ""
            tag_ids = self._sorted_tag_ids(sid) if "tags" in include else None
            count = len(self.account.peek_members(sid)) if "profile_count" in additional else None
            data = segment_resource(
                ctx.base,
                sid,
                rec,
                fields=seg_tree,
                with_flow_triggers=ctx.rev.has_flow_triggers,
                tag_ids=tag_ids,
                include_flow_triggers="flow-triggers" in include,
                profile_count=count,
            )
            tags = self.account.peek_tags()
            included = [tag_resource(ctx.base, t, tags[t], fields=tag_tree) for t in tag_ids or ()]
        doc: dict[str, Any] = {"data": data}
        if include:
            doc["included"] = included
        doc["links"] = {"self": self._url(ctx.path, ctx.pairs)}
        return self._ok(dumps(doc))

    # ------------------------------------------------------------------ segment members
    def _member_view(
        self, sid: str, by_jga: bool, conditions: list[Condition], filter_text: str
    ) -> _View:
        """Sorted (ascending) keys of the filtered members; cached per account version.
        Caller holds the account lock."""
        account = self.account
        cache_key = (sid, by_jga, filter_text)
        with self._views_lock:
            hit = self._views.get(cache_key)
            if hit is not None and hit[0] == account.version:
                self._views.move_to_end(cache_key)
                return hit[1]
        members = account.peek_members(sid)
        entries: list[tuple[Key, datetime]] = []
        for pid, joined in members.items():
            if conditions and not self._member_matches(pid, joined, conditions):
                continue
            key = (sort_key_time(joined), pid) if by_jga else (pid, pid)
            entries.append((key, joined))
        entries.sort(key=lambda e: e[0])
        view = _View(
            [e[0] for e in entries],
            [b'"joined_group_at":"' + iso(e[1]).encode() + b'"' for e in entries],
        )
        with self._views_lock:
            self._views[cache_key] = (account.version, view)
            self._views.move_to_end(cache_key)
            while len(self._views) > _VIEW_CACHE_SIZE:
                self._views.popitem(last=False)
        return view

    def _member_matches(self, pid: str, joined: datetime, conditions: list[Condition]) -> bool:
        profile = self.account.peek_profile(pid)
        for c in conditions:
            expected = c.value.python()
            if c.field == "joined_group_at":
                ok = matches(c.op, joined, expected)
            elif c.field == "profile_id":
                ok = matches(c.op, pid, expected)
            elif c.field == "_kx":
                ok = matches(c.op, exchange_id(pid), expected)
            elif c.field == "push_token":
                tokens = self.account.peek_push_tokens(pid)
                ok = any(matches(c.op, t, expected) for t in tokens)
            else:
                ok = matches(c.op, profile.get(c.field), expected)
            if not ok:
                return False
        return True

    def _members_page(
        self, ctx: Ctx, endpoint: str, max_size: int, extra_params: set[str]
    ) -> tuple[_View, range, str | None, str | None]:
        allowed = {"filter", "page[cursor]", "page[size]", "sort", *extra_params}
        check_known(ctx.query, allowed)
        return self._members_page_checked(ctx, endpoint, max_size)

    def _members_page_checked(
        self, ctx: Ctx, endpoint: str, max_size: int
    ) -> tuple[_View, range, str | None, str | None]:
        sort, desc = parse_sort(ctx.query, {"joined_group_at"})
        spec = MEMBER_FILTERS if ctx.rev.has_profile_id_filter else MEMBER_FILTERS_BEFORE_2025_10
        conditions = parse_conditions(ctx.query, spec, self.account.now())
        size = parse_page_size(ctx.query, 20, max_size)
        sid = ctx.segment_id or ""
        filter_text = ctx.query.get("filter", "")
        fp = fingerprint(endpoint, sid, ctx.query.get("sort", ""), filter_text)
        cursor = self._cursor(ctx, fp)
        self._segment_record(sid)
        view = self._member_view(sid, sort is not None, conditions, filter_text)
        page = paginate(view.keys, size, desc, cursor)
        next_c, prev_c = self._page_cursors(page, fp, view.keys)
        return view, page.indices, next_c, prev_c

    def get_segment_profiles(self, ctx: Ctx) -> Response:
        """GET /api/segments/{id}/profiles."""
        check_known(
            ctx.query,
            {
                "filter",
                "page[cursor]",
                "page[size]",
                "sort",
                "fields[profile]",
                "additional-fields[profile]",
            },
        )
        enum = PROFILE_FIELDS_BY_ERA[ctx.rev.profile_fieldset_era]
        fields = parse_fields(ctx.query, "profile", enum, ctx.rev)
        additional = parse_additional(
            ctx.query, "profile", {"subscriptions", "predictive_analytics"}
        )
        variant = self.profiles.variant(fields, additional, True)
        account = self.account
        with account.lock:
            view, indices, next_c, prev_c = self._members_page_checked(ctx, "profiles", 100)
            rows = view.rows.get(variant.vid)
            if rows is None:
                rows = view.rows[variant.vid] = [None] * len(view.keys)
            parts: list[bytes] = []
            for i in indices:
                row = rows[i]
                if row is None:
                    head, tail = self.profiles.row_parts(account, view.keys[i][1], variant)
                    row = head + view.jga[i] + tail if variant.with_jga else head
                    rows[i] = row
                parts.append(row)
        links = dumps(self._page_links(ctx, next_c, prev_c))
        body = b'{"data":[' + b",".join(parts) + b'],"links":' + links + b"}"
        return self._ok(body)

    def get_segment_relationships_profiles(self, ctx: Ctx) -> Response:
        """GET /api/segments/{id}/relationships/profiles."""
        with self.account.lock:
            view, indices, next_c, prev_c = self._members_page(
                ctx, "relationships/profiles", ctx.rev.relationships_profiles_max_page, set()
            )
            keys = view.keys
            rows = [b'{"type":"profile","id":"' + keys[i][1].encode() + b'"}' for i in indices]
        links = dumps(self._page_links(ctx, next_c, prev_c))
        return self._ok(b'{"data":[' + b",".join(rows) + b'],"links":' + links + b"}")

    # ------------------------------------------------------------------ tags
    def get_segment_tags(self, ctx: Ctx) -> Response:
        """GET /api/segments/{id}/tags (not paginated)."""
        check_known(ctx.query, {"fields[tag]"})
        tag_fields = parse_fields(ctx.query, "tag", TAG_FIELDS, ctx.rev)
        tree = field_tree(tag_fields) if tag_fields is not None else None
        with self.account.lock:
            self._segment_record(ctx.segment_id)
            tags = self.account.peek_tags()
            data = [
                tag_resource(ctx.base, tid, tags[tid], fields=tree)
                for tid in self._sorted_tag_ids(ctx.segment_id or "")
            ]
        return self._ok(dumps({"data": data, "links": {"self": self._url(ctx.path, ctx.pairs)}}))

    def get_segment_relationships_tags(self, ctx: Ctx) -> Response:
        """GET /api/segments/{id}/relationships/tags (not paginated)."""
        check_known(ctx.query, set())
        with self.account.lock:
            self._segment_record(ctx.segment_id)
            data = [{"type": "tag", "id": t} for t in self._sorted_tag_ids(ctx.segment_id or "")]
        return self._ok(dumps({"data": data, "links": {"self": self._url(ctx.path, ctx.pairs)}}))

    def get_tags(self, ctx: Ctx) -> Response:
        """GET /api/tags."""
        allowed = {"fields[tag]", "fields[tag-group]", "filter", "include", "page[cursor]", "sort"}
        if ctx.rev.has_list_page_size:
            allowed.add("page[size]")
        check_known(ctx.query, allowed)
        tag_fields = parse_fields(ctx.query, "tag", TAG_FIELDS, ctx.rev)
        group_fields = parse_fields(ctx.query, "tag-group", TAG_GROUP_FIELDS, ctx.rev)
        include = parse_include(ctx.query, {"tag-group"})
        sort, desc = parse_sort(ctx.query, {"id", "name"})
        conditions = parse_conditions(ctx.query, TAG_FILTERS, self.account.now())
        size = parse_page_size(ctx.query, 50, 50)
        fp = fingerprint("tags", ctx.query.get("sort", ""), ctx.query.get("filter", ""))
        cursor = self._cursor(ctx, fp)
        tree = field_tree(tag_fields) if tag_fields is not None else None
        group_tree = field_tree(group_fields) if group_fields is not None else None
        with self.account.lock:
            rows = sorted(
                ((name if sort == "name" else tid, tid), name)
                for tid, name in self.account.peek_tags().items()
                if all(matches(c.op, name, c.value.python()) for c in conditions)
            )
        keys = [r[0] for r in rows]
        page = paginate(keys, size, desc, cursor)
        data = [
            tag_resource(
                ctx.base, keys[i][1], rows[i][1], fields=tree, include_group="tag-group" in include
            )
            for i in page.indices
        ]
        doc: dict[str, Any] = {"data": data}
        if include:
            doc["included"] = [tag_group_resource(ctx.base, fields=group_tree)] if data else []
        next_c, prev_c = self._page_cursors(page, fp, keys)
        doc["links"] = self._page_links(ctx, next_c, prev_c)
        return self._ok(dumps(doc))

    # ------------------------------------------------------------------ writes
    @staticmethod
    def _json_body(ctx: Ctx) -> dict[str, Any]:
        try:
            doc = json.loads(ctx.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise invalid(
                "JSON parse error: the request body is not valid JSON.", pointer="/data/"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
            raise invalid("The request body must contain a 'data' object.", pointer="/data")
        data: dict[str, Any] = doc["data"]
        if data.get("type") != "segment":
            raise invalid("Invalid resource type; expected 'segment'.", pointer="/data/type")
        attrs = data.get("attributes")
        if not isinstance(attrs, dict):
            raise invalid("'attributes' must be an object.", pointer="/data/attributes")
        return data

    @staticmethod
    def _check_definition(value: Any) -> dict[str, Any]:
        pointer = "/data/attributes/definition"
        groups = value.get("condition_groups") if isinstance(value, dict) else None
        if not isinstance(groups, list) or not groups:
            raise invalid(
                "'definition' must have a non-empty 'condition_groups' list.", pointer=pointer
            )
        for group in groups:
            conditions = group.get("conditions") if isinstance(group, dict) else None
            if not isinstance(conditions, list) or not conditions:
                raise invalid(
                    "Each condition group must have a non-empty 'conditions' list.", pointer=pointer
                )
            for cond in conditions:
                if not isinstance(cond, dict) or cond.get("type") not in CONDITION_TYPES:
                    raise invalid("Invalid condition type in segment definition.", pointer=pointer)
        return value  # type: ignore[no-any-return]

    @staticmethod
    def _check_attr_names(attrs: dict[str, Any], allowed: set[str]) -> None:
        for name in attrs:
            if name not in allowed:
                raise invalid(
                    f"'{name}' is not a valid field for the resource 'segment'.",
                    pointer=f"/data/attributes/{name}",
                )

    def _write_response(self, ctx: Ctx, sid: str, status: int) -> Response:
        fields = parse_fields(ctx.query, "segment", SEGMENT_FIELDS, ctx.rev)
        tree = field_tree(fields) if fields is not None else None
        with self.account.lock:
            rec = self.account.peek_segments()[sid]
            data = segment_resource(
                ctx.base, sid, rec, fields=tree, with_flow_triggers=ctx.rev.has_flow_triggers
            )
        resp = self._ok(dumps({"data": data, "links": {"self": data["links"]["self"]}}), status)
        return resp

    def create_segment(self, ctx: Ctx) -> Response:
        """POST /api/segments (201)."""
        check_known(ctx.query, {"fields[segment]"})
        parse_fields(ctx.query, "segment", SEGMENT_FIELDS, ctx.rev)
        data = self._json_body(ctx)
        attrs = data["attributes"]
        self._check_attr_names(attrs, {"name", "definition", "is_starred"})
        name = attrs.get("name")
        if not isinstance(name, str) or not name.strip():
            raise invalid(
                "'name' is required and must be a non-empty string.",
                pointer="/data/attributes/name",
            )
        if "definition" not in attrs:
            raise invalid("'definition' is required.", pointer="/data/attributes/definition")
        definition = self._check_definition(attrs["definition"])
        starred = attrs.get("is_starred")
        if starred is not None and not isinstance(starred, bool):
            raise invalid("'is_starred' must be a boolean.", pointer="/data/attributes/is_starred")
        sid = self.account.create_segment(name, definition=definition, is_starred=bool(starred))
        resp = self._write_response(ctx, sid, 201)
        resp.headers["Location"] = f"{self.base}/api/segments/{sid}/"
        return resp

    def update_segment(self, ctx: Ctx) -> Response:
        """PATCH /api/segments/{id}."""
        check_known(ctx.query, {"fields[segment]"})
        parse_fields(ctx.query, "segment", SEGMENT_FIELDS, ctx.rev)
        data = self._json_body(ctx)
        sid = ctx.segment_id or ""
        if data.get("id") != sid:
            raise ApiError(
                409,
                "conflict",
                "Conflict.",
                "The 'id' in the request body does not match the URL.",
                pointer="/data/id",
            )
        attrs = {k: v for k, v in data["attributes"].items()}
        self._check_attr_names(attrs, {"name", "definition", "is_starred", "is_active"})
        given = {k: v for k, v in attrs.items() if v is not None}
        if given.get("is_active") is False and len(given) > 1:
            raise invalid(
                "When deactivating a segment, 'is_active' must be the only attribute.",
                pointer="/data/attributes/is_active",
            )
        if "name" in given and (not isinstance(given["name"], str) or not given["name"].strip()):
            raise invalid("'name' must be a non-empty string.", pointer="/data/attributes/name")
        for flag in ("is_starred", "is_active"):
            if flag in given and not isinstance(given[flag], bool):
                raise invalid(f"'{flag}' must be a boolean.", pointer=f"/data/attributes/{flag}")
        if "definition" in given:
            self._check_definition(given["definition"])
        with self.account.lock:
            self._segment_record(sid)
            if "name" in given:
                self.account.rename_segment(sid, given["name"])
            if "definition" in given:
                self.account.set_definition(sid, given["definition"])
            if "is_starred" in given:
                self.account.set_starred(sid, given["is_starred"])
            if "is_active" in given:
                self.account.set_active(sid, given["is_active"])
            return self._write_response(ctx, sid, 200)

    def delete_segment(self, ctx: Ctx) -> Response:
        """DELETE /api/segments/{id} (204, empty body)."""
        check_known(ctx.query, set())
        with self.account.lock:
            self._segment_record(ctx.segment_id)
            self.account.delete_segment(ctx.segment_id or "")
        return Response(204)

    # ------------------------------------------------------------------ profiles
    def get_profiles(self, ctx: Ctx) -> Response:
        """GET /api/profiles. ``include`` (lists, push-tokens, segments) is not served: the
        simulator holds no list or push-token resources to include."""
        check_known(
            ctx.query,
            {
                "additional-fields[profile]",
                "fields[profile]",
                "filter",
                "page[cursor]",
                "page[size]",
                "sort",
            },
        )
        enum = PROFILE_FIELDS_BY_ERA[ctx.rev.profile_fieldset_era] - {"joined_group_at"}
        fields = parse_fields(ctx.query, "profile", enum, ctx.rev)
        additional = parse_additional(
            ctx.query, "profile", {"subscriptions", "predictive_analytics"}
        )
        sort, desc = parse_sort(ctx.query, set(PROFILE_SORTS))
        conditions = parse_conditions(ctx.query, PROFILE_FILTERS, self.account.now())
        size = parse_page_size(ctx.query, 20, 100)
        filter_text = ctx.query.get("filter", "")
        fp = fingerprint("get_profiles", ctx.query.get("sort", ""), filter_text)
        cursor = self._cursor(ctx, fp)
        variant = self.profiles.variant(fields, additional, False)
        account = self.account
        with account.lock:
            keys = self.profile_index.keys(account, sort or "id", conditions, filter_text)
            page = paginate(keys, size, desc, cursor)
            parts = [self.profiles.row_parts(account, keys[i][1], variant)[0] for i in page.indices]
        next_c, prev_c = self._page_cursors(page, fp, keys)
        links = dumps(self._page_links(ctx, next_c, prev_c))
        return self._ok(b'{"data":[' + b",".join(parts) + b'],"links":' + links + b"}")

    # ------------------------------------------------------------------ reports
    def query_segment_series(self, ctx: Ctx) -> Response:
        """POST /api/segment-series-reports (see ``segment_reports``)."""
        check_known(ctx.query, set())
        return self._ok(dumps(self.reports.series(ctx.body)))

    def query_segment_values(self, ctx: Ctx) -> Response:
        """POST /api/segment-values-reports (see ``segment_reports``)."""
        check_known(ctx.query, set())
        return self._ok(dumps(self.reports.values(ctx.body)))
