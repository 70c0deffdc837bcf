"""Auth, revision header, routing, media types, writes, counters and the request log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from klaviyo_source.simulator import ALL_SCOPES, KlaviyoSimulator


def _error(resp: requests.Response) -> dict[str, Any]:
    assert resp.headers["Content-Type"] == "application/vnd.api+json"
    body = resp.json()
    assert list(body) == ["errors"] and len(body["errors"]) == 1
    return body["errors"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "header",
    [None, "Bearer pk_whatever", "pk_raw_key", "Klaviyo-API-Key", "klaviyo-api-key pk_x"],
)
def test_missing_or_wrong_scheme_is_401(
    sim: KlaviyoSimulator, tools: Any, header: str | None
) -> None:
    headers = {"revision": tools.REVISION}
    if header is not None:
        headers["Authorization"] = header
    resp = requests.get(sim.base_url + "/api/segments", headers=headers, timeout=10)
    assert resp.status_code == 401
    expected = json.loads((tools.EXAMPLES / "error-401-not-authenticated.json").read_text())
    body = resp.json()
    body["errors"][0]["id"] = expected["errors"][0]["id"]
    assert body == expected


def test_unknown_key_is_401_authentication_failed(sim: KlaviyoSimulator, tools: Any) -> None:
    err = _error(tools.Client(sim, key="pk_not_a_key").get("/api/segments"))
    assert err["status"] == 401 and err["code"] == "authentication_failed"


def test_missing_scope_is_403_naming_it(sim_account: Any, tools: Any) -> None:
    keys = {"pk_seg": {"segments:read"}, "pk_all": set(ALL_SCOPES)}
    sid = tools.largest_segment(sim_account)
    with KlaviyoSimulator(sim_account, api_keys=keys, rate_limits=False) as sim:
        assert sim.api_key in keys
        seg_only = tools.Client(sim, key="pk_seg")
        assert seg_only.get("/api/segments").status_code == 200
        for path, scope in [
            (f"/api/segments/{sid}/profiles", "profiles:read"),
            (f"/api/segments/{sid}/tags", "tags:read"),
            ("/api/tags", "tags:read"),
        ]:
            resp = seg_only.get(path)
            assert resp.status_code == 403
            err = _error(resp)
            assert err["code"] == "permission_denied" and scope in err["detail"]
        resp = seg_only.request("DELETE", f"/api/segments/{sid}")
        assert resp.status_code == 403 and "segments:write" in _error(resp)["detail"]
        assert tools.Client(sim, key="pk_all").get(f"/api/segments/{sid}/tags").status_code == 200


@pytest.mark.parametrize(
    ("revision", "status", "parameter"),
    [
        (None, 400, "revision"),
        ("", 400, "revision"),
        ("July 2026", 400, "revision"),
        ("2026-7-15", 400, "revision"),
        ("2026-02-30", 400, "revision"),
        ("2026-07-14", 404, None),
        ("2024-06-15.pre", 404, None),
        ("2099-01-15", 404, None),
    ],
)
def test_revision_header(
    sim: KlaviyoSimulator, tools: Any, revision: str | None, status: int, parameter: str | None
) -> None:
    headers = {"Authorization": f"Klaviyo-API-Key {sim.api_key}"}
    if revision is not None:
        headers["revision"] = revision
    resp = requests.get(sim.base_url + "/api/segments", headers=headers, timeout=10)
    assert resp.status_code == status
    err = _error(resp)
    if parameter:
        assert err["code"] == "invalid" and err["source"] == {"parameter": parameter}
    else:
        assert err["code"] == "not_found"
        assert (
            "No valid revisions found for method" in err["detail"]
            or "future revision" in err["detail"]
        )


def test_revision_differences(sim: KlaviyoSimulator, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    old, mid, new = (
        tools.Client(sim, revision=r) for r in ("2024-06-15", "2025-04-15", "2026-07-15")
    )
    rel = f"/api/segments/{sid}/relationships/profiles"
    assert len(old.get(rel, {"page[size]": 1000}).json()["data"]) == min(
        1000, sim_account.profile_count(sid)
    )
    assert mid.get(rel, {"page[size]": 101}).status_code == 400
    assert new.get(rel, {"page[size]": 100}).status_code == 200
    pid = sorted(sim_account.members(sid))[0]
    profile_filter = {"filter": f'equals(profile_id,"{pid}")'}
    assert mid.get(f"/api/segments/{sid}/profiles", profile_filter).status_code == 400
    assert [
        i["id"] for i in new.get(f"/api/segments/{sid}/profiles", profile_filter).json()["data"]
    ] == [pid]
    # page[size] on /api/segments and /api/tags only exists from 2026-04-15
    assert mid.get("/api/segments", {"page[size]": 5}).status_code == 400
    assert mid.get("/api/tags", {"page[size]": 5}).status_code == 400
    assert len(mid.get("/api/segments").json()["data"]) == min(10, len(sim_account.segments()))
    # flow-triggers appear in 2024-10-15; fields "id" in 2026-04-15
    assert old.get("/api/segments", {"include": "flow-triggers"}).status_code == 400
    assert "flow-triggers" not in old.get(f"/api/segments/{sid}").json()["data"]["relationships"]
    assert "flow-triggers" in mid.get(f"/api/segments/{sid}").json()["data"]["relationships"]
    assert mid.get("/api/tags", {"fields[tag]": "id"}).status_code == 400
    assert new.get("/api/tags", {"fields[tag]": "id"}).status_code == 200
    # 2024-06-15 has no mobile_push fields in fields[profile]
    field = {"fields[profile]": "subscriptions.mobile_push"}
    assert old.get(f"/api/segments/{sid}/profiles", field).status_code == 400
    assert new.get(f"/api/segments/{sid}/profiles", field).status_code == 200
    # the L tier's steady limit grew from 700/m to 750/m in 2026-01-15 (limits on: a server
    # without limits describes no window)
    assert "RateLimit-Limit" not in mid.get("/api/segments").headers
    sim.rate_limits_enabled = True
    try:
        assert mid.get("/api/segments").headers["RateLimit-Limit"] == "700"
        assert new.get("/api/segments").headers["RateLimit-Limit"] == "750"
    finally:
        sim.rate_limits_enabled = False  # the simulator serves the module's other tests


def test_routes_with_and_without_trailing_slash(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    for path in (
        "/api/segments",
        f"/api/segments/{sid}",
        f"/api/segments/{sid}/profiles",
        f"/api/segments/{sid}/relationships/profiles",
        f"/api/segments/{sid}/tags",
        f"/api/segments/{sid}/relationships/tags",
        "/api/tags",
    ):
        assert client.get(path).status_code == 200
        assert client.get(path + "/").status_code == 200
        assert client.get(path + "//").status_code == 404
    for path in ("/api/lists", "/api", "/api/segments/x/y", "/segments", "/api/tags/abc"):
        resp = client.get(path)
        assert resp.status_code == 404 and _error(resp)["code"] == "not_found"


def test_wrong_method_is_405(client: Any, tools: Any, sim_account: Any) -> None:
    sid = tools.largest_segment(sim_account)
    for method, path, allow in [
        ("PUT", "/api/segments", "GET, POST"),
        ("DELETE", "/api/tags", "GET"),
        ("POST", f"/api/segments/{sid}/profiles", "GET"),
        ("PUT", f"/api/segments/{sid}", "DELETE, GET, PATCH"),
    ]:
        resp = client.request(method, path)
        assert resp.status_code == 405
        assert resp.headers["Allow"] == allow
        assert _error(resp)["code"] == "method_not_allowed"


def test_accept_headers(client: Any) -> None:
    for accept in (
        "application/json",
        "application/vnd.api+json",
        "*/*",
        "text/html, application/json;q=0.9",
    ):
        assert client.get("/api/tags", headers={"Accept": accept}).status_code == 200
    resp = client.get("/api/tags", headers={"Accept": "text/csv"})
    assert resp.status_code == 406


def test_create_update_delete(fresh_sim: KlaviyoSimulator, fresh: Any) -> None:
    account = fresh_sim.account
    definition = {
        "condition_groups": [
            {
                "conditions": [
                    {
                        "type": "profile-property",
                        "property": "properties['Loyalty Tier']",
                        "filter": {"type": "string", "operator": "equals", "value": "Gold"},
                    }
                ]
            }
        ]
    }
    body = {
        "data": {
            "type": "segment",
            "attributes": {"name": "Gold 🥇", "definition": definition, "is_starred": True},
        }
    }
    resp = fresh.request(
        "POST", "/api/segments/", json=body, headers={"Content-Type": "application/vnd.api+json"}
    )
    assert resp.status_code == 201
    sid = resp.json()["data"]["id"]
    assert resp.headers["Location"].endswith(f"/api/segments/{sid}/")
    truth = account.segments()[sid]
    assert truth["name"] == "Gold 🥇" and truth["is_starred"] and truth["definition"] == definition
    created_updated = truth["updated"]
    patch = {"data": {"type": "segment", "id": sid, "attributes": {"name": "Gold"}}}
    resp = fresh.request("PATCH", f"/api/segments/{sid}", json=patch)
    assert resp.status_code == 200 and resp.json()["data"]["attributes"]["name"] == "Gold"
    assert account.segments()[sid]["updated"] >= created_updated
    deactivate = {"data": {"type": "segment", "id": sid, "attributes": {"is_active": False}}}
    assert fresh.request("PATCH", f"/api/segments/{sid}", json=deactivate).status_code == 200
    assert account.segments()[sid]["is_active"] is False
    resp = fresh.request("DELETE", f"/api/segments/{sid}")
    assert resp.status_code == 204 and resp.content == b""
    assert sid not in account.segments()
    assert fresh.get(f"/api/segments/{sid}").status_code == 404
    assert fresh.request("DELETE", f"/api/segments/{sid}").status_code == 404


@pytest.mark.parametrize(
    ("method", "body", "content_type", "status"),
    [
        ("POST", b"{}", "text/plain", 415),
        ("POST", b"{}", None, 415),
        ("POST", b"{not json", "application/json", 400),
        ("POST", {"data": {"type": "list", "attributes": {"name": "x"}}}, None, 400),
        ("POST", {"data": {"type": "segment", "attributes": {"name": "x"}}}, None, 400),
        (
            "POST",
            {
                "data": {
                    "type": "segment",
                    "attributes": {"name": "", "definition": {"condition_groups": []}},
                }
            },
            None,
            400,
        ),
        (
            "POST",
            {
                "data": {
                    "type": "segment",
                    "attributes": {
                        "name": "x",
                        "definition": {
                            "condition_groups": [{"conditions": [{"type": "astrology"}]}]
                        },
                    },
                }
            },
            None,
            400,
        ),
        (
            "POST",
            {
                "data": {
                    "type": "segment",
                    "attributes": {
                        "name": "x",
                        "colour": "red",
                        "definition": {
                            "condition_groups": [
                                {
                                    "conditions": [
                                        {
                                            "type": "profile-region",
                                            "in_region": True,
                                            "region": "united_states",
                                        }
                                    ]
                                }
                            ]
                        },
                    },
                }
            },
            None,
            400,
        ),
        (
            "PATCH",
            {
                "data": {
                    "type": "segment",
                    "id": "SID",
                    "attributes": {"is_active": False, "name": "also renaming"},
                }
            },
            None,
            400,
        ),
        ("PATCH", {"data": {"type": "segment", "id": "other", "attributes": {}}}, None, 409),
        (
            "PATCH",
            {"data": {"type": "segment", "id": "SID", "attributes": {"is_starred": "yes"}}},
            None,
            400,
        ),
    ],
)
def test_write_validation(
    fresh: Any,
    fresh_sim: KlaviyoSimulator,
    method: str,
    body: Any,
    content_type: str | None,
    status: int,
) -> None:
    sid = next(iter(fresh_sim.account.segments()))
    path = "/api/segments" if method == "POST" else f"/api/segments/{sid}"
    before = fresh_sim.account.segments()
    data = body if isinstance(body, bytes) else json.dumps(body).replace("SID", sid).encode()
    headers = {"Content-Type": content_type or "application/json"}
    if content_type is None and isinstance(body, bytes) and status == 415:
        headers = {"Content-Type": ""}
    resp = fresh.request(method, path, data=data, headers=headers)
    assert resp.status_code == status, resp.text
    assert _error(resp)["status"] == status
    assert fresh_sim.account.segments() == before


def test_write_revision_and_scope(fresh_sim: KlaviyoSimulator, tools: Any) -> None:
    sid = next(iter(fresh_sim.account.segments()))
    old = tools.Client(fresh_sim, revision="2024-02-15")
    resp = old.request("DELETE", f"/api/segments/{sid}")
    assert resp.status_code == 404 and "No valid revisions" in _error(resp)["detail"]
    assert sid in fresh_sim.account.segments()


def test_counters_and_request_log(fresh_sim: KlaviyoSimulator, fresh: Any) -> None:
    fresh_sim.reset_counters()
    sid = next(iter(fresh_sim.account.segments()))
    fresh.get("/api/segments", {"page[size]": 2})
    fresh.get(f"/api/segments/{sid}")
    fresh.get(f"/api/segments/{sid}/profiles")
    fresh.get(f"/api/segments/{sid}/profiles", {"page[size]": 500})
    fresh.get(f"/api/segments/{sid}/relationships/profiles")
    fresh.get(f"/api/segments/{sid}/tags")
    fresh.get(f"/api/segments/{sid}/relationships/tags")
    fresh.get("/api/tags")
    fresh.get("/api/nowhere")
    assert dict(fresh_sim.counters) == {
        "get_segments": 1,
        "get_segment": 1,
        "get_segment_profiles": 2,
        "get_segment_relationships_profiles": 1,
        "get_segment_tags": 1,
        "get_segment_relationships_tags": 1,
        "get_tags": 1,
    }
    log = fresh_sim.request_log
    assert len(log) == 9
    first = log[0]
    assert (
        first.method,
        first.path,
        first.query,
        first.status,
        first.operation,
        first.api_key,
    ) == ("GET", "/api/segments", {"page[size]": "2"}, 200, "get_segments", fresh_sim.api_key)
    assert log[3].status == 400 and log[-1].status == 404 and log[-1].operation is None
    assert all(a.timestamp <= b.timestamp for a, b in zip(log, log[1:], strict=False))
    fresh_sim.reset_counters()
    assert not fresh_sim.counters and not fresh_sim.request_log


def test_standalone_cli(tools: Any) -> None:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "klaviyo_source.simulator",
            "--port",
            "0",
            "--seed",
            "3",
            "--profiles",
            "50",
            "--memberships",
            "120",
            "--segments",
            "4",
            "--tags",
            "2",
            "--api-key",
            "pk_cli_test",
            "--no-rate-limits",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip().split("=", 1)[1]
        key = proc.stdout.readline().strip().split("=", 1)[1]
        assert base.startswith("http://127.0.0.1:") and key == "pk_cli_test"
        resp = requests.get(
            base + "/api/segments",
            timeout=10,
            headers={"Authorization": f"Klaviyo-API-Key {key}", "revision": tools.REVISION},
        )
        assert resp.status_code == 200 and len(resp.json()["data"]) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
