"""The two-run scenario (tests/two_runs.py) loaded into a real PostgreSQL server.

The server is started by the suite itself (tests/postgres_server.py: PostgreSQL 16 from the
`pgserver` wheel, on a loopback port), each test loads into its own dataset (schema) and the
loaded tables and the four SQL views are compared with the simulator's ground truth.
"""

import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Set

import dlt
import pytest
from expected import query
from postgres_server import PostgresServer, postgres_server_fixture
from two_runs import (
    ACCOUNT_SEED,
    SMALL_ACCOUNT,
    VIEWS,
    assert_first_run_matches_truth,
    assert_klaviyo_counts_beside_ours,
    assert_newest_version_views_answer_alike,
    assert_summary_matches_truth,
    assert_views_match_truth,
    run_two_scenario_runs,
    snapshot,
)

from klaviyo_source.simulator import Account, generate_account
from klaviyo_source.views import create_views

postgres_server = postgres_server_fixture()


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No anonymous usage reports from dlt: the tests reach nothing but 127.0.0.1."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")


@pytest.fixture
def account() -> Account:
    """A smaller account than conftest's, so both runs stay fast on PostgreSQL."""
    return generate_account(seed=ACCOUNT_SEED, **SMALL_ACCOUNT)


@pytest.fixture
def postgres_pipeline(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[dlt.Pipeline]:
    """The real pipeline's name, loading into a dataset of this test's own on the server."""
    dataset = f"klaviyo_{secrets.token_hex(4)}"
    yield dlt.pipeline(
        pipeline_name="klaviyo_segments",
        pipelines_dir=str(tmp_path / "pipelines"),
        destination=dlt.destinations.postgres(credentials=postgres_server.dsn()),
        dataset_name=dataset,
    )
    connection = postgres_server.connect()
    try:
        connection.cursor().execute(f'DROP SCHEMA IF EXISTS "{dataset}" CASCADE')
    finally:
        connection.close()


def assert_profile_properties_are_json_objects(reader: Any) -> None:
    """`properties` holds JSON objects, not JSON strings that spell one."""
    kinds = query(reader, "SELECT DISTINCT jsonb_typeof(properties) FROM profiles")
    assert {kind for (kind,) in kinds} <= {"object", None}
    assert ("object",) in kinds


# -- PostgreSQL --------------------------------------------------------------------------------


def _views_in(server: PostgresServer, dataset: str) -> Set[str]:
    connection = server.connect()
    try:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT table_name FROM information_schema.views WHERE table_schema = %s", (dataset,)
        )
        return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def test_first_run_into_postgres_equals_the_truth(
    account: Account,
    source_for: Callable,
    postgres_pipeline: dlt.Pipeline,
    postgres_server: PostgresServer,
) -> None:
    postgres_pipeline.run(source_for())

    assert postgres_pipeline.destination.destination_name == "postgres"
    assert_first_run_matches_truth(postgres_pipeline, account)
    assert_profile_properties_are_json_objects(postgres_pipeline)
    assert create_views(postgres_pipeline) == list(VIEWS)
    assert _views_in(postgres_server, postgres_pipeline.dataset_name) == set(VIEWS)
    assert_views_match_truth(postgres_pipeline, account, deleted=None)
    assert_summary_matches_truth(postgres_pipeline, account)


def test_second_run_into_postgres_follows_every_change(
    account: Account,
    source_for: Callable,
    postgres_pipeline: dlt.Pipeline,
    postgres_server: PostgresServer,
) -> None:
    def run() -> None:
        postgres_pipeline.run(source_for())

    changes, after_second = run_two_scenario_runs(run, postgres_pipeline, account)

    assert create_views(postgres_pipeline) == list(VIEWS)
    assert _views_in(postgres_server, postgres_pipeline.dataset_name) == set(VIEWS)
    assert_views_match_truth(postgres_pipeline, account, deleted=changes.deleted)
    assert_klaviyo_counts_beside_ours(postgres_pipeline)
    assert_summary_matches_truth(postgres_pipeline, account)
    assert_newest_version_views_answer_alike(postgres_pipeline)

    # Nothing changed since: the held rows are read back from PostgreSQL and nothing moves.
    run()
    assert snapshot(postgres_pipeline) == after_second
    # The views survive a later load and can be created again over themselves.
    assert_views_match_truth(postgres_pipeline, account, deleted=changes.deleted)
    assert create_views(postgres_pipeline) == list(VIEWS)
