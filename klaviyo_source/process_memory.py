"""Hands the memory an export has freed back to the operating system while the export runs.

glibc keeps memory that threads freed in its arenas for later, and gives it back only when
asked. An export frees a great deal as it goes (every page's JSON, every Arrow table once
written), so without asking its resident size ratchets up and DuckDB's load then comes on
top: at 1M memberships, 277 MB after the extract fell to 227 MB once asked. Asking costs
about 5 ms a second. Where the C library has no `malloc_trim` (macOS, musl) nothing is done.
"""

import contextlib
import ctypes
import ctypes.util
import threading
from typing import Callable, Iterator, Optional

TRIM_EVERY_SECONDS = 1.0


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
