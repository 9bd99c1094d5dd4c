"""The RocksDB store of one partition's process step: keyed state entries, timers and the TTL index.

One database per input partition, like ``weir.state.PartitionStore``, with the same checkpoint
surface (``flush``, ``checkpoint``, ``progress``, ``size_bytes``, ``memory_used``, ``close``).

Durability contract (exactly-once rests on it): nothing reaches RocksDB between flushes. Every
change since the last ``flush`` waits in memory (``_pending``: key -> new value, or ``None`` for
a deletion, read before the database); ``flush(progress)`` writes all of them together with
``progress`` in one ``WriteBatch``, so a reopened store holds exactly the state of its last flush.

Each user call runs between ``begin`` and ``commit``; ``rollback`` undoes every change the call
made (a journal of the pending values it replaced), which is how a raising call leaves no trace.

Key layout (the savepoint format; integers are big-endian, times are signed milliseconds stored
as unsigned ``time + 2**63`` so byte order is time order; keys and names are UTF-8)::

    b"\\x00progress"                                   -> JSON: what the last flush stored
    b"s" + u32 len(key) + key + kind + u16 len(name) + name [+ map key]
                                                      -> entry (a state value, below)
        kind: b"v" ValueState, b"l" ListState (the whole list is one value),
              b"m" MapState (one entry per map key; map key = encode_state(map key))
    b"n" + key                                        -> u32: how many entries ``key`` has
    b"t" + u64 timestamp + key                        -> b"": an event-time timer of ``key``
    b"e" + u64 expires_at + entry key                 -> b"": the TTL index

An entry's value is ``u64 expires_at`` (``2**64 - 1``: no TTL) followed by
``weir.functions.encode_state(value)`` (version byte + JSON). Entries of one key are contiguous
and a timer's key orders timers by ``(timestamp, key)``, their firing order. The kind byte keeps
a state re-declared with another type from misreading the old one's bytes.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson
from rocksdict import Rdict, WriteBatch

from weir.functions import decode_state, encode_state
from weir.rocksdb_options import RocksMemory, RocksStore, rocksdb_options

__all__ = ["MISSING", "NEVER", "ProcessStore", "entry_prefix", "key_prefix", "state_suffix"]

_PROGRESS: Final = b"\x00progress"
_ENTRY: Final = b"s"
_COUNT: Final = b"n"
_TIMER: Final = b"t"
_EXPIRY: Final = b"e"
_MAP: Final = ord("m")
_BIAS: Final = 1 << 63
_TIME: Final = struct.Struct(">Q")
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
NEVER: Final = (1 << 64) - 1 - _BIAS
"""The ``expires_at`` of an entry without TTL (stored as ``2**64 - 1``)."""

_PENDING_OVERHEAD: Final = 120
"""Bytes a pending change costs beyond its key and value: its dict slot, the bytes objects'
headers and the journal/index slots that may point at it."""


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
"""What ``get_entry`` returns for an absent or expired entry (``None`` is a valid state value)."""

_ABSENT: Final = object()  # journal marker: the key had no pending change before the call


def _time(t: int) -> bytes:
    return _TIME.pack(t + _BIAS)


def key_prefix(key: str) -> bytes:
    """The prefix every entry of ``key`` starts with (see the layout)."""
    k = key.encode()
    return _ENTRY + _U32.pack(len(k)) + k


def state_suffix(kind: bytes, name: str) -> bytes:
    """What follows ``key_prefix`` in a state's entry keys: kind, name length, name."""
    n = name.encode()
    return kind + _U16.pack(len(n)) + n


def entry_prefix(key: str, kind: bytes, name: str) -> bytes:
    """The key of a value or list entry, and the prefix of a map's entries (see the layout)."""
    return key_prefix(key) + state_suffix(kind, name)


def _owner(entry: bytes) -> bytes:
    """The (encoded) key an entry belongs to."""
    (n,) = _U32.unpack_from(entry, 1)
    return entry[5 : 5 + n]


def _map_prefix(entry: bytes) -> bytes | None:
    """The map prefix of a map entry key, None for value and list entries."""
    (n,) = _U32.unpack_from(entry, 1)
    kind_at = 5 + n
    if entry[kind_at] != _MAP:
        return None
    (m,) = _U16.unpack_from(entry, kind_at + 1)
    return entry[: kind_at + 3 + m]


class ProcessStore(RocksStore):
    """Keyed state, timers and the TTL index of one partition's process step (see the module docstring)."""

    def __init__(self, path: Path, rocks: RocksMemory | None = None, memory_bytes: int | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The options hold the shared cache and write buffer manager, which must outlive the db.
        self._options = rocksdb_options(rocks)
        self._db = Rdict(str(path), self._options)
        self.memory_bytes = memory_bytes
        """The share of the worker's memory budget for pending changes: past it ``over_budget``
        turns true and the caller should checkpoint early (changes never spill to disk)."""
        self._pending: dict[bytes, bytes | None] = {}
        self._pending_bytes = 0
        # Map entry keys changed since the last flush, by map prefix: a map scan merges them
        # with the database without looking at every pending change.
        self._groups: dict[bytes, set[bytes]] = {}
        # TTL index keys written since the last flush (a heap: byte order is expiry order), and
        # how far the database's TTL index has been consumed since then (everything below the
        # cursor is expired and deleted in ``_pending``); both reset at flush.
        self._expiring: list[bytes] = []
        self._cursor: bytes = _EXPIRY
        self._journal: dict[bytes, object] | None = None
        self._journal_keys = 0
        self.keys_with_state = sum(1 for _ in self._scan_db(_COUNT))
        """How many keys hold at least one entry (expired ones included until removed)."""

    # -- raw pending/database access ------------------------------------------------------
    def _get(self, k: bytes) -> bytes | None:
        pending = self._pending
        if k in pending:
            return pending[k]
        raw = self._db.get(k)
        return None if raw is None else bytes(raw)

    def _set(self, k: bytes, v: bytes | None) -> None:
        journal = self._journal
        if journal is not None and k not in journal:
            journal[k] = self._pending.get(k, _ABSENT)
        self._put_pending(k, v)
        if k[0] == _ENTRY[0]:
            prefix = _map_prefix(k)
            if prefix is not None:
                self._groups.setdefault(prefix, set()).add(k)

    def _put_pending(self, k: bytes, v: object) -> None:
        pending = self._pending
        old = pending.get(k, _ABSENT)
        if old is _ABSENT:
            self._pending_bytes += len(k) + _PENDING_OVERHEAD
        elif isinstance(old, bytes):
            self._pending_bytes -= len(old)
        if v is _ABSENT:
            del pending[k]
            self._pending_bytes -= len(k) + _PENDING_OVERHEAD
            return
        assert v is None or isinstance(v, bytes)
        pending[k] = v
        if v is not None:
            self._pending_bytes += len(v)

    def _scan_db(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for raw_key, raw_value in self._db.items(from_key=prefix):
            if not isinstance(raw_key, bytes) or not raw_key.startswith(prefix):
                return
            yield raw_key, bytes(raw_value)

    # -- calls: all or nothing -----------------------------------------------------------
    def begin(self) -> None:
        """Start journaling changes, so ``rollback`` can undo them."""
        self._journal = {}
        self._journal_keys = self.keys_with_state

    def commit(self) -> None:
        """Keep the changes since ``begin``."""
        self._journal = None

    def rollback(self) -> None:
        """Undo every change since ``begin``."""
        journal = self._journal
        self._journal = None
        if journal is None:
            return
        for k, old in journal.items():
            self._put_pending(k, old)
        self.keys_with_state = self._journal_keys

    # -- entries ---------------------------------------------------------------------------
    def get_entry(self, k: bytes, watermark: int) -> Any:
        """The value of entry ``k``, or ``MISSING`` when absent or expired at ``watermark``
        (an expired entry is removed now)."""
        raw = self._get(k)
        if raw is None:
            return MISSING
        (stored,) = _TIME.unpack_from(raw)
        if stored - _BIAS <= watermark:
            self._remove(k, stored)
            return MISSING
        return decode_state(raw[8:])

    def put_entry(self, k: bytes, value: Any, expires_at: int) -> None:
        """Set entry ``k`` (``expires_at``: ``NEVER`` or the watermark at which it expires).

        Raises ``StateEncodingError`` before changing anything when the value cannot be stored.
        """
        data = _time(expires_at) + encode_state(value)
        old = self._get(k)
        if old is None:
            self._count(_owner(k), 1)
        else:
            (stored,) = _TIME.unpack_from(old)
            if stored - _BIAS != NEVER:
                self._set(_EXPIRY + old[:8] + k, None)
        self._set(k, data)
        if expires_at != NEVER:
            index = _EXPIRY + data[:8] + k
            self._set(index, b"")
            heapq.heappush(self._expiring, index)

    def delete_entry(self, k: bytes) -> None:
        raw = self._get(k)
        if raw is not None:
            (stored,) = _TIME.unpack_from(raw)
            self._remove(k, stored)

    def _remove(self, k: bytes, stored: int) -> None:
        self._set(k, None)
        if stored - _BIAS != NEVER:
            self._set(_EXPIRY + _TIME.pack(stored) + k, None)
        self._count(_owner(k), -1)

    def _count(self, owner: bytes, delta: int) -> None:
        ck = _COUNT + owner
        raw = self._get(ck)
        before = 0 if raw is None else _U32.unpack(raw)[0]
        after = before + delta
        if after <= 0:
            self._set(ck, None)
            if before > 0:
                self.keys_with_state -= 1
        else:
            self._set(ck, _U32.pack(after))
            if before == 0:
                self.keys_with_state += 1

    def map_entries(self, prefix: bytes, watermark: int) -> list[tuple[bytes, Any]]:
        """``(map key bytes, value)`` of every live entry under ``prefix``, in byte order of the
        map keys; expired ones are removed."""
        found: dict[bytes, bytes] = dict(self._scan_db(prefix))
        pending = self._pending
        for k in self._groups.get(prefix, ()):
            v = pending.get(k, _ABSENT)
            if v is None:
                found.pop(k, None)
            elif isinstance(v, bytes):
                found[k] = v
        out: list[tuple[bytes, Any]] = []
        skip = len(prefix)
        for k in sorted(found):
            raw = found[k]
            (stored,) = _TIME.unpack_from(raw)
            if stored - _BIAS <= watermark:
                self._remove(k, stored)
            else:
                out.append((k[skip:], decode_state(raw[8:])))
        return out

    def expire(self, watermark: int, limit: int) -> bool:
        """Remove up to ``limit`` entries expired at ``watermark``; True when more are due."""
        bound = _EXPIRY + _time(watermark)
        removed = 0
        heap, pending = self._expiring, self._pending
        while heap and heap[0][:9] <= bound:
            if removed >= limit:
                return True
            index = heapq.heappop(heap)
            if pending.get(index, _ABSENT) == b"":
                self._expire(index)
                removed += 1
        it = self._db.iter()
        it.seek(self._cursor)
        try:
            while it.valid():
                index = bytes(it.key())
                if not index.startswith(_EXPIRY) or index[:9] > bound:
                    return False
                if removed >= limit:
                    return True
                self._cursor = index + b"\x00"
                if pending.get(index, _ABSENT) is not None:
                    self._expire(index)
                    removed += 1
                it.next()
        finally:
            del it
        return False

    def _expire(self, index: bytes) -> None:
        k = index[9:]
        self._set(index, None)
        raw = self._get(k)
        if raw is not None and raw[:8] == index[1:9]:
            (stored,) = _TIME.unpack_from(raw)
            self._remove(k, stored)

    # -- timers --------------------------------------------------------------------------
    def put_timer(self, timestamp: int, key: str) -> None:
        self._set(_TIMER + _time(timestamp) + key.encode(), b"")

    def delete_timer(self, timestamp: int, key: str) -> None:
        self._set(_TIMER + _time(timestamp) + key.encode(), None)

    def timers(self) -> list[tuple[int, str]]:
        """Every timer held, in firing order ``(timestamp, key)``."""
        found = {k for k, _ in self._scan_db(_TIMER)}
        for k, v in self._pending.items():
            if k[:1] == _TIMER:
                if v is None:
                    found.discard(k)
                else:
                    found.add(k)
        return [(_TIME.unpack_from(k, 1)[0] - _BIAS, k[9:].decode()) for k in sorted(found)]

    # -- memory --------------------------------------------------------------------------
    def memory_used(self) -> tuple[int, int]:
        """Estimated bytes of ``(in-memory indexes over pending changes, pending changes)``."""
        groups = sum(len(s) for s in self._groups.values())
        return (len(self._expiring) + groups) * 64, self._pending_bytes

    @property
    def over_budget(self) -> bool:
        """Whether pending changes exceed ``memory_bytes`` (a checkpoint would release them)."""
        return self.memory_bytes is not None and self._pending_bytes > self.memory_bytes

    # -- durability ------------------------------------------------------------------------
    @property
    def progress(self) -> dict[str, Any] | None:
        """What ``flush`` last stored with the state (offset, watermark, ...), if anything."""
        raw = self._db.get(_PROGRESS)
        return None if raw is None else dict(orjson.loads(bytes(raw)))

    def flush(self, progress: dict[str, Any]) -> int:
        """Write every change since the last flush and ``progress`` in one batch; returns bytes written."""
        if self._journal is not None:
            raise RuntimeError("flush inside a user call: its changes may still be undone")
        batch = WriteBatch(raw_mode=True)
        written = 0
        for k, v in self._pending.items():
            if v is None:
                batch.delete(k)
            else:
                batch.put(k, v)
                written += len(k) + len(v)
        meta = orjson.dumps(progress)
        batch.put(_PROGRESS, meta)
        self._writable().write(batch)
        self._pending.clear()
        self._pending_bytes = 0
        self._groups.clear()
        self._expiring.clear()
        self._cursor = _EXPIRY
        return written + len(meta)

