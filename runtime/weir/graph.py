"""What a worker runs, resolved once from the job's spec: the job graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weir.aggregates import Aggregator
from weir.chain import PrepareMany, aggregate_field_checks, compile_prepare_many
from weir.custom_aggregates import aggregator_for
from weir.join import JoinSpec
from weir.join_stage import JoinStep
from weir.native import NativePlan, plan_for
from weir.records import Prepare, compile_prepare
from weir.spec import Job
from weir.state_shape import StateShape, shape_of

__all__ = ["JobGraph", "PrepareMany", "ProcessStage", "WindowStage", "assigned", "compile_job"]


@dataclass(frozen=True)
class WindowStage:
    """The keyed stage of a windowed pipeline: window shape, aggregates, emission."""

    kind: str
    size_ms: int | None
    slide_ms: int | None
    gap_ms: int | None
    allowed_lateness_ms: int
    aggregator: Aggregator
    emit: str


@dataclass(frozen=True)
class ProcessStage:
    """The keyed stage of a pipeline ending in a process function (``weir.process``)."""

    ref: str
    """``package.module:Class`` of the ``weir.ProcessFunction``."""
    on_error: str
    """``deadLetter`` or ``fail``."""


@dataclass(frozen=True)
class JobGraph:
    """What the worker runs, resolved once from the job's spec (``compile_job``).

    Records are prepared by ``prepare`` (declarative steps only: one generated function, one
    result per record) or ``prepare_many`` (with Python functions: any number of results per
    record), then go to the keyed stage: ``window``, ``process``, or neither (a stateless
    pipeline writes each prepared record to the sink).
    """

    job_id: str
    group_id: str
    source_topics: tuple[str, ...]
    start_from: str
    prepare: Prepare | None
    max_out_of_orderness_ms: int
    idle_timeout_ms: int
    sink_topic: str
    dead_letter_topic: str | None
    shape: StateShape
    """What the keyed stage's state means (``weir.state_shape``): recorded with every snapshot
    and compared with a snapshot's before it is restored (``weir.commit``)."""
    window: WindowStage | None = None
    process: ProcessStage | None = None
    prepare_many: PrepareMany | None = None
    repartition_topic: str | None = None
    repartition_partitions: int | None = None
    joins: tuple[JoinStep, ...] = ()
    """The join steps the keyed stage runs first (``weir.join_stage``), in order."""
    join_check: Callable[[dict[str, Any]], None] | None = None
    """Checks the fields an aggregate reads that the joins add (``DeadLetter``): they do not
    exist when records are prepared, so they are checked after the last join."""
    native: NativePlan | None = None
    """The native hot path's plan (``weir.native``); None: the Python path runs the records."""

    @property
    def table_topics(self) -> tuple[str, ...]:
        """The joins' table topics, each once, in step order."""
        return tuple(dict.fromkeys(j.topic for j in self.joins))

    @property
    def terminal(self) -> str:
        """``window``, ``process`` or ``none`` (stateless)."""
        return "window" if self.window is not None else "process" if self.process is not None else "none"


def compile_job(
    job: Job, wall_ms: Callable[[], int] | None = None, native: bool | None = None
) -> JobGraph:
    """Resolve a loaded job into what the worker runs (``wall_ms``: the clock ``maxFutureSkew``
    is measured from; default the system clock). Imports the user functions the pipeline names:
    ``SpecError`` with the field path for one that does not resolve. ``native``: run the native
    hot path where it can (True), never (False), or as ``WEIR_NATIVE`` says (None, default on)."""
    pipeline = job.pipeline
    stages = pipeline.stages()
    idle_ms = pipeline.watermark.idle_timeout
    joins = tuple(
        JoinStep(
            index,
            j.topic,
            j.key,
            j.mode,
            JoinSpec(j.fields, j.kind, j.prefix, j.grace, j.retention),
            idle_ms if j.idle_timeout is None else j.idle_timeout,
        )
        for index, j in stages.joins
    )
    joined = {name for _, j in stages.joins for name in j.output_names()}
    aggregate = stages.aggregate
    join_check = None
    if aggregate is not None and joined & set(aggregate.fields()):
        join_check = aggregate_field_checks(
            tuple(f for f in aggregate.fields() if f in joined),
            tuple(f for f in aggregate.numeric_fields() if f in joined),
        )
    window_stage = process_stage = None
    if stages.window is not None and stages.aggregate is not None:
        window = stages.window
        window_stage = WindowStage(
            window.type,
            window.size,
            window.slide,
            window.gap,
            window.allowed_lateness,
            aggregator_for(pipeline),
            stages.aggregate.emit,
        )
    if stages.process is not None:
        process_stage = ProcessStage(stages.process.function, stages.process.on_error)
    return JobGraph(
        job_id=f"{job.namespace}/{job.name}",
        group_id=job.consumer_group,
        source_topics=tuple(pipeline.source.topics),
        start_from=pipeline.source.start_from,
        prepare=None if stages.functions else compile_prepare(pipeline, wall_ms),
        prepare_many=compile_prepare_many(pipeline, wall_ms) if stages.functions else None,
        max_out_of_orderness_ms=pipeline.watermark.max_out_of_orderness,
        idle_timeout_ms=pipeline.watermark.idle_timeout,
        sink_topic=pipeline.sink.topic,
        dead_letter_topic=job.dead_letter_topic,
        window=window_stage,
        process=process_stage,
        repartition_topic=job.repartition_topic,
        repartition_partitions=stages.repartition.partitions if stages.repartition else None,
        shape=shape_of(stages, job.namespace, job.name),
        joins=joins,
        join_check=join_check,
        native=None
        if native is False or window_stage is None
        else plan_for(pipeline, wall_ms, force=native is True),
    )


def assigned(partitions: int, index: int, count: int) -> list[int]:
    """The static assignment rule: worker ``index`` of ``count`` owns p with p % count == index."""
    return [p for p in range(partitions) if p % count == index]
