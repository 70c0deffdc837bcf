"""The simulated Klaviyo account: segments, tags, profiles and memberships, with a mutation API
for tests and plain-data ground truth to compare exports against.

All state sits behind one re-entrant lock (``Account.lock``). Every mutation bumps ``version``;
profile mutations also bump a per-profile revision so the server's rendering caches know when to
re-serialise. The ``peek_*`` methods return live internal objects for the HTTP layer and must be
called with ``lock`` held; everything else returns deep copies.
"""

from __future__ import annotations

import copy
import random
import string
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, NamedTuple

PROFILE_SCALAR_FIELDS: tuple[str, ...] = (
    "email",
    "phone_number",
    "external_id",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
    "created",
    "updated",
    "last_event_date",
)
LOCATION_FIELDS: tuple[str, ...] = (
    "address1",
    "address2",
    "city",
    "country",
    "latitude",
    "longitude",
    "region",
    "zip",
    "timezone",
    "ip",
)
# Attribute order as Klaviyo returns it; joined_group_at goes between properties and the
# additional fields on /api/segments/{id}/profiles.
PROFILE_ATTRIBUTE_ORDER: tuple[str, ...] = (
    *PROFILE_SCALAR_FIELDS,
    "location",
    "properties",
    "subscriptions",
    "predictive_analytics",
)
PREDICTIVE_FIELDS: tuple[str, ...] = (
    "historic_clv",
    "predicted_clv",
    "total_clv",
    "historic_number_of_orders",
    "predicted_number_of_orders",
    "average_days_between_orders",
    "average_order_value",
    "churn_probability",
    "expected_date_of_next_order",
    "ranked_channel_affinity",
)
_DATETIME_FIELDS = frozenset({"created", "updated", "last_event_date"})
_EXTRA_PROFILE_KWARGS = frozenset({"id", "push_tokens"})
MAX_TAGS_PER_ACCOUNT = 500
MAX_TAGS_PER_SEGMENT = 100

_ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SEGMENT_ID_ALPHABET = string.ascii_letters + string.digits


def utc_now() -> datetime:
    """Real current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def make_ulid(when: datetime, rng: random.Random) -> str:
    """A 26-character Crockford-base32 ULID: 48-bit milliseconds + 80 random bits."""
    ms = int(when.timestamp() * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | rng.getrandbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ULID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def make_segment_id(rng: random.Random) -> str:
    """A 6-character alphanumeric id like ``Y6nRLr``."""
    return "".join(rng.choice(_SEGMENT_ID_ALPHABET) for _ in range(6))


def make_tag_id(rng: random.Random) -> str:
    """A UUID4 string drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def default_subscriptions() -> dict[str, Any]:
    """Subscriptions of a profile that never subscribed to anything."""
    return {
        "email": {
            "marketing": {
                "can_receive_email_marketing": False,
                "consent": "NEVER_SUBSCRIBED",
                "consent_timestamp": None,
                "last_updated": None,
                "method": None,
                "method_detail": None,
                "custom_method_detail": None,
                "double_optin": None,
                "suppression": [],
                "list_suppressions": [],
            }
        },
        "sms": {
            "marketing": {
                "can_receive_sms_marketing": False,
                "consent": "NEVER_SUBSCRIBED",
                "consent_timestamp": None,
                "method": None,
                "method_detail": None,
                "last_updated": None,
            }
        },
        "mobile_push": {
            "marketing": {
                "can_receive_push_marketing": False,
                "consent": "NEVER_SUBSCRIBED",
                "consent_timestamp": None,
            }
        },
    }


def default_predictive_analytics() -> dict[str, Any]:
    """Predictive analytics of a profile Klaviyo has no model output for."""
    return {name: None for name in PREDICTIVE_FIELDS}


class MembershipChange(NamedTuple):
    """One entry of the account's membership change log.

    ``kind``: ``join`` (the profile was not a member), ``rejoin`` (it was, and its
    ``joined_group_at`` moved to ``at``), ``leave``, or ``delete`` (its segment was deleted).
    """

    at: datetime
    kind: str
    segment_id: str
    profile_id: str


class DayStats(NamedTuple):
    """A segment's membership figures for one UTC day, as Klaviyo's segment reports name them."""

    day: date
    members_added: int
    members_removed: int
    net_members_changed: int
    total_members: int


@dataclass
class SegmentRecord:
    """Internal state of one segment."""

    name: str
    definition: dict[str, Any] | None
    created: datetime
    updated: datetime
    is_active: bool
    is_processing: bool
    is_starred: bool

    def attributes(self) -> dict[str, Any]:
        """Attributes as the API returns them (datetimes as aware ``datetime``)."""
        return {
            "name": self.name,
            "definition": copy.deepcopy(self.definition),
            "created": self.created,
            "updated": self.updated,
            "is_active": self.is_active,
            "is_processing": self.is_processing,
            "is_starred": self.is_starred,
        }


class Account:
    """One Klaviyo account held in memory; thread-safe through a single lock."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        seed: int | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self._clock: Callable[[], datetime] = clock or utc_now
        self._rng = random.Random(seed)
        self.version = 0
        self._segments: dict[str, SegmentRecord] = {}
        self._tags: dict[str, str] = {}
        self._segment_tags: dict[str, set[str]] = {}
        self._members: dict[str, dict[str, datetime]] = {}
        self._profiles: dict[str, dict[str, Any]] = {}
        self._profile_rev: dict[str, int] = {}
        self._push_tokens: dict[str, list[str]] = {}
        # Klaviyo keeps no tombstone of a leave, but its segment reports count leaves per day;
        # this log is what such reports are answered from (kept in the order things happened
        # to the account, which for back-dated joins is not time order).
        self._changes: list[MembershipChange] = []

    # ------------------------------------------------------------------ clock / helpers
    def now(self) -> datetime:
        """The account clock (aware UTC)."""
        value = self._clock()
        if value.tzinfo is None:
            raise ValueError("Account clock must return timezone-aware datetimes")
        return value.astimezone(timezone.utc)

    def _bump(self) -> None:
        self.version += 1

    def _segment(self, segment_id: str) -> SegmentRecord:
        try:
            return self._segments[segment_id]
        except KeyError:
            raise KeyError(f"unknown segment {segment_id!r}") from None

    def _require_profile(self, profile_id: str) -> dict[str, Any]:
        try:
            return self._profiles[profile_id]
        except KeyError:
            raise KeyError(f"unknown profile {profile_id!r}") from None

    def _require_tag(self, tag_id: str) -> None:
        if tag_id not in self._tags:
            raise KeyError(f"unknown tag {tag_id!r}")

    @staticmethod
    def _aware(value: datetime | None, name: str) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"{name} must be a timezone-aware datetime")
        return value.astimezone(timezone.utc)

    def _touch_segment(self, segment_id: str) -> None:
        self._segments[segment_id].updated = self.now()

    # ------------------------------------------------------------------ profiles
    def add_profile(self, **attrs: Any) -> str:
        """Create a profile; unknown attributes raise ``TypeError``. Returns the ULID.

        Accepts every profile attribute (``email`` … ``predictive_analytics``) plus ``id``
        (explicit ULID) and ``push_tokens`` (list of strings, filterable but not returned).
        """
        return self.insert_profile(attrs, take_ownership=False)

    def insert_profile(self, attrs: dict[str, Any], *, take_ownership: bool) -> str:
        """``add_profile`` with a switch: ``take_ownership=True`` stores nested values without
        copying them (the generator's fast path; the caller must not keep references)."""
        unknown = set(attrs) - set(PROFILE_ATTRIBUTE_ORDER) - _EXTRA_PROFILE_KWARGS
        if unknown:
            raise TypeError(f"unknown profile attributes: {sorted(unknown)}")
        own: Callable[[Any], Any] = (lambda v: v) if take_ownership else copy.deepcopy
        with self.lock:
            now = self.now()
            created = self._aware(attrs.get("created"), "created") or now
            pid = attrs.get("id") or make_ulid(created, self._rng)
            if pid in self._profiles:
                raise ValueError(f"profile {pid!r} already exists")
            profile: dict[str, Any] = {}
            for name in PROFILE_SCALAR_FIELDS:
                profile[name] = attrs.get(name)
            profile["created"] = created
            profile["updated"] = self._aware(attrs.get("updated"), "updated") or created
            profile["last_event_date"] = self._aware(
                attrs.get("last_event_date"), "last_event_date"
            )
            location = {name: None for name in LOCATION_FIELDS}
            location.update(own(attrs.get("location") or {}))
            profile["location"] = location
            profile["properties"] = own(attrs.get("properties") or {})
            profile["subscriptions"] = own(attrs.get("subscriptions") or default_subscriptions())
            profile["predictive_analytics"] = own(
                attrs.get("predictive_analytics") or default_predictive_analytics()
            )
            self._profiles[pid] = profile
            self._profile_rev[pid] = self._profile_rev.get(pid, -1) + 1
            self._push_tokens[pid] = list(attrs.get("push_tokens") or [])
            self._bump()
            return str(pid)

    def update_profile(self, profile_id: str, **attrs: Any) -> None:
        """Replace the given attributes (push tokens included) and set ``updated`` to now,
        unless a non-null ``updated`` is given."""
        unknown = set(attrs) - set(PROFILE_ATTRIBUTE_ORDER) - {"push_tokens"}
        if unknown:
            raise TypeError(f"unknown profile attributes: {sorted(unknown)}")
        with self.lock:
            profile = self._require_profile(profile_id)
            for name, value in attrs.items():
                if name == "push_tokens":
                    self._push_tokens[profile_id] = list(value or [])
                elif name in _DATETIME_FIELDS:
                    profile[name] = self._aware(value, name)
                elif name == "location":
                    location = {field: None for field in LOCATION_FIELDS}
                    location.update(copy.deepcopy(value or {}))
                    profile[name] = location
                else:
                    profile[name] = copy.deepcopy(value)
            # Klaviyo stamps every change of a profile; a profile is never without `updated`.
            if attrs.get("updated") is None:
                profile["updated"] = self.now()
            self._profile_rev[profile_id] += 1
            self._bump()

    def delete_profile(self, profile_id: str) -> None:
        """Delete a profile as Klaviyo's data-privacy deletion does: it leaves every segment
        (leaves in the change log; no tombstone anywhere) and no endpoint lists it again."""
        with self.lock:
            self._require_profile(profile_id)
            now = self.now()
            for segment_id, members in self._members.items():
                if members.pop(profile_id, None) is not None:
                    self._changes.append(MembershipChange(now, "leave", segment_id, profile_id))
            del self._profiles[profile_id]
            del self._push_tokens[profile_id]
            # The revision stays: rendering caches keyed on it never serve the deleted profile.
            self._profile_rev[profile_id] += 1
            self._bump()

    # ------------------------------------------------------------------ membership
    def join(self, segment_id: str, profile_id: str, at: datetime | None = None) -> None:
        """Add a member. Already a member: no-op, unless ``at`` is given (then it is set)."""
        with self.lock:
            self._segment(segment_id)
            self._require_profile(profile_id)
            members = self._members[segment_id]
            was_member = profile_id in members
            if was_member and at is None:
                return
            when = self._aware(at, "at") or self.now()
            members[profile_id] = when
            kind = "rejoin" if was_member else "join"
            self._changes.append(MembershipChange(when, kind, segment_id, profile_id))
            self._bump()

    def leave(self, segment_id: str, profile_id: str, at: datetime | None = None) -> None:
        """Remove a member (no tombstone, as in Klaviyo). Not a member: no-op. ``at`` dates the
        leave in the past (a generated account's history); it must not precede the join."""
        with self.lock:
            self._segment(segment_id)
            if self._members[segment_id].pop(profile_id, None) is not None:
                when = self._aware(at, "at") or self.now()
                self._changes.append(MembershipChange(when, "leave", segment_id, profile_id))
                self._bump()

    def rejoin(self, segment_id: str, profile_id: str, at: datetime | None = None) -> None:
        """Join again: ``joined_group_at`` becomes ``at`` or now, member or not."""
        with self.lock:
            self._segment(segment_id)
            self._require_profile(profile_id)
            members = self._members[segment_id]
            kind = "rejoin" if profile_id in members else "join"
            when = self._aware(at, "at") or self.now()
            members[profile_id] = when
            self._changes.append(MembershipChange(when, kind, segment_id, profile_id))
            self._bump()

    # ------------------------------------------------------------------ segments
    def create_segment(
        self,
        name: str,
        *,
        is_active: bool = True,
        is_starred: bool = False,
        is_processing: bool = False,
        definition: dict[str, Any] | None = None,
        tag_ids: Iterable[str] = (),
        created: datetime | None = None,
        updated: datetime | None = None,
        segment_id: str | None = None,
    ) -> str:
        """Create a segment (``created``/``updated``/``segment_id`` optional overrides).
        Returns its id."""
        with self.lock:
            tag_ids = list(tag_ids)
            for tag_id in tag_ids:
                self._require_tag(tag_id)
            sid = segment_id or make_segment_id(self._rng)
            while sid in self._segments:
                sid = make_segment_id(self._rng)
            when = self._aware(created, "created") or self.now()
            self._segments[sid] = SegmentRecord(
                name=name,
                definition=copy.deepcopy(definition),
                created=when,
                updated=self._aware(updated, "updated") or when,
                is_active=is_active,
                is_processing=is_processing,
                is_starred=is_starred,
            )
            self._members[sid] = {}
            self._segment_tags[sid] = set()
            for tag_id in tag_ids:
                self._link(sid, tag_id)
            self._bump()
            return sid

    def rename_segment(self, segment_id: str, name: str) -> None:
        """Rename; bumps ``updated``."""
        self._set_segment_attr(segment_id, "name", name)

    def set_definition(self, segment_id: str, definition: dict[str, Any] | None) -> None:
        """Replace the definition; bumps ``updated``."""
        self._set_segment_attr(segment_id, "definition", copy.deepcopy(definition))

    def set_processing(self, segment_id: str, value: bool) -> None:
        """Set ``is_processing``; bumps ``updated``."""
        self._set_segment_attr(segment_id, "is_processing", bool(value))

    def set_active(self, segment_id: str, value: bool) -> None:
        """Set ``is_active``; bumps ``updated``."""
        self._set_segment_attr(segment_id, "is_active", bool(value))

    def set_starred(self, segment_id: str, value: bool) -> None:
        """Set ``is_starred``; bumps ``updated``."""
        self._set_segment_attr(segment_id, "is_starred", bool(value))

    def _set_segment_attr(self, segment_id: str, name: str, value: Any) -> None:
        with self.lock:
            record = self._segment(segment_id)
            setattr(record, name, value)
            self._touch_segment(segment_id)
            self._bump()

    def delete_segment(self, segment_id: str) -> None:
        """Delete a segment with its memberships and tag links."""
        with self.lock:
            self._segment(segment_id)
            now = self.now()
            for profile_id in self._members[segment_id]:
                self._changes.append(MembershipChange(now, "delete", segment_id, profile_id))
            del self._segments[segment_id]
            del self._members[segment_id]
            del self._segment_tags[segment_id]
            self._bump()

    # ------------------------------------------------------------------ tags
    def create_tag(self, name: str, *, tag_id: str | None = None) -> str:
        """Create a tag (at most 500 per account). Returns its UUID."""
        with self.lock:
            if len(self._tags) >= MAX_TAGS_PER_ACCOUNT:
                raise ValueError("an account can have at most 500 tags")
            tid = tag_id or make_tag_id(self._rng)
            if tid in self._tags:
                raise ValueError(f"tag {tid!r} already exists")
            self._tags[tid] = name
            self._bump()
            return tid

    def rename_tag(self, tag_id: str, name: str) -> None:
        """Rename a tag."""
        with self.lock:
            self._require_tag(tag_id)
            self._tags[tag_id] = name
            self._bump()

    def delete_tag(self, tag_id: str) -> None:
        """Delete a tag and its segment links (linked segments get ``updated`` bumped)."""
        with self.lock:
            self._require_tag(tag_id)
            del self._tags[tag_id]
            for sid, tags in self._segment_tags.items():
                if tag_id in tags:
                    tags.discard(tag_id)
                    self._touch_segment(sid)
            self._bump()

    def _link(self, segment_id: str, tag_id: str) -> None:
        tags = self._segment_tags[segment_id]
        if tag_id not in tags and len(tags) >= MAX_TAGS_PER_SEGMENT:
            raise ValueError("a segment can have at most 100 tags")
        tags.add(tag_id)

    def tag_segment(self, segment_id: str, tag_id: str) -> None:
        """Link a tag to a segment; bumps the segment's ``updated``."""
        with self.lock:
            self._segment(segment_id)
            self._require_tag(tag_id)
            self._link(segment_id, tag_id)
            self._touch_segment(segment_id)
            self._bump()

    def untag_segment(self, segment_id: str, tag_id: str) -> None:
        """Unlink a tag from a segment; bumps the segment's ``updated``."""
        with self.lock:
            self._segment(segment_id)
            self._segment_tags[segment_id].discard(tag_id)
            self._touch_segment(segment_id)
            self._bump()

    # ------------------------------------------------------------------ ground truth
    def segments(self) -> dict[str, dict[str, Any]]:
        """id -> attributes as the API returns them (datetimes as aware ``datetime``)."""
        with self.lock:
            return {sid: rec.attributes() for sid, rec in self._segments.items()}

    def tags(self) -> dict[str, str]:
        """id -> name."""
        with self.lock:
            return dict(self._tags)

    def segment_tags(self) -> set[tuple[str, str]]:
        """Every (segment_id, tag_id) link."""
        with self.lock:
            return {(sid, tid) for sid, tags in self._segment_tags.items() for tid in tags}

    def members(self, segment_id: str) -> dict[str, datetime]:
        """profile_id -> joined_group_at for one segment."""
        with self.lock:
            self._segment(segment_id)
            return dict(self._members[segment_id])

    def memberships(self) -> dict[str, dict[str, datetime]]:
        """segment_id -> (profile_id -> joined_group_at) for every live segment."""
        with self.lock:
            return {sid: dict(members) for sid, members in self._members.items()}

    def profiles(self) -> dict[str, dict[str, Any]]:
        """id -> attributes, including location, properties, subscriptions and
        predictive_analytics (deep copies; datetimes as aware ``datetime``)."""
        with self.lock:
            return copy.deepcopy(self._profiles)

    def membership_changes(self, segment_id: str | None = None) -> list[MembershipChange]:
        """Joins, re-joins, leaves and deletions (of one segment, or all), in time order;
        changes at the same instant keep the order they were made in."""
        with self.lock:
            found = [c for c in self._changes if segment_id is None or c.segment_id == segment_id]
        return sorted(found, key=lambda change: change.at)

    def daily_membership_stats(
        self, segment_id: str, first: date, last: date, *, lag: timedelta = timedelta(0)
    ) -> list[DayStats]:
        """Per UTC day from ``first`` to ``last`` (inclusive), from the change log: joins
        added, leaves and deletion removed (a re-join of a member changes neither), and the
        members at the day's end. Changes less than ``lag`` old are not counted yet, as a
        report that trails live membership would not count them."""
        cutoff = self.now() - lag
        counted = [c for c in self.membership_changes(segment_id) if c.at <= cutoff]
        stats: list[DayStats] = []
        total = index = 0
        day = first
        while day <= last:
            start = datetime.combine(day, time(0), tzinfo=timezone.utc)
            end = start + timedelta(days=1)
            added = removed = 0
            while index < len(counted) and counted[index].at < end:
                kind = counted[index].kind
                if kind != "rejoin":
                    joined = kind == "join"
                    total += 1 if joined else -1
                    if counted[index].at >= start:
                        added, removed = added + joined, removed + (not joined)
                index += 1
            stats.append(DayStats(day, added, removed, added - removed, total))
            day += timedelta(days=1)
        return stats

    def profile_count(self, segment_id: str) -> int:
        """Number of members of a segment."""
        with self.lock:
            self._segment(segment_id)
            return len(self._members[segment_id])

    def push_tokens(self, profile_id: str) -> list[str]:
        """Push tokens of a profile (used by the ``push_token`` filter)."""
        with self.lock:
            self._require_profile(profile_id)
            return list(self._push_tokens[profile_id])

    # ------------------------------------------------------------------ live views (lock held)
    def peek_segments(self) -> dict[str, SegmentRecord]:
        """Live segment records. Caller holds ``lock`` and must not mutate."""
        return self._segments

    def peek_tags(self) -> dict[str, str]:
        """Live tag names. Caller holds ``lock``."""
        return self._tags

    def peek_segment_tag_ids(self, segment_id: str) -> set[str]:
        """Live tag-id set of a segment. Caller holds ``lock``."""
        return self._segment_tags[segment_id]

    def peek_members(self, segment_id: str) -> dict[str, datetime]:
        """Live membership map of a segment. Caller holds ``lock``."""
        return self._members[segment_id]

    def peek_profile(self, profile_id: str) -> dict[str, Any]:
        """Live profile attributes. Caller holds ``lock``."""
        return self._profiles[profile_id]

    def peek_profiles(self) -> dict[str, dict[str, Any]]:
        """Live profile attributes by id. Caller holds ``lock`` and must not mutate."""
        return self._profiles

    def peek_profile_rev(self, profile_id: str) -> int:
        """Revision counter of one profile. Caller holds ``lock``."""
        return self._profile_rev[profile_id]

    def peek_push_tokens(self, profile_id: str) -> list[str]:
        """Live push-token list. Caller holds ``lock``."""
        return self._push_tokens[profile_id]
