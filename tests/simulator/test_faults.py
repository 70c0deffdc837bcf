"""Injected faults behave as specified and are still counted and logged."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import requests

from klaviyo_source.simulator import KlaviyoSimulator, generate_account


@pytest.mark.parametrize(("status", "html"), [(500, False), (503, False), (502, True), (504, True)])
def test_status_faults(fresh_sim: KlaviyoSimulator, fresh: Any, status: int, html: bool) -> None:
    fresh_sim.inject_fault("status", status=status)
    resp = fresh.get("/api/segments")
    assert resp.status_code == status
    if html:
        assert resp.headers["Content-Type"] == "text/html"
        assert f"<h1>{status}" in resp.text
    else:
        err = resp.json()["errors"][0]
        assert err["status"] == status and err["code"]
    assert fresh.get("/api/segments").status_code == 200  # times=1: gone afterwards
    json_body = fresh_sim.inject_fault("status", status=502, body="json")
    assert json_body.kind == "status"
    assert fresh.get("/api/segments").json()["errors"][0]["status"] == 502


def test_reset_closes_the_connection_mid_body(fresh_sim: KlaviyoSimulator, fresh: Any) -> None:
    fresh_sim.inject_fault("reset", path_contains="/api/tags")
    broken = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
    with pytest.raises(broken):
        fresh.get("/api/tags")
    # the raw view: headers arrive with the full Content-Length, then fewer bytes and a close
    fresh_sim.inject_fault("reset")
    port = int(fresh_sim.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Klaviyo-API-Key "
            f"{fresh_sim.api_key}\r\nrevision: 2026-07-15\r\n\r\n".encode()
        )
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    assert 0 < len(body) < length
    assert fresh.get("/api/tags").status_code == 200


def test_truncate_sends_half_a_json_body(fresh_sim: KlaviyoSimulator, fresh: Any) -> None:
    full = fresh.get("/api/segments").content
    fresh_sim.inject_fault("truncate")
    resp = fresh.get("/api/segments")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/vnd.api+json"
    assert int(resp.headers["Content-Length"]) == len(resp.content) == len(full) // 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.content)


def test_slow_delays_the_answer(fresh_sim: KlaviyoSimulator, fresh: Any) -> None:
    fresh_sim.inject_fault("slow", delay=0.4)
    start = time.perf_counter()
    assert fresh.get("/api/tags").status_code == 200
    assert time.perf_counter() - start >= 0.4
    with pytest.raises(requests.exceptions.ReadTimeout):
        fresh_sim.inject_fault("slow", delay=0.5)
        fresh.session.get(fresh.url("/api/tags"), timeout=0.1)


def test_throttle_storm_with_and_without_retry_after(
    fresh_sim: KlaviyoSimulator, fresh: Any
) -> None:
    fresh_sim.inject_fault("throttle", times=3, retry_after=4)
    answers = [fresh.get("/api/segments") for _ in range(4)]
    assert [r.status_code for r in answers] == [429, 429, 429, 200]
    assert answers[0].headers["Retry-After"] == "4"
    assert "Expected available in 4 seconds." in answers[0].json()["errors"][0]["detail"]
    fresh_sim.inject_fault("throttle", retry_after=None)
    resp = fresh.get("/api/segments")
    assert resp.status_code == 429 and "Retry-After" not in resp.headers
    assert resp.json()["errors"][0]["detail"] == "Request was throttled."


def test_matching_probability_counters_and_clear(tools: Any) -> None:
    account = generate_account(seed=4, segments=3, tags=2, profiles=30, memberships=40)
    with KlaviyoSimulator(account, rate_limits=False, fault_seed=1) as sim:
        client = tools.Client(sim)
        sim.inject_fault("status", times=2, path_contains="/api/tags", status=503)
        assert client.get("/api/segments").status_code == 200  # path does not match
        assert [client.get("/api/tags").status_code for _ in range(3)] == [503, 503, 200]
        assert sim.counters["get_tags"] == 3 and sim.counters["get_segments"] == 1
        assert [r for r, _ in sim.fault_log] == [r for r in sim.request_log if r.status == 503]
        assert [(r.status, r.operation, kind) for r, kind in sim.fault_log] == [
            (503, "get_tags", "status")
        ] * 2
        sim.inject_fault("status", times=1000, probability=0.5, status=500)
        statuses = [client.get("/api/tags").status_code for _ in range(60)]
        assert 10 < statuses.count(500) < 50 and statuses.count(200) > 10
        sim.clear_faults()
        assert all(client.get("/api/tags").status_code == 200 for _ in range(5))
        with pytest.raises(ValueError):
            sim.inject_fault("meteor")


def _first_profiles_page(client: Any, segment_id: str) -> requests.Response:
    return client.get(f"/api/segments/{segment_id}/profiles", {"page[size]": 20})


def test_relink_moves_only_the_next_link_to_the_other_origin(
    fresh_sim: KlaviyoSimulator, fresh: Any, tools: Any
) -> None:
    segment_id = tools.largest_segment(fresh_sim.account)
    honest = _first_profiles_page(fresh, segment_id).json()
    fresh_sim.inject_fault("relink", origin="http://127.0.0.1:9", path_contains="/profiles")

    relinked = _first_profiles_page(fresh, segment_id).json()

    assert relinked["data"] == honest["data"]
    assert relinked["links"]["self"] == honest["links"]["self"]
    assert relinked["links"]["next"] == honest["links"]["next"].replace(
        fresh_sim.base_url, "http://127.0.0.1:9"
    )
    assert _first_profiles_page(fresh, segment_id).json()["links"] == honest["links"]


def test_redirect_answers_307_to_the_same_path_and_query_on_the_other_origin(
    fresh_sim: KlaviyoSimulator, fresh: Any
) -> None:
    fresh_sim.inject_fault("redirect", origin="https://elsewhere.test:8443")

    moved = fresh.get("/api/tags?page%5Bsize%5D=5", allow_redirects=False)

    assert moved.status_code == 307 and moved.content == b""
    assert moved.headers["Location"] == "https://elsewhere.test:8443/api/tags?page%5Bsize%5D=5"


def test_a_404_fault_with_skip_hits_the_third_page_of_a_walk_only(
    fresh_sim: KlaviyoSimulator, fresh: Any, tools: Any
) -> None:
    segment_id = tools.largest_segment(fresh_sim.account)
    fresh_sim.inject_fault("status", status=404, skip=2, path_contains=f"/{segment_id}/profiles")
    answers = [_first_profiles_page(fresh, segment_id) for _ in range(4)]

    assert [answer.status_code for answer in answers] == [200, 200, 404, 200]
    error = answers[2].json()["errors"][0]
    assert (error["status"], error["code"]) == (404, "not_found")
    assert segment_id in fresh_sim.account.segments()


def test_delete_segment_deletes_it_as_the_matching_request_arrives(
    fresh_sim: KlaviyoSimulator, fresh: Any, tools: Any
) -> None:
    segment_id = tools.largest_segment(fresh_sim.account)
    fresh_sim.inject_fault(
        "delete_segment", segment_id=segment_id, skip=1, path_contains="/profiles"
    )

    assert _first_profiles_page(fresh, segment_id).status_code == 200
    assert segment_id in fresh_sim.account.segments()
    gone = _first_profiles_page(fresh, segment_id)

    assert gone.status_code == 404
    assert segment_id not in fresh_sim.account.segments()
    assert fresh.get(f"/api/segments/{segment_id}").status_code == 404


@pytest.mark.parametrize(
    ("kind", "options"),
    [("relink", {}), ("redirect", {}), ("delete_segment", {}), ("status", {"skip": -1})],
)
def test_faults_without_their_target_are_refused(
    fresh_sim: KlaviyoSimulator, kind: str, options: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        fresh_sim.inject_fault(kind, **options)
