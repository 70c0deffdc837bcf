"""GET /api/profiles answers as revision 2025-04-15 documents it: filters on updated and on
identifiers, sorts, cursor paging, sparse and additional fields, errors and rate limits."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from klaviyo_source.simulator import ALL_SCOPES, Account, KlaviyoSimulator, generate_account
from klaviyo_source.simulator.api import exchange_id

REVISION = "2025-04-15"
START = datetime(2026, 8, 3, 9, 0, tzinfo=timezone.utc)


class Clock:
    """An account clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Ticks:
    """Monotonic seconds for the rate limiter, moved by hand."""

    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def account(clock: Clock) -> Account:
    return generate_account(
        seed=21, segments=3, tags=2, profiles=150, memberships=260, now=START, clock=clock
    )


@pytest.fixture
def served(account: Account) -> Iterator[KlaviyoSimulator]:
    with KlaviyoSimulator(account, rate_limits=False) as sim:
        yield sim


@pytest.fixture
def api(served: KlaviyoSimulator, tools: Any) -> Any:
    return tools.Client(served, revision=REVISION)


def z(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ids(pages: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for page in pages for item in page["data"]]


def assert_invalid(resp: requests.Response, parameter: str) -> None:
    assert resp.status_code == 400, resp.text
    (error,) = resp.json()["errors"]
    assert error["status"] == 400 and error["code"] == "invalid"
    assert error["title"] == "Invalid input."
    assert error["source"] == {"parameter": parameter}


# ---------------------------------------------------------------------------- updated
def test_filter_on_updated_returns_exactly_the_edited_profiles_in_order(
    api: Any, account: Account, clock: Clock
) -> None:
    every = sorted(account.profiles())
    edited = [every[40], every[3], every[121], every[77]]
    clock.now = START + timedelta(hours=1)
    for n, pid in enumerate(edited):
        clock.now += timedelta(minutes=1)
        if n % 2:
            account.update_profile(pid, first_name=f"Edited {n}")
        else:
            account.update_profile(pid, properties={"plan": "gold"})
    bound = z(START + timedelta(minutes=30))
    params = {"filter": f"greater-than(updated,{bound})", "sort": "updated"}
    pages = api.walk("/api/profiles", params)
    assert ids(pages) == edited
    stamps = [api.get("/api/profiles", {"filter": f"equals(id,'{p}')"}) for p in edited]
    assert [r.json()["data"][0]["attributes"]["updated"] for r in stamps] == [
        (START + timedelta(hours=1, minutes=n + 1)).isoformat() for n in range(4)
    ]
    params["sort"] = "-updated"
    assert ids(api.walk("/api/profiles", params)) == edited[::-1]
    rest = api.walk("/api/profiles", {"filter": f"less-than(updated,{bound})", "page[size]": 100})
    assert sorted(ids(rest)) == sorted(set(every) - set(edited))


def test_every_kind_of_profile_edit_moves_updated(account: Account, clock: Clock) -> None:
    pid = sorted(account.profiles())[5]
    edits: list[dict[str, Any]] = [
        {"email": "new@example.com"},
        {"location": {"city": "Lyon"}},
        {"properties": {"tier": 2}},
        {"subscriptions": account.profiles()[pid]["subscriptions"]},
        {"predictive_analytics": {"historic_clv": 10.0}},
        {"push_tokens": ["token-1"]},
        {"updated": None, "title": "Chef"},
    ]
    for edit in edits:
        clock.now += timedelta(seconds=7)
        account.update_profile(pid, **edit)
        assert account.profiles()[pid]["updated"] == clock.now, edit
    chosen = START - timedelta(days=2)
    account.update_profile(pid, updated=chosen, first_name="Kept")
    assert account.profiles()[pid]["updated"] == chosen


@pytest.mark.parametrize("op", ["greater-or-equal", "less-or-equal", "equals"])
def test_updated_takes_only_greater_than_and_less_than(api: Any, op: str) -> None:
    resp = api.get("/api/profiles", {"filter": f"{op}(updated,{z(START)})"})
    assert_invalid(resp, "filter")


def test_greater_than_a_future_updated_is_rejected(api: Any) -> None:
    resp = api.get("/api/profiles", {"filter": f"greater-than(updated,{z(START + timedelta(1))})"})
    assert_invalid(resp, "filter")


# ---------------------------------------------------------------------------- paging and sort
def test_paging_visits_every_profile_once_in_id_order(api: Any, account: Account) -> None:
    pages = api.walk("/api/profiles", {"page[size]": 7})
    assert [len(page["data"]) for page in pages] == [7] * 21 + [3]
    assert ids(pages) == sorted(account.profiles())
    assert pages[-1]["links"]["next"] is None and pages[0]["links"]["prev"] is None
    assert len(api.get("/api/profiles").json()["data"]) == 20


@pytest.mark.parametrize("sort", ["created", "-created", "email", "-email", "id", "-id"])
def test_sorted_walks_follow_the_sort_value_then_the_id(
    api: Any, account: Account, sort: str
) -> None:
    name = sort.lstrip("-")
    truth = account.profiles()

    def value(pid: str) -> Any:
        if name == "id":
            return pid
        raw = truth[pid][name]
        return raw.isoformat() if isinstance(raw, datetime) else raw or ""

    expected = sorted(truth, key=lambda pid: (value(pid), pid), reverse=sort.startswith("-"))
    assert ids(api.walk("/api/profiles", {"sort": sort, "page[size]": 33})) == expected


def test_a_cursor_belongs_to_its_sort_and_filter(api: Any) -> None:
    first = api.get("/api/profiles", {"sort": "created", "page[size]": 5}).json()
    cursor = first["links"]["next"].split("page%5Bcursor%5D=")[1]
    resp = api.get("/api/profiles", {"sort": "updated", "page[cursor]": cursor})
    assert resp.status_code == 400
    assert resp.json()["errors"][0]["detail"] == "Invalid cursor provided."


# ---------------------------------------------------------------------------- identifiers
def test_identifier_filters(api: Any, account: Account) -> None:
    truth = account.profiles()
    every = sorted(truth)
    with_email = next(p for p in every if truth[p]["email"])
    with_phone = next(p for p in every if truth[p]["phone_number"])
    with_external = next(p for p in every if truth[p]["external_id"])
    cases = {
        f"equals(email,'{truth[with_email]['email']}')": [with_email],
        f"equals(phone_number,'{truth[with_phone]['phone_number']}')": [with_phone],
        f"any(external_id,['{truth[with_external]['external_id']}','nobody'])": [with_external],
        f"any(id,['{every[9]}','{every[2]}','{every[140]}'])": [every[2], every[9], every[140]],
        f"equals(_kx,'{exchange_id(every[4])}')": [every[4]],
        f"equals(id,'{every[4]}'),greater-than(updated,{z(START)})": [],
    }
    for expression, expected in cases.items():
        assert ids(api.walk("/api/profiles", {"filter": expression})) == expected, expression


@pytest.mark.parametrize(
    "expression",
    ["equals(first_name,'Ann')", "contains(email,'a')", "any(email,'a@b.c')", "equals(id,"],
)
def test_filters_the_spec_does_not_allow_are_rejected(api: Any, expression: str) -> None:
    assert_invalid(api.get("/api/profiles", {"filter": expression}), "filter")


# ---------------------------------------------------------------------------- fields
def test_profiles_render_as_segment_members_without_joined_group_at(
    served: KlaviyoSimulator, account: Account, tools: Any
) -> None:
    newest = tools.Client(served, revision="2026-07-15")
    sid = tools.largest_segment(account)
    pid = sorted(account.members(sid))[0]
    extra = {"additional-fields[profile]": "subscriptions,predictive_analytics"}
    listed = newest.get("/api/profiles", {"filter": f"equals(id,'{pid}')", **extra}).json()
    member = newest.get(
        f"/api/segments/{sid}/profiles", {"filter": f"equals(profile_id,'{pid}')", **extra}
    ).json()
    (as_member,) = member["data"]
    assert "joined_group_at" in as_member["attributes"]
    del as_member["attributes"]["joined_group_at"]
    assert listed["data"] == [as_member]


def test_sparse_and_additional_fields(api: Any, account: Account, tools: Any) -> None:
    pid = sorted(account.profiles())[0]
    truth = account.profiles()[pid]
    one = {"filter": f"equals(id,'{pid}')"}
    plain = api.get("/api/profiles", one).json()["data"][0]["attributes"]
    assert "subscriptions" not in plain and "predictive_analytics" not in plain
    assert "joined_group_at" not in plain and plain["email"] == truth["email"]
    sparse = api.get("/api/profiles", {**one, "fields[profile]": "email,location.city"}).json()
    assert sparse["data"][0]["attributes"] == {
        "email": truth["email"],
        "location": {"city": truth["location"]["city"]},
    }
    full = api.get(
        "/api/profiles", {**one, "additional-fields[profile]": "subscriptions,predictive_analytics"}
    ).json()["data"][0]["attributes"]
    for name in ("subscriptions", "predictive_analytics"):
        like = tools.to_api_json(truth[name])
        assert tools.normalise_api(full[name], like) == like


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"fields[profile]": "joined_group_at"}, "fields[profile]"),
        ({"fields[profile]": "id"}, "fields[profile]"),  # allowed only from 2026-04-15
        ({"fields[profile]": "subscriptions.whatsapp"}, "fields[profile]"),
        ({"additional-fields[profile]": "profile_count"}, "additional-fields[profile]"),
        ({"sort": "name"}, "sort"),
        ({"sort": "joined_group_at"}, "sort"),
        ({"page[size]": "0"}, "page[size]"),
        ({"page[size]": "101"}, "page[size]"),
        ({"page[size]": "ten"}, "page[size]"),
        ({"page[number]": "2"}, "page[number]"),
    ],
)
def test_bad_parameters_get_klaviyos_400(api: Any, params: dict[str, str], parameter: str) -> None:
    assert_invalid(api.get("/api/profiles", params), parameter)


def test_the_fieldset_follows_the_revision(served: KlaviyoSimulator, tools: Any) -> None:
    params = {"fields[profile]": "subscriptions.mobile_push", "page[size]": 1}
    older = tools.Client(served, revision="2024-06-15").get("/api/profiles", params)
    assert_invalid(older, "fields[profile]")
    assert tools.Client(served, revision=REVISION).get("/api/profiles", params).status_code == 200


def test_the_endpoint_needs_profiles_read(account: Account, tools: Any) -> None:
    keys = {"pk_segments": {"segments:read"}, "pk_profiles": {"profiles:read"}}
    with KlaviyoSimulator(account, api_keys=keys, rate_limits=False) as sim:
        denied = tools.Client(sim, key="pk_segments", revision=REVISION).get("/api/profiles")
        assert denied.status_code == 403
        assert denied.json()["errors"][0]["detail"] == (
            "Your API key is missing required scopes: profiles:read."
        )
        allowed = tools.Client(sim, key="pk_profiles", revision=REVISION).get("/api/profiles")
        assert allowed.status_code == 200


# ---------------------------------------------------------------------------- rate limits
@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def limited(account: Account, ticks: Ticks) -> Iterator[KlaviyoSimulator]:
    keys = {"pk_all": set(ALL_SCOPES)}
    with KlaviyoSimulator(account, api_keys=keys, rate_limit_clock=ticks) as sim:
        yield sim


def test_large_tier_with_a_budget_of_its_own(
    limited: KlaviyoSimulator, ticks: Ticks, tools: Any
) -> None:
    client = tools.Client(limited, key="pk_all", revision=REVISION)
    ticks.t += 0.5
    for n in range(75):
        resp = client.get("/api/profiles", {"page[size]": 1})
        assert resp.status_code == 200
        assert resp.headers["RateLimit-Limit"] == "700"
        assert resp.headers["RateLimit-Remaining"] == str(699 - n)
    throttled = client.get("/api/profiles", {"page[size]": 1})
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "1"
    assert throttled.json()["errors"][0]["code"] == "throttled"
    # The segment endpoints' burst is untouched by the profiles' one, and the other way round.
    assert client.get("/api/segments").status_code == 200
    assert client.get("/api/segments").headers["RateLimit-Remaining"] == "698"
    ticks.t += 1
    assert client.get("/api/profiles").headers["RateLimit-Remaining"] == "624"


def test_predictive_analytics_costs_the_medium_tier_shared_with_segment_members(
    limited: KlaviyoSimulator, account: Account, ticks: Ticks, tools: Any
) -> None:
    client = tools.Client(limited, key="pk_all", revision=REVISION)
    ticks.t += 0.5
    predictive = {"additional-fields[profile]": "predictive_analytics", "page[size]": 1}
    statuses = [client.get("/api/profiles", predictive).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    assert client.get("/api/profiles", {"page[size]": 1}).status_code == 200
    subscriptions = {"additional-fields[profile]": "subscriptions", "page[size]": 1}
    assert client.get("/api/profiles", subscriptions).status_code == 200
    sid = tools.largest_segment(account)
    assert client.get(f"/api/segments/{sid}/profiles", predictive).status_code == 429
    ticks.t += 1
    assert client.get(f"/api/segments/{sid}/profiles", predictive).status_code == 200


# ---------------------------------------------------------------------------- deletion
def test_a_deleted_profile_is_gone_from_every_listing(
    api: Any, account: Account, clock: Clock
) -> None:
    sid, members = next((s, m) for s, m in account.memberships().items() if m)
    pid = sorted(members)[0]
    clock.now = START + timedelta(minutes=5)
    account.delete_profile(pid)
    assert pid not in account.profiles()
    assert all(pid not in m for m in account.memberships().values())
    assert pid not in ids(api.walk("/api/profiles", {"page[size]": 100}))
    assert ids(api.walk("/api/profiles", {"filter": f"equals(id,'{pid}')"})) == []
    listed = api.walk(f"/api/segments/{sid}/profiles", {"page[size]": 100})
    assert pid not in ids(listed)
    # Klaviyo keeps no tombstone; the change log counts the deletion as a leave.
    changes = [(c.kind, c.at) for c in account.membership_changes(sid) if c.profile_id == pid]
    assert changes[-1] == ("leave", clock.now)


def test_greater_than_on_updated_is_strict_to_the_microsecond(
    api: Any, account: Account, clock: Clock
) -> None:
    at_bound, after = sorted(account.profiles())[:2]
    clock.now = START + timedelta(minutes=10)
    bound = START + timedelta(minutes=5)
    account.update_profile(at_bound, updated=bound, first_name="At")
    account.update_profile(after, updated=bound + timedelta(microseconds=1), first_name="After")
    found = ids(api.walk("/api/profiles", {"filter": f"greater-than(updated,{z(bound)})"}))
    assert after in found and at_bound not in found
