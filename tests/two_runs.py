"""The two-run scenario every destination runs: a first export, changes of every kind, a
second export, each checked against the simulator's truth.

The steps and checks are written against anything that offers `sql_client()` and
`default_schema` like a dlt pipeline, so the DuckDB, PostgreSQL and filesystem tests run the same
ones (tests/test_views.py, tests/test_postgres.py, tests/test_filesystem.py).
"""

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import dlt
from expected import (
    loaded_memberships,
    loaded_profiles,
    loaded_segment_tags,
    loaded_segments,
    loaded_tags,
    member_ids,
    query,
    table_snapshot,
    true_memberships,
    true_profiles,
    true_segments,
    utc,
)
from scenarios import settled_segments

from klaviyo_source import settings
from klaviyo_source.simulator import Account
from klaviyo_source.summary import membership_summary
from klaviyo_source.views import view_definitions

# Small enough for a few seconds per test; the largest segment still spans four pages.
SMALL_ACCOUNT: Dict[str, int] = {"segments": 6, "tags": 4, "profiles": 400, "memberships": 1000}
ACCOUNT_SEED = 21

DATA_TABLES = (
    settings.SEGMENTS_TABLE,
    settings.TAGS_TABLE,
    settings.SEGMENT_TAGS_TABLE,
    settings.MEMBERSHIPS_TABLE,
    settings.PERIODS_TABLE,
    settings.PROFILES_TABLE,
)
# The primary key of every merged table: one row per key, whatever the destination.
MERGE_KEYS: Dict[str, str] = {
    settings.SEGMENTS_TABLE: "id",
    settings.MEMBERSHIPS_TABLE: "membership_id",
    settings.PERIODS_TABLE: "period_id",
    settings.PROFILES_TABLE: "id",
}
VIEWS = (
    "current_segment_members",
    "segment_membership_history",
    "segment_joins_leaves_daily",
    "segment_size_daily",
    "segment_size_vs_klaviyo_daily",
)

Membership = Tuple[str, str]  # (segment_id, profile_id)


@dataclass
class Changes:
    """What changed in the account between two runs, to check the second run against."""

    now: datetime
    joins: Dict[Membership, datetime] = field(default_factory=dict)
    rejoin: Optional[Membership] = None
    leaves: Dict[Membership, datetime] = field(default_factory=dict)
    created: str = ""
    deleted: str = ""
    deleted_name: str = ""
    deleted_members: Set[str] = field(default_factory=set)


def change_between_runs(account: Account) -> Changes:
    """Joins (one late-visible), a re-join, a new segment, leaves, profile edits and a deleted
    segment."""
    settled = settled_segments(account)
    assert len(settled) >= 3, "the scenario needs three settled segments with members"
    big, mid, small = settled[0], settled[1], settled[-1]
    populated = [sid for sid, members in account.memberships().items() if members]
    doomed = next(sid for sid in populated if sid not in (big, mid, small))
    changes = Changes(now=datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5))

    # A new join, and a late-visible one: older than the newest join already loaded, but
    # inside the lookback window.
    cursor = max(account.members(small).values())
    newcomer, late = [pid for pid in account.profiles() if pid not in account.members(small)][:2]
    for profile_id, joined in ((newcomer, changes.now), (late, cursor - timedelta(minutes=20))):
        account.join(small, profile_id, at=joined)
        changes.joins[(small, profile_id)] = joined

    rejoiner = sorted(account.members(big))[0]
    account.rejoin(big, rejoiner, at=changes.now)
    changes.rejoin = (big, rejoiner)

    for profile_id in sorted(account.members(mid))[:5]:
        account.leave(mid, profile_id)
        changes.leaves[(mid, profile_id)] = datetime.now(timezone.utc)

    changes.created = account.create_segment(
        "Created between runs", tag_ids=sorted(account.tags())[:1]
    )
    for profile_id in sorted(account.profiles())[:30]:
        joined = changes.now - timedelta(days=3)
        account.join(changes.created, profile_id, at=joined)
        changes.joins[(changes.created, profile_id)] = joined

    # Members no walk lists (their memberships stay as they are): only the profile refresh
    # brings their edits.
    listed = {profile_id for _, profile_id in changes.joins} | {rejoiner}
    quiet = [pid for pid in sorted(account.members(mid)) if pid not in listed]
    for n, profile_id in enumerate(quiet[:3]):
        account.update_profile(profile_id, email=f"edited.{n}@example.com", properties={"n": n})

    changes.deleted = doomed
    changes.deleted_name = account.segments()[doomed]["name"]
    changes.deleted_members = set(account.members(doomed))
    account.delete_segment(doomed)
    return changes


def assert_no_duplicate_keys(reader: Any) -> None:
    """Every merged table holds one row per primary key."""
    for table, key in MERGE_KEYS.items():
        repeated = query(reader, f"SELECT {key} FROM {table} GROUP BY {key} HAVING COUNT(*) > 1")
        assert repeated == [], f"{table} holds {key}s more than once: {repeated[:5]}"


def assert_tables_match_truth(reader: Any, account: Account) -> None:
    """Segments, tags, links, current memberships and member profiles equal the truth."""
    live = true_segments(account)
    held_segments = loaded_segments(reader)
    assert {sid: row for sid, row in held_segments.items() if sid in live} == live
    assert loaded_tags(reader) == account.tags()
    assert loaded_segment_tags(reader) == account.segment_tags()
    assert loaded_memberships(reader) == true_memberships(account)

    held_profiles = loaded_profiles(reader)
    assert set(held_profiles) >= member_ids(account)
    assert held_profiles == true_profiles(account, held_profiles)


def assert_first_run_matches_truth(reader: Any, account: Account) -> None:
    """A first run: the truth row by row, every membership current with one open period."""
    assert set(loaded_segments(reader)) == set(account.segments())
    assert_tables_match_truth(reader, account)
    rows = query(
        reader,
        "SELECT membership_id, is_member, first_seen_at, last_seen_at, left_at_latest, left_reason "
        "FROM segment_memberships",
    )
    assert len(rows) == sum(len(m) for m in account.memberships().values())
    for _, is_member, first_seen, last_seen, left_at_latest, reason in rows:
        assert is_member and first_seen == last_seen and left_at_latest is None and reason is None
    periods = query(reader, "SELECT membership_id, left_at_latest FROM segment_membership_periods")
    assert sorted(p[0] for p in periods) == sorted(r[0] for r in rows)
    assert all(left is None for _, left in periods)
    assert_no_duplicate_keys(reader)


def first_seen_times(reader: Any) -> Dict[str, datetime]:
    rows = query(reader, "SELECT membership_id, first_seen_at FROM segment_memberships")
    return {membership_id: utc(seen) for membership_id, seen in rows}


def assert_second_run_matches_truth(
    reader: Any, account: Account, changes: Changes, first_seen_before: Dict[str, datetime]
) -> None:
    """After the changes: the truth again, with every ending recorded and history kept."""
    assert_tables_match_truth(reader, account)
    assert_no_duplicate_keys(reader)
    segments = loaded_segments(reader)
    assert segments[changes.created]["deleted_at"] is None
    assert segments[changes.deleted]["deleted_at"] is not None
    assert segments[changes.deleted]["name"] == changes.deleted_name

    recorded = {
        (row[0], row[1]): row[2:]
        for row in query(
            reader,
            "SELECT segment_id, profile_id, is_member, joined_group_at, first_seen_at, "
            "last_seen_at, left_at_latest, left_reason FROM segment_memberships",
        )
    }
    for key, joined in changes.joins.items():
        assert recorded[key][0] is True and utc(recorded[key][1]) == joined, key
    for key, left_at in changes.leaves.items():
        is_member, _, _, last_seen, left_at_latest, reason = recorded[key]
        assert not is_member and reason == "left", key
        assert utc(last_seen) <= left_at <= utc(left_at_latest), key
    deleted_rows = {key: row for key, row in recorded.items() if key[0] == changes.deleted}
    assert {pid for _, pid in deleted_rows} == changes.deleted_members
    assert all(
        not row[0] and row[5] == "segment_deleted" and row[4] is not None
        for row in deleted_rows.values()
    )

    assert changes.rejoin is not None
    big, rejoiner = changes.rejoin
    assert utc(recorded[changes.rejoin][1]) == changes.now
    periods = query(
        reader,
        "SELECT joined_group_at, left_at_latest, left_reason FROM segment_membership_periods "
        f"WHERE segment_id = '{big}' AND profile_id = '{rejoiner}' ORDER BY joined_group_at",
    )
    assert len(periods) == 2
    (_, closed_at, closed_reason), (reopened, still_open, _) = periods
    assert closed_reason == "rejoined" and utc(closed_at) == changes.now
    assert utc(reopened) == changes.now and still_open is None

    # Memberships that did not change keep the time this pipeline first saw them.
    changed = {f"{sid}:{pid}" for sid, pid in (*changes.joins, changes.rejoin)}
    for membership_id, seen in first_seen_times(reader).items():
        if membership_id in first_seen_before and membership_id not in changed:
            assert seen == first_seen_before[membership_id], membership_id


def snapshot(reader: Any) -> Dict[str, List[Tuple[Any, ...]]]:
    """Every data table without dlt's bookkeeping columns."""
    return {table: table_snapshot(reader, table) for table in DATA_TABLES}


Period = Tuple[str, str, datetime, Optional[datetime], Optional[str], bool]


def daily_changes(periods: List[Period]) -> Dict[Tuple[str, date], List[int]]:
    """[joins, leaves, re-joins] per segment and UTC day, from every period of the history.

    A re-join ends the period before it at the new period's join: the new period is then a
    re-join, not a join, and the ended one no leave. Any other ending is a leave, counted on
    the day it was found (`left_at_latest`).
    """
    rejoins = {
        (segment_id, profile_id, utc(left_at_latest))
        for segment_id, profile_id, _, left_at_latest, reason, _ in periods
        if reason == "rejoined" and left_at_latest is not None
    }
    changes: Dict[Tuple[str, date], List[int]] = {}
    for segment_id, profile_id, joined, left_at_latest, reason, _ in periods:
        started = 2 if (segment_id, profile_id, utc(joined)) in rejoins else 0
        changes.setdefault((segment_id, utc(joined).date()), [0, 0, 0])[started] += 1
        if left_at_latest is not None and reason != "rejoined":
            changes.setdefault((segment_id, utc(left_at_latest).date()), [0, 0, 0])[1] += 1
    return changes


def assert_views_match_truth(reader: Any, account: Account, deleted: Optional[str]) -> None:
    """The four views answer like the tables, and the tables like the truth."""
    segments = account.segments()
    profiles = account.profiles()
    current = query(
        reader,
        "SELECT segment_id, segment_name, profile_id, email, joined_group_at "
        "FROM current_segment_members",
    )
    assert len(current) == len(set(current))
    assert {(r[0], r[1], r[2], r[3], utc(r[4])) for r in current} == {
        (sid, segments[sid]["name"], pid, profiles[pid]["email"], joined)
        for sid, members in account.memberships().items()
        for pid, joined in members.items()
    }

    periods = query(
        reader,
        "SELECT segment_id, profile_id, joined_group_at, left_at_latest, left_reason, is_member "
        "FROM segment_membership_periods",
    )
    before = datetime.now(timezone.utc)
    history = query(
        reader,
        "SELECT segment_id, profile_id, joined_group_at, left_at_latest, left_reason, is_member, "
        "segment_name, days_in_segment FROM segment_membership_history",
    )
    after = datetime.now(timezone.utc)
    assert sorted(row[:6] for row in history) == sorted(periods)
    for segment_id, _, joined, left_at_latest, _, _, name, days in history:
        if segment_id in segments:
            assert name == segments[segment_id]["name"]
        else:
            assert segment_id == deleted and name  # a deleted segment keeps its last name
        if left_at_latest is not None:
            exact = (left_at_latest - joined).total_seconds() / 86400
            assert abs(float(days) - exact) < 1e-6
        else:
            low = (before - joined).total_seconds() - 1
            high = (after - joined).total_seconds() + 1
            assert low / 86400 <= float(days) <= high / 86400

    # Joins, leaves and re-joins per UTC day, from the history table; each with its name.
    daily = query(
        reader,
        "SELECT segment_id, day, joins, leaves, rejoins, segment_name "
        "FROM segment_joins_leaves_daily",
    )
    assert {(r[0], r[1]): [int(r[2]), int(r[3]), int(r[4])] for r in daily} == daily_changes(
        periods
    )
    for segment_id, _, _, _, _, name in daily:
        if segment_id in segments:
            assert name == segments[segment_id]["name"]
        else:
            assert segment_id == deleted and name

    # The size on each segment's last day is its member count now (0 once deleted).
    sizes = query(reader, "SELECT segment_id, day, members FROM segment_size_daily ORDER BY day")
    assert len(sizes) == len(daily)
    last_size: Dict[str, int] = {}
    for segment_id, _, members in sizes:
        assert int(members) >= 0
        last_size[segment_id] = int(members)
    truth = {sid: len(members) for sid, members in true_memberships(account).items()}
    if deleted is not None:
        truth[deleted] = 0
    assert last_size == truth


def assert_klaviyo_counts_beside_ours(reader: Any) -> None:
    """`segment_size_vs_klaviyo_daily` sets each reported day's `total_members` beside the size
    `segment_size_daily` gives on that day, from the segment's first export on."""
    reported = {
        (r[0], r[1]): int(r[2])
        for r in query(reader, "SELECT segment_id, date, total_members FROM segment_reports_daily")
    }
    sizes: Dict[str, List[Tuple[date, int]]] = {}
    for segment_id, day, members in query(
        reader, "SELECT segment_id, day, members FROM segment_size_daily ORDER BY day"
    ):
        sizes.setdefault(segment_id, []).append((day, int(members)))
    changes = {
        (r[0], r[1]): (int(r[2]), int(r[3]))
        for r in query(
            reader, "SELECT segment_id, day, joins, leaves FROM segment_joins_leaves_daily"
        )
    }
    exported = {
        segment_id: utc(first_seen).date()
        for segment_id, first_seen in query(
            reader,
            "SELECT segment_id, MIN(first_seen_at) FROM segment_membership_periods "
            "GROUP BY segment_id",
        )
    }
    rows = query(
        reader,
        "SELECT segment_id, day, klaviyo_members, observed_members, members_difference, joins, "
        "leaves FROM segment_size_vs_klaviyo_daily",
    )
    assert len(rows) == len(reported) > 0
    for segment_id, day, klaviyo, observed, difference, joins, leaves in rows:
        assert int(klaviyo) == reported[(segment_id, day)]
        if segment_id not in exported or day < exported[segment_id]:
            assert (observed, difference, joins, leaves) == (None, None, None, None)
            continue
        size = [members for changed, members in sizes.get(segment_id, []) if changed <= day]
        assert int(observed) == (size[-1] if size else 0)
        assert int(difference) == int(observed) - int(klaviyo)
        assert (int(joins), int(leaves)) == changes.get((segment_id, day), (0, 0))


def summary_counts(summary: str) -> Tuple[Dict[str, int], str]:
    """Members per segment id, and the closing total line, of `membership_summary`'s table."""
    *table, total = summary.splitlines()
    counts = {}
    for line in table[2:]:  # under the header and its rule
        _, segment_id, members = line.rsplit(None, 2)
        counts[segment_id] = int(members)
    return counts, total


def assert_summary_matches_truth(pipeline: dlt.Pipeline, account: Account) -> None:
    """The run's summary counts each live segment's current members once, as Klaviyo does."""
    counts, total = summary_counts(membership_summary(pipeline))
    truth = {segment_id: len(account.members(segment_id)) for segment_id in account.segments()}
    assert counts == truth
    assert total == f"{len(truth)} segments, {sum(truth.values())} memberships"


def run_two_scenario_runs(
    run: Callable[[], Any], reader: Any, account: Account
) -> Tuple[Changes, Dict[str, List[Tuple[Any, ...]]]]:
    """First run, changes, second run, checked against the truth; returns the changes and
    the tables after the second run."""
    run()
    assert_first_run_matches_truth(reader, account)
    first_seen = first_seen_times(reader)
    changes = change_between_runs(account)
    run()
    assert_second_run_matches_truth(reader, account, changes, first_seen)
    return changes, snapshot(reader)


def assert_newest_version_views_answer_alike(pipeline: dlt.Pipeline) -> None:
    """The views as read over files that keep every row version run on this server too; where
    merges left one version per key they answer as the views do (all but the moving
    `days_in_segment`)."""
    with pipeline.sql_client() as client:
        definitions = view_definitions(
            client.make_qualified_table_name, newest_versions=True, with_reports=True
        )
        for name, body in definitions.items():
            view = client.make_qualified_table_name(name)
            with client.execute_query(f"SELECT * FROM {view} LIMIT 0") as cursor:
                names = [column[0] for column in cursor.description]
            columns = ", ".join(column for column in names if column != "days_in_segment")
            read_anew = client.execute_sql(f"SELECT {columns} FROM ({body}) AS v") or []
            created = client.execute_sql(f"SELECT {columns} FROM {view}") or []
            assert sorted(read_anew, key=repr) == sorted(created, key=repr), name
            assert created, name
