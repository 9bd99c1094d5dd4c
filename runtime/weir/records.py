"""Per-record preparation: one generated function per pipeline decodes, filters, keys and timestamps records.

``compile_prepare(pipeline)`` turns the part of a pipeline before its window (source
decoding, event time, filters, select, rename, key) into a single Python function,
generated as source and compiled once, so the hot path makes no per-step calls. The
function reads every field straight from the decoded source record (``FieldScope`` maps
names through select and rename) and builds the output record once, after all filters.

It serves declarative pipelines; one with user functions (``pipeline.stages().functions``) is
compiled by ``weir.chain.compile_prepare_many`` instead, and ``compile_prepare`` refuses it.

Contract of a prepare function, ``prepare(value, key, kafka_ts_ms)``, compiled with a clock
``now_ms()`` (epoch milliseconds; default: the system clock):

- returns ``(group_key, event_time_ms, record)``, or ``None`` when a filter drops the
  record;
- raises ``DeadLetter(reason, detail)`` for a record that cannot be processed. Reasons:
  ``too_large`` (value longer than ``source.maxValueBytes``; checked before decoding),
  ``decode_error`` (not JSON; for ``raw``, not UTF-8), ``not_an_object`` (JSON but not an
  object, or a null value), ``missing_field`` (event-time, key or aggregate field absent),
  ``wrong_type`` (event time, key or numeric aggregate field of the wrong JSON type),
  ``bad_timestamp`` (event time unparsable or outside year 1970..9999, a negative Kafka
  timestamp, or an event time more than ``watermark.maxFutureSkew`` ahead of ``now_ms()``),
  ``bad_key`` (message key not UTF-8, or null while windows are keyed by the message key),
  ``overflow`` (a numeric aggregate field holds an integer beyond signed 64 bits).

Order of checks: size, decoding, filters, then event time, key and aggregate fields. A
record a filter drops is therefore never dead-lettered for its other fields (page views
without a price do not pollute the dead-letter topic of a revenue job).

Keys are strings: a message key is decoded as UTF-8; a null one is ``bad_key`` (null-key
records are spread over partitions with no affinity, so their "group" would be split across
tasks; Kafka Streams drops them from aggregations for the same reason, weir keeps them in the
dead-letter topic). A key field must hold a string or an integer (written in decimal); any
other type is ``wrong_type``, null included.

Future event times. A record dated more than ``maxFutureSkew`` past the wall clock would move
its partition's watermark far ahead (every later record late, open windows fired early), so it
is dead-lettered instead. The check costs one comparison per record: the generated function
keeps the last horizon it read (``now_ms() + skew``) and reads the clock again only for an
event time beyond it, so a record is refused only against a fresh reading.

Repartitioning: when ``pipeline.stages().repartition`` is set, stage 1 runs ``prepare`` and
forwards each result to the repartition topic in the format of ``weir.repartition``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

import orjson

from weir.aggregates import INT_MAX, INT_MIN
from weir.spec import Condition, FieldScope, Pipeline, PipelineLike, as_pipeline

__all__ = [
    "REASONS",
    "DeadLetter",
    "Prepare",
    "Prepared",
    "Reason",
    "compile_prepare",
    "prepare_source",
    "system_ms",
    "walk_steps",
]

Reason: TypeAlias = Literal[
    "too_large", "decode_error", "not_an_object", "missing_field", "wrong_type", "bad_timestamp", "bad_key",
    "overflow", "function_error", "late", "join_miss",
]
REASONS: Final[tuple[Reason, ...]] = (
    "too_large",
    "decode_error",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "bad_timestamp",
    "bad_key",
    "overflow",
    "function_error",
    "late",
    "join_miss",
)

Prepared: TypeAlias = tuple[str, int, dict[str, Any]]
"""(group key, event time in epoch milliseconds, record)."""

Prepare: TypeAlias = Callable[[bytes | None, bytes | None, int], Prepared | None]
"""``prepare(value, key, kafka_ts_ms)``; see the module docstring for the contract."""


class DeadLetter(Exception):
    """A record cannot be processed; it goes to the dead-letter topic with ``reason``
    (one of ``REASONS``) and a human-readable ``detail``."""

    __slots__ = ("detail", "reason")

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


# Event times must fall in years 1970..9999: the range ISO 8601 strings can express, and a
# guard against seconds written where milliseconds are expected being taken literally.
_MAX_EVENT_TIME_MS: Final = 253_402_300_800_000

_MISSING: Final = object()
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_fromisoformat: Final = datetime.fromisoformat


_JSON_TYPES: Final = {
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for dead-letter details."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _iso_to_ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 timestamp with a UTC offset; ``DeadLetter`` otherwise."""
    try:
        moment = _fromisoformat(text)
    except ValueError:
        raise DeadLetter("bad_timestamp", f"not an ISO 8601 timestamp: {text[:64]!r}") from None
    if moment.tzinfo is None:
        # The spec cannot say which zone the producer meant; guessing UTC would silently
        # shift every window, so such records are dead-lettered instead.
        raise DeadLetter("bad_timestamp", f"ISO 8601 timestamp without UTC offset: {text[:64]!r}")
    delta = moment - _EPOCH
    return delta.days * 86_400_000 + delta.seconds * 1_000 + delta.microseconds // 1_000


def _key_of(value: object, field: str) -> str:
    """A key field's value as a string (slow path: the value is not a string)."""
    if value.__class__ is int:
        return str(value)
    if value is _MISSING:
        raise DeadLetter("missing_field", f"key field {field!r} is missing")
    got = _json_type(value)
    raise DeadLetter("wrong_type", f"key field {field!r} must be a string or integer, not {got}")


def _decode_key(key: bytes) -> str:
    try:
        return key.decode()
    except UnicodeDecodeError as exc:
        raise DeadLetter("bad_key", f"message key is not UTF-8: {exc.reason} at byte {exc.start}") from None


def _decode_error(exc: Exception) -> DeadLetter:
    return DeadLetter("decode_error", str(exc))


def _not_an_object(value: object) -> DeadLetter:
    return DeadLetter("not_an_object", f"the value is a JSON {_json_type(value)}, not an object")


def _out_of_range(millis: int, what: str) -> DeadLetter:
    return DeadLetter("bad_timestamp", f"{millis} ms is outside years 1970..9999 ({what})")


def _too_far_ahead(millis: int, horizon: int, skew: int, what: str) -> DeadLetter:
    return DeadLetter(
        "bad_timestamp",
        f"{millis} ms ({what}) is more than maxFutureSkew {skew} ms past the wall clock "
        f"(latest accepted: {horizon} ms)",
    )


def _epoch_seconds_to_ms(seconds: float) -> int:
    """Milliseconds of a float of epoch seconds, the fraction below a millisecond dropped.

    ``seconds * 1000`` is inexact (1700000000.123 * 1000 is 1700000000122.9999...), so neither
    rounding nor truncating it is right. Round to the nearest millisecond, then step back one if
    that lies above the number the producer wrote (the shortest decimal that reads back as
    ``seconds``): 1704067209.9996 gives ...209999, 1700000000.123 gives ...000123.
    """
    millis = round(seconds * 1000)
    if millis / 1000 > seconds:
        millis -= 1
    return millis


def _int_overflow(value: int, field: str) -> DeadLetter:
    return DeadLetter(
        "overflow", f"aggregate field {field!r} is {value}, beyond signed 64-bit integers (Flink's BIGINT)"
    )


def _check_number(value: object, field: str, why: str) -> None:
    """Raise the right ``DeadLetter`` for a value that failed the fast numeric test."""
    if value is _MISSING:
        raise DeadLetter("missing_field", f"{why} field {field!r} is missing")
    raise DeadLetter("wrong_type", f"{why} field {field!r} must be a number, not {_json_type(value)}")


# --------------------------------------------------------------------------- code generation


class _Source:
    """A tiny emitter of indented Python source lines plus the constants they refer to."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, object] = {}
        self._temps = 0

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def constant(self, value: object) -> str:
        name = f"_k{len(self.constants)}"
        self.constants[name] = value
        return name

    def temp(self) -> str:
        self._temps += 1
        return f"_v{self._temps}"


def _condition_expr(src: _Source, condition: Condition, scope: FieldScope) -> str:
    """A Python expression over the decoded source record ``r`` that is the condition's value."""
    if condition.and_ is not None:
        return "(" + " and ".join(_condition_expr(src, c, scope) for c in condition.and_) + ")"
    if condition.or_ is not None:
        return "(" + " or ".join(_condition_expr(src, c, scope) for c in condition.or_) + ")"
    if condition.not_ is not None:
        return f"(not {_condition_expr(src, condition.not_, scope)})"
    assert condition.field is not None and condition.op is not None
    field = repr(scope.source_of(condition.field))
    op, value = condition.op, condition.value
    if op == "exists":
        return f"({field} in r)"
    if op in ("eq", "ne"):
        expr = _equals_expr(src, field, value)
        return expr if op == "eq" else f"(not {expr})"
    if op in ("in", "notIn"):
        assert isinstance(value, tuple)
        expr = _member_expr(src, field, value)
        return expr if op == "in" else f"(not {expr})"
    python_op = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}[op]
    v = src.temp()
    if isinstance(value, str):
        return f"(({v} := r.get({field})).__class__ is str and {v} {python_op} {value!r})"
    is_number = f"(({v} := r.get({field})).__class__ is int or {v}.__class__ is float)"
    return f"({is_number} and {v} {python_op} {value!r})"


def _equals_expr(src: _Source, field: str, value: object) -> str:
    if value is None:
        return f"(r.get({field}, _MISSING) is None)"
    if isinstance(value, bool):
        return f"(r.get({field}) is {value!r})"
    if isinstance(value, str):
        # str.__eq__ is only true for strings, so no type test is needed.
        return f"(r.get({field}) == {value!r})"
    v = src.temp()
    # Python has True == 1; JSON booleans are not numbers.
    return f"(({v} := r.get({field})) == {value!r} and {v}.__class__ is not bool)"


def _member_expr(src: _Source, field: str, values: tuple[object, ...]) -> str:
    strings = frozenset(v for v in values if isinstance(v, str))
    numbers = frozenset(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
    booleans = frozenset(v for v in values if isinstance(v, bool))
    v = src.temp()
    # Only hashable JSON scalars may meet a set (arrays and objects would raise), and a
    # boolean must not match a number (True in {1} is true in Python).
    parts = []
    first = f"({v} := r.get({field}, _MISSING))"
    if strings:
        parts.append(f"({first}.__class__ is str and {v} in {src.constant(strings)})")
        first = v
    if numbers:
        is_number = f"({first}.__class__ is int or {v}.__class__ is float)"
        parts.append(f"({is_number} and {v} in {src.constant(numbers)})")
        first = v
    if booleans:
        parts.append(f"({first}.__class__ is bool and {v} in {src.constant(booleans)})")
        first = v
    if None in values:
        parts.append(f"({first} is None)")
    return "(" + " or ".join(parts) + ")" if parts else "False"


def walk_steps(
    pipeline: Pipeline, on_filter: Callable[[int, Condition, FieldScope], None]
) -> tuple[FieldScope, str | None]:
    """Walk the declarative steps before the keyed stage: ``on_filter(index, condition, scope)``
    for each filter, with the scope as it is there (a filter reads source fields through the
    select and rename steps before it). Returns the scope at the keyed stage and the source field
    of a ``keyBy`` field (None without one). ``weir.native`` reads the pipeline the same way."""
    scope = FieldScope(raw=pipeline.source.format == "raw")
    key_scope_field: str | None = None
    for index, step in enumerate(pipeline.steps):
        if step.filter is not None:
            on_filter(index, step.filter, scope)
        elif step.select is not None:
            scope.select(index, step.select)
        elif step.rename is not None:
            scope.rename(index, step.rename)
        elif step.key_by is not None and step.key_by.field is not None:
            key_scope_field = scope.source_of(step.key_by.field)
        elif step.window is not None or step.process is not None:
            break
    return scope, key_scope_field


def _generate(pipeline: Pipeline) -> _Source:
    plan = pipeline.stages()
    source = pipeline.source
    src = _Source()
    emit = src.emit
    emit(0, "def prepare(value, key, kafka_ts_ms):")

    # -- decode
    limit = source.max_value_bytes
    if source.format == "json":
        emit(1, "if value is None:")
        emit(2, "raise DeadLetter('not_an_object', 'the value is null (a tombstone)')")
        emit(1, f"if len(value) > {limit}:")
        emit(2, f"raise DeadLetter('too_large', f'{{len(value)}} bytes > maxValueBytes {limit}')")
        emit(1, "try:")
        emit(2, "r = _loads(value)")
        emit(1, "except _JSONDecodeError as exc:")
        emit(2, "raise _decode_error(exc) from None")
        emit(1, "if r.__class__ is not dict:")
        emit(2, "raise _not_an_object(r)")
    else:
        emit(1, "if value is None:")
        emit(2, "r = {'value': None}")
        emit(1, "else:")
        emit(2, f"if len(value) > {limit}:")
        emit(3, f"raise DeadLetter('too_large', f'{{len(value)}} bytes > maxValueBytes {limit}')")
        emit(2, "try:")
        emit(3, "r = {'value': value.decode()}")
        emit(2, "except UnicodeDecodeError as exc:")
        emit(3, "raise DeadLetter('decode_error', f'not UTF-8: {exc.reason} at byte {exc.start}') from None")

    # -- filters (reading source fields through the select/rename mapping so far)
    def on_filter(index: int, condition: Condition, scope: FieldScope) -> None:
        emit(1, f"if not {_condition_expr(src, condition, scope)}:  # steps[{index}]")
        emit(2, "return None")

    scope, key_scope_field = walk_steps(pipeline, on_filter)

    # -- event time
    event_time = source.event_time
    if event_time is None or event_time.field is None:
        emit(1, "t = kafka_ts_ms")
        emit(1, "if t < 0:")
        emit(2, "raise DeadLetter('bad_timestamp', f'Kafka record timestamp is {t}')")
    else:
        name = repr(event_time.field)
        what = f"event-time field {event_time.field!r}"
        emit(1, f"t = r.get({name}, _MISSING)")
        if event_time.format == "iso8601":
            emit(1, "if t.__class__ is str:")
            emit(2, "t = _iso_to_ms(t)")
        else:
            emit(1, "if t.__class__ is int:")
            emit(2, "t = t * 1000" if event_time.format == "epochSeconds" else "pass")
            emit(1, "elif t.__class__ is float:")
            # Fractions below a millisecond are dropped (int() truncates a float of millis).
            emit(2, "t = _epoch_seconds_to_ms(t)" if event_time.format == "epochSeconds" else "t = int(t)")
        emit(1, "elif t is _MISSING:")
        emit(2, f"raise DeadLetter('missing_field', {what + ' is missing'!r})")
        emit(1, "else:")
        kind = "a string" if event_time.format == "iso8601" else "a number"
        emit(2, f"raise DeadLetter('wrong_type', {what + ' must be ' + kind + ', not '!r} + _json_type(t))")
        emit(1, f"if not 0 <= t < {_MAX_EVENT_TIME_MS}:")
        emit(2, f"raise _out_of_range(t, {what!r})")
    skew = pipeline.watermark.max_future_skew
    if skew:
        if event_time is None or event_time.field is None:
            what = "the Kafka record timestamp"
        horizon = src.constant([-1])  # refreshed from the clock on first use
        emit(1, f"if t > {horizon}[0]:")
        emit(2, f"{horizon}[0] = _now_ms() + {skew}")
        emit(2, f"if t > {horizon}[0]:")
        emit(3, f"raise _too_far_ahead(t, {horizon}[0], {skew}, {what!r})")

    # -- key
    if plan.key_from == "messageKey":
        emit(1, "if key is None:")
        emit(2, f"raise DeadLetter('bad_key', {_NULL_KEY!r})")
        emit(1, "k = _decode_key(key)")
    else:
        read = key_scope_field if plan.key_from == "keyByField" else plan.key_field
        assert read is not None and plan.key_field is not None
        emit(1, f"k = r.get({read!r}, _MISSING)")
        emit(1, "if k.__class__ is not str:")
        emit(2, f"k = _key_of(k, {plan.key_field!r})")

    # -- fields the aggregate reads
    aggregate = plan.aggregate
    numeric = set(aggregate.numeric_fields()) if aggregate is not None else set()
    present: set[str] = set()
    joined = {name for _, j in plan.joins for name in j.output_names()}  # checked after the joins
    for field in aggregate.fields() if aggregate is not None else ():
        if field in joined:
            continue
        read = scope.source_of(field)
        present.add(read)
        if field in numeric:
            v = src.temp()
            emit(1, f"{v} = r.get({read!r}, _MISSING)")
            # The decoder gives finite floats only (it refuses NaN, Infinity and 1e999) and ints
            # up to 2**64 - 1; the aggregates' rule is signed 64 bits (weir.aggregates.INT_MAX).
            emit(1, f"if {v}.__class__ is int:")
            emit(2, f"if not {INT_MIN} <= {v} <= {INT_MAX}:")
            emit(3, f"raise _int_overflow({v}, {field!r})")
            emit(1, f"elif {v}.__class__ is not float:")
            emit(2, f"_check_number({v}, {field!r}, 'aggregate')")
        else:
            emit(1, f"if {read!r} not in r:")
            message = f"aggregate field {field!r} is missing"
            emit(2, f"raise DeadLetter('missing_field', {message!r})")
    if key_scope_field is not None:
        present.add(key_scope_field)

    # -- output record, built once
    if scope.passthrough:
        moves = scope.output_moves()
        dropped = scope.dropped()
        temps = []
        for _current, origin in moves:
            v = src.temp()
            temps.append(v)
            emit(1, f"{v} = r.pop({origin!r}, _MISSING)")
        for name in sorted(dropped - {origin for _, origin in moves}):
            emit(1, f"r.pop({name!r}, None)")
        for (current, _origin), v in zip(moves, temps, strict=True):
            emit(1, f"if {v} is not _MISSING:")
            emit(2, f"r[{current!r}] = {v}")
        emit(1, "return k, t, r")
    else:
        always = {cur: origin for cur, origin in scope.explicit.items() if origin in present}
        items = ", ".join(f"{cur!r}: r[{origin!r}]" for cur, origin in always.items())
        emit(1, f"o = {{{items}}}")
        for current, origin in scope.explicit.items():
            if current in always:
                continue
            emit(1, f"if {origin!r} in r:")
            emit(2, f"o[{current!r}] = r[{origin!r}]")
        emit(1, "return k, t, o")
    return src


_NAMESPACE: Final[dict[str, object]] = {
    "DeadLetter": DeadLetter,
    "_MISSING": _MISSING,
    "_loads": orjson.loads,
    "_JSONDecodeError": orjson.JSONDecodeError,
    "_decode_error": _decode_error,
    "_not_an_object": _not_an_object,
    "_json_type": _json_type,
    "_iso_to_ms": _iso_to_ms,
    "_key_of": _key_of,
    "_decode_key": _decode_key,
    "_check_number": _check_number,
    "_out_of_range": _out_of_range,
    "_too_far_ahead": _too_far_ahead,
    "_epoch_seconds_to_ms": _epoch_seconds_to_ms,
    "_int_overflow": _int_overflow,
}

_NULL_KEY: Final = "the message key is null and windows are keyed by the message key"


def system_ms() -> int:
    """The wall clock in epoch milliseconds (the default ``now`` of ``maxFutureSkew``)."""
    return time.time_ns() // 1_000_000


def prepare_source(pipeline: Pipeline | PipelineLike) -> str:
    """The Python source ``compile_prepare`` generates for ``pipeline`` (for reading and debugging)."""
    return "\n".join(_generate(as_pipeline(pipeline)).lines) + "\n"


def compile_prepare(pipeline: Pipeline | PipelineLike, now_ms: Callable[[], int] | None = None) -> Prepare:
    """Compile the pre-window part of ``pipeline`` into one prepare function (see the module
    docstring for its contract). With a repartition, this is stage 1's function. ``now_ms`` is
    the wall clock ``maxFutureSkew`` is measured from (default: the system clock)."""
    built = as_pipeline(pipeline)
    if built.stages().functions:
        raise ValueError("this pipeline has function steps: compile it with weir.chain.compile_prepare_many")
    generated = _generate(built)
    text = "\n".join(generated.lines) + "\n"
    namespace: dict[str, Any] = {**_NAMESPACE, **generated.constants, "_now_ms": now_ms or system_ms}
    # The source is generated from a validated spec; names and values enter it only via repr().
    exec(compile(text, "<weir prepare>", "exec"), namespace)
    function: Prepare = namespace["prepare"]
    return function
