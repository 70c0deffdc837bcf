"""How the process running an export manages its memory while the export runs.

Three settings, all for the duration of a run only (their measured effect is in
docs/performance.md, "Process memory"):

- Python's cycle collector leaves alone the objects that existed before the run. Every full
  collection otherwise scans everything the imports of dlt, pyarrow and DuckDB created, again
  and again as the export's short-lived objects come and go. The rows an export builds hold
  no reference cycles, so nothing collectable is missed.
- glibc keeps memory that threads freed in its arenas for later, and gives it back only when
  asked. An export frees a great deal as it goes (every page's JSON, every Arrow table once
  written), so without asking its resident size ratchets up and DuckDB's load then comes on
  top. Where the C library has no `malloc_trim` (macOS, musl) nothing is done.
- Arrow allocates through the system allocator rather than its default (mimalloc or jemalloc),
  which keeps what it frees for later: with the system's, what a run frees is given back, and
  a long export's memory stays flat. A pool chosen with ARROW_DEFAULT_MEMORY_POOL is kept.
"""

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
from typing import Callable, Iterator, Optional

import pyarrow

TRIM_EVERY_SECONDS = 1.0


@contextlib.contextmanager
def managed_for_an_export(trim_every: float = TRIM_EVERY_SECONDS) -> Iterator[None]:
    """All three settings while the block runs: wrap `pipeline.run` in this."""
    with startup_objects_frozen(), returning_freed_memory(trim_every), arrow_system_allocator():
        yield


@contextlib.contextmanager
def arrow_system_allocator() -> Iterator[None]:
    """While the block runs, Arrow allocates from the system allocator, unless told otherwise.

    Buffers remember the pool they came from, so the previous pool is safely put back after.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        yield
        return
    previous = pyarrow.default_memory_pool()
    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    try:
        yield
    finally:
        pyarrow.set_memory_pool(previous)


@contextlib.contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """While the block runs, the cycle collector skips every object that existed before it.

    A host that froze objects of its own (before forking workers, say) keeps them frozen:
    the block then leaves its own frozen too rather than thaw the host's.
    """
    host_froze = gc.get_freeze_count() > 0
    gc.collect()  # garbage that exists now would otherwise stay for the whole run
    gc.freeze()
    try:
        yield
    finally:
        if not host_froze:
            gc.unfreeze()


def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's `malloc_trim`, or None where the C library has none."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(library).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def return_freed_memory() -> None:
    """Give what glibc keeps of freed memory back to the system now; nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def returning_freed_memory(every: float = TRIM_EVERY_SECONDS) -> Iterator[None]:
    """While the block runs, give freed memory back to the system every `every` seconds."""
    trim = _malloc_trim()
    if trim is None:
        yield
        return
    done = threading.Event()

    def keep_trimming() -> None:
        while not done.wait(every):
            trim(0)

    trimmer = threading.Thread(target=keep_trimming, name="malloc-trim", daemon=True)
    trimmer.start()
    try:
        yield
    finally:
        done.set()
        trimmer.join()
