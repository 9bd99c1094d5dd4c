"""Pipeline steps: filter conditions, user functions, keyBy, windows, aggregates, process and ``Step``.

A user function is named by a reference ``"package.module:name"`` (``weir.functions``); the
models check only its form, ``weir.records``/``weir.chain`` import it when a worker compiles
the pipeline (a reference that does not resolve is then a ``SpecError`` with the field path).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from weir.spec_common import FUNCTION_REF, Duration, FieldName, LocatedError, PositiveDuration, SpecModel
from weir.spec_join import Join
from weir.window_shapes import MAX_SLIDING_WINDOWS, sliding_windows_per_record

FunctionRef = Annotated[str, Field(pattern=FUNCTION_REF)]
"""``package.module:name`` of a function or class importable in the worker image."""

def _absent(value: object) -> bool:
    """Members added after v1alpha1's first release are left out of dumps while unset, so a
    spec that does not use them dumps (and fingerprints, see weir_operator.render) as before."""
    return value is None


OnError: TypeAlias = Literal["deadLetter", "fail"]
"""What a user function raising on a record does: ``deadLetter`` the record (reason
``function_error``, the default) or ``fail`` (stop the worker with the cause)."""

# A JSON scalar a condition compares with; JSON has no NaN or infinity, and YAML's .inf
# would make comparisons meaningless, so they are rejected.
_SCALAR_TYPES = (str, int, float, bool, type(None))


ConditionOp: TypeAlias = Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "notIn", "exists"]
_ORDERING_OPS = frozenset({"lt", "le", "gt", "ge"})
_SET_OPS = frozenset({"in", "notIn"})

# The API server cannot describe "any JSON scalar or a list of them" structurally.
_VALUE_SCHEMA: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class Condition(SpecModel):
    """A filter condition: a comparison (``field`` + ``op`` [+ ``value``]), exactly one of
    ``and``, ``or``, ``not``, or a user ``function`` (top level only: not inside and/or/not).

    A function filter is called with the record (a dict it must not modify) and keeps the
    record when it returns a truthy value.

    A comparison on a missing field is false, except that ``ne`` and ``notIn`` are the exact
    negations of ``eq`` and ``in``. ``lt``/``le``/``gt``/``ge`` are false unless the field
    and ``value`` are both numbers or both strings. Booleans never equal numbers. ``exists``
    is true when the field is present, even with value null. ``eq``/``ne`` without ``value``
    compare with null (Kubernetes drops null values, so the two cannot be told apart).
    Conditions carry no evaluation logic; ``weir.records`` compiles them.
    """

    field: FieldName | None = None
    """Record field compared by ``op``."""
    op: ConditionOp | None = None
    """The comparison."""
    value: Annotated[Any, WithJsonSchema(_VALUE_SCHEMA)] = None
    """JSON scalar compared with (a list of scalars for ``in`` and ``notIn``)."""
    and_: Annotated[tuple[Condition, ...], Field(min_length=1)] | None = Field(default=None, alias="and")
    """True when every member is."""
    or_: Annotated[tuple[Condition, ...], Field(min_length=1)] | None = Field(default=None, alias="or")
    """True when any member is."""
    not_: Condition | None = Field(default=None, alias="not")
    """True when the member is not."""
    function: FunctionRef | None = Field(default=None, exclude_if=_absent)
    """``package.module:name`` of ``f(record) -> bool``: true when its return is truthy."""
    on_error: OnError | None = Field(default=None, exclude_if=_absent)
    """With ``function``: ``deadLetter`` (default) or ``fail`` when the function raises."""

    @field_validator("value", mode="before")
    @classmethod
    def _json_scalar_or_list(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            for item in value:
                _check_scalar(item)
            return tuple(value)
        _check_scalar(value)
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Condition:
        set_forms = [
            name
            for name, present in (
                ("field/op", self.field is not None or self.op is not None),
                ("and", self.and_ is not None),
                ("or", self.or_ is not None),
                ("not", self.not_ is not None),
                ("function", self.function is not None),
            )
            if present
        ]
        if len(set_forms) != 1:
            got = ", ".join(set_forms) if set_forms else "none"
            raise ValueError(
                f"must be exactly one of a comparison (field/op), and, or, not, function (got {got})"
            )
        if set_forms[0] == "field/op":
            self._check_comparison()
        elif self.value is not None:
            raise LocatedError(("value",), "only applies to a comparison (field/op)")
        if self.on_error is not None and self.function is None:
            raise LocatedError(("onError",), "only applies to a function filter")
        nested: list[tuple[tuple[str | int, ...], Condition]] = [(("not",), self.not_)] if self.not_ else []
        for alias, members in (("and", self.and_), ("or", self.or_)):
            nested += [((alias, position), member) for position, member in enumerate(members or ())]
        for where, member in nested:
            if member.function is not None:
                raise LocatedError(
                    (*where, "function"), "a function filter must be the whole filter, not inside and/or/not"
                )
        return self

    def _check_comparison(self) -> None:
        if self.field is None:
            raise LocatedError(("field",), "required field is missing")
        if self.op is None:
            raise LocatedError(("op",), "required field is missing")
        value = self.value
        if self.op in _SET_OPS:
            if not isinstance(value, tuple):
                raise LocatedError(("value",), f"must be a list for {self.op} (got {value!r})")
        elif isinstance(value, tuple):
            raise LocatedError(("value",), f"must be a single value for {self.op} (got a list)")
        elif self.op == "exists" and value is not None:
            raise LocatedError(("value",), "must be omitted for exists")
        elif self.op in _ORDERING_OPS and (
            value is None or isinstance(value, bool) or not isinstance(value, str | int | float)
        ):
            raise LocatedError(("value",), f"must be a number or a string for {self.op} (got {value!r})")


def _check_scalar(value: object) -> None:
    if not isinstance(value, _SCALAR_TYPES):
        raise ValueError(f"must be a string, number, boolean or null (got {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")


class KeyBy(SpecModel):
    """Re-key records for the window: by a record field, or by the Kafka message key."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.field) != (has(self.messageKey) && self.messageKey)",
                    "message": "must set exactly one of field, messageKey: true",
                }
            ]
        }
    )

    field: FieldName | None = None
    """Record field (after the steps before it) whose value is the key; strings and integers."""
    message_key: Annotated[bool, Field(strict=True)] = False
    """Key by the Kafka message key (no repartition)."""
    partitions: Annotated[int, Field(ge=1, strict=True)] | None = None
    """Partitions of the repartition topic; omitted means as many as the source topic."""

    @model_validator(mode="after")
    def _field_or_message_key(self) -> KeyBy:
        if (self.field is None) == (not self.message_key):
            raise ValueError("must set exactly one of field, messageKey: true")
        if self.message_key and self.partitions is not None:
            raise LocatedError(("partitions",), "only applies to keyBy field (messageKey: no repartition)")
        return self


WindowType: TypeAlias = Literal["tumbling", "sliding", "session"]


class Window(SpecModel):
    """Event-time windows: ``tumbling`` (size), ``sliding`` (size, slide) or ``session`` (gap)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type == 'session' ? (has(self.gap) && !has(self.size) && !has(self.slide)) "
                    ": (has(self.size) && !has(self.gap) && (self.type == 'sliding') == has(self.slide))",
                    "message": "a tumbling window takes size, a sliding window size and slide, "
                    "a session window gap",
                }
            ]
        }
    )

    type: WindowType
    """The kind of window."""
    size: PositiveDuration | None = None
    """Length of tumbling and sliding windows."""
    slide: PositiveDuration | None = None
    """How far apart sliding windows start; at most ``size``, and at least ``size`` / 10,000 (each
    record is in ``ceil(size / slide)`` windows)."""
    gap: PositiveDuration | None = None
    """Inactivity that closes a session window."""
    allowed_lateness: Duration = 0
    """How long after the watermark passes a window's end records still update it."""

    @model_validator(mode="after")
    def _members_match_type(self) -> Window:
        needed = {"tumbling": ("size",), "sliding": ("size", "slide"), "session": ("gap",)}[self.type]
        for name in ("size", "slide", "gap"):
            present = getattr(self, name) is not None
            if name in needed and not present:
                raise LocatedError((name,), f"is required for a {self.type} window")
            if name not in needed and present:
                allowed = ", ".join(needed)
                raise LocatedError((name,), f"does not apply to a {self.type} window (it takes {allowed})")
        slide, size = self.slide, self.size
        if self.type == "sliding" and slide is not None and size is not None and slide > size:
            raise LocatedError(("slide",), f"must not exceed size ({self.slide} ms > {self.size} ms)")
        if self.type == "sliding" and slide is not None and size is not None:
            per_record = sliding_windows_per_record(size, slide)
            if per_record > MAX_SLIDING_WINDOWS:
                raise LocatedError(
                    ("slide",),
                    f"puts each record in {per_record} windows (size {size} ms / slide {slide} ms); "
                    f"at most {MAX_SLIDING_WINDOWS}: use a larger slide",
                )
        return self


AggregateFn: TypeAlias = Literal[
    "count", "sum", "min", "max", "avg", "count_distinct", "first", "last", "custom"
]
NUMERIC_FNS: frozenset[str] = frozenset({"sum", "min", "max", "avg"})
"""Aggregate functions whose field must hold a number (int or float, never a boolean)."""


RESERVED_OUTPUT_NAMES: frozenset[str] = frozenset(
    {"key", "windowStart", "windowEnd", "windowStartMs", "windowEndMs", "final"})
"""Names every result record already carries, so no aggregate output may take them."""


class Output(SpecModel):
    """One aggregate output: ``count`` of records, ``sum``/``min``/``max``/``avg`` of a numeric
    field, ``count_distinct`` values of a field, the ``first``/``last`` value of a field by
    event time, or ``custom``: a user class following ``weir.AggregateFunction`` (``function``)
    fed the field's value, or the whole record when no field is named."""

    fn: AggregateFn
    """The aggregate function."""
    field: FieldName | None = None
    """Record field the function reads (numbers only for sum/min/max/avg); not used by ``count``,
    optional for ``custom``."""
    function: FunctionRef | None = Field(default=None, exclude_if=_absent)
    """With ``fn: custom``: ``package.module:Class`` of a ``weir.AggregateFunction``."""

    @model_validator(mode="after")
    def _field_matches_fn(self) -> Output:
        if self.fn == "count" and self.field is not None:
            raise LocatedError(("field",), "does not apply to count (it counts records)")
        if self.fn not in ("count", "custom") and self.field is None:
            raise LocatedError(("field",), f"is required for {self.fn}")
        if self.fn == "custom" and self.function is None:
            raise LocatedError(("function",), "is required for custom")
        if self.fn != "custom" and self.function is not None:
            raise LocatedError(("function",), f"only applies to custom (not {self.fn})")
        return self


class Aggregate(SpecModel):
    """What each window computes and when it is written to the sink."""

    emit: Literal["final", "updates"] = "final"
    """``final``: one result when the window closes; ``updates``: a result per change."""
    outputs: Annotated[dict[Annotated[str, Field(min_length=1)], Output], Field(min_length=1)]
    """Output name to function; at least one."""

    @model_validator(mode="after")
    def _output_names_are_free(self) -> Aggregate:
        for name in self.outputs:
            if name in RESERVED_OUTPUT_NAMES:
                reserved = ", ".join(sorted(RESERVED_OUTPUT_NAMES))
                raise LocatedError(
                    ("outputs", name),
                    f"is a field of every result record; choose another name (reserved: {reserved})",
                )
        return self

    def fields(self) -> tuple[str, ...]:
        """Record fields the outputs read, in output order, without repeats."""
        return tuple(dict.fromkeys(o.field for o in self.outputs.values() if o.field is not None))

    def numeric_fields(self) -> tuple[str, ...]:
        """Record fields that must hold numbers (read by sum/min/max/avg)."""
        return tuple(dict.fromkeys(o.field for o in self.outputs.values() if o.fn in NUMERIC_FNS and o.field))


class FunctionStep(SpecModel):
    """A step that calls user code: ``map``, ``flatMap`` or ``process``."""

    function: FunctionRef
    """``package.module:name`` of the function (a class for ``process``)."""
    on_error: OnError = "deadLetter"
    """``deadLetter``: a record the function raises on goes to the dead-letter topic
    (``function_error``); ``fail``: the worker stops with the cause."""


StepKind: TypeAlias = Literal[
    "filter", "select", "rename", "map", "flatMap", "keyBy", "join", "window", "aggregate", "process"
]
_STEP_KINDS: tuple[tuple[str, StepKind], ...] = (
    ("filter", "filter"),
    ("select", "select"),
    ("rename", "rename"),
    ("map", "map"),
    ("flat_map", "flatMap"),
    ("key_by", "keyBy"),
    ("join", "join"),
    ("window", "window"),
    ("aggregate", "aggregate"),
    ("process", "process"),
)


class Step(SpecModel):
    """One pipeline step; exactly one member is set."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.filter), has(self.select), has(self.rename), has(self.map), "
                    "has(self.flatMap), has(self.keyBy), has(self.join), has(self.window), "
                    "has(self.aggregate), has(self.process)].exists_one(x, x)",
                    "message": "must set exactly one of filter, select, rename, map, flatMap, keyBy, join, "
                    "window, aggregate, process",
                }
            ]
        }
    )

    filter: Condition | None = None
    """Keep only records for which the condition holds."""
    select: Annotated[tuple[FieldName, ...], Field(min_length=1)] | None = None
    """Keep only these fields (absent ones stay absent)."""
    rename: Annotated[dict[FieldName, FieldName], Field(min_length=1)] | None = None
    """Old name to new name, applied at once (so ``{a: b, b: a}`` swaps). A new name replaces
    any field already called that; renaming a missing field leaves the new name missing."""
    map: FunctionStep | None = Field(default=None, exclude_if=_absent)
    """Call ``f(record) -> dict`` on each record; its return replaces the record."""
    flat_map: FunctionStep | None = Field(default=None, exclude_if=_absent)
    """Call ``f(record) -> iterable of dicts`` on each record; each dict is a record (none: dropped)."""
    key_by: KeyBy | None = None
    """Re-key records; a field key means a repartition through Kafka."""
    join: Join | None = Field(default=None, exclude_if=_absent)
    """Add a table topic's fields as of each record's event time (``weir.spec_join``)."""
    window: Window | None = None
    """Group records into event-time windows."""
    aggregate: Aggregate | None = None
    """Compute the outputs per key and window."""
    process: FunctionStep | None = Field(default=None, exclude_if=_absent)
    """Run a keyed process function (``package.module:Class``, a ``weir.process.ProcessFunction``)
    with keyed state and event-time timers; the last step."""

    @property
    def kind(self) -> StepKind:
        """The camelCase name of the member that is set."""
        for attr, kind in _STEP_KINDS:
            if getattr(self, attr) is not None:
                return kind
        raise AssertionError("a validated step has one member set")  # pragma: no cover

    @model_validator(mode="after")
    def _exactly_one(self) -> Step:
        present = [kind for attr, kind in _STEP_KINDS if getattr(self, attr) is not None]
        if len(present) != 1:
            allowed = ", ".join(kind for _, kind in _STEP_KINDS)
            got = ", ".join(present) if present else "none"
            raise ValueError(f"must set exactly one of {allowed} (got {got})")
        if self.select is not None and len(set(self.select)) != len(self.select):
            raise LocatedError(("select",), "lists a field twice")
        if self.rename is not None:
            targets = list(self.rename.values())
            if len(set(targets)) != len(targets):
                raise LocatedError(("rename",), "renames two fields to the same name")
            for old, new in self.rename.items():
                if old == new:
                    raise LocatedError(("rename", old), "renames a field to itself")
        return self


# --------------------------------------------------------------------------- sinks
