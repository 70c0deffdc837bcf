"""returning_freed_memory: glibc hands freed memory back while a block runs, and only then."""

import threading
import time

from klaviyo_source import process_memory


def _trimmers() -> list:
    return [thread for thread in threading.enumerate() if thread.name == "malloc-trim"]


def test_freed_memory_is_handed_back_while_the_block_runs_and_the_thread_ends_with_it(
    monkeypatch,
) -> None:
    trims: list = []
    real_trim = process_memory._malloc_trim()
    assert real_trim is not None, "this Linux machine's C library is glibc"
    monkeypatch.setattr(process_memory, "_malloc_trim", lambda: lambda pad: trims.append(pad))

    with process_memory.returning_freed_memory(every=0.01):
        assert len(_trimmers()) == 1
        time.sleep(0.2)
    trims_when_done = len(trims)
    time.sleep(0.05)

    assert trims_when_done >= 5 and set(trims) == {0}
    assert _trimmers() == [] and len(trims) == trims_when_done
    assert real_trim(0) in (0, 1)  # glibc's own call: 1 if memory was returned


def test_without_malloc_trim_the_block_runs_untouched(monkeypatch) -> None:
    monkeypatch.setattr(process_memory, "_malloc_trim", lambda: None)
    with process_memory.returning_freed_memory(every=0.01):
        assert _trimmers() == []
