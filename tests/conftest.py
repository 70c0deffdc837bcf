"""Shared fixtures: a simulated Klaviyo account over HTTP, and pipelines into DuckDB files."""

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import dlt
import pytest

from klaviyo_source import klaviyo
from klaviyo_source.leave_checks import LeavePolicy, Quota
from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account

# Small enough to run in seconds, large enough that the biggest segment spans many pages and
# holds ties on joined_group_at across page boundaries.
ACCOUNT_SIZE: Dict[str, int] = {"segments": 8, "tags": 6, "profiles": 1200, "memberships": 3000}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--switch-interval",
        type=float,
        default=None,
        help="seconds between forced thread switches for the whole run (sys.setswitchinterval); "
        "1e-6 makes the interleavings of parallel walks that are rare the rule",
    )


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # One worker more than cores: a fifth of the suite waits on rate-limit windows and child
    # processes, time another worker fills (docs/testing.md has the measurements).
    return (os.cpu_count() or 1) + 1


def pytest_configure(config: pytest.Config) -> None:
    interval = config.getoption("--switch-interval", default=None)
    if interval is not None:
        sys.setswitchinterval(interval)


@pytest.fixture(autouse=True)
def _isolated_dlt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's pipeline state and working files inside its own temporary folder."""
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt_data"))
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")  # no network beyond 127.0.0.1
    for name in list(os.environ):
        if name.startswith(("SOURCES__", "DESTINATION__")):
            monkeypatch.delenv(name)


@pytest.fixture
def account() -> Account:
    return generate_account(seed=11, **ACCOUNT_SIZE)


@pytest.fixture
def simulator(account: Account) -> Iterator[KlaviyoSimulator]:
    with KlaviyoSimulator(account, rate_limits=False) as served:
        yield served


@pytest.fixture
def make_pipeline(tmp_path: Path) -> Callable[..., dlt.Pipeline]:
    """A pipeline named like the real one, loading into a DuckDB file of the test's own."""

    def make(name: str = "klaviyo_segments", **kwargs: Any) -> dlt.Pipeline:
        return dlt.pipeline(
            pipeline_name=name,
            pipelines_dir=str(tmp_path / "pipelines"),
            destination=dlt.destinations.duckdb(str(tmp_path / f"{name}.duckdb")),
            dataset_name="klaviyo",
            **kwargs,
        )

    return make


@pytest.fixture
def source_for(simulator: KlaviyoSimulator) -> Callable[..., Any]:
    """The Klaviyo source pointed at the simulator, with any option overridden."""

    def make(**options: Any) -> Any:
        # The simulator's limits are off; run the client's own pacing at 1000x so the 1/s
        # profile_count tier does not make tests wait.
        options.setdefault("rate_limit_time_scale", 1000.0)
        return klaviyo(api_key=simulator.api_key, base_url=simulator.base_url, **options)

    return make


@pytest.fixture
def counting_pays(account: Account, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave checks plan with the room an account of hundreds of segments leaves at Klaviyo's
    limits: ten pages of ids a minute, and three pages a minute beyond the passes' requests.
    Listing the test account's largest segments would then take longer than counting them."""
    for_account = LeavePolicy.for_account

    def with_little_room(*args: Any, **kwargs: Any) -> LeavePolicy:
        return dataclasses.replace(
            for_account(*args, **kwargs),
            walk_quota=Quota(per_second=75, per_minute=10),
            pass_quota=Quota(per_second=75, per_minute=len(account.segments()) + 3),
        )

    monkeypatch.setattr(LeavePolicy, "for_account", staticmethod(with_little_room))
