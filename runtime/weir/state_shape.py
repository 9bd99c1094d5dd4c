"""State shapes: what a job's keyed state means (from the spec) and whether one shape's state fits another.

A checkpoint or savepoint holds, per task, the keyed stage's state: window accumulators (one
slot per aggregate output) or a process function's keyed state. That state only means
something to a pipeline with the same keyed stage: keyed the same way (and read from the same
repartition topic, where stage 2 keeps its state), with the same windows, and with each
aggregate output computed by the same function from the same field. ``StateShape`` is that
description, taken from the spec alone (function references stay strings, nothing is
imported), so the operator can judge a spec change before it stops anything and the runtime
can refuse a snapshot written for another pipeline.

``compare`` says what restoring ``old``'s state into ``new`` means:

- ``same``: identical shapes;
- ``migrate``: the same keyed stage whose aggregate outputs differ only by added and removed
  names (or their order): slots are matched by output name, an added output starts empty in
  the windows open at the upgrade, a removed one's slot is dropped;
- ``incompatible``: anything else (window type/size/slide/gap, the key, an output's function
  or field, the process function, state appearing or disappearing, a join step's table topic,
  lookup key or mode, a join added or removed).

Join steps (``weir.spec_join``) keep state of their own in the keyed stage: the table's
versions and the stream records held for it, per join in order (its position among the
joins, not its step index, names its store). That state means something only for the same
table topic, looked up by the same key, partitioned the same way. A join added or removed is
incompatible too (conservative: a removed join's held records would be lost; an added one
could start empty and bootstrap from its topic, which a later change may allow as a migration).

Pure: imports only the ``weir.spec*`` models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from weir.spec_pipeline import Stages

__all__ = ["JoinShape", "Output", "StateShape", "Verdict", "compare", "shape_of"]

Stage = Literal["window", "process", "none"]
_STAGES: tuple[Stage, ...] = ("window", "process", "none")
_WINDOW_MEMBERS = ("type", "size", "slide", "gap")
"""The window settings that change what a window's state covers. ``allowedLateness`` and
``emit`` are left out on purpose: they change when a window closes or is written, not what
its accumulator holds."""
_DURATION_MEMBERS = frozenset({"size", "slide", "gap"})
_PRIMITIVES = (str, int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class Output:
    """One aggregate output, which is one accumulator slot."""

    name: str
    """The output field name (slots are matched by it)."""
    fn: str
    """``count``, ``sum``, ``min``, ``max``, ``avg``, ``count_distinct``, ``first``, ``last``, or
    ``custom:<package.module:Class>`` for a user aggregate."""
    field: str | None
    """The input field it reads (None for ``count`` and a custom aggregate fed whole records)."""
    params: tuple[tuple[str, Any], ...] = ()
    """Any other setting that changes the accumulator, as sorted (name, JSON primitive) pairs.
    No aggregate has one today; a future one (a percentile's q) goes here."""


@dataclass(frozen=True, slots=True)
class JoinShape:
    """What one join step's state means."""

    topic: str
    """The table topic."""
    key: str
    """What the lookup key is: ``key`` (the record's key in the keyed stage) or ``field:<f>``."""
    mode: str
    """``global`` (the whole table per task) or ``copartitioned`` (the same-numbered partition)."""

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "mode": self.mode, "topic": self.topic}


@dataclass(frozen=True, slots=True)
class StateShape:
    """What a job's keyed state means (see the module docstring)."""

    stage: Stage
    """The keyed stage: ``window`` (window + aggregate), ``process`` or ``none`` (stateless)."""
    key: str
    """How the keyed stage is keyed: ``messageKey``, ``sourceField:<f>@<repartition topic>``,
    ``keyBy:<f>@<repartition topic>`` (``none`` for a stateless job). The repartition topic's
    name holds the job name and the step index, and stage 2 keeps its state per partition of
    that topic: a savepoint restored into a renamed job must not match silently."""
    window: tuple[tuple[str, Any], ...] = ()
    """``("type", "tumbling")``, then those of ``("size", ms)``, ``("slide", ms)``, ``("gap", ms)``
    that the window has."""
    outputs: tuple[Output, ...] = ()
    """The aggregate outputs in spec order (the order matters to ``same``, not to ``migrate``)."""
    process: str | None = None
    """The process function reference ``package.module:Class``."""
    joins: tuple[JoinShape, ...] = ()
    """The join steps in order (a pipeline with joins and no window or process has stage
    ``none`` and is still stateful: ``stateful``)."""

    @property
    def stateful(self) -> bool:
        """Whether the keyed stage keeps state (a window, a process function or a join)."""
        return self.stage != "none" or bool(self.joins)

    def to_json(self) -> dict[str, Any]:
        """A stable JSON object (JSON primitives, containers; keys in sorted order) for manifests.
        ``joins`` is written only when there are some, so shapes without joins read as before."""
        joins = {"joins": [j.to_json() for j in self.joins]} if self.joins else {}
        return {
            **joins,
            "key": self.key,
            "outputs": [
                {"field": o.field, "fn": o.fn, "name": o.name, "params": dict(sorted(o.params))}
                for o in self.outputs
            ],
            "process": self.process,
            "stage": self.stage,
            "window": dict(sorted(self.window)),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StateShape:
        """The shape ``to_json`` wrote. Keys it does not know (from a newer writer) are ignored;
        a missing or malformed known key raises ``ValueError`` naming it (``stateShape.<key>``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"stateShape: must be an object (got {_short(data)})")
        stage = data.get("stage")
        if stage not in _STAGES:
            raise ValueError(f"stateShape.stage: must be one of {', '.join(_STAGES)} (got {_short(stage)})")
        key = _required_str(data, "key")
        window_data = data.get("window", {})
        if not isinstance(window_data, Mapping):
            raise ValueError(f"stateShape.window: must be an object (got {_short(window_data)})")
        window = []
        for member in _WINDOW_MEMBERS:
            if member not in window_data:
                continue
            value = window_data[member]
            wanted, what = (str, "a string") if member == "type" else (int, "an integer of milliseconds")
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"stateShape.window.{member}: must be {what} (got {_short(value)})")
            window.append((member, value))
        outputs_data = data.get("outputs", [])
        if not isinstance(outputs_data, list):
            raise ValueError(f"stateShape.outputs: must be a list (got {_short(outputs_data)})")
        outputs = tuple(_output_from_json(i, item) for i, item in enumerate(outputs_data))
        process = data.get("process")
        if process is not None and not isinstance(process, str):
            raise ValueError(f"stateShape.process: must be a string or null (got {_short(process)})")
        joins_data = data.get("joins", [])
        if not isinstance(joins_data, list):
            raise ValueError(f"stateShape.joins: must be a list (got {_short(joins_data)})")
        joins = tuple(_join_from_json(i, item) for i, item in enumerate(joins_data))
        return cls(cast(Stage, stage), key, tuple(window), outputs, process, joins)

    def describe(self) -> str:
        """One line for logs and errors, e.g. ``window tumbling 1m by keyBy:user; outputs n=count,
        s=sum(amount)`` (the repartition topic is left out: ``key`` has it)."""
        if not self.stateful:
            return "stateless (no keyed state)"
        by = f"by {self.key.partition('@')[0]}"
        joins = "".join(f"join {j.topic} ({j.mode}, {j.key}) then " for j in self.joins)
        if self.stage == "none":
            return f"{joins.removesuffix(' then ')} {by}"
        if self.stage == "process":
            return f"{joins}process {self.process} {by}"
        window = dict(self.window)
        sizes = " ".join(
            f"{m} {_duration(window[m])}" if m != "size" else _duration(window[m])
            for m in ("size", "slide", "gap")
            if m in window
        )
        outputs = ", ".join(f"{o.name}={_describe_fn(o)}" for o in self.outputs)
        return f"{joins}window {window.get('type')} {sizes} {by}; outputs {outputs}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What restoring one shape's state into another means (``compare``)."""

    kind: Literal["same", "migrate", "incompatible"]
    """``same``, ``migrate`` (outputs added/removed: slots matched by name) or ``incompatible``."""
    changes: tuple[str, ...] = ()
    """One line per difference, naming the field path the user edits
    (``pipeline.window.size: 1m -> 5m``). For ``incompatible``, only the differences that make
    it so; for ``migrate``, the added and removed outputs and what happens to their state."""

    @property
    def compatible(self) -> bool:
        """Whether the old state can be restored (as is or migrated)."""
        return self.kind != "incompatible"


def shape_of(stages: Stages, namespace: str, name: str) -> StateShape:
    """The state shape of a pipeline executing as ``stages`` in job ``namespace/name``.

    From the spec alone: function references are kept as strings and never imported, so the
    operator can call it, and the runtime calls it with the ``Stages`` its compiled pipeline
    came from (entrypoint jobs too).
    """
    if not stages.stateful:
        return StateShape("none", "none")
    topic = stages.repartition.topic(namespace, name) if stages.repartition is not None else None
    if stages.key_from == "messageKey":
        key = "messageKey"
    else:
        prefix = "keyBy" if stages.key_from == "keyByField" else "sourceField"
        key = f"{prefix}:{stages.key_field}" + (f"@{topic}" if topic is not None else "")
    joins = tuple(
        JoinShape(j.topic, "key" if j.key is None else f"field:{j.key}", j.mode) for _, j in stages.joins
    )
    if stages.terminal == "none":
        return StateShape("none", key, joins=joins)
    if stages.terminal == "process":
        assert stages.process is not None  # a process terminal has its step
        return StateShape("process", key, process=stages.process.function, joins=joins)
    window, aggregate = stages.window, stages.aggregate
    assert window is not None and aggregate is not None  # a window terminal has both
    members = tuple(
        (member, getattr(window, member)) for member in _WINDOW_MEMBERS if getattr(window, member) is not None
    )
    outputs = tuple(
        Output(name, f"custom:{o.function}" if o.fn == "custom" else o.fn, o.field)
        for name, o in aggregate.outputs.items()
    )
    return StateShape("window", key, members, outputs, joins=joins)


def compare(old: StateShape, new: StateShape) -> Verdict:
    """What restoring ``old``'s state into a pipeline of shape ``new`` means (module docstring).

    A stateless shape on either side is ``incompatible`` unless both are stateless: state would
    be dropped, or would start empty where a job had none (the user opts in to that, too).
    """
    if old == new:
        return Verdict("same")
    if old.stage != new.stage or old.stateful != new.stateful:
        return Verdict("incompatible", (f"stage: {_stage_text(old)} -> {_stage_text(new)}",))
    broken = [
        *_key_changes(old.key, new.key),
        *_join_changes(old.joins, new.joins),
        *_window_changes(old.window, new.window),
    ]
    if old.process != new.process:
        broken.append(f"pipeline.process.function: {old.process} -> {new.process}")
    before = {o.name: o for o in old.outputs}
    after = {o.name: o for o in new.outputs}
    for name in (n for n in after if n in before):
        broken += _output_changes(before[name], after[name])
    if broken:
        return Verdict("incompatible", tuple(broken))
    migrations = [
        *(
            f"pipeline.aggregate.{n}: added (starts empty in windows open at the upgrade)"
            for n in after
            if n not in before
        ),
        *(f"pipeline.aggregate.{n}: removed (its state is dropped)" for n in before if n not in after),
    ]
    if not migrations:
        migrations.append("pipeline.aggregate: outputs reordered (slots are matched by name)")
    return Verdict("migrate", tuple(migrations))


# --------------------------------------------------------------------------- helpers


def _key_changes(old: str, new: str) -> list[str]:
    if old == new:
        return []
    old_by, _, old_topic = old.partition("@")
    new_by, _, new_topic = new.partition("@")
    path = "pipeline.keyBy" if "keyBy:" in old_by + new_by else "pipeline.source.key"
    if old_by != new_by:
        return [f"{path}: {_key_text(old_by)} -> {_key_text(new_by)}"]
    return [
        f"{path}: repartition topic {old_topic} -> {new_topic} (the job was renamed, or a step was "
        "added or removed before the shuffle; stage-2 state lives under the topic)"
    ]


def _stage_text(shape: StateShape) -> str:
    if shape.stage == "none" and shape.joins:
        return "join"
    return shape.stage


def _join_changes(old: tuple[JoinShape, ...], new: tuple[JoinShape, ...]) -> list[str]:
    if len(old) != len(new):
        return [
            f"pipeline.steps.join: {len(old)} -> {len(new)} join steps (a join's table and held "
            "records belong to its place among the joins)"
        ]
    lines = []
    for position, (a, b) in enumerate(zip(old, new, strict=True)):
        where = f"pipeline.steps.join (join {position + 1})"
        for member in ("topic", "key", "mode"):
            before, after = getattr(a, member), getattr(b, member)
            if before != after:
                lines.append(f"{where}.{member}: {before} -> {after}")
    return lines


def _key_text(by: str) -> str:
    kind, _, field = by.partition(":")
    if kind == "messageKey":
        return "message key"
    return field if kind == "keyBy" else f"source key {field}"


def _window_changes(old: tuple[tuple[str, Any], ...], new: tuple[tuple[str, Any], ...]) -> list[str]:
    before, after = dict(old), dict(new)
    lines = []
    for member in _WINDOW_MEMBERS:
        a, b = before.get(member), after.get(member)
        if a != b:
            lines.append(f"pipeline.window.{member}: {_member_text(member, a)} -> {_member_text(member, b)}")
    return lines


def _member_text(member: str, value: Any) -> str:
    if value is None:
        return "(none)"
    return _duration(value) if member in _DURATION_MEMBERS else str(value)


def _output_changes(old: Output, new: Output) -> list[str]:
    where = f"pipeline.aggregate.{new.name}"
    lines = []
    if old.fn != new.fn:
        if old.fn.startswith("custom:") and new.fn.startswith("custom:"):
            lines.append(f"{where}.function: {old.fn[7:]} -> {new.fn[7:]}")
        else:
            lines.append(f"{where}.fn: {old.fn} -> {new.fn}")
    if old.field != new.field:
        lines.append(f"{where}.field: {old.field or '(none)'} -> {new.field or '(none)'}")
    before, after = dict(old.params), dict(new.params)
    for param in sorted(before.keys() | after.keys()):
        if before.get(param) != after.get(param):
            lines.append(f"{where}.{param}: {before.get(param)} -> {after.get(param)}")
    return lines


def _describe_fn(output: Output) -> str:
    params = "".join(f", {k}={v}" for k, v in output.params)
    return f"{output.fn}({output.field}{params})" if output.field is not None or params else output.fn


_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000))


def _duration(millis: int) -> str:
    """``60000`` -> ``1m``: the largest unit that divides it, as a manifest would write it."""
    for unit, size in _UNITS:
        if millis and millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


def _output_from_json(index: int, item: object) -> Output:
    where = f"stateShape.outputs[{index}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: must be an object (got {_short(item)})")
    name = _required_str(item, "name", where)
    fn = _required_str(item, "fn", where)
    field = item.get("field")
    if field is not None and not isinstance(field, str):
        raise ValueError(f"{where}.field: must be a string or null (got {_short(field)})")
    params = item.get("params", {})
    if not isinstance(params, Mapping) or not all(
        isinstance(k, str) and isinstance(v, _PRIMITIVES) for k, v in params.items()
    ):
        raise ValueError(f"{where}.params: must be an object of JSON scalars (got {_short(params)})")
    return Output(name, fn, field, tuple(sorted(params.items())))


def _join_from_json(index: int, item: object) -> JoinShape:
    where = f"stateShape.joins[{index}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: must be an object (got {_short(item)})")
    return JoinShape(
        _required_str(item, "topic", where),
        _required_str(item, "key", where),
        _required_str(item, "mode", where),
    )


def _required_str(data: Mapping[str, Any], key: str, where: str = "stateShape") -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key}: must be a non-empty string (got {_short(value)})")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
