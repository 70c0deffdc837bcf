"""The SQL views over a DuckDB file, checked against the simulator's ground truth.

tests/test_postgres.py runs the same scenario's checks on PostgreSQL and tests/test_filesystem.py
over the filesystem destination's files.
"""

from collections import Counter
from datetime import date, datetime, timedelta, timezone
from typing import Callable, Dict, List

import dlt
import pytest
from expected import query, utc
from two_runs import (
    ACCOUNT_SEED,
    SMALL_ACCOUNT,
    VIEWS,
    assert_klaviyo_counts_beside_ours,
    assert_newest_version_views_answer_alike,
    assert_summary_matches_truth,
    assert_views_match_truth,
    run_two_scenario_runs,
)

from klaviyo_source.simulator import Account, generate_account
from klaviyo_source.summary import display_width, membership_summary
from klaviyo_source.views import create_views


@pytest.fixture
def account() -> Account:
    """The small account of the PostgreSQL and filesystem tests."""
    return generate_account(seed=ACCOUNT_SEED, **SMALL_ACCOUNT)


def _settled_segment_with(account: Account, members: int) -> str:
    """A segment that is not processing (so its leaves are looked for) with enough members."""
    segments = account.segments()
    return next(
        segment_id
        for segment_id in sorted(segments)
        if not segments[segment_id]["is_processing"] and len(account.members(segment_id)) >= members
    )


def _daily(pipeline: dlt.Pipeline, segment_id: str) -> Dict[date, List[int]]:
    rows = query(
        pipeline,
        "SELECT day, joins, leaves FROM segment_joins_leaves_daily "
        f"WHERE segment_id = '{segment_id}'",
    )
    return {day: [int(joins), int(leaves)] for day, joins, leaves in rows}


def test_a_rejoin_is_no_leave_and_leaves_count_on_the_day_they_were_found(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    segment_id = _settled_segment_with(account, members=6)
    joined_before = dict(account.members(segment_id))
    *leavers, rejoiner = sorted(joined_before)[:6]
    for profile_id in leavers:
        account.leave(segment_id, profile_id)
    rejoined = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5)
    account.rejoin(segment_id, rejoiner, at=rejoined)

    run_began = datetime.now(timezone.utc)
    pipeline.run(source_for())
    run_ended = datetime.now(timezone.utc)
    assert create_views(pipeline) == list(VIEWS)

    daily = _daily(pipeline, segment_id)
    leave_days = [day for day, (_, leaves) in daily.items() if leaves]
    assert len(leave_days) == 1
    found = leave_days[0]
    assert run_began.date() <= found <= run_ended.date()
    # Each member joined once, on the day of its first join; the re-join is no join either.
    expected = {
        day: [joins, 0]
        for day, joins in Counter(utc(joined).date() for joined in joined_before.values()).items()
    }
    expected.setdefault(rejoined.date(), [0, 0])
    expected.setdefault(found, [0, 0])[1] += len(leavers)
    assert daily == expected

    rejoins = query(
        pipeline,
        "SELECT day, rejoins, segment_name FROM segment_joins_leaves_daily "
        f"WHERE segment_id = '{segment_id}' AND rejoins > 0",
    )
    assert rejoins == [(rejoined.date(), 1, account.segments()[segment_id]["name"])]
    sizes = query(
        pipeline,
        "SELECT members, segment_name FROM segment_size_daily "
        f"WHERE segment_id = '{segment_id}' ORDER BY day DESC LIMIT 1",
    )
    assert sizes == [(len(account.members(segment_id)), account.segments()[segment_id]["name"])]


def test_every_view_and_the_summary_on_duckdb_state_the_truth_after_every_kind_of_change(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()

    changes, _ = run_two_scenario_runs(lambda: pipeline.run(source_for()), pipeline, account)

    assert create_views(pipeline) == list(VIEWS)
    assert_views_match_truth(pipeline, account, deleted=changes.deleted)
    assert_klaviyo_counts_beside_ours(pipeline)
    assert_summary_matches_truth(pipeline, account)
    assert_newest_version_views_answer_alike(pipeline)


def test_the_summary_lines_up_wide_and_emoji_segment_names(
    account: Account, source_for: Callable, make_pipeline: Callable
) -> None:
    names = {"日本のお客様", "Churn risk 🚨", "Café ☕ weekly"}
    for segment_id, name in zip(sorted(account.memberships()), sorted(names), strict=False):
        account.rename_segment(segment_id, name)
    pipeline = make_pipeline()
    pipeline.run(source_for())

    lines = membership_summary(pipeline).splitlines()[2:-1]

    assert names <= {line.rsplit(maxsplit=2)[0] for line in lines}
    # The id column starts at the same terminal column on every line.
    id_columns = {display_width(line[: line.rindex(line.split()[-2])]) for line in lines}
    assert len(id_columns) == 1
