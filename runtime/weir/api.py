"""The Python builder API: a fluent, immutable way to write the ``weir.spec.Pipeline`` a manifest describes.

Example::

    from weir.api import col, pipeline

    revenue = (
        pipeline.source("events", event_time="ts", time_format="epochMillis")
        .filter(col("type") == "purchase")
        .key_by("product_id")
        .window_tumbling("1m")
        .aggregate(revenue=("sum", "price"), orders="count")
        .sink("revenue-per-minute", dead_letter="revenue-dlq")
    )

User functions (see README "Python functions")::

    from myjobs.enrich import add_total, explode_items, is_interesting, P95, Dedup

    enriched = (
        pipeline.source("orders", event_time="ts")
        .map(add_total)                      # record dict in, dict out
        .flat_map(explode_items)             # record in, iterable of dicts out
        .filter(is_interesting)              # kept when the return is truthy
        .key_by("user")
        .window_tumbling("1m")
        .aggregate(total=("sum", "total"), p95=(P95, "latency"))  # a weir.AggregateFunction class
        .sink("order-stats")
    )
    # or, instead of window + aggregate, a keyed process function:  .process(Dedup)

A function or class is stored as its reference ``"module:qualname"`` (what a manifest writes),
so it must be defined at module level of an importable module: a lambda, a nested function or
one defined in ``__main__`` raises ``ValueError`` saying so. ``on_error="fail"`` stops the job
when the function raises instead of dead-lettering the record (``function_error``).

Every method returns a new builder, so a partial pipeline can be shared. ``build()``
validates and returns the ``Pipeline`` (raising ``weir.spec.SpecError`` with paths such as
``steps[2].window.size``); anything accepting a pipeline (``compile_prepare``, an
``entrypoint`` function's return value) also accepts a builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NoReturn, TypeAlias

from pydantic import ValidationError

from weir.functions import FunctionNotFound, load_function
from weir.spec import (
    Condition,
    OnError,
    Output,
    Pipeline,
    SpecError,
    format_validation_error,
)
from weir.spec_pipeline import TimeFormat

__all__ = ["Col", "Expr", "PipelineBuilder", "col", "function_ref", "pipeline", "source"]

Scalar: TypeAlias = str | int | float | bool | None
DurationLike: TypeAlias = str | int
"""``"250ms"``, ``"5s"``, ``"1m"``, ``"2h"``, ``"1d"`` or integer milliseconds."""
OutputLike: TypeAlias = Literal["count"] | tuple[str, str] | tuple[type, str] | type | Output
"""``"count"``, ``(fn, field)`` such as ``("sum", "price")``, a custom aggregate class (a
``weir.AggregateFunction``) with a field ``(P95, "latency")`` or alone (it gets whole records),
or an ``Output``."""
FunctionLike: TypeAlias = Callable[..., Any] | str
"""A module-level function or class, or its reference ``"package.module:name"``."""


class Expr:
    """A filter condition under construction; combine with ``&``, ``|`` and ``~``.

    Python's ``and``/``or``/``not`` cannot be overloaded, so using an ``Expr`` as a truth
    value raises ``TypeError`` instead of silently keeping one side.
    """

    __slots__ = ("condition",)

    def __init__(self, condition: Condition) -> None:
        self.condition = condition

    def __and__(self, other: Expr) -> Expr:
        return Expr(Condition(and_=(*_members(self, "and_"), *_members(other, "and_"))))

    def __or__(self, other: Expr) -> Expr:
        return Expr(Condition(or_=(*_members(self, "or_"), *_members(other, "or_"))))

    def __invert__(self) -> Expr:
        if self.condition.not_ is not None:
            return Expr(self.condition.not_)
        return Expr(Condition(not_=self.condition))

    def __bool__(self) -> NoReturn:
        raise TypeError("use & | ~ to combine weir conditions, not and/or/not")

    def __repr__(self) -> str:
        return f"Expr({self.condition!r})"


def _members(expr: Expr, attr: Literal["and_", "or_"]) -> tuple[Condition, ...]:
    """Flatten nested ands (ors) so ``a & b & c`` is one ``and`` of three."""
    nested: tuple[Condition, ...] | None = getattr(expr.condition, attr)
    return nested if nested is not None else (expr.condition,)


class Col:
    """A record field in a filter condition; comparisons return an ``Expr``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _compare(self, op: str, value: object) -> Expr:
        try:
            return Expr(Condition.model_validate({"field": self.name, "op": op, "value": value}))
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, prefix=f"col({self.name!r})").splitlines()) from None

    # Comparison operators build conditions instead of answering, as in SQLAlchemy/pandas.
    def __eq__(self, value: Scalar) -> Expr:  # type: ignore[override]
        return self._compare("eq", value)

    def __ne__(self, value: Scalar) -> Expr:  # type: ignore[override]
        return self._compare("ne", value)

    def __lt__(self, value: str | float) -> Expr:
        return self._compare("lt", value)

    def __le__(self, value: str | float) -> Expr:
        return self._compare("le", value)

    def __gt__(self, value: str | float) -> Expr:
        return self._compare("gt", value)

    def __ge__(self, value: str | float) -> Expr:
        return self._compare("ge", value)

    __hash__ = None  # type: ignore[assignment]

    def isin(self, values: Iterable[Scalar]) -> Expr:
        """True when the field equals one of ``values``."""
        return self._compare("in", list(values))

    def not_in(self, values: Iterable[Scalar]) -> Expr:
        """True when the field equals none of ``values`` (or is missing)."""
        return self._compare("notIn", list(values))

    def exists(self) -> Expr:
        """True when the field is present (even if null)."""
        return Expr(Condition(field=self.name, op="exists"))

    def __repr__(self) -> str:
        return f"col({self.name!r})"


def col(name: str) -> Col:
    """The record field ``name``, for filter conditions."""
    return Col(name)


def function_ref(function: FunctionLike) -> str:
    """The reference ``"module:qualname"`` of a module-level function or class (a string is
    returned as it is; the spec checks its form).

    Raises ``ValueError`` for a lambda, a nested function or one defined in ``__main__`` (a
    worker imports the reference, so it must name a module-level object of an importable
    module), and ``TypeError`` for anything not callable.
    """
    if isinstance(function, str):
        return function
    given: object = function  # untyped callers may pass anything
    if not callable(given):
        got = type(given).__name__
        raise TypeError(f"expected a function, a class or 'package.module:name', got {got}")
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    shown = qualname or repr(function)
    advice = "define it at module level of an importable module and pass it (or its 'package.module:name')"
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ValueError(f"{shown} has no module-level name that a worker could import; {advice}")
    if qualname == "<lambda>" or "<lambda>" in qualname:
        raise ValueError(f"a lambda cannot be named in a pipeline; {advice}")
    if "<locals>" in qualname:
        raise ValueError(f"{qualname} is defined inside a function; {advice}")
    if module == "__main__":
        raise ValueError(f"{qualname} is defined in __main__, which a worker cannot import; {advice}")
    ref = f"{module}:{qualname}"
    try:
        found = load_function(ref)
    except FunctionNotFound as exc:
        raise ValueError(f"{ref} does not resolve ({exc}); {advice}") from None
    if found is not function:
        raise ValueError(f"{ref} names another object than the one given (a decorator's wrapper?); {advice}")
    return ref


def _output(name: str, spec: OutputLike) -> Output | dict[str, Any]:
    if isinstance(spec, Output):
        return spec
    if spec == "count":
        return {"fn": "count"}
    if isinstance(spec, type):
        return {"fn": "custom", "function": function_ref(spec)}
    if isinstance(spec, tuple) and len(spec) == 2:
        fn, field = spec
        if isinstance(fn, type):
            return {"fn": "custom", "function": function_ref(fn), "field": field}
        return {"fn": fn, "field": field}
    raise TypeError(
        f"output {name!r}: expected 'count', (fn, field), an AggregateFunction class or Output, got {spec!r}"
    )


@dataclass(frozen=True, slots=True)
class PipelineBuilder:
    """An immutable, partly built pipeline. Values are validated by ``build()``."""

    _source: Mapping[str, Any]
    _steps: tuple[Mapping[str, Any], ...] = ()
    _watermark: Mapping[str, Any] | None = None
    _sink: Mapping[str, Any] | None = None
    _dead_letter: Mapping[str, Any] | None = None

    def _step(self, **step: Any) -> PipelineBuilder:
        return replace(self, _steps=(*self._steps, step))

    def filter(
        self, condition: Expr | Condition | FunctionLike, *, on_error: OnError | None = None
    ) -> PipelineBuilder:
        """Keep only records for which ``condition`` holds (see ``col``), or, given a module-level
        function ``f(record) -> bool``, for which its return is truthy (``on_error`` applies to it)."""
        if isinstance(condition, Expr | Condition):
            if on_error is not None:
                raise ValueError("on_error only applies to a function filter, not to a condition")
            return self._step(filter=condition.condition if isinstance(condition, Expr) else condition)
        return self._step(filter={"function": function_ref(condition), "on_error": on_error})

    def map(self, function: FunctionLike, *, on_error: OnError = "deadLetter") -> PipelineBuilder:
        """Replace each record with ``function(record)``, a dict (see the module docstring)."""
        return self._step(map={"function": function_ref(function), "on_error": on_error})

    def flat_map(self, function: FunctionLike, *, on_error: OnError = "deadLetter") -> PipelineBuilder:
        """Replace each record with the dicts ``function(record)`` returns (none: dropped)."""
        return self._step(flat_map={"function": function_ref(function), "on_error": on_error})

    def process(self, process_function: FunctionLike, *, on_error: OnError = "deadLetter") -> PipelineBuilder:
        """End the pipeline with a keyed process function class (``weir.process.ProcessFunction``)."""
        return self._step(process={"function": function_ref(process_function), "on_error": on_error})

    def select(self, *fields: str) -> PipelineBuilder:
        """Keep only ``fields``."""
        return self._step(select=fields)

    def rename(self, mapping: Mapping[str, str] | None = None, /, **renames: str) -> PipelineBuilder:
        """Rename fields, old name to new name, all at once."""
        return self._step(rename={**(mapping or {}), **renames})

    def key_by(self, field: str, *, partitions: int | None = None) -> PipelineBuilder:
        """Key records by ``field`` (a repartition through Kafka with ``partitions`` partitions;
        None means as many as the source topic)."""
        return self._step(key_by={"field": field, "partitions": partitions})

    def key_by_message_key(self) -> PipelineBuilder:
        """Key records by the Kafka message key (no repartition)."""
        return self._step(key_by={"message_key": True})

    def join(
        self,
        topic: str,
        fields: Iterable[str],
        *,
        key: str | None = None,
        mode: Literal["global", "copartitioned"] = "global",
        kind: Literal["inner", "left"] = "inner",
        prefix: str = "",
        grace: DurationLike = 0,
        retention: DurationLike | None = None,
        idle_timeout: DurationLike | None = None,
    ) -> PipelineBuilder:
        """Add ``fields`` of the value table topic ``topic`` held for each record's key (or its
        ``key`` field, global mode) at the record's event time, as ``prefix + field``
        (``weir.spec_join``). After keyBy, before the window or process step. ``retention``
        None: the default, 1 day; ``idle_timeout`` None: the watermark's."""
        join: dict[str, Any] = {
            "topic": topic,
            "fields": tuple(fields),
            "key": key,
            "mode": mode,
            "kind": kind,
            "prefix": prefix,
            "grace": grace,
        }
        if retention is not None:
            join["retention"] = retention
        if idle_timeout is not None:
            join["idle_timeout"] = idle_timeout
        return self._step(join=join)

    def window_tumbling(self, size: DurationLike, *, allowed_lateness: DurationLike = 0) -> PipelineBuilder:
        """Fixed, non-overlapping windows of ``size``."""
        return self._step(window={"type": "tumbling", "size": size, "allowed_lateness": allowed_lateness})

    def window_sliding(
        self, size: DurationLike, slide: DurationLike, *, allowed_lateness: DurationLike = 0
    ) -> PipelineBuilder:
        """Windows of ``size`` starting every ``slide``."""
        return self._step(
            window={"type": "sliding", "size": size, "slide": slide, "allowed_lateness": allowed_lateness}
        )

    def window_session(self, gap: DurationLike, *, allowed_lateness: DurationLike = 0) -> PipelineBuilder:
        """Per-key sessions closed by ``gap`` without records."""
        return self._step(window={"type": "session", "gap": gap, "allowed_lateness": allowed_lateness})

    def aggregate(
        self,
        outputs: Mapping[str, OutputLike] | None = None,
        /,
        *,
        emit: Literal["final", "updates"] = "final",
        **named: OutputLike,
    ) -> PipelineBuilder:
        """Compute outputs per key and window, e.g. ``aggregate(revenue=("sum", "price"),
        orders="count")``; pass a mapping for names that are not identifiers (or ``emit``)."""
        merged = {**(outputs or {}), **named}
        return self._step(aggregate={"emit": emit, "outputs": {n: _output(n, s) for n, s in merged.items()}})

    def watermark(
        self,
        max_out_of_orderness: DurationLike = 0,
        *,
        idle_timeout: DurationLike = 0,
        max_future_skew: DurationLike | None = None,
    ) -> PipelineBuilder:
        """Set the watermark's out-of-orderness bound, idle timeout (0: never idle) and how far
        past the wall clock an event time may be (None: the default, 1 day; 0: unchecked)."""
        watermark: dict[str, DurationLike] = {
            "max_out_of_orderness": max_out_of_orderness,
            "idle_timeout": idle_timeout,
        }
        if max_future_skew is not None:
            watermark["max_future_skew"] = max_future_skew
        return replace(self, _watermark=watermark)

    def sink(self, topic: str, *, dead_letter: str | None = None) -> PipelineBuilder:
        """Write results to ``topic`` and bad records to ``dead_letter`` (None: the job's default)."""
        return replace(
            self,
            _sink={"topic": topic},
            _dead_letter=None if dead_letter is None else {"topic": dead_letter},
        )

    def build(self) -> Pipeline:
        """Validate and return the ``Pipeline``; ``SpecError`` names each bad path."""
        document: dict[str, Any] = {"source": self._source, "steps": self._steps}
        if self._watermark is not None:
            document["watermark"] = self._watermark
        if self._sink is not None:
            document["sink"] = self._sink
        if self._dead_letter is not None:
            document["dead_letter"] = self._dead_letter
        try:
            return Pipeline.model_validate(document)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc).splitlines()) from None


class _Pipelines:
    """The ``pipeline`` entry point: ``pipeline.source(...)`` starts a builder."""

    __slots__ = ()

    def source(
        self,
        *topics: str,
        event_time: str | None = None,
        time_format: TimeFormat = "epochMillis",
        key: str | None = None,
        format: Literal["json", "raw"] = "json",  # mirrors the spec's field name
        start_from: Literal["earliest", "latest"] = "earliest",
        max_value_bytes: int = 1_048_576,
    ) -> PipelineBuilder:
        """Start a pipeline reading ``topics``.

        ``event_time`` names the event-time field written as ``time_format`` (None: the
        Kafka timestamp); ``key`` names a key field (None: the message key).
        """
        spec: dict[str, Any] = {
            "topics": topics,
            "format": format,
            "start_from": start_from,
            "max_value_bytes": max_value_bytes,
        }
        if event_time is not None:
            spec["event_time"] = {"field": event_time, "format": time_format}
        if key is not None:
            spec["key"] = {"field": key}
        return PipelineBuilder(spec)


pipeline = _Pipelines()
"""Start a builder with ``pipeline.source(topic, ...)``."""

source = pipeline.source
"""``pipeline.source`` as a function."""
