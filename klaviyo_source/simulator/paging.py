"""Keyset pagination with opaque cursors.

Rows are identified by unique sort keys ``(primary, id)`` held in ascending order. A cursor is
base64url (no padding) of ``["n"|"p", fingerprint, primary, id]``: "n" continues after that key,
"p" returns the page before it. The fingerprint ties a cursor to its endpoint, resource, sort and
filter, so a cursor reused elsewhere is rejected as "Invalid cursor provided.". Because cursors
hold keys, not offsets, pages stay consistent while the data changes, and ties on the primary
key straddle page boundaries without loss or duplication.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import invalid_cursor

Key = tuple[str, str]


def fingerprint(*parts: str) -> str:
    """Short stable digest of what a cursor belongs to."""
    return format(zlib.crc32("\x1f".join(parts).encode()), "08x")


def encode_cursor(direction: str, fp: str, key: Key) -> str:
    """Opaque cursor for continuing ``direction`` ("n"/"p") from ``key``."""
    raw = json.dumps([direction, fp, key[0], key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(token: str, fp: str) -> tuple[str, Key]:
    """Inverse of ``encode_cursor``; 400 "Invalid cursor provided." when garbled or foreign."""
    try:
        padded = token + "=" * (-len(token) % 4)
        raw = base64.urlsafe_b64decode(padded.encode("ascii"))
        value = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeError):
        raise invalid_cursor() from None
    if (
        not isinstance(value, list)
        or len(value) != 4
        or value[0] not in ("n", "p")
        or value[1] != fp
        or not all(isinstance(v, str) for v in value[2:])
    ):
        raise invalid_cursor()
    return value[0], (value[2], value[3])


@dataclass(frozen=True)
class Page:
    """Positions (into the ascending key list) of one page, in output order."""

    indices: range
    has_next: bool
    has_prev: bool


def paginate(
    keys: Sequence[Key],
    size: int,
    descending: bool,
    cursor: tuple[str, Key] | None,
) -> Page:
    """Select one page from ascending ``keys`` in the requested order."""
    n = len(keys)
    if cursor is None:
        if descending:
            start = max(0, n - size)
            return Page(range(n - 1, start - 1, -1), start > 0, False)
        end = min(n, size)
        return Page(range(0, end), end < n, False)
    direction, key = cursor
    forward = (direction == "n") != descending  # moving towards larger keys?
    if forward:
        start = bisect_right(keys, key)
        end = min(n, start + size)
        idx = range(start, end)
        more_ahead, more_behind = end < n, start > 0
    else:
        end = bisect_left(keys, key)
        start = max(0, end - size)
        idx = range(start, end)
        more_ahead, more_behind = start > 0, end < n
    ordered = range(idx.stop - 1, idx.start - 1, -1) if descending else idx
    if direction == "n":
        return Page(ordered, more_ahead, more_behind)
    return Page(ordered, more_behind, more_ahead)
