"""Keyed window state of one partition: an in-memory working set over a RocksDB database.

One database per input partition (Kafka Streams' task model): the partition's window
accumulators and its progress (next offset, watermark) live in the same database and are
written in the same batch, so whatever is on disk with a progress record is always a state
that matches an offset.

The hot path only touches a dict. Changed accumulators are written to RocksDB in one batch
by ``flush`` (at commit/checkpoint time). When the working set outgrows its share of the
worker's memory budget (``memory_bytes``, or the older ``max_cached`` count), the store
*spills*: it writes every changed window out (without progress, and it deletes the progress
record, so the database no longer claims to match an offset until the next ``flush``) and
drops the oldest windows from memory; they are read back from RocksDB on their next use.
The same happens when the changed/deleted sets outgrow their share between flushes. Memory
stays bounded and the rest lives on disk.

Exactly-once is unaffected: a checkpoint is ``flush`` (everything changed plus the progress,
one batch) followed by a RocksDB checkpoint, so a snapshot always holds every change up to its
offset; windows spilled in between are changes before that offset too. Only the *local*
database between checkpoints holds changes past its last progress: that is why a spill
deletes the progress record (``weir.recovery`` then restores from the checkpoint store instead
of trusting the local database).

The options every partition database is opened with, and the RocksDB memory a worker's
databases share, are ``weir.rocksdb_options``; a database as one SST file (savepoints) is
``weir.state_sst``.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from rocksdict import Rdict, WriteBatch

from weir.memory import release_free_memory
from weir.rocksdb_options import RocksMemory, RocksStore, rocksdb_options
from weir.window_shapes import WindowKey

# Window entries are ``b"w" + start + end + key`` with big-endian signed times offset to
# sort correctly, so a range scan returns windows in start order; progress lives under a
# key that sorts before them all. For tumbling and sliding windows ``end - start`` is the
# window size, so start order is end order and the entries themselves are the on-disk timer
# index: the windows that close at ``end`` are one contiguous range, in key order (UTF-8 byte
# order is code point order, Python's string order), which is their firing order.
_WINDOW = b"w"
_PROGRESS = b"\x00progress"
_TIMES = struct.Struct(">QQ")
_BIAS = 1 << 63

_CHUNK = 10_000
"""Windows per RocksDB write batch when a flush or spill writes many: a batch is built in
memory before it is written, so one batch of a whole cache would be a memory spike."""

_ENTRY_OVERHEAD = 150
"""Bytes a cached window costs beyond its key and accumulator objects: its slot in the cache
dict and in the changed set (both kept at most 2/3 full, and doubled when they grow), its
timer slot in the window operator, and the allocator's rounding."""
_INITIAL_ENTRY_BYTES = 300
"""The estimate before the first cached windows are measured (``_measure``)."""


def encode_key(k: WindowKey) -> bytes:
    key, start, end = k
    return _WINDOW + _TIMES.pack(start + _BIAS, end + _BIAS) + key.encode()


def decode_key(raw: bytes) -> WindowKey:
    start, end = _TIMES.unpack_from(raw, 1)
    return raw[1 + _TIMES.size :].decode(), start - _BIAS, end - _BIAS


class PartitionStore(RocksStore):
    """The window store of one partition (the seam ``WindowOperator`` is written against).

    ``get``/``put``/``delete`` work on the in-memory working set; ``flush`` makes the
    working set and the given progress durable together. Accumulators handed out by
    ``get`` may be mutated in place; ``put`` marks them changed.

    Memory: the cached windows plus the windows changed or deleted since the last write are
    kept under ``max_cached`` windows and, with ``memory_bytes``, under that many bytes
    (estimated from the cached objects' sizes, ``entry_bytes`` each). Past the limit the store
    spills (see the module docstring) and keeps the newest half of the cache.
    """

    def __init__(
        self,
        path: Path,
        dumps: Callable[[list[Any]], bytes],
        loads: Callable[[bytes], list[Any]],
        max_cached: int = 1_000_000,
        memory_bytes: int | None = None,
        rocks: RocksMemory | None = None,
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The options hold the shared cache and write buffer manager, which must outlive the db.
        self._options = rocksdb_options(rocks)
        self._db = Rdict(str(path), self._options)
        self._dumps = dumps
        self._loads = loads
        self._max_count = max_cached
        self._memory_bytes = memory_bytes
        self.entry_bytes = _INITIAL_ENTRY_BYTES
        """Estimated bytes per cached window (re-measured whenever the cache reaches its limit)."""
        self._max_cached = self._limit()
        self._cache: dict[WindowKey, list[Any]] = {}
        self._dirty: dict[WindowKey, bool] = {}
        """Windows changed since the last write, each True when RocksDB does not hold it (created
        since then): deleting such a window before the next write needs no tombstone. Windows
        that open and close between two checkpoints (most tumbling windows under load) then
        cost the checkpoint nothing."""
        self._deleted: set[WindowKey] = set()
        # The last key ``get`` looked up on disk and did not find: the ``put`` that follows
        # (a new window) then needs no second disk read to know it is new.
        self._missed: WindowKey | None = None
        # Whether RocksDB may hold windows that are not in memory: false for a new
        # partition until the first eviction, so misses cost no disk read.
        self._count = sum(1 for _ in self._window_keys())
        self._on_disk = self._count > 0
        # Whether RocksDB may hold any window at all (written by a flush or found on open):
        # from then on a deleted window must be deleted on disk too.
        self._persisted = self._on_disk
        # Whether the progress record describes everything on disk (false after a spill).
        self._progress_current = True
        self.evictions = 1 if self._on_disk else 0
        """How often windows were dropped from memory (opening a database that holds windows
        counts once): after it changes, every window the store holds is on disk, so the window
        operator may forget its in-memory timers and fire from ``pop_windows_at``."""
        self.spills = 0
        """How many times windows were written out between flushes (a metric)."""

    # -- the WindowOperator seam ------------------------------------------------------
    def get(self, k: WindowKey) -> list[Any] | None:
        acc = self._cache.get(k)
        if acc is None and self._on_disk:
            if k in self._deleted:
                return None
            raw = self._db.get(encode_key(k))
            if raw is None:
                self._missed = k
                return None
            acc = self._loads(bytes(raw))
            self._cache[k] = acc
            if len(self._cache) > self._max_cached:
                self._make_room()
        return acc

    def put(self, k: WindowKey, acc: list[Any]) -> None:
        cache = self._cache
        if k not in cache:
            fresh = False
            if k is self._missed or not self._stored(k):
                self._count += 1
                # Not on disk, unless it is a deleted window coming back (its tombstone pending).
                fresh = k not in self._deleted
            self._missed = None
            cache[k] = acc
            self._dirty[k] = fresh
            if self._deleted:
                self._deleted.discard(k)
            if len(cache) > self._max_cached:
                self._make_room()
            return
        cache[k] = acc
        self._dirty.setdefault(k, False)  # cached and unchanged since the last write: on disk
        if self._deleted:
            self._deleted.discard(k)

    def delete(self, k: WindowKey) -> None:
        if k in self._cache:
            del self._cache[k]
            self._count -= 1
        elif self._stored(k):
            self._count -= 1
        if self._dirty.pop(k, False):
            return  # created since the last write: RocksDB does not hold it
        if self._persisted:
            self._deleted.add(k)
            if len(self._deleted) + len(self._cache) > self._max_cached:
                self._make_room()

    def _stored(self, k: WindowKey) -> bool:
        """Whether RocksDB holds ``k`` (not yet deleted); only asked once windows have spilled."""
        return self._on_disk and k not in self._deleted and self._db.get(encode_key(k)) is not None

    def items(self) -> Iterator[tuple[WindowKey, list[Any]]]:
        """Every window, in memory or on disk (used on restore; not on the hot path)."""
        seen = set(self._cache)
        yield from self._cache.items()
        for raw_key, raw_value in self._db.items(from_key=_WINDOW):
            if not isinstance(raw_key, bytes) or not raw_key.startswith(_WINDOW):
                break
            k = decode_key(raw_key)
            if k not in seen and k not in self._deleted:
                yield k, self._loads(bytes(raw_value))

    def __len__(self) -> int:
        """Number of windows held, in memory or on disk (kept as a count: O(1))."""
        return self._count

    # -- the on-disk timer index (tumbling and sliding windows) ---------------------------
    def pop_windows_at(
        self, start: int, end: int, after: str | None, limit: int
    ) -> list[tuple[WindowKey, list[Any]]]:
        """Remove and return up to ``limit`` windows ``[start, end)`` with a key above ``after``,
        in key order (the window operator fires them).

        Reads what is on disk: call ``spill`` first when windows of this range may have
        changed in memory since the last write (the window operator does, once they close).
        The cached accumulator is returned where there is one. The deletions reach disk with
        the next spill or flush, like any other.
        """
        prefix = _WINDOW + _TIMES.pack(start + _BIAS, end + _BIAS)
        seek = prefix if after is None else prefix + after.encode() + b"\x00"
        out: list[tuple[WindowKey, list[Any]]] = []
        cache, deleted, loads = self._cache, self._deleted, self._loads
        skip = len(prefix)
        it = self._db.iter()
        it.seek(seek)
        while it.valid() and len(out) < limit:
            raw_key = it.key()
            if not raw_key.startswith(prefix):
                break
            k = (raw_key[skip:].decode(), start, end)
            if k not in deleted:
                acc = cache.pop(k, None)
                out.append((k, acc if acc is not None else loads(bytes(it.value()))))
            it.next()
        del it
        dirty = self._dirty
        for k, _acc in out:
            dirty.pop(k, None)
            deleted.add(k)
        self._count -= len(out)
        if len(deleted) + len(cache) > self._max_cached:
            self._make_room()
        return out

    def window_ends(self) -> list[int]:
        """The distinct ends of the windows on disk, ascending for tumbling and sliding
        windows (one seek per distinct ``(start, end)``, not a scan of every window)."""
        ends: list[int] = []
        it = self._db.iter()
        it.seek(_WINDOW)
        while it.valid():
            raw_key = it.key()
            if not raw_key.startswith(_WINDOW):
                break
            start, end = _TIMES.unpack_from(raw_key, 1)
            ends.append(end - _BIAS)
            it.seek(_WINDOW + _TIMES.pack(start, end + 1))
        del it
        return ends

    # -- memory ----------------------------------------------------------------------------
    def spill(self) -> None:
        """Write every changed and deleted window to RocksDB now, without progress.

        The progress record is deleted in the same first batch: until the next ``flush`` the
        database holds changes past the offset it would name. The cache keeps its windows.
        """
        if not self._dirty and not self._deleted:
            return
        self._write(None)
        self.spills += 1

    def _make_room(self) -> None:
        """The cache (plus the deleted set) is over its limit: re-measure, spill, evict."""
        self._measure()
        if len(self._cache) + len(self._deleted) <= self._max_cached:
            return
        self.spill()
        cache = self._cache
        drop = len(cache) - self._max_cached // 2
        if drop > 0:
            for k in list(islice(cache, drop)):
                del cache[k]
            self._on_disk = True
            self.evictions += 1
            release_free_memory()

    def _limit(self) -> int:
        if self._memory_bytes is None:
            return self._max_count
        return max(16, min(self._max_count, self._memory_bytes // self.entry_bytes))

    def _measure(self) -> None:
        """Re-estimate ``entry_bytes`` from the newest cached windows and recompute the limit."""
        sample = list(islice(reversed(self._cache.items()), 64))
        if sample:
            total = 0
            for k, acc in sample:
                total += sys.getsizeof(k) + sys.getsizeof(k[0]) + sys.getsizeof(k[1]) + sys.getsizeof(k[2])
                total += _deep_size(acc)
            self.entry_bytes = total // len(sample) + _ENTRY_OVERHEAD
        self._max_cached = self._limit()

    def memory_used(self) -> tuple[int, int]:
        """Estimated bytes of ``(cached windows, windows waiting to be written or deleted)``."""
        cached = len(self._cache) * self.entry_bytes
        pending = len(self._deleted) * self.entry_bytes + len(self._dirty) * 48
        return cached, pending

    # -- durability ---------------------------------------------------------------------
    @property
    def progress(self) -> dict[str, Any] | None:
        """What ``flush`` last stored with the state (offset, watermark, ...), if anything."""
        raw = self._db.get(_PROGRESS)
        return None if raw is None else dict(orjson.loads(bytes(raw)))

    def rewrite(self, transform: Callable[[bytes], bytes], progress: dict[str, Any]) -> int:
        """Replace every stored window's value ``v`` by ``transform(v)``, then store ``progress``;
        returns the number of windows. For a state migration, once, right after opening (nothing
        cached yet): the hot path never sees the old encoding. The progress record is deleted
        first and written last, so a crash half-way leaves a database that claims no offset
        (recovery then restores it from the checkpoint store, not from this half-rewritten one).
        """
        assert not self._cache and not self._dirty and not self._deleted, "rewrite right after opening"
        db = self._writable()
        db.delete(_PROGRESS)
        n = 0
        batch = WriteBatch(raw_mode=True)
        for raw_key, raw_value in db.items(from_key=_WINDOW):
            if not isinstance(raw_key, bytes) or not raw_key.startswith(_WINDOW):
                break
            batch.put(raw_key, transform(bytes(raw_value)))
            n += 1
            if n % _CHUNK == 0:
                db.write(batch)
                batch = WriteBatch(raw_mode=True)
        batch.put(_PROGRESS, orjson.dumps(progress))
        db.write(batch)
        return n

    def flush(self, progress: dict[str, Any]) -> int:
        """Write changed windows and ``progress``; returns bytes written.

        One atomic batch when it fits in ``_CHUNK`` windows. A bigger flush is written in
        several batches, the first deleting the progress record and the last writing the new
        one, so a crash in between leaves a database that claims no offset.
        """
        written = self._write(progress)
        if len(self._cache) > self._max_cached:
            self._make_room()
        return written

    def _write(self, progress: dict[str, Any] | None) -> int:
        changes = len(self._deleted) + len(self._dirty)
        batch = WriteBatch(raw_mode=True)
        if progress is None or changes > _CHUNK:
            if self._progress_current:
                batch.delete(_PROGRESS)
            self._progress_current = False
        written = 0
        n = 0
        db, dumps, cache = self._writable(), self._dumps, self._cache
        for k in self._deleted:
            batch.delete(encode_key(k))
            n += 1
            if n % _CHUNK == 0:
                db.write(batch)
                batch = WriteBatch(raw_mode=True)
        for k in self._dirty:
            value = dumps(cache[k])
            written += len(value)
            batch.put(encode_key(k), value)
            n += 1
            if n % _CHUNK == 0:
                db.write(batch)
                batch = WriteBatch(raw_mode=True)
        if progress is not None:
            meta = orjson.dumps(progress)
            batch.put(_PROGRESS, meta)
            written += len(meta)
            self._progress_current = True
        db.write(batch)
        if self._dirty:
            self._persisted = True
        self._dirty.clear()
        self._deleted.clear()
        self._missed = None
        return written

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def max_cached(self) -> int:
        """The current limit on cached windows (from the count and the byte budget)."""
        return self._max_cached

    def _window_keys(self) -> Iterator[bytes]:
        for raw_key in self._db.keys(from_key=_WINDOW):
            if not isinstance(raw_key, bytes) or not raw_key.startswith(_WINDOW):
                return
            yield raw_key


def _deep_size(acc: list[Any]) -> int:
    """Bytes of an accumulator list and its items, one level into containers (count_distinct's set)."""
    total = sys.getsizeof(acc)
    for item in acc:
        total += sys.getsizeof(item)
        if isinstance(item, (set, list, tuple, dict)):
            total += sum(sys.getsizeof(x) for x in item)
    return total
