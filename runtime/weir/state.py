"""Keyed window state of one partition: an in-memory working set over a RocksDB database.

One database per input partition (Kafka Streams' task model): the partition's window
accumulators and its progress (next offset, watermark) live in the same database and are
written in the same batch, so whatever is on disk is always a state that matches an offset.

The hot path only touches a dict. Changed accumulators are written to RocksDB in one batch
by ``flush`` (at commit/checkpoint time), and when the working set outgrows ``max_cached``
the clean entries are dropped from memory and read back from RocksDB on their next use —
memory stays bounded and the rest lives on disk.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from rocksdict import (
    AccessType,
    Checkpoint,
    IngestExternalFileOptions,
    Options,
    Rdict,
    SstFileWriter,
    WriteBatch,
)

WindowKey = tuple[str, int, int]

# Window entries are ``b"w" + start + end + key`` with big-endian signed times offset to
# sort correctly, so a range scan returns windows in start order; progress lives under a
# key that sorts before them all.
_WINDOW = b"w"
_PROGRESS = b"\x00progress"
_TIMES = struct.Struct(">QQ")
_BIAS = 1 << 63


# Compaction tuned for incremental checkpoints. Every checkpoint flushes the memtable, so each
# one adds an L0 file, and every file a compaction writes is a new file the next checkpoint
# uploads. With RocksDB's defaults (64 MiB files, L0 compacted at 4 files, a 256 MiB base
# level) a 100 MB database sits in one bottom level of two big files and each L0 compaction
# rewrites all of it: changing a random 1 % of 100 MB before each of 60 checkpoints uploaded
# 16.9 MB per checkpoint on average, the whole 104 MB every few checkpoints. With 8 MiB
# files, a 64 MiB base level and L0 compacted at 16 files, a compaction rewrites only the
# files its keys overlap, a quarter as often: 2.1 MB on average over 40 such checkpoints,
# 1.1 MB (the change itself) for 90 % of them, at most 29 MB (bench/checkpoint_bench.py).
# One exception stays: a database that took a lot in one go holds it in L0 (RocksDB also
# compacts L0 once it exceeds the base level's size) and rewrites it once. More L0 files
# cost a little on reads that miss the in-memory working set; the slowdown/stop triggers
# move up so writes are never throttled by them.
_TARGET_FILE_BYTES = 8 << 20
_LEVEL_BASE_BYTES = 64 << 20
_L0_COMPACTION_TRIGGER = 16
_L0_SLOWDOWN_TRIGGER = 40
_L0_STOP_TRIGGER = 64
_BACKGROUND_WORK = (
    "rocksdb.compaction-pending",
    "rocksdb.num-running-compactions",
    "rocksdb.num-running-flushes",
)


def rocksdb_options() -> Options:
    """The options every partition database is opened (and restored) with."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_target_file_size_base(_TARGET_FILE_BYTES)
    options.set_max_bytes_for_level_base(_LEVEL_BASE_BYTES)
    options.set_level_zero_file_num_compaction_trigger(_L0_COMPACTION_TRIGGER)
    options.set_level_zero_slowdown_writes_trigger(_L0_SLOWDOWN_TRIGGER)
    options.set_level_zero_stop_writes_trigger(_L0_STOP_TRIGGER)
    return options


def encode_key(k: WindowKey) -> bytes:
    key, start, end = k
    return _WINDOW + _TIMES.pack(start + _BIAS, end + _BIAS) + key.encode()


def decode_key(raw: bytes) -> WindowKey:
    start, end = _TIMES.unpack_from(raw, 1)
    return raw[1 + _TIMES.size :].decode(), start - _BIAS, end - _BIAS


class PartitionStore:
    """The window store of one partition (the seam ``WindowOperator`` is written against).

    ``get``/``put``/``delete`` work on the in-memory working set; ``flush`` makes the
    working set and the given progress durable together. Accumulators handed out by
    ``get`` may be mutated in place; ``put`` marks them changed.
    """

    def __init__(
        self,
        path: Path,
        dumps: Callable[[list[Any]], bytes],
        loads: Callable[[bytes], list[Any]],
        max_cached: int = 1_000_000,
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = Rdict(str(path), rocksdb_options())
        self._dumps = dumps
        self._loads = loads
        self._max_cached = max_cached
        self._cache: dict[WindowKey, list[Any]] = {}
        self._dirty: set[WindowKey] = set()
        self._deleted: set[WindowKey] = set()
        # Whether RocksDB may hold windows that are not in memory: false for a new
        # partition until the first eviction, so misses cost no disk read.
        self._count = sum(1 for _ in self._window_keys())
        self._on_disk = self._count > 0

    # -- the WindowOperator seam ------------------------------------------------------
    def get(self, k: WindowKey) -> list[Any] | None:
        acc = self._cache.get(k)
        if acc is None and self._on_disk:
            raw = self._db.get(encode_key(k))
            if raw is not None:
                acc = self._loads(bytes(raw))
                self._cache[k] = acc
        return acc

    def put(self, k: WindowKey, acc: list[Any]) -> None:
        if k not in self._cache and not self._stored(k):
            self._count += 1
        self._cache[k] = acc
        self._dirty.add(k)
        self._deleted.discard(k)

    def delete(self, k: WindowKey) -> None:
        if k in self._cache:
            del self._cache[k]
            self._count -= 1
        elif self._stored(k):
            self._count -= 1
        self._dirty.discard(k)
        if self._on_disk:
            self._deleted.add(k)

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

    # -- durability ---------------------------------------------------------------------
    @property
    def progress(self) -> dict[str, Any] | None:
        """What ``flush`` last stored with the state (offset, watermark, ...), if anything."""
        raw = self._db.get(_PROGRESS)
        return None if raw is None else dict(orjson.loads(bytes(raw)))

    def flush(self, progress: dict[str, Any]) -> int:
        """Write changed windows and ``progress`` in one atomic batch; returns bytes written."""
        batch = WriteBatch(raw_mode=True)
        written = 0
        for k in self._deleted:
            batch.delete(encode_key(k))
        for k in self._dirty:
            value = self._dumps(self._cache[k])
            written += len(value)
            batch.put(encode_key(k), value)
        meta = orjson.dumps(progress)
        batch.put(_PROGRESS, meta)
        self._db.write(batch)
        self._dirty.clear()
        self._deleted.clear()
        if len(self._cache) > self._max_cached:
            self._evict()
        return written + len(meta)

    def _evict(self) -> None:
        # Everything is clean right after a flush: keep the most recently inserted half.
        keep = self._max_cached // 2
        drop = len(self._cache) - keep
        for k in list(self._cache)[:drop]:
            del self._cache[k]
        self._on_disk = True

    @property
    def cached(self) -> int:
        return len(self._cache)

    def size_bytes(self) -> int:
        """Approximate on-disk size (RocksDB's own estimate of live data)."""
        try:
            return int(self._db.property_int_value("rocksdb.estimate-live-data-size") or 0)
        except Exception:  # noqa: BLE001 - an estimate; never worth failing the worker for
            return 0

    def compacting(self) -> bool:
        """Whether RocksDB is flushing or compacting in the background or has compaction queued.

        A compaction rewrites files, so the next checkpoint uploads its output; benchmarks and
        tests wait for this to turn false to measure a settled database.
        """
        return any(self._db.property_int_value(p) for p in _BACKGROUND_WORK)

    def checkpoint(self, dest: Path) -> Path:
        """Snapshot what ``flush`` last wrote into ``dest`` (which must not exist) and return it.

        The memtable is flushed first, so the snapshot is SST files (hard links: instant, no
        copy) plus a few small metadata files and needs no write-ahead log. The directory
        opens as a normal database (``PartitionStore(dest, ...)``), and the working set
        keeps changing meanwhile without touching it. Uncommitted in-memory changes (since
        the last ``flush``) are not in it.
        """
        if dest.exists():
            raise FileExistsError(f"checkpoint directory {dest} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._db.flush(wait=True)
        Checkpoint(self._db).create_checkpoint(str(dest))
        return dest

    def _window_keys(self) -> Iterator[bytes]:
        for raw_key in self._db.keys(from_key=_WINDOW):
            if not isinstance(raw_key, bytes) or not raw_key.startswith(_WINDOW):
                return
            yield raw_key

    def close(self) -> None:
        self._db.close()


def export_sst(db_dir: Path, sst_path: Path) -> int:
    """Write every entry of the database in ``db_dir`` (e.g. a ``checkpoint``) into one SST file.

    Returns the number of entries; with none, no file is written (RocksDB cannot write an
    empty SST). The file holds the raw keys and values, progress included, and is read back
    by ``import_sst`` into a fresh database of any later version: the SST table format is
    RocksDB's stable, versioned on-disk format with a checksum per block.
    """
    db = Rdict(str(db_dir), rocksdb_options(), access_type=AccessType.read_only())
    try:
        writer: SstFileWriter | None = None
        count = 0
        for key, value in db.items():
            if writer is None:
                sst_path.parent.mkdir(parents=True, exist_ok=True)
                writer = SstFileWriter(rocksdb_options())
                writer.open(str(sst_path))
            writer[key] = value
            count += 1
        if writer is not None:
            writer.finish()
        return count
    finally:
        db.close()


def import_sst(db_dir: Path, sst_path: Path | None) -> None:
    """Create a database in ``db_dir`` (which must not exist) holding the entries of ``sst_path``.

    The file is moved into the database rather than copied; ``None`` gives an empty one.
    """
    if db_dir.exists():
        raise FileExistsError(f"database directory {db_dir} already exists")
    db_dir.parent.mkdir(parents=True, exist_ok=True)
    db = Rdict(str(db_dir), rocksdb_options())
    try:
        if sst_path is not None:
            ingest = IngestExternalFileOptions()
            ingest.set_move_files(True)
            db.ingest_external_file([str(sst_path)], ingest)
    finally:
        db.close()
