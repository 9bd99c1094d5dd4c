"""State across a pipeline change: the restore-time shape checks, and window accumulators
re-laid out by output name.

Every snapshot manifest and every partition's progress record carries the ``StateShape`` of
the pipeline that wrote it; ``verdict`` compares one with the running pipeline's (a snapshot of
an older weir has none: taken as matching). ``weir.commit`` restores only compatible state
(``weir.recovery`` decides with it), refuses an incompatible explicit restore source with
``StateShapeMismatch`` (exit code 2) unless a reset is allowed, and calls ``migrate_state``
on what it restored.

A windowed job's accumulator is a list of slots in the order of ``Aggregator.specs``: the
built-in outputs' slots, then one per custom output (stored after a newline,
``weir.custom_aggregates``). When an upgrade only adds or removes aggregate outputs
(``weir.state_shape.compare`` says ``migrate``), every stored window is rewritten once, when its
partition's state is opened at restore (``PartitionStore.rewrite``), so the per-record path
never sees the old layout:

- an output in both keeps its slots, matched by name (reordering the outputs moves nothing);
- an added output starts from the aggregate's initial accumulator (``create()``): in a window
  open at the upgrade it covers the records processed since, not the whole window;
- a removed output's slots are dropped.

The layout the state was written with travels with it: every flush stores ``slots``
(``layout_of``) and ``shape`` (``StateShape.to_json()``) in the partition's progress record,
so a local database, a restored checkpoint and a savepoint all say how to read them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from weir.aggregates import Aggregator, compile_aggregates, slot_count
from weir.functions import decode_state, encode_state
from weir.state_shape import StateShape, Verdict, compare

__all__ = [
    "Layout",
    "StateShapeMismatch",
    "accumulator_migration",
    "check_restore_source",
    "layout_of",
    "migrate_state",
    "mismatch",
    "parse_layout",
    "verdict",
]

log = logging.getLogger(__name__)


class StateShapeMismatch(ValueError):
    """A restore would load state this pipeline cannot read, and a state reset is not allowed
    (``weir run`` exits with code 2: the spec does not fit the snapshot). The message is one
    line naming what differs and the two ways out."""


def verdict(recorded: Any, shape: StateShape) -> Verdict:
    """How state recorded with shape ``recorded`` (``StateShape.to_json()``; None: written by an
    older weir, taken as matching) fits ``shape``. An unreadable one is incompatible."""
    if recorded is None:
        return Verdict("same")
    try:
        old = StateShape.from_json(recorded)
    except (ValueError, TypeError) as exc:
        return Verdict("incompatible", (f"its stateShape is unreadable ({exc})",))
    return compare(old, shape)


class Snap(Protocol):
    """What the checks need of a snapshot (``weir.commit._Snap``)."""

    @property
    def verdict(self) -> Verdict: ...
    @property
    def created_ms(self) -> int: ...
    @property
    def manifest(self) -> Any: ...


def mismatch(snap: Snap, what: str) -> str:
    """The one-line error of a refused restore of ``what`` (names the snapshot): what differs
    and the two ways out."""
    changes = "; ".join(snap.verdict.changes) or "its state shape differs"
    return (
        f"state shape mismatch: {what}: {changes}. Restore it with the "
        "pipeline it was taken from, or allow a state reset (spec.upgrade.allowStateReset, "
        "upgradeMode: stateless, WEIR_ALLOW_STATE_RESET=1 or weir run --allow-state-reset) to start "
        "from its offsets with empty state"
    )


def check_restore_source(
    source: str | None, explicit: Sequence[Snap], snapshots: Sequence[Snap], allow_reset: bool
) -> None:
    """Refuse an explicit restore source this pipeline cannot load, before any task is touched
    (a renamed keyBy job's source holds none of its repartition partitions, so the choice per
    partition alone would not notice) -- unless a reset is allowed or this pipeline has already
    resumed from it: one of its own checkpoints (same shape), newer than the source, exists."""
    bad = [s for s in explicit if not s.verdict.compatible]
    if not bad or allow_reset:
        return
    newest = max(s.created_ms for s in explicit)
    if any(
        s.manifest.kind == "checkpoint" and s.created_ms > newest and s.verdict.kind == "same"
        for s in snapshots
    ):
        return
    raise StateShapeMismatch(mismatch(bad[0], f"restore source {source}"))


class _Rewritable(Protocol):
    @property
    def progress(self) -> dict[str, Any] | None: ...
    def rewrite(self, transform: Callable[[bytes], bytes], progress: dict[str, Any]) -> int: ...


def migrate_state(task: Any, window: Any, shape: StateShape, meta: dict[str, Any]) -> None:
    """Rewrite ``task``'s restored window state (``task.store``, just opened) for the aggregate
    outputs of ``window`` (a ``weir.graph.WindowStage``) when it was written for others and the
    change is compatible; ``meta`` (this pipeline's ``shape`` and ``slots``) replaces the old in
    its progress record. Anything else is left as it is."""
    store = task.store
    if window is None or store is None or not hasattr(store, "rewrite"):
        return
    rewritable: _Rewritable = store
    progress = rewritable.progress
    if progress is None or "slots" not in progress or verdict(progress.get("shape"), shape).kind != "migrate":
        return
    migrate = accumulator_migration(parse_layout(progress["slots"]), window.aggregator)
    if migrate is None:
        return
    t0 = time.monotonic()
    n = rewritable.rewrite(migrate, {**progress, **meta})
    log.info(
        "%s: migrated %d windows to the outputs %s in %.2fs",
        task.name, n, ", ".join(name for name, _fn, _field in window.aggregator.specs), time.monotonic() - t0,
    )

Layout = tuple[tuple[str, str, str | None], ...]
"""``(output name, function, field)`` in accumulator order (``Aggregator.specs``; ``custom`` for
a custom function)."""


def layout_of(aggregator: Aggregator) -> list[list[Any]]:
    """The JSON form of ``aggregator``'s slot layout, as the progress record stores it."""
    return [[name, fn, field] for name, fn, field in aggregator.specs]


def parse_layout(value: Any) -> Layout:
    """``layout_of``'s JSON back; ValueError naming what is malformed."""
    if not isinstance(value, list):
        raise ValueError(f"slots is {type(value).__name__}, not a list")
    out: list[tuple[str, str, str | None]] = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
            or not (item[2] is None or isinstance(item[2], str))
        ):
            raise ValueError(f"slots[{i}] is not [name, function, field]: {item!r}")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


def _positions(layout: Sequence[tuple[str, str, str | None]]) -> dict[str, tuple[int, int, str, str | None]]:
    """name -> (first slot, slot count, function, field) in the accumulator as a list."""
    out: dict[str, tuple[int, int, str, str | None]] = {}
    start = 0
    for name, fn, field in layout:
        width = slot_count(fn)
        out[name] = (start, width, fn, field)
        start += width
    return out


def accumulator_migration(old: Layout, new: Aggregator) -> Callable[[bytes], bytes] | None:
    """The function turning an accumulator stored with layout ``old`` into ``new``'s encoding;
    None when the layouts are the same (nothing to rewrite).

    Outputs are matched by name; one whose function or field differs is not carried over (the
    caller has refused such a change as incompatible before: ``weir.state_shape.compare``). Added
    outputs take ``new.create()``'s initial slots (a custom output's ``create()`` is called once
    per window). Raises ValueError (from the old layout's ``loads``) on data that does not
    match ``old``.
    """
    if tuple(old) == tuple(new.specs):
        return None
    old_builtin = [s for s in old if s[1] != "custom"]
    has_custom = len(old_builtin) != len(old)
    old_loads = compile_aggregates(old_builtin).loads
    before, after = _positions(old), _positions(new.specs)
    plan = [
        (src, dst, width)
        for name, (dst, width, fn, field) in after.items()
        if name in before
        for src, old_width, old_fn, old_field in [before[name]]
        if (old_fn, old_field, old_width) == (fn, field, width)
    ]
    create, dumps = new.create, new.dumps

    def migrate(data: bytes) -> bytes:
        if has_custom:
            head, sep, tail = data.partition(b"\n")
            if not sep:
                raise ValueError("accumulator has no custom aggregate part: not written with this layout")
            custom = decode_state(tail)
            if not isinstance(custom, list):
                raise ValueError("accumulator's custom aggregate part is not a list")
            # In memory a custom output's slot is its accumulator encoded (weir.custom_aggregates).
            acc = [*old_loads(head), *(encode_state(c) for c in custom)]
        else:
            acc = old_loads(data)
        out = create()
        for src, dst, width in plan:
            out[dst : dst + width] = acc[src : src + width]
        return dumps(out)

    return migrate
