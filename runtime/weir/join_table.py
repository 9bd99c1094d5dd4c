"""The state of one join task in RocksDB: the versioned table and the stream records waiting to join.

``JoinStore`` is one RocksDB database per stream partition task (like ``weir.state.PartitionStore``
and ``weir.process_store.ProcessStore``) with the same checkpoint surface: ``flush(progress)``,
``progress``, ``checkpoint(dest)`` (``RocksStore``), ``size_bytes``, ``memory_used``, ``close``;
restoring is opening a ``JoinStore`` over the restored directory, and a savepoint is
``weir.state_sst.export_sst``/``import_sst`` of it like any partition database.
``VersionedTable`` is the table's semantics over it (as-of lookups, lateness, retention).

Key layout (the savepoint format; integers are big-endian, times are signed milliseconds stored
as unsigned ``time + 2**63`` so byte order is time order; keys are UTF-8)::

    b"\\x00progress"                       -> JSON: the task core's progress at the last flush
    b"\\x00join"                           -> JSON: the join operator's own progress (table
                                              partitions' offsets and times, stream time, ...)
                                              and ``versions``, how many ``v`` keys there are
    b"v" + u32 len(key) + key + u64 ts + u64 visible_from
                                          -> b"\\x00" (a tombstone) or encode_state(value)
    b"i" + u64 due + key                  -> b"": the key's history may shrink once the prune
                                              cutoff reaches ``due`` (the retention index)
    b"b" + u64 ts + u64 seq               -> encode_state([key, record]): a held stream record

A key's versions are contiguous and ordered by ``(ts, visible_from)``; held stream records are
ordered by ``(ts, arrival)``, their release order.

Durability: writes go straight to RocksDB (nothing is held in memory between flushes), and the
first write after a ``flush`` deletes the progress record, so a local database that took writes
after its last flush never claims to match an offset (``weir.recovery`` then restores from the
checkpoint store, as after a ``PartitionStore`` spill). ``flush(progress)`` writes the progress
and the join operator's own progress (``meta_source()``) in one batch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson
from rocksdict import Rdict, WriteBatch

from weir.functions import decode_state, encode_state
from weir.rocksdb_options import RocksMemory, RocksStore, rocksdb_options

__all__ = ["JoinStore", "Put", "Stamp", "Version", "VersionedTable"]

_PROGRESS: Final = b"\x00progress"
_META: Final = b"\x00join"
_VERSION: Final = b"v"
_INDEX: Final = b"i"
_HELD: Final = b"b"
_INDEX_END: Final = b"j"  # the first key after every index entry
_HELD_END: Final = b"c"  # the first key after every held record
_TOMBSTONE: Final = b"\x00"
_BIAS: Final = 1 << 63
_U64: Final = struct.Struct(">Q")
_TWO: Final = struct.Struct(">QQ")
_U32: Final = struct.Struct(">I")


def _time(t: int) -> bytes:
    return _U64.pack(t + _BIAS)


def _key_prefix(key: str) -> bytes:
    k = key.encode()
    return _VERSION + _U32.pack(len(k)) + k


class Version(NamedTuple):
    """One version of a table key: ``value`` (``None``: deleted) from event time ``ts`` on,
    seen by lookups at times ``>= visible_from`` only (``visible_from == ts`` unless it was late)."""

    ts: int
    visible_from: int
    value: dict[str, Any] | None


class Stamp(NamedTuple):
    """Where a version sits in its key's history, without its value (``live``: not a tombstone)."""

    ts: int
    visible_from: int
    live: bool


class JoinStore(RocksStore):
    """The RocksDB database of one join task: table versions, the retention index, held stream
    records, and the operator's progress (see the module docstring for the layout)."""

    def __init__(self, path: Path, rocks: RocksMemory | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The options hold the shared cache and write buffer manager, which must outlive the db.
        self._options = rocksdb_options(rocks)
        self._db = Rdict(str(path), self._options)
        self._clean = self._db.get(_PROGRESS) is not None
        raw = self._db.get(_META)
        self.saved_meta: dict[str, Any] = {} if raw is None else dict(orjson.loads(bytes(raw)))
        """The join operator's progress as the last ``flush`` stored it (empty: never flushed)."""
        self.meta_source: Callable[[], dict[str, Any]] = dict
        """What ``flush`` stores as the join operator's progress (the operator sets it)."""
        self.held = sum(1 for _ in self._scan(_HELD))
        """How many stream records are held (waiting for the table's time to reach them)."""
        saved = self.saved_meta.get("versions")
        self.version_count = int(saved) if saved is not None else sum(1 for _ in self._scan(_VERSION))
        """How many table versions are stored (``weir_join_table_versions``); kept with the
        operator's progress at each flush, counted once when opening a store without it."""
        # Lower bounds of the live index entries and held records. Both key ranges are queues
        # (consumed from the front), and a scan from the front would step over every entry
        # deleted since the last compaction: releasing 200,000 held records in chunks slowed
        # 25-fold by the end that way. Scans start at the bound instead.
        self._index_floor = _INDEX
        self._held_floor = _HELD

    # -- raw access -------------------------------------------------------------------------
    def _write(self, batch: WriteBatch) -> None:
        if self._clean:
            batch.delete(_PROGRESS)  # the database no longer matches the flushed offset
            self._clean = False
        self._writable().write(batch)

    def _scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        for raw_key, raw_value in self._db.items(from_key=start or prefix):
            if not isinstance(raw_key, bytes) or not raw_key.startswith(prefix):
                return
            yield raw_key, bytes(raw_value)

    # -- table versions ---------------------------------------------------------------------
    def versions(self, key: str) -> list[Version]:
        """Every stored version of ``key``, ordered by ``(ts, visible_from)``."""
        prefix = _key_prefix(key)
        skip = len(prefix)
        out = []
        for k, v in self._scan(prefix):
            ts, vis = _TWO.unpack_from(k, skip)
            out.append(Version(ts - _BIAS, vis - _BIAS, None if v == _TOMBSTONE else decode_state(v)))
        return out

    def as_of(self, key: str, ts: int) -> dict[str, Any] | None:
        """The value of the newest version with ``ts' <= ts`` and ``visible_from <= ts``;
        ``None`` when there is none or it is a tombstone."""
        prefix = _key_prefix(key)
        skip = len(prefix)
        it = self._db.iter()
        try:
            it.seek_for_prev(prefix + _TWO.pack(ts + _BIAS, (1 << 64) - 1))
            while it.valid():
                k = bytes(it.key())
                if not k.startswith(prefix):
                    return None
                (vis,) = _U64.unpack_from(k, skip + 8)
                if vis - _BIAS <= ts:
                    v = bytes(it.value())
                    return None if v == _TOMBSTONE else dict(decode_state(v))
                it.prev()
            return None
        finally:
            del it

    def stamps(self, key: str) -> list[Stamp]:
        """``(ts, visible_from, live)`` of every stored version of ``key`` in order, values unread."""
        prefix = _key_prefix(key)
        skip = len(prefix)
        out = []
        for k, v in self._scan(prefix):
            ts, vis = _TWO.unpack_from(k, skip)
            out.append(Stamp(ts - _BIAS, vis - _BIAS, v != _TOMBSTONE))
        return out

    def rewrite(self, key: str, before: list[Stamp], after: list[Stamp], new: Version | None = None) -> None:
        """Change ``key``'s versions from ``before`` (as read by ``stamps``) to ``after``: delete
        what ``after`` lacks, write ``new`` (whose stamp is in ``after``), and move the key's
        retention index entry, in one write. ``StateEncodingError`` when ``new``'s value cannot
        be stored (nothing changes)."""
        prefix = _key_prefix(key)
        batch = WriteBatch(raw_mode=True)
        kept = {(s.ts, s.visible_from) for s in after}
        for s in before:
            if (s.ts, s.visible_from) not in kept:
                batch.delete(prefix + _TWO.pack(s.ts + _BIAS, s.visible_from + _BIAS))
        if new is not None:
            data = _TOMBSTONE if new.value is None else encode_state(new.value)
            batch.put(prefix + _TWO.pack(new.ts + _BIAS, new.visible_from + _BIAS), data)
        was, due = _due(before), _due(after)
        if was != due:
            if was is not None:
                batch.delete(_INDEX + _time(was) + key.encode())
            if due is not None:
                entry = _INDEX + _time(due) + key.encode()
                batch.put(entry, b"")
                self._index_floor = min(self._index_floor, entry)
        self._write(batch)
        self.version_count += len(after) - len(before)

    def due_keys(self, cutoff: int, limit: int) -> list[str]:
        """Up to ``limit`` keys whose retention index entry is at or before ``cutoff``, in
        index order."""
        bound = _INDEX + _time(cutoff)
        out: list[str] = []
        first = None
        for k, _v in self._scan(_INDEX, self._index_floor):
            if first is None:
                first = k
            if k[:9] > bound or len(out) >= limit:
                break
            out.append(k[9:].decode())
        self._index_floor = _INDEX_END if first is None else first
        return out

    # -- held stream records ------------------------------------------------------------------
    def hold(self, ts: int, seq: int, key: str, record: dict[str, Any]) -> None:
        """Keep a stream record until it can be joined. ``StateEncodingError`` when it cannot
        be stored."""
        k = _HELD + _TWO.pack(ts + _BIAS, seq)
        batch = WriteBatch(raw_mode=True)
        batch.put(k, encode_state([key, record]))
        self._write(batch)
        self.held += 1
        self._held_floor = min(self._held_floor, k)

    def release(self, until: int, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Remove and return up to ``limit`` held records with ``ts <= until`` as ``(ts, key,
        record)``, in ``(ts, arrival)`` order."""
        if not self.held:
            return []
        bound = _HELD + _time(until) + b"\xff" * 8
        out: list[tuple[int, str, dict[str, Any]]] = []
        batch = WriteBatch(raw_mode=True)
        floor = _HELD_END
        for k, v in self._scan(_HELD, self._held_floor):
            if k > bound or len(out) >= limit:
                floor = k
                break
            (ts,) = _U64.unpack_from(k, 1)
            key, record = decode_state(v)
            out.append((ts - _BIAS, key, record))
            batch.delete(k)
        self._held_floor = floor
        if out:
            self._write(batch)
            self.held -= len(out)
        return out

    # -- the checkpoint surface -----------------------------------------------------------------
    @property
    def progress(self) -> dict[str, Any] | None:
        """What ``flush`` last stored with the state (offset, watermark, ...), if anything."""
        raw = self._db.get(_PROGRESS)
        return None if raw is None else dict(orjson.loads(bytes(raw)))

    def flush(self, progress: dict[str, Any]) -> int:
        """Store ``progress`` and the operator's own (``meta_source()``) in one batch (every other
        change is written already); returns the bytes written by this call."""
        self.saved_meta = {**self.meta_source(), "versions": self.version_count}
        batch = WriteBatch(raw_mode=True)
        data, meta = orjson.dumps(progress), orjson.dumps(self.saved_meta)
        batch.put(_PROGRESS, data)
        batch.put(_META, meta)
        self._writable().write(batch)
        self._clean = True
        return len(data) + len(meta)

    def memory_used(self) -> tuple[int, int]:
        """``(indexes, pending changes)`` held in memory: nothing, every change is in RocksDB."""
        return 0, 0

    @property
    def over_budget(self) -> bool:
        """Never: no change waits in memory for a checkpoint."""
        return False


def _due(versions: list[Stamp]) -> int | None:
    """When a key's history may first shrink (see ``VersionedTable.expire``): the earliest
    ``visible_from`` of a version that supersedes another, or of a tombstone that is the oldest
    version (it then reads like absence); ``None`` for one live version, or none."""
    if not versions:
        return None
    times = [v.visible_from for v in versions[1:]]
    if not versions[0].live:
        times.append(versions[0].visible_from)
    return min(times) if times else None


class Put(Enum):
    """What ``VersionedTable.put`` did with an update."""

    APPLIED = "applied"
    """Stored as of its event time."""
    LATE = "late"
    """At or behind the frontier: stored, but seen only by lookups after the frontier."""
    DROPPED = "dropped"
    """Older than the frontier minus the retention: not stored."""


class VersionedTable:
    """A table of key -> versions ``(event time, value or tombstone)`` with event-time lookups.

    Contract:

    - ``as_of(key, t)`` is the value of the newest version (by event time, then arrival) with
      event time ``<= t`` that is visible at ``t``; ``None`` when there is none or it is a
      tombstone.
    - ``put(key, ts, value, frontier)``: ``frontier`` is the greatest time at which lookups may
      already have been answered for the update's source (the join's per-partition table
      time, see ``weir.join``). ``ts > frontier``: stored as of ``ts`` (an out-of-order update
      lands in place in the history). ``frontier - retention <= ts <= frontier``: late, stored
      as of ``ts`` but visible only from ``frontier + 1``, so no answer given before changes.
      ``ts < frontier - retention``: dropped. A put with the same ``(ts, visible_from)`` as a
      stored version replaces it (the later update of a key at one time wins).
    - ``expire(cutoff, limit)`` prunes history no lookup at a time ``>= cutoff`` can see: per
      key, every version older than the newest one visible at ``cutoff`` (that one is kept so
      lookups at the cutoff still answer; a kept tombstone is dropped too, since it reads like
      absence). The caller never looks up a time below a cutoff it pruned to.
    """

    def __init__(self, store: JoinStore, retention_ms: int) -> None:
        if retention_ms < 0:
            raise ValueError(f"retention must be >= 0 ms, got {retention_ms}")
        self.store = store
        self.retention_ms = retention_ms

    def as_of(self, key: str, ts: int) -> dict[str, Any] | None:
        return self.store.as_of(key, ts)

    def put(self, key: str, ts: int, value: dict[str, Any] | None, frontier: int) -> Put:
        if ts < frontier - self.retention_ms:
            return Put.DROPPED
        late = ts <= frontier
        new = Version(ts, frontier + 1 if late else ts, value)
        stamp = Stamp(new.ts, new.visible_from, value is not None)
        old = self.store.stamps(key)
        after = [s for s in old if (s.ts, s.visible_from) != (stamp.ts, stamp.visible_from)]
        after.append(stamp)
        after.sort()
        self.store.rewrite(key, old, after, new)
        return Put.LATE if late else Put.APPLIED

    def expire(self, cutoff: int, limit: int) -> bool:
        """Prune up to ``limit`` keys' history for lookups at ``>= cutoff``; True when more
        keys are due at ``cutoff``."""
        keys = self.store.due_keys(cutoff, limit + 1)
        for key in keys[:limit]:
            self._prune(key, cutoff)
        return len(keys) > limit

    def _prune(self, key: str, cutoff: int) -> None:
        old = self.store.stamps(key)
        seen = [i for i, s in enumerate(old) if s.visible_from <= cutoff]
        if not seen:
            return
        keep_from = seen[-1]  # the newest version every lookup at >= cutoff sees
        if not old[keep_from].live:
            keep_from += 1
        self.store.rewrite(key, old, old[keep_from:])
