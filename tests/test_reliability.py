"""Reliability: what Klaviyo answers, and where a run dies, must never lose or double a membership.

Every test speaks HTTP to the simulator and loads a real DuckDB file. Faults come from the
simulator's fault injection or from its enforcement of Klaviyo's rate limits; crashes are real
(a killed process, a locked database file, a run stopped after extract). After each, the
tables are compared with the simulator's ground truth, and duplicates are looked for with a
`GROUP BY ... HAVING count(*) > 1` query.

Retries are made fast with dlt's `[runtime]` settings through the environment, as a user would.
"""

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import dlt
import duckdb
import pytest
import requests
from dlt.pipeline.exceptions import PipelineStepFailed
from expected import loaded_memberships, query, table_snapshot, true_memberships
from scenarios import join_outsiders, largest_segment, roomiest_segments

from klaviyo_source import klaviyo
from klaviyo_source.client import KlaviyoClient
from klaviyo_source.errors import KlaviyoRateLimited, KlaviyoServerError
from klaviyo_source.quota import RateLimiter
from klaviyo_source.simulator import ALL_SCOPES, Account, KlaviyoSimulator, generate_account
from klaviyo_source.simulator.rate_limits import WINDOW_KINDS
from klaviyo_source.summary import failed_segments

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "klaviyo_pipeline.py"
PAGE = 100  # the source asks for the largest page of segment profiles

# Small, so each run takes about a second, with one segment of several pages.
SIZE = {"segments": 6, "tags": 4, "profiles": 500, "memberships": 1200}
FAST_RETRIES = {
    "RUNTIME__REQUEST_MAX_ATTEMPTS": "4",
    "RUNTIME__REQUEST_BACKOFF_FACTOR": "0.05",
    "RUNTIME__REQUEST_MAX_RETRY_DELAY": "2",
}


@pytest.fixture
def account() -> Account:
    return generate_account(seed=23, **SIZE)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_RETRIES.items():
        monkeypatch.setenv(name, value)


# -- helpers -------------------------------------------------------------------------------


def run(pipeline: dlt.Pipeline, source: Any) -> Any:
    return pipeline.run(source, loader_file_format="jsonl")


def duplicates(pipeline: dlt.Pipeline) -> List[Any]:
    return query(
        pipeline,
        "SELECT membership_id, count(*) FROM segment_memberships "
        "GROUP BY membership_id HAVING count(*) > 1",
    ) + query(pipeline, "SELECT id, count(*) FROM profiles GROUP BY id HAVING count(*) > 1")


def assert_truth(pipeline: dlt.Pipeline, account: Account) -> None:
    """0 lost, 0 duplicated, 0 extra: the current members equal the account's."""
    assert loaded_memberships(pipeline) == true_memberships(account)
    assert duplicates(pipeline) == []


def first_run_pages(account: Account) -> int:
    """Profile pages a first run must fetch: every live segment from the start."""
    return sum(max(1, math.ceil(len(m) / PAGE)) for m in account.memberships().values())


def log_of(simulator: KlaviyoSimulator) -> List[Any]:
    """The simulator's request log, this test's key only.

    A request from another process (say, a retry to a port this simulator now reuses) would
    carry another key; it is not this test's to count.
    """
    return [r for r in simulator.request_log if r.api_key == simulator.api_key]


def count_of(simulator: KlaviyoSimulator, operation: str) -> int:
    return sum(1 for r in log_of(simulator) if r.operation == operation)


def statuses(simulator: KlaviyoSimulator, operation: Optional[str] = None) -> Counter:
    return Counter(
        r.status for r in log_of(simulator) if operation is None or r.operation == operation
    )


class ManualClock:
    """Monotonic seconds for a `RateLimiter` that move only when the test moves them.

    `sleep` records each wait. With `advance_on_sleep` it moves the clock by the wait at once
    (one thread, nothing to coordinate); otherwise it blocks the calling thread until the test
    has moved the clock past the wait's end, so a test can see who is held and for how long.
    """

    def __init__(self, start: float = 1000.0, advance_on_sleep: bool = False) -> None:
        self.now = start
        self.advance_on_sleep = advance_on_sleep
        self.sleeps: List[float] = []
        self._sleeping = 0
        self._changed = threading.Condition()

    def __call__(self) -> float:
        with self._changed:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._changed:
            self.sleeps.append(seconds)
            end = self.now + seconds
            if self.advance_on_sleep:
                self.now = end
                return
            self._sleeping += 1
            self._changed.notify_all()
            try:
                # A real-time bound only so that a broken test fails instead of hanging.
                woken = self._changed.wait_for(lambda: self.now >= end, timeout=30)
                assert woken, f"slept {seconds} s and the test never moved the clock"
            finally:
                self._sleeping -= 1

    def advance(self, seconds: float) -> None:
        with self._changed:
            self.now += seconds
            self._changed.notify_all()

    def wait_for_sleepers(self, count: int) -> None:
        """Return once `count` threads are asleep on this clock."""
        with self._changed:
            assert self._changed.wait_for(lambda: self._sleeping >= count, timeout=10), (
                f"{self._sleeping} threads asleep, expected {count}"
            )


# -- 1. every fault kind, during parallel segment walks --------------------------------------

FAULTS = [
    pytest.param("status", {"status": 500}, 500, id="500"),
    pytest.param("status", {"status": 503}, 503, id="503"),
    pytest.param("reset", {}, None, id="reset"),
    pytest.param("truncate", {}, None, id="truncate"),
    pytest.param("slow", {"delay": 4.0}, None, id="slow"),
    pytest.param("throttle", {"retry_after": 1}, 429, id="throttle-retry-after"),
    pytest.param("throttle", {"retry_after": None}, 429, id="throttle-no-retry-after"),
]


@pytest.mark.parametrize(("kind", "options", "status"), FAULTS)
def test_each_fault_is_retried_and_the_tables_equal_the_truth(
    kind: str,
    options: Dict[str, Any],
    status: Optional[int],
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The slow fault answers after 4 s. Every other answer must come within the timeout, also
    # on a loaded machine with threads switched every microsecond: a late one is asked again.
    monkeypatch.setenv("RUNTIME__REQUEST_TIMEOUT", "2")
    times = 3
    simulator.inject_fault(kind, times=times, path_contains="/profiles", **options)
    pipeline = make_pipeline()

    run(pipeline, source_for())

    assert_truth(pipeline, account)
    assert failed_segments(pipeline) == {}
    # Each fault cost exactly one more attempt: nothing was skipped, nothing asked twice. (A
    # slow answer is logged when the simulator sends it, after the client gave up on it.)
    expected = first_run_pages(account) + times
    deadline = time.monotonic() + 5
    while count_of(simulator, "get_segment_profiles") < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_of(simulator, "get_segment_profiles") == expected
    if status is not None:
        assert statuses(simulator, "get_segment_profiles")[status] == times


# -- 2. rate budgets shared by threads ---------------------------------------------------------


@pytest.mark.parametrize("windows", WINDOW_KINDS)
def test_parallel_walks_keep_to_the_published_tiers_and_collect_no_429(
    windows: str, account: Account, make_pipeline: Callable
) -> None:
    # Klaviyo's real windows (time scale 1): predictive_analytics costs the M tier, 10 a
    # second across all segments, which five workers would overrun without pacing. Klaviyo's
    # windows are fixed; the pacing must hold where they slide too.
    with KlaviyoSimulator(account, rate_limits=True, windows=windows) as simulator:
        pipeline = make_pipeline()
        started = time.monotonic()
        run(
            pipeline,
            klaviyo(
                api_key=simulator.api_key,
                base_url=simulator.base_url,
                profile_additional_fields=["predictive_analytics"],
                # Reports pace at 2/min at these real limits: minutes of this test's time.
                segment_reports=False,
            ),
        )
        elapsed = time.monotonic() - started
        log = [r for r in log_of(simulator) if r.operation == "get_segment_profiles"]

    assert_truth(pipeline, account)
    assert [r.status for r in log_of(simulator) if r.status == 429] == []
    pages = first_run_pages(account)
    assert len(log) == pages
    # 10 a second: the pages cannot have taken less than this. (The spacing itself is the
    # simulator's to judge: it answered no 429, and arrival times jitter on a loaded machine.)
    assert elapsed >= (pages - 10) / 10


def test_429_storm_during_parallel_walks_ends_with_the_truth(
    account: Account, make_pipeline: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A storm from two sides: the simulator enforces Klaviyo's real M tier while the client
    # believes Klaviyo's windows are 1000x shorter (so it does not pace), with eight workers;
    # and a burst of 429s without Retry-After hits the profile pages on top.
    monkeypatch.setenv("EXTRACT__WORKERS", "8")
    with KlaviyoSimulator(account, rate_limits=True) as simulator:
        simulator.inject_fault("throttle", times=12, path_contains="/profiles", retry_after=None)
        pipeline = make_pipeline()
        started = time.monotonic()
        run(
            pipeline,
            klaviyo(
                api_key=simulator.api_key,
                base_url=simulator.base_url,
                profile_additional_fields=["predictive_analytics"],
                rate_limit_time_scale=1000,
                # The simulator's real 2/min for reports would make this test wait minutes.
                segment_reports=False,
            ),
        )
        elapsed = time.monotonic() - started
        profile_statuses = statuses(simulator, "get_segment_profiles")

    assert_truth(pipeline, account)
    assert failed_segments(pipeline) == {}
    assert profile_statuses[200] == first_run_pages(account)
    assert profile_statuses[429] >= 12
    print(
        f"429 storm: {profile_statuses[429]} x 429 for {profile_statuses[200]} pages "
        f"({sum(profile_statuses.values())} requests) in {elapsed:.1f} s"
    )


def test_a_429_pauses_its_budget_for_every_thread_and_only_that_budget(
    simulator: KlaviyoSimulator,
) -> None:
    # The limiter's pauses run on a clock that moves only when the test moves it, so each
    # wait is exact and "held" means "asleep until the clock is moved", not "took long".
    clock = ManualClock()
    limiter = RateLimiter(time_scale=1000, clock=clock, sleep=clock.sleep)
    client = KlaviyoClient(simulator.api_key, simulator.base_url, rate_limiter=limiter)
    simulator.inject_fault("throttle", times=1, path_contains="/api/tags", retry_after=3)
    first = threading.Thread(target=lambda: list(client.get_tags()))
    first.start()
    clock.wait_for_sleepers(1)  # the throttled thread waits out Retry-After
    assert [r.status for r in log_of(simulator)] == [429]

    list(client.get_segments())  # another budget: answered while the clock stands still
    second = threading.Thread(target=lambda: list(client.get_tags()))
    second.start()
    clock.wait_for_sleepers(2)  # a thread that never saw the 429 is held on its first request
    assert clock.sleeps == [3.0, 3.0]
    assert [(r.operation, r.status) for r in log_of(simulator)] == [
        ("get_tags", 429),
        ("get_segments", 200),
    ]

    clock.advance(3.0)
    first.join(timeout=10)
    second.join(timeout=10)
    assert not first.is_alive() and not second.is_alive()
    assert [(r.operation, r.status) for r in log_of(simulator)][2:] == [("get_tags", 200)] * 2
    assert clock.sleeps == [3.0, 3.0]  # woken at the end of the pause, not sent to sleep again
    assert limiter.stats.waited_seconds == 6.0
    assert limiter.stats.throttled == 1


def test_threads_waiting_out_a_pause_resume_at_the_paced_rate(account: Account) -> None:
    # S tier at time scale 10: 3 requests a 100 ms window. One 429 pauses the budget for 1 s
    # while eleven more threads want it; when the pause ends they must come back spaced out,
    # not all at once into one window (which Klaviyo would answer with more 429s).
    scale = 10.0
    with KlaviyoSimulator(account, rate_limits=True, time_scale=scale) as simulator:
        client = KlaviyoClient(
            simulator.api_key, simulator.base_url, rate_limiter=RateLimiter(1.0, scale)
        )
        simulator.inject_fault("throttle", times=1, path_contains="/api/tags", retry_after=1)
        threads = [threading.Thread(target=lambda: list(client.get_tags())) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        statuses = [r.status for r in log_of(simulator) if r.operation == "get_tags"]

    assert statuses.count(429) == 1  # the injected one, and no wave after the pause
    assert statuses.count(200) == 12


def test_a_429_without_retry_after_backs_off_exponentially_then_gives_up(
    simulator: KlaviyoSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Powers of two, so that the waits and their sums are exact in floating point.
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0.125")
    monkeypatch.setenv("RUNTIME__REQUEST_MAX_RETRY_DELAY", "0.5")
    clock = ManualClock(advance_on_sleep=True)
    # Pacing at 1000x, so that only the backoff spaces the attempts (tags allow 3 a second).
    limiter = RateLimiter(time_scale=1000, clock=clock, sleep=clock.sleep)
    client = KlaviyoClient(simulator.api_key, simulator.base_url, rate_limiter=limiter)
    simulator.inject_fault("throttle", times=3, path_contains="/api/tags", retry_after=None)

    assert list(client.get_tags())
    assert [r.status for r in log_of(simulator)] == [429, 429, 429, 200]
    # The pause doubles for each throttled wave on the budget.
    assert clock.sleeps == [0.125, 0.25, 0.5]

    # With 4 attempts of at most 0.5 s, a request waits out 1.5 s of 429s: waits of 0.125,
    # 0.25, 0.5 and 0.5 s fit, the fifth 429 would make it 2 s, and the request gives up.
    simulator.reset_counters()
    clock.sleeps.clear()
    simulator.inject_fault("throttle", times=100, path_contains="/api/tags", retry_after=None)
    with pytest.raises(KlaviyoRateLimited, match=r"429 throttled to GET /api/tags.*5 attempts"):
        list(client.get_tags())
    assert count_of(simulator, "get_tags") == 5
    assert clock.sleeps == [0.125, 0.25, 0.5, 0.5]


def test_remaining_zero_pauses_the_budget_until_the_window_resets(account: Account) -> None:
    # Another integration, with its own key on the same account, spends the tags budget
    # (S tier: 60 per steady window, here 3 s) down to its last request. The client must see
    # RateLimit-Remaining reach 0 and wait for RateLimit-Reset instead of collecting a 429.
    keys = {"pk_ours_0123456789": {"tags:read"}, "pk_neighbour_0123456789": {"tags:read"}}
    with KlaviyoSimulator(account, api_keys=keys, rate_limits=True, time_scale=20) as simulator:
        url = f"{simulator.base_url}/api/tags"
        headers = {
            "Authorization": "Klaviyo-API-Key pk_neighbour_0123456789",
            "revision": "2025-04-15",
        }
        for _ in range(3):  # the steady window may roll over between the two integrations
            limiter = RateLimiter(time_scale=20)
            client = KlaviyoClient("pk_ours_0123456789", simulator.base_url, rate_limiter=limiter)
            with requests.Session() as neighbour:
                while True:
                    answer = neighbour.get(url, headers=headers, timeout=5)
                    if answer.status_code == 429:
                        time.sleep(0.02)
                    elif int(answer.headers["RateLimit-Remaining"]) <= 1:
                        break
            # Past the neighbour's burst window (50 ms at this scale): only the minute is spent.
            time.sleep(0.06)
            for _ in range(3):
                list(client.get_tags())
            if limiter.stats.exhausted:
                break
        ours = [r.status for r in log_of(simulator) if r.api_key == "pk_ours_0123456789"]

    assert limiter.stats.exhausted >= 1
    assert 429 not in ours and len(ours) >= 3
    assert limiter.stats.throttled == 0


@pytest.mark.parametrize(
    ("call", "operation", "per_window", "share"),
    [
        pytest.param("profile_count", "get_segment", 1, 1.0, id="profile_count-XS"),
        pytest.param("profile_count", "get_segment", 1, 0.5, id="profile_count-XS-half-share"),
        pytest.param("segment_tags", "get_segment_tags", 3, 1.0, id="segment-tags-S"),
        pytest.param("tags", "get_tags", 3, 1.0, id="tags-S"),
        pytest.param("update", "update_segment", 1, 1.0, id="writes"),
    ],
)
def test_threads_share_the_stricter_tiers(
    call: str, operation: str, per_window: int, share: float, account: Account
) -> None:
    # Burst windows of 100 ms (time scale 10): six threads calling at once must be spaced
    # out to `per_window` requests a window (half as many at half the share), with no 429.
    scale = 10.0
    with KlaviyoSimulator(account, rate_limits=True, time_scale=scale) as simulator:
        client = KlaviyoClient(
            simulator.api_key, simulator.base_url, rate_limiter=RateLimiter(share, scale)
        )
        segment_ids = sorted(account.segments())
        calls: Dict[str, Callable[[int], Any]] = {
            "profile_count": lambda i: client.get_segment(
                segment_ids[i % len(segment_ids)], additional_fields_segment=["profile_count"]
            ),
            "segment_tags": lambda i: client.get_segment_tags(segment_ids[i % len(segment_ids)]),
            "tags": lambda i: list(client.get_tags()),
            "update": lambda i: client.update_segment(
                segment_ids[i % len(segment_ids)], is_starred=bool(i % 2)
            ),
        }
        count = 6 if per_window == 1 else 12
        threads = [threading.Thread(target=calls[call], args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        log = [r for r in log_of(simulator) if r.operation == operation]

    assert len(log) == count and all(r.status == 200 for r in log)
    window = 1 / scale / share
    stamps = sorted(r.timestamp for r in log)
    assert stamps[-1] - stamps[0] >= (count / per_window - 1) * window
    # Logged when answered: allow for the latency that varies from request to request.
    assert all(b - a >= window - 0.03 for a, b in zip(stamps, stamps[per_window:], strict=False))


def charged(simulator: KlaviyoSimulator, operation: str) -> List[float]:
    """When the simulator counted each allowed request of an operation, in scaled seconds since
    its rate limits started: its own record of what went into which window."""
    return [c.at for c in simulator.limiter.charged if c.bucket == operation]


def per_window(stamps: List[float], seconds: float = 60.0) -> List[int]:
    """Requests in each fixed window of `seconds`, from the first window to the last used."""
    counts = Counter(int(at // seconds) for at in stamps)
    return [counts[index] for index in range(min(counts), max(counts) + 1)]


@pytest.mark.parametrize(
    ("windows", "until_room"),
    [
        # Fixed: the window resets 60 s after it began, 11 s after the 60th request.
        pytest.param("fixed", 11.0, id="fixed"),
        # Sliding: room comes back as the first requests, sent at 30 s, leave the window at
        # 90 s; then as many a second as left a second, as Klaviyo's headers say.
        pytest.param("sliding", 41.0, id="sliding"),
    ],
)
def test_a_run_started_mid_window_spends_what_is_left_at_the_burst_rate_then_waits_for_the_reset(
    windows: str, until_room: float, account: Account
) -> None:
    # One clock for the simulator's windows and the client's waits, moved only by those waits:
    # every wait is exact. Segment tags cost the S tier: 3 a second, 60 a minute.
    clock = ManualClock(advance_on_sleep=True)
    with KlaviyoSimulator(
        account, rate_limits=True, windows=windows, rate_limit_clock=clock
    ) as simulator:
        clock.advance(30.0)  # the run starts half way through Klaviyo's minute
        limiter = RateLimiter(clock=clock, sleep=clock.sleep)
        client = KlaviyoClient(simulator.api_key, simulator.base_url, rate_limiter=limiter)
        segment_id = sorted(account.segments())[0]
        for _ in range(75):
            client.get_segment_tags(segment_id)
        sent = charged(simulator, "get_segment_tags")

    assert statuses(simulator) == Counter({200: 75})
    # The 60 requests the minute has left go three a second from 30 s on, with nothing spread
    # over the rest of the minute; the run then waits until Klaviyo has room again.
    assert clock.sleeps == [1.0] * 19 + [until_room] + [1.0] * 4
    assert sent[:60] == [30.0 + second for second in range(20) for _ in range(3)]
    assert sent[60] == 49.0 + until_room
    assert per_window(sent) == [60, 15]
    assert limiter.stats.exhausted >= 1 and limiter.stats.throttled == 0


def test_two_runs_at_half_the_share_each_spend_the_window_together(account: Account) -> None:
    # Two integrations with keys of one account, each at rate_limit_share 0.5 of the S tier:
    # one request a second and 30 of the minute's 60 each. They take turns from 10 s into the
    # minute, with 50 s of room at that rate; one clock, moved by their waits.
    keys = {"pk_first_0123456789": ALL_SCOPES, "pk_second_0123456789": ALL_SCOPES}
    clock = ManualClock(advance_on_sleep=True)
    with KlaviyoSimulator(
        account, api_keys=keys, rate_limits=True, rate_limit_clock=clock
    ) as simulator:
        clock.advance(10.0)
        clients = [
            KlaviyoClient(
                key,
                simulator.base_url,
                rate_limiter=RateLimiter(share=0.5, clock=clock, sleep=clock.sleep),
            )
            for key in keys
        ]
        segment_id = sorted(account.segments())[0]
        for _ in range(40):
            for client in clients:
                client.get_segment_tags(segment_id)
        sent = charged(simulator, "get_segment_tags")
        answered = Counter((r.api_key, r.status) for r in simulator.request_log)

    assert answered == Counter({(key, 200): 40 for key in keys})
    # Turn by turn, 30 each fill the minute; neither takes the other's half.
    assert per_window(sent) == [60, 20]


def test_the_limit_klaviyo_names_replaces_the_published_one(account: Account) -> None:
    # The limiter starts from revision 2025-04-15's 700 a minute for the L tier; Klaviyo,
    # asked with revision 2026-07-15, grants 750 and says so in RateLimit-Limit.
    clock = ManualClock(advance_on_sleep=True)
    with KlaviyoSimulator(account, rate_limits=True, rate_limit_clock=clock) as simulator:
        limiter = RateLimiter(revision="2025-04-15", clock=clock, sleep=clock.sleep)
        client = KlaviyoClient(
            simulator.api_key, simulator.base_url, "2026-07-15", rate_limiter=limiter
        )
        segment_id = sorted(account.segments())[0]
        for _ in range(760):
            client.get_segment(segment_id)
        sent = charged(simulator, "get_segment")

    assert statuses(simulator) == Counter({200: 760})
    assert per_window(sent) == [750, 10]
    assert clock.sleeps == [1.0] * 9 + [51.0]  # 75 a second from 0 s, then the rest of the minute


@pytest.mark.parametrize("windows", WINDOW_KINDS)
def test_parallel_requests_spend_a_window_at_the_burst_rate_and_collect_no_429(
    windows: str, account: Account
) -> None:
    # Eight threads ask for segment tags (S tier: 3 a second, 60 a minute) on Klaviyo's clock
    # run ten times faster: a minute lasts 6 s. The run starts a quarter of the way through a
    # minute, whose last 45 s leave room for its 60 at three a second.
    scale = 10.0
    offset = [0.0]
    with KlaviyoSimulator(
        account,
        rate_limits=True,
        time_scale=scale,
        windows=windows,
        rate_limit_clock=lambda: time.monotonic() + offset[0],
    ) as simulator:
        offset[0] = (1.5 - simulator.limiter.elapsed()) % 6.0
        client = KlaviyoClient(
            simulator.api_key, simulator.base_url, rate_limiter=RateLimiter(time_scale=scale)
        )
        segment_ids = sorted(account.segments())
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(client.get_segment_tags, [segment_ids[i % 6] for i in range(100)]))
        sent = charged(simulator, "get_segment_tags")

    assert statuses(simulator) == Counter({200: 100})
    if windows == "fixed":
        # What the first minute had left is spent before its reset, and the next minute's
        # share right after it, three a (scaled) second: not spread over the minute.
        assert per_window(sent) == [60, 40]
        assert all(at % 60 < 30 for at in sent[60:])


# -- 3. a failing segment, an aborted extract, a crash before load ---------------------------


def test_an_error_that_aborts_the_extract_commits_nothing_and_the_next_run_catches_up(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    run(pipeline, source_for())
    before = table_snapshot(pipeline, "segment_memberships")
    cursors = json.dumps(pipeline.state["sources"]["klaviyo"]["resources"], sort_keys=True)
    for segment_id in roomiest_segments(account, 3):
        join_outsiders(account, segment_id, 4)
    # /api/tags is not isolated per segment: once its retries are spent the extract stops.
    simulator.inject_fault("status", status=503, times=1000, path_contains="/api/tags")

    with pytest.raises(PipelineStepFailed) as failed:
        run(pipeline, source_for())

    assert failed.value.step == "extract"
    assert "GET /api/tags" in str(failed.value) and "4 attempts" in str(failed.value)
    assert not pipeline.has_pending_data
    assert table_snapshot(pipeline, "segment_memberships") == before
    reattached = make_pipeline()
    assert json.dumps(reattached.state["sources"]["klaviyo"]["resources"], sort_keys=True) == (
        cursors
    )
    simulator.clear_faults()
    run(reattached, source_for())
    assert_truth(reattached, account)


@pytest.mark.parametrize("steps_done", [["extract"], ["extract", "normalize"]])
def test_a_crash_between_extract_and_load_is_finished_by_the_next_run(
    steps_done: List[str],
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
) -> None:
    pipeline = make_pipeline()
    run(pipeline, source_for())
    before = table_snapshot(pipeline, "segment_memberships")
    for segment_id in roomiest_segments(account, 3):
        join_outsiders(account, segment_id, 4)
    simulator.reset_counters()

    pipeline.extract(source_for(), loader_file_format="jsonl")
    if "normalize" in steps_done:
        pipeline.normalize()
    # The process dies here: the package (with the moved cursors) is on disk, not loaded.
    fetched = count_of(simulator, "get_segment_profiles")
    assert fetched > 0
    assert table_snapshot(pipeline, "segment_memberships") == before

    restarted = make_pipeline()  # a new process attaches to the same working folder
    assert restarted.has_pending_data
    run(restarted, source_for())

    # The pending package was loaded as it was; nothing was fetched again.
    assert count_of(simulator, "get_segment_profiles") == fetched
    assert_truth(restarted, account)
    for segment_id in roomiest_segments(account, 2):
        join_outsiders(account, segment_id, 3)
    run(restarted, source_for())
    assert_truth(restarted, account)


def test_a_crash_before_the_first_load_starts_over(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.extract(source_for(), loader_file_format="jsonl")
    pipeline.normalize()
    # Nothing was ever loaded, so dlt drops the pending package with the local state and the
    # next run extracts everything again: a redundant fetch, but nothing lost or doubled.
    restarted = make_pipeline()
    run(restarted, source_for())

    assert count_of(simulator, "get_segment_profiles") == 2 * first_run_pages(account)
    assert_truth(restarted, account)


# -- the same through the pipeline script, as a scheduler runs it ----------------------------


@pytest.fixture
def script_env(tmp_path: Path) -> Dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SOURCES__", "DESTINATION__", "RUNTIME__", "EXTRACT__"))
    }
    env.update(FAST_RETRIES)
    env["DLT_DATA_DIR"] = str(tmp_path / "dlt_home")
    env["DESTINATION__DUCKDB__CREDENTIALS"] = str(tmp_path / "export.duckdb")
    # The simulator's limits are off; keep the client's own pacing from slowing the tests.
    env["SOURCES__KLAVIYO__RATE_LIMIT_TIME_SCALE"] = "1000"
    return env


def script(env: Dict[str, str], simulator: KlaviyoSimulator) -> List[str]:
    env["SOURCES__KLAVIYO__API_KEY"] = simulator.api_key
    env["SOURCES__KLAVIYO__BASE_URL"] = simulator.base_url
    return [sys.executable, str(SCRIPT)]


def run_script(env: Dict[str, str], simulator: KlaviyoSimulator) -> subprocess.CompletedProcess:
    return subprocess.run(
        script(env, simulator), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def error_lines(result: subprocess.CompletedProcess) -> List[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def file_memberships(env: Dict[str, str]) -> Dict[str, Dict[str, datetime]]:
    with duckdb.connect(env["DESTINATION__DUCKDB__CREDENTIALS"], read_only=True) as db:
        rows = db.execute(
            "SELECT segment_id, profile_id, joined_group_at FROM klaviyo.segment_memberships "
            "WHERE is_member"
        ).fetchall()
        doubled = db.execute(
            "SELECT membership_id FROM klaviyo.segment_memberships "
            "GROUP BY membership_id HAVING count(*) > 1"
        ).fetchall()
    assert doubled == []
    loaded: Dict[str, Dict[str, datetime]] = {}
    for segment_id, profile_id, joined in rows:
        loaded.setdefault(segment_id, {})[profile_id] = joined.astimezone(timezone.utc)
    return loaded


def file_cursors(env: Dict[str, str]) -> Dict[str, str]:
    state_file = Path(env["DLT_DATA_DIR"]) / "pipelines" / "klaviyo_segments" / "state.json"
    state = json.loads(state_file.read_text())
    resources = state["sources"]["klaviyo"]["resources"]
    return dict(resources["segment_memberships"]["joined_group_at"])


def data_tables(env: Dict[str, str]) -> Set[str]:
    path = env["DESTINATION__DUCKDB__CREDENTIALS"]
    if not Path(path).exists():
        return set()
    with duckdb.connect(path, read_only=True) as db:
        names = db.execute("SELECT table_name FROM information_schema.tables").fetchall()
    return {name for (name,) in names if not name.startswith("_dlt")}


@pytest.fixture
def served(account: Account) -> Iterator[KlaviyoSimulator]:
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        yield simulator


def test_a_segment_failing_beyond_its_retries_fails_the_run_by_name_and_is_redone(
    account: Account, served: KlaviyoSimulator, script_env: Dict[str, str]
) -> None:
    big = largest_segment(account)
    name = account.segments()[big]["name"]
    assert len(account.members(big)) > 2 * PAGE
    # Its first page loads; every later page fails: the walk breaks off in the middle.
    served.inject_fault(
        "status", status=503, times=1000, path_contains=f"/segments/{big}/profiles/"
    )

    failed = run_script(script_env, served)

    assert failed.returncode == 1
    lines = error_lines(failed)
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: 1 segment(s) failed")
    assert f"segment {big} ({name})" in lines[0] and "503" in lines[0]
    assert "4 attempts" in lines[0] and "run again later" in lines[0]
    truth = true_memberships(account)
    loaded = file_memberships(script_env)
    assert {sid: m for sid, m in loaded.items() if sid != big} == {
        sid: m for sid, m in truth.items() if sid != big
    }
    assert loaded[big].items() <= truth[big].items() and len(loaded[big]) == PAGE
    cursors = file_cursors(script_env)
    assert big not in cursors and set(cursors) == set(truth) - {big}

    served.clear_faults()
    served.reset_counters()
    again = run_script(script_env, served)

    assert again.returncode == 0, again.stderr
    assert file_memberships(script_env) == truth
    walked = [r for r in log_of(served) if r.operation == "get_segment_profiles"]
    # The failed segment is read again from its start, every other one from its cursor.
    assert [r for r in walked if f"/segments/{big}/" in r.path and "filter" not in r.query]
    others = [r for r in walked if r.path.split("/")[3] in set(truth) - {big}]
    assert others and all(r.query.get("filter", "").startswith("greater-than") for r in others)


def test_a_page_without_joined_group_at_fails_its_segment_at_once_and_names_the_field(
    account: Account, served: KlaviyoSimulator, script_env: Dict[str, str]
) -> None:
    big = largest_segment(account)
    # Whole JSON in the wrong shape (as from another revision): asking again cannot help.
    served.inject_fault(
        "omit", field="joined_group_at", times=1, path_contains=f"/segments/{big}/profiles"
    )

    failed = run_script(script_env, served)

    assert failed.returncode == 1
    lines = error_lines(failed)
    assert len(lines) == 1, failed.stderr
    assert f"segment {big}" in lines[0] and "joined_group_at" in lines[0]
    assert "revision" in lines[0] and "attempts" not in lines[0]
    walks = [r for r in log_of(served) if f"/segments/{big}/profiles" in r.path]
    assert len(walks) == 1  # not retried
    truth = true_memberships(account)
    loaded = file_memberships(script_env)
    assert big not in loaded
    assert loaded == {sid: m for sid, m in truth.items() if sid != big}
    assert big not in file_cursors(script_env)

    again = run_script(script_env, served)

    assert again.returncode == 0, again.stderr
    assert file_memberships(script_env) == truth


def test_a_run_killed_mid_extract_moves_no_cursor_and_the_next_run_catches_up(
    account: Account, served: KlaviyoSimulator, script_env: Dict[str, str]
) -> None:
    assert run_script(script_env, served).returncode == 0
    cursors = file_cursors(script_env)
    big = largest_segment(account)
    for segment_id in roomiest_segments(account, 3):
        join_outsiders(account, segment_id, 5)
    served.reset_counters()
    served.inject_fault("slow", times=1, path_contains=f"/segments/{big}/profiles", delay=30)

    process = subprocess.Popen(
        script(script_env, served),
        cwd=REPO,
        env=script_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    others = len(account.memberships()) - 1
    try:
        # Wait until every other segment was walked, while the big one hangs on its request.
        deadline = time.monotonic() + 20
        while count_of(served, "get_segment_profiles") < others:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the other segments were never walked"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == -9
    assert file_cursors(script_env) == cursors

    served.clear_faults()
    again = run_script(script_env, served)

    assert again.returncode == 0, again.stderr
    assert file_memberships(script_env) == true_memberships(account)


def test_a_load_that_fails_once_is_loaded_by_the_next_run(
    account: Account, served: KlaviyoSimulator, script_env: Dict[str, str]
) -> None:
    database = script_env["DESTINATION__DUCKDB__CREDENTIALS"]
    # Keep the extract busy long enough to lock the database file under its feet.
    served.inject_fault("slow", times=1, path_contains="/profiles", delay=1.0)
    process = subprocess.Popen(
        script(script_env, served),
        cwd=REPO,
        env=script_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock: Optional[duckdb.DuckDBPyConnection] = None
    try:
        deadline = time.monotonic() + 20
        while not any(r.operation == "get_segment_profiles" for r in log_of(served)):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        while lock is None:  # the run may still hold the file for a moment after its sync
            try:
                lock = duckdb.connect(database)
            except duckdb.IOException:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        if lock is not None:
            lock.close()

    assert process.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "The load step failed" in lines[0] and "lock" in lines[0]
    assert "pending load package" in lines[0] and "next run loads it" in lines[0]
    assert data_tables(script_env) == set()

    again = run_script(script_env, served)

    assert again.returncode == 0, again.stderr
    assert file_memberships(script_env) == true_memberships(account)


def test_server_errors_name_the_request_and_the_attempts(
    simulator: KlaviyoSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME__REQUEST_MAX_ATTEMPTS", "3")
    client = KlaviyoClient(simulator.api_key, simulator.base_url)
    simulator.inject_fault("status", status=502, times=100, path_contains="/api/segments")

    with pytest.raises(KlaviyoServerError) as raised:
        list(client.get_segments())

    assert count_of(simulator, "get_segments") == 3
    assert str(raised.value).startswith("Klaviyo answered 502 Bad Gateway to GET /api/segments")
    assert "(3 attempts over" in str(raised.value)


def test_a_create_that_may_have_happened_is_not_sent_twice(
    account: Account, simulator: KlaviyoSimulator
) -> None:
    client = KlaviyoClient(simulator.api_key, simulator.base_url)
    simulator.inject_fault("reset", times=1, path_contains="/api/segments")
    before = set(account.segments())
    condition: Dict[str, Any] = {"type": "profile-property", "property": "properties['Tier']"}
    condition["filter"] = {"type": "string", "operator": "equals", "value": "Gold"}

    with pytest.raises(requests.ConnectionError, match=r"POST /api/segments.*1 attempts"):
        client.create_segment("Once only", {"condition_groups": [{"conditions": [condition]}]})

    # The connection broke after Klaviyo created it: a retry would have made a second one.
    assert count_of(simulator, "create_segment") == 1
    assert len(set(account.segments()) - before) == 1
