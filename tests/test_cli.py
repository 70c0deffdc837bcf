"""The `klaviyo-export` command, called in-process as `main(argv)` against the simulator.

Configured the way a user configures it: environment variables, and a DuckDB file of the test's
own. What the command wrote is compared with the simulator's account.
"""

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Set, Tuple

import dlt
import duckdb
import pytest
from expected import utc

from klaviyo_source.cli import DEMO_PIPELINE_NAME, PIPELINE_NAME, main
from klaviyo_source.errors import KlaviyoConfigError
from klaviyo_source.simulator import Account, KlaviyoSimulator

DLT = Path(sys.executable).with_name("dlt")
EXPORT = Path(sys.executable).with_name("klaviyo-export")
UNUSUAL_NAME = 'VIP, "gold" \\ 🌟 会员'


@pytest.fixture
def database(simulator: KlaviyoSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's environment pointed at the simulator; the DuckDB file the command writes."""
    exported = tmp_path / "export.duckdb"
    monkeypatch.setenv("SOURCES__KLAVIYO__API_KEY", simulator.api_key)
    monkeypatch.setenv("SOURCES__KLAVIYO__BASE_URL", simulator.base_url)
    monkeypatch.setenv("SOURCES__KLAVIYO__RATE_LIMIT_TIME_SCALE", "1000")
    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(exported))
    monkeypatch.chdir(tmp_path)  # anything written to the working directory stays here
    return exported


def _rows(database: Path, sql: str) -> List[Tuple[Any, ...]]:
    with duckdb.connect(str(database), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def _data_tables(database: Path) -> Set[str]:
    if not database.exists():
        return set()
    tables = _rows(database, "SELECT table_name FROM information_schema.tables")
    return {name for (name,) in tables if not name.startswith("_dlt")}


def _members(database: Path) -> Dict[str, Set[str]]:
    loaded: Dict[str, Set[str]] = {}
    for segment_id, profile_id in _rows(
        database, "SELECT segment_id, profile_id FROM klaviyo.segment_memberships WHERE is_member"
    ):
        loaded.setdefault(segment_id, set()).add(profile_id)
    return loaded


def _truth(account: Account, segment_ids: Set[str]) -> Dict[str, Set[str]]:
    return {
        segment_id: set(members)
        for segment_id, members in account.memberships().items()
        if members and segment_id in segment_ids
    }


def _only_error_line(capsys: pytest.CaptureFixture[str], api_key: str = "") -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    if api_key:
        assert api_key not in captured.out + captured.err
    return lines[0]


def test_a_segment_name_no_segment_has_fails_the_run_naming_the_closest(
    account: Account,
    simulator: KlaviyoSimulator,
    database: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = next(iter(account.segments().values()))["name"]
    typo = real[:-1]

    assert main(["--segment-names", typo, "--quiet"]) == 1

    line = _only_error_line(capsys, simulator.api_key)
    assert f'no segment named "{typo}"' in line
    assert f'closest: "{real}"' in line
    assert "--segment-name" in line
    assert _data_tables(database) == set()


def test_a_segment_id_no_segment_has_fails_the_run_naming_the_closest(
    account: Account,
    simulator: KlaviyoSimulator,
    database: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_id, segment = next(iter(account.segments().items()))
    wrong = real_id[:-1] + ("x" if real_id[-1] != "x" else "y")

    assert main(["--segments", wrong, "--quiet"]) == 1

    line = _only_error_line(capsys, simulator.api_key)
    assert f"no segment with id {wrong}" in line
    assert f'closest: {real_id} "{segment["name"]}"' in line
    assert _data_tables(database) == set()


def test_a_library_run_with_an_unknown_segment_name_fails_too(
    source_for: Callable[..., Any], make_pipeline: Callable[..., dlt.Pipeline]
) -> None:
    pipeline = make_pipeline()
    with pytest.raises(Exception) as raised:
        pipeline.run(source_for(segment_names=["No such segment"]))

    cause: BaseException = raised.value
    while cause.__cause__ is not None and not isinstance(cause, KlaviyoConfigError):
        cause = cause.__cause__
    assert isinstance(cause, KlaviyoConfigError)
    assert '"No such segment"' in str(cause)


def test_any_segment_name_is_selectable_one_per_flag(
    account: Account, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unusual = account.create_segment(UNUSUAL_NAME)
    for profile_id in list(account.profiles())[:5]:
        account.join(unusual, profile_id)
    other_id, other = next(
        (segment_id, segment)
        for segment_id, segment in account.segments().items()
        if "," not in segment["name"] and account.members(segment_id)
    )

    argv = ["--segment-name", UNUSUAL_NAME, "--segment-names", other["name"], "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err

    assert _members(database) == _truth(account, {unusual, other_id})
    names = dict(_rows(database, "SELECT id, name FROM klaviyo.segments"))
    assert names == {unusual: UNUSUAL_NAME, other_id: other["name"]}


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--destination", "duckbd"], {}, ["'duckbd'", "--destination", "Did you mean duckdb?"]),
        (["--progress", "tqdm"], {}, ['pip install "tqdm"', "--progress log"]),
        (["--demo", "--demo-profiles", "-5"], {}, ["--demo-profiles", "1 or more"]),
        ([], {"EXTRACT__WORKERS": "abc"}, ["[extract] workers", "not a valid int", "EXTRACT__"]),
        (
            ["--destination", "postgres"],
            {},
            ["DESTINATION__POSTGRES__CREDENTIALS", "[destination.postgres.credentials]"],
        ),
        (
            ["--destination", "filesystem"],
            {},
            ["bucket_url", "DESTINATION__FILESYSTEM__BUCKET_URL", "[destination.filesystem]"],
        ),
    ],
    ids=[
        "unknown-destination",
        "progress-package-missing",
        "negative-demo-size",
        "extract-workers-not-a-number",
        "postgres-without-credentials",
        "filesystem-without-bucket-url",
    ],
)
def test_a_setting_the_run_cannot_use_is_one_line_naming_it_and_the_fix(
    argv: List[str],
    env: Dict[str, str],
    says: List[str],
    simulator: KlaviyoSimulator,
    database: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as where tqdm is not installed
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert main([*argv, "--quiet"]) == 1

    line = _only_error_line(capsys, simulator.api_key)
    for fragment in says:
        assert fragment in line
    assert "SOURCES__KLAVIYO__WORKERS" not in line
    assert _data_tables(database) == set()


def test_an_unknown_log_level_is_one_line_from_the_installed_command(tmp_path: Path) -> None:
    # dlt sets up its logging once a process: only a process of its own shows what a user sees.
    env = dict(os.environ, RUNTIME__LOG_LEVEL="LOUD", SOURCES__KLAVIYO__API_KEY="pk_unused")
    result = subprocess.run(
        [str(EXPORT), "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "log_level" in lines[0] and "RUNTIME__LOG_LEVEL" in lines[0] and "INFO" in lines[0]


def test_the_demo_exports_into_a_pipeline_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    assert main(["--demo", "--demo-profiles", "40", "--quiet"]) == 0, capsys.readouterr().err

    pipelines = Path(os.environ["DLT_DATA_DIR"]) / "pipelines"
    assert {path.name for path in pipelines.iterdir()} == {DEMO_PIPELINE_NAME}
    demo = tmp_path / "klaviyo_demo.duckdb"
    assert _rows(demo, "SELECT count(*) FROM klaviyo.segment_memberships")[0][0] > 0


def test_full_refresh_exports_the_current_membership_as_if_for_the_first_time(
    account: Account, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    segment_id = max(account.memberships(), key=lambda sid: len(account.members(sid)))
    stays_out, comes_back = list(account.members(segment_id))[:2]
    assert main(["--quiet"]) == 0
    account.leave(segment_id, stays_out)
    account.leave(segment_id, comes_back)
    assert main(["--quiet", "--reconcile", "all"]) == 0
    account.join(segment_id, comes_back)
    assert main(["--quiet", "--reconcile", "all"]) == 0
    ended = "SELECT count(*) FROM klaviyo.segment_memberships WHERE NOT is_member"
    assert _rows(database, ended)[0][0] > 0  # history the refresh must not carry over

    refreshed_at = datetime.now(timezone.utc)
    assert main(["--quiet", "--full-refresh"]) == 0, capsys.readouterr().err

    assert _members(database) == _truth(account, set(account.segments()))
    assert _rows(database, ended)[0][0] == 0
    first_seen = _rows(database, "SELECT first_seen_at FROM klaviyo.segment_memberships")
    assert first_seen and all(utc(seen) >= refreshed_at for (seen,) in first_seen)
    periods = _rows(
        database,
        "SELECT count(*), count(left_at_latest), min(first_seen_at) "
        "FROM klaviyo.segment_membership_periods",
    )[0]
    assert periods[0] == len(first_seen) and periods[1] == 0
    assert utc(periods[2]) >= refreshed_at


def test_loaded_packages_keep_no_profile_data_and_dlt_commands_still_work(
    account: Account, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quiet"]) == 0
    segment_id = next(sid for sid, members in account.memberships().items() if members)
    account.join(segment_id, account.add_profile(email="late.joiner@example.com"))
    assert main(["--quiet"]) == 0, capsys.readouterr().err

    emails = {
        profile["email"].encode() for profile in account.profiles().values() if profile.get("email")
    }
    loaded = {email for (email,) in _rows(database, "SELECT email FROM klaviyo.profiles")}
    assert b"late.joiner@example.com" in emails and "late.joiner@example.com" in loaded
    working_dir = Path(dlt.attach(PIPELINE_NAME).working_dir)
    for path in working_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(email in content for email in emails), path

    for command in (["info"], ["trace"]):
        shown = subprocess.run(
            [str(DLT), "pipeline", PIPELINE_NAME, *command],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert "segment_memberships" in shown.stdout
