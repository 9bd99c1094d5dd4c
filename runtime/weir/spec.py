"""The StreamJob pipeline spec: pydantic models (the source of truth), validation messages, loading.

The models describe what a user writes under ``spec`` of a ``weir.dev/v1alpha1`` StreamJob.
YAML and JSON keys are camelCase; Python attributes are snake_case (both are accepted when
constructing a model). Every model is frozen and forbids unknown keys, so a typo is an
error instead of a silently ignored setting. The CRD's OpenAPI schema is generated from
these models, which is why each step is a flat object with optional members (a
"structural" schema) rather than a ``oneOf`` of differently shaped objects.

Exceptions::

    ValueError
     └── SpecError          a manifest or pipeline is invalid; ``str()`` names each bad field path
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeAlias, runtime_checkable

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_PARALLELISM",
    "MAX_STEPS",
    "RESERVED_LABEL_PREFIX",
    "WORKER_ENV_PREFIX",
    "Aggregate",
    "AutoscalerSpec",
    "CheckpointCredentials",
    "CheckpointSpec",
    "Condition",
    "DeadLetterSink",
    "DeliveryGuarantee",
    "Duration",
    "EnvVar",
    "EventTime",
    "FieldScope",
    "Job",
    "JobSpec",
    "JobState",
    "KafkaSasl",
    "KafkaSpec",
    "KafkaTls",
    "KeyBy",
    "KubernetesObject",
    "LocalObjectReference",
    "ObjectMeta",
    "ObjectName",
    "Output",
    "Pipeline",
    "PipelineLike",
    "Plan",
    "PodTemplate",
    "PositiveDuration",
    "Quantity",
    "Repartition",
    "Resources",
    "SecretKey",
    "SecretKeyRef",
    "SecurityProtocol",
    "Sink",
    "Source",
    "SourceKey",
    "SpecError",
    "Step",
    "StreamJob",
    "Toleration",
    "UpgradeMode",
    "Watermark",
    "Window",
    "as_pipeline",
    "format_validation_error",
    "load_job",
    "parse_duration",
    "parse_manifest",
]

API_VERSION = "weir.dev/v1alpha1"
KIND = "StreamJob"

MAX_PARALLELISM = 1024
"""The most workers a job may ask for (``parallelism``, the autoscaler's bounds).

A worker owns whole input partitions, so more workers than the largest input topic has
partitions only sit idle (the operator caps a job at its partition count once the workers
report it). 1024 is above the partition count of nearly every topic (Kafka sizes partitions
per cluster and broker: thousands per broker, rarely more than a few hundred per topic),
and at it the operator already polls 1024 control APIs per resync and a savepoint waits for
1024 answers; a million workers is a typo, refused at ``kubectl apply``.
"""


class SpecError(ValueError):
    """A StreamJob manifest or pipeline is invalid.

    ``str(error)`` is one line per problem, each starting with the field path
    (``spec.pipeline.steps[2].window.type: must be one of ...``); ``lines`` holds them.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


class _LocatedError(ValueError):
    """A validator's error about a member below the model being validated.

    Pydantic reports a model validator's error at the model itself; this carries the
    relative path so that ``format_validation_error`` can point at the member at fault.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


# --------------------------------------------------------------------------- durations

_DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION_PATTERN = r"^[0-9]+(ms|s|m|h|d)$"
_DURATION_RE = re.compile(r"([0-9]+)(ms|s|m|h|d)")


def parse_duration(value: object) -> int:
    """Return ``value`` as whole milliseconds.

    Accepts a string of digits and one unit (``250ms``, ``5s``, ``1m``, ``2h``, ``1d``) or a
    non-negative integer meaning milliseconds. Raises ``ValueError`` for anything else,
    including booleans and floats (a float is almost always a unit mistake).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative (got {value!r})")
        return value
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is not None:
            return int(match.group(1)) * _DURATION_UNITS_MS[match.group(2)]
    raise ValueError(
        f"must be a duration like 250ms, 5s, 1m, 2h, 1d or an integer of milliseconds (got {value!r})"
    )


def _parse_positive_duration(value: object) -> int:
    millis = parse_duration(value)
    if millis == 0:
        raise ValueError(f"must be a positive duration (got {value!r})")
    return millis


# Kubernetes' structural schemas express "string or integer" only as int-or-string; the CRD
# generator (weir_operator.crd) reduces the anyOf to its bare types and hoists the constraints.
_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _DURATION_PATTERN}],
    "x-kubernetes-int-or-string": True,
}

Duration = Annotated[int, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""Milliseconds; written as ``"250ms"``, ``"5s"``, ``"1m"``, ``"2h"``, ``"1d"`` or an integer."""

PositiveDuration = Annotated[int, BeforeValidator(_parse_positive_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""A ``Duration`` that must be greater than zero."""

# Kafka's legal topic names: at most 249 of these characters.
_TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
TopicName = Annotated[str, Field(pattern=_TOPIC_PATTERN)]
FieldName = Annotated[str, Field(min_length=1)]

# A JSON scalar a condition compares with; JSON has no NaN or infinity, and YAML's .inf
# would make comparisons meaningless, so they are rejected.
_SCALAR_TYPES = (str, int, float, bool, type(None))


class _Model(BaseModel):
    """Base of every spec model: frozen, unknown keys rejected, camelCase aliases."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


# --------------------------------------------------------------------------- source

TimeFormat: TypeAlias = Literal["epochMillis", "epochSeconds", "iso8601"]


class EventTime(_Model):
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
            raise _LocatedError(("format",), "only applies with field (the Kafka timestamp has no format)")
        return self


class SourceKey(_Model):
    """The record field that keys records, instead of the Kafka message key."""

    field: FieldName
    """Field of the decoded source record (string or integer values)."""


class Source(_Model):
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
                raise _LocatedError(("eventTime", "field"), "a raw record has only the field 'value'")
            if event_time is not None and event_time.field is not None and event_time.format != "iso8601":
                raise _LocatedError(("eventTime", "format"), "a raw value is text: only iso8601 applies")
            if self.key is not None and self.key.field != "value":
                raise _LocatedError(("key", "field"), "a raw record has only the field 'value'")
        return self


class Watermark(_Model):
    """How event time progresses per input partition."""

    max_out_of_orderness: Duration = 0
    """How far behind the largest event time seen a record may be and still be on time."""
    idle_timeout: Duration = 0
    """After this long without records a partition stops holding the watermark back;
    0 (the default, as in Flink) never marks a partition idle."""


# --------------------------------------------------------------------------- steps

ConditionOp: TypeAlias = Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "notIn", "exists"]
_ORDERING_OPS = frozenset({"lt", "le", "gt", "ge"})
_SET_OPS = frozenset({"in", "notIn"})

# The API server cannot describe "any JSON scalar or a list of them" structurally.
_VALUE_SCHEMA: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class Condition(_Model):
    """A filter condition: a comparison (``field`` + ``op`` [+ ``value``]) or exactly one
    of ``and``, ``or``, ``not``.

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
            )
            if present
        ]
        if len(set_forms) != 1:
            got = ", ".join(set_forms) if set_forms else "none"
            raise ValueError(f"must be exactly one of a comparison (field/op), and, or, not (got {got})")
        if set_forms[0] == "field/op":
            self._check_comparison()
        elif self.value is not None:
            raise _LocatedError(("value",), "only applies to a comparison (field/op)")
        return self

    def _check_comparison(self) -> None:
        if self.field is None:
            raise _LocatedError(("field",), "required field is missing")
        if self.op is None:
            raise _LocatedError(("op",), "required field is missing")
        value = self.value
        if self.op in _SET_OPS:
            if not isinstance(value, tuple):
                raise _LocatedError(("value",), f"must be a list for {self.op} (got {value!r})")
        elif isinstance(value, tuple):
            raise _LocatedError(("value",), f"must be a single value for {self.op} (got a list)")
        elif self.op == "exists" and value is not None:
            raise _LocatedError(("value",), "must be omitted for exists")
        elif self.op in _ORDERING_OPS and (
            value is None or isinstance(value, bool) or not isinstance(value, str | int | float)
        ):
            raise _LocatedError(("value",), f"must be a number or a string for {self.op} (got {value!r})")


def _check_scalar(value: object) -> None:
    if not isinstance(value, _SCALAR_TYPES):
        raise ValueError(f"must be a string, number, boolean or null (got {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")


class KeyBy(_Model):
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
            raise _LocatedError(("partitions",), "only applies to keyBy field (messageKey: no repartition)")
        return self


WindowType: TypeAlias = Literal["tumbling", "sliding", "session"]


class Window(_Model):
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
    """How far apart sliding windows start; at most ``size``."""
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
                raise _LocatedError((name,), f"is required for a {self.type} window")
            if name not in needed and present:
                allowed = ", ".join(needed)
                raise _LocatedError((name,), f"does not apply to a {self.type} window (it takes {allowed})")
        slide, size = self.slide, self.size
        if self.type == "sliding" and slide is not None and size is not None and slide > size:
            raise _LocatedError(("slide",), f"must not exceed size ({self.slide} ms > {self.size} ms)")
        return self


AggregateFn: TypeAlias = Literal["count", "sum", "min", "max", "avg", "count_distinct", "first", "last"]
NUMERIC_FNS: frozenset[str] = frozenset({"sum", "min", "max", "avg"})
"""Aggregate functions whose field must hold a number (int or float, never a boolean)."""


RESERVED_OUTPUT_NAMES: frozenset[str] = frozenset(
    {"key", "windowStart", "windowEnd", "windowStartMs", "windowEndMs", "final"})
"""Names every result record already carries, so no aggregate output may take them."""


class Output(_Model):
    """One aggregate output: ``count`` of records, ``sum``/``min``/``max``/``avg`` of a numeric
    field, ``count_distinct`` values of a field, or the ``first``/``last`` value of a field by
    event time."""

    fn: AggregateFn
    """The aggregate function."""
    field: FieldName | None = None
    """Record field the function reads (numbers only for sum/min/max/avg); not used by ``count``."""

    @model_validator(mode="after")
    def _field_matches_fn(self) -> Output:
        if self.fn == "count" and self.field is not None:
            raise _LocatedError(("field",), "does not apply to count (it counts records)")
        if self.fn != "count" and self.field is None:
            raise _LocatedError(("field",), f"is required for {self.fn}")
        return self


class Aggregate(_Model):
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
                raise _LocatedError(
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


StepKind: TypeAlias = Literal["filter", "select", "rename", "keyBy", "window", "aggregate"]
_STEP_KINDS: tuple[tuple[str, StepKind], ...] = (
    ("filter", "filter"),
    ("select", "select"),
    ("rename", "rename"),
    ("key_by", "keyBy"),
    ("window", "window"),
    ("aggregate", "aggregate"),
)


class Step(_Model):
    """One pipeline step; exactly one member is set."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.filter), has(self.select), has(self.rename), has(self.keyBy), "
                    "has(self.window), has(self.aggregate)].exists_one(x, x)",
                    "message": "must set exactly one of filter, select, rename, keyBy, window, aggregate",
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
    key_by: KeyBy | None = None
    """Re-key records; a field key means a repartition through Kafka."""
    window: Window | None = None
    """Group records into event-time windows."""
    aggregate: Aggregate | None = None
    """Compute the outputs per key and window."""

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
            raise _LocatedError(("select",), "lists a field twice")
        if self.rename is not None:
            targets = list(self.rename.values())
            if len(set(targets)) != len(targets):
                raise _LocatedError(("rename",), "renames two fields to the same name")
            for old, new in self.rename.items():
                if old == new:
                    raise _LocatedError(("rename", old), "renames a field to itself")
        return self


# --------------------------------------------------------------------------- sinks


class Sink(_Model):
    """Where window results go."""

    topic: TopicName
    """Output topic (JSON values, keyed by the group key)."""


class DeadLetterSink(_Model):
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


@dataclass(frozen=True, slots=True)
class Plan:
    """How a validated pipeline executes: where the key comes from and where the stages split.

    Without ``repartition`` one stage reads the source, prepares records and windows them.
    With it, stage 1 prepares records and forwards them keyed to the repartition topic, and
    stage 2 reads that topic and windows them.
    """

    key_from: Literal["messageKey", "sourceField", "keyByField"]
    """``messageKey``: the Kafka message key. ``sourceField``: ``source.key.field`` of the
    decoded source record. ``keyByField``: the keyBy field after the steps before it."""
    key_field: str | None
    """The field for ``sourceField``/``keyByField``, else None."""
    repartition: Repartition | None
    window_index: int
    window: Window
    aggregate: Aggregate


MAX_STEPS = 100
"""Most steps a pipeline may have. The bound lets the API server cost the per-step CEL rules."""


class Pipeline(_Model):
    """A complete pipeline: source → steps → sink.

    Steps run in order: any filter/select/rename, then at most one keyBy, then exactly one
    window immediately followed by the one aggregate. Fields read by a step must still exist
    after the select and rename steps before it.
    """

    source: Source
    """Input topics and decoding."""
    watermark: Watermark = Watermark()
    """Event-time progress."""
    steps: Annotated[tuple[Step, ...], Field(max_length=MAX_STEPS)]
    """The processing steps, in order (at most 100)."""
    sink: Sink
    """Where window results go."""
    dead_letter: DeadLetterSink | None = None
    """Where bad records go; omitted means ``weir-<namespace>-<name>-dlq``."""

    @model_validator(mode="after")
    def _steps_in_order(self) -> Pipeline:
        _check_step_order(self.steps)
        _check_field_references(self.source, self.steps)
        return self

    def plan(self) -> Plan:
        """The execution plan of this pipeline (derived, not stored)."""
        window_index = next(i for i, s in enumerate(self.steps) if s.window is not None)
        window = self.steps[window_index].window
        aggregate = self.steps[window_index + 1].aggregate
        assert window is not None and aggregate is not None
        key_by = next(((i, s.key_by) for i, s in enumerate(self.steps) if s.key_by is not None), None)
        if key_by is not None:
            index, spec = key_by
            if spec.field is None:
                return Plan("messageKey", None, None, window_index, window, aggregate)
            return Plan(
                "keyByField", spec.field, Repartition(index, spec.partitions), window_index, window, aggregate
            )
        if self.source.key is not None:
            return Plan(
                "sourceField",
                self.source.key.field,
                Repartition(window_index, None),
                window_index,
                window,
                aggregate,
            )
        return Plan("messageKey", None, None, window_index, window, aggregate)


def _check_step_order(steps: tuple[Step, ...]) -> None:
    first: dict[str, int] = {}
    for index, step in enumerate(steps):
        kind = step.kind
        if kind in ("keyBy", "window", "aggregate") and kind in first:
            raise _LocatedError(
                ("steps", index, kind), f"only one {kind} step is allowed (steps[{first[kind]}] is one)"
            )
        if kind in ("filter", "select", "rename"):
            for later in ("keyBy", "window", "aggregate"):
                if later in first:
                    raise _LocatedError(
                        ("steps", index, kind),
                        f"{kind} must come before keyBy and window (steps[{first[later]}] is a {later})",
                    )
        if kind == "keyBy" and "window" in first:
            raise _LocatedError(("steps", index, kind), "keyBy must come before the window")
        if kind == "aggregate" and first.get("window") != index - 1:
            raise _LocatedError(("steps", index, kind), "aggregate must immediately follow the window step")
        first.setdefault(kind, index)
    if "window" not in first:
        raise _LocatedError(("steps",), "a window step is required")
    if "aggregate" not in first:
        raise _LocatedError(
            ("steps",), f"an aggregate step is required right after the window (steps[{first['window']}])"
        )


def _check_field_references(source: Source, steps: tuple[Step, ...]) -> None:
    scope = FieldScope(raw=source.format == "raw")

    def check(loc: tuple[str | int, ...], name: str) -> None:
        try:
            scope.source_of(name)
        except ValueError as exc:
            raise _LocatedError(loc, str(exc)) from None

    for index, step in enumerate(steps):
        here: tuple[str | int, ...] = ("steps", index, step.kind)
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

# Properties the runtime sets itself: overriding them would break offsets, exactly-once
# delivery or the consumer group that lag is measured on.
_RUNTIME_OWNED_KAFKA_PROPERTIES = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "isolation.level",
        "transactional.id",
        "enable.idempotence",
    }
)
_SECRET_PROPERTY_RE = re.compile(r"password|secret|ssl\.key\.pem|sasl\.jaas\.config")

_KAFKA_PROPERTIES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {"x-kubernetes-int-or-string": True},
}


def _check_kafka_properties(value: dict[str, Any]) -> dict[str, Any]:
    for name, prop in value.items():
        if name in _RUNTIME_OWNED_KAFKA_PROPERTIES:
            raise _LocatedError((name,), "is set by the weir runtime and must not be given here")
        if _SECRET_PROPERTY_RE.search(name):
            raise _LocatedError(
                (name,), "is a secret: secrets never go in a StreamJob; workers get them from the environment"
            )
        if not isinstance(prop, str | int | bool):
            raise _LocatedError((name,), f"must be a string, integer or boolean (got {prop!r})")
    return value


KafkaProperties = Annotated[dict[str, Any], WithJsonSchema(_KAFKA_PROPERTIES_SCHEMA)]

_ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"

# --------------------------------------------------------------------------- Kubernetes references

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
ObjectName = Annotated[str, Field(pattern=_DNS_SUBDOMAIN, max_length=253)]
"""The name of a Kubernetes object such as a Secret (a DNS subdomain)."""
SecretKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
"""A key of a Secret's data."""


class SecretKeyRef(_Model):
    """One key of a Secret in the StreamJob's namespace. Only the reference is stored: workers
    receive the value as an environment variable (``secretKeyRef``) or a mounted file."""

    name: ObjectName
    """Name of the Secret."""
    key: SecretKey
    """Key within the Secret."""




class KafkaSasl(_Model):
    """SASL authentication to the brokers; the username and password come from Secrets.

    Workers receive them as the environment variables ``WEIR_KAFKA_SASL_USERNAME`` and
    ``WEIR_KAFKA_SASL_PASSWORD`` (``secretKeyRef``), never through the StreamJob or its ConfigMap.
    """

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    """The SASL mechanism (librdkafka ``sasl.mechanism``)."""
    username_secret: SecretKeyRef
    """Secret key holding the username."""
    password_secret: SecretKeyRef
    """Secret key holding the password."""


class KafkaTls(_Model):
    """TLS to the brokers. An empty object means TLS verified against the image's system CAs.

    Workers find each PEM file at the path named by ``WEIR_KAFKA_SSL_CA_LOCATION``,
    ``WEIR_KAFKA_SSL_CERTIFICATE_LOCATION`` and ``WEIR_KAFKA_SSL_KEY_LOCATION`` (mounted
    from the Secrets), and the key's password in ``WEIR_KAFKA_SSL_KEY_PASSWORD``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.certSecret) == has(self.keySecret)",
                    "message": "certSecret and keySecret go together (mutual TLS needs both)",
                },
                {
                    "rule": "!has(self.keyPasswordSecret) || has(self.keySecret)",
                    "message": "keyPasswordSecret only applies with keySecret",
                },
            ]
        }
    )

    ca_secret: SecretKeyRef | None = None
    """PEM certificate(s) of the CA that signed the brokers' certificates; omitted means the
    system CAs."""
    cert_secret: SecretKeyRef | None = None
    """PEM client certificate for mutual TLS; needs ``keySecret``."""
    key_secret: SecretKeyRef | None = None
    """PEM private key of the client certificate; needs ``certSecret``."""
    key_password_secret: SecretKeyRef | None = None
    """Password of an encrypted ``keySecret``."""

    @model_validator(mode="after")
    def _pairs(self) -> KafkaTls:
        if (self.cert_secret is None) != (self.key_secret is None):
            pair = ("keySecret", "certSecret")
            missing, given = pair if self.key_secret is None else pair[::-1]
            raise _LocatedError((missing,), f"is required with {given} (mutual TLS needs both)")
        if self.key_password_secret is not None and self.key_secret is None:
            raise _LocatedError(("keyPasswordSecret",), "only applies with keySecret")
        return self


SecurityProtocol: TypeAlias = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]

# Properties that kafka.sasl and kafka.tls decide; giving them as well would contradict them.
_SECURITY_KAFKA_PROPERTIES = frozenset(
    {"security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username"}
)


class KafkaSpec(_Model):
    """How workers reach Kafka; secrets are not part of it, only references to them."""

    bootstrap_servers: Annotated[str, Field(min_length=1)]
    """``host:port[,host:port...]`` of the brokers."""
    consumer: KafkaProperties = {}
    """Extra librdkafka consumer properties (string, integer or boolean values)."""
    producer: KafkaProperties = {}
    """Extra librdkafka producer properties (string, integer or boolean values)."""
    sasl: KafkaSasl | None = None
    """SASL authentication; omitted means none."""
    tls: KafkaTls | None = None
    """TLS to the brokers; omitted means plaintext."""

    @field_validator("consumer", "producer")
    @classmethod
    def _properties(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_kafka_properties(value)

    @model_validator(mode="after")
    def _security_set_once(self) -> KafkaSpec:
        if self.sasl is None and self.tls is None:
            return self
        for side, properties in (("consumer", self.consumer), ("producer", self.producer)):
            for name in properties:
                if name in _SECURITY_KAFKA_PROPERTIES or name.startswith("ssl."):
                    raise _LocatedError((side, name), "is decided by kafka.sasl / kafka.tls; remove it here")
        return self

    @property
    def security_protocol(self) -> SecurityProtocol:
        """librdkafka ``security.protocol`` implied by ``sasl`` and ``tls``."""
        if self.sasl is not None:
            return "SASL_SSL" if self.tls is not None else "SASL_PLAINTEXT"
        return "SSL" if self.tls is not None else "PLAINTEXT"


# --------------------------------------------------------------------------- checkpoints

# s3://bucket[/prefix] with S3's bucket naming rules, or an absolute file:// path.
_STORE_URL_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.*)$"


def _check_store_url(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(_STORE_URL_PATTERN, value):
        raise ValueError(
            f"must be s3://bucket[/prefix] (a valid S3 bucket name) or file:///absolute/path (got {value!r})"
        )
    return value


class CheckpointCredentials(_Model):
    """The Secret with the S3 access key; workers get its values as ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` (``secretKeyRef``)."""

    name: ObjectName
    """Name of the Secret."""
    access_key_id_key: SecretKey = "AWS_ACCESS_KEY_ID"
    """Key holding the access key id."""
    secret_access_key_key: SecretKey = "AWS_SECRET_ACCESS_KEY"
    """Key holding the secret access key."""


class CheckpointSpec(_Model):
    """Where and how often workers checkpoint their state and offsets.

    Checkpoints go to ``<url>/<namespace>/<job>/checkpoints/<id>/`` and savepoints to
    ``<url>/<namespace>/<job>/savepoints/<id>/``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.url.startsWith('s3://') || "
                    "!(has(self.endpoint) || has(self.region) || has(self.credentialsSecret))",
                    "message": "endpoint, region and credentialsSecret only apply to an s3:// url",
                }
            ]
        }
    )

    url: Annotated[str, Field(pattern=_STORE_URL_PATTERN), BeforeValidator(_check_store_url)]
    """The store: ``s3://bucket/prefix`` or ``file:///absolute/path``."""
    interval: PositiveDuration = 10_000
    """Time between checkpoints (default 10s)."""
    retain: Annotated[int, Field(ge=1, strict=True)] = 3
    """Completed checkpoints kept per job; older ones are deleted (savepoints are never)."""
    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$")] | None = None
    """S3 endpoint of an S3-compatible server (path-style addressing); omitted means AWS."""
    region: Annotated[str, Field(min_length=1)] | None = None
    """S3 region; omitted means the AWS SDK's default."""
    credentials_secret: CheckpointCredentials | None = None
    """Secret with the S3 access key; omitted means the pod's ambient credentials (e.g. a
    ServiceAccount bound to an IAM role)."""
    cleanup_policy: Literal["retain", "delete"] = "retain"
    """What happens to the job's checkpoints and savepoints when the StreamJob is deleted:
    ``retain`` keeps them; ``delete`` makes the operator hold the StreamJob (a finalizer)
    until its workers have stopped and it has removed ``<url>/<namespace>/<name>/`` with its
    own credentials; a store it cannot reach for 10 minutes is left, with a Warning event."""

    @model_validator(mode="after")
    def _s3_only_members(self) -> CheckpointSpec:
        if not self.url.startswith("s3://"):
            for name in ("endpoint", "region", "credentials_secret"):
                if getattr(self, name) is not None:
                    alias = to_camel(name)
                    raise _LocatedError((alias,), "only applies to an s3:// url")
        return self


# --------------------------------------------------------------------------- pods

# Kubernetes' resource.Quantity syntax (k8s.io/apimachinery/pkg/api/resource).
_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(_QUANTITY_PATTERN)
_QUANTITY_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string", "pattern": _QUANTITY_PATTERN}],
    "x-kubernetes-int-or-string": True,
}


def _check_quantity(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _QUANTITY_RE.fullmatch(value):
        return value
    if isinstance(value, float):
        # The API server takes a quantity as an integer or a string only.
        raise ValueError(f"write a fractional quantity as a string, e.g. '{value}' or '500m' (got {value!r})")
    raise ValueError(f"must be a quantity such as 500m, 2, 1.5, 512Mi or 2Gi (got {value!r})")


Quantity = Annotated[int | str, BeforeValidator(_check_quantity), WithJsonSchema(_QUANTITY_SCHEMA)]
"""A Kubernetes resource quantity: an integer or a string such as ``"500m"`` or ``"2Gi"``."""

# A free-form Kubernetes object (an affinity, an EnvVarSource): the models pass it through
# unchanged and the API server validates it where it lands, in the pod template.
_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
KubernetesObject = Annotated[dict[str, Any], WithJsonSchema(_OBJECT_SCHEMA)]


class Resources(_Model):
    """Compute resources of each worker container, as in a Kubernetes container's ``resources``."""

    limits: dict[Annotated[str, Field(min_length=1)], Quantity] = {}
    """Maximum amount per resource (``cpu``, ``memory``, ``ephemeral-storage``, ...)."""
    requests: dict[Annotated[str, Field(min_length=1)], Quantity] = {}
    """Amount per resource the scheduler reserves."""


_ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

WORKER_ENV_PREFIX = "WEIR_"
"""Environment variables starting with this are the operator's way of configuring workers;
``spec.env`` may not set them."""


class EnvVar(_Model):
    """An environment variable of the worker container (a Kubernetes ``EnvVar``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.value) && has(self.valueFrom))",
                    "message": "set value or valueFrom, not both",
                }
            ]
        }
    )

    name: Annotated[str, Field(pattern=_ENV_NAME_PATTERN)]
    """Variable name."""
    value: str | None = None
    """Literal value; never put a secret here, use ``valueFrom.secretKeyRef``."""
    value_from: KubernetesObject | None = None
    """A Kubernetes ``EnvVarSource``: ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` or
    ``resourceFieldRef``."""

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise _LocatedError(("valueFrom",), "set value or valueFrom, not both")
        return self


class Toleration(_Model):
    """A Kubernetes pod toleration."""

    key: str | None = None
    """Taint key; omitted with ``operator: Exists`` tolerates every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """How ``value`` is compared (Kubernetes default ``Equal``)."""
    value: str | None = None
    """Taint value for ``Equal``."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; omitted means all."""
    toleration_seconds: Annotated[int, Field(strict=True)] | None = None
    """For ``NoExecute``: how long the pod stays bound after the taint appears."""


class LocalObjectReference(_Model):
    """A reference to an object by name in the StreamJob's namespace."""

    name: ObjectName
    """The object's name."""


RESERVED_LABEL_PREFIX = "weir.dev/"
"""Labels and annotations under this prefix belong to weir (the StatefulSet selector uses them)."""


class PodTemplate(_Model):
    """Overrides applied to every worker pod."""

    labels: dict[str, str] = {}
    """Extra pod labels (not under ``weir.dev/``)."""
    annotations: dict[str, str] = {}
    """Extra pod annotations (not under ``weir.dev/``)."""
    node_selector: dict[str, str] = {}
    """Node labels a worker's node must have."""
    tolerations: tuple[Toleration, ...] = ()
    """Taints the workers tolerate."""
    affinity: KubernetesObject | None = None
    """A Kubernetes ``Affinity`` (node, pod and pod anti-affinity)."""
    service_account_name: ObjectName | None = None
    """ServiceAccount the workers run as; omitted means the namespace's ``default`` (workers
    need no Kubernetes API access, so no token is mounted unless this is set)."""
    image_pull_secrets: tuple[LocalObjectReference, ...] = ()
    """Secrets for pulling the image from a private registry."""

    @field_validator("labels", "annotations")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise _LocatedError((key,), f"keys under {RESERVED_LABEL_PREFIX} are set by weir")
        return value


# --------------------------------------------------------------------------- autoscaler


class AutoscalerSpec(_Model):
    """Settings of the planned autoscaler: accepted and validated, not acted on yet.

    The operator does not scale jobs by itself yet: ``parallelism`` is what runs, and a job
    with ``enabled: true`` gets a Warning event (``AutoscalerNotImplemented``) saying these
    settings are ignored. The planned behaviour: scale up when utilization exceeds the target
    or lag exceeds a threshold, down slowly, never below ``minParallelism`` or above
    ``maxParallelism``, and only to parallelisms that divide the input partitions evenly.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxParallelism) || "
                    "(has(self.minParallelism) ? self.minParallelism : 1) <= self.maxParallelism",
                    "message": "minParallelism must not exceed maxParallelism",
                    "fieldPath": ".minParallelism",
                }
            ]
        }
    )

    enabled: Annotated[bool, Field(strict=True)] = False
    """Whether the planned autoscaler may change ``parallelism`` (not acted on yet: today
    ``true`` only produces a Warning event that the autoscaler is not implemented)."""
    min_parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM, strict=True)] = 1
    """Lowest parallelism the autoscaler would set."""
    max_parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM, strict=True)] | None = None
    """Highest parallelism the autoscaler would set; omitted means the input partition count."""
    target_utilization: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Busy ratio (0-1] the workers should run at."""
    lag_threshold_records: Annotated[int, Field(ge=0, strict=True)] | None = None
    """Scale up when the consumer lag of a partition exceeds this many records."""
    lag_threshold_time: Duration | None = None
    """Scale up when the time lag (age of the oldest unprocessed record) exceeds this."""
    metrics_window: PositiveDuration = 300_000
    """Window over which rates, lag and utilization are averaged (default 5m)."""
    scale_up_stabilization_window: Duration = 60_000
    """Minimum time between scaling up again (default 1m)."""
    scale_down_stabilization_window: Duration = 900_000
    """Load must stay low this long before scaling down (default 15m)."""
    catch_up_duration: PositiveDuration = 300_000
    """Time in which a scaled job should work off its lag (default 5m)."""

    @model_validator(mode="after")
    def _min_not_above_max(self) -> AutoscalerSpec:
        if self.max_parallelism is not None and self.min_parallelism > self.max_parallelism:
            raise _LocatedError(
                ("minParallelism",),
                f"must not exceed maxParallelism ({self.min_parallelism} > {self.max_parallelism})",
            )
        return self


# --------------------------------------------------------------------------- job spec

UpgradeMode: TypeAlias = Literal["stateless", "savepoint", "last-state"]
JobState: TypeAlias = Literal["running", "suspended"]
DeliveryGuarantee: TypeAlias = Literal["exactly-once", "at-least-once"]


class JobSpec(_Model):
    """A StreamJob ``spec``: what to run, where and how the operator manages it.

    Exactly one of ``pipeline`` (declarative) and ``entrypoint`` (a Python function
    returning a pipeline) is set.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.pipeline) != has(self.entrypoint)",
                    "message": "must set exactly one of pipeline, entrypoint",
                }
            ]
        }
    )

    image: Annotated[str, Field(min_length=1)] | None = None
    """Worker image; omitted means the operator's default worker image. With ``entrypoint``
    the module must be importable in it."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Kubernetes image pull policy; omitted means the Kubernetes default."""
    parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM, strict=True)] = 1
    """Number of workers (1-1024). A worker owns whole input partitions: once the workers
    report the partition counts, a job asking for more workers than its largest input topic
    has partitions runs one worker per partition, with the condition ``Degraded`` (reason
    ``ParallelismCapped``) naming both numbers."""
    resources: Resources | None = None
    """Compute resources of each worker."""
    env: tuple[EnvVar, ...] = ()
    """Extra environment variables of each worker (not starting with ``WEIR_``)."""
    pod_template: PodTemplate | None = None
    """Overrides for the worker pods."""
    kafka: KafkaSpec
    """Kafka connection."""
    pipeline: Pipeline | None = None
    """The declarative pipeline."""
    entrypoint: Annotated[str, Field(pattern=_ENTRYPOINT_PATTERN)] | None = None
    """``package.module:function``; the function takes no arguments and returns a Pipeline
    or a pipeline builder. The module must be importable in the worker image."""
    checkpoint: CheckpointSpec | None = None
    """Checkpoint store and cadence; omitted means no durable state (a restart starts from
    the committed offsets with empty windows)."""
    delivery_guarantee: DeliveryGuarantee = "exactly-once"
    """``exactly-once``: output and offsets commit in one Kafka transaction.
    ``at-least-once``: no transactions; after a failure some results may be written twice."""
    upgrade_mode: UpgradeMode = "savepoint"
    """How a changed spec replaces running workers: ``savepoint`` (stop with a savepoint,
    restore from it), ``last-state`` (restore from the latest checkpoint) or ``stateless``
    (start from the committed offsets without state). Default ``savepoint``, which the API
    server writes into the object."""
    state: JobState = "running"
    """``suspended`` stops the workers (with a savepoint unless ``upgradeMode`` is stateless);
    ``running`` starts them again from it."""
    restart_nonce: Annotated[int, Field(strict=True)] | None = None
    """Change it to restart every worker (using ``upgradeMode``)."""
    savepoint_trigger_nonce: Annotated[int, Field(strict=True)] | None = None
    """Change it to take a savepoint of the running job."""
    autoscaler: AutoscalerSpec | None = None
    """Settings of the planned lag- and utilization-driven autoscaler; accepted but not acted
    on yet (``parallelism`` is what runs)."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: tuple[EnvVar, ...]) -> tuple[EnvVar, ...]:
        seen: set[str] = set()
        for index, var in enumerate(value):
            if var.name.startswith(WORKER_ENV_PREFIX):
                raise _LocatedError(
                    (index, "name"), f"variables starting with {WORKER_ENV_PREFIX} are set by the operator"
                )
            if var.name in seen:
                raise _LocatedError((index, "name"), f"{var.name} is set twice")
            seen.add(var.name)
        return value

    @model_validator(mode="after")
    def _pipeline_or_entrypoint(self) -> JobSpec:
        if (self.pipeline is None) == (self.entrypoint is None):
            got = "both" if self.pipeline is not None else "neither"
            raise ValueError(f"must set exactly one of pipeline, entrypoint (got {got})")
        credentials = self.checkpoint.credentials_secret if self.checkpoint is not None else None
        if credentials is not None:
            for index, var in enumerate(self.env):
                if var.name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    raise _LocatedError(
                        ("env", index, "name"), "is set from checkpoint.credentialsSecret; remove one of them"
                    )
        return self


# --------------------------------------------------------------------------- manifests

class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata weir reads; other keys (labels, uid, ...)
    are ignored because ``kubectl get -o yaml`` output carries many of them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Annotated[str, Field(pattern=_DNS_SUBDOMAIN, max_length=253)]
    namespace: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)] = "default"
    uid: str | None = None
    """Set by the API server; the operator's children name it in their ownerReferences."""


class StreamJob(_Model):
    """A StreamJob manifest as weir reads it; ``status`` is accepted and ignored."""

    api_version: Literal["weir.dev/v1alpha1"]
    kind: Literal["StreamJob"]
    metadata: ObjectMeta
    spec: JobSpec
    status: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A loaded StreamJob: its identity, its spec as written and the pipeline it runs
    (from ``spec.pipeline`` or produced by ``spec.entrypoint``)."""

    name: str
    namespace: str
    spec: JobSpec
    pipeline: Pipeline

    @property
    def consumer_group(self) -> str:
        """Consumer group the job commits its source offsets to."""
        return f"weir-{self.namespace}-{self.name}"

    @property
    def repartition_topic(self) -> str | None:
        """Topic between stage 1 and stage 2, or None when the pipeline has one stage."""
        repartition = self.pipeline.plan().repartition
        if repartition is None:
            return None
        return f"weir-{self.namespace}-{self.name}-{repartition.step_index}-repartition"

    @property
    def dead_letter_topic(self) -> str:
        """``pipeline.deadLetter.topic``, or ``weir-<namespace>-<name>-dlq`` when omitted."""
        if self.pipeline.dead_letter is not None:
            return self.pipeline.dead_letter.topic
        return f"weir-{self.namespace}-{self.name}-dlq"


def parse_manifest(source: str | os.PathLike[str]) -> StreamJob:
    """Validate a StreamJob manifest without importing any entrypoint.

    ``source`` is a path (a ``PathLike``, or a ``str`` without newlines that does not start
    with ``{``) or the manifest text itself (YAML or JSON). Raises ``SpecError``.
    """
    document = _read_document(source)
    try:
        return StreamJob.model_validate(document)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc).splitlines()) from None


def load_job(source: str | os.PathLike[str]) -> Job:
    """Load a StreamJob manifest (see ``parse_manifest``) and resolve its pipeline.

    With ``spec.entrypoint``, imports ``module`` and calls ``function()``, which must return
    a ``Pipeline`` or a builder with ``build()``. Raises ``SpecError`` naming the field.
    """
    manifest = parse_manifest(source)
    spec = manifest.spec
    pipeline = spec.pipeline if spec.pipeline is not None else _resolve_entrypoint(spec.entrypoint or "")
    return Job(manifest.metadata.name, manifest.metadata.namespace, spec, pipeline)


def _read_document(source: str | os.PathLike[str]) -> object:
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        text, origin = source, "manifest"
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
        origin = str(path)
    try:
        if text.lstrip().startswith("{"):
            return orjson.loads(text)
        return yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError([f"{origin}: not valid YAML or JSON ({exc})"]) from None


def _resolve_entrypoint(entrypoint: str) -> Pipeline:
    where = "spec.entrypoint"
    module_name, _, function_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user module may fail to import in any way
        why = f"{type(exc).__name__}: {exc}"
        raise SpecError([f"{where}: cannot import module {module_name!r} ({why})"]) from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise SpecError([f"{where}: module {module_name!r} has no attribute {function_name!r}"])
    if not callable(function):
        raise SpecError([f"{where}: {entrypoint} is not callable"])
    try:
        result = function()
    except SpecError as exc:
        raise SpecError([f"{where}: {entrypoint}() built an invalid pipeline", *exc.lines]) from None
    except Exception as exc:  # any failure of user code becomes a spec error naming it
        raise SpecError([f"{where}: {entrypoint}() raised {type(exc).__name__}: {exc}"]) from exc
    try:
        return as_pipeline(result)
    except SpecError as exc:
        raise SpecError([f"{where}: {entrypoint}() built an invalid pipeline", *exc.lines]) from None
    except TypeError:
        got = type(result).__name__
        raise SpecError(
            [f"{where}: {entrypoint}() must return a weir Pipeline or pipeline builder, not {got}"]
        ) from None


# --------------------------------------------------------------------------- error messages

_MODELS: dict[str, type[BaseModel]] = {}


def _register_models() -> None:
    models = (Pipeline, JobSpec, StreamJob, Step, Condition, Window, Source, KafkaSpec)
    for model in (*models, CheckpointSpec, AutoscalerSpec, PodTemplate):
        _MODELS[model.__name__] = model


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """One line per error: ``<field path>: <what is wrong> (got <value>)``.

    Paths use the YAML names (``spec.pipeline.steps[2].window.type``); enum errors list the
    allowed values; unknown keys say ``unknown field`` and suggest a close known name.
    ``prefix`` is prepended to every path (e.g. ``"spec.pipeline"``).
    """
    root = _MODELS.get(exc.title)
    lines = []
    for error in exc.errors():
        loc: tuple[str | int, ...] = tuple(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx", {})
        if kind == "value_error" and isinstance(ctx.get("error"), _LocatedError):
            located = ctx["error"]
            loc = (*loc, *located.loc)
            message = str(located)
        elif kind in ("value_error", "assertion_error"):
            message = str(ctx.get("error", error["msg"]))
        elif kind == "extra_forbidden":
            message = "unknown field" + _suggestion(root, loc)
        elif kind == "missing":
            message = "required field is missing"
        elif kind in ("literal_error", "enum"):
            allowed = ", ".join(re.findall(r"'((?:[^'\\]|\\.)*)'", str(ctx.get("expected", ""))))
            message = f"must be one of {allowed} (got {_shown(error['input'])})"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be an object (got {_shown(error['input'])})"
        elif kind in ("tuple_type", "list_type"):
            message = f"must be a list (got {_shown(error['input'])})"
        elif kind in ("int_type", "bool_type"):
            wanted = "an integer" if kind == "int_type" else "true or false"
            message = f"must be {wanted} (got {_shown(error['input'])})"
        elif kind == "greater_than_equal":
            message = f"must be >= {ctx.get('ge')} (got {_shown(error['input'])})"
        elif kind == "string_pattern_mismatch":
            message = f"must match {ctx.get('pattern')} (got {_shown(error['input'])})"
        elif kind == "too_short" or (kind == "string_too_short" and ctx.get("min_length") == 1):
            message = f"must not be empty (got {_shown(error['input'])})"
        elif kind == "too_long":
            message = f"must have at most {ctx.get('max_length')} items (got {ctx.get('actual_length')})"
        else:
            message = f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {_shown(error['input'])})"
        path = _format_loc(loc)
        if prefix:
            path = f"{prefix}.{path}" if path and not path.startswith("[") else f"{prefix}{path}"
        lines.append(f"{path or '(top level)'}: {message}")
    return "\n".join(lines)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a message names the bad value, it need not echo a whole object."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(part):
            # Keys such as librdkafka's "group.id" would read as two levels when dotted.
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out


def _suggestion(root: type[BaseModel] | None, loc: tuple[str | int, ...]) -> str:
    if root is None or not loc or not isinstance(loc[-1], str):
        return ""
    known = _known_keys(root, loc[:-1])
    matches = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]}?)" if matches else ""


def _known_keys(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """YAML keys allowed at ``loc`` below ``root``, walking the models' annotations."""
    current: object = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            info = next(
                (f for name, f in current.model_fields.items() if part in (name, f.alias)),
                None,
            )
            current = info.annotation if info is not None else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _unwrap(annotation: object) -> object:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


_register_models()
