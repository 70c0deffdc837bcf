"""A 404 in the middle of a segment's walk is never a green, truncated run.

The segment's own GET decides what the 404 meant. If the segment still exists, its walk failed
like any other API error: recorded in the run's failures (the script exits 1), its cursor kept,
and the next run without the fault loads exactly the simulator's truth. If Klaviyo confirms it
gone, its held memberships end as `segment_deleted` and its cursor and reconciliation time are
dropped. Both faults hit the second page of a walk of several pages.
"""

from pathlib import Path
from typing import Any, Callable, Dict, Set

import dlt
from expected import loaded_memberships, query, true_memberships
from scenarios import join_outsiders, roomiest_segments
from script_runs import run_script, script_env, stderr_lines

from klaviyo_source.simulator import Account, KlaviyoSimulator
from klaviyo_source.summary import failed_segments

PAGE = 100  # the source asks for the largest page of segment profiles


def memberships_state(pipeline: dlt.Pipeline, key: str) -> Dict[str, str]:
    resources = pipeline.state["sources"]["klaviyo"]["resources"]
    return dict(resources["segment_memberships"].get(key) or {})


def ended_as_deleted(pipeline: dlt.Pipeline, segment_id: str) -> Set[str]:
    rows = query(
        pipeline,
        "SELECT profile_id FROM segment_memberships WHERE segment_id = "
        f"'{segment_id}' AND NOT is_member AND left_reason = 'segment_deleted'",
    )
    return {profile_id for (profile_id,) in rows}


def duplicates(pipeline: dlt.Pipeline) -> list:
    return query(
        pipeline,
        "SELECT membership_id FROM segment_memberships GROUP BY membership_id HAVING count(*) > 1",
    )


def test_a_404_mid_walk_of_a_segment_that_still_exists_fails_it_and_keeps_its_cursor(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable[..., Any],
    make_pipeline: Callable[..., dlt.Pipeline],
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    before = memberships_state(pipeline, "joined_group_at")
    segment_id = roomiest_segments(account)[0]
    join_outsiders(account, segment_id, 2 * PAGE + 10)
    simulator.inject_fault("status", status=404, skip=1, path_contains=f"/{segment_id}/profiles")

    pipeline.run(source_for())

    failures = failed_segments(pipeline)
    assert list(failures) == [segment_id]
    assert "404" in failures[segment_id] and "still exists" in failures[segment_id]
    assert memberships_state(pipeline, "joined_group_at") == before
    assert segment_id in account.segments()

    pipeline.run(source_for())

    assert failed_segments(pipeline) == {}
    assert loaded_memberships(pipeline) == true_memberships(account)
    assert duplicates(pipeline) == []


def test_a_segment_deleted_during_its_walk_ends_its_held_members_and_drops_its_cursor(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable[..., Any],
    make_pipeline: Callable[..., dlt.Pipeline],
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = roomiest_segments(account)[0]
    held_before = set(account.members(segment_id))
    assert segment_id in memberships_state(pipeline, "reconciled_at")
    join_outsiders(account, segment_id, 2 * PAGE + 10)
    simulator.inject_fault(
        "delete_segment", segment_id=segment_id, skip=1, path_contains=f"/{segment_id}/profiles"
    )

    pipeline.run(source_for())

    assert failed_segments(pipeline) == {}
    assert segment_id not in account.segments()
    assert ended_as_deleted(pipeline, segment_id) == held_before
    assert segment_id not in memberships_state(pipeline, "joined_group_at")
    assert segment_id not in memberships_state(pipeline, "reconciled_at")
    assert duplicates(pipeline) == []

    pipeline.run(source_for())

    assert failed_segments(pipeline) == {}
    assert loaded_memberships(pipeline) == true_memberships(account)
    assert query(
        pipeline, f"SELECT deleted_at IS NOT NULL FROM segments WHERE id = '{segment_id}'"
    )[0] == (True,)
    assert duplicates(pipeline) == []


def test_the_script_exits_1_when_a_segment_that_exists_answers_404_mid_walk(
    account: Account, simulator: KlaviyoSimulator, tmp_path: Path
) -> None:
    segment_id = max(account.memberships().items(), key=lambda item: len(item[1]))[0]
    assert len(account.members(segment_id)) > 2 * PAGE
    simulator.inject_fault("status", status=404, skip=1, path_contains=f"/{segment_id}/profiles")
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
    assert f"segment {segment_id}" in lines[0] and "404" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
