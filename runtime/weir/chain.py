"""Per-record preparation for pipelines with user functions: a chain of small step closures.

``compile_prepare_many(pipeline)`` is ``weir.records.compile_prepare``'s counterpart for a
pipeline whose ``stages().functions`` is true (a ``map``, ``flatMap`` or function ``filter``
before the keyed stage). Declarative pipelines keep the single generated function, which this
module never replaces: it is what the benchmark measures.

Contract of ``prepare_many(value, key, kafka_ts_ms) -> list[Prepared]``:

- decodes the value as ``compile_prepare`` does (``too_large``, ``decode_error``,
  ``not_an_object``), then runs the steps before the keyed stage in order on the record dicts:
  ``filter`` (condition or function: keep when truthy), ``select``, ``rename``, ``map`` (one
  dict in, one dict out) and ``flatMap`` (one dict in, any number out);
- returns one ``(group_key, event_time_ms, record)`` per record the steps produced, in order;
  an empty list when the steps dropped the record;
- the event time of every output is the source record's (``source.eventTime``, else the Kafka
  timestamp), checked only when some output remains (a record the steps drop is never
  dead-lettered for its timestamp), with the same checks and ``maxFutureSkew`` as
  ``compile_prepare``;
- the key is the message key (``bad_key`` when null), ``source.key.field`` of the decoded
  source record, or the ``keyBy`` field of each output record;
- before a window, each output must carry the fields the aggregate reads, numbers for
  ``sum``/``min``/``max``/``avg`` (``missing_field``, ``wrong_type``, ``overflow``): after a
  function these can only be checked per record;
- raises ``DeadLetter`` for the source record as a whole (none of its outputs is produced):
  the reasons above, and ``FunctionError`` (``function_error``) when a user function raises,
  a map returns a non-dict, a flatMap returns a non-iterable or yields a non-dict, in a step
  with ``onError: deadLetter``; with ``onError: fail`` the same raise ``FunctionFailed``
  (the worker stops).

User functions receive the record dict and may return it modified or a new one; a filter
function must not modify it. Every reference is imported when the chain is compiled:
``SpecError`` names the field path of one that does not resolve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

import orjson

from weir.aggregates import INT_MAX, INT_MIN
from weir.functions import FunctionError, FunctionFailed, FunctionNotFound, load_function
from weir.records import (
    _MAX_EVENT_TIME_MS,
    _MISSING,
    _NAMESPACE,
    DeadLetter,
    Prepared,
    _check_number,
    _condition_expr,
    _decode_error,
    _decode_key,
    _epoch_seconds_to_ms,
    _int_overflow,
    _iso_to_ms,
    _json_type,
    _key_of,
    _not_an_object,
    _out_of_range,
    _Source,
    _too_far_ahead,
    system_ms,
)
from weir.spec import Condition, FieldScope, OnError, Pipeline, PipelineLike, SpecError, Step, as_pipeline

__all__ = [
    "PrepareMany",
    "StepFn",
    "aggregate_field_checks",
    "compile_prepare_many",
    "load_step_function",
    "resolve_functions",
]

PrepareMany: TypeAlias = Callable[[bytes | None, bytes | None, int], list[Prepared]]
"""``prepare_many(value, key, kafka_ts_ms)``; see the module docstring for the contract."""

StepFn: TypeAlias = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
"""One step over the records a source record has become so far."""

_PATH: Final = "spec.pipeline.steps"
_NULL_KEY: Final = "the message key is null and records are keyed by the message key"


def load_step_function(ref: str, path: str) -> Any:
    """Import ``ref`` (see ``weir.functions.load_function``); ``SpecError`` ``"<path>: <why>"`` if it
    does not resolve."""
    try:
        return load_function(ref)
    except FunctionNotFound as exc:
        raise SpecError([f"{path}: {exc}"]) from None


def resolve_functions(pipeline: Pipeline | PipelineLike) -> dict[str, Any]:
    """Import every function reference in ``pipeline``: steps, function filters, the process
    class and custom aggregates. Returns field path → object; raises ``SpecError`` with one
    line per reference that does not resolve (``weir run`` exits 2 on it)."""
    built = as_pipeline(pipeline)
    refs: list[tuple[str, str]] = []
    for index, step in enumerate(built.steps):
        path = f"{_PATH}[{index}].{step.kind}"
        for spec in (step.map, step.flat_map, step.process):
            if spec is not None:
                refs.append((f"{path}.function", spec.function))
        if step.filter is not None and step.filter.function is not None:
            refs.append((f"{path}.function", step.filter.function))
        if step.aggregate is not None:
            for name, output in step.aggregate.outputs.items():
                if output.function is not None:
                    refs.append((f"{path}.outputs.{name}.function", output.function))
    found: dict[str, Any] = {}
    problems: list[str] = []
    for path, ref in refs:
        try:
            found[path] = load_function(ref)
        except FunctionNotFound as exc:
            problems.append(f"{path}: {exc}")
    if problems:
        raise SpecError(problems)
    return found


def compile_prepare_many(
    pipeline: Pipeline | PipelineLike, now_ms: Callable[[], int] | None = None
) -> PrepareMany:
    """Compile the steps before ``pipeline``'s keyed stage into a ``PrepareMany`` (module docstring).

    Works for any pipeline; meant for those with function steps (``compile_prepare`` is faster
    for the others). Raises ``SpecError`` for a function reference that does not resolve.
    """
    built = as_pipeline(pipeline)
    stages = built.stages()
    clock = now_ms or system_ms
    source = built.source
    decode = _decoder(source.format, source.max_value_bytes)
    compiled = (_step(index, step) for index, step in enumerate(built.steps[: stages.keyed_index]))
    steps = [s for s in compiled if s is not None]
    event_time_field = source.event_time.field if source.event_time is not None else None
    event_time = _event_time(
        event_time_field,
        source.event_time.format if source.event_time is not None else "epochMillis",
        built.watermark.max_future_skew,
        clock,
    )
    key_field = stages.key_field
    aggregate = stages.aggregate
    # Fields a join adds do not exist yet: the join stage checks them (weir.graph.join_check).
    joined = {name for _, j in stages.joins for name in j.output_names()}
    check_fields = (
        _field_checks(
            tuple(f for f in aggregate.fields() if f not in joined),
            tuple(f for f in aggregate.numeric_fields() if f not in joined),
        )
        if aggregate
        else None
    )
    source_key_field = key_field if stages.key_from == "sourceField" else None

    def prepare_many(value: bytes | None, key: bytes | None, kafka_ts_ms: int) -> list[Prepared]:
        record = decode(value)
        # Read before the steps run: a function may modify or replace the source record.
        raw_time = kafka_ts_ms if event_time_field is None else record.get(event_time_field, _MISSING)
        source_key = record.get(source_key_field, _MISSING) if source_key_field is not None else None
        records = [record]
        for step in steps:
            records = step(records)
            if not records:
                return []
        t = event_time(raw_time)
        if stages.key_from == "messageKey":
            if key is None:
                raise DeadLetter("bad_key", _NULL_KEY)
            k = _decode_key(key)
            out = [(k, t, r) for r in records]
        elif stages.key_from == "sourceField":
            assert key_field is not None
            k = source_key if source_key.__class__ is str else _key_of(source_key, key_field)
            out = [(k, t, r) for r in records]
        else:
            assert key_field is not None
            out = []
            for r in records:
                v = r.get(key_field, _MISSING)
                out.append((v if v.__class__ is str else _key_of(v, key_field), t, r))
        if check_fields is not None:
            for r in records:
                check_fields(r)
        return out

    return prepare_many


# --------------------------------------------------------------------------- decoding and time


def _decoder(fmt: str, limit: int) -> Callable[[bytes | None], dict[str, Any]]:
    loads, decode_error = orjson.loads, orjson.JSONDecodeError

    def too_large(value: bytes) -> DeadLetter:
        return DeadLetter("too_large", f"{len(value)} bytes > maxValueBytes {limit}")

    def json_record(value: bytes | None) -> dict[str, Any]:
        if value is None:
            raise DeadLetter("not_an_object", "the value is null (a tombstone)")
        if len(value) > limit:
            raise too_large(value)
        try:
            r = loads(value)
        except decode_error as exc:
            raise _decode_error(exc) from None
        if r.__class__ is not dict:
            raise _not_an_object(r)
        result: dict[str, Any] = r
        return result

    def raw_record(value: bytes | None) -> dict[str, Any]:
        if value is None:
            return {"value": None}
        if len(value) > limit:
            raise too_large(value)
        try:
            return {"value": value.decode()}
        except UnicodeDecodeError as exc:
            raise DeadLetter("decode_error", f"not UTF-8: {exc.reason} at byte {exc.start}") from None

    return json_record if fmt == "json" else raw_record


def _event_time(field: str | None, fmt: str, skew: int, clock: Callable[[], int]) -> Callable[[Any], int]:
    """The check ``compile_prepare`` generates, on a value read from the source record."""
    what = "the Kafka record timestamp" if field is None else f"event-time field {field!r}"
    horizon = [-1]  # refreshed from the clock when an event time passes it

    def convert(t: Any) -> int:
        if field is None:
            if t < 0:
                raise DeadLetter("bad_timestamp", f"Kafka record timestamp is {t}")
            millis: int = t
        elif fmt == "iso8601":
            if t.__class__ is not str:
                raise _wrong_time(t, what, "a string")
            millis = _iso_to_ms(t)
        elif t.__class__ is int:
            millis = t * 1000 if fmt == "epochSeconds" else t
        elif t.__class__ is float:
            millis = _epoch_seconds_to_ms(t) if fmt == "epochSeconds" else int(t)
        else:
            raise _wrong_time(t, what, "a number")
        if field is not None and not 0 <= millis < _MAX_EVENT_TIME_MS:
            raise _out_of_range(millis, what)
        if skew and millis > horizon[0]:
            horizon[0] = clock() + skew
            if millis > horizon[0]:
                raise _too_far_ahead(millis, horizon[0], skew, what)
        return millis

    return convert


def _wrong_time(t: Any, what: str, kind: str) -> DeadLetter:
    if t is _MISSING:
        return DeadLetter("missing_field", f"{what} is missing")
    return DeadLetter("wrong_type", f"{what} must be {kind}, not {_json_type(t)}")


def aggregate_field_checks(
    fields: tuple[str, ...], numeric_fields: tuple[str, ...]
) -> Callable[[dict[str, Any]], None]:
    """A check of a record's aggregate ``fields`` (present; ``numeric_fields`` numbers within
    the aggregates' range) raising ``DeadLetter`` as the prepare step does."""
    return _field_checks(fields, numeric_fields)


def _field_checks(
    fields: tuple[str, ...], numeric_fields: tuple[str, ...]
) -> Callable[[dict[str, Any]], None]:
    numeric = frozenset(numeric_fields)

    def check(r: dict[str, Any]) -> None:
        for field in fields:
            v = r.get(field, _MISSING)
            if field in numeric:
                if v.__class__ is int:
                    if not INT_MIN <= v <= INT_MAX:
                        raise _int_overflow(v, field)
                elif v.__class__ is not float:
                    _check_number(v, field, "aggregate")
            elif v is _MISSING:
                raise DeadLetter("missing_field", f"aggregate field {field!r} is missing")

    return check


# --------------------------------------------------------------------------- steps


def _step(index: int, step: Step) -> StepFn | None:
    path = f"{_PATH}[{index}].{step.kind}"
    if step.filter is not None:
        if step.filter.function is not None:
            keep = load_step_function(step.filter.function, f"{path}.function")
            return _function_filter(step.filter.function, keep, step.filter.on_error or "deadLetter")
        return _condition_filter(step.filter)
    if step.select is not None:
        names = step.select
        return lambda records: [{n: r[n] for n in names if n in r} for r in records]
    if step.rename is not None:
        return _rename(dict(step.rename))
    if step.map is not None:
        spec = step.map
        return _map(spec.function, load_step_function(spec.function, f"{path}.function"), spec.on_error)
    if step.flat_map is not None:
        spec = step.flat_map
        return _flat_map(spec.function, load_step_function(spec.function, f"{path}.function"), spec.on_error)
    return None


def _failure(ref: str, on_error: OnError, exc: BaseException) -> Exception:
    return FunctionFailed(ref, exc) if on_error == "fail" else FunctionError(ref, exc)


def _condition_filter(condition: Condition) -> StepFn:
    # The same expression compile_prepare generates, over the current record (a passthrough
    # scope: every name reads itself), so both paths agree on every comparison rule.
    src = _Source()
    expr = _condition_expr(src, condition, FieldScope(raw=False))
    namespace: dict[str, Any] = {**_NAMESPACE, **src.constants}
    # The expression is generated from a validated spec; names and values enter it via repr().
    exec(compile(f"def keep(r):\n    return {expr}\n", "<weir filter>", "exec"), namespace)
    keep: Callable[[dict[str, Any]], bool] = namespace["keep"]
    return lambda records: [r for r in records if keep(r)]


def _function_filter(ref: str, keep: Callable[[dict[str, Any]], Any], on_error: OnError) -> StepFn:
    def run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return [r for r in records if keep(r)]
        except Exception as exc:  # any failure of user code is the record's function_error
            raise _failure(ref, on_error, exc) from exc

    return run


def _rename(mapping: dict[str, str]) -> StepFn:
    gone = frozenset(mapping) | frozenset(mapping.values())

    def run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            o = {k: v for k, v in r.items() if k not in gone}
            for old, new in mapping.items():
                if old in r:
                    o[new] = r[old]
            out.append(o)
        return out

    return run


def _map(ref: str, fn: Callable[[dict[str, Any]], Any], on_error: OnError) -> StepFn:
    def run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            try:
                o = fn(r)
            except Exception as exc:  # any failure of user code is the record's function_error
                raise _failure(ref, on_error, exc) from exc
            if not isinstance(o, dict):
                raise _failure(ref, on_error, TypeError(f"a map must return a dict, not {type(o).__name__}"))
            out.append(o)
        return out

    return run


def _flat_map(ref: str, fn: Callable[[dict[str, Any]], Iterable[Any]], on_error: OnError) -> StepFn:
    def run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for r in records:
            try:
                produced = fn(r)
            except Exception as exc:  # any failure of user code is the record's function_error
                raise _failure(ref, on_error, exc) from exc
            if isinstance(produced, dict | str | bytes) or not isinstance(produced, Iterable):
                why = f"a flatMap must return an iterable of dicts, not {type(produced).__name__}"
                raise _failure(ref, on_error, TypeError(why))
            try:
                items = list(produced)
            except Exception as exc:  # a generator's own failure
                raise _failure(ref, on_error, exc) from exc
            for item in items:
                if not isinstance(item, dict):
                    why = f"a flatMap must yield dicts, not {type(item).__name__}"
                    raise _failure(ref, on_error, TypeError(why))
            out.extend(items)
        return out

    return run
