"""The worker process: the loop that wires its edges to the task core and the commit protocol.

One iteration: take a batch from the ``Source`` (``weir.kafka_io`` on Kafka, or the in-memory
doubles of ``weir.testing``), run it through the task core (``weir.core``), serve deliveries,
and every ``checkpointInterval`` close the epoch (``weir.commit``). Every ``watermarkInterval``
it ticks: idle watermarks, watermark markers, firing, outage probes, and a fresh ``/status``.

An outage never ends it: the worker waits, reports not-ready, and when what it processed cannot
be committed any more (``Rollback``) it starts over from the last committed state in this
process (new clients, a new committer, the same task core).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from weir import checkpoint as ck
from weir import kafka as kio
from weir import memory
from weir.commit import Committer, Policy, Waits
from weir.controlapi import SavepointAnswer, SavepointRequest, WorkerStatus
from weir.core import TaskCore
from weir.edges import DeliveryFailed, Rollback, Sink, Source, Stopped, StoreUnavailable
from weir.graph import JobGraph, compile_job
from weir.kafka_io import Start, connect
from weir.outages import Backoff, Dependencies
from weir.rocksdb_options import RocksMemory
from weir.status import publish
from weir.tasks import Task

log = logging.getLogger(__name__)

__all__ = [
    "DeliveryFailed",
    "Rollback",
    "Stopped",
    "StoreUnavailable",
    "Worker",
    "WorkerSettings",
    "compile_job",
]


@dataclass(frozen=True)
class WorkerSettings:
    """How this worker runs: its place among the workers, where state lives, its HTTP port."""

    index: int
    count: int
    state_dir: Path
    http_host: str = "0.0.0.0"
    http_port: int = 9249
    batch_size: int = 5000
    checkpoint_interval_s: float = 5.0
    guarantee: str = "exactly-once"
    """``exactly-once``: output, dead letters and offsets commit in one Kafka transaction per
    checkpoint. ``at-least-once``: offsets are committed after the checkpoint; a crash replays."""
    checkpoint_url: str | None = None
    """``file:///path`` or ``s3://bucket/prefix``; None: ``file://<state_dir>/checkpoints``."""
    checkpoint_retain: int = 3
    restore_from: str | None = None
    """A savepoint (or checkpoint) URL to start from instead of the latest checkpoint."""
    allow_state_reset: bool = False
    """A snapshot whose state shape does not fit the pipeline starts empty from its offsets
    instead of ``StateShapeMismatch`` (exit code 2)."""
    s3: Any = None
    """``weir.checkpoint.S3Settings`` for an ``s3://`` store (None: from the environment)."""
    watermark_interval_s: float = 0.2
    max_cached_windows: int = 1_000_000
    """An upper bound on each partition's cached windows (deprecated: use ``memory_budget``)."""
    memory_budget: int | None = None
    """Bytes the whole worker process aims to stay within (``weir.memory``); None: unbounded
    except by ``max_cached_windows``."""
    shutdown_timeout_s: float = 20.0
    savepoint_timeout_s: float = 600.0
    max_records_per_second: float | None = None
    """Process at most this many input records per second (``--max-records-per-second``): a known
    capacity for autoscaler tests and benchmarks. The wait counts as busy time, so the busy ratio
    and the processing rate describe a worker of exactly this capacity."""


class Edges(Source, Sink, Protocol):
    """A worker's input and output for one start (``weir.kafka_io.KafkaEdges``)."""

    partitions: dict[str, int]
    """Partition count of each input topic (sources, and the repartition topic if any)."""

    def probe_due(self, now: float) -> bool: ...
    def probe(self) -> bool: ...
    def close(self) -> None: ...


class SavepointWaiter:
    def __init__(self, request: SavepointRequest) -> None:
        self.request = request
        self.done = threading.Event()
        self.result: SavepointAnswer | None = None
        self.error: str | None = None


class Savepoints:
    """Savepoint requests from the control server's threads, taken by the worker's loop.

    Idempotent by request id: the same id returns the same savepoint (the operator may retry
    after its own restart without producing two)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._requests: list[SavepointWaiter] = []
        self._waiting: dict[str, SavepointWaiter] = {}
        self._done: dict[str, SavepointAnswer] = {}
        self.last: SavepointAnswer | None = None

    def ask(self, request: SavepointRequest) -> SavepointWaiter:
        """Queue a request (once per id) without waiting; its waiter says when it is done."""
        with self._lock:
            waiter = self._waiting.get(request.id)
            if waiter is None:
                waiter = SavepointWaiter(request)
                done = self._done.get(request.id)
                if done is not None:
                    waiter.result = done
                    waiter.done.set()
                    return waiter
                self._waiting[request.id] = waiter
                self._requests.append(waiter)
            return waiter

    def request(self, request: SavepointRequest) -> SavepointAnswer:
        """Called by a control thread: queue the request and wait for its answer."""
        waiter = self.ask(request)
        if not waiter.done.wait(self.timeout_s):
            raise TimeoutError(f"savepoint {request.id} not complete after {self.timeout_s:.0f}s")
        if waiter.error is not None:
            raise RuntimeError(waiter.error)
        assert waiter.result is not None
        return waiter.result

    @property
    def asked(self) -> bool:
        return bool(self._requests)

    def take(self, committer: Committer) -> bool:
        """Take every queued savepoint (on the loop's thread); True when one asked to stop after."""
        with self._lock:
            requests, self._requests = self._requests, []
        stop = False
        for waiter in requests:
            sid = waiter.request.id
            try:
                answer = SavepointAnswer.model_validate(committer.savepoint(sid, waiter.request.path))
                self.last = answer
                with self._lock:
                    self._done[sid] = answer
                waiter.result = answer
                stop = stop or waiter.request.stop
            except Exception as exc:
                # The worker stops (its restart recovers from the last commit); the caller learns why.
                waiter.error = f"the worker failed while taking the savepoint: {type(exc).__name__}: {exc}"
                raise
            finally:
                waiter.done.set()
                with self._lock:
                    self._waiting.pop(sid, None)
        return stop

    def fail(self, reason: str) -> None:
        with self._lock:
            waiting = list(self._waiting.values())
            self._requests = []
        for waiter in waiting:
            if not waiter.done.is_set():
                waiter.error = reason
                waiter.done.set()


class Worker:
    """Runs one worker until ``stop()`` (or SIGTERM); see the module docstring.

    ``connect`` makes the edges of each start (default: Kafka); ``store_backend`` serves the
    checkpoint URL (default: by its scheme); ``uploader`` runs uploads (default: a thread)."""

    def __init__(
        self,
        graph: JobGraph,
        kafka: kio.KafkaSettings,
        settings: WorkerSettings,
        metrics: Any = None,
        wall_ms: Callable[[], int] | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        connect: Callable[[Start], Edges] = connect,
        store_backend: Any = None,
        uploader: Callable[[], Executor] | None = None,
    ) -> None:
        self.graph = graph
        self.kafka = kafka
        self.settings = settings
        self.metrics = metrics
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.connect = connect
        self.store_backend = store_backend
        self.uploader = uploader
        self.core = TaskCore(graph, metrics, on_result, settings.max_cached_windows)
        self.core.alive = self._alive
        self.deps = Dependencies()
        self.savepoints = Savepoints(settings.savepoint_timeout_s)
        self.edges: Edges | None = None
        self.committer: Committer | None = None
        self._stop = threading.Event()
        self._stop_seen: float | None = None
        self._stopped_by_savepoint = False
        self._seq = 1
        self.rollbacks = 0
        self.ready = False
        self.alive_at = time.monotonic()
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.first_record_ms: int | None = None
        """When the loop first consumed a record since start (epoch ms), for ``/status``."""
        self.queue_full = 0
        self.input_partitions: dict[str, int] = {}
        """Partition count of each input topic, for ``/status``: the operator runs no more
        workers than the largest has partitions."""
        self.last_checkpoint: dict[str, Any] | None = None
        self.memory: memory.MemoryPlan | None = None
        self.rocks: RocksMemory | None = None
        self.kafka_queued: dict[str, int] = {}
        self.published: dict[str, tuple[int, int]] = {}
        self._status = WorkerStatus()
        from weir.metrics import BusyTracker, RateTracker

        self.busy = BusyTracker(clock=time.perf_counter)
        self.rate = RateTracker(clock=time.perf_counter)

    @property
    def tasks(self) -> dict[tuple[str, int], Task]:
        return self.core.tasks

    # -- life cycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        """Liveness: the loop has come round within the last 60 s."""
        return time.monotonic() - self.alive_at < 60.0

    def _alive(self) -> None:
        self.alive_at = time.monotonic()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: ready once restored and while the broker and the store are reachable."""
        reason = self.deps.reason()
        if self.ready and not reason:
            return True, ""
        return False, reason or "connecting to Kafka and restoring state"

    def run(self) -> int:
        """Restore, then consume, process and produce until stopped; returns the exit code.

        It ends on stop (0), a record the sink refuses for good (1), or, at first start only, a
        missing topic or a broker or store that stays unreachable or refuses it (the exceptions
        ``weir.cli`` turns into exit codes). A ``Rollback`` starts over in this process.
        """
        first = True
        backoff = Backoff(0.5, 30.0)
        try:
            while True:
                try:
                    committer = self._start(first)
                    self._loop(committer)
                    if not self._stopped_by_savepoint:
                        committer.final_checkpoint(self.settings.shutdown_timeout_s)
                    return 0
                except Rollback as exc:
                    if self._stop.is_set():
                        raise Stopped(str(exc)) from exc
                    self.rollbacks += 1
                    if self.committer is not None and self.committer.committed_once:
                        backoff.reset()  # not a rollback loop: start over quickly
                    delay = backoff.next()
                    log.warning(
                        "rolling back to the last committed checkpoint (restarting in %.1f s): %s", delay, exc
                    )
                    self._teardown()
                    first = False
                    self._pause(delay)
        except Stopped as exc:
            log.warning(
                "stopped during an outage (%s); what was not committed is processed again by the next start",
                exc,
            )
            return 0
        except DeliveryFailed as exc:
            log.error("stopping without commit: %s", exc)
            return 1
        finally:
            self._teardown()
            self.savepoints.fail("the worker stopped")

    def _start(self, first: bool) -> Committer:
        """Connect, create the tasks, restore, assign: ready to loop."""
        settings, core = self.settings, self.core
        started = time.monotonic()
        waits = Waits(self._pause, self.deps, first, started, self.kafka.connect_timeout_s)
        if settings.memory_budget is not None and self.memory is None:
            # The process as it first started (interpreter, libraries, no clients yet) is the
            # base; a start after a rollback keeps the plan it had.
            self.memory = memory.MemoryPlan.split(
                settings.memory_budget, memory.rss_bytes() + memory.BASE_HEADROOM
            )
        edges = self.connect(
            Start(
                self.graph,
                self.kafka,
                settings.index,
                settings.count,
                settings.guarantee,
                waits,
                self.memory,
                self._on_queue_full,
                self.kafka_queued if self.memory is not None else None,
            )
        )
        self.edges = edges
        self.input_partitions = dict(edges.partitions)
        core.build({**edges.partitions, **edges.table_partitions}, settings.index, settings.count, started)
        if self.memory is not None:
            self.rocks = RocksMemory(self.memory.rocksdb, core.keyed_tasks())
            log.info(
                "memory budget %s: base %s, windows %s, RocksDB %s, Kafka queues %s",
                *(memory.format_size(v) for v in self.memory.as_dict().values()),
            )
        committer = Committer(
            core,
            edges,
            edges,
            self._open_store(),
            Policy(
                settings.index,
                settings.count,
                settings.state_dir,
                settings.restore_from,
                settings.checkpoint_retain,
                self.graph.start_from,
                settings.allow_state_reset,
            ),
            waits,
            self._open_state,
            seq=self._seq,
            metrics=self.metrics,
            wall_ms=self.wall_ms,
            uploader=self.uploader() if self.uploader is not None else None,
            on_commit=self._committed,
        )
        self.committer = committer
        committer.restore()
        edges.assign(core.assignment(edges.table_ends))
        committer.begin()
        self.ready = True
        log.info(
            "worker %d/%d of %s (%s) assigned %s",
            settings.index,
            settings.count,
            self.graph.job_id,
            settings.guarantee,
            ", ".join(t.label for t in core.tasks.values()) or "nothing",
        )
        return committer

    def _open_store(self) -> ck.CheckpointStore:
        namespace, name = self.graph.job_id.split("/", 1)
        url = (
            self.settings.checkpoint_url
            or (self.settings.state_dir.parent.parent / "checkpoints").resolve().as_uri()
        )
        s3 = self.settings.s3
        if s3 is None and url.startswith("s3://"):
            s3 = ck.S3Settings.from_env()
        return ck.CheckpointStore.open(url, namespace, name, s3=s3, backend=self.store_backend)

    def _open_state(self, task: Task, path: Path) -> None:
        plan = self.memory
        share = plan.window_share(self.core.keyed_tasks()) if plan is not None else None
        self.core.open_state(task, path, share, self.rocks)

    def _committed(self, record: dict[str, Any]) -> None:
        self.last_checkpoint = record

    def _on_queue_full(self) -> None:
        self.queue_full += 1
        if self.metrics is not None:
            self.metrics.producer_queue_full_total.inc()

    def _teardown(self) -> None:
        """Drop the clients, the pending checkpoint and the tasks (their state is on disk and in
        the store); idempotent."""
        self.ready = False
        if self.committer is not None:
            self._seq = max(self._seq, self.committer.seq)
            self.committer.close()
            self.committer = None
        if self.edges is not None:
            self.edges.close()
            self.edges = None
        self.core.close()

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` out of an outage: alive for the liveness probe, /status kept fresh.

        Raises ``Stopped`` once stop was requested: at once before the worker is ready, else
        when the shutdown timeout has passed since (so a final checkpoint may still go through).
        """
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            self.alive_at = now
            self._publish(now)
            if self._stop.is_set():
                if self._stop_seen is None:
                    self._stop_seen = now
                if not self.ready or now - self._stop_seen >= self.settings.shutdown_timeout_s:
                    raise Stopped(self.deps.reason() or "waiting for Kafka or the checkpoint store")
            if now >= end:
                return
            time.sleep(min(0.2, end - now))

    # -- the hot loop -----------------------------------------------------------------------
    def _loop(self, committer: Committer) -> None:
        edges, core, settings = self.edges, self.core, self.settings
        assert edges is not None
        batch_size = settings.batch_size
        limit = settings.max_records_per_second
        if limit:
            batch_size = max(1, min(batch_size, int(limit / 10)))  # a batch is at most 0.1 s of work
        next_checkpoint = time.monotonic() + settings.checkpoint_interval_s
        next_tick = 0.0
        perf, monotonic = time.perf_counter, time.monotonic
        # Exactly-once results become readable when their checkpoint commits. A worker that has
        # read all there is and holds results not yet in a checkpoint takes one early (once the
        # previous one is committed) instead of leaving them unreadable until the interval ends.
        # Early ones come at most every quarter interval, so a trickle of records costs at most
        # four checkpoints per interval; when it is too early for one, the worker wakes up at the
        # moment it may take it.
        eager = settings.guarantee == "exactly-once"
        min_pause = settings.checkpoint_interval_s / 4
        last_eager, out_mark = -math.inf, core.records_out
        eager_at: float | None = None
        consume, process = edges.consume, core.process
        while not self._stop.is_set():
            # While a checkpoint is pending, wait less for records: its commit is checked each round.
            timeout = 0.1 if committer.pending is None else 0.002
            if eager_at is not None:
                timeout = max(0.0, min(timeout, eager_at - monotonic()))
            msgs = consume(batch_size, timeout)
            t0 = perf()
            if msgs:
                first = self.first_record_ms is None
                if first:
                    self.first_record_ms = self.wall_ms()
                process(msgs, monotonic())
                if first:
                    # /status shows the first records at once. Only the status: an early tick
                    # would also move idle watermarks before the other partitions' first
                    # records had a chance to come (test_examples' chained enrichment).
                    self._publish(monotonic())
                if limit:
                    time.sleep(max(0.0, t0 + len(msgs) / limit - perf()))
            now = monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + settings.watermark_interval_s
            edges.poll()
            if committer.ready():
                committer.complete()
            eager_at = None
            if now >= next_checkpoint:
                if committer.pending is None:
                    committer.checkpoint()
                    out_mark = core.records_out
                elif self.metrics is not None:
                    self.metrics.checkpoints_skipped_total.labels(reason="previous_in_progress").inc()
                next_checkpoint = monotonic() + settings.checkpoint_interval_s
            elif (
                eager
                and core.records_out != out_mark
                and len(msgs) < batch_size
                and committer.pending is None
                and all(edges.caught_up(task) for task in core.tasks.values())
            ):
                if now - last_eager >= min_pause:
                    committer.checkpoint()
                    last_eager, out_mark = now, core.records_out
                    next_checkpoint = monotonic() + settings.checkpoint_interval_s
                else:
                    eager_at = last_eager + min_pause
            if self.savepoints.asked and self.savepoints.take(committer):
                self._stopped_by_savepoint = True
                self._stop.set()
            t1 = perf()
            self.busy_s += t1 - t0
            if msgs:
                self.busy.add_busy(t0, t1)
                self.rate.add(len(msgs))
            self.alive_at = now

    def _tick(self, now: float) -> None:
        """Periodic work: watermarks and firing (the core), outage probes, status and metrics."""
        edges = self.edges
        assert edges is not None
        self.core.tick(now, self.wall_ms(), edges.caught_up, edges.position)
        if edges.probe_due(now):
            edges.probe()
        self._publish(now)

    # -- control API (called from the control server's threads) -------------------------------
    def savepoint(self, request: SavepointRequest) -> SavepointAnswer:
        """Take a savepoint through the loop and wait for it; the same id returns the same one."""
        return self.savepoints.request(request)

    def _publish(self, now: float) -> None:
        self._status = publish(self, now)

    def status(self) -> WorkerStatus:
        """A snapshot for the control API (replaced, never mutated, so safe across threads)."""
        return self._status
