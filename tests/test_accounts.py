"""Two Klaviyo accounts, one pipeline and one dataset each, into one DuckDB file."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Tuple

import duckdb
import pytest

from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account
from klaviyo_source.views import account_union_sql

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "klaviyo_accounts_pipeline.py"
SIZE = {"segments": 4, "tags": 3, "profiles": 300, "memberships": 700}


@pytest.fixture
def two_accounts() -> Iterator[Dict[str, Tuple[Account, KlaviyoSimulator]]]:
    eu, us = generate_account(seed=21, **SIZE), generate_account(seed=22, **SIZE)
    with (
        KlaviyoSimulator(eu, rate_limits=False) as eu_sim,
        KlaviyoSimulator(us, rate_limits=False) as us_sim,
    ):
        yield {"eu": (eu, eu_sim), "us": (us, us_sim)}


def _env(tmp_path: Path, accounts: Dict[str, Tuple[Account, KlaviyoSimulator]]) -> Dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SOURCES__", "DESTINATION__", "KLAVIYO_SEGMENTS"))
    }
    env["DLT_DATA_DIR"] = str(tmp_path / "dlt_home")
    env["DESTINATION__DUCKDB__CREDENTIALS"] = str(tmp_path / "accounts.duckdb")
    # These runs pace at Klaviyo's real limits: segment reports (2/min) would take minutes.
    env["SOURCES__KLAVIYO__SEGMENT_REPORTS"] = "false"
    for name, (_, simulator) in accounts.items():
        prefix = f"KLAVIYO_SEGMENTS_{name.upper()}__SOURCES__KLAVIYO__"
        env[prefix + "API_KEY"] = simulator.api_key
        env[prefix + "BASE_URL"] = simulator.base_url
    return env


def _members(connection: duckdb.DuckDBPyConnection, dataset: str) -> Dict[str, set]:
    rows = connection.execute(
        f"SELECT segment_id, profile_id FROM {dataset}.segment_memberships WHERE is_member"
    ).fetchall()
    result: Dict[str, set] = {}
    for segment_id, profile_id in rows:
        result.setdefault(segment_id, set()).add(profile_id)
    return result


def test_each_account_lands_in_its_own_dataset(
    two_accounts: Dict[str, Tuple[Account, KlaviyoSimulator]], tmp_path: Path
) -> None:
    env = _env(tmp_path, two_accounts)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--accounts", "eu,us", "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    with duckdb.connect(str(tmp_path / "accounts.duckdb"), read_only=True) as connection:
        for name, (account, _) in two_accounts.items():
            truth = {sid: set(m) for sid, m in account.memberships().items() if m}
            assert _members(connection, f"klaviyo_{name}") == truth
        union = account_union_sql({"eu": "klaviyo_eu", "us": "klaviyo_us"})
        counts = dict(
            connection.execute(
                f"SELECT account, count(*) FROM ({union}) GROUP BY account"
            ).fetchall()
        )
    assert counts == {
        name: sum(len(m) for m in account.memberships().values())
        for name, (account, _) in two_accounts.items()
    }


def test_one_failing_account_does_not_stop_the_other(
    two_accounts: Dict[str, Tuple[Account, KlaviyoSimulator]], tmp_path: Path
) -> None:
    env = _env(tmp_path, two_accounts)
    env["KLAVIYO_SEGMENTS_US__SOURCES__KLAVIYO__API_KEY"] = "pk_revoked"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--accounts", "us,eu", "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 1
    assert "account us" in result.stderr and "401" in result.stderr
    eu_account = two_accounts["eu"][0]
    with duckdb.connect(str(tmp_path / "accounts.duckdb"), read_only=True) as connection:
        truth = {sid: set(m) for sid, m in eu_account.memberships().items() if m}
        assert _members(connection, "klaviyo_eu") == truth
