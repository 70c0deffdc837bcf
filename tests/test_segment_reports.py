"""`segment_reports_daily`: Klaviyo's daily figures per segment, compared with the simulator's
change log: days long before the first export, leaves, re-joins, a deleted segment, a day still
settling, the daily cap met and resumed from, batches of 100 segments, and the view that sets
Klaviyo's counts beside this export's."""

import logging
import math
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Tuple

import dlt
import pytest
from expected import query

from klaviyo_source import settings
from klaviyo_source.errors import KlaviyoConfigError
from klaviyo_source.export import ExportFailed, KlaviyoExport
from klaviyo_source.segment_reports import (
    DailyQuota,
    ReportedSegment,
    ReportRequest,
    plan_requests,
    report_rows,
    rereads_due,
)
from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account
from klaviyo_source.simulator.segment_reports import ReportSettings

# Smaller than conftest's account: these runs are about days, not pages.
SIZE = {"segments": 6, "tags": 2, "profiles": 300, "memberships": 700}

Figures = Tuple[int, int, int, int]
Reports = Dict[Tuple[str, date], Figures]
SERIES = "query_segment_series"


@pytest.fixture
def account() -> Account:
    return generate_account(seed=11, **SIZE)


def loaded_reports(pipeline: dlt.Pipeline) -> Reports:
    rows = query(
        pipeline,
        "SELECT segment_id, date, members_added, members_removed, net_members_changed, "
        "total_members FROM segment_reports_daily",
    )
    return {(row[0], row[1]): tuple(int(value) for value in row[2:]) for row in rows}  # type: ignore[misc]


def first_days(
    account: Account, start: date = settings.SEGMENT_REPORTS_FIRST_DAY
) -> Dict[str, date]:
    """The first day the table holds of each live segment: its creation, or the start."""
    return {
        segment_id: max(start, attributes["created"].astimezone(timezone.utc).date())
        for segment_id, attributes in account.segments().items()
    }


def true_reports(account: Account, firsts: Dict[str, date], last: date, lag: timedelta) -> Reports:
    """What Klaviyo's reports say of those segments, from each one's first day to `last`."""
    truth: Reports = {}
    for segment_id, first in firsts.items():
        for day in account.daily_membership_stats(segment_id, first, last, lag=lag):
            truth[(segment_id, day.day)] = tuple(day)[1:]  # type: ignore[assignment]
    return truth


def last_day(pipeline: dlt.Pipeline) -> date:
    """The day the last run took for today (the newest day it loaded)."""
    return query(pipeline, "SELECT MAX(date) FROM segment_reports_daily")[0][0]  # type: ignore[no-any-return]


def report_requests(simulator: KlaviyoSimulator) -> List[int]:
    """Statuses of the series requests the simulator answered, in order."""
    return [r.status for r in simulator.request_log if r.operation == SERIES]


def reread_days(pipeline: dlt.Pipeline) -> Dict[str, List[date]]:
    """Per segment, the days whose figures the newest load wrote."""
    rows = query(
        pipeline,
        "SELECT segment_id, date FROM segment_reports_daily WHERE _dlt_load_id = "
        "(SELECT MAX(_dlt_load_id) FROM segment_reports_daily) ORDER BY segment_id, date",
    )
    days: Dict[str, List[date]] = {}
    for segment_id, day in rows:
        days.setdefault(segment_id, []).append(day)
    return days


def test_a_first_run_loads_every_day_since_each_segment_was_created_as_klaviyo_counts_it(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())

    today = last_day(pipeline)
    firsts = first_days(account)
    assert loaded_reports(pipeline) == true_reports(account, firsts, today, simulator.reports.lag)
    # Years before this first export, with the leaves of profiles no listing shows any more.
    assert min(firsts.values()) < today - timedelta(days=700)
    before = [f for (_, day), f in loaded_reports(pipeline).items() if day < today - timedelta(1)]
    assert sum(figures[1] for figures in before) > 0
    # One request a 60-day window for up to 100 segments: ceil(N / 60) for the longest history.
    longest = (today - min(firsts.values())).days + 1
    assert report_requests(simulator) == [200] * math.ceil(longest / 60)


def test_later_runs_read_the_last_days_again_and_catch_up_with_a_settling_day(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    first_today = last_day(pipeline)
    segments = account.segments()
    # Segments whose leaves a run looks for (not processing), with members.
    settled = sorted(
        (sid for sid, members in account.memberships().items() if members),
        key=lambda sid: (segments[sid]["is_processing"], -len(account.members(sid))),
    )
    former = {c.segment_id: c.profile_id for c in account.membership_changes() if c.kind == "leave"}
    churned = next(sid for sid in settled if sid in former)
    shrunk = next(sid for sid in settled if sid != churned)
    deleted = settled[-1]
    assert not segments[churned]["is_processing"] and not segments[shrunk]["is_processing"]
    # In `churned`: a member leaves, a profile that left before the first export comes back,
    # a member re-joins (neither added nor removed). In `shrunk`: one member leaves.
    leaver, rejoiner = sorted(account.members(churned))[:2]
    returning = former[churned]
    account.leave(churned, leaver)
    account.rejoin(churned, returning)
    account.rejoin(churned, rejoiner)
    account.leave(shrunk, sorted(account.members(shrunk))[0])
    changed = datetime.now(timezone.utc).date()
    held_of_deleted = {k: v for k, v in loaded_reports(pipeline).items() if k[0] == deleted}
    account.delete_segment(deleted)
    simulator.reset_counters()

    # Within the hour (`segment_reports_reread_minutes`, 60 by default) no day is read again.
    pipeline.run(source_for())
    assert report_requests(simulator) == []
    assert last_day(pipeline) == first_today

    # Klaviyo's report trails by ten minutes: today's figures do not show the changes yet.
    every_run = {"segment_reports_reread_minutes": 0}
    pipeline.run(source_for(**every_run))
    today = last_day(pipeline)
    live = first_days(account)
    lagging = true_reports(account, live, today, simulator.reports.lag)
    loaded = loaded_reports(pipeline)
    assert {k: v for k, v in loaded.items() if k[0] != deleted} == lagging
    assert loaded[(churned, changed)][:2] == (0, 0)
    # One request re-read each live segment's last three days; the deleted one kept its rows.
    assert report_requests(simulator) == [200]
    reread = [
        first_today - timedelta(days=2) + timedelta(n)
        for n in range((today - first_today).days + 3)
    ]
    assert reread_days(pipeline) == {segment_id: reread for segment_id in live}
    assert {k: v for k, v in loaded.items() if k[0] == deleted} == held_of_deleted
    view = _view_today(pipeline, today)
    assert view[shrunk] == (len(account.members(shrunk)) + 1, len(account.members(shrunk)), -1)

    # Klaviyo has caught up: the next run reads today again and finds them.
    simulator.reports.lag = timedelta(0)
    pipeline.run(source_for(**every_run))
    today = last_day(pipeline)
    caught_up = true_reports(account, live, today, timedelta(0))
    loaded = loaded_reports(pipeline)
    assert {k: v for k, v in loaded.items() if k[0] != deleted} == caught_up
    assert loaded[(churned, changed)][:2] == (1, 1)
    assert loaded[(shrunk, changed)][1] == 1
    # Beside this export's own counts: equal from the first export on, unknown before it.
    expected = {sid: (len(m), len(m), 0) for sid, m in account.memberships().items() if m}
    if (deleted, today) in held_of_deleted:
        # Klaviyo's last word on the deleted segment, read before it went; ended here today.
        last_word = held_of_deleted[(deleted, today)][3]
        expected[deleted] = (last_word, 0, -last_word)
    view = _view_today(pipeline, today)
    assert {sid: row for sid, row in view.items() if row[1] is not None} == expected
    earlier = query(
        pipeline,
        f"SELECT COUNT(*) FROM {_VIEW} WHERE day < DATE '{first_today}' AND "
        "(observed_members IS NOT NULL OR members_difference IS NOT NULL)",
    )
    assert earlier == [(0,)]


_VIEW = "segment_size_vs_klaviyo_daily"


def _view_today(pipeline: dlt.Pipeline, today: date) -> Dict[str, Tuple[Any, ...]]:
    from klaviyo_source.views import create_views

    assert _VIEW in create_views(pipeline)
    rows = query(
        pipeline,
        "SELECT segment_id, klaviyo_members, observed_members, members_difference "
        f"FROM {_VIEW} WHERE day = DATE '{today}'",
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def test_a_run_that_meets_the_daily_cap_ends_cleanly_and_the_next_day_goes_on(
    account: Account, make_pipeline: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    # Klaviyo's windows are 600 times shorter (a day lasts 144 s), and it allows three reports
    # a day. The client keeps to windows a fifth longer, so that no request arriving late
    # on a busy machine lands in a window already full.
    scale = 600.0
    settings_ = ReportSettings(daily_limit=3)
    with KlaviyoSimulator(account, time_scale=scale, reports=settings_) as simulator:
        start = datetime.now(timezone.utc).date() - timedelta(days=299)  # five 60-day windows

        def run() -> None:
            source = dlt_source(
                simulator,
                rate_limit_time_scale=scale / 1.2,
                segment_reports_start=str(start),
                segment_reports_reread_minutes=0,
                reconcile="off",
            )
            KlaviyoExport(pipeline).run(source)  # raises ExportFailed on any failure

        pipeline = make_pipeline()
        with caplog.at_level(logging.WARNING, logger="klaviyo_source"):
            run()
        today = last_day(pipeline)
        # The newest three windows, for every segment; the fourth request met the cap.
        assert report_requests(simulator) == [200, 200, 200, 429]
        assert {day for _, day in loaded_reports(pipeline)} == {
            today - timedelta(days=n) for n in range(180)
        }
        assert "Not a failure" in caplog.text

        run()  # the same day: Klaviyo still says no, and nothing is lost
        assert report_requests(simulator)[4:] == [429]
        assert len({day for _, day in loaded_reports(pipeline)}) == 180

        simulator.reset_rate_limits()  # the next day
        run()
        assert report_requests(simulator)[5:] == [200, 200, 200]  # today's days again, then two
        today = last_day(pipeline)
        firsts = first_days(account, start)
        assert loaded_reports(pipeline) == true_reports(
            account, firsts, today, simulator.reports.lag
        )
        assert not any(r.status == 429 for r in simulator.request_log if r.operation != SERIES)


def dlt_source(simulator: KlaviyoSimulator, **options: Any) -> Any:
    from klaviyo_source import klaviyo

    return klaviyo(api_key=simulator.api_key, base_url=simulator.base_url, **options)


def test_the_source_keeps_its_own_count_of_the_days_requests(
    simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    # A two-hundredth of the quota: one report request a day, counted across runs in state.
    start = datetime.now(timezone.utc).date() - timedelta(days=299)
    options = {"rate_limit_share": 0.005, "segment_reports_start": str(start), "reconcile": "off"}
    pipeline = make_pipeline()
    pipeline.run(source_for(**options))
    assert report_requests(simulator) == [200]
    pipeline.run(source_for(**options))
    assert report_requests(simulator) == [200]  # nothing sent: the day's one is spent
    assert len({day for _, day in loaded_reports(pipeline)}) == 60


def test_a_daily_quota_counts_the_requests_of_a_sliding_day() -> None:
    state: Dict[str, Any] = {}
    quota = DailyQuota(state, cap=2, day=timedelta(hours=24))
    noon = datetime(2026, 5, 4, 12, tzinfo=timezone.utc)
    quota.spend(noon)
    quota.spend(noon + timedelta(hours=1))
    assert quota.remaining(noon + timedelta(hours=23)) == 0
    assert quota.remaining(noon + timedelta(hours=24, seconds=1)) == 1
    assert quota.remaining(noon + timedelta(hours=25, seconds=1)) == 2
    assert state[settings.REPORT_REQUESTS_STATE_KEY] == []


def test_a_run_reads_again_at_most_two_requests_of_segments_the_longest_unread_first(
    make_pipeline: Callable,
) -> None:
    # 250 segments: one steady window of the report tier (2 requests) covers 200 of them.
    account = generate_account(seed=5, segments=250, tags=2, profiles=60, memberships=300)
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        today = datetime.now(timezone.utc).date()
        options = {
            "rate_limit_time_scale": 1000,
            "include_profiles": False,
            "reconcile": "off",
            "segment_reports_start": str(today - timedelta(days=9)),
            "segment_reports_reread_minutes": 0,
        }

        # The walks add nothing to this and cost most of the time: only segments and reports.
        def reports_only() -> Any:
            return dlt_source(simulator, **options).with_resources(
                "segments", settings.SEGMENT_REPORTS_TABLE
            )

        pipeline = make_pipeline()
        pipeline.run(reports_only())
        assert report_requests(simulator) == [200] * 3  # every segment's ten days
        simulator.request_log.clear()

        pipeline.run(reports_only())
        assert report_requests(simulator) == [200] * 2
        first_reread = set(reread_days(pipeline))
        assert len(first_reread) == 200
        simulator.request_log.clear()

        pipeline.run(reports_only())
        assert report_requests(simulator) == [200] * 2
        second_reread = set(reread_days(pipeline))
        # The 50 left out last time come first; no segment waits more than one run.
        assert set(account.segments()) - first_reread <= second_reread
        assert len(second_reread) == 200
    assert {segment_id for segment_id, _ in loaded_reports(pipeline)} == set(account.segments())


def test_segments_read_again_are_those_unread_for_the_interval_longest_unread_first() -> None:
    now = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)
    hour = timedelta(hours=1)
    read_again_at = {
        "fresh": now - timedelta(minutes=59),
        "hour": now - hour,
        "older": now - 3 * hour,
        "oldest": now - 9 * hour,
    }
    loaded = ["fresh", "hour", "older", "oldest", "never"]
    assert rereads_due(loaded, read_again_at, now, hour) == {"hour", "older", "oldest", "never"}
    assert rereads_due(loaded, read_again_at, now, hour, at_most=2) == {"never", "oldest"}
    assert rereads_due(loaded, read_again_at, now, timedelta(0)) == set(loaded)


def test_a_segment_not_due_is_only_backfilled() -> None:
    today = date(2026, 5, 4)
    old = ReportedSegment("old", date(2026, 1, 1))
    loaded = {"old": (date(2026, 3, 1), today - timedelta(days=1))}
    requests = plan_requests([old], loaded, today, reread=frozenset())
    assert [(r.first, r.last, r.segment_ids) for r in requests] == [
        (date(2026, 1, 1), date(2026, 2, 28), ("old",)),
    ]


def test_a_negative_reread_interval_is_refused_with_its_fix(source_for: Callable) -> None:
    with pytest.raises(KlaviyoConfigError, match="segment_reports_reread_minutes"):
        source_for(segment_reports_reread_minutes=-5)


def test_segments_are_asked_for_a_hundred_a_request(make_pipeline: Callable) -> None:
    account = generate_account(seed=5, segments=130, tags=2, profiles=60, memberships=200)
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        today = datetime.now(timezone.utc).date()
        source = dlt_source(
            simulator,
            rate_limit_time_scale=1000,
            include_profiles=False,
            segment_reports_start=str(today - timedelta(days=59)),
        )
        pipeline = make_pipeline()
        pipeline.run(source)
    # 130 segments, one window: a request for 100 of them and one for 30.
    assert report_requests(simulator) == [200, 200]
    loaded = loaded_reports(pipeline)
    assert {segment_id for segment_id, _ in loaded} == set(account.segments())
    assert len(loaded) == 130 * 60


def test_reports_follow_the_segment_selection_and_can_be_turned_off(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    chosen = sorted(account.segments())[:2]
    start = str(datetime.now(timezone.utc).date() - timedelta(days=9))
    selected = make_pipeline("selected")
    selected.run(source_for(segment_ids=chosen, segment_reports_start=start))
    assert {segment_id for segment_id, _ in loaded_reports(selected)} == set(chosen)
    assert len(loaded_reports(selected)) == 2 * 10

    simulator.reset_counters()
    off = make_pipeline("off")
    off.run(source_for(segment_reports=False))
    assert report_requests(simulator) == []
    assert settings.SEGMENT_REPORTS_TABLE not in off.dataset().tables


def test_a_revision_before_the_reports_skips_them_cleanly(
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline = make_pipeline()
    with caplog.at_level(logging.INFO, logger="klaviyo_source"):
        KlaviyoExport(pipeline).run(source_for(revision="2024-07-15"))
    assert report_requests(simulator) == []
    assert settings.SEGMENT_REPORTS_TABLE not in pipeline.dataset().tables
    assert "revision 2024-10-15" in caplog.text
    assert query(pipeline, "SELECT COUNT(*) FROM segment_memberships")[0][0] > 0


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_klaviyo_without_the_report_endpoint_skips_the_reports_cleanly(
    status: int,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A proxy or stand-in that does not serve the endpoint: not found, method not allowed,
    # not implemented. The run is no less than asked of it: the reports do not exist there.
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0.01")
    simulator.inject_fault("status", status=status, times=1000, path_contains="segment-series")
    pipeline = make_pipeline()
    with caplog.at_level(logging.WARNING, logger="klaviyo_source"):
        KlaviyoExport(pipeline).run(source_for())
    assert report_requests(simulator) and set(report_requests(simulator)) == {status}
    assert "Klaviyo does not serve segment reports" in caplog.text
    assert query(pipeline, "SELECT COUNT(*) FROM segment_memberships")[0][0] > 0


def test_failed_reports_fail_the_run_in_one_line_and_the_next_run_goes_on(
    account: Account,
    simulator: KlaviyoSimulator,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME__REQUEST_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0.01")
    start = datetime.now(timezone.utc).date() - timedelta(days=179)  # three windows
    options = {"segment_reports_start": str(start)}
    pipeline = make_pipeline()
    # The first window answers after one 503 (a report is safe to ask again); the second
    # fails every time.
    simulator.inject_fault("status", status=503, times=1, path_contains="segment-series")
    simulator.inject_fault("status", status=503, times=3, skip=1, path_contains="segment-series")

    with pytest.raises(ExportFailed) as failed:
        KlaviyoExport(pipeline).run(source_for(**options))

    line = str(failed.value)
    assert "\n" not in line and line.startswith("Segment reports stopped: Klaviyo answered 503")
    assert "segment_reports = false" in line
    assert report_requests(simulator) == [503, 200, 503, 503, 503]
    # Everything else loaded, and the first window's days are kept.
    assert query(pipeline, "SELECT COUNT(*) FROM segment_memberships")[0][0] > 0
    assert len({day for _, day in loaded_reports(pipeline)}) == 60

    KlaviyoExport(pipeline).run(source_for(**options))  # no failure left to report
    today = last_day(pipeline)
    firsts = first_days(account, start)
    assert loaded_reports(pipeline) == true_reports(account, firsts, today, simulator.reports.lag)


def test_a_destination_that_lost_the_reports_reads_them_anew(
    account: Account, simulator: KlaviyoSimulator, source_for: Callable, make_pipeline: Callable
) -> None:
    start = str(datetime.now(timezone.utc).date() - timedelta(days=59))
    pipeline = make_pipeline()
    pipeline.run(source_for(segment_reports_start=start))
    with pipeline.sql_client() as client:
        client.execute_sql("DELETE FROM segment_reports_daily")

    pipeline.run(source_for(segment_reports_start=start))

    firsts = first_days(account, date.fromisoformat(start))
    expected = true_reports(account, firsts, last_day(pipeline), simulator.reports.lag)
    assert loaded_reports(pipeline) == expected


# -- planning and reading, without a server --------------------------------------------------


def _segments(count: int, first_day: date) -> List[ReportedSegment]:
    return [ReportedSegment(f"S{n:03d}", first_day) for n in range(count)]


def test_a_backfill_goes_newest_first_sixty_days_and_a_hundred_segments_a_request() -> None:
    today = date(2026, 5, 4)
    segments = _segments(250, today - timedelta(days=99))
    requests = plan_requests(segments, {}, today)
    assert [(r.first, r.last, len(r.segment_ids)) for r in requests] == [
        (today - timedelta(days=59), today, 100),
        (today - timedelta(days=59), today, 100),
        (today - timedelta(days=59), today, 50),
        (today - timedelta(days=99), today - timedelta(days=60), 100),
        (today - timedelta(days=99), today - timedelta(days=60), 100),
        (today - timedelta(days=99), today - timedelta(days=60), 50),
    ]
    assert requests[0].timeframe() == {
        "start": "2026-03-06T00:00:00+00:00",
        "end": "2026-05-05T00:00:00+00:00",
    }


def test_a_loaded_segment_is_read_again_from_its_last_days_and_backfilled_below_its_range() -> None:
    today = date(2026, 5, 4)
    young, old = (
        ReportedSegment("young", today - timedelta(days=10)),
        ReportedSegment("old", date(2026, 1, 1)),
    )
    loaded = {"young": (today - timedelta(days=10), today - timedelta(days=1))}
    loaded["old"] = (date(2026, 3, 1), today - timedelta(days=1))
    requests = plan_requests([young, old], loaded, today)
    assert [(r.first, r.last, r.segment_ids) for r in requests] == [
        (today - timedelta(days=3), today, ("old", "young")),  # the last days again, to today
        (date(2026, 1, 1), date(2026, 2, 28), ("old",)),  # below the range, not before day one
    ]


def test_a_days_figures_are_read_from_the_report_from_each_segments_first_day() -> None:
    document = {
        "data": {
            "type": "segment-series-report",
            "attributes": {
                "date_times": ["2026-05-03T00:00:00-04:00", "2026-05-04T00:00:00-04:00"],
                "results": [
                    {
                        "groupings": {"segment_id": "A"},
                        "statistics": {
                            "members_added": [1, 2],
                            "members_removed": [0, 1],
                            "net_members_changed": [1, 1],
                            "total_members": [10.0, 11.0],
                        },
                    },
                    {"groupings": {"segment_id": "other"}, "statistics": {}},
                ],
            },
        }
    }
    read = datetime(2026, 5, 4, 12, tzinfo=timezone.utc)
    rows = report_rows(document, {"A": date(2026, 5, 4)}, read)
    # The account's own day, whatever its offset; only from the segment's first day.
    assert rows == [
        {
            "report_id": "A:2026-05-04",
            "segment_id": "A",
            "date": date(2026, 5, 4),
            "members_added": 2,
            "members_removed": 1,
            "net_members_changed": 1,
            "total_members": 11,
            "reported_at": read,
        }
    ]


def test_an_unknown_start_is_refused_with_its_fix(source_for: Callable) -> None:
    with pytest.raises(KlaviyoConfigError, match="segment_reports_start 'last week'"):
        source_for(segment_reports_start="last week")
    assert ReportRequest(date(2026, 1, 1), date(2026, 1, 2), ("a", 'b"')).filter() == (
        'any(segment_id,["a","b\\""])'
    )
