"""Every kind of simulator response validates against the official 2026-07-15 schema (with only
the two documented spec gaps tolerated)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from klaviyo_source.simulator import KlaviyoSimulator


def test_tolerance_is_limited_to_the_documented_gaps(
    tools: Any, schema: Any, raw_spec: Any
) -> None:
    """The shipped examples fail the raw spec only on null links and null lat/long."""
    from openapi_schema_validator import OAS30Validator

    example = json.loads((tools.EXAMPLES / "segment-profiles-page.json").read_text())
    path = "/api/segments/{id}/profiles"
    raw_schema = schema.schema_for(path, "get", 200)
    validator = OAS30Validator({"components": raw_spec["components"], **raw_schema})
    failing = {tuple(e.path)[-1] for e in validator.iter_errors(example)}
    assert failing == {"prev", "latitude", "longitude"}
    schema.check(example, path, "get", 200)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"include": "tags"},
        {"include": "tags,flow-triggers", "fields[tag]": "name"},
        {"page[size]": 3, "sort": "-updated"},
    ],
)
def test_get_segments(client: Any, schema: Any, params: dict[str, Any]) -> None:
    resp = client.get("/api/segments", params)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/vnd.api+json"
    body = resp.json()
    assert body["data"]
    schema.check(body, "/api/segments", "get", 200)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"additional-fields[segment]": "profile_count"},
        {"include": "tags,flow-triggers", "additional-fields[segment]": "profile_count"},
    ],
)
def test_get_segment(
    client: Any, tools: Any, sim_account: Any, schema: Any, params: dict[str, Any]
) -> None:
    sid = tools.largest_segment(sim_account)
    resp = client.get(f"/api/segments/{sid}", params)
    assert resp.status_code == 200
    body = resp.json()
    assert body["data"]["id"] == sid
    schema.check(body, "/api/segments/{id}", "get", 200)


@pytest.mark.parametrize(
    "params",
    [
        {"page[size]": 100},
        {
            "page[size]": 100,
            "sort": "-joined_group_at",
            "additional-fields[profile]": "subscriptions,predictive_analytics",
        },
    ],
)
def test_get_segment_profiles(
    client: Any, tools: Any, sim_account: Any, schema: Any, params: dict[str, Any]
) -> None:
    sid = tools.largest_segment(sim_account)
    pages = client.walk(f"/api/segments/{sid}/profiles", params)
    assert len(pages) > 3
    for page in pages[:3] + pages[-1:]:
        schema.check(page, "/api/segments/{id}/profiles", "get", 200)


def test_get_segment_relationships(client: Any, tools: Any, sim_account: Any, schema: Any) -> None:
    sid = tools.largest_segment(sim_account)
    resp = client.get(f"/api/segments/{sid}/relationships/profiles", {"page[size]": 50})
    schema.check(resp.json(), "/api/segments/{id}/relationships/profiles", "get", 200)
    tagged = next(s for s, _ in sim_account.segment_tags())
    resp = client.get(f"/api/segments/{tagged}/tags")
    assert resp.json()["data"]
    schema.check(resp.json(), "/api/segments/{id}/tags", "get", 200)
    resp = client.get(f"/api/segments/{tagged}/relationships/tags")
    assert resp.json()["data"]
    schema.check(resp.json(), "/api/segments/{id}/relationships/tags", "get", 200)


@pytest.mark.parametrize("params", [{}, {"include": "tag-group"}, {"page[size]": 2}])
def test_get_tags(client: Any, schema: Any, params: dict[str, Any]) -> None:
    resp = client.get("/api/tags", params)
    assert resp.status_code == 200
    body = resp.json()
    assert body["data"]
    if params.get("include"):
        assert body["included"][0]["type"] == "tag-group"
    schema.check(body, "/api/tags", "get", 200)


def test_writes(fresh: Any, schema: Any, spec: Any) -> None:
    from openapi_schema_validator import OAS30Validator

    definition = {
        "condition_groups": [
            {
                "conditions": [
                    {"type": "profile-region", "in_region": True, "region": "united_states"}
                ]
            }
        ]
    }
    payload = {"data": {"type": "segment", "attributes": {"name": "US", "definition": definition}}}
    request_schema = spec["paths"]["/api/segments"]["post"]["requestBody"]["content"][
        "application/vnd.api+json"
    ]["schema"]
    OAS30Validator({"components": spec["components"], **request_schema}).validate(payload)
    resp = fresh.request("POST", "/api/segments", json=payload)
    assert resp.status_code == 201
    schema.check(resp.json(), "/api/segments", "post", 201)
    sid = resp.json()["data"]["id"]
    patch = {"data": {"type": "segment", "id": sid, "attributes": {"name": "US only"}}}
    resp = fresh.request("PATCH", f"/api/segments/{sid}", json=patch)
    assert resp.status_code == 200
    schema.check(resp.json(), "/api/segments/{id}", "patch", 200)


def _error_cases(
    sim: KlaviyoSimulator, tools: Any, sid: str
) -> list[tuple[str, requests.Response]]:
    good = tools.Client(sim)
    no_scope = tools.Client(sim, key="pk_ro")
    out = [
        ("400", good.get("/api/segments", {"filter": "equals(name,bare)"})),
        ("400", good.get(f"/api/segments/{sid}/profiles", {"page[size]": 101})),
        ("400", good.get("/api/tags", {"page[cursor]": "garbage!"})),
        ("401", requests.get(sim.base_url + "/api/segments", headers={"revision": "2026-07-15"})),
        ("401", tools.Client(sim, key="pk_unknown").get("/api/segments")),
        ("403", no_scope.get(f"/api/segments/{sid}/profiles")),
        ("404", good.get("/api/segments/NOPE00")),
        ("404", good.get("/api/nothing-here")),
        ("405", good.request("PUT", "/api/segments")),
        ("406", good.get("/api/segments", headers={"Accept": "text/html"})),
        (
            "409",
            good.request(
                "PATCH",
                f"/api/segments/{sid}",
                json={"data": {"type": "segment", "id": "other", "attributes": {}}},
            ),
        ),
        (
            "415",
            good.request("POST", "/api/segments", data="x", headers={"Content-Type": "text/plain"}),
        ),
    ]
    return out


def test_error_bodies(tools: Any, sim_account: Any, schema: Any) -> None:
    keys = {
        "pk_all": {"segments:read", "segments:write", "profiles:read", "tags:read"},
        "pk_ro": {"segments:read"},
    }
    sid = tools.largest_segment(sim_account)
    # The limits' clock stands still: every request falls in the same windows, however
    # slowly a loaded machine sends them.
    with KlaviyoSimulator(
        sim_account, api_keys=keys, rate_limits=True, rate_limit_clock=lambda: 1000.0
    ) as sim:
        for expected, resp in _error_cases(sim, tools, sid):
            assert str(resp.status_code) == expected, resp.text
            assert resp.headers["Content-Type"] == "application/vnd.api+json"
            body = resp.json()
            schema.check(body, "/api/segments", "get", resp.status_code)
            err = body["errors"][0]
            assert err["status"] == resp.status_code
            assert isinstance(err["id"], str) and err["title"] and err["detail"]
        # 429 from a real limit: S tier allows 3 per burst window on /api/tags, and the
        # bad-cursor request above already spent one of them
        client = tools.Client(sim)
        answers = [client.get("/api/tags") for _ in range(8)]
        assert [r.status_code for r in answers] == [200] * 2 + [429] * 6
        throttled = answers[2:]
        schema.check(throttled[0].json(), "/api/tags", "get", 429)


def test_server_error_bodies(fresh_sim: KlaviyoSimulator, fresh: Any, schema: Any) -> None:
    for status in (500, 503):
        fresh_sim.inject_fault("status", status=status)
        resp = fresh.get("/api/segments")
        assert resp.status_code == status
        schema.check(resp.json(), "/api/segments", "get", status)
    fresh_sim.inject_fault("throttle", retry_after=2)
    resp = fresh.get("/api/segments")
    assert resp.status_code == 429
    schema.check(resp.json(), "/api/segments", "get", 429)
