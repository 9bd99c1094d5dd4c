"""An in-memory broker and worker edges for running the real worker loop without Kafka or S3.

``MemoryBroker`` keeps topics as lists of records per partition, consumer-group offsets with
their metadata, and applies a transaction atomically: its records become readable and its
offsets committed at the same instant (a read-committed consumer's view of Kafka). A worker
runs on it with ``Worker(..., connect=broker.connect(faults), store_backend=MemoryBackend(),
uploader=InlineExecutor)``.

``Faults`` aborts that worker at a chosen step of the commit protocol — after the snapshot,
mid-upload, after the upload, before or after the transaction commit, mid-savepoint, while
restoring, or after some records — by raising ``Crash`` (a ``BaseException``, so nothing in the
worker catches it). From then on every edge raises ``Crash`` too, as if the process had died:
nothing more reaches the broker or the store. The test then starts a new worker on the same
broker, store and (or a wiped) state directory: the restart a Kubernetes pod gets.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weir.edges import Offset
from weir.kafka import TopicMissing
from weir.objectstores import MemoryBackend
from weir.tasks import EARLIEST, LATEST, Consumed, Headers, Message, Task

if TYPE_CHECKING:
    from weir.graph import JobGraph
    from weir.metrics import WorkerMetrics
    from weir.worker import Worker

__all__ = [
    "STEPS",
    "Consumed",
    "Crash",
    "Faults",
    "FaultyStore",
    "InlineExecutor",
    "MemoryBroker",
    "MemoryEdges",
    "memory_worker",
    "run_through",
]

STEPS = (
    "records",
    "after-snapshot",
    "mid-upload",
    "after-upload",
    "before-commit",
    "after-commit",
    "mid-savepoint",
    "restore",
)
"""Where ``Faults`` can abort a worker (see the module docstring)."""


class Crash(BaseException):
    """The worker process died here (raised by ``Faults``)."""


@dataclass
class Faults:
    """One abort, armed at ``step`` for its ``nth`` occurrence (1-based); ``crashed`` once fired."""

    step: str | None = None
    nth: int = 1
    crashed: bool = False
    seen: dict[str, int] = field(default_factory=dict)

    def arm(self, step: str | None, nth: int = 1) -> None:
        if step is not None and step not in STEPS:
            raise ValueError(f"unknown step {step!r}; one of {', '.join(STEPS)}")
        self.step, self.nth, self.crashed, self.seen = step, nth, False, {}

    def at(self, step: str, count: int = 1) -> None:
        """Pass ``count`` occurrences of ``step``; raise ``Crash`` if the armed one is among them."""
        if self.crashed:
            raise Crash(f"the worker is dead (crashed at {self.step})")
        seen = self.seen.get(step, 0) + count
        self.seen[step] = seen
        if step == self.step and seen >= self.nth:
            self.crashed = True
            raise Crash(f"crash at {step} #{self.nth}")

    def alive(self) -> None:
        if self.crashed:
            raise Crash(f"the worker is dead (crashed at {self.step})")


class MemoryBroker:
    """Topics, committed offsets and atomic transactions in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.topics: dict[str, list[list[Consumed]]] = {}
        self.offsets: dict[tuple[str, str, int], tuple[int, str | None]] = {}
        self.commits = 0

    def create(self, topic: str, partitions: int) -> None:
        self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """A stable partitioner (CRC32 of the key; the first partition for a null key)."""
        return zlib.crc32(key) % len(self.topics[topic]) if key is not None else 0

    def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int = -1,
        timestamp: int = 0,
        headers: Headers | None = None,
    ) -> int:
        """Write one record now (outside any transaction); returns its offset."""
        if partition < 0:
            partition = self.partition_for(topic, key)
        log = self.topics[topic][partition]
        log.append(Consumed(topic, partition, len(log), key, value, timestamp, headers))
        return len(log) - 1

    def records(self, topic: str) -> list[Consumed]:
        """Every readable record of ``topic``, partition by partition."""
        return [m for part in self.topics[topic] for m in part]

    def commit(self, group: str, records: Iterable[tuple[Any, ...]], offsets: Sequence[Offset]) -> None:
        """Apply a transaction: its records and its group offsets, at once."""
        for topic, value, key, partition, headers in records:
            self.append(topic, value, key, partition, 0, headers)
        for o in offsets:
            self.offsets[(group, o.topic, o.partition)] = (o.offset, o.metadata)
        self.commits += 1

    def connect(self, faults: Faults | None = None, on_consume: Callable[[int], None] | None = None) -> Any:
        """The ``connect`` argument of ``weir.worker.Worker``: edges on this broker.
        ``on_consume(n)`` is called after every consume with the number of records (0: idle)."""
        from weir.kafka_io import Start

        def connect(start: Start) -> MemoryEdges:
            return MemoryEdges(self, start, faults or Faults(), on_consume)

        return connect


class MemoryEdges:
    """One worker start's Source and Sink on a ``MemoryBroker`` (exactly-once semantics)."""

    def __init__(
        self,
        broker: MemoryBroker,
        start: Any,
        faults: Faults,
        on_consume: Callable[[int], None] | None = None,
    ) -> None:
        faults.alive()
        graph = start.graph
        self.broker, self.start, self.faults, self.on_consume = broker, start, faults, on_consume
        self.group = graph.group_id
        for topic, where in [(t, "spec.pipeline.source.topics") for t in graph.source_topics] + [
            (graph.sink_topic, "spec.pipeline.sink.topic")
        ]:
            if topic not in broker.topics:
                raise TopicMissing(f"topic {topic!r} ({where}) does not exist")
        if graph.dead_letter_topic:
            broker.create(graph.dead_letter_topic, 1)
        self.partitions = {t: len(broker.topics[t]) for t in graph.source_topics}
        if graph.repartition_topic:
            n = graph.repartition_partitions or max(self.partitions.values())
            broker.create(graph.repartition_topic, n)
            self.partitions[graph.repartition_topic] = len(broker.topics[graph.repartition_topic])
        for step in graph.joins:
            if step.topic not in broker.topics:
                where = f"spec.pipeline.steps[{step.index}].join.topic"
                raise TopicMissing(f"topic {step.topic!r} ({where}) does not exist")
        self.table_partitions = {t: len(broker.topics[t]) for t in graph.table_topics}
        self.positions: dict[tuple[str, int], int] = {}
        self.open: list[MemoryTransaction] = []
        """Transactions begun and not committed (a rollback abandons them with these edges)."""
        self._turn = 0

    # -- Source -----------------------------------------------------------------------------
    def consume(self, max_records: int, timeout_s: float) -> list[Message]:
        self.faults.alive()
        out: list[Message] = []
        keys = list(self.positions)
        for i in range(len(keys)):  # round robin: a different partition first each time
            tp = keys[(self._turn + i) % len(keys)]
            log = self.broker.topics[tp[0]][tp[1]]
            pos = self.positions[tp]
            take = log[pos : pos + max_records - len(out)]
            out.extend(take)
            self.positions[tp] = pos + len(take)
            if len(out) >= max_records:
                break
        self._turn += 1
        if out:
            self.faults.at("records", len(out))
        # Idle only once nothing this worker produced for itself is still uncommitted: a
        # repartitioned job's stage 2 reads stage 1's records after their commit.
        if self.on_consume is not None and (out or not self._own_output_pending()):
            self.on_consume(len(out))
        return out

    def _own_output_pending(self) -> bool:
        read = {topic for topic, _p in self.positions}
        return any(r[0] in read for txn in self.open for r in txn.records)

    def assign(self, tasks: Sequence[Task]) -> None:
        for t in tasks:
            end = len(self.broker.topics[t.topic][t.partition])
            pos = 0 if t.next_offset == EARLIEST else end if t.next_offset == LATEST else t.next_offset
            self.positions[(t.topic, t.partition)] = pos

    def committed(self, tasks: Sequence[Task]) -> dict[str, tuple[int, str | None]]:
        self.faults.alive()
        found = {t.name: self.broker.offsets.get((self.group, t.topic, t.partition)) for t in tasks}
        return {name: v for name, v in found.items() if v is not None}

    def position(self, task: Task) -> int:
        return self.positions.get((task.topic, task.partition), task.next_offset)

    def caught_up(self, task: Task) -> bool:
        return self.position(task) >= len(self.broker.topics[task.topic][task.partition])

    def lag(self, task: Task) -> int | None:
        return len(self.broker.topics[task.topic][task.partition]) - self.position(task)

    def table_ends(self, tasks: list[Task]) -> dict[tuple[str, int], tuple[int, int]]:
        self.faults.alive()
        return {(t.topic, t.partition): (0, len(self.broker.topics[t.topic][t.partition])) for t in tasks}

    # -- Sink -------------------------------------------------------------------------------
    def begin(self) -> MemoryTransaction:
        self.faults.alive()
        txn = MemoryTransaction(self)
        self.open.append(txn)
        return txn

    def poll(self) -> None:
        self.faults.alive()

    def probe_due(self, now: float) -> bool:
        return False

    def probe(self) -> bool:
        return True

    def close(self) -> None:
        self.positions = {}


class MemoryTransaction:
    """Records buffered until ``commit`` applies them with the offsets (never before)."""

    def __init__(self, edges: MemoryEdges) -> None:
        self.edges = edges
        self.records: list[tuple[Any, ...]] = []
        self._unanswered = 0

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int = -1,
        headers: Headers | None = None,
    ) -> None:
        self.edges.faults.alive()
        broker = self.edges.broker
        if partition < 0:
            partition = broker.partition_for(topic, key)
        self.records.append((topic, value, key, partition, headers))

    def flush(self) -> None:
        self.edges.faults.alive()

    def start_commit(self, offsets: Sequence[Offset]) -> None:
        # Like Kafka's answer, the commit's arrives a round of the worker's loop later: the loop
        # goes on with the next epoch meanwhile, and the abort steps of ``commit`` come after.
        self._unanswered = 1

    def committing(self) -> bool:
        if self._unanswered:
            self._unanswered -= 1
            return True
        return False

    def commit(self, offsets: Sequence[Offset]) -> None:
        faults = self.edges.faults
        faults.at("before-commit")
        self.edges.broker.commit(self.edges.group, self.records, offsets)
        self.records = []
        if self in self.edges.open:
            self.edges.open.remove(self)
        faults.at("after-commit")


class FaultyStore(MemoryBackend):
    """A ``memory://`` checkpoint backend that dies with the worker and tells ``Faults`` where an
    upload is: its first write is ``after-snapshot`` (the snapshot is taken, nothing is up), the
    files after it ``mid-upload``, the manifest written ``after-upload``; any write of a savepoint
    is ``mid-savepoint``; reading a file back is ``restore``."""

    def __init__(self, faults: Faults, bucket: str = "mem") -> None:
        super().__init__(bucket)
        self.faults = faults
        self._uploading = False

    def _put(self, key: str) -> None:
        if "/savepoints/" in key:
            self.faults.at("mid-savepoint")
        elif not self._uploading:
            self._uploading = True
            self.faults.at("after-snapshot")
        else:
            self.faults.at("mid-upload")

    def put_file(self, key: str, path: Path) -> None:
        self._put(key)
        super().put_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(key)
        super().put_bytes(key, data)
        if key.endswith("manifest.json"):
            self._uploading = False
            if "/savepoints/" not in key:
                self.faults.at("after-upload")

    def get_file(self, key: str, path: Path) -> None:
        self.faults.at("restore")
        super().get_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        self.faults.alive()
        return super().get_bytes(key)

    def delete(self, keys: Sequence[str]) -> None:
        self.faults.alive()
        super().delete(keys)


class InlineExecutor(Executor):
    """Runs each submitted call at once, on the caller's thread: uploads in a deterministic order."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a thread would
            future.set_exception(exc)
        return future


def memory_worker(
    graph: JobGraph,
    broker: MemoryBroker,
    state: Path,
    *,
    on_consume: Callable[[int], None],
    backend: MemoryBackend | None = None,
    faults: Faults | None = None,
    index: int = 0,
    workers: int = 1,
    batch_size: int = 7,
    metrics: WorkerMetrics | None = None,
    **settings: Any,
) -> Worker:
    """A real ``weir.worker.Worker`` on ``broker`` and an in-memory checkpoint store
    (``memory://mem/ck`` on ``backend``): checkpoints and watermarks on every batch, uploads
    inline. ``on_consume(n)`` is called after each read of ``n`` records (it stops the worker,
    asks for savepoints...); ``settings`` are further ``WorkerSettings`` (``restore_from``,
    ``allow_state_reset``...)."""
    from weir import kafka as kio
    from weir.worker import Worker, WorkerSettings

    return Worker(
        graph,
        kio.KafkaSettings("memory", {}, {}),
        WorkerSettings(
            index,
            workers,
            state,
            batch_size=batch_size,
            checkpoint_interval_s=0,
            watermark_interval_s=0,
            checkpoint_url="memory://mem/ck",
            shutdown_timeout_s=5,
            **settings,
        ),
        metrics=metrics,
        connect=broker.connect(faults or Faults(), on_consume),
        store_backend=backend if backend is not None else MemoryBackend(),
        uploader=InlineExecutor,
    )


def run_through(
    graph: JobGraph,
    broker: MemoryBroker,
    root: Path,
    schedule: Sequence[tuple[str, int]],
    seed: int,
    *,
    savepoint_every: int = 0,
    wipe: float = 0.5,
    batch: tuple[int, int] = (3, 12),
    max_restarts: int = 50,
) -> int:
    """Run the job on ``broker`` to the end of its input through every abort of ``schedule``
    (each a ``Faults.arm`` argument pair, armed one per start); returns the number of restarts.

    Each start is a ``memory_worker`` with a batch size drawn from ``batch`` that stops once its
    input is read and asks for a savepoint every ``savepoint_every`` records (0: never). After an
    abort the local state is wiped with probability ``wipe``, as if the pod moved. ``seed``
    drives both draws, so a run is reproducible."""
    import random

    rng = random.Random(seed)
    faults = Faults()
    backend = FaultyStore(faults)
    pending = list(schedule)
    state = root / "state"
    restarts = 0
    while True:
        faults.arm(*pending.pop(0)) if pending else faults.arm(None)
        size = rng.randrange(*batch)
        worker = _stopping_worker(graph, broker, state, backend, faults, size, savepoint_every, restarts)
        try:
            assert worker.run() == 0
            return restarts
        except Crash:
            restarts += 1
            assert restarts < max_restarts, "the job never got through its schedule"
            if rng.random() < wipe:
                shutil.rmtree(state, ignore_errors=True)


def _stopping_worker(
    graph: JobGraph,
    broker: MemoryBroker,
    state: Path,
    backend: FaultyStore,
    faults: Faults,
    batch_size: int,
    savepoint_every: int,
    start: int,
) -> Worker:
    """``run_through``'s worker for its ``start``-th start: stops once its input is read and asks
    for a savepoint every ``savepoint_every`` records."""
    from weir.controlapi import SavepointRequest

    seen = [0]

    def on_consume(n: int) -> None:
        seen[0] += n
        if n == 0:
            worker.stop()  # the input is read: commit what is left and stop
        elif savepoint_every and seen[0] % savepoint_every < n:
            worker.savepoints.ask(SavepointRequest(id=f"sp-{start}-{seen[0]}"))

    worker = memory_worker(
        graph, broker, state, on_consume=on_consume, backend=backend, faults=faults, batch_size=batch_size
    )
    return worker
