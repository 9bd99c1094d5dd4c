"""One memory budget per worker: parsing it and splitting it between the parts that hold memory.

A worker's memory is its Python process (interpreter, libraries, one batch of records in
flight: measured at start, the *base*) plus four parts that grow with the job and that the
budget bounds:

- ``window_cache``: accumulators of windows kept in memory (the rest live in RocksDB);
- ``timers``: the timer index of those in-memory windows (timers of spilled windows are the
  window entries on disk, ordered by end) and the changed/deleted sets waiting for a write;
- ``rocksdb``: one block cache shared by every partition's database, with the memtables
  charged to it through one write buffer manager;
- ``kafka_queues``: librdkafka's consumer prefetch queue and producer queue.

``split`` is the one rule (documented in the README): the budget minus the base is divided
15 % Kafka queues, 25 % RocksDB, 60 % windows (cache and timers), each part with a floor so a
small budget still works, and a budget too small for the base plus the floors is refused.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MemoryBudgetTooSmall", "MemoryPlan", "format_size", "parse_size", "rss_bytes"]

_UNITS = {
    "": 1,
    "m": 0.001,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
}
# Kubernetes' quantity syntax (a memory limit is one): a decimal number, optionally with an
# exponent or a decimal or binary suffix.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|)\s*$")

KAFKA_SHARE = 0.15
"""Of the budget above the base: librdkafka's queues. Past a few MiB a bigger consumer queue
only prefetches further ahead; 15 % of a 256 MiB budget (~25 MiB) kept the 10M-key benchmark
at full speed."""
ROCKSDB_SHARE = 0.25
"""Of the budget above the base: RocksDB's shared block cache and memtables. Reads of spilled
windows hit the OS page cache when the block cache misses, so this share buys less than the
same bytes of window cache (which needs no decode)."""
KAFKA_FLOOR = 4 << 20
ROCKSDB_FLOOR = 8 << 20
WINDOWS_FLOOR = 8 << 20
MESSAGE_BYTES = 512
"""A queued Kafka message's cost in librdkafka beyond a small payload (its message and queue
structures, the Python object once consumed), for sizing queues counted in messages."""
TIMER_ENTRY_BYTES = 8
"""One in-memory timer entry: a slot in a list pointing at the window's key, which the cache
holds (and counts) anyway."""
BASE_HEADROOM = 24 << 20
"""Added to the measured start-up RSS: one batch of records and results in flight, the
allocator's slack, the HTTP server's threads. Measured: a 256 MiB budget peaked 20-30 MiB above
the parts' accounted sum plus the start-up RSS."""


class MemoryBudgetTooSmall(ValueError):
    """The budget cannot hold the worker process plus each part's minimum."""


def parse_size(text: str) -> int:
    """Bytes from a Kubernetes quantity: ``268435456``, ``256Mi``, ``1.5Gi``, ``512M``, ``1e9``.

    Raises ValueError with a one-line message for anything else.
    """
    m = _SIZE.match(str(text))
    if m is None:
        raise ValueError(
            f"memory size {text!r} is not a number of bytes with an optional unit (Ki, Mi, Gi, k, M, G)"
        )
    value = float(m.group(1)) * 10 ** int(m.group(2) or 0) * _UNITS[m.group(3)]
    if value < 1:
        raise ValueError(f"memory size {text!r} must be at least 1 byte")
    return int(value)


def format_size(n: int) -> str:
    """``268435456`` -> ``"256Mi"`` (binary units, for logs and /status)."""
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}Mi"
    return str(n)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    Called after the window store drops windows from memory: RocksDB's memtables and the
    evicted windows leave free pages scattered in the C heap that glibc otherwise keeps, so the
    resident size would stay at its highest point instead of following what is in use.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim() -> Any:
    global _TRIM
    if _TRIM is False:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = None
    return _TRIM


_TRIM: Any = False


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryPlan:
    """A worker's budget and each part's share, in bytes (see the module docstring)."""

    budget: int
    """The whole worker's target, ``--memory-budget`` / ``WEIR_MEMORY_BUDGET``."""
    base: int
    """The process itself: start-up RSS plus ``BASE_HEADROOM``."""
    kafka_queues: int
    rocksdb: int
    windows: int
    """Window cache and timers together; ``window_share`` gives one partition's part."""

    @classmethod
    def split(cls, budget: int, base: int) -> MemoryPlan:
        """Divide ``budget`` after ``base`` by the shares above; ValueError if it cannot fit."""
        floors = KAFKA_FLOOR + ROCKSDB_FLOOR + WINDOWS_FLOOR
        if budget < base + floors:
            raise MemoryBudgetTooSmall(
                f"memory budget {format_size(budget)} is below the minimum "
                f"{format_size(base + floors)} (the worker process itself takes {format_size(base)})"
            )
        free = budget - base
        kafka = max(KAFKA_FLOOR, int(free * KAFKA_SHARE))
        rocksdb = max(ROCKSDB_FLOOR, int(free * ROCKSDB_SHARE))
        windows = free - kafka - rocksdb
        if windows < WINDOWS_FLOOR:
            windows = WINDOWS_FLOOR
            rocksdb = free - kafka - windows
        return cls(budget, base, kafka, rocksdb, windows)

    def window_share(self, partitions: int) -> int:
        """One partition's bytes for its window cache and timers (keys spread evenly)."""
        return self.windows // max(1, partitions)

    @property
    def consumer_queue_kbytes(self) -> int:
        """librdkafka ``queued.max.messages.kbytes`` over all partitions (librdkafka applies it
        per partition: divide by their number): a third of the Kafka share; a fetch response of
        ``fetch_max_bytes`` may overshoot the limits once."""
        return max(1024, self.kafka_queues // 3 // 1024)

    @property
    def fetch_max_bytes(self) -> int:
        """librdkafka ``fetch.max.bytes``: another third of the Kafka share."""
        return max(1 << 20, self.kafka_queues // 3)

    def consumer_queue_messages(self, partitions: int) -> int:
        """librdkafka ``queued.min.messages`` per partition: its default (100,000 per partition)
        holds far more than the byte limit suggests for small records, because every queued
        message costs ``MESSAGE_BYTES`` beyond its payload."""
        return max(1000, self.kafka_queues // 3 // MESSAGE_BYTES // max(1, partitions))

    @property
    def producer_queue_messages(self) -> int:
        """librdkafka ``queue.buffering.max.messages``, for the same reason."""
        return max(1000, self.kafka_queues // 3 // MESSAGE_BYTES)

    @property
    def producer_queue_kbytes(self) -> int:
        """librdkafka ``queue.buffering.max.kbytes``: the remaining third of the Kafka share."""
        return max(1024, self.kafka_queues // 3 // 1024)

    def as_dict(self) -> dict[str, int]:
        return {"budget": self.budget, **self.shares()}

    def shares(self) -> dict[str, int]:
        """Each part's bytes: the ``part`` label values of ``weir_memory_share_bytes``."""
        return {
            "base": self.base,
            "windows": self.windows,
            "rocksdb": self.rocksdb,
            "kafka_queues": self.kafka_queues,
        }
