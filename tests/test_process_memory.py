"""process_memory: while a block runs, glibc hands freed memory back and the cycle collector
skips what existed before it; afterwards both are as they were."""

import gc
import threading
import weakref

from klaviyo_source import process_memory


def _trimmers() -> list:
    return [thread for thread in threading.enumerate() if thread.name == "malloc-trim"]


def test_freed_memory_is_handed_back_while_the_block_runs_and_the_thread_ends_with_it(
    monkeypatch,
) -> None:
    trims: list = []
    five_trims = threading.Event()
    real_trim = process_memory._malloc_trim()
    assert real_trim is not None, "this Linux machine's C library is glibc"

    def fake_trim(pad: int) -> int:
        trims.append(pad)
        if len(trims) >= 5:
            five_trims.set()
        return 0

    monkeypatch.setattr(process_memory, "_malloc_trim", lambda: fake_trim)

    with process_memory.returning_freed_memory(every=0.001):
        assert len(_trimmers()) == 1
        # Trimming goes on, again and again, while the block runs (the wait only bounds a hang).
        assert five_trims.wait(timeout=60)
    trims_when_done = len(trims)

    # The thread is joined on the way out: once the block is left, no trim ever follows.
    assert _trimmers() == []
    assert set(trims) == {0} and len(trims) == trims_when_done
    assert real_trim(0) in (0, 1)  # glibc's own call: 1 if memory was returned


def test_without_malloc_trim_the_block_runs_untouched(monkeypatch) -> None:
    monkeypatch.setattr(process_memory, "_malloc_trim", lambda: None)
    with process_memory.returning_freed_memory(every=0.01):
        assert _trimmers() == []


class _Node:
    def __init__(self) -> None:
        self.peer: object = self


def test_objects_from_before_the_block_are_left_alone_by_the_collector_until_it_ends() -> None:
    assert gc.get_freeze_count() == 0
    before = ["made before the block"]
    garbage = weakref.ref(_Node())  # a cycle nothing refers to: only the collector frees it
    with process_memory.startup_objects_frozen():
        assert garbage() is None  # collected, not frozen for the whole run
        during = ["made in the block"]
        assert gc.get_freeze_count() > 1000  # the imports of dlt and pyarrow, among others
        assert not any(obj is before for obj in gc.get_objects())
        assert any(obj is during for obj in gc.get_objects())
    assert gc.get_freeze_count() == 0
    assert any(obj is before for obj in gc.get_objects())


def test_objects_a_host_froze_stay_frozen() -> None:
    gc.freeze()
    try:
        host_frozen = gc.get_freeze_count()
        with process_memory.startup_objects_frozen():
            assert gc.get_freeze_count() >= host_frozen
        assert gc.get_freeze_count() >= host_frozen > 0
    finally:
        gc.unfreeze()


def test_an_export_gets_both_settings(monkeypatch) -> None:
    monkeypatch.setattr(process_memory, "_malloc_trim", lambda: lambda pad: 0)
    with process_memory.managed_for_an_export(trim_every=0.01):
        assert gc.get_freeze_count() > 0 and len(_trimmers()) == 1
    assert gc.get_freeze_count() == 0 and _trimmers() == []
