"""What a worker runs, resolved once from the job's spec: the job graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from weir.aggregates import Aggregator, compile_aggregates
from weir.records import Prepare, compile_prepare
from weir.spec import Job

__all__ = ["JobGraph", "assigned", "compile_job"]


@dataclass(frozen=True)
class JobGraph:
    """What the worker runs, resolved once from the job's spec (``compile_job``)."""

    job_id: str
    group_id: str
    source_topics: tuple[str, ...]
    start_from: str
    prepare: Prepare
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


def compile_job(job: Job, wall_ms: Callable[[], int] | None = None) -> JobGraph:
    """Resolve a loaded job into what the worker runs (``wall_ms``: the clock ``maxFutureSkew``
    is measured from; default the system clock)."""
    pipeline = job.pipeline
    stages = pipeline.plan()
    window, aggregate = stages.window, stages.aggregate
    specs = [(name, o.fn, o.field) for name, o in aggregate.outputs.items()]
    return JobGraph(
        job_id=f"{job.namespace}/{job.name}",
        group_id=job.consumer_group,
        source_topics=tuple(pipeline.source.topics),
        start_from=pipeline.source.start_from,
        prepare=compile_prepare(pipeline, wall_ms),
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
        repartition_partitions=stages.repartition.partitions if stages.repartition else None,
    )


def assigned(partitions: int, index: int, count: int) -> list[int]:
    """The static assignment rule: worker ``index`` of ``count`` owns p with p % count == index."""
    return [p for p in range(partitions) if p % count == index]
