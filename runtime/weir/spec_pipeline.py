"""The pipeline: source, watermark, steps and sink, their validation and the ``Stages`` derived from them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol, TypeAlias, runtime_checkable

from pydantic import Field, model_validator

from weir.spec_common import Duration, FieldName, LocatedError, SpecError, SpecModel, TopicName
from weir.spec_join import Join
from weir.spec_steps import Aggregate, Condition, FunctionStep, Step, Window

# --------------------------------------------------------------------------- source

TimeFormat: TypeAlias = Literal["epochMillis", "epochSeconds", "iso8601"]


class EventTime(SpecModel):
    """Where a record's event time comes from."""

    field: FieldName | None = None
    """Field of the decoded source record holding the event time; omitted means the Kafka
    record timestamp."""
    format: TimeFormat = "epochMillis"
    """How the field is written: ``epochMillis`` and ``epochSeconds`` are JSON numbers
    (fractions below a millisecond are dropped), ``iso8601`` is a string with a UTC offset
    (``Z`` or ``+02:00``; without one the record is dead-lettered as ``bad_timestamp``)."""

    @model_validator(mode="after")
    def _format_needs_field(self) -> EventTime:
        if self.field is None and "format" in self.model_fields_set:
            raise LocatedError(("format",), "only applies with field (the Kafka timestamp has no format)")
        return self


class SourceKey(SpecModel):
    """The record field that keys records, instead of the Kafka message key."""

    field: FieldName
    """Field of the decoded source record (string or integer values)."""


class Source(SpecModel):
    """The Kafka topics a pipeline reads and how their records are decoded."""

    topics: Annotated[tuple[TopicName, ...], Field(min_length=1)]
    """Input topics; at least one."""
    format: Literal["json", "raw"] = "json"
    """``json``: each value is a JSON object. ``raw``: each value is UTF-8 text, seen by the
    pipeline as the record ``{"value": <text>}`` (a null value gives ``{"value": null}``)."""
    event_time: EventTime | None = None
    """Event time of each record; omitted means the Kafka record timestamp."""
    key: SourceKey | None = None
    """Key records by this field; omitted means the Kafka message key. A ``keyBy`` step
    overrides it."""
    start_from: Literal["earliest", "latest"] = "earliest"
    """Where a new job starts reading; a restored job always continues from its checkpoint."""
    max_value_bytes: Annotated[int, Field(ge=1, strict=True)] = 1_048_576
    """Larger values are dead-lettered (reason ``too_large``) without being decoded."""

    @model_validator(mode="after")
    def _raw_records_have_only_value(self) -> Source:
        if self.format == "raw":
            event_time = self.event_time
            if event_time is not None and event_time.field not in (None, "value"):
                raise LocatedError(("eventTime", "field"), "a raw record has only the field 'value'")
            if event_time is not None and event_time.field is not None and event_time.format != "iso8601":
                raise LocatedError(("eventTime", "format"), "a raw value is text: only iso8601 applies")
            if self.key is not None and self.key.field != "value":
                raise LocatedError(("key", "field"), "a raw record has only the field 'value'")
        return self


class Watermark(SpecModel):
    """How event time progresses per input partition."""

    max_out_of_orderness: Duration = 0
    """How far behind the largest event time seen a record may be and still be on time."""
    idle_timeout: Duration = 0
    """After this long without records a partition stops holding the watermark back;
    0 (the default, as in Flink) never marks a partition idle."""
    max_future_skew: Duration = 86_400_000
    """A record whose event time is more than this past the worker's wall clock is
    dead-lettered (``bad_timestamp``) and does not move the watermark: one record dated
    year 3000 would otherwise make every later record late. Default 1 day; 0 turns the
    check off (for replaying data with event times ahead of the clock)."""


# --------------------------------------------------------------------------- steps




class Sink(SpecModel):
    """Where results go."""

    topic: TopicName
    """Output topic (JSON values, keyed by the group key)."""


class DeadLetterSink(SpecModel):
    """Where records that cannot be processed go, with headers saying why."""

    topic: TopicName
    """Dead-letter topic."""


# --------------------------------------------------------------------------- field tracking


class FieldScope:
    """Which record fields exist after the select and rename steps seen so far, and which
    field of the source record each one reads.

    Used by ``Pipeline`` validation (a step must not read a field an earlier step removed)
    and by ``weir.records`` (which reads every field straight from the decoded source record
    and builds the output record once). Not thread-safe; build one per use.
    """

    def __init__(self, raw: bool) -> None:
        # current name -> source name, for names fixed by select or rename
        self.explicit: dict[str, str] = {"value": "value"} if raw else {}
        # True: source fields not otherwise mentioned pass through under their own name
        self.passthrough = not raw
        # names known to be absent, with the reason
        self.gone: dict[str, str] = {}
        self._closed_by: str = "a raw record has only the field 'value'" if raw else ""

    def source_of(self, name: str) -> str:
        """Source field that ``name`` reads; ``ValueError`` if the field cannot exist."""
        if name in self.explicit:
            return self.explicit[name]
        if name in self.gone:
            raise ValueError(f"field {name!r} {self.gone[name]}")
        if self.passthrough:
            return name
        raise ValueError(f"field {name!r} does not exist here: {self._closed_by}")

    def select(self, index: int, names: tuple[str, ...]) -> None:
        """Apply ``steps[index].select``."""
        self.explicit = {name: self.source_of(name) for name in names}
        self.passthrough = False
        self.gone = {}
        self._closed_by = f"steps[{index}].select keeps only {', '.join(names)}"

    def rename(self, index: int, mapping: Mapping[str, str]) -> None:
        """Apply ``steps[index].rename`` (all renames at once)."""
        sources = {new: self.source_of(old) for old, new in mapping.items()}
        for old, new in mapping.items():
            self.explicit.pop(old, None)
            self.gone[old] = f"was renamed to {new!r} by steps[{index}]"
        for new, source in sources.items():
            self.explicit[new] = source
            self.gone.pop(new, None)

    def output_moves(self) -> tuple[tuple[str, str], ...]:
        """(current name, source name) pairs whose name differs from the source field's."""
        return tuple((cur, src) for cur, src in self.explicit.items() if cur != src)

    def dropped(self) -> frozenset[str]:
        """With passthrough: source names that must not appear under their own name."""
        return frozenset(self.gone) | frozenset(cur for cur, src in self.explicit.items() if cur != src)


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True, slots=True)
class Repartition:
    """A shuffle through a Kafka topic, needed when records are keyed by a record field."""

    step_index: int
    """Index used in the topic name: the keyBy step, or the window step for a source key field."""
    partitions: int | None
    """Partitions of the repartition topic; None means as many as the source topic."""

    def topic(self, namespace: str, name: str) -> str:
        """The repartition topic of job ``namespace/name``. Its name holds the job's name and the
        step index, so a job renamed, or with a step added or removed before the shuffle, reads
        (and keeps its stage-2 state under) another topic."""
        return f"weir-{namespace}-{name}-{self.step_index}-repartition"


Terminal: TypeAlias = Literal["window", "process", "none"]
_PREPARE_KINDS = frozenset({"filter", "select", "rename", "map", "flatMap"})
_FUNCTION_KINDS = frozenset({"map", "flatMap"})


@dataclass(frozen=True, slots=True)
class Stages:
    """How a validated pipeline executes: where the key comes from, where the stages split and
    what the keyed stage at the end is.

    The steps before the keyed stage prepare records (``weir.records.compile_prepare``, or
    ``weir.chain.compile_prepare_many`` when ``functions``). Without ``repartition`` one stage
    reads the source, prepares records and runs the keyed stage. With it, stage 1 prepares
    records and forwards them keyed to the repartition topic, and stage 2 reads that topic and
    runs the keyed stage. A stateless pipeline (``terminal == "none"``) never repartitions:
    every prepared record goes to the sink keyed by its key.
    """

    key_from: Literal["messageKey", "sourceField", "keyByField"]
    """``messageKey``: the Kafka message key. ``sourceField``: ``source.key.field`` of the
    decoded source record. ``keyByField``: the keyBy field of the record the steps before it
    produced."""
    key_field: str | None
    """The field for ``sourceField``/``keyByField``, else None."""
    repartition: Repartition | None
    """The shuffle before the keyed stage; always None when ``terminal == "none"``."""
    terminal: Terminal
    """``window``: window + aggregate; ``process``: a keyed process function; ``none``: stateless."""
    keyed_index: int
    """Index of the keyed stage's first step (the window or process step); ``len(steps)`` for none."""
    window: Window | None
    """The window (``terminal == "window"``), else None."""
    aggregate: Aggregate | None
    """The aggregate after the window (``terminal == "window"``), else None."""
    process: FunctionStep | None
    """The process step (``terminal == "process"``), else None."""
    functions: bool
    """True when a user-function step (map, flatMap, function filter) precedes the keyed stage:
    records are then prepared by ``compile_prepare_many``, not ``compile_prepare``."""
    joins: tuple[tuple[int, Join], ...] = ()
    """The join steps with their step indexes, in order: the keyed stage runs them on each
    prepared record before the window or process step (or the sink). A pipeline with a join
    has a keyed stage (it repartitions like a windowed one) even when ``terminal == "none"``."""

    @property
    def stateful(self) -> bool:
        """Whether the keyed stage keeps state: a window, a process function or a join."""
        return self.terminal != "none" or bool(self.joins)

    def windowed(self) -> WindowedStages:
        """These stages as a windowed pipeline's; ``SpecError`` naming the terminal otherwise
        (for code that runs only window pipelines)."""
        if self.window is None or self.aggregate is None:
            raise SpecError(
                [f"spec.pipeline.steps: a {self.terminal!r} pipeline has no window; this runs only windows"]
            )
        return WindowedStages(
            self.key_from, self.key_field, self.repartition, self.keyed_index, self.window, self.aggregate
        )


@dataclass(frozen=True, slots=True)
class WindowedStages:
    """``Stages`` of a windowed pipeline, with its window and aggregate (``Stages.windowed()``)."""

    key_from: Literal["messageKey", "sourceField", "keyByField"]
    key_field: str | None
    repartition: Repartition | None
    window_index: int
    window: Window
    aggregate: Aggregate


MAX_STEPS = 100
"""Most steps a pipeline may have. The bound lets the API server cost the per-step CEL rules."""


class Pipeline(SpecModel):
    """A complete pipeline: source → steps → sink.

    Steps run in order: any filter/select/rename/map/flatMap, then at most one keyBy, then the
    keyed stage, which is last: any join steps (``weir.spec_join``), then a window immediately
    followed by the one aggregate, or one process step, or nothing. Fields read by a step must
    still exist after the select and rename steps before it (a join adds its fields); after a
    map or flatMap they are checked per record at run time (``missing_field``).
    """

    source: Source
    """Input topics and decoding."""
    watermark: Watermark = Watermark()
    """Event-time progress."""
    steps: Annotated[tuple[Step, ...], Field(max_length=MAX_STEPS)]
    """The processing steps, in order (at most 100)."""
    sink: Sink
    """Where results go: window results, process outputs or, without a keyed stage, the records."""
    dead_letter: DeadLetterSink | None = None
    """Where bad records go; omitted means ``weir-<namespace>-<name>-dlq``."""

    @model_validator(mode="after")
    def _steps_in_order(self) -> Pipeline:
        _check_step_order(self.steps)
        _check_field_references(self.source, self.steps)
        return self

    def stages(self) -> Stages:
        """How this pipeline executes (derived, not stored)."""
        steps = self.steps
        window_index = next((i for i, s in enumerate(steps) if s.window is not None), None)
        process_index = next((i for i, s in enumerate(steps) if s.process is not None), None)
        terminal: Terminal
        if window_index is not None:
            terminal, keyed_index = "window", window_index
            window, aggregate = steps[window_index].window, steps[window_index + 1].aggregate
        elif process_index is not None:
            terminal, keyed_index, window, aggregate = "process", process_index, None, None
        else:
            terminal, keyed_index, window, aggregate = "none", len(steps), None, None
        process = steps[process_index].process if process_index is not None else None
        functions = any(
            s.kind in _FUNCTION_KINDS or (s.filter is not None and s.filter.function is not None)
            for s in steps[:keyed_index]
        )
        joins = tuple((i, s.join) for i, s in enumerate(steps) if s.join is not None)
        key_by = next(((i, s.key_by) for i, s in enumerate(steps) if s.key_by is not None), None)
        # A join keeps per-task state like a window, so its records are keyed (and shuffled) too.
        shuffles = terminal != "none" or bool(joins)
        stage_start = min(keyed_index, joins[0][0]) if joins else keyed_index
        key_from: Literal["messageKey", "sourceField", "keyByField"] = "messageKey"
        key_field: str | None = None
        repartition: Repartition | None = None
        if key_by is not None:
            index, spec = key_by
            if spec.field is not None:
                key_from, key_field = "keyByField", spec.field
                repartition = Repartition(index, spec.partitions) if shuffles else None
        elif self.source.key is not None:
            key_from, key_field = "sourceField", self.source.key.field
            repartition = Repartition(stage_start, None) if shuffles else None
        return Stages(
            key_from, key_field, repartition, terminal, keyed_index, window, aggregate, process, functions,
            joins,
        )


_KEYED_KINDS = ("keyBy", "window", "aggregate", "process")


def _check_step_order(steps: tuple[Step, ...]) -> None:
    first: dict[str, int] = {}
    for index, step in enumerate(steps):
        kind = step.kind
        here = ("steps", index, kind)
        if kind in _KEYED_KINDS and kind in first:
            raise LocatedError(here, f"only one {kind} step is allowed (steps[{first[kind]}] is one)")
        if kind in _PREPARE_KINDS and "join" in first:
            joins = first["join"]
            raise LocatedError(here, f"{kind} must come before the join steps (steps[{joins}] is a join)")
        if kind in _PREPARE_KINDS:
            for later in _KEYED_KINDS:
                if later in first:
                    raise LocatedError(
                        here,
                        f"{kind} must come before keyBy, window and process "
                        f"(steps[{first[later]}] is a {later})",
                    )
        if kind == "keyBy" and ("window" in first or "process" in first):
            raise LocatedError(here, "keyBy must come before the window or process step")
        if kind == "keyBy" and "join" in first:
            raise LocatedError(
                here,
                f"keyBy must come before the join steps (steps[{first['join']}] is a join: it joins keyed "
                "records)",
            )
        if kind == "join" and ("window" in first or "process" in first):
            later = "window" if "window" in first else "process"
            raise LocatedError(here, f"join must come before the {later} step (steps[{first[later]}])")
        if kind == "aggregate" and first.get("window") != index - 1:
            raise LocatedError(here, "aggregate must immediately follow the window step")
        other = {"window": "process", "process": "window"}.get(kind)
        if other is not None and other in first:
            raise LocatedError(
                here, f"a pipeline has a window or a process step, not both (steps[{first[other]}] is one)"
            )
        first.setdefault(kind, index)
    if "window" in first and "aggregate" not in first:
        raise LocatedError(
            ("steps",), f"an aggregate step is required right after the window (steps[{first['window']}])"
        )
    key_by = first.get("keyBy")
    if key_by is not None and not {"window", "process", "join"} & first.keys():
        spec = steps[key_by].key_by
        if spec is not None and spec.partitions is not None:
            raise LocatedError(
                ("steps", key_by, "keyBy", "partitions"),
                "only applies before a join, window or process step "
                "(a stateless pipeline never repartitions)",
            )


def _check_field_references(source: Source, steps: tuple[Step, ...]) -> None:
    scope = FieldScope(raw=source.format == "raw")
    joined: set[str] = set()  # the fields join steps added (after every select and rename)

    def check(loc: tuple[str | int, ...], name: str) -> None:
        if name in joined:
            return
        try:
            scope.source_of(name)
        except ValueError as exc:
            raise LocatedError(loc, str(exc)) from None

    for index, step in enumerate(steps):
        here: tuple[str | int, ...] = ("steps", index, step.kind)
        if step.map is not None or step.flat_map is not None:
            # A function's output fields are unknown until it runs: later steps' fields are
            # checked per record (missing_field), not here.
            return
        if step.filter is not None:
            for loc, name in _condition_fields(step.filter, here):
                check(loc, name)
        elif step.select is not None:
            for position, name in enumerate(step.select):
                check((*here, position), name)
            scope.select(index, step.select)
        elif step.rename is not None:
            for old in step.rename:
                check((*here, old), old)
            scope.rename(index, step.rename)
        elif step.key_by is not None and step.key_by.field is not None:
            check((*here, "field"), step.key_by.field)
        elif step.join is not None:
            if step.join.key is not None:
                check((*here, "key"), step.join.key)
            joined.update(step.join.output_names())
        elif step.aggregate is not None:
            for name, output in step.aggregate.outputs.items():
                if output.field is not None:
                    check((*here, "outputs", name, "field"), output.field)


def _condition_fields(
    condition: Condition, loc: tuple[str | int, ...]
) -> Iterable[tuple[tuple[str | int, ...], str]]:
    if condition.field is not None:
        yield (*loc, "field"), condition.field
    for alias, members in (("and", condition.and_), ("or", condition.or_)):
        for position, member in enumerate(members or ()):
            yield from _condition_fields(member, (*loc, alias, position))
    if condition.not_ is not None:
        yield from _condition_fields(condition.not_, (*loc, "not"))


@runtime_checkable
class PipelineLike(Protocol):
    """Anything that builds a ``Pipeline``, such as ``weir.api.PipelineBuilder``."""

    def build(self) -> Pipeline: ...


def as_pipeline(obj: Pipeline | PipelineLike) -> Pipeline:
    """Return ``obj`` if it is a ``Pipeline``, else ``obj.build()``; ``TypeError`` otherwise."""
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, PipelineLike):
        built = obj.build()
        if isinstance(built, Pipeline):
            return built
        raise TypeError(f"build() returned {type(built).__name__}, not a Pipeline")
    raise TypeError(f"expected a weir Pipeline or pipeline builder, got {type(obj).__name__}")


# --------------------------------------------------------------------------- job spec
