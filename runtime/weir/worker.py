"""The worker process: consumes its partitions, runs the pipeline's stages, produces results.

Data path of one worker (index ``I`` of ``N``)::

    source partitions p with p % N == I ──► prepare (decode, time, filter, key)
        ├─ no repartition: window + aggregate per partition ──► sink topic
        └─ repartition:    ──► repartition topic (records + watermark markers)
    repartition partitions q with q % N == I ──► window + aggregate per partition ──► sink

Every input partition is a *task* with its own watermark and (if it windows) its own
RocksDB store, so a partition's state and its offset always move together and results do
not depend on how partitions are spread over workers.

Watermarks. A task's watermark is ``max event time seen - maxOutOfOrderness`` and only
rises; it is read per record, so whether a record is late does not depend on batching.
When a task has consumed everything its partition holds and then had no record for
``idleTimeout``, its watermark follows the wall clock
(``now - maxOutOfOrderness``): windows of a quiet partition still close, and a quiet
upstream partition does not hold back the repartitioned stage. A repartitioned task's
watermark is the minimum over every upstream source partition, learnt from the watermark
markers (records with a null key) that each upstream task writes to every repartition
partition; until every upstream partition has reported, it does not advance.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_STORED,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from weir import checkpoint as ck
from weir import kafka as kio
from weir import memory, recovery
from weir.aggregates import Aggregator, Overflow, compile_aggregates, representable
from weir.controlapi import (
    CheckpointStatus,
    MemoryStatus,
    OutageStatus,
    PartitionStatus,
    SavepointAnswer,
    SavepointRequest,
    WorkerStatus,
)
from weir.outages import DEPENDENCIES, Backoff, Dependencies
from weir.records import DeadLetter, Prepare, compile_prepare, encode_forward, prepare_repartitioned
from weir.rocksdb_options import RocksMemory
from weir.spec import Job
from weir.state import PartitionStore
from weir.window_operator import NO_WATERMARK, WindowOperator, WindowResult

log = logging.getLogger(__name__)


class LateRecord(Exception):
    """A record whose every window had closed when it arrived."""

    reason = "late"

    def __init__(self, ts: int, watermark: int) -> None:
        self.detail = (
            f"event time {ts} is at or behind the watermark {watermark} by more than "
            "allowedLateness for every window it belongs to"
        )
        super().__init__(self.detail)


class DeliveryFailed(RuntimeError):
    """Kafka refused a record for good (too large, not authorised, unknown topic); the worker
    stops without committing. Failures an outage causes roll back instead (``Rollback``)."""


class Rollback(RuntimeError):
    """What was processed since the last commit cannot be committed (records timed out during
    an outage, the transaction was aborted or fenced): the worker drops it and starts over from
    the last committed state, in the same process (``Worker.run``)."""


class Stopped(Exception):
    """Stop was requested while waiting out an outage; nothing more can be committed."""


class StoreUnavailable(RuntimeError):
    """The checkpoint store stayed unreachable for the whole start-up timeout."""


# Delivery errors that no retry fixes: the record (or the client's permission) is the problem,
# not the broker's availability. Everything else an outage can cause, and rolling back to the
# last commit and producing again is the cure.
_PERMANENT_DELIVERY = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION, KafkaError.INVALID_RECORD,
    KafkaError.POLICY_VIOLATION, KafkaError._INVALID_ARG, KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
})

def _kafka_error(exc: KafkaException) -> tuple[KafkaError | None, str]:
    """The KafkaError a KafkaException carries (None if it carries none) and its text."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return err, (err.str() if err is not None else str(exc))


_CALL_TIMEOUT_S = 10.0
"""Longest a single blocking Kafka call (init/commit a transaction, read offsets) may take before
the worker comes back to its loop: it must stay under the 60 s liveness window during an outage."""

_RETRY_CAP_S = 10.0
"""Longest wait between two attempts to reach an unreachable broker or store: bounds how long a
worker stays down after its dependency is back."""


@dataclass(frozen=True)
class RunPlan:
    """Everything the worker needs from the job, resolved once from the spec (``plan_for``)."""

    job_id: str
    group_id: str
    source_topics: tuple[str, ...]
    start_from: str
    prepare: Prepare
    dead_letter_types: type[Exception]
    max_out_of_orderness_ms: int
    idle_timeout_ms: int
    window_kind: str
    size_ms: int | None
    slide_ms: int | None
    gap_ms: int | None
    allowed_lateness_ms: int
    aggregator: Aggregator
    emit: str
    sink_topic: str
    dead_letter_topic: str | None
    repartition_topic: str | None = None
    repartition_partitions: int | None = None


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


def plan_for(job: Job, wall_ms: Callable[[], int] | None = None) -> RunPlan:
    """Resolve a loaded job into what the worker runs (``wall_ms``: the clock ``maxFutureSkew``
    is measured from; default the system clock)."""
    pipeline = job.pipeline
    plan = pipeline.stages().windowed()
    window, aggregate = plan.window, plan.aggregate
    specs = [(name, o.fn, o.field) for name, o in aggregate.outputs.items()]
    return RunPlan(
        job_id=f"{job.namespace}/{job.name}",
        group_id=job.consumer_group,
        source_topics=tuple(pipeline.source.topics),
        start_from=pipeline.source.start_from,
        prepare=compile_prepare(pipeline, wall_ms),
        dead_letter_types=DeadLetter,
        max_out_of_orderness_ms=pipeline.watermark.max_out_of_orderness,
        idle_timeout_ms=pipeline.watermark.idle_timeout,
        window_kind=window.type,
        size_ms=window.size,
        slide_ms=window.slide,
        gap_ms=window.gap,
        allowed_lateness_ms=window.allowed_lateness,
        aggregator=compile_aggregates(specs),
        emit=aggregate.emit,
        sink_topic=pipeline.sink.topic,
        dead_letter_topic=job.dead_letter_topic,
        repartition_topic=job.repartition_topic,
        repartition_partitions=plan.repartition.partitions if plan.repartition else None,
    )


def assigned(partitions: int, index: int, count: int) -> list[int]:
    """The static assignment rule: worker ``index`` of ``count`` owns p with p % count == index."""
    return [p for p in range(partitions) if p % count == index]


@dataclass(eq=False)
class Task:
    """One input partition: its watermark, its position, and (when it windows) its operator."""

    topic: str
    partition: int
    label: str
    op: WindowOperator | None
    store: PartitionStore | None
    forward: bool = False
    wm: int = NO_WATERMARK
    next_offset: int = -1
    last_record: float = 0.0
    idle: bool = False
    records: int = 0
    bytes: int = 0
    late: int = 0
    # Repartitioned tasks: watermark per upstream source partition.
    upstream: dict[str, int] = field(default_factory=dict)
    wm_sent: int = NO_WATERMARK
    metrics: Any = None
    published: tuple[int, int, int] = (0, 0, 0)
    # Recovery by re-reading (see weir.recovery): output before this offset is suppressed.
    replay_until: int | None = None
    replay_wm: int | None = None

    @property
    def name(self) -> str:
        """The partition's name in checkpoints: ``<topic>/<partition>``."""
        return f"{self.topic}/{self.partition}"

    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition, self.next_offset)

    def progress(self) -> dict[str, Any]:
        return {"offset": self.next_offset, "wm": self.wm, "upstream": dict(self.upstream)}


@dataclass
class Pending:
    """A checkpoint (or savepoint) taken but not yet committed: its snapshot is uploading."""

    kind: str
    id: str
    producer: Any
    offsets: list[TopicPartition]
    future: Future[Any]
    started: float
    sync_s: float


_FIRE_CHUNK = 5000
"""Window results produced per ``advance`` call when many windows close at once."""

_ISO_CACHE: dict[int, str] = {}


def iso(ms: int) -> str:
    """ISO-8601 UTC with milliseconds; window bounds repeat for many keys, so cache them."""
    s = _ISO_CACHE.get(ms)
    if s is None:
        if len(_ISO_CACHE) > 100_000:
            _ISO_CACHE.clear()
        s = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
        s = s.replace("+00:00", "Z")
        _ISO_CACHE[ms] = s
    return s


def result_record(r: WindowResult, with_final: bool) -> dict[str, Any]:
    """The sink record of one window result (the shape documented in the README)."""
    out: dict[str, Any] = {
        "key": r.key,
        "windowStart": iso(r.start),
        "windowEnd": iso(r.end),
        "windowStartMs": r.start,
        "windowEndMs": r.end,
    }
    out.update(r.values)
    if with_final:
        out["final"] = r.final
    if r.retract:
        out["retract"] = True
    return out


def _printable(record: dict[str, Any]) -> bytes:
    """A dead-lettered result's value: JSON, with what JSON cannot carry (NaN, inf, ints beyond
    64 bits) as strings, so the dead-letter topic shows the value that could not be sent."""
    shown = {
        k: str(v) if v.__class__ in (int, float) and not representable(v) else v for k, v in record.items()
    }
    try:
        return orjson.dumps(shown, default=repr)
    except (TypeError, ValueError):
        return orjson.dumps({k: repr(v) for k, v in record.items()})


class _Snap:
    """A checkpoint or savepoint manifest as ``weir.recovery`` sees it."""

    def __init__(self, manifest: ck.Manifest) -> None:
        self.manifest = manifest
        self.id = f"{manifest.kind}:{manifest.id}"
        self.created_ms = manifest.created_ms

    def progress(self, partition: str) -> dict[str, Any] | None:
        entry = self.manifest.partitions.get(partition)
        if entry is None:
            return None
        wm = entry.watermark
        return {
            "offset": entry.offset,
            "wm": NO_WATERMARK if wm is None else wm,
            "upstream": dict(entry.progress.get("upstream") or {}),
        }


class _SavepointWaiter:
    def __init__(self, request: SavepointRequest) -> None:
        self.request = request
        self.done = threading.Event()
        self.result: SavepointAnswer | None = None
        self.error: str | None = None


class Worker:
    """Runs one worker until ``stop()`` (or SIGTERM); see the module docstring."""

    def __init__(
        self,
        plan: RunPlan,
        kafka: kio.KafkaSettings,
        settings: WorkerSettings,
        metrics: Any = None,
        wall_ms: Callable[[], int] | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.plan = plan
        self.kafka = kafka
        self.settings = settings
        self.metrics = metrics
        self._wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self._on_result = on_result
        self._stop = threading.Event()
        self._errors: list[str] = []
        self._undelivered = 0
        self._permanent = False
        self.deps = Dependencies()
        self.rollbacks = 0
        self._stop_seen: float | None = None
        self._next_probe = 0.0
        self._kafka_suspect: str | None = None
        self._store_failing = False
        self._kafka_hooks: dict[str, Any] = {"error_cb": self._on_kafka_error, "logger": kio.client_logger()}
        self.tasks: dict[tuple[str, int], Task] = {}
        self.upstream_count = 0
        self.input_partitions: dict[str, int] = {}
        """Partition count of each input topic (sources, repartition topic), for ``/status``:
        the operator runs no more workers than the largest has partitions."""
        self.ready = False
        self.alive_at = time.monotonic()
        self.busy_s = 0.0
        self.started = time.monotonic()
        self.dead_lettered: dict[str, int] = {}
        self.records_out = 0
        self.out_counts: dict[str, int] = {}
        self.out_bytes: dict[str, int] = {}
        self.queue_full = 0
        self._published: dict[str, tuple[int, int]] = {}
        self._status = WorkerStatus()
        self._forward = self._forwarder() if plan.repartition_topic else None
        self._suppress = False
        self.suppressed = 0
        self._pending: Pending | None = None
        self.consumer: Any = None
        self.producer: Any = None
        self._producers: list[Any] = []
        self._uploader: ThreadPoolExecutor | None = None
        self._repart_partitions = 0
        self._first = True
        self._started_at = time.monotonic()
        self._committed_since_start = False
        self._seq = 1
        self._closing = threading.Event()
        self._stopped_by_savepoint = False
        self._savepoint_lock = threading.Lock()
        self._savepoint_requests: list[_SavepointWaiter] = []
        self._savepoint_waiters: dict[str, _SavepointWaiter] = {}
        self._savepoints_done: dict[str, SavepointAnswer] = {}
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_savepoint: SavepointAnswer | None = None
        self.memory: memory.MemoryPlan | None = None
        self._rocks: RocksMemory | None = None
        self._kafka_queued: dict[str, int] = {}
        from weir.metrics import BusyTracker, RateTracker

        self._busy = BusyTracker(clock=time.perf_counter)
        self._rate = RateTracker(clock=time.perf_counter)

    # -- life cycle ---------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        """Liveness: the loop has come round within the last 60 s."""
        return time.monotonic() - self.alive_at < 60.0

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: ready once restored and while the broker and the store are reachable."""
        reason = self.deps.reason()
        if self.ready and not reason:
            return True, ""
        return False, reason or "connecting to Kafka and restoring state"

    def _on_delivery_error(self, err: Any, msg: Any) -> None:
        if err is None:
            return
        self._undelivered += 1
        if err.code() in _PERMANENT_DELIVERY:
            self._permanent = True
        if len(self._errors) < 3:
            self._errors.append(f"{msg.topic()} [{msg.partition()}]: {err.str()} ({err.name()})")

    def _on_kafka_error(self, err: Any) -> None:
        """librdkafka's error callback (served in poll/consume, on this worker's thread).

        "All brokers down" only makes the loop probe the broker at once: each client reports it
        from its own queue, some of them after the broker is back, so the probe's answer decides
        whether it is an outage (``_probe_kafka``)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._kafka_suspect = f"{self.kafka.bootstrap_servers}: {err.str()}"
            self._next_probe = 0.0
        elif err.fatal():
            self._errors.append(f"fatal: {err.str()} ({err.name()})")
            self._undelivered = max(self._undelivered, 1)

    def run(self) -> int:
        """Restore, then consume, process and produce until stopped; returns the exit code.

        An outage never ends it: the worker waits, reports not-ready, and when what it processed
        cannot be committed any more (``Rollback``) it starts over from the last committed state
        in this process. It ends on stop (0), a record Kafka refuses for good (1), or, at first
        start only, a missing topic or a broker or store that stays unreachable or refuses it
        (the exceptions ``weir.cli`` turns into exit codes).
        """
        first = True
        backoff = Backoff(0.5, 30.0)
        try:
            while True:
                try:
                    self._start(first)
                    self._loop(self._repart_partitions)
                    if not self._stopped_by_savepoint:
                        self._final_checkpoint()
                    return 0
                except Rollback as exc:
                    if self._stop.is_set():
                        raise Stopped(str(exc)) from exc
                    self.rollbacks += 1
                    if self._committed_since_start:  # not a rollback loop: start over quickly
                        backoff.reset()
                    delay = backoff.next()
                    log.warning(
                        "rolling back to the last committed checkpoint (restarting in %.1f s): %s", delay, exc
                    )
                    self._teardown()
                    first = False
                    self._pause(delay)
        except Stopped as exc:
            log.warning("stopped during an outage (%s); what was not committed is processed again by the "
                        "next start", exc)
            return 0
        except DeliveryFailed as exc:
            log.error("stopping without commit: %s", exc)
            return 1
        finally:
            self._teardown()
            self._fail_savepoints("the worker stopped")

    def _start(self, first: bool) -> None:
        """Connect, check the topics, create the clients, restore, assign: ready to loop.

        On the first start a broker that stays unreachable for ``connect_timeout_s`` raises
        ``KafkaUnavailable`` (``math.inf``: never); after a rollback it is waited for."""
        plan, settings = self.plan, self.settings
        self._first = first
        self._started_at = time.monotonic()
        admin = kio.admin(self.kafka)
        timeout = self.kafka.connect_timeout_s if first else math.inf

        def unreachable(error: str) -> None:
            self.deps.down("kafka", error)

        partitions = kio.wait_for_broker(
            admin, self.kafka, sleep=self._pause, on_retry=unreachable, timeout_s=timeout
        )
        self.deps.up("kafka")
        wanted = {t: "spec.pipeline.source.topics" for t in plan.source_topics}
        wanted[plan.sink_topic] = "spec.pipeline.sink.topic"
        if plan.dead_letter_topic:
            wanted[plan.dead_letter_topic] = "spec.pipeline.deadLetter.topic"
        kio.require_topics(partitions, wanted, self.kafka.bootstrap_servers)
        self.upstream_count = sum(partitions[t] for t in plan.source_topics)
        repart_partitions = 0
        if plan.repartition_topic:
            repart_partitions = kio.ensure_topic(
                admin,
                plan.repartition_topic,
                plan.repartition_partitions or max(partitions[t] for t in plan.source_topics),
                partitions,
            )
        self.input_partitions = {t: partitions[t] for t in plan.source_topics}
        if plan.repartition_topic:
            self.input_partitions[plan.repartition_topic] = repart_partitions
        self._repart_partitions = repart_partitions
        del admin  # its connections would keep reconnecting (and logging) through an outage

        self._errors, self._undelivered, self._permanent = [], 0, False
        self._committed_since_start = False
        if settings.memory_budget is not None and self.memory is None:
            # The process as it first started (interpreter, libraries, no clients yet) is the
            # base; a start after a rollback keeps the plan it had.
            self.memory = memory.MemoryPlan.split(
                settings.memory_budget, memory.rss_bytes() + memory.BASE_HEADROOM
            )
        consumer_config = kio.consumer_config(self.kafka, plan.group_id, plan.start_from)
        if self.memory is not None:
            # librdkafka applies the prefetch limit to each partition's queue.
            inputs = sum(
                len(assigned(partitions[t], settings.index, settings.count)) for t in plan.source_topics
            )
            if plan.repartition_topic:
                inputs += len(assigned(repart_partitions, settings.index, settings.count))
            consumer_config = {
                **kio.consumer_config(
                    self.kafka,
                    plan.group_id,
                    plan.start_from,
                    queue_kbytes=self.memory.consumer_queue_kbytes // max(1, inputs),
                    fetch_max_bytes=self.memory.fetch_max_bytes,
                    queue_min_messages=self.memory.consumer_queue_messages(inputs),
                ),
                **self._stats_config("consumer"),
            }
        self.consumer = kio.new_consumer({**consumer_config, **self._kafka_hooks})
        self._closing = threading.Event()
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="weir-checkpoint")
        self._producers = self._new_producers()
        self.producer = self._producers[0]
        self._build_tasks(partitions, repart_partitions)
        if self.memory is not None:
            windowing = sum(1 for t in self.tasks.values() if not t.forward)
            self._rocks = RocksMemory(self.memory.rocksdb, windowing)
            log.info(
                "memory budget %s: base %s, windows %s, RocksDB %s, Kafka queues %s",
                *(memory.format_size(v) for v in self.memory.as_dict().values()),
            )
        self._restore()
        self.consumer.assign([t.tp() for t in self.tasks.values()])
        self._begin()
        self.ready = True
        log.info(
            "worker %d/%d of %s (%s) assigned %s",
            settings.index,
            settings.count,
            plan.job_id,
            settings.guarantee,
            ", ".join(t.label for t in self.tasks.values()) or "nothing",
        )

    def _teardown(self) -> None:
        """Drop the clients, the pending checkpoint and the tasks (their state is on disk and in
        the store); idempotent. Transactions left open are aborted by the next start's
        ``init_transactions``, which fences these producers."""
        self.ready = False
        self._closing.set()  # an upload still retrying gives up
        if self._uploader is not None:
            self._uploader.shutdown(wait=False, cancel_futures=True)
            self._uploader = None
        self._pending = None
        for producer in self._producers:
            with contextlib.suppress(Exception):
                producer.purge()
        self._producers = []
        self.producer = None
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.close()
            self.consumer = None
        for task in self.tasks.values():
            if task.store is not None:
                task.store.close()
        self.tasks = {}

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

    def _check_delivery(self) -> None:
        """Raise what failed deliveries call for: ``DeliveryFailed`` when Kafka refused a record
        for good, ``Rollback`` when an outage made them fail (the records are produced again)."""
        if not self._undelivered:
            return
        causes = "; ".join(self._errors[:3]) or "no cause reported"
        cause = f"{self._undelivered} records undelivered: {causes}"
        if self._permanent:
            raise DeliveryFailed(cause)
        raise Rollback(cause)

    def _new_producers(self) -> list[Any]:
        """One producer for at-least-once; two transactional ones for exactly-once.

        With two, the next checkpoint's transaction runs on one producer while the previous
        checkpoint uploads and its transaction waits to commit on the other: processing does
        not stop for the upload. Transactional ids are stable per worker index, so a restarted
        worker fences its zombie (and aborts whatever it left open) in ``init_transactions``.
        """
        if self.memory is not None:
            config = {
                **kio.producer_config(
                    self.kafka,
                    self._on_delivery_error,
                    queue_kbytes=self.memory.producer_queue_kbytes,
                    queue_messages=self.memory.producer_queue_messages,
                ),
                **self._stats_config("producer"),
            }
        else:
            config = kio.producer_config(self.kafka, self._on_delivery_error)
        config = {**config, **self._kafka_hooks}
        if self.settings.guarantee != "exactly-once":
            return [kio.new_producer(config)]
        producers = []
        for suffix in ("a", "b"):
            tx_config = {
                **config,
                "transactional.id": f"{self.plan.group_id}-w{self.settings.index}-{suffix}",
                "transaction.timeout.ms": 120_000,
                **self.kafka.producer,
            }
            producer = kio.new_producer(tx_config)

            def init(p: Any = producer) -> None:
                p.init_transactions(_CALL_TIMEOUT_S)

            self._retry_kafka(f"initialising transactions of {tx_config['transactional.id']}", init)
            producers.append(producer)
        return producers

    def _retry_kafka(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` until it succeeds, waiting out an unreachable broker with back-off.

        On the first start the broker gets ``connect_timeout_s`` (then ``KafkaUnavailable``);
        after a rollback it gets for ever. A fatal client error raises (``KafkaUnavailable`` on
        the first start, else ``Rollback``: new clients are the only cure)."""
        backoff = Backoff(0.5, _RETRY_CAP_S)
        failures = 0
        while True:
            try:
                return call()
            except KafkaException as exc:
                err, text = _kafka_error(exc)
                if err is not None and err.fatal():
                    if self._first:
                        raise kio.KafkaUnavailable(f"{what}: {text}") from exc
                    raise Rollback(f"{what}: {text}") from exc
                failures += 1
                if failures > 1:  # the first retry is routine ("not coordinator" while it loads)
                    self.deps.down("kafka", f"{what}: {text}")
                if self._first and time.monotonic() - self._started_at > self.kafka.connect_timeout_s:
                    raise kio.KafkaUnavailable(
                        f"{what} failed for {self.kafka.connect_timeout_s:.0f}s (last error: {text}); "
                        "check spec.kafka.bootstrapServers and that the broker is up"
                    ) from exc
                self._pause(backoff.next())

    def _stats_config(self, client: str) -> dict[str, Any]:
        """librdkafka statistics every 5 s: the bytes in its queues, for the memory metrics."""

        def on_stats(raw: str) -> None:
            stats = orjson.loads(raw)
            if client == "producer":
                self._kafka_queued[f"producer-{stats.get('name')}"] = int(stats.get("msg_size") or 0)
                return
            queued = 0
            for topic in (stats.get("topics") or {}).values():
                for part in (topic.get("partitions") or {}).values():
                    queued += int(part.get("fetchq_size") or 0)
            self._kafka_queued["consumer"] = queued

        return {"statistics.interval.ms": 5000, "stats_cb": on_stats}

    def _begin(self) -> None:
        if self.settings.guarantee == "exactly-once":
            self.producer.begin_transaction()

    def _build_tasks(self, partitions: dict[str, int], repart_partitions: int) -> None:
        plan, settings = self.plan, self.settings
        windows_here = plan.repartition_topic is None
        for topic in plan.source_topics:
            for p in assigned(partitions[topic], settings.index, settings.count):
                self._add_task(topic, p, window=windows_here)
        if plan.repartition_topic:
            for q in assigned(repart_partitions, settings.index, settings.count):
                self._add_task(plan.repartition_topic, q, window=True)

    def _add_task(self, topic: str, partition: int, window: bool) -> None:
        label = f"{topic}-{partition}"
        task = Task(topic, partition, label, None, None, forward=not window, last_record=time.monotonic())
        task.next_offset = OFFSET_STORED
        if self.metrics is not None:
            task.metrics = self.metrics.bind_partition(label)
        self.tasks[(topic, partition)] = task

    def _open_state(self, task: Task, path: Path) -> None:
        plan = self.plan
        windowing = sum(1 for t in self.tasks.values() if not t.forward)
        store = PartitionStore(
            path,
            plan.aggregator.dumps,
            plan.aggregator.loads,
            self.settings.max_cached_windows,
            memory_bytes=self.memory.window_share(windowing) if self.memory is not None else None,
            rocks=self._rocks,
        )
        task.store = store
        task.op = WindowOperator(
            plan.window_kind,
            plan.size_ms,
            plan.slide_ms,
            plan.gap_ms,
            plan.allowed_lateness_ms,
            plan.aggregator,
            plan.emit,  # type: ignore[arg-type]
            store,
        )

    # -- recovery -----------------------------------------------------------------------
    def _restore(self) -> None:
        """Give every task its state and start offset (the decision is ``weir.recovery.choose``)."""
        started = time.monotonic()
        namespace, name = self.plan.job_id.split("/", 1)
        url = self._checkpoint_url()
        s3 = self.settings.s3
        if s3 is None and url.startswith("s3://"):
            s3 = ck.S3Settings.from_env()
        self._store = ck.CheckpointStore.open(url, namespace, name, s3=s3)
        committed = self._committed_offsets()
        scans = [
            self._from_store("listing checkpoints", lambda: self._store.scan_kind("checkpoint")),
            self._from_store("listing savepoints", lambda: self._store.scan_kind("savepoint")),
        ]
        for scan in scans:
            for bad in scan.unreadable:
                log.warning("skipping an unreadable manifest: %s", bad)
                if self.metrics is not None:
                    self.metrics.checkpoints_skipped_total.labels(reason="corrupt").inc()
        snapshots = [_Snap(m) for scan in scans for m in scan.manifests]
        # Never below what this process used: an upload abandoned by a rollback may still write.
        index = self.settings.index
        listed_seq = self._from_store("listing checkpoints", lambda: self._store.next_seq(index))
        self._seq = max(self._seq, listed_seq)
        source = self.settings.restore_from
        explicit = (
            [
                _Snap(m)
                for m in self._from_store(f"reading {source}", lambda: self._store.read_savepoint(source))
            ]
            if source
            else []
        )
        start = OFFSET_BEGINNING if self.plan.start_from == "earliest" else OFFSET_END
        for task in self.tasks.values():
            path = self.settings.state_dir / task.label
            local: tuple[int, str | None] | None = None
            local_progress = None
            if not task.forward and (path / "CURRENT").exists():
                # Opened once: kept when it is the committed state, closed and replaced otherwise.
                self._open_state(task, path)
                assert task.store is not None
                local_progress = task.store.progress
                if local_progress is not None:
                    local = (int(local_progress["offset"]), local_progress.get("id"))
            fetched: dict[str, Path] = {}

            def usable(s: Any, task: Task = task, fetched: dict[str, Path] = fetched) -> bool:
                if task.forward:
                    return True
                dest = self.settings.state_dir / "restore" / f"{task.label}-{len(fetched)}"
                try:
                    self._from_store(
                        f"restoring {task.name} from {s.manifest.url}",
                        lambda: self._store.restore(s.manifest, task.name, dest),
                    )
                except ck.CorruptCheckpoint as exc:
                    log.warning("%s: skipping %s: %s", task.name, s.manifest.url, exc)
                    if self.metrics is not None:
                        self.metrics.checkpoints_skipped_total.labels(reason="corrupt").inc()
                    return False
                fetched[s.id] = dest
                return True

            offset, committed_id = committed.get(task.name, (None, None))
            decision = recovery.choose(task.name, offset, snapshots, explicit, local, usable, committed_id)
            log.info("%s: restore %s (%s)", task.name, decision.how, decision.reason)
            if not task.forward and decision.how != "local":
                if task.store is not None:
                    task.store.close()
                shutil.rmtree(path, ignore_errors=True)
                if decision.source is not None:
                    fetched[decision.source.id].rename(path)
                self._open_state(task, path)
            shutil.rmtree(self.settings.state_dir / "restore", ignore_errors=True)
            progress: Any = None
            if decision.how == "local":
                progress = local_progress
            elif decision.source is not None:
                progress = decision.source.progress(task.name)
            if progress is not None:
                task.wm = int(progress.get("wm", NO_WATERMARK))
                task.wm_sent = NO_WATERMARK
                task.upstream = {k: int(v) for k, v in (progress.get("upstream") or {}).items()}
            task.next_offset = decision.offset if decision.offset is not None else start
            if decision.how == "replay" and decision.replay_until is not None:
                # From the start position (a negative logical offset) or an older checkpoint.
                task.replay_until = decision.replay_until
                task.replay_wm = decision.replay_wm
            if task.op is not None:
                task.op.restore()
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.restore_duration_seconds.set(seconds)
        log.info(
            "restored in %.2fs: %s",
            seconds,
            ", ".join(
                f"{t.name}@{t.next_offset}" + (f" (replay to {t.replay_until})" if t.replay_until else "")
                for t in self.tasks.values()
            ),
        )

    def _from_store(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` until the store answers, waiting out an outage with back-off.

        A refusal (``StoreRefused``: credentials, bucket, region) is raised on the first start
        and waited out after a rollback (credentials may come back while the job runs); an
        unreachable store is waited for ``connect_timeout_s`` on the first start (then
        ``StoreUnavailable``), else for ever. A corrupt or missing object is raised at once."""
        backoff = Backoff(0.5, _RETRY_CAP_S)
        while True:
            try:
                result = call()
            except (ck.CorruptCheckpoint, ck.NotFound):
                raise
            except ck.CheckpointError as exc:
                if isinstance(exc, ck.StoreRefused) and self._first:
                    raise
                self.deps.down("store", str(exc))
                if self._first and time.monotonic() - self._started_at > self.kafka.connect_timeout_s:
                    raise StoreUnavailable(
                        f"the checkpoint store stayed unreachable for {self.kafka.connect_timeout_s:.0f}s "
                        f"(--connect-timeout): {exc}"
                    ) from exc
                self._pause(backoff.next())
                continue
            self.deps.up("store")
            return result

    def _checkpoint_url(self) -> str:
        if self.settings.checkpoint_url:
            return self.settings.checkpoint_url
        root = self.settings.state_dir.parent.parent / "checkpoints"
        return root.resolve().as_uri()

    def _committed_offsets(self) -> dict[str, tuple[int, str | None]]:
        """The group's committed offset per task and the snapshot id committed with it (read
        explicitly, retried while the coordinator is not ready, so a slow start shows as a
        logged retry, not a stall)."""
        tps = [TopicPartition(t.topic, t.partition) for t in self.tasks.values()]
        if not tps:
            return {}
        committed = self._retry_kafka(
            f"reading the committed offsets of {self.plan.group_id}",
            lambda: self.consumer.committed(tps, timeout=_CALL_TIMEOUT_S),
        )
        found = [tp for tp in committed if tp.offset >= 0]
        return {f"{tp.topic}/{tp.partition}": (tp.offset, tp.metadata or None) for tp in found}

    # -- the hot loop -------------------------------------------------------------------
    def _loop(self, repart_partitions: int) -> None:
        consumer, settings = self.consumer, self.settings
        batch_size = settings.batch_size
        limit = settings.max_records_per_second
        if limit:
            batch_size = max(1, min(batch_size, int(limit / 10)))  # a batch is at most 0.1 s of work
        next_checkpoint = time.monotonic() + settings.checkpoint_interval_s
        next_tick = 0.0
        perf = time.perf_counter
        while not self._stop.is_set():
            msgs = consumer.consume(batch_size, timeout=0.1)
            t0 = perf()
            if msgs:
                self._process(msgs)
                if limit:
                    time.sleep(max(0.0, t0 + len(msgs) / limit - perf()))
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now, repart_partitions)
                next_tick = now + settings.watermark_interval_s
            self.producer.poll(0)
            self._check_delivery()
            if self._pending is not None and self._pending.future.done():
                self._complete()
            if now >= next_checkpoint:
                if self._pending is None:
                    self._trigger("checkpoint", f"{self._seq:010d}-w{settings.index}")
                    self._seq += 1
                elif self.metrics is not None:
                    self.metrics.checkpoints_skipped_total.labels(reason="previous_in_progress").inc()
                next_checkpoint = time.monotonic() + settings.checkpoint_interval_s
            if self._savepoint_requests:
                self._take_savepoints()
            t1 = perf()
            self.busy_s += t1 - t0
            if msgs:
                self._busy.add_busy(t0, t1)
                self._rate.add(len(msgs))
            self.alive_at = now

    def _process(self, msgs: list[Any]) -> None:
        by_task: dict[Task, list[Any]] = {}
        tasks = self.tasks
        last_key: tuple[str, int] | None = None
        bucket: list[Any] = []
        if self.deps.is_down("kafka") and any(m.error() is None for m in msgs):
            self.deps.up("kafka")
        for m in msgs:
            if m.error() is not None:
                self._consume_error(m.error())
                continue
            key = (m.topic(), m.partition())
            if key != last_key:
                task = tasks[key]
                bucket = by_task.setdefault(task, [])
                last_key = key
            bucket.append(m)
        now = time.monotonic()
        for task, batch in by_task.items():
            task.last_record = now
            task.idle = False
            if task.replay_until is not None:
                until = task.replay_until
                cut = next((i for i, m in enumerate(batch) if m.offset() >= until), len(batch))
                if cut:
                    self._suppress = True
                    try:
                        self._process_task(task, batch[:cut])
                    finally:
                        self._suppress = False
                if cut < len(batch):
                    self._end_replay(task)
                    self._process_task(task, batch[cut:])
            else:
                self._process_task(task, batch)

    def _process_task(self, task: Task, batch: list[Any]) -> None:
        forward = self._forward
        if task.topic == self.plan.repartition_topic:
            self._window_repartitioned(task, batch)
        elif forward is not None and task.forward:
            self._stage1(task, batch, forward)
        else:
            assert task.op is not None
            self._stage1(task, batch, task.op.process)
        task.next_offset = batch[-1].offset() + 1
        self._fire(task)

    def _end_replay(self, task: Task) -> None:
        """The task has re-read up to the committed offset: lift its watermark to the one it had
        there (windows that closed then were emitted then) and start producing again."""
        if task.replay_wm is not None and task.replay_wm > task.wm:
            task.wm = task.replay_wm
        self._suppress = True
        try:
            self._fire(task)
        finally:
            self._suppress = False
        log.info("%s: re-read up to the committed offset %s; producing again", task.name, task.replay_until)
        task.replay_until = task.replay_wm = None

    def _consume_error(self, err: Any) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer: %s", err)

    def _stage1(
        self, task: Task, batch: list[Any], accept: Callable[[str, int, dict[str, Any], int], bool]
    ) -> None:
        """Prepare each source record of one partition and hand it to ``accept``.

        ``accept(key, ts, record, watermark)`` is the window operator's ``process`` (False:
        the record is late) or, with a repartition, ``_forwarder``. Dead letters, the
        per-record watermark and the counters are the same either way.
        """
        prepare = self.plan.prepare
        dead = self.plan.dead_letter_types
        ooo = self.plan.max_out_of_orderness_ms
        wm = task.wm
        nbytes = 0
        for m in batch:
            value = m.value()
            if value is not None:
                nbytes += len(value)
            try:
                out = prepare(value, m.key(), m.timestamp()[1])
            except dead as exc:
                self._dead_letter(m, exc)
                continue
            if out is None:
                continue
            key, ts, record = out
            try:
                accepted = accept(key, ts, record, wm)
            except Overflow as exc:  # not applied, and (as for any dead letter) no watermark move
                self._dead_letter(m, exc)
                continue
            if not accepted:
                task.late += 1
                self._dead_letter_late(m, ts, wm)
            if ts - ooo > wm:
                wm = ts - ooo
        task.wm = wm
        task.records += len(batch)
        task.bytes += nbytes

    def _forwarder(self) -> Callable[[str, int, dict[str, Any], int], bool]:
        """Stage 1's ``accept`` with a repartition: send the record on by its group key.

        Keyed by the group key, Kafka's partitioner spreads keys over the repartition
        partitions deterministically, so a key always lands on the same stage-2 task.
        """
        topic = self.plan.repartition_topic
        assert topic is not None
        produce = self._produce

        def forward(key: str, ts: int, record: dict[str, Any], _wm: int) -> bool:
            fkey, fvalue = encode_forward(key, ts, record)
            produce(topic, fvalue, fkey)
            return True

        return forward

    def _window_repartitioned(self, task: Task, batch: list[Any]) -> None:
        """Stage 2: records and upstream watermark markers from the repartition topic."""
        assert task.op is not None
        process = task.op.process
        loads = orjson.loads
        upstream = task.upstream
        wm = self._min_upstream(task)
        nbytes = 0
        for m in batch:
            value = m.value()
            nbytes += len(value) if value is not None else 0
            k = m.key()
            if k is None:  # a watermark marker: {"src": "<topic>-<partition>", "wm": ms}
                marker = loads(value)
                if marker["wm"] > upstream.get(marker["src"], NO_WATERMARK):
                    upstream[marker["src"]] = marker["wm"]
                    wm = self._min_upstream(task)
                continue
            try:
                key, ts, record = prepare_repartitioned(value, k, 0)
                accepted = process(key, ts, record, wm)
            except (DeadLetter, Overflow) as exc:
                self._dead_letter(m, exc)
                continue
            if not accepted:
                task.late += 1
                self._dead_letter_late(m, ts, wm)
        task.wm = max(task.wm, wm)
        task.records += len(batch)
        task.bytes += nbytes

    def _min_upstream(self, task: Task) -> int:
        if len(task.upstream) < self.upstream_count:
            return NO_WATERMARK
        return min(task.upstream.values())

    def _fire(self, task: Task) -> None:
        if task.op is None:
            return
        # In chunks, so closing a million windows never holds a million results in memory;
        # that can take minutes, during which the worker is busy, not stuck.
        while self._fire_some(task):
            self.alive_at = time.monotonic()

    def _fire_some(self, task: Task) -> bool:
        assert task.op is not None
        results = task.op.advance(task.wm, _FIRE_CHUNK)
        if not results:
            return False
        topic = self.plan.sink_topic
        with_final = self.plan.emit == "updates"
        produce = self._produce
        dumps = orjson.dumps
        unrepresentable = self.plan.aggregator.unrepresentable
        sent = 0
        for r in results:
            record = result_record(r, with_final)
            # A result that cannot be written must not stop the worker: it would fire again
            # after every restart (a crash loop). It goes to the dead-letter topic instead.
            try:
                bad = None if r.retract else unrepresentable(r.values)
                if bad is not None:
                    raise ValueError(
                        f"aggregate {bad!r} is {r.values[bad]!r}, which JSON output cannot carry"
                    )
                value = dumps(record)
            except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
                self._dead_letter_result(task, r, record, exc)
                continue
            produce(topic, value, r.key.encode())
            sent += 1
            if self._on_result is not None:
                self._on_result(record)
        self.records_out += sent
        return task.op.firing

    def _dead_letter_result(
        self, task: Task, r: WindowResult, record: dict[str, Any], exc: Exception
    ) -> None:
        reason = "unserializable_result"
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.dead_letter_total.labels(reason=reason).inc()
        detail = f"window [{r.start}, {r.end}) of key {r.key!r}: {exc}"
        topic = self.plan.dead_letter_topic
        if topic is None:
            log.warning("result dropped: no deadLetter topic configured: %s", detail)
            return
        headers: list[tuple[str, str | bytes | None]] = [
            ("weir.reason", reason.encode()),
            ("weir.detail", detail[:1000].encode()),
            ("weir.source.topic", task.topic.encode()),
            ("weir.source.partition", str(task.partition).encode()),
        ]
        self._produce(topic, _printable(record), r.key.encode(), -1, headers)

    def _tick(self, now: float, repart_partitions: int) -> None:
        """Periodic work: idle watermarks, watermark markers, firing, status and metrics."""
        idle_after = self.plan.idle_timeout_ms / 1000
        wall = self._wall_ms()
        floor = wall - self.plan.max_out_of_orderness_ms
        for task in self.tasks.values():
            if task.replay_until is not None and self._position(task) >= task.replay_until:
                self._end_replay(task)
            if task.topic == self.plan.repartition_topic:
                task.wm = max(task.wm, self._min_upstream(task))
            elif idle_after > 0 and now - task.last_record >= idle_after and self._caught_up(task):
                task.idle = True
                if floor > task.wm:
                    task.wm = floor
            if task.forward:
                self._send_markers(task, repart_partitions)
            else:
                self._fire(task)
        if (self._kafka_suspect or self.deps.is_down("kafka")) and now >= self._next_probe:
            self._probe_kafka()
        self._publish(now)

    def _probe_kafka(self) -> bool:
        """Ask the broker for metadata (1 s at most) and record the answer: whether Kafka is
        reachable. Run after a client reported every broker down, and every 2 s during an
        outage, to notice the broker is back even when no record arrives (librdkafka reports
        brokers going down, never coming back)."""
        self._next_probe = time.monotonic() + 2.0
        try:
            md = self.consumer.list_topics(self.plan.sink_topic, timeout=1.0)
            reachable = bool(md.brokers) and md.orig_broker_id >= 0
            error = "no broker in the metadata"
        except KafkaException as exc:
            reachable = False
            error = _kafka_error(exc)[1]
        if reachable:
            self._kafka_suspect = None
            self.deps.up("kafka")
        else:
            self.deps.down("kafka", self._kafka_suspect or f"{self.kafka.bootstrap_servers}: {error}")
        return reachable

    def _position(self, task: Task) -> int:
        """Where the consumer is in the task's partition (past transaction markers too)."""
        try:
            (tp,) = self.consumer.position([TopicPartition(task.topic, task.partition)])
        except KafkaException:
            return task.next_offset
        return max(task.next_offset, int(tp.offset))

    def _caught_up(self, task: Task) -> bool:
        """Whether the task has consumed all its partition holds. Only such a partition can be
        idle: one with records waiting (a slow start, back-pressure) is slow, not quiet, and
        must not have its watermark moved past the records still to come."""
        try:
            lo, hi = self.consumer.get_watermark_offsets(task.tp(), cached=True)
        except KafkaException:
            return False
        lo, hi = int(lo), int(hi)
        if hi < 0:  # no fetch response yet: nothing is known about the partition's end
            return False
        if task.next_offset == OFFSET_END:  # started at the end and nothing came since
            return True
        if task.next_offset == OFFSET_BEGINNING:  # nothing consumed: caught up if it is empty
            return bool(lo == hi)
        return task.next_offset >= hi

    def _send_markers(self, task: Task, repart_partitions: int) -> None:
        if task.wm == task.wm_sent or task.wm == NO_WATERMARK:
            return
        topic = self.plan.repartition_topic
        assert topic is not None
        marker = orjson.dumps({"src": task.label, "wm": task.wm})
        for q in range(repart_partitions):
            self._produce(topic, marker, None, q)
        task.wm_sent = task.wm

    # -- output -------------------------------------------------------------------------
    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int = -1,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        if self._suppress:
            self.suppressed += 1
            return
        producer = self.producer
        while True:
            try:
                producer.produce(topic, value, key, partition, headers=headers)
                self.out_counts[topic] = self.out_counts.get(topic, 0) + 1
                self.out_bytes[topic] = self.out_bytes.get(topic, 0) + (len(value) if value else 0)
                return
            except BufferError:
                # The producer's queue is full: back-pressure. Stop taking input until
                # deliveries make room; never drop and never crash. During an outage this is
                # where the worker waits: alive, status fresh, until delivery or rollback.
                self.queue_full += 1
                if self.metrics is not None:
                    self.metrics.producer_queue_full_total.inc()
                producer.poll(0.05)
                self._check_delivery()
                now = time.monotonic()
                if now - self.alive_at >= 1.0:
                    self._pause(0)

    def _dead_letter(self, m: Any, exc: Exception) -> None:
        reason = str(getattr(exc, "reason", "error"))
        detail = str(getattr(exc, "detail", exc))
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.dead_letter_total.labels(reason=reason).inc()
        topic = self.plan.dead_letter_topic
        if topic is None:
            log.warning(
                "dead letter (%s) at %s-%d@%d dropped: no deadLetter topic configured: %s",
                reason,
                m.topic(),
                m.partition(),
                m.offset(),
                detail,
            )
            return
        # An oversized value is not copied: it would fail the same size limit again. The
        # headers locate the original in its source topic.
        value = None if reason == "too_large" else m.value()
        headers: list[tuple[str, str | bytes | None]] = [
            ("weir.reason", reason.encode()),
            ("weir.detail", detail[:1000].encode()),
            ("weir.source.topic", m.topic().encode()),
            ("weir.source.partition", str(m.partition()).encode()),
            ("weir.source.offset", str(m.offset()).encode()),
        ]
        self._produce(topic, value, m.key(), -1, headers)

    def _dead_letter_late(self, m: Any, ts: int, wm: int) -> None:
        self._dead_letter(m, LateRecord(ts, wm))

    # -- checkpoints and commits ----------------------------------------------------------
    def _trigger(self, kind: str, cid: str, path: str | None = None) -> Pending:
        """Snapshot state and offsets now; upload in the background; commit when uploaded.

        The synchronous part: wait for the output of this epoch to be acknowledged, write the
        changed windows to RocksDB with the offsets, and take a RocksDB checkpoint (hard
        links). Under exactly-once the next epoch's output then goes to the other producer's
        transaction while this one's waits for the manifest to be written.
        """
        t0 = time.monotonic()
        self._flush()
        snapshot_id = f"{kind}:{cid}"
        work = self.settings.state_dir / "snapshots" / cid.replace("/", "_")
        shutil.rmtree(work, ignore_errors=True)
        parts: dict[str, ck.PartitionSnapshot] = {}
        offsets = []
        for task in self.tasks.values():
            if task.next_offset < 0:
                continue
            local = work / task.label
            if task.store is not None:
                task.store.flush({**task.progress(), "id": snapshot_id})
                task.store.checkpoint(local)
                if task.metrics is not None:
                    task.metrics.state_size.set(task.store.size_bytes())
            else:  # a stage-1 task of a repartitioned job: only its offset and watermark
                local.mkdir(parents=True)
            wm = None if task.wm == NO_WATERMARK else task.wm
            extra = {"upstream": dict(task.upstream)}
            parts[task.name] = ck.PartitionSnapshot(local, task.next_offset, wm, extra)
            # The snapshot's id rides along as offset metadata: it names the committed state.
            offsets.append(TopicPartition(task.topic, task.partition, task.next_offset, metadata=snapshot_id))
        worker = (self.settings.index, self.settings.count)
        store, closing, deps, metrics = self._store, self._closing, self.deps, self.metrics

        def upload() -> Any:
            # On the checkpoint thread: an unreachable store is retried (processing goes on and
            # results wait to be committed); one line when it goes down, one when it is back.
            backoff = Backoff(0.5, _RETRY_CAP_S)
            while True:
                try:
                    if kind == "savepoint":
                        result = store.write_savepoint(cid, worker, parts, path=path)
                    else:
                        result = store.write_checkpoint(cid, worker, parts)
                    shutil.rmtree(work, ignore_errors=True)
                    deps.up("store")
                    return result
                except ck.CheckpointError as exc:
                    if metrics is not None:
                        metrics.checkpoint_failures_total.inc()
                    if closing.is_set():
                        raise
                    deps.down("store", f"{kind} {cid}: {exc}")
                    if closing.wait(backoff.next()):
                        raise

        assert self._uploader is not None
        pending = Pending(
            kind, cid, self.producer, offsets, self._uploader.submit(upload), t0, time.monotonic() - t0
        )
        self._pending = pending
        if self.metrics is not None:
            self.metrics.checkpoint_sync_seconds.observe(pending.sync_s)
        if len(self._producers) == 2:
            self.producer = self._producers[1] if self.producer is self._producers[0] else self._producers[0]
            self.producer.begin_transaction()
        return pending

    def _complete(self) -> Any:
        """The pending snapshot is in the store: commit the output and offsets that match it."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        result = pending.future.result()  # raises if the upload gave up (only while closing)
        if self.settings.guarantee == "exactly-once":
            self._commit_transaction(pending)
        elif pending.offsets:
            try:
                self.consumer.commit(offsets=pending.offsets, asynchronous=False)
            except KafkaException as exc:
                # The next checkpoint commits them; an outage shows once, not per checkpoint.
                self.deps.down("kafka", f"committing offsets: {_kafka_error(exc)[1]}")
        self._committed_since_start = True
        seconds = time.monotonic() - pending.started
        self.last_checkpoint = {
            "kind": pending.kind,
            "id": pending.id,
            "completedAt": iso(self._wall_ms()),
            "durationSeconds": round(seconds, 3),
            "bytes": result.bytes_total,
            "bytesUploaded": result.bytes_uploaded,
            "url": result.url,
        }
        if self.metrics is not None:
            m = self.metrics
            m.checkpoint_duration_seconds.observe(seconds)
            m.checkpoint_size_bytes.set(result.bytes_total)
            m.checkpoint_uploaded_bytes_total.inc(result.bytes_uploaded)
            if pending.kind == "checkpoint":
                m.last_checkpoint_id.set(int(pending.id.split("-", 1)[0]))
                m.last_checkpoint_timestamp_seconds.set(time.time())
        if pending.kind == "checkpoint" and self._uploader is not None:
            owned = [t.name for t in self.tasks.values()]
            self._uploader.submit(self._retain, owned)
        return result

    def _commit_transaction(self, pending: Pending) -> None:
        """Commit the pending checkpoint's transaction, retrying while the broker is unreachable.

        Retriable failures (a timeout, no coordinator) are retried with back-off; a transaction
        that can no longer commit (aborted by the broker after ``transaction.timeout.ms``,
        fenced, a fatal producer error) raises ``Rollback``: its output is dropped and produced
        again from the last committed state, so nothing is lost or duplicated."""
        backoff = Backoff(0.5, _RETRY_CAP_S)
        offsets_sent = not pending.offsets
        producer, group = pending.producer, self.consumer.consumer_group_metadata()
        what = f"committing {pending.kind} {pending.id}"

        def send_offsets() -> None:
            producer.send_offsets_to_transaction(pending.offsets, group, _CALL_TIMEOUT_S)

        def commit() -> None:
            producer.commit_transaction(_CALL_TIMEOUT_S)

        while True:
            try:
                if not offsets_sent:
                    self._bounded(what, send_offsets)
                    offsets_sent = True
                self._bounded(what, commit)
                if pending.offsets:
                    self.deps.up("kafka")
                return
            except KafkaException as exc:
                err, detail = _kafka_error(exc)
                text = f"{what}: {detail}" + (f" ({err.name()})" if err is not None else "")
                if err is None or err.fatal() or err.txn_requires_abort() or not err.retriable():
                    raise Rollback(f"the transaction cannot commit: {text}") from exc
                self.deps.down("kafka", text)
                # Retried only once the broker answers again: a retry made while it is down can
                # block past its timeout (librdkafka#5456).
                while True:
                    self._pause(backoff.next())
                    self._check_delivery()
                    if self._probe_kafka():
                        break

    def _bounded(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` on a helper thread, waited for at most ``_CALL_TIMEOUT_S`` + 10 s.

        librdkafka's transaction calls take a timeout but can block past it when the broker
        goes away mid-call (librdkafka#5456); on this thread that would stop the liveness
        probe, /status and SIGTERM. A call that does not return in time raises ``Rollback``:
        its producer is abandoned (fenced by the next one) with the helper thread still in it.
        """
        outcome: list[tuple[bool, Any]] = []

        def target() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.append((False, exc))

        thread = threading.Thread(target=target, name="weir-kafka-call", daemon=True)
        thread.start()
        deadline = time.monotonic() + _CALL_TIMEOUT_S + 10.0
        while True:
            thread.join(0.2)
            if not thread.is_alive():
                break
            if time.monotonic() >= deadline:
                raise Rollback(f"{what}: no answer from Kafka within {_CALL_TIMEOUT_S + 10.0:.0f}s")
            self._pause(0)
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    def _flush(self) -> None:
        """Wait until the current producer's output is acknowledged; while the broker is
        unreachable keep waiting (alive, not ready, status fresh) until the records are
        delivered or time out (then ``Rollback``)."""
        producer = self.producer
        first_wait = min(self.settings.shutdown_timeout_s, _CALL_TIMEOUT_S)
        remaining = producer.flush(first_wait)
        waited = False
        while remaining:
            self._check_delivery()
            if not waited:
                known = self.deps.reason()
                why = f"{remaining} records not acknowledged after {first_wait:.0f}s"
                self.deps.down("kafka", why + (f" ({known})" if known else ""))
                waited = True
            self._pause(0)
            remaining = producer.flush(1.0)
        self._check_delivery()
        if waited:
            self.deps.up("kafka")

    def _retain(self, owned: list[str]) -> None:
        try:
            self._store.retain(
                self.settings.checkpoint_retain, self.settings.index, owned, workers=self.settings.count
            )
            self._store_failing = False
        except ck.StoreRefused as exc:
            if not self._store_failing:  # once per streak, not after every checkpoint
                log.warning("deleting old checkpoints failed (retried after the next one): %s", exc)
            self._store_failing = True
        except ck.CheckpointError as exc:
            self.deps.down("store", f"deleting old checkpoints: {exc}")  # retried after the next one

    def _wait_pending(self, deadline: float | None = None) -> bool:
        """Block until the pending snapshot is uploaded and committed; False at the deadline."""
        if self._pending is None:
            return True
        shown = time.monotonic()
        while not self._pending.future.done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            self.producer.poll(0.05)
            self._check_delivery()
            self.alive_at = now
            if now - shown >= 1.0:  # a store outage can make this long: keep /status fresh
                self._pause(0)
                shown = now
        self._complete()
        return True

    def _final_checkpoint(self) -> None:
        """On stop: commit what was processed, bounded by the shutdown timeout. What cannot be
        committed in time (the store is down) is produced again by the next start."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        if self._wait_pending(deadline):
            self._trigger("checkpoint", f"{self._seq:010d}-w{self.settings.index}")
            self._seq += 1
            if self._wait_pending(deadline):
                return
        self._closing.set()
        log.error(
            "the final checkpoint did not complete within %.0fs; what it holds stays uncommitted "
            "and is processed again by the next start",
            self.settings.shutdown_timeout_s,
        )

    # -- savepoints (called from the control server's threads) --------------------------------
    def savepoint(self, request: SavepointRequest) -> SavepointAnswer:
        """Take a savepoint through the loop and wait for it; the same id returns the same one."""
        sid = request.id
        with self._savepoint_lock:
            done = self._savepoints_done.get(sid)
            if done is not None:
                return done
            waiter = self._savepoint_waiters.get(sid)
            if waiter is None:
                waiter = _SavepointWaiter(request)
                self._savepoint_waiters[sid] = waiter
                self._savepoint_requests.append(waiter)
        if not waiter.done.wait(self.settings.savepoint_timeout_s):
            raise TimeoutError(f"savepoint {sid} not complete after {self.settings.savepoint_timeout_s:.0f}s")
        if waiter.error is not None:
            raise RuntimeError(waiter.error)
        assert waiter.result is not None
        return waiter.result

    def _take_savepoints(self) -> None:
        with self._savepoint_lock:
            requests, self._savepoint_requests = self._savepoint_requests, []
        for waiter in requests:
            sid = waiter.request.id
            try:
                self._wait_pending()
                self._trigger("savepoint", sid, waiter.request.path)
                assert self._pending is not None
                future = self._pending.future
                self._wait_pending()
                result = future.result()
                answer = SavepointAnswer(
                    id=sid, status="completed", path=result.url, bytes=result.bytes_total,
                    offsets={t.name: t.next_offset for t in self.tasks.values()},
                )
                self.last_savepoint = answer
                with self._savepoint_lock:
                    self._savepoints_done[sid] = answer
                waiter.result = answer
                if waiter.request.stop:
                    self._stopped_by_savepoint = True
                    self._stop.set()
            except Exception as exc:
                # The worker stops (its restart recovers from the last commit); the caller learns why.
                waiter.error = f"the worker failed while taking the savepoint: {type(exc).__name__}: {exc}"
                raise
            finally:
                waiter.done.set()
                with self._savepoint_lock:
                    self._savepoint_waiters.pop(sid, None)

    def _fail_savepoints(self, reason: str) -> None:
        with self._savepoint_lock:
            waiting = list(self._savepoint_waiters.values())
            self._savepoint_requests = []
        for waiter in waiting:
            if not waiter.done.is_set():
                waiter.error = reason
                waiter.done.set()

    # -- observation --------------------------------------------------------------------
    def _publish(self, now: float) -> None:
        wall = self._wall_ms()
        partitions: list[PartitionStatus] = []
        for task in self.tasks.values():
            lag = None
            with contextlib.suppress(KafkaException):
                _lo, hi = self.consumer.get_watermark_offsets(task.tp(), cached=True)
                if hi >= 0 and task.next_offset >= 0:
                    lag = max(0, hi - task.next_offset)
            if task.metrics is not None:
                self._publish_task(task, lag, wall)
            partitions.append(
                PartitionStatus(
                    partition=task.label,
                    offset=task.next_offset,
                    lag=lag,
                    watermark=None if task.wm == NO_WATERMARK else task.wm,
                    watermark_lag_ms=None if task.wm == NO_WATERMARK else wall - task.wm,
                    idle=task.idle,
                    records=task.records,
                    late=task.late,
                    open_windows=task.op.open_windows if task.op is not None else 0,
                )
            )
        if self.metrics is not None:
            for topic, count in self.out_counts.items():
                nbytes = self.out_bytes.get(topic, 0)
                before, before_bytes = self._published.get(topic, (0, 0))
                if count > before:
                    self.metrics.records_out_total.labels(topic).inc(count - before)
                    self.metrics.bytes_out_total.labels(topic).inc(nbytes - before_bytes)
                    self._published[topic] = (count, nbytes)
            self.metrics.busy_ratio.set(self._busy.ratio())
            self.metrics.processing_rate.set(self._rate.rate())
        deps = self.deps
        if self.metrics is not None:
            for name in DEPENDENCIES:
                self.metrics.set_dependency(name, not deps.is_down(name), deps.seconds_total(name))
        elapsed = max(1e-9, now - self.started)
        ready, not_ready = self.readiness()
        last = self.last_checkpoint
        self._status = WorkerStatus(
            job=self.plan.job_id,
            worker=self.settings.index,
            workers=self.settings.count,
            input_partitions=dict(self.input_partitions),
            ready=ready,
            not_ready_reason=not_ready or None,
            outages={name: OutageStatus.model_validate(o) for name, o in deps.status().items()},
            rollbacks=self.rollbacks,
            partitions=tuple(partitions),
            published_at=wall,  # the operator's autoscaler distrusts an old snapshot (a stuck loop)
            busy_ratio=self._busy.ratio(),
            busy_ratio_since_start=min(1.0, self.busy_s / elapsed),
            records_per_second=self._rate.rate(),
            records_in=sum(t.records for t in self.tasks.values()),
            records_out=self.records_out,
            dead_lettered=dict(self.dead_lettered),
            producer_queue_full=self.queue_full,
            guarantee=self.settings.guarantee,
            last_checkpoint=CheckpointStatus.model_validate(last) if last is not None else None,
            last_savepoint=self.last_savepoint,
            memory=MemoryStatus.model_validate(self._memory_status()),
        )

    def _memory_status(self) -> dict[str, Any]:
        """Each part's bytes now (estimates for the Python parts) and, with a budget, its share."""
        cache = timers = 0
        for task in self.tasks.values():
            if task.store is not None and task.op is not None:
                cached, pending = task.store.memory_used()
                cache += cached
                timers += pending + task.op.timer_entries * memory.TIMER_ENTRY_BYTES
        used = {
            "window_cache": cache,
            "timers": timers,
            "rocksdb": self._rocks.used() if self._rocks is not None else 0,
            "kafka_queues": sum(self._kafka_queued.values()),
        }
        rss = memory.rss_bytes()
        plan = self.memory
        if self.metrics is not None:
            for part, value in used.items():
                self.metrics.memory_used_bytes.labels(part).set(value)
            self.metrics.memory_rss_bytes.set(rss)
            if plan is not None:
                self.metrics.memory_budget_bytes.set(plan.budget)
                for part, value in plan.shares().items():
                    self.metrics.memory_share_bytes.labels(part).set(value)
        return {
            "budgetBytes": plan.budget if plan is not None else None,
            "rssBytes": rss,
            "usedBytes": used,
            "shareBytes": plan.shares() if plan is not None else None,
        }

    def _publish_task(self, task: Task, lag: int | None, wall: int) -> None:
        """Move a task's counters to its metrics by the change since the last publish."""
        pm = task.metrics
        records, nbytes, late = task.published
        pm.records_in.inc(task.records - records)
        pm.bytes_in.inc(task.bytes - nbytes)
        pm.late_records.inc(task.late - late)
        task.published = (task.records, task.bytes, task.late)
        if lag is not None:
            pm.consumer_lag.set(lag)
        if task.wm != NO_WATERMARK:
            pm.set_watermark(task.wm, wall)
        if task.op is not None:
            pm.open_windows.set(task.op.open_windows)

    def status(self) -> WorkerStatus:
        """A snapshot for the control API (replaced, never mutated, so safe across threads)."""
        return self._status
