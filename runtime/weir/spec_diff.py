"""The one table of spec fields and the kind of change each causes; diff and fingerprint derive from it.

Like the Flink Kubernetes Operator's ``@SpecDiff``, every field of ``JobSpec`` is marked once,
in ``TABLE``, with what a change of it does:

- ``ignore``: operator policy, nothing restarts (``upgradeMode``, ``state``, the nonce that
  triggers a savepoint, the autoscaler's settings, ``checkpoint.cleanupPolicy``);
- ``scale``: ``parallelism``;
- ``pods``: the workers restart, their state is carried over untouched (image, resources,
  Kafka and checkpoint settings, pipeline fields that do not change what state means);
- ``state``: the workers restart and what their state means may change: judged by
  ``weir.state_shape.compare`` (window, keyBy, aggregate outputs, process, the source key,
  a join's table topic, lookup key and mode);
- ``redeploy``: ``restartNonce``, restart every worker even if nothing else changed.

``diff`` lists the fields two specs differ in with their kinds, the largest ``Change`` among
them (changes combine by taking the maximum, like Flink's ``DiffType``) and the state
verdict; ``fingerprint`` hashes every field whose kind is pods, state or redeploy, so two specs
with one fingerprint run the same pods. A test walks the models and fails on a field missing
from ``TABLE`` or an entry naming no field.

Pure: imports only the ``weir.spec*`` models and ``weir.state_shape``.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import orjson

from weir.spec_job import JobSpec
from weir.state_shape import Verdict, compare, shape_of

__all__ = ["TABLE", "Change", "FieldChange", "Kind", "SpecDiff", "diff", "fingerprint", "kind_of"]

Kind: TypeAlias = Literal["ignore", "scale", "pods", "state", "redeploy"]
_KINDS: tuple[Kind, ...] = ("ignore", "scale", "pods", "state", "redeploy")
"""In order of how much of the job they touch (a path covering several takes the largest)."""


class Change(enum.IntEnum):
    """How much of the job a spec change touches; changes combine by taking the maximum."""

    IGNORE = 0
    """Operator policy only (upgradeMode, autoscaler, cleanup policy, savepointTriggerNonce)."""
    SCALE = 1
    """``parallelism``."""
    UPGRADE = 2
    """Anything the worker pods run (pipeline, image, Kafka, checkpoint store, resources, ...)."""
    REDEPLOY = 3
    """``restartNonce``: restart every worker even if nothing else changed."""


_CHANGE: Mapping[Kind, Change] = MappingProxyType(
    {
        "ignore": Change.IGNORE,
        "scale": Change.SCALE,
        "pods": Change.UPGRADE,
        "state": Change.UPGRADE,
        "redeploy": Change.REDEPLOY,
    }
)

TABLE: Mapping[str, Kind] = MappingProxyType(
    {
        # Dotted camelCase paths as written in a manifest, list items without an index
        # (``pipeline.steps.window.size`` is the size of any step's window); an entry covers its
        # subtree, and the longest entry covering a field decides its kind.
        "image": "pods",
        "imagePullPolicy": "pods",
        "parallelism": "scale",
        "resources": "pods",
        "env": "pods",
        "podTemplate": "pods",
        "kafka": "pods",
        # An entrypoint's pipeline is only known in the image: its state cannot be judged from
        # the spec (SpecDiff.state is None), the runtime's restore check is the guard.
        "entrypoint": "pods",
        # A task's state and offsets belong to one input partition: a topic added starts from
        # startFrom, a topic removed takes its partitions' state with it; what the remaining
        # state means does not change.
        "pipeline.source.topics": "pods",
        "pipeline.source.format": "pods",
        # Event time decides which window a record falls in, not what a window's state holds.
        "pipeline.source.eventTime": "pods",
        "pipeline.source.key": "state",
        "pipeline.source.startFrom": "pods",
        "pipeline.source.maxValueBytes": "pods",
        "pipeline.watermark": "pods",
        # Steps before the keyed stage change which records reach it, not what its state means.
        "pipeline.steps.filter": "pods",
        "pipeline.steps.select": "pods",
        "pipeline.steps.rename": "pods",
        "pipeline.steps.map": "pods",
        "pipeline.steps.flatMap": "pods",
        "pipeline.steps.keyBy.field": "state",
        "pipeline.steps.keyBy.messageKey": "state",
        # Used only when the repartition topic is created: an existing topic keeps its count.
        "pipeline.steps.keyBy.partitions": "pods",
        # A join's state is the versions of one table topic, looked up by one key, partitioned
        # one way (weir.state_shape.JoinShape); the rest changes what later lookups add or how
        # long history is kept, not what the stored versions and held records mean.
        "pipeline.steps.join.topic": "state",
        "pipeline.steps.join.key": "state",
        "pipeline.steps.join.mode": "state",
        "pipeline.steps.join.kind": "pods",
        "pipeline.steps.join.fields": "pods",
        "pipeline.steps.join.prefix": "pods",
        "pipeline.steps.join.grace": "pods",
        "pipeline.steps.join.retention": "pods",
        "pipeline.steps.join.format": "pods",
        "pipeline.steps.join.idleTimeout": "pods",
        "pipeline.steps.window.type": "state",
        "pipeline.steps.window.size": "state",
        "pipeline.steps.window.slide": "state",
        "pipeline.steps.window.gap": "state",
        # When a window closes and when it is written, not what its accumulator holds.
        "pipeline.steps.window.allowedLateness": "pods",
        "pipeline.steps.aggregate.emit": "pods",
        "pipeline.steps.aggregate.outputs": "state",
        "pipeline.steps.process.function": "state",
        "pipeline.steps.process.onError": "pods",
        "pipeline.sink": "pods",
        "pipeline.deadLetter": "pods",
        "checkpoint": "pods",
        # What happens to the store when the StreamJob is deleted: the operator's business.
        "checkpoint.cleanupPolicy": "ignore",
        "deliveryGuarantee": "pods",
        "upgradeMode": "ignore",
        # The life cycle (suspend/resume), which decide handles itself: not a change of the job.
        "state": "ignore",
        "restartNonce": "redeploy",
        "savepointTriggerNonce": "ignore",
        # While the autoscaler runs it owns the parallelism; its settings restart nothing.
        "autoscaler": "ignore",
        # The operator's upgrade policy (stability gate, rollback, periodic savepoints and their
        # retention, a new job's first restore): decided by the operator, no worker restarts.
        # allowStateReset reaches the pods (WEIR_ALLOW_STATE_RESET) with the next change's apply.
        "upgrade": "ignore",
        "savepoints": "ignore",
        "initialSavepointPath": "ignore",
    }
)

_Path: TypeAlias = tuple[str, ...]
_ENTRIES: dict[_Path, Kind] = {tuple(path.split(".")): kind for path, kind in TABLE.items()}
_DETAIL_MAX = 120
"""Longest ``FieldChange.detail``: a line in a condition or an event, not a dump of the spec."""
_HIDDEN = "(hidden)"


def kind_of(path: str) -> Kind:
    """The kind of the field at dotted camelCase ``path`` (list items without an index): the
    longest ``TABLE`` entry covering it; a path above several entries takes the largest of
    theirs. ``KeyError`` for a path no entry covers or lies under."""
    kind = _kind(tuple(path.split(".")))
    if kind is None:
        raise KeyError(f"{path}: not in weir.spec_diff.TABLE")
    return kind


@dataclass(frozen=True)
class FieldChange:
    """One field two specs differ in."""

    path: str
    """Where, as the user writes it: ``pipeline.steps[2].window.size``,
    ``kafka.consumer['fetch.min.bytes']``."""
    kind: Kind
    """Its ``TABLE`` kind (the largest of the members an added or removed object sets)."""
    detail: str
    """``old -> new``, short (at most 120 characters); ``(none)`` for an absent value, and the
    value of an ``env`` variable never shown."""


@dataclass(frozen=True)
class SpecDiff:
    """What changing a running job's spec from one version to another does."""

    change: Change
    """The largest change among ``fields`` (``Change.IGNORE`` when they are equal)."""
    state: Verdict | None
    """What the change does to the job's state (``weir.state_shape.compare``); None when it
    cannot be known from the spec: either version is an entrypoint job, whose pipeline is
    decided by the image (the runtime's restore check is the guard there)."""
    fields: tuple[FieldChange, ...]
    """Every field that differs, in the order of the spec."""

    def incompatible_fields(self) -> tuple[str, ...]:
        """The lines to put in a refusal: what makes the state incompatible, each naming the
        field path the user edits; empty unless ``state`` is incompatible."""
        if self.state is None or self.state.compatible:
            return ()
        return self.state.changes


def diff(old: JobSpec, new: JobSpec, *, namespace: str, name: str) -> SpecDiff:
    """What changing job ``namespace/name`` from spec ``old`` to ``new`` does.

    Values are compared as the models normalise them (``10s`` and ``10000`` are equal, and so
    are a default written out and one left out). Steps are aligned as sequences, so a step
    added before others is one added step, not a change of every step after it.
    """
    before = old.model_dump(mode="json", by_alias=True)
    after = new.model_dump(mode="json", by_alias=True)
    fields = tuple(_changes(before, after, ()))
    change = max((_CHANGE[f.kind] for f in fields), default=Change.IGNORE)
    state = None
    if old.pipeline is not None and new.pipeline is not None:
        state = compare(
            shape_of(old.pipeline.stages(), namespace, name), shape_of(new.pipeline.stages(), namespace, name)
        )
    return SpecDiff(change, state, fields)


def fingerprint(job_spec: JobSpec) -> str:
    """A stable hash of every spec field whose kind is pods, state or redeploy: equal for two
    specs whose workers run the same thing (whatever their ignore and scale fields), and in how
    values are written (``10s`` or ``10000``, key order, defaults spelled out or not); any other
    change, ``restartNonce`` included, gives a new one. 16 hex digits of SHA-256.

    The hashed document is the spec's JSON (camelCase) without its ignore and scale fields: the
    digests of the specs before ``TABLE`` existed are unchanged.
    """
    relevant = _fingerprinted(job_spec.model_dump(mode="json", by_alias=True), ())
    return hashlib.sha256(orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# --------------------------------------------------------------------------- the table


def _covering(path: _Path) -> Kind | None:
    for end in range(len(path), 0, -1):
        kind = _ENTRIES.get(path[:end])
        if kind is not None:
            return kind
    return None


def _below(path: _Path) -> list[Kind]:
    return [kind for entry, kind in _ENTRIES.items() if len(entry) > len(path) and entry[: len(path)] == path]


def _kind(path: _Path) -> Kind | None:
    below = _below(path)
    if below:
        return _largest([k for k in (*below, _covering(path)) if k is not None])
    return _covering(path)


def _largest(kinds: list[Kind]) -> Kind:
    return max(kinds, key=_KINDS.index)


def _kind_of_value(path: _Path, value: Any) -> Kind:
    """The kind of setting ``value`` at ``path``: the largest kind of the members it sets."""
    if not _below(path):
        # A field missing from TABLE counts as a change of the pods: restarting is the safe
        # side, and the coverage test names the field.
        return _covering(path) or "pods"
    if isinstance(value, dict):
        kinds = [_kind_of_value((*path, k), v) for k, v in value.items() if v is not None]
    elif isinstance(value, list):
        kinds = [_kind_of_value(path, item) for item in value]
    else:
        kinds = []
    return _largest(kinds) if kinds else (_kind(path) or "pods")


_FINGERPRINTED: frozenset[Kind] = frozenset({"pods", "state", "redeploy"})
_DROP = object()


def _fingerprinted(value: Any, path: _Path) -> Any:
    """``value`` without the members whose kind is ignore or scale (``_DROP`` when all of it is)."""
    if _below(path) and isinstance(value, dict | list):
        if isinstance(value, list):
            return [_fingerprinted(item, path) for item in value]
        kept = {k: _fingerprinted(v, (*path, k)) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    return value if (_covering(path) or "pods") in _FINGERPRINTED else _DROP


# --------------------------------------------------------------------------- the diff


def _changes(old: Any, new: Any, where: tuple[str | int, ...]) -> Iterator[FieldChange]:
    """The leaves ``old`` and ``new`` differ in, below location ``where``."""
    if _key(old) == _key(new):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in dict.fromkeys([*old, *new]):
            yield from _changes(old.get(key), new.get(key), (*where, key))
    elif isinstance(old, list) and isinstance(new, list):
        yield from _list_changes(old, new, where)
    elif old is None and isinstance(new, dict | list):
        yield _field_change(where, None, new, "added")
    elif new is None and isinstance(old, dict | list):
        yield _field_change(where, old, None, "removed")
    else:
        yield _field_change(where, old, new)


def _list_changes(old: list[Any], new: list[Any], where: tuple[str | int, ...]) -> Iterator[FieldChange]:
    """Align the two lists (a step inserted is one addition) and compare the items paired up."""
    matcher = difflib.SequenceMatcher(a=[_key(i) for i in old], b=[_key(i) for i in new], autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        paired = min(i2 - i1, j2 - j1)
        for k in range(paired):
            yield from _changes(old[i1 + k], new[j1 + k], (*where, j1 + k))
        for i in range(i1 + paired, i2):
            yield _field_change((*where, i), old[i], None, "removed")
        for j in range(j1 + paired, j2):
            yield _field_change((*where, j), None, new[j], "added")


def _key(value: Any) -> bytes:
    """Equality as the fingerprint sees it: ``1``, ``1.0`` and ``true`` differ (a filter comparing
    with ``true`` is another filter than one comparing with ``1``), key order does not."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _field_change(where: tuple[str | int, ...], old: Any, new: Any, verb: str = "") -> FieldChange:
    path = tuple(p for p in where if isinstance(p, str))
    kind = _largest([_kind_of_value(path, v) for v in (old, new) if v is not None] or [_kind(path) or "pods"])
    hide = path[:1] == ("env",)
    if verb == "added":
        detail = f"added {_show(new, hide)}"
    elif verb == "removed":
        detail = f"removed {_show(old, hide)}"
    else:
        detail = f"{_show(old, hide)} -> {_show(new, hide)}"
    if len(detail) > _DETAIL_MAX:
        detail = detail[: _DETAIL_MAX - 3] + "..."
    return FieldChange(_format(where), kind, detail)


def _show(value: Any, hide: bool) -> str:
    if value is None:
        return "(none)"
    if hide:
        value = _hide_env_values(value)
        if value == _HIDDEN:
            return _HIDDEN
    return orjson.dumps(_without_nulls(value)).decode()


def _hide_env_values(value: Any) -> Any:
    """An ``env`` entry or member without its literal value (users are told not to put secrets
    there, but a detail goes to events and conditions: never risk it)."""
    if isinstance(value, dict):
        return {k: (_HIDDEN if k == "value" and v is not None else v) for k, v in value.items()}
    return _HIDDEN if isinstance(value, str) else value


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _format(where: tuple[str | int, ...]) -> str:
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.replace("_", "a").replace("-", "a").isalnum() and not part[:1].isdigit():
            out += f".{part}" if out else part
        else:
            # Keys such as librdkafka's "fetch.min.bytes" would read as two levels when dotted.
            out += f"[{part!r}]"
    return out
