"""Which state a starting worker restores for each of its partitions (pure logic, no I/O).

Exactly-once rests on one invariant: a checkpoint's manifest is written *before* the Kafka
transaction that commits the same offsets. So for every partition the committed offset is
the offset of some complete checkpoint (unless files were lost since), and a checkpoint
whose offset is ahead of the committed one belongs to a transaction that never committed.

For each partition, in order of preference:

1. ``local``: the RocksDB database already on this worker's disk, when the offset stored in
   it equals the committed offset (a restarted container on the same volume): nothing to
   download.
2. ``exact``: the newest intact checkpoint (or the explicit restore source) whose offset
   equals the committed offset.
3. ``replay``: when no such checkpoint is usable (a file is missing or corrupt, or it was
   deleted), the newest intact one *behind* the committed offset, or empty state from the
   source's start position; the worker re-reads up to the committed offset with output
   suppressed (those results are already committed) and then lifts the watermark to the
   one recorded at the committed offset, so the state it ends with is the one that matches.
4. ``fresh``: nothing committed, nothing restorable: the source's start position.

Replay is exact only where the output before the committed offset is a function of the input
before it. A task whose records pass a join (``replayable`` False) is not such a task: which of
its held records the original run released before the commit depended on how far it had read
the table topics then (and on restarts' bootstraps and idle table partitions), which the
replay cannot know; a held record released before the commit would be written again, one
released after it would be suppressed and lost. So where a replay would be chosen for it,
the partition is ``reset`` when ``allow_reset`` (empty state at the committed offset: the
records it held and the windows behind the join restart empty, nothing is written twice),
else ``ReplayRefused``: restore a savepoint instead, or allow the reset.

An explicit restore source (a savepoint) wins over checkpoints, unless a checkpoint taken
*after* it matches the committed offset: that is the job restarting after it already
resumed from the savepoint, which must not rewind to it again.

State shapes (``compatible(s)``: the snapshot's state means what this pipeline's means, as is
or migrated): an incompatible snapshot's *state* is never loaded, but its offsets still say
where output was committed. So an incompatible snapshot at the committed offset (written by
another version of the pipeline: an operator rollback after the new version committed
output) is replaced by a ``replay`` from the newest compatible snapshot behind it, the
explicit restore source included, output suppressed up to the committed offset. When no
compatible one exists, or the explicit source itself is incompatible, the state cannot be
restored: ``reset`` when ``allow_reset`` (empty state from that snapshot's offsets, the
partition's committed output untouched), else ``IncompatibleState``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from weir.state_migration import StateShapeMismatch


class Snapshot(Protocol):
    """What recovery needs to know about a checkpoint or savepoint manifest."""

    @property
    def id(self) -> str: ...

    @property
    def created_ms(self) -> int: ...

    def progress(self, partition: str) -> Mapping[str, Any] | None:
        """The partition's recorded progress (``offset``, ``wm``, ...), None if not in it."""
        ...


@dataclass(frozen=True)
class Restore:
    """The decision for one partition."""

    how: Literal["local", "exact", "replay", "fresh", "reset"]
    source: Snapshot | None = None
    """The checkpoint or savepoint to download (``exact``, and ``replay`` when not from empty);
    ``reset``: the incompatible snapshot whose offset and watermark start the empty state."""
    offset: int | None = None
    """Where consumption starts; None: the source's start position (``fresh``, or ``replay`` from empty)."""
    replay_until: int | None = None
    """``replay``: results of records before this offset are suppressed (already committed)."""
    replay_wm: int | None = None
    """``replay``: the watermark recorded at ``replay_until``, when a manifest still says it."""
    reason: str = ""


def choose(
    partition: str,
    committed: int | None,
    checkpoints: Sequence[Snapshot],
    restore_from: Sequence[Snapshot] = (),
    local: tuple[int, str | None] | None = None,
    usable: Callable[[Snapshot], bool] = lambda _s: True,
    committed_id: str | None = None,
    compatible: Callable[[Snapshot], bool] = lambda _s: True,
    allow_reset: bool = False,
    replayable: bool = True,
) -> Restore:
    """Decide how ``partition`` starts.

    ``committed`` is the job's committed offset (None when the group has none) and
    ``committed_id`` the snapshot id committed with it as offset metadata (None when the
    offsets carry none): two snapshots can share an offset and differ in watermark (an idle
    partition's watermark moves without input), so the id is what names the committed state.
    ``checkpoints`` and ``restore_from`` are manifests in any order; ``local`` is the
    ``(offset, id)`` stored with the state on this disk; ``usable(s)`` verifies a snapshot's
    files for this partition (called lazily, newest first: it may download), and is never
    called for an incompatible one. ``compatible(s)``: whether ``s``'s state can be loaded into
    this pipeline; ``allow_reset``: what an unloadable one gives (see the module docstring).
    ``replayable`` False: a replay cannot reproduce the partition's committed output (a task
    behind a join): ``reset`` when ``allow_reset`` instead, else ``ReplayRefused``.
    """

    def offset_of(s: Snapshot) -> int:
        p = s.progress(partition)
        assert p is not None
        return int(p["offset"])

    def newest(snaps: Sequence[Snapshot]) -> list[Snapshot]:
        found = [s for s in snaps if s.progress(partition) is not None]
        return sorted(found, key=lambda s: s.created_ms, reverse=True)

    def reset(s: Snapshot, offset: int, why: str) -> Restore:
        if not allow_reset:
            raise IncompatibleState(partition, s, why)
        return Restore("reset", s, offset, reason=f"{why}; state reset allowed: starts empty")

    def replay(s: Snapshot | None, target: Snapshot | None, wm: int | None, why: str) -> Restore:
        if replayable:
            return Restore("replay", s, None if s is None else offset_of(s), committed, wm, reason=why)
        if not allow_reset:
            raise ReplayRefused(partition, committed, why)
        # ``target``'s progress (its watermark) starts the empty state when its manifest is left.
        return Restore("reset", target, committed, reason=f"{why}; no exact replay behind a join: empty")

    newest_first, explicit = newest(checkpoints), newest(restore_from)

    if explicit:
        source = explicit[0]
        resumed = [
            s for s in newest_first
            if s.created_ms > source.created_ms and offset_of(s) == committed
            and (committed_id is None or s.id == committed_id)
        ]
        if not resumed or committed is None:
            if not compatible(source):
                return reset(source, offset_of(source), f"restore source {source.id} has another state shape")
            if not usable(source):
                raise RestoreSourceUnusable(
                    f"{partition}: restore source {source.id} is corrupt or incomplete"
                )
            return Restore("exact", source, offset_of(source), reason=f"restore source {source.id}")

    if committed is None:
        return Restore("fresh", reason="no committed offset")
    if local is not None and local[0] == committed and (committed_id is None or local[1] == committed_id):
        return Restore("local", None, committed, reason="local state matches the committed offset")

    if committed_id is not None:
        at_commit = [s for s in newest_first if s.id == committed_id and offset_of(s) == committed]
    else:
        at_commit = [s for s in newest_first if offset_of(s) == committed]
    target = at_commit[0] if at_commit else None
    if target is not None and not compatible(target):
        # Written by another version: replay from the newest compatible snapshot behind it --
        # one taken before it, or one a replay like this took after it (not committed: a
        # replaying partition commits no offset) and then crashed.
        p = target.progress(partition)
        wm = None if p is None or p.get("wm") is None else int(p["wm"])
        seen = {s.id for s in newest_first}
        behind = sorted(
            [s for s in newest_first if s is not target and offset_of(s) <= committed]
            + [s for s in explicit if s.id not in seen and offset_of(s) <= committed],
            key=lambda s: s.created_ms,
            reverse=True,
        )
        for s in behind:
            if replayable and compatible(s) and usable(s):
                return replay(s, target, wm, f"{s.id} (skipped {target.id}: another state shape)")
        if not replayable:
            return replay(None, target, wm, f"the committed {target.id} has another state shape")
        why = f"the committed {target.id} has another state shape (none behind it fits)"
        return reset(target, committed, why)
    if target is not None and usable(target):
        return Restore("exact", target, committed, reason=f"checkpoint {target.id}")

    # The committed snapshot is missing or corrupt: restore an older one and re-read up to the
    # committed offset with output suppressed, then lift the watermark to the committed one's.
    wm = None
    if target is not None:
        p = target.progress(partition)
        wm = None if p is None or p.get("wm") is None else int(p["wm"])
    if target is not None:
        older = [s for s in newest_first if s.created_ms < target.created_ms and offset_of(s) <= committed]
    else:
        older = [s for s in newest_first if offset_of(s) < committed]
    skipped = target.id if target is not None else f"none found for {committed_id or committed}"
    if not replayable:
        lost = f"checkpoint {target.id} is corrupt or incomplete" if target is not None else (
            f"its checkpoint {committed_id} is gone" if committed_id else "no checkpoint at it is left"
        )
        return replay(None, target, wm, lost)
    for s in older:
        if compatible(s) and usable(s):
            return replay(s, target, wm, f"checkpoint {s.id} (skipped: {skipped})")
    return replay(None, target, wm, f"no usable checkpoint (skipped: {skipped})")


class RestoreSourceUnusable(RuntimeError):
    """The explicitly given restore source cannot be used for a partition."""


class IncompatibleState(Exception):
    """``snapshot`` holds the state a partition must restore, but this pipeline cannot load it
    (``compatible`` said no) and a state reset is not allowed."""

    def __init__(self, partition: str, snapshot: Snapshot, why: str) -> None:
        super().__init__(f"{partition}: {why}")
        self.partition = partition
        self.snapshot = snapshot


class ReplayRefused(StateShapeMismatch):
    """A partition's committed state cannot be restored and a replay would not reproduce its
    committed output (it runs a join: see the module docstring), and a state reset is not
    allowed. A ``StateShapeMismatch`` so that ``weir run`` exits with code 2 the same way: the
    job cannot start as asked. The message is one line naming the two ways out."""

    def __init__(self, partition: str, committed: int | None, why: str) -> None:
        super().__init__(
            f"{partition}: cannot restore the state committed at offset {committed} ({why}), and "
            "replaying from an older snapshot would write some joined records twice or drop them "
            "(which records a join had released by then depended on how far the table topic was "
            "read). Restore a savepoint (weir run --restore-from <savepoint URL>), or allow a "
            "state reset (weir run --allow-state-reset, WEIR_ALLOW_STATE_RESET=1, "
            "spec.upgrade.allowStateReset) to start the partition with empty join state at the "
            "committed offset"
        )
        self.partition = partition
