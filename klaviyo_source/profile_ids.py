"""Compact, exact maps keyed by Klaviyo profile ids, for structures that grow with the account.

A reconciliation holds when each member of a segment joined. As a Python dict that kept a
string, a dict entry and a datetime for every member; here an entry is its 16 key bytes and a
value of fixed width in a shared buffer (the figures are in docs/performance.md, "Memory at
10M"). The ids a run listed are numbered in `profile_numbers`: in this map up to a bound, then
in SQLite, keyed as `ulid_key` keys them.

Klaviyo's profile ids are ULIDs: 26 characters of Crockford base32, 128 bits. A canonical
one (upper case, first character 0-7) is kept as its 16 bytes, which decode back to the very
same string. Entries live in byte buffers, one per bucket of a hash table that grows a bucket
at a time (linear hashing), each entry the 16 key bytes then its value; a lookup is one
`find` in one small buffer. Any other id (another form, lower case, another length) is kept
as it is, in a plain dict: every id is told apart exactly, whatever its form.

Not thread-safe: its owner locks around it if threads share it.
"""

import struct
from collections.abc import MutableMapping
from datetime import datetime, timedelta, tzinfo
from typing import Any, Dict, Iterator, List, Optional, Tuple, TypeVar, Union, overload

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Crockford digits as the digits `int(..., 32)` reads; anything else as a character it refuses.
_TO_BASE32 = bytes(
    ord("0123456789abcdefghijklmnopqrstuv"[_ALPHABET.index(chr(byte))])
    if chr(byte) in _ALPHABET
    else ord("!")
    for byte in range(256)
)
_PAIRS = [first + second for first in _ALPHABET for second in _ALPHABET]
_ULID_LENGTH = 26
_KEY_BYTES = 16
# Entries a bucket holds on average before the table grows by one bucket: a lookup reads
# about this many entries' bytes.
_ENTRIES_PER_BUCKET = 32


def ulid_key(profile_id: str) -> Optional[bytes]:
    """The 16 bytes of a canonical ULID, or None for an id of any other form."""
    try:
        raw = profile_id.encode()  # a character beyond ASCII makes it longer than 26
        if len(raw) != _ULID_LENGTH:
            return None
        value = int(raw.translate(_TO_BASE32), 32)
    except (UnicodeEncodeError, ValueError):  # a lone surrogate; a character not Crockford's
        return None
    if value >> (8 * _KEY_BYTES):
        return None  # 130 bits: the first character is above 7
    return value.to_bytes(_KEY_BYTES, "big")


def ulid_of(key: bytes) -> str:
    """The profile id whose `ulid_key` is `key`."""
    value = int.from_bytes(key, "big")
    # The first character carries 3 bits, then twelve pairs of 10 bits, then the last 5.
    pairs = [_PAIRS[(value >> shift) & 1023] for shift in range(115, 4, -10)]
    return _ALPHABET[value >> 125] + "".join(pairs) + _ALPHABET[value & 31]


class ProfileIdMap:
    """Profile id -> integer of a fixed width (a `struct` format such as "I" or "q")."""

    def __init__(self, value_format: str) -> None:
        self._value = struct.Struct("<" + value_format)
        self._entry_bytes = _KEY_BYTES + self._value.size
        # Linear hashing: 2**level buckets plus those split off in this round.
        self._buckets: List[bytearray] = [bytearray()]
        self._level = 0
        self._next_split = 0
        self._packed = 0
        self._other_ids: Dict[str, int] = {}

    def __len__(self) -> int:
        return self._packed + len(self._other_ids)

    def __contains__(self, profile_id: object) -> bool:
        return isinstance(profile_id, str) and self.get(profile_id) is not None

    def get(self, profile_id: str) -> Optional[int]:
        key = ulid_key(profile_id)
        if key is None:
            return self._other_ids.get(profile_id)
        bucket, at = self._locate(key)
        return None if at < 0 else self._value.unpack_from(bucket, at + _KEY_BYTES)[0]

    def set(self, profile_id: str, value: int) -> None:
        key = ulid_key(profile_id)
        if key is None:
            self._other_ids[profile_id] = value
            return
        bucket, at = self._locate(key)
        if at < 0:
            self._append(bucket, key, value)
        else:
            self._value.pack_into(bucket, at + _KEY_BYTES, value)

    def pop(self, profile_id: str) -> Optional[int]:
        """Remove an id; its value, or None if it was not there."""
        key = ulid_key(profile_id)
        if key is None:
            return self._other_ids.pop(profile_id, None)
        bucket, at = self._locate(key)
        if at < 0:
            return None
        value: int = self._value.unpack_from(bucket, at + _KEY_BYTES)[0]
        del bucket[at : at + self._entry_bytes]
        self._packed -= 1
        return value

    def __iter__(self) -> Iterator[str]:
        """Every id, in no particular order; the map must not change meanwhile."""
        step = self._entry_bytes
        for bucket in self._buckets:
            for at in range(0, len(bucket), step):
                yield ulid_of(bytes(bucket[at : at + _KEY_BYTES]))
        yield from self._other_ids

    def _append(self, bucket: bytearray, key: bytes, value: int) -> None:
        bucket += key
        bucket += self._value.pack(value)
        self._packed += 1
        if self._packed > _ENTRIES_PER_BUCKET * len(self._buckets):
            self._split()

    def _locate(self, key: bytes) -> Tuple[bytearray, int]:
        """The bucket of `key`, and where its entry starts there (-1: nowhere).

        A match that straddles two entries (the end of one key, its value, the start of the
        next) is no entry: the search looks on.
        """
        hashed = hash(key)
        index = hashed & ((1 << self._level) - 1)
        if index < self._next_split:
            index = hashed & ((2 << self._level) - 1)
        bucket = self._buckets[index]
        at = bucket.find(key)
        while at > 0 and at % self._entry_bytes:
            at = bucket.find(key, at + 1)
        return bucket, at

    def _split(self) -> None:
        """Grow by one bucket: the next bucket's entries whose hash has the level's bit set
        move to the new one, so a lookup finds them there."""
        step = self._entry_bytes
        bit = 1 << self._level
        old = self._buckets[self._next_split]
        stay, move = bytearray(), bytearray()
        for at in range(0, len(old), step):
            entry = old[at : at + step]
            (move if hash(bytes(entry[:_KEY_BYTES])) & bit else stay).extend(entry)
        self._buckets[self._next_split] = stay
        self._buckets.append(move)
        self._next_split += 1
        if self._next_split == bit:
            self._level += 1
            self._next_split = 0


_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_NOT_YET = object()
_Default = TypeVar("_Default")


class JoinedTimes(MutableMapping[str, datetime]):
    """Profile id -> when it joined a segment, as the destination gave it: 24 bytes an entry
    in its buckets.

    A time is kept as the microseconds of its wall-clock reading, with one time zone object
    for them all: the first time's. A time that does not fit that (another zone object, a
    `fold`, a subclass of datetime) is kept as it is, so each comes back equal and alike.
    """

    def __init__(self) -> None:
        self._micros = ProfileIdMap("q")
        self._zone: Union[Optional[tzinfo], object] = _NOT_YET
        self._other_times: Dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._micros) + len(self._other_times)

    def __contains__(self, profile_id: object) -> bool:
        if profile_id in self._other_times:
            return True
        return profile_id in self._micros

    def __getitem__(self, profile_id: str) -> datetime:
        found = self._other_times.get(profile_id)
        if found is not None:
            return found
        micros = self._micros.get(profile_id)
        if micros is None:
            raise KeyError(profile_id)
        return self._time(micros)

    def __setitem__(self, profile_id: str, joined: datetime) -> None:
        if self._zone is _NOT_YET:
            self._zone = joined.tzinfo
        if type(joined) is datetime and joined.tzinfo is self._zone and not joined.fold:
            self._other_times.pop(profile_id, None)
            self._micros.set(profile_id, (joined.replace(tzinfo=None) - _EPOCH) // _MICROSECOND)
        else:
            self._micros.pop(profile_id)
            self._other_times[profile_id] = joined

    def __delitem__(self, profile_id: str) -> None:
        self.pop(profile_id)

    # MutableMapping's own pop would look the id up twice.
    @overload
    def pop(self, profile_id: str, /) -> datetime: ...

    @overload
    def pop(self, profile_id: str, default: datetime, /) -> datetime: ...

    @overload
    def pop(self, profile_id: str, default: _Default, /) -> Union[datetime, _Default]: ...

    def pop(self, profile_id: str, /, *default: Any) -> Any:
        found = self._other_times.pop(profile_id, None)
        if found is not None:
            return found
        micros = self._micros.pop(profile_id)
        if micros is not None:
            return self._time(micros)
        if default:
            return default[0]
        raise KeyError(profile_id)

    def __iter__(self) -> Iterator[str]:
        yield from self._micros
        yield from self._other_times

    def _time(self, micros: int) -> datetime:
        zone = self._zone if isinstance(self._zone, tzinfo) else None
        return (_EPOCH + micros * _MICROSECOND).replace(tzinfo=zone)
