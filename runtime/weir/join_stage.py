"""The join steps of a keyed stage at run time: one task's chain of ``JoinOperator``s in front of
its window or process operator (or the sink), and the stores they checkpoint together.

``JoinStage`` is the task's operator when the pipeline has join steps (``TaskCore.open_state``
builds it). A prepared record goes through the joins in step order: each looks it up by the
task's key (or by its ``key`` field, global mode), holds it until the table's time reaches it
(``weir.join``) and passes the joined record on; the last join's output goes to the window or
process operator, or, with neither, out as a record for the sink. Inner misses and records the
join finds late are dead-lettered (``join_miss``, ``late``) through ``on_dead``.

Determinism downstream. A window or process operator behind the joins sees each record with
the watermark the record *arrived* with (it rides along with the record while it is held), so
whether it is late is decided as without the join; and it is advanced to ``min(stream
watermark, every join's table time)``: a held record is newer than its join's table time, so
no window it belongs to can close while it is held. Results therefore do not depend on how
the table and stream reads interleave.

``StoreSet`` is the task's store then: the window or process store (if any) in the task's state
directory itself, each join's ``JoinStore`` in a subdirectory ``part<i>``; a checkpoint is one
flat directory (the checkpoint store uploads files, not trees) in which part ``i``'s files are
named ``part<i>-<name>``, split back into the subdirectories by ``StoreSet.unpack`` before a
restored directory is opened.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from weir.aggregates import Overflow
from weir.functions import StateEncodingError
from weir.join import JoinOperator, JoinSpec
from weir.join_table import JoinStore
from weir.process import ProcessOperator
from weir.process_store import ProcessStore
from weir.records import DeadLetter
from weir.rocksdb_options import RocksMemory
from weir.state import PartitionStore
from weir.window_operator import WindowOperator

__all__ = ["Emitted", "JoinStage", "JoinStep", "StoreSet", "lookup_key", "open_join_stage"]

_KEY: Final = "\x00weir.key"
"""The task's key of a record while it passes the joins (a join may look up another field)."""
_WM: Final = "\x00weir.wm"
"""The watermark a record arrived with: what the window behind the joins judges it against."""
_MISSING: Final = object()


@dataclass(frozen=True)
class JoinStep:
    """One join step as the worker runs it (``weir.graph.compile_job``)."""

    index: int
    """Its index in ``spec.pipeline.steps`` (for error messages)."""
    topic: str
    key_field: str | None
    """The record field looked up; None: the task's key."""
    mode: str
    """``global`` or ``copartitioned``."""
    spec: JoinSpec
    idle_timeout_ms: int
    """How long a caught-up table partition stays quiet before it is idle (0: never)."""

    def table_partitions(self, stream_partition: int, table_partitions: int) -> list[int]:
        """The table partitions the task of ``stream_partition`` joins with."""
        if self.mode == "global":
            return list(range(table_partitions))
        return [stream_partition]


class Emitted(NamedTuple):
    """A record for the sink (a process function's, or the joins' without a keyed operator
    behind them), or the error that replaced it (dead-lettered)."""

    key: str
    record: dict[str, Any] | None
    error: Exception | None


def lookup_key(step: JoinStep, key: str, record: dict[str, Any]) -> str:
    """The table key ``record`` (keyed ``key`` in the task) is looked up by; ``DeadLetter``
    (``missing_field``, ``wrong_type``) when its ``key`` field cannot be one."""
    field = step.key_field
    if field is None:
        return key
    value = record.get(field, _MISSING)
    if isinstance(value, str):
        return value
    if value.__class__ is int:
        return str(value)
    where = f"join key field {field!r} (steps[{step.index}].join.key)"
    if value is _MISSING:
        raise DeadLetter("missing_field", f"{where} is missing")
    raise DeadLetter("wrong_type", f"{where} must be a string or integer, not {type(value).__name__}")


Inner = WindowOperator | ProcessOperator | None
OnDead = Callable[[Exception, str, dict[str, Any]], None]
"""``on_dead(error, key, record)``: dead-letter a record the joins took (it has no source
record any more: ``reason`` and ``detail`` come from ``error``)."""


class JoinStage:
    """One task's joins and the operator behind them (see the module docstring).

    Driven like the operator it wraps: ``process`` per record (``DeadLetter`` when the first
    join cannot take it), then ``advance`` (with ``take`` first when ``windowed`` is False)
    while ``firing``. ``advance`` returns what the operator behind returns: window results when
    ``windowed``, else ``Emitted`` records.
    """

    def __init__(
        self,
        joins: Sequence[tuple[JoinStep, JoinOperator]],
        inner: Inner,
        check: Callable[[dict[str, Any]], None] | None = None,
        on_dead: OnDead | None = None,
    ) -> None:
        if not joins:
            raise ValueError("a join stage has at least one join")
        self.joins = list(joins)
        self.inner = inner
        self.windowed = isinstance(inner, WindowOperator)
        self._check = check
        """Checks the fields an aggregate reads that the joins added (``DeadLetter``)."""
        self.on_dead: OnDead = on_dead or _raise
        self._out: list[Emitted] = []
        self._firing = False

    # -- records --------------------------------------------------------------------------
    def process(self, key: str, ts: int, record: dict[str, Any], wm: int) -> bool:
        step, op = self.joins[0]
        lookup = lookup_key(step, key, record)
        carried = {**record, _KEY: key, _WM: wm}
        try:
            joined_now = op.process(lookup, ts, carried, wm)
        except StateEncodingError as exc:  # cannot be held (an integer beyond 64 bits)
            raise DeadLetter("wrong_type", f"cannot be held for the join: {exc}") from None
        if not joined_now:
            raise DeadLetter("late", _late(step, ts))
        self._pass(0, op.take())
        return True

    def _pass(self, i: int, joined: Sequence[Any]) -> None:
        """Hand what join ``i`` produced to join ``i + 1``, or past the last join."""
        last = i + 1 == len(self.joins)
        for j in joined:
            record: dict[str, Any] = j.record
            if j.error is not None:
                self._dead(j.error, record)
                continue
            if last:
                self._deliver(j.ts, record)
                continue
            step, op = self.joins[i + 1]
            try:
                lookup = lookup_key(step, record[_KEY], record)
            except DeadLetter as exc:
                self._dead(exc, record)
                continue
            try:
                joined_now = op.process(lookup, j.ts, record, record[_WM])
            except StateEncodingError as exc:
                self._dead(DeadLetter("wrong_type", f"cannot be held for the join: {exc}"), record)
                continue
            if not joined_now:
                self._dead(DeadLetter("late", _late(step, j.ts)), record)
                continue
            self._pass(i + 1, op.take())

    def _dead(self, error: Exception, record: dict[str, Any]) -> None:
        key = record.pop(_KEY)
        record.pop(_WM, None)
        self.on_dead(error, key, record)

    def _deliver(self, ts: int, record: dict[str, Any]) -> None:
        key: str = record.pop(_KEY)
        wm: int = record.pop(_WM)
        inner = self.inner
        try:
            if self._check is not None:
                self._check(record)
            if inner is None:
                self._out.append(Emitted(key, record, None))
            elif not inner.process(key, ts, record, wm):
                from weir.tasks import LateRecord  # weir.tasks imports this module

                self.on_dead(LateRecord(ts, wm), key, record)
        except (DeadLetter, Overflow) as exc:
            self.on_dead(exc, key, record)

    # -- time -----------------------------------------------------------------------------
    @property
    def table_time(self) -> int:
        """The least of the joins' table times: no held record is at or before it."""
        return min(op.table_time for _, op in self.joins)

    def take(self) -> list[Emitted]:
        """Records ready for the sink (or dead letters) since the last call (not ``windowed``)."""
        out, self._out = self._out, []
        if isinstance(self.inner, ProcessOperator):
            out += [Emitted(o.key, o.record, o.error) for o in self.inner.take()]
        return out

    def advance(self, wm: int, limit: int) -> list[Any]:
        """Release the held records the tables' times reach (up to ``limit`` per join), pass them
        on, then advance the operator behind to ``min(wm, table_time)``."""
        joining = False
        for i, (_, op) in enumerate(self.joins):
            self._pass(i, op.advance(wm, limit))
            joining = joining or op.firing
        frontier = min(wm, self.table_time)
        inner = self.inner
        out: list[Any]
        if inner is None:
            out = self.take()
            self._firing = joining
        elif isinstance(inner, ProcessOperator):
            out = self.take()
            out += [Emitted(o.key, o.record, o.error) for o in inner.advance(frontier, limit)]
            self._firing = joining or inner.firing
        else:
            out = list(inner.advance(frontier, limit))
            self._firing = joining or inner.firing
        return out

    @property
    def firing(self) -> bool:
        return self._firing

    def restore(self) -> None:
        """After the stores were restored: the operator behind restores its indexes (the joins
        read their progress from their stores when built)."""
        if self.inner is not None:
            self.inner.restore()

    @property
    def held(self) -> int:
        """Stream records the joins hold (waiting for their tables' times)."""
        return sum(op.held for _, op in self.joins)

    @property
    def open_windows(self) -> int:
        """The operator behind's open windows (or keys with state); without one, held records."""
        return self.held if self.inner is None else self.inner.open_windows

    @property
    def timer_entries(self) -> int:
        return 0 if self.inner is None else self.inner.timer_entries


def open_join_stage(
    task: Any,
    path: Path,
    joins: Sequence[JoinStep],
    check: Callable[[dict[str, Any]], None] | None,
    partitions_for: Callable[[JoinStep, int], list[int]],
    rocks: RocksMemory | None,
    on_dead: OnDead,
) -> None:
    """Put ``task``'s joins in front of the operator it has (``task.op``, None for none) and its
    stores in one ``StoreSet`` (``path`` unpacked already): a join's store is ``part<i>``, after
    the operator's store when there is one."""
    inner, inner_store = task.op, task.store
    first = 0 if inner_store is None else 1
    stores = [JoinStore(StoreSet.part_dir(path, first + i), rocks) for i in range(len(joins))]
    ops = [
        (step, JoinOperator(step.spec, store, partitions_for(step, task.partition)))
        for step, store in zip(joins, stores, strict=True)
    ]
    task.op = JoinStage(ops, inner, check, on_dead)
    task.store = StoreSet([*([inner_store] if inner_store is not None else []), *stores])


def _late(step: JoinStep, ts: int) -> str:
    return (
        f"event time {ts} is older than the join's stream time minus its retention "
        f"({step.spec.retention_ms} ms, steps[{step.index}].join)"
    )


def _raise(error: Exception, key: str, record: dict[str, Any]) -> None:
    raise error


# --------------------------------------------------------------------------- stores

Part = PartitionStore | ProcessStore | JoinStore


class StoreSet:
    """A task's stores checkpointed as one (see the module docstring): ``parts[0]`` lives in the
    task's directory, ``parts[i]`` in ``<dir>/part<i>``; the same surface as one store."""

    def __init__(self, parts: Sequence[Part]) -> None:
        if not parts:
            raise ValueError("a store set has at least one store")
        self.parts = list(parts)

    @staticmethod
    def part_dir(path: Path, i: int) -> Path:
        """Where part ``i`` of the set in ``path`` lives (``path`` itself for part 0)."""
        return path if i == 0 else path / f"part{i}"

    @staticmethod
    def unpack(path: Path) -> None:
        """Move the ``part<i>-<name>`` files of a restored checkpoint in ``path`` into the
        parts' subdirectories (a no-op for a directory unpacked already)."""
        if not path.is_dir():
            return
        for f in sorted(path.iterdir()):
            head, sep, name = f.name.partition("-")
            if not sep or not f.is_file() or not head.startswith("part") or not head[4:].isdigit():
                continue
            dest = path / head
            dest.mkdir(exist_ok=True)
            f.rename(dest / name)

    @property
    def progress(self) -> dict[str, Any] | None:
        """What the last ``flush`` stored, when every part holds the same (else None: a crash
        between the parts' flushes left them apart, and no offset matches them all)."""
        first = self.parts[0].progress
        if first is None or any(p.progress != first for p in self.parts[1:]):
            return None
        return first

    def flush(self, progress: dict[str, Any]) -> int:
        return sum(p.flush(progress) for p in self.parts)

    def start_checkpoint(self) -> None:
        for part in self.parts:
            part.start_checkpoint()

    def checkpoint(self, dest: Path) -> Path:
        try:
            self.parts[0].checkpoint(dest)
            for i, part in enumerate(self.parts[1:], start=1):
                tmp = dest.parent / f"{dest.name}.part{i}"
                shutil.rmtree(tmp, ignore_errors=True)
                part.checkpoint(tmp)
                for f in sorted(tmp.iterdir()):
                    f.rename(dest / f"part{i}-{f.name}")
                tmp.rmdir()
            return dest
        finally:
            self.end_checkpoint()  # a part that failed leaves none of the others fenced

    def end_checkpoint(self) -> None:
        for part in self.parts:
            part.end_checkpoint()

    def size_bytes(self) -> int:
        return sum(p.size_bytes() for p in self.parts)

    def memory_used(self) -> tuple[int, int]:
        used = [p.memory_used() for p in self.parts]
        return sum(u[0] for u in used), sum(u[1] for u in used)

    def rewrite(self, transform: Callable[[bytes], bytes], progress: dict[str, Any]) -> int:
        """Migrate the window store's accumulators (``weir.state_migration``) and store the same
        ``progress`` in every part, so the set still reads as one."""
        main = self.parts[0]
        if not isinstance(main, PartitionStore):
            raise TypeError("only a window store's accumulators are rewritten")
        n = main.rewrite(transform, progress)
        for p in self.parts[1:]:
            p.flush(progress)
        return n

    def compacting(self) -> bool:
        return any(p.compacting() for p in self.parts)

    def close(self) -> None:
        for p in self.parts:
            p.close()
