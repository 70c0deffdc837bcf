"""Walking every page of every endpoint returns exactly the account's ground truth, including
across ties on joined_group_at and while the account changes between pages."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest


def test_segments_walk_matches_truth(client: Any, tools: Any, sim_account: Any) -> None:
    truth = sim_account.segments()
    pages = client.walk("/api/segments", {"page[size]": 3, "include": "tags"})
    assert len(pages) == -(-len(truth) // 3)
    got = {item["id"]: item for item in tools.rows(pages)}
    assert len(got) == len(tools.rows(pages)) == len(truth)
    links = sim_account.segment_tags()
    for sid, attrs in truth.items():
        api = got[sid]["attributes"]
        assert api.keys() == attrs.keys()
        for name in ("name", "definition", "is_active", "is_processing", "is_starred"):
            assert api[name] == attrs[name]
        assert tools.parse_dt(api["created"]) == attrs["created"]
        assert tools.parse_dt(api["updated"]) == attrs["updated"]
        tag_data = got[sid]["relationships"]["tags"]["data"]
        assert {t["id"] for t in tag_data} == {t for s, t in links if s == sid}
    included = [inc for page in pages for inc in page["included"]]
    for page in pages:
        ids = [inc["id"] for inc in page["included"]]
        assert len(ids) == len(set(ids))  # each resource once per document
    tags = sim_account.tags()
    assert {inc["id"]: inc["attributes"]["name"] for inc in included} == {
        t: tags[t] for _, t in links
    }


@pytest.mark.parametrize("sort", [None, "name", "-name", "created", "-updated", "id", "-id"])
def test_segments_sort_orders(client: Any, sim_account: Any, sort: str | None) -> None:
    params = {"page[size]": 4} if sort is None else {"page[size]": 4, "sort": sort}
    items = [i for p in client.walk("/api/segments", params) for i in p["data"]]
    truth = sim_account.segments()
    field = (sort or "id").lstrip("-")

    def key(sid: str) -> Any:
        return (sid if field == "id" else truth[sid][field], sid)

    expected = sorted(truth, key=key, reverse=bool(sort and sort.startswith("-")))
    assert [i["id"] for i in items] == expected


def test_tags_walk_matches_truth(client: Any, tools: Any, sim_account: Any) -> None:
    pages = client.walk("/api/tags", {"page[size]": 2, "sort": "-name"})
    got = [(t["id"], t["attributes"]["name"]) for t in tools.rows(pages)]
    truth = sim_account.tags()
    assert dict(got) == truth and len(got) == len(truth)
    assert [n for _, n in got] == sorted(truth.values(), reverse=True)
    default = [t["id"] for t in tools.rows(client.walk("/api/tags"))]
    assert default == sorted(truth)


def test_segment_tags_match_truth(client: Any, sim_account: Any) -> None:
    links = sim_account.segment_tags()
    tags = sim_account.tags()
    for sid in sim_account.segments():
        expected = {t for s, t in links if s == sid}
        full = client.get(f"/api/segments/{sid}/tags").json()
        assert {t["id"]: t["attributes"]["name"] for t in full["data"]} == {
            t: tags[t] for t in expected
        }
        assert "next" not in full["links"]
        rel = client.get(f"/api/segments/{sid}/relationships/tags").json()
        assert {t["id"] for t in rel["data"]} == expected
        assert all(t["type"] == "tag" for t in rel["data"])


@pytest.mark.parametrize("sort", [None, "joined_group_at", "-joined_group_at"])
def test_members_walk_matches_truth(
    client: Any, tools: Any, sim_account: Any, sort: str | None
) -> None:
    params: dict[str, Any] = {"page[size]": 100}
    if sort:
        params["sort"] = sort
    for sid in sim_account.segments():
        truth = sim_account.members(sid)
        items = tools.rows(client.walk(f"/api/segments/{sid}/profiles", params))
        got = {i["id"]: tools.parse_dt(i["attributes"]["joined_group_at"]) for i in items}
        assert len(items) == len(got) == len(truth)
        assert got == truth
        order = [i["id"] for i in items]
        if sort is None:
            assert order == sorted(truth)  # default order: profile id
        else:
            expected = sorted(truth, key=lambda p: (truth[p], p), reverse=sort.startswith("-"))
            assert order == expected
        rel = tools.rows(client.walk(f"/api/segments/{sid}/relationships/profiles", params))
        assert [r["id"] for r in rel] == order
        assert all(r.keys() == {"type", "id"} for r in rel)


def test_ties_straddle_page_boundaries(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    truth = sim_account.members(sid)
    groups = Counter(truth.values())
    assert max(groups.values()) >= 150  # bulk imports
    pages = client.walk(
        f"/api/segments/{sid}/profiles", {"page[size]": 100, "sort": "joined_group_at"}
    )
    straddling = sum(
        1
        for a, b in zip(pages, pages[1:], strict=False)
        if b["data"]
        and a["data"][-1]["attributes"]["joined_group_at"]
        == b["data"][0]["attributes"]["joined_group_at"]
    )
    assert straddling >= 2
    ids = [i["id"] for i in tools.rows(pages)]
    assert len(ids) == len(set(ids)) == len(truth)


def test_profile_attributes_match_truth(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    truth = sim_account.profiles()
    items = tools.rows(
        client.walk(
            f"/api/segments/{sid}/profiles",
            {"page[size]": 100, "additional-fields[profile]": "subscriptions,predictive_analytics"},
        )
    )
    assert items
    for item in items:
        attrs = dict(item["attributes"])
        attrs.pop("joined_group_at")
        expected = tools.to_api_json(truth[item["id"]])
        assert tools.normalise_api(attrs, expected) == expected
        assert item["links"]["self"].endswith(f"/api/profiles/{item['id']}/")


def test_prev_links_walk_back(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    params = {"page[size]": 37, "sort": "-joined_group_at"}
    forward = client.walk(f"/api/segments/{sid}/profiles", params)
    assert forward[0]["links"]["prev"] is None
    backward = [forward[-1]]
    while backward[-1]["links"]["prev"]:
        backward.append(client.get(backward[-1]["links"]["prev"]).json())
    assert [[i["id"] for i in p["data"]] for p in reversed(backward)] == [
        [i["id"] for i in p["data"]] for p in forward
    ]


def test_pages_stay_consistent_while_the_account_changes(
    fresh_sim: Any, fresh: Any, tools: Any
) -> None:
    account = fresh_sim.account
    sid = tools.largest_segment(account)
    before = account.members(sid)
    newest = max(before.values())
    url = f"/api/segments/{sid}/profiles"
    resp = fresh.get(url, {"page[size]": 20, "sort": "joined_group_at"})
    seen: list[str] = [i["id"] for i in resp.json()["data"]]
    first_page = set(seen)
    outsiders = [account.add_profile(email=f"new{i}@example.com") for i in range(2)]
    # late-visible join (older than the newest member), a fresh join, a leave, a rejoin
    account.join(sid, outsiders[0], at=newest - timedelta(days=1))
    account.join(sid, outsiders[1])
    left = sorted(p for p in before if p not in first_page)[0]
    account.leave(sid, left)
    rejoined = seen[0]
    account.rejoin(sid, rejoined)
    nxt = resp.json()["links"]["next"]
    while nxt:
        doc = fresh.get(nxt).json()
        seen.extend(i["id"] for i in doc["data"])
        nxt = doc["links"]["next"]
    assert len(seen) - len(set(seen)) <= 1  # only the rejoined profile may appear twice
    assert seen.count(rejoined) == 2
    assert outsiders[0] in seen and outsiders[1] in seen and left not in seen
    stable = set(before) - {left}
    assert stable <= set(seen)  # nobody who stayed was lost
    # a full snapshot afterwards is the new truth
    snap = {
        i["id"]
        for i in tools.rows(
            fresh.walk(f"/api/segments/{sid}/relationships/profiles", {"page[size]": 100})
        )
    }
    assert snap == set(account.members(sid))
