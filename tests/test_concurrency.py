"""Parallel segment walks under any thread schedule: exact tables, and nothing of dlt's touched.

Segments are walked in dlt's extract worker threads. Everything a walk needs from dlt (state,
load id, what the destination holds) is fixed in the pipeline's own thread before the first
walk starts; these tests hold the source to that, and to the truth, under schedules that
switch threads as often as the interpreter allows.
"""

import random
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, List, Optional

import dlt
import pytest
from dlt.common.configuration.container import Container
from dlt.common.storages.live_schema_storage import LiveSchemaStorage
from expected import loaded_memberships, true_memberships
from scenarios import assert_run_was_exact, change_account, first_seen_at

from klaviyo_source import profile_numbers
from klaviyo_source.run import SegmentProgress
from klaviyo_source.simulator import Account


@pytest.fixture
def switching_often() -> Iterator[None]:
    """Switch threads every microsecond: interleavings that are rare become the rule."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _read_mid_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay the schedule in which a walk reads the pipeline's schema while it is refilled.

    Reading `pipeline.default_schema` reloads the live schema and refills the one shared
    object in place: its tables are emptied, then filled again. A thread that reads between
    the two steps sees a schema without tables. Here every read from outside the pipeline's
    thread lands in that gap, so a walk that reads the schema at all meets it.
    """
    read = LiveSchemaStorage.__getitem__

    def read_in_the_gap(storage: LiveSchemaStorage, name: str) -> Any:
        schema = read(storage, name)
        if threading.current_thread() is threading.main_thread():
            return schema
        emptied = schema.clone()
        emptied._reset_schema(schema.name, schema._normalizers_config)
        return emptied

    monkeypatch.setattr(LiveSchemaStorage, "__getitem__", read_in_the_gap)


def test_a_walk_that_reads_while_the_schema_is_refilled_still_loads_the_truth(
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    before = first_seen_at(pipeline)
    changes = change_account(account, random.Random(1), delete=True)

    _read_mid_refill(monkeypatch)
    pipeline.run(source_for(reconcile="all"))

    assert_run_was_exact(pipeline, account, before, changes)


def _dlt_context_reads_from_walk_threads(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Record each lookup of dlt's injected context (state, pipeline, load package, config
    sections) that source code makes outside the pipeline's thread; returns where each came
    from."""
    calls: List[str] = []
    lookup = Container.__getitem__

    def recorded(container: Container, spec: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            stack = traceback.extract_stack()
            ours = [frame for frame in stack if "klaviyo_source" in frame.filename]
            if ours:
                calls.append(f"{spec.__name__} from {ours[-1].name}:{ours[-1].lineno}")
        return lookup(container, spec)

    monkeypatch.setattr(Container, "__getitem__", recorded)
    return calls


def test_walk_threads_touch_neither_dlt_state_nor_context(
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = make_pipeline()
    pipeline.run(source_for())
    change_account(account, random.Random(2), delete=True)
    schema_reads: List[str] = []
    schema_of = vars(dlt.Pipeline)["default_schema"].fget

    def default_schema(self: dlt.Pipeline) -> Any:
        if threading.current_thread() is not threading.main_thread():
            schema_reads.append(threading.current_thread().name)
        return schema_of(self)

    monkeypatch.setattr(dlt.Pipeline, "default_schema", property(default_schema))
    context_reads = _dlt_context_reads_from_walk_threads(monkeypatch)

    pipeline.run(source_for(reconcile="all"))

    assert schema_reads == []
    assert context_reads == []
    assert loaded_memberships(pipeline) == true_memberships(account)


@pytest.mark.parametrize(
    "seed, in_memory_profiles",
    [(7, None), (8, 5)],
    ids=["profiles-numbered-in-memory", "most-numbered-in-sqlite"],
)
def test_runs_with_every_kind_of_change_stay_exact_when_threads_switch_constantly(
    seed: int,
    in_memory_profiles: Optional[int],
    account: Account,
    source_for: Callable,
    make_pipeline: Callable,
    switching_often: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if in_memory_profiles is not None:
        monkeypatch.setattr(profile_numbers, "IN_MEMORY_PROFILES", in_memory_profiles)
    rng = random.Random(seed)
    pipeline = make_pipeline()
    pipeline.run(source_for())
    for run in range(3):
        before = first_seen_at(pipeline)
        changes = change_account(account, rng, delete=run == 1)
        pipeline.run(source_for(reconcile="all"))
        assert_run_was_exact(pipeline, account, before, changes)


def test_segment_lines_come_out_in_the_order_the_segments_were_counted() -> None:
    # Two walks end at once: the first is still logging its line when the second ends. The
    # second's line ("2 of 2") must not come out before the first's ("1 of 2").
    progress = SegmentProgress({}, {})
    progress.expect(2)
    lines: List[str] = []
    first_saying, second_done = threading.Event(), threading.Event()

    def first_says(tally: str) -> None:
        first_saying.set()
        second_done.wait(timeout=1.0)  # the second walk ends meanwhile, if it can
        lines.append(tally)

    def second_walk_ends() -> None:
        first_saying.wait()
        progress.finished(20, lines.append)
        second_done.set()

    second = threading.Thread(target=second_walk_ends)
    second.start()
    progress.finished(10, first_says)
    second.join()

    assert lines == [
        "1 of 2 segments done, 10 membership rows loaded",
        "2 of 2 segments done, 30 membership rows loaded",
    ]
