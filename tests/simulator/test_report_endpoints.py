"""Klaviyo's segment reports (POST /api/segment-series-reports and /api/segment-values-reports):
figures from the account's change log with a reporting lag, request bodies checked as the specs
describe them, their own 1/s, 2/m and daily limits, and only from revision 2024-10-15."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account
from klaviyo_source.simulator.segment_reports import ReportSettings

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=timezone.utc)
SERIES = "/api/segment-series-reports"
VALUES = "/api/segment-values-reports"
STATISTICS = ["members_added", "members_removed", "net_members_changed", "total_members"]


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Reports:
    """POSTs report bodies to one simulator."""

    def __init__(self, sim: KlaviyoSimulator, revision: str = "2025-04-15", key: str = "") -> None:
        self.sim = sim
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers.update(
            {
                "Authorization": f"Klaviyo-API-Key {key or sim.api_key}",
                "revision": revision,
                "Accept": "application/vnd.api+json",
                "Content-Type": "application/vnd.api+json",
            }
        )

    def post(self, path: str, body: Any) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.session.post(self.sim.base_url + path, data=data, timeout=10)

    def series(self, **attributes: Any) -> requests.Response:
        return self.post(SERIES, series_body(**attributes))

    def values(self, **attributes: Any) -> requests.Response:
        return self.post(VALUES, values_body(**attributes))


def days(first: date, last: date) -> dict[str, str]:
    """A custom timeframe of whole UTC days, `first` to `last` inclusive."""
    return {
        "start": f"{first.isoformat()}T00:00:00+00:00",
        "end": f"{(last + timedelta(days=1)).isoformat()}T00:00:00+00:00",
    }


def any_of(segment_ids: list[str]) -> str:
    return "any(segment_id,[" + ",".join(f'"{sid}"' for sid in segment_ids) + "])"


def series_body(**attributes: Any) -> dict[str, Any]:
    attributes.setdefault("statistics", STATISTICS)
    attributes.setdefault("interval", "daily")
    attributes.setdefault("timeframe", days(NOW.date() - timedelta(days=6), NOW.date()))
    return {"data": {"type": "segment-series-report", "attributes": attributes}}


def values_body(**attributes: Any) -> dict[str, Any]:
    attributes.setdefault("statistics", STATISTICS)
    attributes.setdefault("timeframe", days(NOW.date() - timedelta(days=6), NOW.date()))
    return {"data": {"type": "segment-values-report", "attributes": attributes}}


def by_segment(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        result["groupings"]["segment_id"]: result["statistics"]
        for result in document["data"]["attributes"]["results"]
    }


def truth(account: Account, segment_id: str, first: date, last: date, lag: timedelta) -> Any:
    """The account's own daily figures, as lists per statistic."""
    stats = account.daily_membership_stats(segment_id, first, last, lag=lag)
    return {name: [getattr(day, name) for day in stats] for name in STATISTICS}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def history(clock: Clock) -> tuple[Account, dict[str, str]]:
    """A hand-made account: joins weeks back, a leave, a re-join after the leave, a re-join of
    a member, a deleted segment, and a join a minute ago."""
    account = Account(clock=clock, seed=4)
    created = NOW - timedelta(days=400)
    buyers = account.create_segment("Buyers", created=created)
    gone = account.create_segment("Gone", created=created)
    ann, bob, cy = (account.add_profile(email=f"{n}@x.io") for n in ("ann", "bob", "cy"))
    clock.now = NOW - timedelta(days=20)
    account.join(buyers, ann)
    account.join(buyers, bob)
    account.join(gone, cy)
    clock.now = NOW - timedelta(days=5, hours=3)
    account.leave(buyers, ann)
    clock.now = NOW - timedelta(days=2, hours=1)
    account.rejoin(buyers, ann)
    account.rejoin(buyers, bob)  # a member again: neither added nor removed
    clock.now = NOW - timedelta(days=1)
    account.delete_segment(gone)
    clock.now = NOW - timedelta(minutes=1)
    account.join(buyers, cy)
    clock.now = NOW
    return account, {"buyers": buyers, "gone": gone, "ann": ann, "bob": bob, "cy": cy}


@pytest.fixture
def served(history: tuple[Account, dict[str, str]]) -> Iterator[KlaviyoSimulator]:
    account, _ = history
    settings = ReportSettings(lag=timedelta(minutes=10))
    with KlaviyoSimulator(account, rate_limits=False, reports=settings) as sim:
        yield sim


def test_daily_figures_are_the_change_log_per_day_behind_the_lag(
    served: KlaviyoSimulator, history: tuple[Account, dict[str, str]]
) -> None:
    account, ids = history
    first, last = NOW.date() - timedelta(days=21), NOW.date()
    resp = Reports(served).series(timeframe=days(first, last), filter=any_of([ids["buyers"]]))
    assert resp.status_code == 200, resp.text
    document = resp.json()
    stamps = document["data"]["attributes"]["date_times"]
    assert stamps == [f"{first + timedelta(days=n)}T00:00:00+00:00" for n in range(22)]
    figures = by_segment(document)[ids["buyers"]]
    assert figures == truth(account, ids["buyers"], first, last, timedelta(minutes=10))
    # Read as a story: two joins 20 days ago, a leave 5 days ago, a re-join 2 days ago, and
    # today's join a minute ago is not in the report yet.
    assert figures["members_added"][1] == 2 and figures["members_removed"][16] == 1
    assert figures["members_added"][19] == 1 and figures["total_members"][-1] == 2


def test_a_change_enters_the_report_once_the_lag_has_passed(
    served: KlaviyoSimulator, history: tuple[Account, dict[str, str]]
) -> None:
    account, ids = history
    reports = Reports(served)
    today = days(NOW.date(), NOW.date())
    before = by_segment(reports.series(timeframe=today).json())[ids["buyers"]]
    assert before["members_added"] == [0] and before["total_members"] == [2]
    served.reports.lag = timedelta(0)
    after = by_segment(reports.series(timeframe=today).json())[ids["buyers"]]
    assert after["members_added"] == [1] and after["total_members"] == [3]
    assert after == truth(account, ids["buyers"], NOW.date(), NOW.date(), timedelta(0))


def test_deleted_and_unknown_segments_are_left_out(
    served: KlaviyoSimulator, history: tuple[Account, dict[str, str]]
) -> None:
    _, ids = history
    reports = Reports(served)
    named = reports.series(filter=any_of([ids["gone"], "NoSuch", ids["buyers"]]))
    assert list(by_segment(named.json())) == [ids["buyers"]]
    assert list(by_segment(reports.series().json())) == [ids["buyers"]]  # no filter: all live
    one = reports.values(filter=f'equals(segment_id,"{ids["buyers"]}")')
    assert list(by_segment(one.json())) == [ids["buyers"]]


def test_values_sum_the_timeframe_and_count_members_at_its_end(
    served: KlaviyoSimulator, history: tuple[Account, dict[str, str]]
) -> None:
    _, ids = history
    reports = Reports(served)
    timeframe = days(NOW.date() - timedelta(days=21), NOW.date() - timedelta(days=3))
    series = by_segment(reports.series(timeframe=timeframe).json())[ids["buyers"]]
    values = by_segment(reports.values(timeframe=timeframe).json())[ids["buyers"]]
    assert values == {
        "members_added": sum(series["members_added"]),
        "members_removed": sum(series["members_removed"]),
        "net_members_changed": sum(series["net_members_changed"]),
        "total_members": series["total_members"][-1],
    }
    only = reports.values(timeframe=timeframe, statistics=["total_members"]).json()
    assert by_segment(only)[ids["buyers"]] == {"total_members": 1}


def test_a_timeframes_offset_is_ignored_for_the_companys_time_zone(
    served: KlaviyoSimulator,
) -> None:
    reports = Reports(served)
    utc = reports.series(timeframe=days(NOW.date() - timedelta(days=6), NOW.date())).json()
    shifted = reports.series(
        timeframe={
            "start": f"{NOW.date() - timedelta(days=6)}T00:00:00-05:00",
            "end": f"{NOW.date() + timedelta(days=1)}T00:00:00Z",
        }
    ).json()
    assert shifted == utc


@pytest.mark.parametrize(
    ("key", "first", "count"),
    [
        ("today", date(2026, 5, 4), 1),
        ("yesterday", date(2026, 5, 3), 1),
        ("last_7_days", date(2026, 4, 27), 7),
        ("last_30_days", date(2026, 4, 4), 30),
        ("this_week", date(2026, 5, 4), 1),  # 2026-05-04 is a Monday
        ("last_week", date(2026, 4, 27), 7),
        ("this_month", date(2026, 5, 1), 4),
        ("last_month", date(2026, 4, 1), 30),
    ],
)
def test_predefined_timeframes(served: KlaviyoSimulator, key: str, first: date, count: int) -> None:
    resp = Reports(served).series(timeframe={"key": key})
    assert resp.status_code == 200, resp.text
    stamps = resp.json()["data"]["attributes"]["date_times"]
    assert stamps == [f"{first + timedelta(days=n)}T00:00:00+00:00" for n in range(count)]


@pytest.mark.parametrize(
    ("interval", "timeframe", "first_stamps"),
    [
        ("hourly", {"key": "today"}, ["2026-05-04T00:00:00+00:00", "2026-05-04T01:00:00+00:00"]),
        ("weekly", {"key": "last_30_days"}, ["2026-03-30T00:00:00+00:00"]),
        ("monthly", {"key": "last_90_days"}, ["2026-02-01T00:00:00+00:00"]),
    ],
)
def test_other_intervals_start_on_their_boundaries(
    served: KlaviyoSimulator,
    history: tuple[Account, dict[str, str]],
    interval: str,
    timeframe: dict[str, str],
    first_stamps: list[str],
) -> None:
    _, ids = history
    resp = Reports(served).series(interval=interval, timeframe=timeframe)
    assert resp.status_code == 200, resp.text
    stamps = resp.json()["data"]["attributes"]["date_times"]
    assert stamps[: len(first_stamps)] == first_stamps
    figures = by_segment(resp.json())[ids["buyers"]]
    assert all(len(values) == len(stamps) for values in figures.values())


def test_sixty_days_is_the_longest_daily_timeframe(served: KlaviyoSimulator) -> None:
    reports = Reports(served)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    exactly = {"start": start.isoformat(), "end": (start + timedelta(days=60)).isoformat()}
    resp = reports.series(timeframe=exactly)
    assert resp.status_code == 200 and len(resp.json()["data"]["attributes"]["date_times"]) == 60
    longer = {**exactly, "end": (start + timedelta(days=60, seconds=1)).isoformat()}
    assert reports.series(timeframe=longer).status_code == 400


def test_the_first_day_with_data_is_2023_06_01(served: KlaviyoSimulator) -> None:
    reports = Reports(served)
    resp = reports.series(timeframe=days(date(2023, 6, 1), date(2023, 7, 30)))
    assert resp.status_code == 200
    assert resp.json()["data"]["attributes"]["date_times"][0] == "2023-06-01T00:00:00+00:00"


def _ids(count: int) -> str:
    return any_of([f"S{n:05d}" for n in range(count)])


# (what is wrong, attributes changed from a good series request, the pointer of the error);
# None removes an attribute.
BAD_SERIES: list[tuple[str, dict[str, Any], str]] = [
    ("no statistics", {"statistics": None}, "statistics"),
    ("empty statistics", {"statistics": []}, "statistics"),
    ("unknown statistic", {"statistics": ["opens"]}, "statistics"),
    ("no timeframe", {"timeframe": None}, "timeframe"),
    ("unknown key", {"timeframe": {"key": "last_2_days"}}, "timeframe/key"),
    ("no end", {"timeframe": {"start": "2026-01-01T00:00:00Z"}}, "timeframe/end"),
    ("not a datetime", {"timeframe": {"start": "soon", "end": "2026-01-02"}}, "timeframe/start"),
    ("end first", {"timeframe": days(date(2026, 1, 2), date(2025, 12, 30))}, "timeframe"),
    ("before the floor", {"timeframe": days(date(2023, 5, 31), date(2023, 6, 2))}, "timeframe"),
    (
        "over a year",
        {"interval": "weekly", "timeframe": days(date(2024, 1, 1), date(2025, 1, 3))},
        "timeframe",
    ),
    ("no interval", {"interval": None}, "interval"),
    ("unknown interval", {"interval": "yearly"}, "interval"),
    ("daily over 60 days", {"timeframe": {"key": "last_90_days"}}, "interval"),
    (
        "hourly over 7 days",
        {"interval": "hourly", "timeframe": {"key": "last_30_days"}},
        "interval",
    ),
    (
        "monthly over 52 weeks",
        {"interval": "monthly", "timeframe": {"key": "last_365_days"}},
        "interval",
    ),
    ("other filter field", {"filter": 'equals(name,"VIP")'}, "filter"),
    ("other operator", {"filter": 'contains(segment_id,"a")'}, "filter"),
    ("two filters", {"filter": 'equals(segment_id,"a"),equals(segment_id,"b")'}, "filter"),
    ("101 ids", {"filter": _ids(101)}, "filter"),
    ("unknown attribute", {"group_by": "segment_id"}, "group_by"),
]


@pytest.mark.parametrize(("what", "changed", "field"), BAD_SERIES, ids=[b[0] for b in BAD_SERIES])
def test_a_bad_series_request_is_a_400_naming_the_field(
    served: KlaviyoSimulator, what: str, changed: dict[str, Any], field: str
) -> None:
    body = series_body(**changed)
    attributes = body["data"]["attributes"]
    body["data"]["attributes"] = {k: v for k, v in attributes.items() if v is not None}
    _assert_invalid(Reports(served).post(SERIES, body), f"/data/attributes/{field}")


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"data": {"type": "segment-values-report", "attributes": {}}}, "/data/type"),
        ({"data": {"type": "segment-series-report", "attributes": []}}, "/data/attributes"),
        ({"nothing": 1}, "/data"),
    ],
)
def test_a_body_that_is_no_series_request_is_a_400(
    served: KlaviyoSimulator, body: dict[str, Any], pointer: str
) -> None:
    _assert_invalid(Reports(served).post(SERIES, body), pointer)


def _assert_invalid(resp: requests.Response, pointer: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["errors"][0]
    assert (error["code"], error["status"]) == ("invalid", 400)
    assert error["source"] == {"pointer": pointer} and error["detail"]


def test_a_hundred_segments_is_the_most_one_request_names(served: KlaviyoSimulator) -> None:
    resp = Reports(served).series(filter=_ids(100))
    assert resp.status_code == 200 and by_segment(resp.json()) == {}


def test_a_values_report_takes_no_interval_and_a_body_must_be_json(
    served: KlaviyoSimulator,
) -> None:
    reports = Reports(served)
    with_interval = reports.values(interval="daily")
    assert with_interval.status_code == 400
    assert with_interval.json()["errors"][0]["source"] == {"pointer": "/data/attributes/interval"}
    assert reports.post(VALUES, b"{not json").status_code == 400
    plain = reports.session.post(
        served.base_url + VALUES,
        data=json.dumps(values_body()).encode(),
        headers={"Content-Type": "text/plain"},
        timeout=10,
    )
    assert plain.status_code == 415


@pytest.mark.parametrize(
    ("revision", "status"), [("2024-06-15", 404), ("2024-07-15", 404), ("2024-10-15", 200)]
)
def test_reports_exist_from_revision_2024_10_15(
    served: KlaviyoSimulator, revision: str, status: int
) -> None:
    for path, body in ((SERIES, series_body()), (VALUES, values_body())):
        resp = Reports(served, revision=revision).post(path, body)
        assert resp.status_code == status, resp.text
        if status == 404:
            assert resp.json()["errors"][0]["detail"] == "No valid revisions found for method."


def test_reports_need_segments_read(history: tuple[Account, dict[str, str]]) -> None:
    account, _ = history
    keys = {"pk_profiles": {"profiles:read"}, "pk_segments": {"segments:read"}}
    with KlaviyoSimulator(account, api_keys=keys, rate_limits=False) as sim:
        assert Reports(sim, key="pk_profiles").series().status_code == 403
        assert Reports(sim, key="pk_segments").series().status_code == 200


def test_responses_and_requests_follow_the_spec(
    served: KlaviyoSimulator, schema: Any, raw_spec: Any
) -> None:
    from openapi_schema_validator import OAS30Validator

    reports = Reports(served)
    for path, body in ((SERIES, series_body()), (VALUES, values_body())):
        request_schema = raw_spec["paths"][path]["post"]["requestBody"]["content"][
            "application/vnd.api+json"
        ]["schema"]
        validator = OAS30Validator({"components": raw_spec["components"], **request_schema})
        assert not list(validator.iter_errors(body))
        resp = reports.post(path, body)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "application/vnd.api+json"
        schema.check(resp.json(), path, "post", 200)


class MonotonicClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_each_report_endpoint_has_1_per_second_2_per_minute_and_a_daily_cap(
    history: tuple[Account, dict[str, str]],
) -> None:
    account, _ = history
    ticks = MonotonicClock()
    settings = ReportSettings(daily_limit=3)
    with KlaviyoSimulator(account, rate_limit_clock=ticks, reports=settings) as sim:
        reports = Reports(sim)
        first = reports.series()
        assert first.status_code == 200
        assert first.headers["RateLimit-Limit"] == "2"
        assert first.headers["RateLimit-Remaining"] == "1"
        assert reports.series().status_code == 429  # the same second
        ticks.t += 1
        assert reports.series().status_code == 200
        ticks.t += 1
        steady = reports.series()
        assert steady.status_code == 429 and int(steady.headers["Retry-After"]) <= 60
        assert reports.values().status_code == 200  # an endpoint of its own
        ticks.t += 60
        assert reports.series().status_code == 200  # the third of the day
        ticks.t += 60
        capped = reports.series()
        assert capped.status_code == 429
        assert int(capped.headers["Retry-After"]) > 60  # waits for the next day
        ticks.t += 86400
        assert reports.series().status_code == 200


def test_a_generated_account_has_joins_and_leaves_across_past_days() -> None:
    now = datetime(2026, 5, 4, tzinfo=timezone.utc)
    account = generate_account(seed=3, segments=6, tags=2, profiles=600, memberships=1500, now=now)
    changes = account.membership_changes()
    leaves = [c for c in changes if c.kind == "leave"]
    assert leaves and all(c.at < now - timedelta(days=1) for c in leaves)
    assert len({c.at.date() for c in changes if c.kind == "join"}) > 300
    assert len({c.at.date() for c in leaves}) > 20
    # Those who left are no longer members: a membership listing never shows them.
    for change in leaves:
        assert change.profile_id not in account.members(change.segment_id)
