"""One run of the source: what its parallel segment walks share, fixed before the first starts.

Segments are walked in dlt's extract worker threads. dlt's pipeline, schema, state and injected
context (`dlt.current.*`) belong to the pipeline's own thread: reading the pipeline's schema
from a worker reloads it in place, and a walk that read it while another thread refilled it
saw no tables at all, so it took every held member for new. `start_run` therefore reads
everything a walk needs from dlt once, in the pipeline's thread, while the segment listing
starts and before it yields the first segment. From then on the walks touch only a `Run`:

- `load_id`, `started`: set once, never changed;
- `held` (`HeldData`): its tables and columns were read at the start; its queries run one at
  a time under its lock, on one SQL client made in the pipeline's thread. The client's
  connection is opened by the first walk (or setup, or refresh) that keeps it open and closed
  by the last, under the same lock, so no query finds it closed and none outlives the extract;
- `members` (`MembersThisRun`): a lock around every read and write, its SQLite connection
  (`ProfileNumbers`) included: made by whichever thread numbers the first profile past those
  numbered in memory, used by each in turn, closed by `Run.end` once the extract is over (or
  when collected);
- `progress` (`SegmentProgress`): the run's only writes to dlt state, under a lock. The dicts
  it writes are dlt's own, fetched here; a walk writes only its own segment's keys, and dlt
  reads the state again only once the extract pool has drained.

The client (`KlaviyoClient`) is shared too: each thread has its own session, and the rate
limiter they share guards its budgets with locks of its own.

The profile refresh (`profile_refresh`) shares the same `Run`: whichever of its resource and
the segment listing dlt starts first starts the run (`RunStart`), both in the pipeline's
thread.

A run ends with its extract: once dlt's `extract` has returned, no walk and no refresh touches
it again. Its record of listed members grows with the account and is of no use to normalize
and load, so whoever drives the steps (`export.KlaviyoExport`) collects the runs its extract
started (`runs_started`) and ends them before normalizing (`Run.end`).
"""

import contextlib
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional

import dlt

from . import settings
from .arrow_tables import quiet_json_column_notices
from .held import HeldData
from .members_this_run import MembersThisRun
from .rows import parse_datetime
from .walk_tables import WALK_TABLES, declare_walk_tables


class SegmentProgress:
    """Each segment's cursor, last full walk and last id walk, kept in dlt state, and this
    run's failures.

    Cursors and walk times live in the walking resource's state, failures in the source's.
    Failures are per run: a segment that failed last time and works now is none.
    """

    def __init__(self, walk_state: Dict[str, Any], source_state: Dict[str, Any]) -> None:
        self._cursors: Dict[str, str] = walk_state.setdefault(settings.CURSORS_STATE_KEY, {})
        self._reconciled: Dict[str, str] = walk_state.setdefault(settings.RECONCILED_STATE_KEY, {})
        self._ids_walked: Dict[str, str] = walk_state.setdefault(settings.IDS_WALKED_STATE_KEY, {})
        self._failures: Dict[str, str] = {}
        source_state[settings.FAILURES_STATE_KEY] = self._failures
        self._lock = threading.Lock()
        self._expected = 0
        self._done = 0
        self._rows_loaded = 0

    def expect(self, segments: int) -> None:
        """Count segments the listing handed on to be walked or closed."""
        with self._lock:
            self._expected += segments

    def finished(self, rows_loaded: int, say: Callable[[str], None]) -> None:
        """Count a segment done (well or not); `say` logs its line with how far the run is.

        The line is logged while the count is held, so the lines come out in the order
        counted: two walks ending at once never print "7 of 8" before "6 of 8".
        """
        with self._lock:
            self._done += 1
            self._rows_loaded += rows_loaded
            say(
                f"{self._done} of {self._expected} segments done, "
                f"{self._rows_loaded:,} membership rows loaded"
            )

    def cursor(self, segment_id: str) -> Optional[datetime]:
        """The newest join loaded for a segment, if it was ever walked."""
        with self._lock:
            return _time(self._cursors.get(segment_id))

    def reconciled_at(self, segment_id: str) -> Optional[datetime]:
        """When the segment was last walked in full."""
        with self._lock:
            return _time(self._reconciled.get(segment_id))

    def ids_walked_at(self, segment_id: str) -> Optional[datetime]:
        """When every member id of the segment was last listed (a leave check)."""
        with self._lock:
            return _time(self._ids_walked.get(segment_id))

    def walked(
        self,
        segment_id: str,
        cursor: Optional[datetime],
        reconciled_at: Optional[datetime],
        ids_walked_at: Optional[datetime] = None,
    ) -> None:
        """A walk that ended well: its cursor moves, and a full or id walk is remembered."""
        with self._lock:
            if cursor is not None:
                self._cursors[segment_id] = cursor.isoformat()
            if reconciled_at is not None:
                self._reconciled[segment_id] = reconciled_at.isoformat()
            if ids_walked_at is not None:
                self._ids_walked[segment_id] = ids_walked_at.isoformat()

    def forget(self, segment_id: str) -> None:
        """A deleted segment keeps no cursor: a segment made later with its id starts anew."""
        with self._lock:
            self._cursors.pop(segment_id, None)
            self._reconciled.pop(segment_id, None)
            self._ids_walked.pop(segment_id, None)

    def failed(self, segment_id: str, reason: str) -> None:
        with self._lock:
            self._failures[segment_id] = reason


def _time(stored: Optional[str]) -> Optional[datetime]:
    return parse_datetime(stored) if stored else None


@dataclass(frozen=True)
class Run:
    """What every segment walk of one run shares; see the module's docstring for why each
    part is safe to share."""

    started: datetime
    load_id: str
    held: HeldData
    members: MembersThisRun
    progress: SegmentProgress
    # Walk tables appended to in this run rather than merged into (see walk_tables).
    appended: FrozenSet[str] = frozenset()

    def end(self) -> None:
        """The run's extract is over: drop what it kept of the members it listed."""
        self.members.end()


# The runs started in this context (the pipeline's thread) while `runs_started` is active.
_started_runs: ContextVar[Optional[List[Run]]] = ContextVar("klaviyo_started_runs", default=None)


@contextlib.contextmanager
def runs_started() -> Iterator[List[Run]]:
    """The runs the source starts while the block runs, in this thread, to be ended once the
    extract is over. Runs start in the pipeline's thread, so only this caller's are seen."""
    started: List[Run] = []
    token = _started_runs.set(started)
    try:
        yield started
    finally:
        _started_runs.reset(token)


class RunStart:
    """The run's `Run`, started by the first resource that asks; pipeline thread only.

    A source object may be extracted more than once: a new load id starts a new run.
    """

    def __init__(self, started: datetime, walking_resource: str) -> None:
        self._started = started
        self._walking_resource = walking_resource
        self._run: Optional[Run] = None

    def __call__(self) -> Run:
        load_id = dlt.current.load_package_state()["load_id"]
        if self._run is None or self._run.load_id != load_id:
            self._run = start_run(self._started, self._walking_resource)
            started = _started_runs.get()
            if started is not None:
                started.append(self._run)
        return self._run


def start_run(started: datetime, walking_resource: str) -> Run:
    """Read what this run's walks need from dlt, in the pipeline's thread; declare the walk
    tables for this run."""
    held = HeldData.of_current_pipeline()
    # Tables the destination holds no row of are appended to rather than merged into.
    appended = frozenset(
        name for name in WALK_TABLES if name not in held.tables or not held.tables[name].has_rows
    )
    # The run has set its file format by now, on the source's copy of the resource.
    declare_walk_tables(dlt.current.source().resources[walking_resource], appended)
    quiet_json_column_notices(walking_resource)
    return Run(
        started=started,
        load_id=dlt.current.load_package_state()["load_id"],
        held=held,
        members=MembersThisRun(),
        progress=SegmentProgress(
            dlt.current.resource_state(walking_resource), dlt.current.source_state()
        ),
        appended=appended,
    )
