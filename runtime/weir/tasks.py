"""Tasks and their event-time progress: one task per input partition a worker owns.

Watermarks (``Watermarks``). A task's watermark is ``max event time seen - maxOutOfOrderness``
and only rises; it is read per record, so whether a record is late does not depend on batching.
When a task has consumed everything its partition holds and then had no record for
``idleTimeout``, it is idle: its watermark follows the wall clock (``now - maxOutOfOrderness``),
so windows of a quiet partition still close. A repartitioned task's watermark is the minimum
over every upstream source partition, learnt from the watermark markers (records with a null
key) that each upstream task writes to every repartition partition; until every upstream
partition has reported, it does not advance. A quiet upstream partition marks itself idle at
the wall clock instead of holding the repartitioned stage back, and keeps its own watermark:
when its records come again, its next marker (sent before them) holds the stage back again from
where that partition is (as a Flink input that turns active again). Without that, a partition
that woke up behind the others would have them close its windows under it, and lose every
record they passed as late.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from weir.join_stage import JoinStage, StoreSet
from weir.process import ProcessOperator
from weir.process_store import ProcessStore
from weir.state import PartitionStore
from weir.window_operator import NO_WATERMARK, WindowOperator

__all__ = [
    "EARLIEST",
    "LATEST",
    "NO_WATERMARK",
    "Consumed",
    "Headers",
    "LateRecord",
    "Message",
    "Send",
    "Task",
    "Watermarks",
]


Headers = list[tuple[str, str | bytes | None]]

EARLIEST = -2
"""The logical offset of a partition's first record (Kafka's ``OFFSET_BEGINNING``)."""
LATEST = -1
"""The logical offset after a partition's last record (Kafka's ``OFFSET_END``)."""


class Message(Protocol):
    """What the core reads of a consumed record (``confluent_kafka.Message`` has it)."""

    def value(self) -> bytes | None: ...
    def key(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...


class Consumed:
    """A consumed record held as Python values (a ``Message``): the in-memory broker's records,
    and a natively read record that goes the Python path (``weir.native.Fetched.records``)."""

    __slots__ = ("_headers", "_key", "_kind", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        timestamp: int = 0,
        headers: Headers | None = None,
        kind: int = 1,
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._timestamp, self._kind = key, value, timestamp, kind
        self._headers = headers

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        """``(type, ms)`` as confluent-kafka gives it (type 1: CreateTime, the default here)."""
        return (self._kind, self._timestamp)

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def headers(self) -> dict[str, bytes | None]:
        return {k: v if v is None or isinstance(v, bytes) else v.encode() for k, v in self._headers or ()}


class Send(Protocol):
    """Write one record to the open transaction: ``send(topic, value, key, partition, headers)``."""

    def __call__(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int = -1,
        headers: Headers | None = None,
    ) -> None: ...


class LateRecord(Exception):
    """A record whose every window had closed when it arrived."""

    reason = "late"

    def __init__(self, ts: int, watermark: int) -> None:
        self.detail = (
            f"event time {ts} is at or behind the watermark {watermark} by more than "
            "allowedLateness for every window it belongs to"
        )
        super().__init__(self.detail)


@dataclass(eq=False)
class Task:
    """One input partition: its watermark, its position, and (when it runs the keyed stage) its
    operator and store. ``next_offset`` is the next offset to read, or a negative logical offset
    (the source's start) before the first record."""

    topic: str
    partition: int
    label: str
    op: WindowOperator | ProcessOperator | JoinStage | None = None
    store: PartitionStore | ProcessStore | StoreSet | None = None
    forward: bool = False
    wm: int = NO_WATERMARK
    next_offset: int = -1
    last_record: float = 0.0
    idle: bool = False
    records: int = 0
    bytes: int = 0
    late: int = 0
    upstream: dict[str, int] = field(default_factory=dict)
    """Repartitioned tasks: the watermark of every upstream source partition."""
    upstream_idle: set[str] = field(default_factory=set)
    """Repartitioned tasks: the upstream partitions whose last marker said idle."""
    idle_wm: int = NO_WATERMARK
    """Stage-1 tasks: the watermark an idle one's markers carry (the wall clock's)."""
    sent: tuple[int, bool] | None = None
    """Stage-1 tasks: the last marker written (watermark, idle); None: none since the start."""
    metrics: Any = None
    native: Any = None
    """The task's ``weir_native.Windows`` when the native hot path runs it (``weir.native``)."""
    published: tuple[int, int, int] = (0, 0, 0)
    replay_until: int | None = None
    """Recovery by re-reading (``weir.recovery``): output before this offset is suppressed."""
    replay_wm: int | None = None

    @property
    def name(self) -> str:
        """The partition's name in checkpoints: ``<topic>/<partition>``."""
        return f"{self.topic}/{self.partition}"

    def progress(self) -> dict[str, Any]:
        return {"offset": self.next_offset, "wm": self.wm, **self.marks()}

    def marks(self) -> dict[str, Any]:
        """What a checkpoint records of the task's event time besides its offset and watermark:
        a repartitioned task's upstream watermarks (``upstream``) and which of them are idle
        (``upstreamIdle``); an idle stage-1 task's idle mark (``idleWm``), so a restart neither
        holds the keyed stage back for an idle timeout nor forgets that it stopped waiting."""
        out: dict[str, Any] = {"upstream": dict(self.upstream)}
        if self.upstream_idle:
            out["upstreamIdle"] = sorted(self.upstream_idle)
        if self.forward and self.idle:
            out["idleWm"] = self.idle_wm
        return out

    def restore_progress(self, progress: Mapping[str, Any] | None) -> None:
        """Take the watermark (and upstream watermarks) recorded with restored state."""
        if progress is None:
            return
        self.wm = int(progress.get("wm", NO_WATERMARK))
        self.sent = None
        self.upstream = {k: int(v) for k, v in (progress.get("upstream") or {}).items()}
        self.upstream_idle = set(progress.get("upstreamIdle") or ()) & self.upstream.keys()
        idle_wm = progress.get("idleWm")
        if self.forward and idle_wm is not None:
            self.idle, self.idle_wm = True, int(idle_wm)


class Watermarks:
    """Event-time progress that does not come from records: idleness and upstream minimums.

    The per-record rule (``max event time - maxOutOfOrderness``) runs inline in the core's record
    loops; this is the rest, with time injected (``now``: a monotonic clock in seconds, ``wall_ms``:
    epoch milliseconds) so it is tested without waiting.
    """

    def __init__(self, max_out_of_orderness_ms: int, idle_timeout_ms: int, upstream_count: int = 0) -> None:
        self.ooo = max_out_of_orderness_ms
        self.idle_after = idle_timeout_ms / 1000
        self.upstream_count = upstream_count

    def saw_records(self, task: Task, now: float) -> None:
        task.last_record = now
        task.idle = False

    def idle(self, task: Task, now: float, wall_ms: int, caught_up: Callable[[Task], bool]) -> None:
        """A task that has read all its partition holds and had no record for ``idleTimeout``
        is idle: its watermark follows the wall clock (a stage-1 task's markers do, and its own
        watermark stays where its records put it). ``caught_up`` is asked last (it may ask the
        client): a slow partition with records waiting must not be taken for a quiet one."""
        if self.idle_after <= 0 or now - task.last_record < self.idle_after or not caught_up(task):
            return
        task.idle = True
        floor = wall_ms - self.ooo
        if task.forward:
            task.idle_wm = max(task.idle_wm, floor, task.wm)
        elif floor > task.wm:
            task.wm = floor

    def upstream_min(self, task: Task) -> int:
        """A repartitioned task's watermark: the minimum over every upstream partition, never
        below the task's own (an upstream partition back from idleness holds it, not lowers it)."""
        if len(task.upstream) < self.upstream_count:
            return task.wm
        return max(task.wm, min(task.upstream.values()))

    def marker(self, task: Task, source: str, wm: int, idle: bool = False) -> bool:
        """Record an upstream partition's watermark marker; True when it moved. An idle
        partition's marks rise with the wall clock; its first marker after that counts even
        lower, since it holds the task back again from where it is."""
        if not idle and source in task.upstream_idle:
            task.upstream_idle.discard(source)
            task.upstream[source] = wm
            return True
        if idle:
            task.upstream_idle.add(source)
        if wm > task.upstream.get(source, NO_WATERMARK):
            task.upstream[source] = wm
            return True
        return False

    def marker_due(self, task: Task) -> tuple[int, bool] | None:
        """The marker a stage-1 task writes now (watermark, idle), or None: nothing new to say.
        Its first marker goes out even without a watermark: the stage behind it may still take
        it for idle (from before a restart)."""
        mark = (task.idle_wm, True) if task.idle else (task.wm, False)
        if mark == task.sent or (mark[0] == NO_WATERMARK and task.sent is not None and not task.sent[1]):
            return None
        return mark
