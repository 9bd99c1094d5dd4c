"""What a worker reports: the ``/status`` document and the metrics that follow its counters.

Built on the worker's thread at every tick (and while it waits out an outage) and handed to
the control server whole, so a reader never sees a half-updated status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weir import memory
from weir.controlapi import CheckpointStatus, MemoryStatus, OutageStatus, PartitionStatus, WorkerStatus
from weir.join_metrics import publish_joins
from weir.outages import DEPENDENCIES
from weir.tasks import NO_WATERMARK, Task

if TYPE_CHECKING:
    from weir.worker import Worker


def publish(worker: Worker, now: float) -> WorkerStatus:
    """The worker's status now; moves its counters to its metrics on the way."""
    wall = worker.wall_ms()
    core, metrics, edges = worker.core, worker.metrics, worker.edges
    partitions: list[PartitionStatus] = []
    for task in core.tasks.values():
        lag = edges.lag(task) if edges is not None else None
        if task.metrics is not None:
            _publish_task(task, lag, wall)
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
    if metrics is not None:
        for topic, count in core.out_counts.items():
            nbytes = core.out_bytes.get(topic, 0)
            before, before_bytes = worker.published.get(topic, (0, 0))
            if count > before:
                metrics.records_out_total.labels(topic).inc(count - before)
                metrics.bytes_out_total.labels(topic).inc(nbytes - before_bytes)
                worker.published[topic] = (count, nbytes)
        publish_joins(metrics, core.tasks.values())
        metrics.busy_ratio.set(worker.busy.ratio())
        metrics.processing_rate.set(worker.rate.rate())
        for name in DEPENDENCIES:
            metrics.set_dependency(name, not worker.deps.is_down(name), worker.deps.seconds_total(name))
    elapsed = max(1e-9, now - worker.started)
    ready, not_ready = worker.readiness()
    settings = worker.settings
    last = worker.last_checkpoint
    return WorkerStatus(
        job=worker.graph.job_id,
        worker=settings.index,
        workers=settings.count,
        input_partitions=dict(worker.input_partitions),
        ready=ready,
        not_ready_reason=not_ready or None,
        outages={name: OutageStatus.model_validate(o) for name, o in worker.deps.status().items()},
        rollbacks=worker.rollbacks,
        partitions=tuple(partitions),
        published_at=wall,  # the operator's autoscaler distrusts an old snapshot (a stuck loop)
        busy_ratio=worker.busy.ratio(),
        busy_ratio_since_start=min(1.0, worker.busy_s / elapsed),
        records_per_second=worker.rate.rate(),
        records_in=sum(t.records for t in core.tasks.values()),
        first_record_at=worker.first_record_ms,
        records_out=core.records_out,
        dead_lettered=dict(core.dead_lettered),
        producer_queue_full=worker.queue_full,
        guarantee=settings.guarantee,
        last_checkpoint=CheckpointStatus.model_validate(last) if last is not None else None,
        last_savepoint=worker.savepoints.last,
        memory=MemoryStatus.model_validate(_memory_status(worker)),
    )


def _memory_status(worker: Worker) -> dict[str, Any]:
    """Each part's bytes now (estimates for the Python parts) and, with a budget, its share."""
    cache = timers = 0
    for task in worker.core.tasks.values():
        if task.store is not None and task.op is not None:
            cached, pending = task.store.memory_used()
            cache += cached
            timers += pending + task.op.timer_entries * memory.TIMER_ENTRY_BYTES
    used = {
        "window_cache": cache,
        "timers": timers,
        "rocksdb": worker.rocks.used() if worker.rocks is not None else 0,
        "kafka_queues": sum(worker.kafka_queued.values()),
    }
    rss = memory.rss_bytes()
    plan, metrics = worker.memory, worker.metrics
    if metrics is not None:
        for part, value in used.items():
            metrics.memory_used_bytes.labels(part).set(value)
        metrics.memory_rss_bytes.set(rss)
        if plan is not None:
            metrics.memory_budget_bytes.set(plan.budget)
            for part, value in plan.shares().items():
                metrics.memory_share_bytes.labels(part).set(value)
    return {
        "budgetBytes": plan.budget if plan is not None else None,
        "rssBytes": rss,
        "usedBytes": used,
        "shareBytes": plan.shares() if plan is not None else None,
    }


def _publish_task(task: Task, lag: int | None, wall: int) -> None:
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
