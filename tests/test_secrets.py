"""The API key never shows: in no log line at any level, in no dlt CLI output, file or table.

The pipeline script runs as a process with DEBUG logging for every logger (dlt's through
`RUNTIME__LOG_LEVEL`, urllib3's and requests' through the root logger), with
`RUNTIME__HTTP_SHOW_ERROR_BODY=true`, through retries and errors. Then everything a user or a
scheduler could see is searched for the key: stdout and stderr, `dlt pipeline ... trace`,
`trace -vv`, `info -v` (which prints the state), `load-package -v` and `failed-jobs`, every
file in the pipeline's working folder (state, trace, schemas, load packages), and every row
of every table in the DuckDB file, with dlt's compressed state unpacked. The key never reaches
another origin either, when a response points a walk there.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List

import duckdb
import pytest
from dlt.common.versioned_state import decompress_state
from recording_server import RecordingServer

from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "klaviyo_pipeline.py"
DLT = Path(sys.executable).with_name("dlt")
# DEBUG for every logger, not only dlt's: urllib3 and requests log through the root logger.
DEBUG_EVERYTHING = (
    "import logging, runpy, sys; logging.basicConfig(level=logging.DEBUG); "
    f"sys.argv = [{str(SCRIPT)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
)
CLI_VIEWS = [["trace"], ["trace", "-vv"], ["info", "-v"], ["load-package", "-v"], ["failed-jobs"]]


@pytest.fixture
def account() -> Account:
    return generate_account(seed=31, segments=4, tags=3, profiles=300, memberships=600)


@pytest.fixture
def served(account: Account) -> Iterator[KlaviyoSimulator]:
    with KlaviyoSimulator(account, rate_limits=False) as simulator:
        yield simulator


def _env(tmp_path: Path, simulator: KlaviyoSimulator, key: str) -> Dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SOURCES__", "DESTINATION__", "RUNTIME__"))
    }
    env.update(
        {
            "DLT_DATA_DIR": str(tmp_path / "dlt_home"),
            "DESTINATION__DUCKDB__CREDENTIALS": str(tmp_path / "export.duckdb"),
            "SOURCES__KLAVIYO__API_KEY": key,
            "SOURCES__KLAVIYO__BASE_URL": simulator.base_url,
            "SOURCES__KLAVIYO__RATE_LIMIT_TIME_SCALE": "1000",
            "RUNTIME__LOG_LEVEL": "DEBUG",
            "RUNTIME__HTTP_SHOW_ERROR_BODY": "true",
            "RUNTIME__REQUEST_BACKOFF_FACTOR": "0.05",
        }
    )
    return env


def _run(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _everything_shown(env: Dict[str, str]) -> str:
    """What dlt's CLI prints about the pipeline afterwards, every view concatenated."""
    with ThreadPoolExecutor(max_workers=len(CLI_VIEWS)) as pool:
        results = pool.map(
            lambda view: _run([str(DLT), "pipeline", "klaviyo_segments", *view], env), CLI_VIEWS
        )
        return "\n".join(result.stdout + result.stderr for result in results)


def _files_holding(folder: Path, secret: str) -> List[str]:
    needle = secret.encode()
    return [
        str(path) for path in folder.rglob("*") if path.is_file() and needle in path.read_bytes()
    ]


def _table_text(database: Path) -> str:
    """Every value of every table in the DuckDB file, dlt's compressed state unpacked."""
    texts = []
    with duckdb.connect(str(database), read_only=True) as db:
        tables = db.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
        for schema, table in tables:
            rows = db.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            texts.append(repr(rows))
            if table == "_dlt_pipeline_state":
                for (state,) in db.execute(f'SELECT state FROM "{schema}"."{table}"').fetchall():
                    texts.append(repr(decompress_state(state)))
    return "\n".join(texts)


def test_the_key_never_shows_in_debug_logs_cli_views_files_or_tables(
    served: KlaviyoSimulator, tmp_path: Path
) -> None:
    key = served.api_key
    env = _env(tmp_path, served, key)
    # Retries and a throttle on the way, so that their log lines are searched too.
    served.inject_fault("status", status=503, times=1, path_contains="/profiles")
    served.inject_fault("throttle", times=1, path_contains="/profiles", retry_after=None)
    served.inject_fault("truncate", times=1, path_contains="/api/segments?")

    result = _run([sys.executable, "-c", DEBUG_EVERYTHING], env)

    assert result.returncode == 0, result.stderr[-2000:]
    logs = result.stdout + result.stderr
    # DEBUG really was on everywhere: dlt's request lines and urllib3's connection lines.
    assert "Making GET request to" in logs and "Starting new HTTP connection" in logs
    assert served.base_url in logs
    assert key not in logs
    shown = _everything_shown(env)
    assert "klaviyo_segments" in shown and "segment_memberships" in shown
    assert key not in shown
    assert _files_holding(tmp_path / "dlt_home", key) == []
    assert _files_holding(tmp_path / "dlt_home", served.base_url)  # the search does find things
    tables = _table_text(tmp_path / "export.duckdb")
    assert "segment_memberships" in tables or len(tables) > 10_000
    assert key not in tables


def test_a_rejected_key_never_shows_even_with_error_bodies_on(
    served: KlaviyoSimulator, tmp_path: Path
) -> None:
    wrong = "pk_rejected_0123456789abcdef0123"
    env = _env(tmp_path, served, wrong)

    result = _run([sys.executable, "-c", DEBUG_EVERYTHING], env)

    assert result.returncode == 1
    assert "401" in result.stderr.splitlines()[-1]
    assert "Making GET request to" in result.stdout + result.stderr
    assert wrong not in result.stdout + result.stderr
    assert wrong not in _everything_shown(env)
    assert _files_holding(tmp_path / "dlt_home", wrong) == []
    database = tmp_path / "export.duckdb"
    assert not database.exists() or wrong not in _table_text(database)


def test_the_key_stays_home_when_a_walk_is_led_elsewhere_or_answers_404_at_debug(
    account: Account, served: KlaviyoSimulator, tmp_path: Path
) -> None:
    key = served.api_key
    env = _env(tmp_path, served, key)
    # Two segments of several pages: one's next link leads to another origin, the other's
    # second page answers 404, which the segment's own GET then answers with the segment.
    led_away, not_found = sorted(account.memberships(), key=lambda sid: -len(account.members(sid)))[
        :2
    ]
    assert len(account.members(not_found)) > 100
    with RecordingServer() as elsewhere:
        served.inject_fault(
            "relink", origin=elsewhere.origin, path_contains=f"/{led_away}/profiles"
        )
        served.inject_fault("status", status=404, skip=1, path_contains=f"/{not_found}/profiles")

        result = _run([sys.executable, "-c", DEBUG_EVERYTHING], env)

    assert result.returncode == 1
    assert elsewhere.received == []
    logs = result.stdout + result.stderr
    assert "Making GET request to" in logs and elsewhere.origin in logs
    confirmed = [
        r for r in served.request_log if r.operation == "get_segment" and not_found in r.path
    ]
    assert confirmed and confirmed[-1].status == 200
    assert key not in logs
    assert key not in _everything_shown(env)
    assert _files_holding(tmp_path / "dlt_home", key) == []
    assert key not in _table_text(tmp_path / "export.duckdb")
