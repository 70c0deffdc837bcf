"""Rate limits trip at Klaviyo's published numbers, per account, with the documented headers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from klaviyo_source.simulator import ALL_SCOPES, KlaviyoSimulator, generate_account
from klaviyo_source.simulator.rate_limits import Charge, RateLimiter, tier_windows


class FakeClock:
    """Monotonic seconds under the test's control."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limited(clock: FakeClock) -> Iterator[KlaviyoSimulator]:
    account = generate_account(seed=9, segments=4, tags=3, profiles=120, memberships=300)
    keys = {"pk_one": set(ALL_SCOPES), "pk_two": set(ALL_SCOPES)}
    with KlaviyoSimulator(account, api_keys=keys, rate_limit_clock=clock) as sim:
        yield sim


def _assert_throttled(resp: requests.Response, retry_after: int) -> None:
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == str(retry_after)
    assert not any(h.lower().startswith("ratelimit-") for h in resp.headers)
    err = resp.json()["errors"][0]
    assert err["code"] == "throttled" and err["status"] == 429
    assert err["detail"] == f"Request was throttled. Expected available in {retry_after} seconds."
    assert err["source"] == {"pointer": "/data/"}


def test_large_tier_burst_then_steady(
    limited: KlaviyoSimulator, clock: FakeClock, tools: Any
) -> None:
    client = tools.Client(limited, key="pk_one")
    clock.t += 0.5
    remaining = []
    for _ in range(75):
        resp = client.get("/api/segments")
        assert resp.status_code == 200
        remaining.append(int(resp.headers["RateLimit-Remaining"]))
        assert resp.headers["RateLimit-Limit"] == "750"
        assert resp.headers["RateLimit-Reset"] == "60"
    assert remaining == list(range(749, 674, -1))
    _assert_throttled(client.get("/api/segments"), 1)
    for second in range(1, 10):  # 9 more bursts of 75 within the same minute
        clock.t += 1
        statuses = [client.get("/api/segments").status_code for _ in range(75)]
        assert statuses == [200] * 75, second
    clock.t += 1  # 10.5 s into the minute: burst is fresh but the steady 750 is spent
    resp = client.get("/api/segments")
    _assert_throttled(resp, 50)
    clock.t += 50  # next minute
    resp = client.get("/api/segments")
    assert resp.status_code == 200 and resp.headers["RateLimit-Remaining"] == "749"


def test_small_tier_and_write_tiers(
    limited: KlaviyoSimulator, clock: FakeClock, tools: Any
) -> None:
    client = tools.Client(limited, key="pk_one")
    clock.t += 0.25
    sid = next(iter(limited.account.segments()))
    for path in (
        "/api/tags",
        f"/api/segments/{sid}/tags",
        f"/api/segments/{sid}/relationships/tags",
    ):
        assert [client.get(path).status_code for _ in range(3)] == [200] * 3
        _assert_throttled(client.get(path), 1)  # each endpoint has its own S budget
    assert client.get("/api/tags").headers.get("RateLimit-Limit") is None  # still throttled
    definition = {
        "condition_groups": [
            {
                "conditions": [
                    {"type": "profile-region", "in_region": True, "region": "united_states"}
                ]
            }
        ]
    }

    def create(i: int) -> requests.Response:
        return client.request(
            "POST",
            "/api/segments",
            json={
                "data": {
                    "type": "segment",
                    "attributes": {"name": f"s{i}", "definition": definition},
                }
            },
        )

    first = create(0)
    assert first.status_code == 201 and first.headers["RateLimit-Limit"] == "15"
    _assert_throttled(create(1), 1)  # 1 per second
    for i in range(1, 15):
        clock.t += 1
        assert create(i).status_code == 201
    clock.t += 1
    _assert_throttled(create(99), 45)  # 15 per minute: 15.25 s into the window
    made = 15
    while made < 100:  # 100 per day
        clock.t += 60
        for _ in range(15):
            clock.t += 1.01
            if made < 100:
                assert create(made).status_code == 201
                made += 1
    clock.t += 60
    resp = create(100)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) > 3600
    # delete: 3/s
    victims = list(limited.account.segments())[:4]
    assert [client.request("DELETE", f"/api/segments/{v}").status_code for v in victims[:3]] == [
        204
    ] * 3
    _assert_throttled(client.request("DELETE", f"/api/segments/{victims[3]}"), 1)


def test_additional_fields_buckets_are_global(
    limited: KlaviyoSimulator, clock: FakeClock, tools: Any
) -> None:
    client = tools.Client(limited, key="pk_one")
    clock.t += 0.5
    a, b = list(limited.account.segments())[:2]
    count = {"additional-fields[segment]": "profile_count"}
    assert client.get(f"/api/segments/{a}", count).status_code == 200
    _assert_throttled(client.get(f"/api/segments/{b}", count), 1)  # XS: 1/s for all segments
    assert client.get(f"/api/segments/{b}").status_code == 200  # plain reads unaffected
    for _ in range(14):
        clock.t += 1
        assert client.get(f"/api/segments/{a}", count).status_code == 200
    clock.t += 1
    _assert_throttled(client.get(f"/api/segments/{a}", count), 45)  # XS: 15/min
    predictive = {"additional-fields[profile]": "predictive_analytics"}
    path = f"/api/segments/{a}/profiles"
    assert [client.get(path, predictive).status_code for _ in range(10)] == [200] * 10
    _assert_throttled(client.get(path, predictive), 1)  # M: 10/s
    assert client.get(path, {"additional-fields[profile]": "subscriptions"}).status_code == 200


def test_keys_share_the_account_budget(
    limited: KlaviyoSimulator, clock: FakeClock, tools: Any
) -> None:
    one, two = tools.Client(limited, key="pk_one"), tools.Client(limited, key="pk_two")
    clock.t += 0.5
    assert [
        one.get("/api/tags").status_code,
        two.get("/api/tags").status_code,
        one.get("/api/tags").status_code,
    ] == [200, 200, 200]
    _assert_throttled(two.get("/api/tags"), 1)


def test_switch_and_time_scale(clock: FakeClock, tools: Any) -> None:
    account = generate_account(seed=9, segments=3, tags=2, profiles=40, memberships=60)
    with KlaviyoSimulator(account, time_scale=60, rate_limit_clock=clock) as sim:
        client = tools.Client(sim)
        sim.rate_limits_enabled = False
        # The clock stands still, so with limits on the 4th of these would be throttled.
        assert all(client.get("/api/tags").status_code == 200 for _ in range(30))
        sim.rate_limits_enabled = True
        # At 60x the S tier's 1 s burst window lasts 1/60 s and its 60 s steady window 1 s.
        # Requests 1/64 s apart put at most two in a burst window, so the steady limit of 60
        # is the one reached; 1/64 and its multiples are exact in floating point.
        for sent in range(60):
            resp = client.get("/api/tags")
            assert resp.status_code == 200
            assert resp.headers["RateLimit-Remaining"] == str(59 - sent)  # none counted while off
            clock.t += 1 / 64
        _assert_throttled(client.get("/api/tags"), 1)  # 0.9375 s into the 1 s window
        clock.t += 0.0625  # exactly one scaled minute after the first request
        ok = client.get("/api/tags")
        assert ok.status_code == 200
        assert ok.headers["RateLimit-Remaining"] == "59"
        assert ok.headers["RateLimit-Reset"] == "1"


def test_limiter_windows_unit(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    charge = [Charge("x", tier_windows("S"))]
    clock.t += 0.9
    assert [limiter.check(charge).allowed for _ in range(4)] == [True, True, True, False]
    blocked = limiter.check(charge)
    assert blocked.retry_after == 1  # ceil(0.1 s)
    clock.t += 0.2  # next burst window; throttled requests were not counted
    allowed = limiter.check(charge)
    assert allowed.allowed and allowed.remaining == 60 - 4
    scaled = RateLimiter(clock=clock, time_scale=10)
    decision = scaled.check(charge)
    assert decision.allowed and decision.reset == 6  # a 60 s window lasts 6 s at 10x
    assert tier_windows("L", 700)[1].limit == 700 and tier_windows("XL")[0].limit == 350


def test_sliding_windows_count_the_last_window_whatever_its_alignment(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, windows="sliding")
    charge = [Charge("x", tier_windows("S"))]
    clock.t += 0.9
    assert [limiter.check(charge).allowed for _ in range(3)] == [True, True, True]
    clock.t += 0.2  # past where a fixed burst window would have started again
    blocked = limiter.check(charge)
    assert not blocked.allowed and blocked.retry_after == 1  # the oldest leaves in 0.8 s
    clock.t += 0.81
    allowed = limiter.check(charge)
    assert allowed.allowed and allowed.remaining == 60 - 4
    # Reset: until the oldest counted request (at 0.9 s) leaves the steady window at 60.9 s.
    assert allowed.reset == 59  # 58.99 s on
    clock.t += 58.5
    assert limiter.check(charge).reset == 1
    with pytest.raises(ValueError, match="windows"):
        RateLimiter(clock=clock, windows="rolling")


def test_sliding_windows_over_http_throttle_until_the_oldest_request_leaves(
    clock: FakeClock, tools: Any
) -> None:
    account = generate_account(seed=9, segments=3, tags=2, profiles=40, memberships=60)
    with KlaviyoSimulator(account, rate_limit_clock=clock, windows="sliding") as sim:
        client = tools.Client(sim)
        clock.t += 0.5
        assert [client.get("/api/tags").status_code for _ in range(3)] == [200] * 3
        clock.t += 0.75  # a fixed window would have let three more through at 1.0 s
        _assert_throttled(client.get("/api/tags"), 1)
        clock.t += 0.25
        ok = client.get("/api/tags")
        assert ok.status_code == 200 and ok.headers["RateLimit-Remaining"] == "56"
        assert [c.bucket for c in sim.limiter.charged] == ["get_tags"] * 4
