"""Filters, sorts, sparse fieldsets, include, additional-fields and paging parameters behave as
documented, and every bad parameter gets Klaviyo's 400 body."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest


def _ids(client: Any, tools: Any, path: str, params: dict[str, Any]) -> list[str]:
    return [i["id"] for i in tools.rows(client.walk(path, params))]


def _jga_cut(sim_account: Any, tools: Any) -> tuple[str, dict[str, datetime], datetime]:
    sid = tools.largest_segment(sim_account)
    truth = sim_account.members(sid)
    values = sorted(set(truth.values()))
    return sid, truth, values[len(values) // 2]


@pytest.mark.parametrize(
    ("op", "check"),
    [
        ("greater-than", lambda v, c: v > c),
        ("greater-or-equal", lambda v, c: v >= c),
        ("less-than", lambda v, c: v < c),
        ("less-or-equal", lambda v, c: v <= c),
    ],
)
def test_joined_group_at_operators(
    client: Any, tools: Any, sim_account: Any, op: str, check: Any
) -> None:
    sid, truth, cut = _jga_cut(sim_account, tools)
    literal = cut.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for path in ("profiles", "relationships/profiles"):
        got = _ids(
            client,
            tools,
            f"/api/segments/{sid}/{path}",
            {"filter": f"{op}(joined_group_at,{literal})", "page[size]": 100},
        )
        expected = {p for p, v in truth.items() if check(v, cut)}
        assert set(got) == expected and len(got) == len(expected)
        assert 0 < len(expected) < len(truth)


@pytest.mark.parametrize(
    "literal",
    [
        "2025-01-01T00:00:00Z",
        "2025-01-01T02:00:00+02:00",
        "2024-12-31T19:00:00-05:00",
        "2025-01-01T00:00:00.000Z",
        "2025-01-01",
        "2025-01-01T00:00Z",
    ],
)
def test_datetime_literal_forms(client: Any, tools: Any, sim_account: Any, literal: str) -> None:
    sid = tools.largest_segment(sim_account)
    truth = sim_account.members(sid)
    bound = datetime(2025, 1, 1, tzinfo=timezone.utc)
    got = _ids(
        client,
        tools,
        f"/api/segments/{sid}/relationships/profiles",
        {"filter": f"greater-or-equal(joined_group_at,{literal})", "page[size]": 100},
    )
    assert set(got) == {p for p, v in truth.items() if v >= bound}


def test_and_forms_and_fraction_precision(client: Any, tools: Any, sim_account: Any) -> None:
    sid, truth, cut = _jga_cut(sim_account, tools)
    upper = cut + timedelta(days=60)
    lo, hi = cut.isoformat().replace("+00:00", "Z"), upper.isoformat().replace("+00:00", "Z")
    expected = {p for p, v in truth.items() if cut <= v < upper}
    path = f"/api/segments/{sid}/profiles"
    nested = f"and(greater-or-equal(joined_group_at,{lo}),less-than(joined_group_at,{hi}))"
    comma = f"greater-or-equal(joined_group_at,{lo}),less-than(joined_group_at,{hi})"
    for expr in (nested, comma):
        assert set(_ids(client, tools, path, {"filter": expr, "page[size]": 100})) == expected


def test_identity_filters(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    members = sim_account.members(sid)
    profiles = sim_account.profiles()
    with_email = [p for p in sorted(members) if profiles[p]["email"]][:3]
    emails = [profiles[p]["email"] for p in with_email]
    path = f"/api/segments/{sid}/profiles"
    got = _ids(client, tools, path, {"filter": f'equals(email,"{emails[0]}")'})
    assert got == [with_email[0]]
    listed = ",".join(f'"{e}"' for e in emails)
    assert set(_ids(client, tools, path, {"filter": f"any(email,[{listed}])"})) == set(with_email)
    assert _ids(client, tools, path, {"filter": f"equals(email,['{emails[1]}'])"}) == [
        with_email[1]
    ]
    phone_pid = next(p for p in sorted(members) if profiles[p]["phone_number"])
    phone = profiles[phone_pid]["phone_number"]
    got = _ids(client, tools, path, {"filter": f'equals(phone_number,"{phone}")'})
    assert phone_pid in got
    assert _ids(client, tools, path, {"filter": f'equals(profile_id,"{with_email[2]}")'}) == [
        with_email[2]
    ]
    token_pid = next(p for p in sorted(members) if sim_account.push_tokens(p))
    token = sim_account.push_tokens(token_pid)[0]
    assert _ids(client, tools, path, {"filter": f'any(push_token,["{token}"])'}) == [token_pid]
    assert _ids(client, tools, path, {"filter": 'equals(email,"nobody@nowhere.test")'}) == []


def test_segment_filters(client: Any, tools: Any, sim_account: Any) -> None:
    truth = sim_account.segments()
    names = sorted(a["name"] for a in truth.values())
    path = "/api/segments"

    def ids(expr: str) -> set[str]:
        return set(_ids(client, tools, path, {"filter": expr}))

    by_name = {a["name"]: s for s, a in truth.items()}
    assert ids(f'equals(name,"{names[0]}")') == {by_name[names[0]]}
    assert ids(f"equals(name,['{names[1]}'])") == {by_name[names[1]]}
    assert ids(f'any(name,["{names[0]}","{names[2]}"])') == {by_name[names[0]], by_name[names[2]]}
    some = sorted(truth)[:2]
    assert ids(f'any(id,["{some[0]}","{some[1]}"])') == set(some)
    assert ids(f'equals(id,"{some[0]}")') == {some[0]}
    assert ids("equals(is_active,false)") == {s for s, a in truth.items() if not a["is_active"]}
    assert ids("any(is_active,[true,false])") == set(truth)
    assert ids("equals(is_starred,true)") == {s for s, a in truth.items() if a["is_starred"]}
    mid = sorted(a["updated"] for a in truth.values())[len(truth) // 2]
    stamp = mid.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert ids(f"greater-than(updated,{stamp})") == {
        s for s, a in truth.items() if a["updated"] > mid
    }
    first = min(a["created"] for a in truth.values())
    assert ids(f"greater-than(created,{first.strftime('%Y-%m-%dT%H:%M:%S.%fZ')})") == {
        s for s, a in truth.items() if a["created"] > first
    }
    combo = ids("and(equals(is_active,true),equals(is_starred,true))")
    assert combo == {s for s, a in truth.items() if a["is_active"] and a["is_starred"]}


def test_tag_filters(client: Any, tools: Any, sim_account: Any) -> None:
    tags = sim_account.tags()
    name = sorted(tags.values())[0]

    def names(expr: str) -> set[str]:
        return {
            t["attributes"]["name"] for t in tools.rows(client.walk("/api/tags", {"filter": expr}))
        }

    assert names(f'equals(name,"{name}")') == {name}
    assert names(f'contains(name,"{name[1:3]}")') == {n for n in tags.values() if name[1:3] in n}
    assert names(f'starts-with(name,"{name[:2]}")') == {
        n for n in tags.values() if n.startswith(name[:2])
    }
    assert names(f'ends-with(name,"{name[-2:]}")') == {
        n for n in tags.values() if n.endswith(name[-2:])
    }


def test_profile_fieldsets(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    path = f"/api/segments/{sid}/profiles"
    doc = client.get(path, {"fields[profile]": "email,joined_group_at,location.city"}).json()
    for item in doc["data"]:
        assert list(item["attributes"]) == ["email", "location", "joined_group_at"]
        assert list(item["attributes"]["location"]) == ["city"]
        assert item["relationships"]["lists"]["links"]["self"]
    doc = client.get(path, {"fields[profile]": "email"}).json()
    assert all(list(i["attributes"]) == ["email"] for i in doc["data"])
    # fields alone do not reveal additional fields; both together give exactly them
    doc = client.get(path, {"fields[profile]": "predictive_analytics"}).json()
    assert all(i["attributes"] is None for i in doc["data"])
    doc = client.get(
        path,
        {
            "fields[profile]": "predictive_analytics.churn_probability,"
            "subscriptions.email.marketing.consent",
            "additional-fields[profile]": "predictive_analytics,subscriptions",
        },
    )
    item = doc.json()["data"][0]
    assert item["attributes"] == {
        "subscriptions": {
            "email": {
                "marketing": {
                    "consent": sim_account.profiles()[item["id"]]["subscriptions"]["email"][
                        "marketing"
                    ]["consent"]
                }
            }
        },
        "predictive_analytics": {
            "churn_probability": sim_account.profiles()[item["id"]]["predictive_analytics"][
                "churn_probability"
            ]
        },
    }
    plain = client.get(path).json()["data"][0]["attributes"]
    assert "subscriptions" not in plain and "predictive_analytics" not in plain
    assert "joined_group_at" in plain
    extra = client.get(path, {"additional-fields[profile]": "subscriptions"}).json()
    assert "subscriptions" in extra["data"][0]["attributes"]
    assert "predictive_analytics" not in extra["data"][0]["attributes"]


def test_segment_fieldsets_include_and_profile_count(
    client: Any, tools: Any, sim_account: Any
) -> None:
    sid = tools.largest_segment(sim_account)
    doc = client.get(
        f"/api/segments/{sid}",
        {
            "fields[segment]": "name,profile_count,definition.condition_groups",
            "additional-fields[segment]": "profile_count",
            "include": "tags",
            "fields[tag]": "name",
        },
    ).json()
    assert doc["data"]["attributes"] == {
        "name": sim_account.segments()[sid]["name"],
        "definition": sim_account.segments()[sid]["definition"],
        "profile_count": sim_account.profile_count(sid),
    }
    assert {t["id"] for t in doc["included"]} == {
        t for s, t in sim_account.segment_tags() if s == sid
    }
    plain = client.get(f"/api/segments/{sid}").json()
    assert "profile_count" not in plain["data"]["attributes"] and "included" not in plain
    assert "data" not in plain["data"]["relationships"]["tags"]
    flows = client.get(f"/api/segments/{sid}", {"include": "flow-triggers"}).json()
    assert flows["included"] == [] and flows["data"]["relationships"]["flow-triggers"]["data"] == []
    tags = client.get("/api/tags", {"fields[tag]": "id"}).json()
    assert all(t["attributes"] is None for t in tags["data"])


def test_links_repeat_query_and_are_absolute(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    params = {
        "filter": "greater-than(joined_group_at,2020-01-01T00:00:00Z)",
        "page[size]": 5,
        "sort": "joined_group_at",
    }
    doc = client.get(f"/api/segments/{sid}/profiles/", params).json()
    base = f"{client.sim.base_url}/api/segments/{sid}/profiles/?"
    assert doc["links"]["self"] == base + (
        "filter=greater-than%28joined_group_at%2C2020-01-01T00%3A00%3A00Z%29"
        "&page%5Bsize%5D=5&sort=joined_group_at"
    )
    assert doc["links"]["next"].startswith(doc["links"]["self"] + "&page%5Bcursor%5D=")
    assert doc["links"]["prev"] is None
    cursor = doc["links"]["next"].rsplit("=", 1)[1]
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor


@pytest.mark.parametrize(
    ("path", "params", "parameter", "detail"),
    [
        ("profiles", {"filter": "equals(email,me@test.com)"}, "filter", "Invalid filter provided."),
        (
            "profiles",
            {"filter": "greater-than(joined_group_at,2025-01-01T00:00:00 00:00)"},
            "filter",
            "Invalid filter provided.",
        ),
        (
            "profiles",
            {"filter": "greater-than(joined_group_at,2999-01-01T00:00:00Z)"},
            "filter",
            None,
        ),
        ("profiles", {"filter": 'equals(first_name,"Sarah")'}, "filter", None),
        ("profiles", {"filter": 'greater-than(email,"a")'}, "filter", None),
        ("profiles", {"filter": 'greater-than(joined_group_at,"2025-01-01")'}, "filter", None),
        ("profiles", {"filter": "greater-than(joined_group_at,2025-13-45)"}, "filter", None),
        ("profiles", {"filter": "equals(email,null)"}, "filter", None),
        ("profiles", {"filter": 'or(equals(email,"a"),equals(email,"b"))'}, "filter", None),
        ("profiles", {"filter": 'equals(email,"a"'}, "filter", None),
        ("profiles", {"sort": "email"}, "sort", None),
        ("profiles", {"sort": "joined_group_at,-joined_group_at"}, "sort", None),
        ("profiles", {"fields[profile]": "email,shoe_size"}, "fields[profile]", None),
        ("profiles", {"fields[profile]": "location.planet"}, "fields[profile]", None),
        ("profiles", {"additional-fields[profile]": "lists"}, "additional-fields[profile]", None),
        ("profiles", {"page[size]": "0"}, "page[size]", None),
        ("profiles", {"page[size]": "101"}, "page[size]", None),
        ("profiles", {"page[size]": "ten"}, "page[size]", None),
        ("profiles", {"include": "lists"}, "include", None),
        ("profiles", {"foo": "bar"}, "foo", None),
        ("relationships/profiles", {"page[size]": "101"}, "page[size]", None),
        ("relationships/profiles", {"fields[profile]": "email"}, "fields[profile]", None),
        (
            "",
            {"include": "profiless"},
            "include",
            "'profiless' is not an allowed include parameter for this resource.",
        ),
        ("", {"fields[segment]": "nope"}, "fields[segment]", None),
        ("", {"additional-fields[segment]": "member_count"}, "additional-fields[segment]", None),
        ("tags", {"fields[tag]": "color"}, "fields[tag]", None),
        ("relationships/tags", {"page[size]": "5"}, "page[size]", None),
    ],
)
def test_bad_parameters_on_segment_paths(
    client: Any,
    tools: Any,
    sim_account: Any,
    path: str,
    params: dict[str, Any],
    parameter: str,
    detail: str | None,
) -> None:
    sid = tools.largest_segment(sim_account)
    url = f"/api/segments/{sid}/{path}" if path else f"/api/segments/{sid}"
    resp = client.get(url, params)
    assert resp.status_code == 400, resp.text
    err = resp.json()["errors"][0]
    assert err["code"] == "invalid" and err["title"] == "Invalid input."
    assert err["status"] == 400 and err["source"] == {"parameter": parameter}
    assert err["meta"] == {}
    if detail:
        assert err["detail"] == detail


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/api/segments", {"page[size]": "11"}, "page[size]"),
        ("/api/segments", {"sort": "profile_count"}, "sort"),
        ("/api/segments", {"filter": 'equals(is_active,"yes")'}, "filter"),
        ("/api/segments", {"filter": 'greater-than(name,"a")'}, "filter"),
        ("/api/segments", {"filter": "any(is_starred,[true])"}, "filter"),
        ("/api/segments", {"filter": "less-than(created,2025-01-01)"}, "filter"),
        ("/api/segments", {"fields[flow]": "colour"}, "fields[flow]"),
        ("/api/tags", {"page[size]": "51"}, "page[size]"),
        ("/api/tags", {"filter": 'any(name,["x"])'}, "filter"),
        ("/api/tags", {"include": "segments"}, "include"),
        ("/api/tags", {"sort": "created"}, "sort"),
        ("/api/tags", {"fields[tag-group]": "colour"}, "fields[tag-group]"),
    ],
)
def test_bad_parameters_on_lists(
    client: Any, path: str, params: dict[str, Any], parameter: str
) -> None:
    resp = client.get(path, params)
    assert resp.status_code == 400, resp.text
    err = resp.json()["errors"][0]
    assert err["code"] == "invalid" and err["source"] == {"parameter": parameter}


def test_bad_cursors(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    path = f"/api/segments/{sid}/profiles"
    other = client.get("/api/segments", {"page[size]": 2}).json()["links"]["next"]
    foreign = other.rsplit("page%5Bcursor%5D=", 1)[1]
    sorted_next = client.get(path, {"sort": "joined_group_at"}).json()["links"]["next"]
    sorted_cursor = sorted_next.rsplit("page%5Bcursor%5D=", 1)[1]
    for cursor, extra in [
        ("not-a-cursor!!", {}),
        ("", {}),
        (foreign, {}),
        ("WyJ4Il0", {}),
        (sorted_cursor, {"sort": "-joined_group_at"}),
    ]:
        resp = client.get(path, {**extra, "page[cursor]": cursor})
        assert resp.status_code == 400
        err = resp.json()["errors"][0]
        assert err["detail"] == "Invalid cursor provided."
        assert err["source"] == {"pointer": "/data/"}


def test_unknown_segment_is_404(client: Any) -> None:
    for suffix in ("", "/profiles", "/relationships/profiles", "/tags", "/relationships/tags"):
        resp = client.get(f"/api/segments/ZZZZZZ{suffix}")
        assert resp.status_code == 404
        err = resp.json()["errors"][0]
        assert err["code"] == "not_found" and err["status"] == 404


def test_default_page_sizes_and_kx(client: Any, tools: Any, sim_account: Any) -> None:
    from klaviyo_source.simulator.api import exchange_id

    sid = tools.largest_segment(sim_account)
    assert len(client.get(f"/api/segments/{sid}/profiles").json()["data"]) == 20
    assert len(client.get(f"/api/segments/{sid}/relationships/profiles").json()["data"]) == 20
    segments = client.get("/api/segments").json()
    assert len(segments["data"]) == min(10, len(sim_account.segments()))
    assert len(client.get("/api/tags").json()["data"]) == min(50, len(sim_account.tags()))
    pid = sorted(sim_account.members(sid))[5]
    got = _ids(
        client,
        tools,
        f"/api/segments/{sid}/profiles",
        {"filter": f'equals(_kx,"{exchange_id(pid)}")'},
    )
    assert got == [pid]
