"""The table side of a worker's joins: which table partitions it reads, from where, and where
their records go.

The table topics are read by the worker's one consumer, *assigned* (never subscribed) next to
the stream partitions, read_committed like them. Their offsets are never committed to the
group: each join keeps, in its own store (and so in every checkpoint), the next offset of each
table partition it reads (``JoinOperator.table_offsets``). A worker reads a table partition
from the lowest of its tasks' offsets and gives every record to every join reading that
partition; a join skips what it has seen. Global joins read every partition of their table,
co-partitioned joins the one numbered like the task's stream partition.

The stream is not paused while the table bootstraps: each join holds the stream records in its
store until its table partitions are read up to their end offsets as of the start
(``JoinOperator.bootstrap``), which gives the same answers with one consumer and no pausing.

A table record's event time is its Kafka timestamp; its key is the message key (UTF-8); its
value a JSON object, or null (a tombstone). A record that is none of these is dead-lettered
once (``bad_key``, ``decode_error``, ``not_an_object``) and skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from weir.graph import JobGraph
from weir.join import JoinOperator
from weir.join_stage import JoinStage, JoinStep
from weir.records import DeadLetter
from weir.spec_common import SpecError
from weir.tasks import EARLIEST, Message, Task

__all__ = ["TableEnds", "TableFeed"]

TableEnds = Callable[[list[Task]], Mapping[tuple[str, int], tuple[int, int]]]
"""``ends(table tasks)``: each table partition's ``(low, high)`` watermark offsets now."""

_Reader = tuple[Task, JoinStep, JoinOperator]


class TableFeed:
    """A worker's table partitions (``tasks``, not checkpointed: the joins' stores hold their
    progress) and the joins they feed (see the module docstring)."""

    def __init__(
        self, graph: JobGraph, partitions: Mapping[str, int], keyed: Iterable[Task], now: float
    ) -> None:
        self.graph = graph
        keyed = list(keyed)
        missing = [t for t in graph.table_topics if t not in partitions]
        if missing:
            raise SpecError([f"join table topic {missing[0]!r} is unknown to the edges"])
        self.counts = {t: partitions[t] for t in graph.table_topics}
        stream_count = _stream_partitions(graph, partitions)
        wanted: dict[tuple[str, int], None] = {}
        for step in graph.joins:
            n = self.counts[step.topic]
            if step.mode == "copartitioned" and n != stream_count:
                raise SpecError(
                    [
                        f"spec.pipeline.steps[{step.index}].join.topic: a copartitioned table needs as "
                        f"many partitions as the stream it joins ({step.topic!r} has {n}, the stream "
                        f"{stream_count})"
                    ]
                )
            for task in keyed:
                for p in step.table_partitions(task.partition, n):
                    wanted[(step.topic, p)] = None
        self.tasks = {tp: Task(tp[0], tp[1], f"{tp[0]}-{tp[1]}", last_record=now) for tp in wanted}
        self.topics = frozenset(graph.table_topics)
        self._readers: dict[tuple[str, int], list[_Reader]] = {}

    def partitions_for(self, step: JoinStep, stream_partition: int) -> list[int]:
        """The table partitions the join ``step`` of stream partition's task reads."""
        return step.table_partitions(stream_partition, self.counts[step.topic])

    def start(self, keyed: Iterable[Task], ends: TableEnds) -> list[Task]:
        """After the restore (the joins are built from their restored stores): route each table
        partition to its joins, bootstrap them to the partitions' current ends, and return the
        table tasks positioned where the furthest-behind join needs them."""
        readers: dict[tuple[str, int], list[_Reader]] = {tp: [] for tp in self.tasks}
        for task in keyed:
            op = task.op
            if not isinstance(op, JoinStage):
                continue
            for step, join in op.joins:
                for p in self.partitions_for(step, task.partition):
                    readers[(step.topic, p)].append((task, step, join))
        self._readers = readers
        now_ends = ends(list(self.tasks.values()))
        for task in keyed:
            if isinstance(task.op, JoinStage):
                for step, join in task.op.joins:
                    parts = self.partitions_for(step, task.partition)
                    bounds = {p: now_ends.get((step.topic, p), (0, 0)) for p in parts}
                    join.bootstrap({p: hi for p, (lo, hi) in bounds.items() if lo < hi})
        for tp, table_task in self.tasks.items():
            offsets = [join.table_offsets()[tp[1]] for _, _, join in readers[tp]]
            start = min(offsets, default=-1)
            table_task.next_offset = EARLIEST if start < 0 else start
        return list(self.tasks.values())

    def split(
        self, msgs: list[Message], now: float, dead_letter: Callable[[Message, Exception], None]
    ) -> tuple[list[Message], set[Task]]:
        """Apply the table records among ``msgs``; returns the stream records, in order, and the
        stream tasks whose joins took table records (their held records may be due)."""
        topics = self.topics
        if not any(m.topic() in topics for m in msgs):
            return msgs, set()
        stream: list[Message] = []
        touched: set[Task] = set()
        for m in msgs:
            topic = m.topic()
            if topic not in topics:
                stream.append(m)
                continue
            p, offset = m.partition(), m.offset()
            table_task = self.tasks[(topic, p)]
            table_task.last_record = now
            table_task.next_offset = offset + 1
            readers = self._readers.get((topic, p), [])
            try:
                key, value = _decode(m)
            except DeadLetter as exc:
                # Once: a join that read past it (restored from a later checkpoint) skips it.
                if any(join.table_offsets()[p] <= offset for _, _, join in readers):
                    dead_letter(m, exc)
                for _, _, join in readers:
                    join.table_position(p, offset + 1)
                continue
            ts = m.timestamp()[1]
            for task, _, join in readers:
                join.table_record(p, offset, key, ts, value)
                touched.add(task)
        return stream, touched

    def tick(self, now: float, caught_up: Callable[[Task], bool], position: Callable[[Task], int]) -> None:
        """Tell the joins where the reader is (past transaction markers and compacted gaps) and
        which caught-up table partitions have been quiet for their idle timeout."""
        for tp, table_task in self.tasks.items():
            readers = self._readers.get(tp, [])
            if not readers:
                continue
            pos = position(table_task)
            quiet = None
            for _, step, join in readers:
                if pos >= 0:
                    join.table_position(tp[1], pos)
                idle_s = step.idle_timeout_ms / 1000
                if idle_s and now - table_task.last_record >= idle_s:
                    if quiet is None:
                        quiet = caught_up(table_task)
                    if quiet:
                        join.table_idle(tp[1])


def _stream_partitions(graph: JobGraph, partitions: Mapping[str, int]) -> int:
    """How many partitions the keyed stage's stream has (what a co-partitioned table must match)."""
    if graph.repartition_topic is not None and graph.repartition_topic in partitions:
        return partitions[graph.repartition_topic]
    return max((partitions[t] for t in graph.source_topics), default=0)


def _decode(m: Message) -> tuple[str, dict[str, Any] | None]:
    raw_key = m.key()
    if raw_key is None:
        raise DeadLetter("bad_key", "a table record needs a message key (the table key)")
    try:
        key = raw_key.decode()
    except UnicodeDecodeError as exc:
        raise DeadLetter("bad_key", f"table key is not UTF-8: {exc.reason} at byte {exc.start}") from None
    value = m.value()
    if value is None:
        return key, None
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DeadLetter("decode_error", f"table value: {exc}") from None
    if not isinstance(decoded, dict):
        raise DeadLetter(
            "not_an_object", f"a table value must be a JSON object, not {type(decoded).__name__}"
        )
    return key, decoded
