"""The pipeline script and dlt's CLI, run as a user runs them: as processes, configured by env."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import dlt
import duckdb
import pytest
from expected import (
    loaded_memberships,
    loaded_profiles,
    member_ids,
    true_memberships,
    true_profiles,
)

from klaviyo_source.export import KlaviyoExport
from klaviyo_source.members_this_run import MembersThisRun
from klaviyo_source.simulator import Account, KlaviyoSimulator

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "klaviyo_pipeline.py"
DLT = Path(sys.executable).with_name("dlt")


@pytest.fixture
def user_env(tmp_path: Path) -> Dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SOURCES__", "DESTINATION__", "RUNTIME__"))
    }
    env["DLT_DATA_DIR"] = str(tmp_path / "dlt_home")
    env["DESTINATION__DUCKDB__CREDENTIALS"] = str(tmp_path / "export.duckdb")
    # These runs pace at Klaviyo's real limits: segment reports (2/min) would take minutes.
    env["SOURCES__KLAVIYO__SEGMENT_REPORTS"] = "false"
    return env


@pytest.fixture
def served(account: Account) -> Iterator[KlaviyoSimulator]:
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        yield simulator


@pytest.fixture
def served_env(user_env: Dict[str, str], served: KlaviyoSimulator) -> Dict[str, str]:
    """A user's environment configured for the simulator's account."""
    return dict(
        user_env,
        SOURCES__KLAVIYO__API_KEY=served.api_key,
        SOURCES__KLAVIYO__BASE_URL=served.base_url,
    )


def _run(args: list, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _members_loaded(database: Path) -> int:
    with duckdb.connect(str(database), read_only=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM klaviyo.segment_memberships WHERE is_member"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_script_exports_the_account_and_dlt_cli_works_after_it(
    account: Account, served: KlaviyoSimulator, served_env: Dict[str, str], tmp_path: Path
) -> None:
    env = served_env
    result = _run([sys.executable, str(SCRIPT)], env)
    assert result.returncode == 0, result.stderr

    loaded = _members_loaded(tmp_path / "export.duckdb")
    assert loaded == sum(len(members) for members in account.memberships().values())
    assert f"{loaded} memberships" in result.stdout
    # Each segment's line says how far the run is: segments done of those listed, rows so far.
    tallies = re.findall(r"\[(\d+) of (\d+) segments done, ([\d,]+) membership rows", result.stdout)
    segments = len(account.segments())
    assert [(int(done), int(of)) for done, of, _ in tallies] == [
        (done, segments) for done in range(1, segments + 1)
    ]
    rows_so_far = [int(rows.replace(",", "")) for _, _, rows in tallies]
    assert rows_so_far == sorted(rows_so_far) and rows_so_far[-1] == loaded

    info = _run([str(DLT), "pipeline", "klaviyo_segments", "info"], env)
    assert info.returncode == 0, info.stderr
    assert "segment_memberships" in info.stdout
    trace = _run([str(DLT), "pipeline", "klaviyo_segments", "trace"], env)
    assert trace.returncode == 0, trace.stderr
    assert served.api_key not in trace.stdout + trace.stderr

    segment_id = next(sid for sid, members in account.memberships().items() if members)
    path = f"resources.segment_memberships.joined_group_at.{segment_id}"
    dropped = _run(
        [str(DLT), "pipeline", "klaviyo_segments", "drop", "--state-paths", path, "-y"], env
    )
    assert dropped.returncode == 0, dropped.stderr
    served.reset_counters()
    again = _run([sys.executable, str(SCRIPT)], env)
    assert again.returncode == 0, again.stderr
    walked = [r for r in served.request_log if r.operation == "get_segment_profiles"]
    populated = {sid for sid, members in account.memberships().items() if members}
    reset = [r for r in walked if f"/segments/{segment_id}/" in r.path]
    others = [
        r
        for r in walked
        if f"/segments/{segment_id}/" not in r.path and r.path.split("/")[3] in populated
    ]
    # The reset segment is read from the beginning (no filter), the others incrementally.
    assert reset and all("filter" not in r.query for r in reset)
    assert others and all(r.query.get("filter", "").startswith("greater-than") for r in others)


def test_wrong_key_fails_with_one_clear_line(
    served: KlaviyoSimulator, user_env: Dict[str, str], tmp_path: Path
) -> None:
    env = dict(user_env)
    env["SOURCES__KLAVIYO__API_KEY"] = "pk_not_a_real_key_123"
    env["SOURCES__KLAVIYO__BASE_URL"] = served.base_url
    result = _run([sys.executable, str(SCRIPT)], env)

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "401" in lines[0] and "SOURCES__KLAVIYO__API_KEY" in lines[0]
    assert "pk_not_a_real_key_123" not in result.stdout + result.stderr


def test_missing_key_names_where_to_put_it(user_env: Dict[str, str]) -> None:
    result = _run([sys.executable, str(SCRIPT)], user_env)

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "SOURCES__KLAVIYO__API_KEY" in lines[0]


# Opens the pipeline's DuckDB the way an export does, under the export's settings.
_DUCKDB_SETTINGS_PROBE = """
import sys
import dlt
from klaviyo_source.export import export_settings, settings_applied
file_format = sys.argv[1] if len(sys.argv) > 1 else None
pipeline = dlt.pipeline(pipeline_name="probe", destination="duckdb", dataset_name="probe")
with settings_applied(export_settings(pipeline, file_format)), pipeline.sql_client() as client:
    limit, ordered = client.execute_sql(
        "SELECT current_setting('memory_limit'), current_setting('preserve_insertion_order')"
    )[0]
    workers = dlt.config.get("load.workers")
    buffered = dlt.config.get("data_writer.buffer_max_items")
    rotated = dlt.config.get("data_writer.file_max_items")
print(limit, ordered, workers, buffered, rotated)
"""


def _duckdb_settings(env: Dict[str, str], *file_format: str) -> str:
    probe = _run([sys.executable, "-c", _DUCKDB_SETTINGS_PROBE, *file_format], env)
    assert probe.returncode == 0, probe.stderr
    return probe.stdout.strip()


def test_an_export_caps_duckdb_memory_unless_configured(user_env: Dict[str, str]) -> None:
    # 64MB; one table loaded at a time; row groups flushed every 500 rows; files rotated
    assert _duckdb_settings(user_env) == "61.0 MiB False 1 500 100000"
    # jsonl files are read through 32 MB buffers, one per table loaded at once
    assert _duckdb_settings(user_env, "jsonl") == "488.2 MiB False 1 500 100000"  # 512MB

    user_env["DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG"] = '{"memory_limit": "1GB"}'
    user_env["LOAD__WORKERS"] = "3"
    user_env["DATA_WRITER__BUFFER_MAX_ITEMS"] = "7000"
    user_env["DATA_WRITER__FILE_MAX_ITEMS"] = "40000"
    assert _duckdb_settings(user_env) == "953.6 MiB True 3 7000 40000"  # the user's alone


def test_unknown_loader_file_format_is_refused_before_anything_runs(
    user_env: Dict[str, str],
) -> None:
    refused = _run([sys.executable, str(SCRIPT), "--loader-file-format", "xml"], user_env)

    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    assert "--loader-file-format: invalid choice: 'xml'" in refused.stderr.splitlines()[-1]
    assert "parquet" in refused.stderr.splitlines()[-1]
    assert not Path(user_env["DESTINATION__DUCKDB__CREDENTIALS"]).exists()


def test_duckdb_out_of_memory_names_the_setting_and_the_next_run_loads_what_was_kept(
    account: Account, served_env: Dict[str, str], tmp_path: Path
) -> None:
    env = served_env
    starved = dict(env, DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG='{"memory_limit": "2MB"}')
    failed = _run([sys.executable, str(SCRIPT), "--quiet"], starved)

    assert failed.returncode == 1
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, failed.stderr
    assert "DuckDB ran out of memory" in lines[0]
    assert "DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG" in lines[0]

    finished = _run([sys.executable, str(SCRIPT), "--quiet"], env)
    assert finished.returncode == 0, finished.stderr
    loaded = _members_loaded(tmp_path / "export.duckdb")
    assert loaded == sum(len(members) for members in account.memberships().values())


def test_an_export_split_into_many_files_loads_exactly_the_account(
    account: Account,
    source_for: Callable[..., Any],
    make_pipeline: Callable[..., dlt.Pipeline],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A user's own rotation wins over the export's: files of about 200 rows each.
    monkeypatch.setenv("DATA_WRITER__FILE_MAX_ITEMS", "200")
    pipeline = make_pipeline()

    report = KlaviyoExport(pipeline).run(source_for(segment_reports=False))

    files = Counter(
        job.job_file_info.table_name
        for package in report.load_info.load_packages
        for job in package.jobs["completed_jobs"]
        if job.job_file_info.file_format == "parquet"
    )
    memberships = sum(len(members) for members in account.memberships().values())
    assert files["segment_memberships"] >= memberships // 1000  # batches overshoot a little
    assert files["profiles"] >= len(member_ids(account)) // 1000
    assert loaded_memberships(pipeline) == true_memberships(account)
    loaded = loaded_profiles(pipeline)
    assert set(loaded) == member_ids(account)
    assert loaded == true_profiles(account, loaded)


def test_an_export_drops_its_record_of_listed_members_before_it_normalizes(
    source_for: Callable[..., Any],
    make_pipeline: Callable[..., dlt.Pipeline],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: List[str] = []
    end, normalize = MembersThisRun.end, dlt.Pipeline.normalize

    def ending(members: MembersThisRun) -> None:
        steps.append("record dropped")
        end(members)

    def normalizing(pipeline: dlt.Pipeline, *args: Any, **kwargs: Any) -> Any:
        steps.append("normalize")
        return normalize(pipeline, *args, **kwargs)

    monkeypatch.setattr(MembersThisRun, "end", ending)
    monkeypatch.setattr(dlt.Pipeline, "normalize", normalizing)
    pipeline = make_pipeline()

    KlaviyoExport(pipeline).run(source_for(segment_reports=False))

    assert steps == ["record dropped", "normalize"]
    assert [step.step for step in pipeline.last_trace.steps][-4:] == [
        "extract",
        "normalize",
        "load",
        "run",
    ]
