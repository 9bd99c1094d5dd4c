"""Worker metrics: a private Prometheus registry per worker, pre-bound hot-path series, busy/rate trackers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

__all__ = [
    "CHECKPOINT_DURATION_BUCKETS",
    "JOB_LABEL",
    "WORKER_LABEL",
    "BusyTracker",
    "OutputMetrics",
    "PartitionMetrics",
    "RateTracker",
    "WorkerMetrics",
    "partition_label",
]

JOB_LABEL = "streamjob"
"""Label carrying the job identity (``namespace/name``) on every series.

Not ``job``: Prometheus attaches its own ``job`` target label to every scraped series, and with the
default ``honor_labels: false`` a ``job`` label exposed by the target is renamed ``exported_job``,
so dashboards filtering on ``job="ns/name"`` would silently match nothing."""

WORKER_LABEL = "worker"
"""Label carrying the worker index (``"0"``, ``"1"``, ...) on every series."""

CHECKPOINT_DURATION_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf,
)
"""Histogram buckets (seconds) for checkpoint duration.

Small-state jobs checkpoint in tens of milliseconds; large RocksDB uploads to S3 take minutes. The
range covers both so an alert on "p99 above the checkpoint interval" has a bucket to land in."""


def partition_label(topic: str, partition: int) -> str:
    """The ``partition`` label value for an input partition: ``"<topic>-<partition>"``, e.g. ``"events-3"``.

    This is Kafka's own spelling of a topic-partition (log directories, client logs, kafka-consumer-groups
    output), so the value can be pasted between tools. Topic names may contain ``-``, so parse from the
    right if you must split it.
    """
    return f"{topic}-{partition}"


@dataclass(frozen=True, slots=True)
class PartitionMetrics:
    """The per-partition series with their ``partition`` label already resolved.

    The worker binds one of these per assigned partition and updates it once per batch
    (``records_in.inc(n)``) so ``.labels()`` never runs on the hot path. After
    :meth:`WorkerMetrics.release_partition` the children are detached from the registry: bind again.
    """

    records_in: Counter
    """Records consumed from the partition, including those later sent to the dead-letter topic."""
    bytes_in: Counter
    """Key plus value bytes consumed from the partition."""
    late_records: Counter
    """Records that arrived after their window closed (watermark past end + allowed lateness)."""
    consumer_lag: Gauge
    """High watermark offset minus the next offset to consume, in records."""
    watermark: Gauge
    """The partition's event-time watermark, epoch milliseconds."""
    watermark_lag: Gauge
    """Wall clock minus the watermark, milliseconds."""
    open_windows: Gauge
    """Windows holding state that have not fired yet."""
    state_size: Gauge
    """Bytes of keyed state the partition holds (as last measured, e.g. at checkpoint)."""

    def set_watermark(self, watermark_ms: int, now_ms: int) -> None:
        """Set the watermark and its lag together; ``now_ms`` is the wall clock in epoch milliseconds.

        The caller passes the clock so tests stay deterministic and the worker reads it once per batch.
        """
        self.watermark.set(watermark_ms)
        self.watermark_lag.set(now_ms - watermark_ms)


@dataclass(frozen=True, slots=True)
class OutputMetrics:
    """The per-output-topic series with their ``topic`` label already resolved (as in PartitionMetrics)."""

    records_out: Counter
    """Records produced to the topic (the dead-letter topic included)."""
    bytes_out: Counter
    """Key plus value bytes produced to the topic."""


class WorkerMetrics:
    """Every metric one worker exposes, in a registry of its own.

    The registry is private (never prometheus_client's global ``REGISTRY``) so several workers or tests
    in one process do not collide. Every exposed series carries :data:`JOB_LABEL` (``namespace/name``)
    and :data:`WORKER_LABEL` (the worker index); they are added when the registry is collected, so the
    attributes below only have their own labels: ``m.dead_letter_total.labels(reason="undecodable").inc()``.

    Counters do not expose the ``_created`` companion series: it doubles the series count per partition
    and no weir dashboard or the operator reads it.

    Thread-safety: prometheus_client metrics may be updated from the worker thread while the control
    server's thread collects them.
    """

    def __init__(self, job: str, worker: int) -> None:
        self.job = job
        self.worker = worker
        self._metrics: list[MetricWrapperBase] = []

        # Per-partition; bound once per assignment through bind_partition().
        self.records_in_total = self._counter("weir_records_in_total", "Records consumed.", "partition")
        self.bytes_in_total = self._counter(
            "weir_bytes_in_total", "Key plus value bytes consumed.", "partition")
        self.late_records_total = self._counter(
            "weir_late_records_total", "Records that arrived after their window closed.", "partition")
        self.consumer_lag_records = self._gauge(
            "weir_consumer_lag_records", "High watermark minus next offset to consume, records.", "partition")
        self.watermark_ms = self._gauge("weir_watermark_ms", "Event-time watermark, epoch ms.", "partition")
        self.watermark_lag_ms = self._gauge(
            "weir_watermark_lag_ms", "Wall clock minus the event-time watermark, ms.", "partition")
        self.open_windows = self._gauge(
            "weir_open_windows", "Windows holding state that have not fired yet.", "partition")
        self.state_size_bytes = self._gauge(
            "weir_state_size_bytes", "Bytes of keyed state held.", "partition")

        # Per output topic; bound through bind_output().
        self.records_out_total = self._counter("weir_records_out_total", "Records produced.", "topic")
        self.bytes_out_total = self._counter(
            "weir_bytes_out_total", "Key plus value bytes produced.", "topic")

        self.dead_letter_total = self._counter(
            "weir_dead_letter_total", "Records sent to the dead-letter topic.", "reason")
        self.busy_ratio = self._gauge(
            "weir_busy_ratio", "Fraction of recent wall time spent processing rather than waiting, 0..1.")
        self.processing_rate = self._gauge(
            "weir_processing_rate", "Records processed per second over the recent window.")
        self.producer_queue_full_total = self._counter(
            "weir_producer_queue_full_total", "Times the producer queue was full and consumption paused.")

        # Checkpointing.
        self.checkpoint_duration_seconds = Histogram(
            "weir_checkpoint_duration_seconds", "Checkpoint duration, trigger to manifest written, seconds.",
            buckets=CHECKPOINT_DURATION_BUCKETS, registry=None)
        self._metrics.append(self.checkpoint_duration_seconds)
        self.checkpoint_sync_seconds = Histogram(
            "weir_checkpoint_sync_seconds",
            "Time processing stops for a checkpoint (output acknowledged, state written); the "
            "RocksDB snapshot and the upload run in the background, seconds.",
            buckets=CHECKPOINT_DURATION_BUCKETS, registry=None)
        self._metrics.append(self.checkpoint_sync_seconds)
        self.checkpoint_size_bytes = self._gauge(
            "weir_checkpoint_size_bytes", "Total size of the last completed checkpoint, bytes.")
        self.checkpoint_uploaded_bytes_total = self._counter(
            "weir_checkpoint_uploaded_bytes_total", "Bytes uploaded to the checkpoint store.")
        self.checkpoint_failures_total = self._counter(
            "weir_checkpoint_failures_total", "Checkpoint uploads that failed (each is retried).")
        self.checkpoints_skipped_total = self._counter(
            "weir_checkpoints_skipped_total", "Checkpoints not taken.", "reason")
        self.last_checkpoint_id = self._gauge(
            "weir_last_checkpoint_id", "Id of the last completed checkpoint.")
        self.last_checkpoint_timestamp_seconds = self._gauge(
            "weir_last_checkpoint_timestamp_seconds", "When the last checkpoint completed, epoch seconds.")
        self.restore_duration_seconds = self._gauge(
            "weir_restore_duration_seconds", "Time the last state restore took at start-up, seconds.")

        # Outages of the broker and the checkpoint store (weir.outages), set through set_dependency().
        self.dependency_up = self._gauge(
            "weir_dependency_up", "1 while the dependency (kafka, store) is reachable, 0 during an outage.",
            "dependency")
        self.outage_seconds_total = self._counter(
            "weir_outage_seconds_total", "Seconds the dependency (kafka, store) has been unreachable.",
            "dependency")
        self._outage_seconds: dict[str, float] = {}
        # Memory (weir.memory): the budget, each part's share of it, and what each part holds.
        self.memory_budget_bytes = self._gauge(
            "weir_memory_budget_bytes", "The worker's memory budget (--memory-budget), bytes.")
        self.memory_share_bytes = self._gauge(
            "weir_memory_share_bytes",
            "Each part's share of the memory budget (base, windows, rocksdb, kafka_queues), bytes.",
            "part")
        self.memory_used_bytes = self._gauge(
            "weir_memory_used_bytes",
            "Bytes each part holds now (window_cache, timers: estimated from object sizes; rocksdb: "
            "the shared block cache with memtables; kafka_queues: librdkafka's queues).",
            "part")
        self.memory_rss_bytes = self._gauge(
            "weir_memory_rss_bytes", "Resident set size of the worker process, bytes.")

        # Joins (weir.join), per join step: labels ``step`` (its index in spec.pipeline.steps) and
        # ``topic`` (its table topic), summed over the worker's tasks; set by weir.join_metrics.
        self.join_held_records = self._gauge(
            "weir_join_held_records",
            "Stream records a join holds until its table's time reaches theirs.", "step", "topic")
        self.join_table_updates_total = self._counter(
            "weir_join_table_updates_total",
            "Table updates read by a join: applied, late (seen by later lookups only: grace too "
            "small) or dropped (older than the retention).", "step", "topic", "outcome")
        self.join_misses_total = self._counter(
            "weir_join_misses_total",
            "Stream records with no table value at their event time (inner joins also count them "
            "in weir_dead_letter_total{reason=\"join_miss\"}; left joins add nulls).", "step", "topic")
        self.join_bootstrapped = self._gauge(
            "weir_join_bootstrapped",
            "1 once every task of the join has read its table partitions up to their ends as of "
            "its start, 0 while one still holds the stream back for that.", "step", "topic")
        self.join_table_versions = self._gauge(
            "weir_join_table_versions",
            "Table versions a join stores (every task's copy counted, in retention).", "step", "topic")
        self.joins_published: dict[int, tuple[object, tuple[int, int, int, int]]] = {}
        """What ``weir.join_metrics.publish_joins`` has moved to the counters, per join operator."""

        self.registry = CollectorRegistry()
        """The registry to serve: the metrics above with the job and worker labels added."""
        self.registry.register(_IdentityLabels(self._metrics, {JOB_LABEL: job, WORKER_LABEL: str(worker)}))

    def set_dependency(self, dependency: str, up: bool, outage_seconds_total: float) -> None:
        """Expose one dependency's state: ``up`` and the seconds it has been down since start (the
        counter moves by the difference to the last call, so it grows during an outage too)."""
        self.dependency_up.labels(dependency).set(1 if up else 0)
        before = self._outage_seconds.get(dependency, 0.0)
        if outage_seconds_total > before:
            self.outage_seconds_total.labels(dependency).inc(outage_seconds_total - before)
            self._outage_seconds[dependency] = outage_seconds_total
        else:
            self.outage_seconds_total.labels(dependency)  # exposed as 0 before the first outage

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        # registry=None: the metric must not land in prometheus_client's global registry.
        metric = Counter(name, doc, labels, registry=None)
        self._metrics.append(metric)
        return metric

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        metric = Gauge(name, doc, labels, registry=None)
        self._metrics.append(metric)
        return metric

    def bind_partition(self, label: str) -> PartitionMetrics:
        """Resolve every per-partition series for ``label`` (see :func:`partition_label`) once."""
        return PartitionMetrics(
            records_in=self.records_in_total.labels(label),
            bytes_in=self.bytes_in_total.labels(label),
            late_records=self.late_records_total.labels(label),
            consumer_lag=self.consumer_lag_records.labels(label),
            watermark=self.watermark_ms.labels(label),
            watermark_lag=self.watermark_lag_ms.labels(label),
            open_windows=self.open_windows.labels(label),
            state_size=self.state_size_bytes.labels(label),
        )

    def release_partition(self, label: str) -> None:
        """Stop exposing every series of a partition this worker no longer owns.

        Without this a revoked partition's gauges (lag, watermark) would keep reporting their last value
        forever, and the autoscaler and dashboards would count the lag twice after a rescale.
        """
        for metric in self._partition_metrics():
            metric.remove(label)

    def bind_output(self, topic: str) -> OutputMetrics:
        """Resolve the per-topic output series for ``topic`` once."""
        return OutputMetrics(records_out=self.records_out_total.labels(topic),
                             bytes_out=self.bytes_out_total.labels(topic))

    def _partition_metrics(self) -> tuple[MetricWrapperBase, ...]:
        return (self.records_in_total, self.bytes_in_total, self.late_records_total,
                self.consumer_lag_records, self.watermark_ms, self.watermark_lag_ms, self.open_windows,
                self.state_size_bytes)


class _IdentityLabels:
    """A collector re-emitting metric families with the worker's identity labels added to every sample.

    prometheus_client has no constant labels; putting ``streamjob``/``worker`` into every metric's label
    names would make every caller pass them, and force two extra labels into each ``.labels()`` call.
    """

    def __init__(self, metrics: Iterable[MetricWrapperBase], labels: dict[str, str]) -> None:
        self._metrics = tuple(metrics)
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                created = family.name + "_created"
                out = Metric(family.name, family.documentation, family.type)
                out.samples = [s._replace(labels={**self._labels, **s.labels})
                               for s in family.samples if s.name != created]
                yield out


class _SlidingSum:
    """Sums amounts added at monotonic times over the last ``window_s`` seconds, in ``buckets`` slots.

    The window slides a bucket at a time, so it spans between ``window_s - width`` and ``window_s``
    seconds; :meth:`read` reports the exact span it summed so ratios and rates stay unbiased.
    """

    __slots__ = ("_clock", "_ids", "_n", "_origin", "_values", "_width")

    def __init__(self, clock: Callable[[], float], window_s: float, buckets: int) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self._clock = clock
        self._n = buckets
        self._width = window_s / buckets
        self._values = [0.0] * buckets
        self._ids = [-1] * buckets
        # Before a full window has passed the span starts here, not at a window that never happened.
        self._origin = clock()

    def add_at(self, bucket: int, amount: float) -> None:
        slot = bucket % self._n
        held = self._ids[slot]
        if held == bucket:
            self._values[slot] += amount
        elif held < bucket:
            self._ids[slot] = bucket
            self._values[slot] = amount
        # else: the slot already holds a newer bucket, so this amount is older than the window.

    def bucket_of(self, t: float) -> int:
        return math.floor(t / self._width)

    def add_interval(self, start: float, end: float) -> None:
        """Spread ``end - start`` seconds over the buckets the interval overlaps."""
        if end <= start:
            return
        width = self._width
        last = self.bucket_of(end)
        # Only the last n buckets can still be read; clipping also bounds the loop for huge intervals.
        first = max(self.bucket_of(start), last - self._n + 1)
        for bucket in range(first, last + 1):
            overlap = min(end, (bucket + 1) * width) - max(start, bucket * width)
            if overlap > 0:
                self.add_at(bucket, overlap)

    def read(self) -> tuple[float, float]:
        """The sum over the window and the window's span in seconds (0 when no time has passed)."""
        now = self._clock()
        current = self.bucket_of(now)
        oldest = current - self._n + 1
        total = sum(v for v, b in zip(self._values, self._ids, strict=True) if oldest <= b <= current)
        span = now - max(oldest * self._width, self._origin)
        return total, max(span, 0.0)


class BusyTracker:
    """Busy seconds versus wall seconds over a sliding window: the worker's ``busy_ratio``.

    The worker reports each processing interval (from the same monotonic ``clock``) with
    :meth:`add_busy`; time between intervals counts as idle (waiting for Kafka). Not thread-safe: the
    worker thread updates it and copies :meth:`ratio` into the gauge and its status snapshot.
    """

    __slots__ = ("_clock", "_sum")

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = 10.0,
                 buckets: int = 10) -> None:
        """``clock`` returns monotonic seconds; ``window_s`` is the window length in seconds."""
        self._clock = clock
        self._sum = _SlidingSum(clock, window_s, buckets)

    def add_busy(self, start: float, end: float) -> None:
        """Record that the worker was busy from ``start`` to ``end`` (monotonic seconds from ``clock``)."""
        self._sum.add_interval(start, end)

    def ratio(self) -> float:
        """Busy seconds / wall seconds over the window, clamped to 0..1; 0.0 before any time has passed."""
        busy, span = self._sum.read()
        if span <= 0:
            return 0.0
        return min(max(busy / span, 0.0), 1.0)


class RateTracker:
    """Records per second over a sliding window: the worker's ``processing_rate``.

    Counts are attributed to the moment :meth:`add` is called. Not thread-safe (see :class:`BusyTracker`).
    """

    __slots__ = ("_clock", "_sum")

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = 10.0,
                 buckets: int = 10) -> None:
        """``clock`` returns monotonic seconds; ``window_s`` is the window length in seconds."""
        self._clock = clock
        self._sum = _SlidingSum(clock, window_s, buckets)

    def add(self, count: float) -> None:
        """Count ``count`` records as processed now."""
        self._sum.add_at(self._sum.bucket_of(self._clock()), count)

    def rate(self) -> float:
        """Records per second over the window; 0.0 before any time has passed."""
        total, span = self._sum.read()
        if span <= 0:
            return 0.0
        return total / span
