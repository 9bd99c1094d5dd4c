"""RocksDB options of the partition databases and the worker's shared RocksDB memory.

Every partition database (``weir.state.PartitionStore``, ``weir.process_store.ProcessStore``) is
opened, restored and exported with ``rocksdb_options``; ``RocksMemory`` is the one block cache and
write buffer manager all of a worker's databases share within its memory budget; ``RocksStore``
is what both stores do with their database alike (size, background work, checkpoint, close).
"""

from __future__ import annotations

import threading
from pathlib import Path

from rocksdict import (
    BlockBasedIndexType,
    BlockBasedOptions,
    Cache,
    Checkpoint,
    Options,
    Rdict,
    WriteBufferManager,
)

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


class RocksMemory:
    """RocksDB's share of a worker's memory budget, shared by every partition database.

    One LRU block cache of ``capacity`` bytes for all databases (data, index and filter
    blocks), and one write buffer manager that charges every memtable to that same cache, so
    RocksDB's block cache and memtables together stay within ``capacity`` (RocksDB's
    "cost memtable memory to block cache" mode). Memtables may take half of it.
    """

    def __init__(self, capacity: int, databases: int) -> None:
        self.capacity = capacity
        self.cache = Cache(capacity)
        self.write_buffers = WriteBufferManager.new_write_buffer_manager_with_cache(
            capacity // 2, False, self.cache
        )
        # Two memtables per database (one filling, one flushing) within the memtable half.
        self.write_buffer_size = max(1 << 20, capacity // 2 // max(1, databases) // 2)

    def used(self) -> int:
        """Bytes held in the shared cache now (blocks plus memtable reservations)."""
        return int(self.cache.get_usage())


def rocksdb_options(memory: RocksMemory | None = None) -> Options:
    """The options every partition database is opened (and restored) with.

    With ``memory``, the database uses the worker's shared block cache and write buffer
    manager, and index and filter blocks live in that cache too (otherwise they are held
    outside any limit, per open file).
    """
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_target_file_size_base(_TARGET_FILE_BYTES)
    options.set_max_bytes_for_level_base(_LEVEL_BASE_BYTES)
    options.set_level_zero_file_num_compaction_trigger(_L0_COMPACTION_TRIGGER)
    options.set_level_zero_slowdown_writes_trigger(_L0_SLOWDOWN_TRIGGER)
    options.set_level_zero_stop_writes_trigger(_L0_STOP_TRIGGER)
    table = BlockBasedOptions()
    # A window read back from disk is usually a miss first (a new window): a bloom filter
    # answers most misses without reading a data block.
    table.set_bloom_filter(10, False)
    if memory is not None:
        table.set_block_cache(memory.cache)
        table.set_cache_index_and_filter_blocks(True)
        # Partitioned in 4 KiB blocks: a whole 8 MiB file's index or filter block is bigger than
        # one shard of a small cache (64 shards), so it would be evicted as soon as read and
        # every lookup would read and parse it again (measured: 100 us per get instead of 1).
        table.set_partition_filters(True)
        table.set_index_type(BlockBasedIndexType.two_level_index_search())
        table.set_metadata_block_size(4096)
        table.set_pin_top_level_index_and_filter(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        options.set_write_buffer_manager(memory.write_buffers)
        options.set_write_buffer_size(memory.write_buffer_size)
        options.set_max_write_buffer_number(2)
    options.set_block_based_table_factory(table)
    return options


_BACKGROUND_WORK = (
    "rocksdb.compaction-pending",
    "rocksdb.num-running-compactions",
    "rocksdb.num-running-flushes",
)


class RocksStore:
    """The part of a partition store that is only its RocksDB database (``_db``).

    A checkpoint is taken in two steps: ``start_checkpoint`` on the worker's thread, right after
    ``flush`` wrote the state it is to hold, and ``checkpoint`` on the checkpoint thread (the
    memtable flush and the hard links, tens of milliseconds with the GIL released, while the
    worker goes on). Between the two the database is fenced: a write or ``close`` (through
    ``_writable``) waits for ``checkpoint`` to finish, so nothing written after ``flush`` can land
    in the snapshot. Reads go on meanwhile.
    """

    _db: Rdict
    _fence: threading.Event | None = None
    """Clear while a snapshot started by ``start_checkpoint`` is not yet taken."""

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

    def start_checkpoint(self) -> None:
        """Fence the database for the snapshot ``checkpoint`` takes next (possibly on another
        thread) and start writing its memtable out in the background: a worker starts every
        partition's before it takes the first snapshot, so the flushes overlap. Every
        ``start_checkpoint`` is followed by ``checkpoint`` or ``end_checkpoint``."""
        self._writable()  # a snapshot still being taken finishes first
        self._fence = threading.Event()
        self._db.flush(wait=False)

    def checkpoint(self, dest: Path) -> Path:
        """Snapshot what ``flush`` last wrote into ``dest`` (which must not exist) and return it;
        lifts the fence ``start_checkpoint`` set, whether or not it succeeds.

        The memtable is flushed first, so the snapshot is SST files (hard links: instant, no
        copy) plus a few small metadata files and needs no write-ahead log. The directory opens
        as a normal store of the same kind, and the working set keeps changing meanwhile without
        touching it. Changes not yet written by ``flush`` are not in it: call it right after
        (or after ``start_checkpoint``).
        """
        try:
            if dest.exists():
                raise FileExistsError(f"checkpoint directory {dest} already exists")
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._db.flush(wait=True)
            Checkpoint(self._db).create_checkpoint(str(dest))
            return dest
        finally:
            self.end_checkpoint()

    def end_checkpoint(self) -> None:
        """Lift the fence of ``start_checkpoint`` (a snapshot that will not be taken)."""
        fence = self._fence
        if fence is not None:
            fence.set()

    def _writable(self) -> Rdict:
        """The database, once no snapshot of it is being taken: what the state writes with."""
        fence = self._fence
        if fence is not None and not fence.is_set():
            fence.wait()
        return self._db

    def close(self) -> None:
        self._writable().close()
