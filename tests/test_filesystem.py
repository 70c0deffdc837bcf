"""The membership scenarios into the filesystem destination as parquet, read back with DuckDB.

Plain parquet files cannot be merged into: dlt falls back to appending, so every load adds the
versions of the rows it changed. Read back the way a user of the files would, with DuckDB's
`read_parquet` over each table's folder, keeping for each key the version with the newest
`_dlt_load_id`; the source itself reads what it loaded before in the same way
(klaviyo_source/held.py). The scenario steps and checks are those of tests/test_postgres.py.
"""

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import dlt
import duckdb
import pytest
from scenarios import settled_segments
from two_runs import (
    ACCOUNT_SEED,
    DATA_TABLES,
    MERGE_KEYS,
    SMALL_ACCOUNT,
    assert_first_run_matches_truth,
    assert_summary_matches_truth,
    assert_views_match_truth,
    run_two_scenario_runs,
    snapshot,
)

from klaviyo_source import settings
from klaviyo_source.simulator import Account, generate_account
from klaviyo_source.views import create_views, view_definitions

DATASET = "klaviyo"
# The DuckDB schema of the readback that shows every row version the files hold.
ALL_VERSIONS = "files"


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No anonymous usage reports from dlt: the tests reach nothing but 127.0.0.1."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")


@pytest.fixture
def account() -> Account:
    """The same small account as the PostgreSQL tests."""
    return generate_account(seed=ACCOUNT_SEED, **SMALL_ACCOUNT)


class ParquetReadback:
    """The tables a filesystem pipeline wrote, as DuckDB views over its parquet files.

    Schema `files` holds every row version the files hold, as dlt's own reader of the files
    (`pipeline.dataset()`) shows them. The tables of the main schema show, for a merged table,
    the newest loaded version of each key (read here independently of the project's SQL); a
    replaced table shows its files as they are (dlt deletes the earlier ones). The four SQL
    views of `klaviyo_source.views` are created over the `files` schema with
    `view_definitions(..., newest_versions=True)`, as a user of the files would. Offers
    `sql_client()` and `default_schema` like a pipeline, so tests/expected.py's readers work
    on it.
    """

    def __init__(self, pipeline: dlt.Pipeline, bucket: Path) -> None:
        self.pipeline = pipeline
        self.folder = bucket / DATASET
        self.connection = duckdb.connect()
        # The views turn timestamps into days; make those UTC days, as on the test server.
        self.connection.execute("SET TimeZone = 'UTC'")
        self.connection.execute(f"CREATE SCHEMA {ALL_VERSIONS}")

    @property
    def default_schema(self) -> Any:
        return self.pipeline.default_schema

    def files(self, table: str) -> List[Path]:
        return sorted((self.folder / table).glob("*.parquet"))

    def all_versions(self, table: str) -> str:
        """Every row version the table's files hold (columns added later are NULL before)."""
        return f"read_parquet('{self.folder / table}/*.parquet', union_by_name = true)"

    def _refresh(self) -> None:
        for table in DATA_TABLES:
            if not self.files(table):
                continue
            source = self.all_versions(table)
            self.connection.execute(
                f"CREATE OR REPLACE VIEW {ALL_VERSIONS}.{table} AS SELECT * FROM {source}"
            )
            key = MERGE_KEYS.get(table)
            if key is not None:
                source = (
                    f"(SELECT * EXCLUDE (version_rank) FROM (SELECT *, ROW_NUMBER() OVER "
                    f"(PARTITION BY {key} ORDER BY _dlt_load_id DESC) AS version_rank "
                    f"FROM {source}) WHERE version_rank = 1)"
                )
            self.connection.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {source}")
        if self.files(settings.PERIODS_TABLE):
            definitions = view_definitions(
                lambda name: f"{ALL_VERSIONS}.{name}" if name in DATA_TABLES else name,
                with_profiles=bool(self.files(settings.PROFILES_TABLE)),
                newest_versions=True,
            )
            for name, body in definitions.items():
                self.connection.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")

    # The sql_client() protocol that tests/expected.py uses.
    def sql_client(self) -> "ParquetReadback":
        return self

    def __enter__(self) -> "ParquetReadback":
        self._refresh()
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def execute_sql(self, sql: str, *args: Any) -> List[Tuple[Any, ...]]:
        return self.connection.execute(sql, list(args) or None).fetchall()

    def raw(self, sql: str) -> List[Tuple[Any, ...]]:
        return self.connection.execute(sql).fetchall()


@pytest.fixture
def parquet_pipeline(tmp_path: Path) -> Iterator[Tuple[dlt.Pipeline, ParquetReadback]]:
    bucket = tmp_path / "bucket"
    pipeline = dlt.pipeline(
        pipeline_name="klaviyo_segments",
        pipelines_dir=str(tmp_path / "pipelines"),
        destination=dlt.destinations.filesystem(bucket_url=str(bucket)),
        dataset_name=DATASET,
    )
    reader = ParquetReadback(pipeline, bucket)
    yield pipeline, reader
    reader.connection.close()


def _run(pipeline: dlt.Pipeline, source_for: Callable) -> None:
    pipeline.run(source_for(), loader_file_format="parquet")


def _versions_written_twice_in_one_load(reader: ParquetReadback) -> Dict[str, List[Any]]:
    """Keys a single load wrote in more than one version: newest-version reading would pick
    one of them at random.

    A profile in several segments is written once per segment walk (the SQL destinations
    merge those copies into one row), so the profiles table may repeat a key within a load,
    but only with the same content.
    """
    found = {}
    for table, key in MERGE_KEYS.items():
        versions = reader.all_versions(table)
        if table == settings.PROFILES_TABLE:
            versions = f"(SELECT DISTINCT * FROM {versions})"
        rows = reader.raw(
            f"SELECT {key}, _dlt_load_id FROM {versions} GROUP BY ALL HAVING COUNT(*) > 1"
        )
        if rows:
            found[table] = rows[:5]
    return found


def _row_versions(reader: ParquetReadback, tables: Sequence[str]) -> Dict[str, int]:
    return {
        table: reader.raw(f"SELECT COUNT(*) FROM {reader.all_versions(table)}")[0][0]
        for table in tables
    }


def test_first_run_to_parquet_equals_the_truth(
    account: Account,
    source_for: Callable,
    parquet_pipeline: Tuple[dlt.Pipeline, ParquetReadback],
) -> None:
    pipeline, reader = parquet_pipeline
    _run(pipeline, source_for)

    for table in DATA_TABLES:
        assert reader.files(table), f"no parquet file for {table}"
        assert not list((reader.folder / table).glob("*.jsonl")), table
    assert_first_run_matches_truth(reader, account)
    assert _versions_written_twice_in_one_load(reader) == {}
    # create_views has nothing to do on plain files; the same definitions work in DuckDB.
    assert create_views(pipeline) == []
    assert_views_match_truth(reader, account, deleted=None)


def test_second_run_to_parquet_follows_every_change(
    account: Account,
    source_for: Callable,
    parquet_pipeline: Tuple[dlt.Pipeline, ParquetReadback],
) -> None:
    pipeline, reader = parquet_pipeline

    changes, after_second = run_two_scenario_runs(
        lambda: _run(pipeline, source_for), reader, account
    )

    assert _versions_written_twice_in_one_load(reader) == {}
    # The files hold the earlier versions too: without newest-version reading, ended
    # memberships would show twice.
    ended = len(changes.leaves) + len(changes.deleted_members) + 1  # + the re-join
    versions = _row_versions(reader, [settings.MEMBERSHIPS_TABLE])[settings.MEMBERSHIPS_TABLE]
    current = reader.raw(f"SELECT COUNT(*) FROM {settings.MEMBERSHIPS_TABLE}")[0][0]
    assert versions - current == ended
    # A replaced table keeps only its newest load's files.
    for table in (settings.TAGS_TABLE, settings.SEGMENT_TAGS_TABLE):
        assert len({path.name.split(".")[0] for path in reader.files(table)}) == 1, table
    assert_views_match_truth(reader, account, deleted=changes.deleted)

    # Nothing changed since: nothing the files hold moves, and no membership, period or
    # profile is written again (held rows are read back from the files).
    unchanged_tables = (
        settings.MEMBERSHIPS_TABLE,
        settings.PERIODS_TABLE,
        settings.PROFILES_TABLE,
    )
    before = _row_versions(reader, unchanged_tables)
    _run(pipeline, source_for)
    assert snapshot(reader) == after_second
    assert _row_versions(reader, unchanged_tables) == before
    assert_views_match_truth(reader, account, deleted=changes.deleted)


def _change_members(account: Account, segments: Sequence[str], joined: datetime) -> None:
    """A join, a leave and a re-join, each in a segment of its own."""
    joins, leaves, rejoins = segments
    newcomer = next(pid for pid in sorted(account.profiles()) if pid not in account.members(joins))
    account.join(joins, newcomer, at=joined)
    account.leave(leaves, sorted(account.members(leaves))[0])
    account.rejoin(rejoins, sorted(account.members(rejoins))[0], at=joined)


def test_three_runs_to_parquet_count_each_key_once_in_summary_and_views(
    account: Account,
    source_for: Callable,
    parquet_pipeline: Tuple[dlt.Pipeline, ParquetReadback],
) -> None:
    pipeline, reader = parquet_pipeline
    settled = sorted(settled_segments(account))  # by id: the first has room for a join
    assert len(settled) >= 3, "the changes need three settled segments with members"
    now = datetime.now(timezone.utc).replace(microsecond=0)

    _run(pipeline, source_for)
    _change_members(account, settled[:3], joined=now - timedelta(minutes=2))
    _run(pipeline, source_for)
    # The other way round: the segment that lost a member gains one, and so on.
    _change_members(account, settled[2::-1], joined=now - timedelta(minutes=1))
    _run(pipeline, source_for)

    # The files hold a version of every segment per run, and the earlier versions of every
    # membership that changed.
    for table in (settings.SEGMENTS_TABLE, settings.MEMBERSHIPS_TABLE):
        versions = reader.raw(f"SELECT COUNT(*) FROM {reader.all_versions(table)}")[0][0]
        keys = reader.raw(
            f"SELECT COUNT(DISTINCT {MERGE_KEYS[table]}) FROM {reader.all_versions(table)}"
        )[0][0]
        assert versions > keys, table
    assert_summary_matches_truth(pipeline, account)
    assert_views_match_truth(reader, account, deleted=None)
