"""The key stays home: `links.next` and redirects are followed only to base_url's origin.

A proxy or a tampered response that points a walk at another origin (scheme, host, port) fails
that walk with one line naming the other origin; nothing is sent there, the segment keeps its
cursor, and the next run without the rewrite loads exactly the simulator's truth. The other
origin is a real second server on 127.0.0.1 that records whatever reaches it.
"""

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import dlt
import pytest
from dlt.pipeline.exceptions import PipelineStepFailed
from expected import loaded_memberships, true_memberships
from recording_server import RecordingServer
from scenarios import join_outsiders, largest_segment, roomiest_segments
from script_runs import run_script, script_env, stderr_lines

from klaviyo_source import klaviyo
from klaviyo_source.errors import KlaviyoForeignOrigin
from klaviyo_source.origins import origin_of
from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account
from klaviyo_source.summary import failed_segments

PAGE = 100  # the source asks for the largest page of segment profiles


@pytest.fixture
def elsewhere() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


def cursors(pipeline: dlt.Pipeline) -> Dict[str, str]:
    resources = pipeline.state["sources"]["klaviyo"]["resources"]
    return dict(resources["segment_memberships"]["joined_group_at"])


def test_origins_compare_scheme_host_and_port_with_default_ports_and_any_case() -> None:
    assert origin_of("https://a.klaviyo.com/api") == origin_of("HTTPS://A.Klaviyo.COM:443/x?y=1")
    assert origin_of("http://127.0.0.1/api") == origin_of("http://127.0.0.1:80/")
    assert origin_of("https://a.klaviyo.com") != origin_of("http://a.klaviyo.com")
    assert origin_of("https://a.klaviyo.com") != origin_of("https://a.klaviyo.com:8443")
    assert origin_of("https://a.klaviyo.com") != origin_of("https://a.klaviyo.com.evil.test")
    assert origin_of("https://a.klaviyo.com") != origin_of("https://a.klaviyo.com@evil.test")


def test_a_next_link_to_another_origin_fails_the_segment_sends_nothing_there_and_keeps_its_cursor(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable[..., Any],
    make_pipeline: Callable[..., dlt.Pipeline],
    elsewhere: RecordingServer,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    before = cursors(pipeline)
    roomy = roomiest_segments(account)[0]
    # More new joins than one page: the incremental pass needs its next link.
    join_outsiders(account, roomy, PAGE + 20)
    simulator.inject_fault("relink", origin=elsewhere.origin, path_contains=f"/{roomy}/profiles")

    pipeline.run(source_for())

    assert elsewhere.received == []
    failures = failed_segments(pipeline)
    assert list(failures) == [roomy]
    assert elsewhere.origin in failures[roomy] and "links.next" in failures[roomy]
    assert simulator.api_key not in failures[roomy]
    assert cursors(pipeline)[roomy] == before[roomy]

    pipeline.run(source_for())

    assert failed_segments(pipeline) == {}
    assert loaded_memberships(pipeline) == true_memberships(account)
    assert cursors(pipeline)[roomy] > before[roomy]


def test_a_redirect_to_another_origin_is_refused_by_the_session_and_fails_the_segment(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable[..., Any],
    make_pipeline: Callable[..., dlt.Pipeline],
    elsewhere: RecordingServer,
) -> None:
    big = largest_segment(account)
    simulator.inject_fault("redirect", origin=elsewhere.origin, path_contains=f"/{big}/profiles")
    pipeline = make_pipeline()

    pipeline.run(source_for())

    assert elsewhere.received == []
    failures = failed_segments(pipeline)
    assert list(failures) == [big] and elsewhere.origin in failures[big]
    assert big not in cursors(pipeline)

    pipeline.run(source_for())

    assert failed_segments(pipeline) == {}
    assert loaded_memberships(pipeline) == true_memberships(account)


def test_a_segment_listing_led_to_another_origin_stops_the_run_before_anything_is_sent_there(
    make_pipeline: Callable[..., dlt.Pipeline], elsewhere: RecordingServer
) -> None:
    # More segments than one page of the listing (10), so the listing has a next link.
    account = generate_account(seed=5, segments=12, tags=2, profiles=60, memberships=90)
    with KlaviyoSimulator(account, rate_limits=False) as served:
        served.inject_fault("relink", origin=elsewhere.origin, path_contains="/api/segments?")
        source = klaviyo(
            api_key=served.api_key, base_url=served.base_url, rate_limit_time_scale=1000
        )
        with pytest.raises(PipelineStepFailed) as failed:
            make_pipeline().run(source)

    assert elsewhere.received == []
    refused = [error for error in _causes(failed.value) if isinstance(error, KlaviyoForeignOrigin)]
    assert refused and elsewhere.origin in str(refused[0])


def _causes(error: BaseException) -> List[BaseException]:
    """The error and what it wraps, through dlt's step failures."""
    chain: List[BaseException] = []
    current: Any = error
    while isinstance(current, BaseException) and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or getattr(current, "exception", None)
    return chain


def test_the_script_exits_1_with_one_line_naming_the_other_origin(
    account: Account, simulator: KlaviyoSimulator, tmp_path: Path, elsewhere: RecordingServer
) -> None:
    big = largest_segment(account)
    name = account.segments()[big]["name"]
    simulator.inject_fault("relink", origin=elsewhere.origin, path_contains=f"/{big}/profiles")
    env = script_env(
        tmp_path,
        simulator.base_url,
        simulator.api_key,
        SOURCES__KLAVIYO__RATE_LIMIT_TIME_SCALE="1000",
    )

    result = run_script(env, "--quiet")

    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: 1 segment(s) failed")
    assert f"segment {big} ({name})" in lines[0] and elsewhere.origin in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert simulator.api_key not in result.stdout + result.stderr
    assert elsewhere.received == []
