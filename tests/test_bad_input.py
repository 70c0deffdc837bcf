"""Bad input through the pipeline script: one clear line (cause and fix), exit 1, nothing written.

Each case runs `pipelines/klaviyo_pipeline.py` as `__main__` in a process of its own, configured
only by environment variables, against the simulator (or an address nothing listens on). The
processes are forked from a server that has imported dlt once (over a second of CPU each
otherwise); the cases are independent, so they all start at once and each test checks its own
outcome.
"""

import multiprocessing
import os
import runpy
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import duckdb
import pytest
from script_runs import REPO, SCRIPT, script_env

from klaviyo_source.simulator import KlaviyoSimulator, generate_account

WRONG_KEY = "pk_wrong_0123456789abcdef"


@dataclass(frozen=True)
class Case:
    """One misconfiguration: the key's scopes, the environment, what the line must say."""

    env: Dict[str, str]
    says: List[str]
    scopes: Optional[Set[str]] = None  # a key with only these scopes; None: a full key


CASES: Dict[str, Case] = {
    "wrong-key-401": Case(
        {"SOURCES__KLAVIYO__API_KEY": WRONG_KEY}, ["401", "SOURCES__KLAVIYO__API_KEY"]
    ),
    "no-tags-scope-403": Case(
        {}, ["403", "tags:read", "API keys"], {"segments:read", "profiles:read"}
    ),
    "no-profiles-scope-403": Case(
        {}, ["403", "profiles:read", "API keys"], {"segments:read", "tags:read"}
    ),
    "no-segments-scope-403": Case(
        {}, ["403", "segments:read", "API keys"], {"profiles:read", "tags:read"}
    ),
    "unknown-segment-id": Case(
        {"SOURCES__KLAVIYO__SEGMENT_IDS": '["x"]'}, ["no segment with id x", "segment_ids"]
    ),
    "unknown-profile-field": Case(
        {"SOURCES__KLAVIYO__PROFILE_ADDITIONAL_FIELDS": '["nope"]'},
        ["profile_additional_fields", "nope", "predictive_analytics"],
    ),
    "negative-lookback": Case(
        {"SOURCES__KLAVIYO__LOOKBACK_MINUTES": "-1"}, ["lookback_minutes", "0 or more"]
    ),
    "negative-profile-lookback": Case(
        {"SOURCES__KLAVIYO__PROFILE_LOOKBACK_MINUTES": "-5"},
        ["profile_lookback_minutes", "0 or more"],
    ),
    "zero-rate-share": Case({"SOURCES__KLAVIYO__RATE_LIMIT_SHARE": "0"}, ["rate_limit_share"]),
    "rate-share-not-a-number": Case(
        {"SOURCES__KLAVIYO__RATE_LIMIT_SHARE": "half"},
        ["rate_limit_share", "not a valid float", "SOURCES__KLAVIYO__RATE_LIMIT_SHARE"],
    ),
    "is-active-not-a-bool": Case(
        {"SOURCES__KLAVIYO__IS_ACTIVE": "maybe"}, ["is_active", "not a valid bool"]
    ),
    "reports-start-not-a-date": Case(
        {"SOURCES__KLAVIYO__SEGMENT_REPORTS_START": "yesterday"},
        ["segment_reports_start", "'yesterday'", "YYYY-MM-DD"],
    ),
    "malformed-revision": Case(
        {"SOURCES__KLAVIYO__REVISION": "2025/04/15"}, ["2025/04/15", "YYYY-MM-DD", "revision"]
    ),
    "base-url-without-scheme": Case(
        {"SOURCES__KLAVIYO__BASE_URL": "a.klaviyo.com"}, ["a.klaviyo.com", "base_url"]
    ),
    "unreachable-base-url": Case(
        {"SOURCES__KLAVIYO__BASE_URL": "http://127.0.0.1:9"},
        ["http://127.0.0.1:9", "connection refused", "base_url"],
    ),
    "timeout-not-a-number": Case(
        {"RUNTIME__REQUEST_TIMEOUT": "soon"}, ["[runtime] request_timeout", "RUNTIME__"]
    ),
}


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time of the script, for a reader of a failure
    database: Path
    api_key: str

    def lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def data_tables(self) -> Set[str]:
        if not self.database.exists():
            return set()
        with duckdb.connect(str(self.database), read_only=True) as db:
            rows = db.execute("SELECT table_name FROM information_schema.tables").fetchall()
        return {name for (name,) in rows if not name.startswith("_dlt")}


def _script_as_main(env: Dict[str, str], stdout: Path, stderr: Path) -> None:
    """In the forked process: the script as a scheduler starts it; its exit code is the
    process's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    with stdout.open("w") as out, stderr.open("w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [str(SCRIPT)]
        runpy.run_path(str(SCRIPT), run_name="__main__")


def _run(
    name: str,
    case: Case,
    simulator: KlaviyoSimulator,
    folder: Path,
    processes: ForkServerContext,
) -> Outcome:
    # dlt's own retry defaults, on purpose: an unreachable base_url must not wait them out.
    env = script_env(
        folder / name,
        simulator.base_url,
        simulator.api_key,
        SOURCES__KLAVIYO__RATE_LIMIT_TIME_SCALE="1000",
    )
    database = Path(env["DESTINATION__DUCKDB__CREDENTIALS"])
    env.update(case.env)
    stdout, stderr = folder / f"{name}.out", folder / f"{name}.err"
    started = time.monotonic()
    process = processes.Process(target=_script_as_main, args=(env, stdout, stderr))
    process.start()
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        process.join()
    return Outcome(
        process.exitcode if process.exitcode is not None else -1,
        stdout.read_text(),
        stderr.read_text(),
        time.monotonic() - started,
        database,
        env["SOURCES__KLAVIYO__API_KEY"],
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Outcome]]:
    account = generate_account(seed=5, segments=4, tags=3, profiles=200, memberships=400)
    folder = tmp_path_factory.mktemp("bad_input")
    simulators: Dict[Optional[frozenset], KlaviyoSimulator] = {}
    for case in CASES.values():
        scopes = frozenset(case.scopes) if case.scopes is not None else None
        if scopes not in simulators:
            keys = None if scopes is None else {"pk_limited_0123456789": set(scopes)}
            simulators[scopes] = KlaviyoSimulator(account, api_keys=keys, rate_limits=False)
            simulators[scopes].start()

    # A fork server, not fork: this process runs the simulators' threads.
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["dlt", "klaviyo_source.cli"])

    def outcome(name: str) -> Outcome:
        case = CASES[name]
        scopes = frozenset(case.scopes) if case.scopes is not None else None
        return _run(name, case, simulators[scopes], folder, processes)

    try:
        # The unreachable base_url runs alone afterwards: its test times it.
        parallel = [name for name in CASES if name != "unreachable-base-url"]
        with ThreadPoolExecutor(max_workers=len(parallel)) as pool:
            results = dict(zip(parallel, pool.map(outcome, parallel), strict=True))
        results["unreachable-base-url"] = outcome("unreachable-base-url")
        yield results
    finally:
        for simulator in simulators.values():
            simulator.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_clear_line_and_writes_nothing(
    name: str, outcomes: Dict[str, Outcome]
) -> None:
    outcome = outcomes[name]
    assert outcome.returncode == 1, outcome.stderr
    lines = outcome.lines()
    assert len(lines) == 1, outcome.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in outcome.stderr
    for fragment in CASES[name].says:
        assert fragment in line
    assert outcome.data_tables() == set()
    assert outcome.api_key not in outcome.stdout + outcome.stderr


def test_an_unreachable_base_url_is_not_retried(outcomes: Dict[str, Outcome]) -> None:
    # dlt's default retries (5 attempts, backoff 1 s) would wait 15 s for a typo: refused is
    # not retried while the host has never answered. Every retry is announced on the
    # per-segment output ("attempt 2 of 5 in 1.0 s"): there is none.
    outcome = outcomes["unreachable-base-url"]
    assert outcome.returncode == 1
    assert "attempt 2 of" not in outcome.stdout + outcome.stderr
