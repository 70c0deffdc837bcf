"""A seeded, realistic account: multicultural profiles with messy custom properties, segments of
very different sizes and states, tags, and memberships with bulk-import ties.

Deterministic for ``(seed, now)``. ``now`` defaults to today's UTC midnight, so two calls on the
same day give identical accounts (ids included: profile ULIDs embed their ``created`` time).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, overload

from .account import PREDICTIVE_FIELDS, Account, make_segment_id, make_ulid

_FIRST_LAST: list[tuple[str | None, str | None]] = [
    ("Sarah", "Mason"),
    ("Jennifer", None),
    ("José", "García"),
    ("Zoë", "Müller"),
    ("娜", "李"),
    ("Ægir", "Þórsson"),
    ("Priya", "Patel"),
    ("Ольга", "Иванова"),
    ("Søren", "Kierkegaard"),
    ("Mia", "O'Brien"),
    ("Nguyễn", "Văn An"),
    ("Fatima", "Al-Sayed"),
    ("Björk", "Guðmundsdóttir"),
    ("陽翔", "佐藤"),
    ("Chloé", "Lefèvre"),
    ("Liam", "Smith"),
    ("Noah", "Johnson"),
    ("Emma", "Williams"),
    ("Olivia", "Brown"),
    ("Lucas", "Silva"),
    ("Ana", "Kowalska"),
    ("Dmitri", "Volkov"),
    ("Aarav", "Sharma"),
    ("Yuki", "Tanaka"),
    ("Kwame", "Mensah"),
    ("Amélie", "Dubois"),
    ("Mateo", "Rossi"),
    (None, None),
    ("Hannah", "Schröder"),
    ("민준", "김"),
    ("Ava", "Davis"),
    ("Ethan", "Miller"),
]
_HANDLES = [
    "sarah.mason",
    "jennifer",
    "jose",
    "zoe",
    "li.na",
    "aegir",
    "priya",
    "olga",
    "soren",
    "mia",
    "an.nguyen",
    "fatima",
    "bjork",
    "haruto",
    "chloe",
    "liam",
    "noah",
    "emma",
    "olivia",
    "lucas",
    "ana",
    "dmitri",
    "aarav",
    "yuki",
    "kwame",
    "amelie",
    "mateo",
    "anon",
    "hannah",
    "minjun",
    "ava",
    "ethan",
]
_DOMAINS = [
    "klaviyo-demo.com",
    "example.com",
    "example.org",
    "mail.example.net",
    "shop.example.co.uk",
    "example.jp",
]
_ORGS = [
    "Example Corporation",
    "Acme Inc.",
    "Globex",
    "Initech",
    "Umbrella GmbH",
    "株式会社サンプル",
    "Café Olé SARL",
]
_TITLES = ["Regional Manager", "Engineer", "Buyer", "CEO", "Designer", "Student"]
_LOCALES = ["en-US", "en-GB", "fr-FR", "de-DE", "ja-JP", "zh-CN", "es-MX", "pt-BR", "ko-KR"]
_CITIES: list[dict[str, Any]] = [
    {
        "address1": "89 E 42nd St",
        "address2": "1st floor",
        "city": "New York",
        "country": "United States",
        "latitude": 40.7128,
        "longitude": -74.006,
        "region": "NY",
        "zip": "10017",
        "timezone": "America/New_York",
    },
    {
        "address1": "1 Market St",
        "address2": None,
        "city": "San Francisco",
        "country": "United States",
        "latitude": 37.7749,
        "longitude": -122.4194,
        "region": "CA",
        "zip": "94105",
        "timezone": "America/Los_Angeles",
    },
    {
        "address1": "100 Federal St",
        "address2": None,
        "city": "Boston",
        "country": "United States",
        "latitude": 42.3601,
        "longitude": -71.0589,
        "region": "MA",
        "zip": "02110",
        "timezone": "America/New_York",
    },
    {
        "address1": "10 Downing St",
        "address2": None,
        "city": "London",
        "country": "United Kingdom",
        "latitude": 51.5072,
        "longitude": -0.1276,
        "region": None,
        "zip": "SW1A 2AA",
        "timezone": "Europe/London",
    },
    {
        "address1": "Friedrichstraße 43",
        "address2": "Hinterhaus",
        "city": "Berlin",
        "country": "Germany",
        "latitude": 52.52,
        "longitude": 13.405,
        "region": "Berlin",
        "zip": "10117",
        "timezone": "Europe/Berlin",
    },
    {
        "address1": "千代田区丸の内1-1",
        "address2": None,
        "city": "東京",
        "country": "Japan",
        "latitude": 35.6762,
        "longitude": 139.6503,
        "region": "東京都",
        "zip": "100-0005",
        "timezone": "Asia/Tokyo",
    },
    {
        "address1": "Rua Augusta 200",
        "address2": None,
        "city": "São Paulo",
        "country": "Brazil",
        "latitude": -23.5505,
        "longitude": -46.6333,
        "region": "SP",
        "zip": "01304-000",
        "timezone": "America/Sao_Paulo",
    },
    {
        "address1": None,
        "address2": None,
        "city": "Montréal",
        "country": "Canada",
        "latitude": None,
        "longitude": None,
        "region": "QC",
        "zip": None,
        "timezone": "America/Toronto",
    },
]
_TAG_NAMES = [
    "Loyalty",
    "Q4 2025",
    "VIP",
    "Win-back",
    "Newsletter",
    "Black Friday",
    "🎄 Holiday",
    "日本市場",
    "Churn",
    "SMS",
    "Retention",
    "Test",
    "Ünïcödé tag",
    "Seasonal",
    "High value",
    "Onboarding",
]
_SEGMENT_NAMES = [
    "Engaged subscribers (90 days)",
    "VIP customers",
    "Repeat Purchasers",
    "Engaged Boston or SF subscribers",
    "Churn risk 🚨",
    "日本のお客様",
    "Lapsed 180d",
    "Black Friday 2025 buyers",
    "High CLV",
    "SMS subscribers",
    "Win-back candidates",
    "Newsletter — weekly",
    "Gold tier",
    "EU residents",
    "Never purchased",
    "Test segment",
]


def _definition(kind: int, other_ids: list[str], rng: random.Random) -> dict[str, Any]:
    """A segment definition shaped like the spec's condition schemas."""
    tier = rng.choice(["Gold", "Silver", "Bronze"])
    templates: list[list[list[dict[str, Any]]]] = [
        [
            [
                {
                    "type": "profile-property",
                    "property": "properties['Loyalty Tier']",
                    "filter": {"type": "string", "operator": "equals", "value": tier},
                }
            ]
        ],
        [
            [
                {
                    "type": "profile-group-membership",
                    "is_member": True,
                    "group_ids": other_ids[:1] or ["XyZ123"],
                }
            ],
            [
                {
                    "type": "profile-property",
                    "property": "location['city']",
                    "filter": {"type": "string", "operator": "equals", "value": "Boston"},
                },
                {
                    "type": "profile-property",
                    "property": "location['city']",
                    "filter": {"type": "string", "operator": "equals", "value": "San Francisco"},
                },
            ],
        ],
        [[{"type": "profile-region", "in_region": True, "region": "european_union"}]],
        [
            [
                {
                    "type": "profile-predictive-analytics",
                    "dimension": "churn_probability",
                    "filter": {"type": "numeric", "operator": "greater-than", "value": 0.75},
                }
            ]
        ],
        [
            [
                {
                    "type": "profile-metric",
                    "metric_id": "UWP7aX",
                    "measurement": "sum",
                    "measurement_filter": {
                        "type": "numeric",
                        "operator": "greater-than",
                        "value": 149.5,
                    },
                    "timeframe_filter": {
                        "type": "date",
                        "operator": "in-the-last",
                        "unit": "day",
                        "quantity": 180,
                    },
                }
            ]
        ],
        [
            [
                {
                    "type": "profile-property",
                    "property": "email",
                    "filter": {"type": "existence", "operator": "is-set"},
                }
            ],
            [
                {
                    "type": "profile-group-membership",
                    "is_member": False,
                    "group_ids": other_ids[1:3] or ["AbC987"],
                }
            ],
        ],
    ]
    groups = templates[kind % len(templates)]
    return {"condition_groups": [{"conditions": conds} for conds in groups]}


def _properties(rng: random.Random, i: int) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if rng.random() < 0.7:
        props["Loyalty Tier"] = rng.choice(["Gold", "Silver", "Bronze", None])
    pool: list[tuple[str, Any]] = [
        ("pseudonym", "Dr. Octopus"),
        ("favorite_color", rng.choice(["red", "blue", "vert", "青", None])),
        ("🎉 party size", rng.randint(1, 12)),
        ("好きな食べ物", rng.choice(["寿司", "ラーメン", "カレー"])),
        ("Ünïcödé key", "Ça va? 👍"),
        ("lifetime_orders", rng.randint(0, 40)),
        ("avg_basket", round(rng.uniform(5, 300), 2)),
        ("is_vip", rng.random() < 0.2),
        ("accepts_marketing", rng.choice([True, False, None])),
        (
            "nested",
            {
                "shoe": {"size": rng.choice([38, 42.5, "11 US"]), "width": None},
                "history": [1, "two", {"three": 3}, [4, [5]]],
            },
        ),
        ("interests", rng.sample(["yoga", "running", "cooking", "🎸", "読書"], k=2)),
        ("empty_object", {}),
        ("empty_list", []),
        ("null_value", None),
        ("signup_source", rng.choice(["footer form", "popup", "checkout", "POS"])),
        ("birthday", f"19{rng.randint(50, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"),
        ("big_number", 9007199254740991),
        ("negative", -rng.randint(1, 1000)),
        ("ratio", rng.random()),
        ('quote "and" backslash \\', "line1\nline2\ttab"),
    ]
    for name, value in rng.sample(pool, k=rng.randint(0, 8)):
        props[name] = value
    if i % 97 == 0:
        props["deep"] = {"a": {"b": {"c": {"d": ["x", {"e": None}]}}}}
    return props


def _subscriptions(rng: random.Random, created: datetime, anchor: datetime) -> dict[str, Any]:
    def stamp() -> datetime:
        span = max(1.0, (anchor - created).total_seconds())
        return (created + timedelta(seconds=rng.uniform(0, span))).replace(microsecond=0)

    consent = rng.choice(["SUBSCRIBED", "SUBSCRIBED", "UNSUBSCRIBED", "NEVER_SUBSCRIBED"])
    email_ts = stamp() if consent != "NEVER_SUBSCRIBED" else None
    suppression: list[dict[str, Any]] = []
    if consent == "UNSUBSCRIBED" and rng.random() < 0.5:
        suppression.append(
            {"reason": rng.choice(["UNSUBSCRIBE", "HARD_BOUNCE"]), "timestamp": email_ts}
        )
    sms = rng.choice(["SUBSCRIBED", "NEVER_SUBSCRIBED", "NEVER_SUBSCRIBED", "UNSUBSCRIBED"])
    sms_ts = stamp() if sms != "NEVER_SUBSCRIBED" else None
    subs: dict[str, Any] = {
        "email": {
            "marketing": {
                "can_receive_email_marketing": consent == "SUBSCRIBED",
                "consent": consent,
                "consent_timestamp": email_ts,
                "last_updated": email_ts,
                "method": rng.choice(["PREFERENCE_PAGE", "FORM", "API", "MANUAL_IMPORT"])
                if email_ts
                else None,
                "method_detail": "mydomain.com/signup" if email_ts else None,
                "custom_method_detail": rng.choice(["marketing drive", None]) if email_ts else None,
                "double_optin": rng.choice([True, False, None]) if email_ts else None,
                "suppression": suppression,
                "list_suppressions": [],
            }
        },
        "sms": {
            "marketing": {
                "can_receive_sms_marketing": sms == "SUBSCRIBED",
                "consent": sms,
                "consent_timestamp": sms_ts,
                "method": "TEXT" if sms_ts else None,
                "method_detail": "JOIN" if sms_ts else None,
                "last_updated": sms_ts,
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
    if sms == "SUBSCRIBED" and rng.random() < 0.5:
        subs["sms"]["transactional"] = {
            "can_receive_sms_transactional": True,
            "consent": "SUBSCRIBED",
            "consent_timestamp": sms_ts,
            "method": "TEXT",
            "method_detail": "JOIN",
            "last_updated": sms_ts,
        }
    return subs


def _predictive(rng: random.Random, anchor: datetime) -> dict[str, Any]:
    if rng.random() < 0.4:
        return dict.fromkeys(PREDICTIVE_FIELDS)
    historic = round(rng.uniform(0, 800), 2)
    predicted = round(rng.uniform(0, 300), 2)
    orders = rng.randint(1, 20)
    channels = ["email", "sms", "push"]
    rng.shuffle(channels)
    return {
        "historic_clv": historic,
        "predicted_clv": predicted,
        "total_clv": round(historic + predicted, 2),
        "historic_number_of_orders": orders,
        "predicted_number_of_orders": round(rng.uniform(0, 4), 2),
        "average_days_between_orders": rng.randint(7, 365) if orders > 1 else None,
        "average_order_value": round(historic / orders, 2),
        "churn_probability": round(rng.random(), 2),
        "expected_date_of_next_order": (anchor + timedelta(days=rng.randint(1, 200))).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        if rng.random() < 0.8
        else None,
        "ranked_channel_affinity": channels if rng.random() < 0.8 else None,
    }


def _location(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.25:
        return None  # all-null location
    loc = dict(rng.choice(_CITIES))
    if loc["latitude"] is not None and rng.random() < 0.5:
        loc["latitude"] = f"{loc['latitude']:.4f}"
        loc["longitude"] = f"{loc['longitude']:.4f}"
    loc["ip"] = f"198.51.100.{rng.randint(1, 254)}" if rng.random() < 0.7 else None
    return loc


def _split_sizes(
    rng: random.Random, n_nonempty: int, n_large: int, memberships: int, cap: int
) -> list[int]:
    """Segment sizes (first ``n_large`` get most memberships), each at most ``cap``."""
    if n_nonempty == 0:
        return []
    weights = [0.45, 0.25][:n_large]
    rest = n_nonempty - n_large
    share = max(0.0, 1.0 - sum(weights))
    raw = [rng.uniform(0.5, 1.5) for _ in range(rest)]
    total_raw = sum(raw) or 1.0
    weights += [share * r / total_raw for r in raw]
    if rest == 0:
        weights = [w / sum(weights) for w in weights]
    sizes = [min(cap, int(memberships * w)) for w in weights]
    left = min(memberships, cap * n_nonempty) - sum(sizes)
    i = 0
    while left > 0:
        j = (n_large + i) % n_nonempty if rest else i % n_nonempty
        if sizes[j] < cap:
            sizes[j] += 1
            left -= 1
        i += 1
    return sizes


@overload
def generate_account(
    *,
    seed: int = ...,
    segments: int = ...,
    tags: int = ...,
    profiles: int = ...,
    memberships: int = ...,
) -> Account: ...


@overload
def generate_account(
    *,
    seed: int = ...,
    segments: int = ...,
    tags: int = ...,
    profiles: int = ...,
    memberships: int = ...,
    now: datetime | None = ...,
    clock: Callable[[], datetime] | None = ...,
) -> Account: ...


# The int-only overload lets callers pass sizes as ``**dict[str, int]`` under mypy.
def generate_account(
    *,
    seed: int = 7,
    segments: int = 12,
    tags: int = 8,
    profiles: int = 3000,
    memberships: int = 9000,
    now: datetime | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Account:
    """Build a realistic account; see the module docstring for determinism.

    ``memberships`` is the total number of (segment, profile) pairs; it is capped at
    ``profiles`` per non-empty segment. ``clock`` is passed to ``Account`` (default: real time).
    """
    if min(segments, tags, profiles, memberships) < 0:
        raise ValueError("sizes must be >= 0")
    rng = random.Random(seed)
    if now is None:
        anchor = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        anchor = now.astimezone(timezone.utc)
    account = Account(clock=clock, seed=rng.getrandbits(32))

    tag_ids: list[str] = []
    for i in range(tags):
        name = _TAG_NAMES[i % len(_TAG_NAMES)]
        if i >= len(_TAG_NAMES):
            name = f"{name} {i // len(_TAG_NAMES) + 1}"
        tag_ids.append(account.create_tag(name))

    # ---------------------------------------------------------------- profiles
    pids: list[str] = []
    created_at: list[datetime] = []
    for i in range(profiles):
        if rng.random() < 0.7:
            created = anchor - timedelta(days=rng.uniform(731, 1800))
        else:
            created = anchor - timedelta(days=rng.uniform(3, 730))
        created = created.replace(microsecond=rng.choice([0, 0, 0, rng.randint(1, 999999)]))
        first, last = _FIRST_LAST[i % len(_FIRST_LAST)]
        handle = _HANDLES[i % len(_HANDLES)]
        email = None if rng.random() < 0.05 else f"{handle}.{i}@{rng.choice(_DOMAINS)}"
        phone = None
        if email is None or rng.random() < 0.5:
            phone = rng.choice(["+1", "+44", "+49", "+81", "+33"]) + "".join(
                str(rng.randint(0, 9)) for _ in range(10)
            )
        updated = created + timedelta(seconds=rng.uniform(0, (anchor - created).total_seconds()))
        subscriptions = _subscriptions(rng, created, anchor)
        for channel in ("email", "sms"):
            stamp = subscriptions[channel]["marketing"]["last_updated"]
            if stamp is not None and stamp > updated:
                updated = stamp
        last_event = None
        if rng.random() < 0.7:
            last_event = created + timedelta(
                seconds=rng.uniform(0, (anchor - created).total_seconds())
            )
        pid = make_ulid(created, rng)
        account.insert_profile(
            dict(
                id=pid,
                email=email,
                phone_number=phone,
                external_id=f"crm-{i:05d}" if rng.random() < 0.3 else None,
                first_name=first if rng.random() < 0.9 else None,
                last_name=last,
                organization=rng.choice(_ORGS) if rng.random() < 0.2 else None,
                locale=rng.choice(_LOCALES) if rng.random() < 0.6 else None,
                title=rng.choice(_TITLES) if rng.random() < 0.15 else None,
                image=f"https://images.example.com/avatars/{i}.jpg" if rng.random() < 0.2 else None,
                created=created,
                updated=updated,
                last_event_date=last_event,
                location=_location(rng),
                properties=_properties(rng, i),
                subscriptions=subscriptions,
                predictive_analytics=_predictive(rng, anchor),
                push_tokens=[f"{rng.getrandbits(128):032x}"] if rng.random() < 0.15 else [],
            ),
            take_ownership=True,
        )
        pids.append(pid)
        created_at.append(created)

    # ---------------------------------------------------------------- segments
    n_empty = 2 if segments >= 5 else (1 if segments >= 3 else 0)
    n_nonempty = segments - n_empty if profiles else 0
    n_large = min(2 if n_nonempty >= 4 else 1, n_nonempty)
    sizes = _split_sizes(rng, n_nonempty, n_large, memberships, profiles)
    sizes += [0] * (segments - len(sizes))
    # order: large ones first, then the rest, then the empty ones; shuffle the middle
    seg_ids: list[str] = []
    used_ids: set[str] = set()
    for _ in range(segments):
        sid = make_segment_id(rng)
        while sid in used_ids:
            sid = make_segment_id(rng)
        used_ids.add(sid)
        seg_ids.append(sid)
    n_inactive = max(1, segments // 6) if segments >= 4 else 0
    inactive = set(range(segments - n_inactive - 1, segments - 1)) if n_inactive else set()
    processing = n_large if segments >= 3 else -1
    for k, sid in enumerate(seg_ids):
        name = _SEGMENT_NAMES[k % len(_SEGMENT_NAMES)]
        if k >= len(_SEGMENT_NAMES):
            name = f"{name} #{k // len(_SEGMENT_NAMES) + 1}"
        created = (anchor - timedelta(days=rng.uniform(760, 1000))).replace(microsecond=0)
        others = [s for s in seg_ids if s != sid]
        updated = created + timedelta(
            seconds=rng.uniform(0, (anchor - created).total_seconds() - 86400)
        )
        account.create_segment(
            name,
            segment_id=sid,
            created=created,
            updated=updated.replace(microsecond=rng.choice([0, rng.randint(1, 999999)])),
            is_active=k not in inactive,
            is_starred=rng.random() < 0.3 or k == 0,
            is_processing=k == processing,
            definition=_definition(k, rng.sample(others, k=min(3, len(others))), rng),
            tag_ids=rng.sample(tag_ids, k=min(len(tag_ids), rng.choice([0, 0, 1, 1, 2, 3])))
            if k != 1
            else tag_ids[:2],
        )

    # ---------------------------------------------------------------- memberships
    two_years = timedelta(days=730)
    for k, (sid, size) in enumerate(zip(seg_ids, sizes, strict=False)):
        if size == 0:
            continue
        chosen = rng.sample(range(profiles), size)
        joins: dict[int, datetime] = {}
        # bulk imports: groups of identical joined_group_at inside the large segments
        if k < n_large:
            budget = int(size * 0.6)
            while budget > 0:
                target = (
                    min(budget, rng.randint(150, 400))
                    if size >= 500
                    else max(2, min(budget, size // 5))
                )
                stamp = (anchor - timedelta(days=rng.uniform(20, 700))).replace(microsecond=0)
                eligible = [p for p in chosen if p not in joins and created_at[p] <= stamp]
                group = eligible[:target]
                if len(group) < 2:
                    break
                for p in group:
                    joins[p] = stamp
                budget -= len(group)
        recent = 0
        for p in chosen:
            if p in joins:
                continue
            start = max(created_at[p], anchor - two_years)
            if recent < 5 and created_at[p] < anchor - timedelta(days=3):
                lo, hi = anchor - timedelta(days=3), anchor - timedelta(minutes=10)
                recent += 1
            else:
                lo, hi = start, anchor - timedelta(hours=1)
            if hi <= lo:
                lo = hi - timedelta(minutes=1)
            when = lo + timedelta(seconds=rng.uniform(0, (hi - lo).total_seconds()))
            when = when.replace(microsecond=rng.randint(1, 999999) if rng.random() < 0.2 else 0)
            joins[p] = when
        # small ties: some members share a neighbour's timestamp
        ordered = list(joins)
        for a, b in zip(ordered[::17], ordered[1::17], strict=False):
            if created_at[b] <= joins[a]:
                joins[b] = joins[a]
        for p, when in joins.items():
            account.join(sid, pids[p], at=when)
    _add_former_members(account, seed, seg_ids, pids, created_at, anchor)
    return account


# Of a segment's members, about one in this many left it before the account's anchor.
_FORMER_MEMBER_SHARE = 20


def _add_former_members(
    account: Account,
    seed: int,
    seg_ids: list[str],
    pids: list[str],
    created_at: list[datetime],
    anchor: datetime,
) -> None:
    """Profiles that joined a segment and left it again before ``anchor``.

    No membership listing shows them, but Klaviyo's segment reports count them, day by day,
    from long before any export. A random stream of their own leaves the rest of the account
    as it was for a seed.
    """
    rng = random.Random(f"{seed}:former members")
    for sid in seg_ids:
        current = account.members(sid)
        wanted = len(current) // _FORMER_MEMBER_SHARE
        former: set[int] = set()
        for _ in range(wanted * 4):  # a bounded number of draws: most profiles are free
            if len(former) >= wanted:
                break
            p = rng.randrange(len(pids))
            if pids[p] not in current and created_at[p] < anchor - timedelta(days=2):
                former.add(p)
        for p in sorted(former):
            start = max(created_at[p], anchor - timedelta(days=730))
            stay = (anchor - timedelta(days=1) - start).total_seconds()
            joined = start + timedelta(seconds=rng.uniform(0, stay / 2))
            left = joined + timedelta(seconds=rng.uniform(3600, stay / 2))
            account.join(sid, pids[p], at=joined.replace(microsecond=0))
            account.leave(sid, pids[p], at=left.replace(microsecond=0))
