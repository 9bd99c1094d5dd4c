"""The edges of a worker, as the commit protocol sees them: Source, Sink, Transaction, Store.

``weir.kafka_io`` implements Source and Sink on Kafka, ``weir.checkpoint.CheckpointStore`` the
Store (file://, s3://, memory://); ``weir.testing`` has in-memory Source and Sink doubles. The
exceptions are what an edge raises to the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from weir import checkpoint as ck
from weir.tasks import Headers, Message, Task

if TYPE_CHECKING:
    from weir.native import Fetched

__all__ = [
    "DeliveryFailed",
    "Offset",
    "Rollback",
    "Sink",
    "Source",
    "Stopped",
    "Store",
    "StoreUnavailable",
    "Transaction",
]


class Rollback(RuntimeError):
    """What was processed since the last commit cannot be committed (records timed out during
    an outage, the transaction was aborted or fenced): the worker drops it and starts over from
    the last committed state, in the same process (``Worker.run``)."""


class DeliveryFailed(RuntimeError):
    """The sink refused a record for good (too large, not authorised, unknown topic); the worker
    stops without committing. Failures an outage causes roll back instead (``Rollback``)."""


class Stopped(Exception):
    """Stop was requested while waiting out an outage; nothing more can be committed."""


class StoreUnavailable(RuntimeError):
    """The checkpoint store stayed unreachable for the whole start-up timeout."""


class Offset(NamedTuple):
    """The next offset to read in one input partition, committed with the snapshot id."""

    topic: str
    partition: int
    offset: int
    metadata: str | None = None


class Transaction(Protocol):
    """One epoch of output."""

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int = -1,
        headers: Headers | None = None,
    ) -> None:
        """Write a record into the epoch (back-pressure may block; never drops)."""

    def flush(self) -> None:
        """Called when a checkpoint closes the epoch. At-least-once: return once every record
        produced is acknowledged. Exactly-once may return at once, when ``commit`` waits for
        them itself. Raise ``Rollback`` (or ``DeliveryFailed``) for records that failed."""

    def commit(self, offsets: Sequence[Offset]) -> None:
        """Make the epoch's output and these input offsets visible together (exactly-once), or
        commit the offsets after the output (at-least-once); ``Rollback`` when it cannot. After
        ``start_commit`` it finishes that commit (and retries it if it failed)."""

    def start_commit(self, offsets: Sequence[Offset]) -> None:
        """Begin ``commit(offsets)`` in the background, if the edge can, so the worker goes on
        with the next epoch while the broker answers; ``commit`` finishes it."""

    def committing(self) -> bool:
        """Whether a commit begun by ``start_commit`` is still waiting for its answer."""


class Sink(Protocol):
    """Where transactions come from: at most two are open (one committing, one being written)."""

    def begin(self) -> Transaction: ...

    def poll(self) -> None:
        """Serve delivery reports; raise ``Rollback``/``DeliveryFailed`` for failed ones."""


class Source(Protocol):
    """The input partitions of one worker."""

    def consume(self, max_records: int, timeout_s: float) -> list[Message] | Fetched:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first (a
        natively run pipeline's as a ``weir.native.Fetched`` batch)."""

    def assign(self, tasks: Sequence[Task]) -> None:
        """Start reading every task's partition at its ``next_offset``."""

    def committed(self, tasks: Sequence[Task]) -> dict[str, tuple[int, str | None]]:
        """The committed offset and snapshot id of each task that has one, by ``Task.name``."""

    def position(self, task: Task) -> int: ...
    def caught_up(self, task: Task) -> bool: ...
    def lag(self, task: Task) -> int | None: ...

    table_partitions: dict[str, int]
    """Partition count of each join table topic."""

    def table_ends(self, tasks: list[Task]) -> dict[tuple[str, int], tuple[int, int]]:
        """The ``(low, high)`` watermark offsets of each task's partition now (join tables)."""


class Store(Protocol):
    """The part of ``weir.checkpoint.CheckpointStore`` the protocol uses."""

    def scan_kind(self, kind: str = "checkpoint") -> ck.Scan: ...
    def next_seq(self, worker_index: int) -> int: ...
    def read_savepoint(self, url: str) -> list[ck.Manifest]: ...
    def restore(self, manifest: ck.Manifest, partition: str, db_dir: Path) -> Path: ...
    def write_checkpoint(
        self,
        checkpoint_id: str,
        worker: tuple[int, int],
        partitions: Mapping[str, ck.PartitionSnapshot],
        state_shape: Mapping[str, Any] | None = None,
    ) -> ck.WriteResult: ...
    def write_savepoint(
        self,
        savepoint_id: str,
        worker: tuple[int, int],
        partitions: Mapping[str, ck.PartitionSnapshot],
        path: str | None = None,
        state_shape: Mapping[str, Any] | None = None,
    ) -> ck.WriteResult: ...
    def retain(
        self, keep: int, worker_index: int, owned_partitions: Iterable[str], workers: int | None = None
    ) -> int: ...
