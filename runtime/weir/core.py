"""The task core: every input partition's operators, with no Kafka, no S3 and no wall clock.

Data path of one worker (index ``I`` of ``N``)::

    source partitions p with p % N == I ──► prepare (decode, time, steps, key)
        ├─ no repartition: keyed stage per partition ──► sink topic
        └─ repartition:    ──► repartition topic (records + watermark markers)
    repartition partitions q with q % N == I ──► keyed stage per partition ──► sink

Every input partition is a *task* with its own watermark and (if it runs the keyed stage) its
own RocksDB store, so a partition's state and its offset always move together and results do
not depend on how partitions are spread over workers.

The core is fed batches of messages (anything with Kafka's message accessors, ``Message``) and
writes what they produce through one ``send`` callable (the open transaction's ``produce``);
time reaches it as arguments (``now`` for idleness, ``wall_ms`` for idle watermarks), and
where the partition ends (for idleness and the end of a replay) through callables. So it runs
the same on Kafka (``weir.worker``) and on the in-memory doubles in ``weir.testing``.

Watermarks are ``weir.tasks.Watermarks``; what the worker runs is ``weir.graph.JobGraph``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from weir.aggregates import Overflow
from weir.core_output import CoreOutput
from weir.functions import FunctionError
from weir.graph import JobGraph, assigned
from weir.join_feed import TableEnds, TableFeed
from weir.join_stage import JoinStage, StoreSet, open_join_stage
from weir.native import Fetched
from weir.process import ProcessOperator, open_process
from weir.records import DeadLetter
from weir.repartition import encode_forward, prepare_repartitioned
from weir.results import result_record
from weir.rocksdb_options import RocksMemory
from weir.state import PartitionStore
from weir.tasks import NO_WATERMARK, Headers, LateRecord, Message, Send, Task, Watermarks
from weir.window_operator import WindowOperator

log = logging.getLogger(__name__)

__all__ = ["TaskCore"]


_FIRE_CHUNK = 5000
"""Window results produced per ``advance`` call when many windows close at once."""


def _drop(
    topic: str, value: bytes | None, key: bytes | None, partition: int = -1, headers: Headers | None = None
) -> None:
    raise RuntimeError("the task core has no open transaction to write to")


class TaskCore(CoreOutput):
    """The tasks of one worker and the operators they run; see the module docstring.

    ``send`` is where output goes (the committer points it at the open transaction); the
    counters (``dead_lettered``, ``records_out``, ``out_counts``, ``suppressed``) feed status
    and metrics. ``on_result`` sees every sink record (``weir run --print-results``).
    """

    def __init__(
        self,
        graph: JobGraph,
        metrics: Any = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        max_cached_windows: int = 1_000_000,
    ) -> None:
        self.graph = graph
        self.metrics = metrics
        self.on_result = on_result
        self.max_cached_windows = max_cached_windows
        self.send: Send = _drop
        self.alive: Callable[[], None] = lambda: None
        """Called while many windows fire at once (minutes are possible: busy, not stuck)."""
        self.tasks: dict[tuple[str, int], Task] = {}
        self.watermarks = Watermarks(graph.max_out_of_orderness_ms, graph.idle_timeout_ms)
        self.repartition_partitions = 0
        self.dead_lettered: dict[str, int] = {}
        self.records_out = 0
        self.out_counts: dict[str, int] = {}
        self.out_bytes: dict[str, int] = {}
        self.suppressed = 0
        self._suppress = False
        self.tables: TableFeed | None = None
        """The table partitions the joins read (``weir.join_feed``); None without joins."""

    # -- tasks ------------------------------------------------------------------------
    def build(self, partitions: dict[str, int], index: int, count: int, now: float) -> None:
        """Create this worker's tasks: its source partitions and (with a repartition) its
        partitions of the repartition topic, which run the keyed stage instead."""
        graph = self.graph
        self.tasks = {}
        windows_here = graph.repartition_topic is None
        for topic in graph.source_topics:
            for p in assigned(partitions[topic], index, count):
                self._add(topic, p, windows_here, now)
        self.watermarks.upstream_count = sum(partitions[t] for t in graph.source_topics)
        if graph.repartition_topic:
            self.repartition_partitions = partitions[graph.repartition_topic]
            for q in assigned(self.repartition_partitions, index, count):
                self._add(graph.repartition_topic, q, True, now)
        if graph.joins:
            keyed = [t for t in self.tasks.values() if not t.forward]
            self.tables = TableFeed(graph, partitions, keyed, now)

    def assignment(self, ends: TableEnds) -> list[Task]:
        """What the consumer reads, after the restore: every task's partition and the table
        partitions the joins need (``ends``: their current watermark offsets)."""
        tasks = list(self.tasks.values())
        if self.tables is None:
            return tasks
        return tasks + self.tables.start([t for t in tasks if not t.forward], ends)

    def replay_exact(self, task: Task) -> bool:
        """Whether re-reading ``task``'s partition with output suppressed up to the committed
        offset reproduces the output committed before it (``weir.recovery``'s replay): not behind
        a join (the joins run in the keyed stage), where which held records were released before
        the commit depended on how far the tables had been read."""
        return self.tables is None or task.forward

    def _add(self, topic: str, partition: int, keyed: bool, now: float) -> None:
        label = f"{topic}-{partition}"
        task = Task(topic, partition, label, forward=not keyed, last_record=now)
        if self.metrics is not None:
            task.metrics = self.metrics.bind_partition(label)
        self.tasks[(topic, partition)] = task

    def keyed_tasks(self) -> int:
        return sum(1 for t in self.tasks.values() if not t.forward)

    def open_state(
        self, task: Task, path: Path, memory_bytes: int | None = None, rocks: RocksMemory | None = None
    ) -> None:
        """Open the task's store at ``path`` (what is there, or empty) and its keyed operator:
        the window operator, or the process function's (``FunctionFailed`` when its ``open``
        raises), behind the joins if there are any (``weir.join_stage``). A stateless pipeline
        has none."""
        if self.tables is None:
            self._open_keyed(task, path, memory_bytes, rocks)
            return
        StoreSet.unpack(path)  # a restored checkpoint is one flat directory
        task.op = task.store = None  # a reopened task's are closed: they are not wrapped again
        self._open_keyed(task, path, memory_bytes, rocks)
        open_join_stage(
            task,
            path,
            self.graph.joins,
            self.graph.join_check,
            self.tables.partitions_for,
            rocks,
            lambda error, key, record: self._emit(key, record, error, task),
        )

    def _open_keyed(
        self, task: Task, path: Path, memory_bytes: int | None = None, rocks: RocksMemory | None = None
    ) -> None:
        window, process = self.graph.window, self.graph.process
        task.native = None
        if process is not None:
            op = open_process(process.ref, process.on_error, path, rocks, memory_bytes)  # type: ignore[arg-type]
            task.op, task.store = op, op.store
            return
        if window is None:
            return
        store = PartitionStore(
            path,
            window.aggregator.dumps,
            window.aggregator.loads,
            self.max_cached_windows,
            memory_bytes=memory_bytes,
            rocks=rocks,
        )
        task.store = store
        task.op = WindowOperator(
            window.kind,
            window.size_ms,
            window.slide_ms,
            window.gap_ms,
            window.allowed_lateness_ms,
            window.aggregator,
            window.emit,  # type: ignore[arg-type]
            store,
        )
        if self.graph.native is not None:
            task.native = self.graph.native.task(small=memory_bytes is not None)

    def close(self) -> None:
        for task in self.tasks.values():
            if task.store is not None:
                task.store.close()
        self.tasks = {}

    # -- records ----------------------------------------------------------------------
    def process(self, msgs: Iterable[Message] | Fetched, now: float) -> None:
        """Run a batch of consumed messages (any mix of this worker's partitions)."""
        if isinstance(msgs, Fetched):
            self._process_fetched(msgs, now)
            return
        by_task: dict[Task, list[Message]] = {}
        tasks = self.tasks
        touched: Iterable[Task] = ()
        if self.tables is not None:
            msgs, touched = self.tables.split(list(msgs), now, self.dead_letter)
        last_key: tuple[str, int] | None = None
        bucket: list[Message] = []
        for m in msgs:
            key = (m.topic(), m.partition())
            if key != last_key:  # one dict lookup per run of records from one partition
                bucket = by_task.setdefault(tasks[key], [])
                last_key = key
            bucket.append(m)
        for task, batch in by_task.items():
            self._run_task(task, batch, now)
        for task in touched:  # table records may have made held records due
            self._suppress = task.replay_until is not None
            try:
                self.fire(task)
            finally:
                self._suppress = False

    def _process_fetched(self, fetched: Fetched, now: float) -> None:
        """``process`` for a batch the native reader holds (a natively run pipeline: no join
        tables, no repartition): each partition's records fold where they lie, unless the task
        replays (then they run as Python records)."""
        tasks = self.tasks
        for group, (topic, partition, _count, last) in enumerate(fetched.groups):
            task = tasks[(topic, partition)]
            if task.native is None or task.replay_until is not None:
                self._run_task(task, fetched.records(group), now)
                continue
            self.watermarks.saw_records(task, now)
            if task.topic == self.graph.repartition_topic:
                self._forwarded_native(task, (fetched, group))
            else:
                self._prepare_native(task, (fetched, group))
            task.next_offset = last + 1
            self.fire(task)

    def _run_task(self, task: Task, batch: list[Message], now: float) -> None:
        """One task's part of a batch, in order; a replay produces nothing up to the committed
        offset."""
        back = task.idle
        self.watermarks.saw_records(task, now)
        if back and task.forward:
            self._send_markers(task)  # before its records: the keyed stage waits for it again
        until = task.replay_until
        if until is None:
            self._process_task(task, batch)
            return
        cut = next((i for i, m in enumerate(batch) if m.offset() >= until), len(batch))
        if cut:
            self._suppress = True
            try:
                self._process_task(task, batch[:cut])
            finally:
                self._suppress = False
        if cut < len(batch):
            self.end_replay(task)
            self._process_task(task, batch[cut:])

    def _process_task(self, task: Task, batch: list[Message]) -> None:
        if task.topic == self.graph.repartition_topic:
            self._keyed_repartitioned(task, batch)
        else:
            accept = (
                self._forward if task.forward else task.op.process if task.op is not None else self._to_sink
            )
            if task.native is not None and self.graph.prepare_many is not None:
                self._prepare_many(task, batch, self._native_accept(task))
                self._flush_native(task)
            elif task.native is not None:
                self._prepare_native(task, batch)
            elif self.graph.prepare_many is not None:
                self._prepare_many(task, batch, accept)
            else:
                self._prepare(task, batch, accept)
        task.next_offset = batch[-1].offset() + 1
        self.fire(task)

    def end_replay(self, task: Task) -> None:
        """The task has re-read up to the committed offset: lift its watermark to the one it had
        there (windows that closed then were emitted then) and start producing again."""
        if task.replay_wm is not None and task.replay_wm > task.wm:
            task.wm = task.replay_wm
        self._suppress = True
        try:
            self.fire(task)
        finally:
            self._suppress = False
        log.info("%s: re-read up to the committed offset %s; producing again", task.name, task.replay_until)
        task.replay_until = task.replay_wm = None

    def _prepare(
        self, task: Task, batch: list[Message], accept: Callable[[str, int, dict[str, Any], int], bool]
    ) -> None:
        """Prepare each source record of one partition and hand it to ``accept``.

        ``accept(key, ts, record, watermark)`` is the keyed operator's ``process`` (False: the
        record is late) or, with a repartition, ``_forward``. Dead letters, the per-record
        watermark and the counters are the same either way.
        """
        prepare = self.graph.prepare
        assert prepare is not None
        ooo = self.graph.max_out_of_orderness_ms
        wm = task.wm
        nbytes = 0
        for m in batch:
            value = m.value()
            if value is not None:
                nbytes += len(value)
            try:
                out = prepare(value, m.key(), m.timestamp()[1])
            except DeadLetter as exc:
                self.dead_letter(m, exc)
                continue
            if out is None:
                continue
            key, ts, record = out
            try:
                accepted = accept(key, ts, record, wm)
            except (Overflow, DeadLetter) as exc:  # not applied, and no watermark move
                self.dead_letter(m, exc)
                continue
            if not accepted:
                task.late += 1
                self.dead_letter(m, LateRecord(ts, wm))
            if ts - ooo > wm:
                wm = ts - ooo
        task.wm = wm
        task.records += len(batch)
        task.bytes += nbytes

    def _prepare_native(self, task: Task, batch: list[Message] | tuple[Fetched, int]) -> None:
        """``_prepare`` into the window operator through the native hot path (``weir.native``):
        the extension folds the batch (a list of messages, or a group of a ``Fetched`` batch
        read where it lies); a late record comes back to be dead-lettered here, and a record it
        cannot certify runs ``_prepare`` at its place, after its window is handed over. Every
        changed window is back in the store when this returns."""
        plan = self.graph.native
        native = task.native
        op = task.op
        assert plan is not None and isinstance(op, WindowOperator)
        horizon = plan.horizon()
        n, message_at = _messages(batch)
        if isinstance(batch, list):
            values = [m.value() for m in batch]
            keys = [m.key() for m in batch] if plan.message_keys else None
            stamps = [m.timestamp()[1] for m in batch] if plan.kafka_time else None

            def run(i: int) -> Any:  # (index, code, task wm, op wm, late ts, late wm)
                return native.run(values, keys, stamps, i, task.wm, op.watermark, horizon, op.stored)

        else:
            fetch, group = batch[0].fetch, batch[1]

            def run(i: int) -> Any:  # (index, code, task wm, op wm, late ts, late wm)
                return native.run_fetched(fetch, group, i, task.wm, op.watermark, horizon, op.stored)

        adopt, process = op.adopt, op.process

        def handed_over(key: str, ts: int, record: dict[str, Any], wm: int) -> bool:
            native.evict(key, ts, adopt)
            return process(key, ts, record, wm)

        i = 0
        while i < n:
            i, code, task.wm, op_wm, ts, late_wm = run(i)
            op.lift_watermark(op_wm)
            if code == 1:
                task.late += 1
                self.dead_letter(message_at(i), LateRecord(ts, late_wm))
            elif code == 2:
                self._prepare(task, [message_at(i)], handed_over)  # counts its record itself
            i += 1
        records, nbytes = native.take_counts()
        task.records += records
        task.bytes += nbytes
        self._flush_native(task)

    def _flush_native(self, task: Task) -> None:
        """Every window the native cache changed back in the store (the windows closed at the
        task's watermark are forgotten there: they fire next)."""
        plan, op = self.graph.native, task.op
        assert plan is not None and isinstance(op, WindowOperator)
        closed = max(task.wm, op.watermark) - plan.allowed_lateness_ms + 1
        task.native.flush(op.adopt, max(closed, NO_WATERMARK))

    def _native_accept(self, task: Task) -> Callable[[str, int, dict[str, Any], int], bool]:
        """The keyed stage's ``accept`` of a pipeline with Python functions whose window segment
        runs natively (a ``prepared`` plan): the window operator's ``process``, folded by the
        extension; a record it hands back gets its windows back in the store first."""
        op = task.op
        assert isinstance(op, WindowOperator)
        fold, evict = task.native.accept, task.native.evict
        process, adopt, stored, cell = op.process, op.adopt, op.stored, op.watermark_cell

        def accept(key: str, ts: int, record: dict[str, Any], wm: int) -> bool:
            code: int = fold(key, ts, record, wm, cell, stored)
            if code == 2:
                evict(key, ts, adopt)
                return process(key, ts, record, wm)
            return code == 0

        return accept

    def _forward(self, key: str, ts: int, record: dict[str, Any], _wm: int) -> bool:
        """Stage 1's ``accept`` with a repartition: send the record on by its group key.

        Keyed by the group key, Kafka's partitioner spreads keys over the repartition
        partitions deterministically, so a key always lands on the same stage-2 task.
        """
        fkey, fvalue = encode_forward(key, ts, record)
        self.out(self.graph.repartition_topic, fvalue, fkey)  # type: ignore[arg-type]
        return True

    def _prepare_many(
        self, task: Task, batch: list[Message], accept: Callable[[str, int, dict[str, Any], int], bool]
    ) -> None:
        """``_prepare`` for pipelines with Python functions: a record may become several (or
        none). A failure dead-letters the source record once; results already accepted stay."""
        prepare = self.graph.prepare_many
        assert prepare is not None
        ooo = self.graph.max_out_of_orderness_ms
        wm = task.wm
        nbytes = 0
        for m in batch:
            value = m.value()
            if value is not None:
                nbytes += len(value)
            try:
                outs = prepare(value, m.key(), m.timestamp()[1])
                for key, ts, record in outs:
                    if not accept(key, ts, record, wm):
                        task.late += 1
                        self.dead_letter(m, LateRecord(ts, wm))
                        break
            except (Overflow, DeadLetter) as exc:
                self.dead_letter(m, exc)
                continue
            for _key, ts, _record in outs:
                if ts - ooo > wm:
                    wm = ts - ooo
        task.wm = wm
        task.records += len(batch)
        task.bytes += nbytes

    def _to_sink(self, key: str, ts: int, record: dict[str, Any], _wm: int) -> bool:
        """The ``accept`` of a stateless pipeline: every prepared record goes to the sink."""
        self._emit(key, record, None)
        return True

    def _keyed_repartitioned(self, task: Task, batch: list[Message]) -> None:
        """Stage 2: records and upstream watermark markers from the repartition topic."""
        if task.native is not None:
            self._forwarded_native(task, batch)
            return
        assert task.op is not None
        wm = self._forwarded(task, batch, self.watermarks.upstream_min(task), task.op.process)
        task.wm = max(task.wm, wm)

    def _forwarded(
        self,
        task: Task,
        batch: list[Message],
        wm: int,
        process: Callable[[str, int, dict[str, Any], int], bool],
    ) -> int:
        """Stage 2's messages at the upstream watermark ``wm``: a record goes to ``process``, a
        marker may move ``wm``. Returns the watermark after them."""
        loads = orjson.loads
        marks = self.watermarks
        nbytes = 0
        for m in batch:
            value = m.value()
            nbytes += len(value) if value is not None else 0
            k = m.key()
            if k is None:  # a watermark marker: {"src": "<topic>-<partition>", "wm": ms[, "idle": true]}
                marker = loads(value)  # type: ignore[arg-type]
                if marks.marker(task, marker["src"], marker["wm"], marker.get("idle") is True):
                    wm = max(wm, marks.upstream_min(task))
                continue
            try:
                key, ts, record = prepare_repartitioned(value, k, 0)
                accepted = process(key, ts, record, wm)
            except (DeadLetter, Overflow) as exc:
                self.dead_letter(m, exc)
                continue
            if not accepted:
                task.late += 1
                self.dead_letter(m, LateRecord(ts, wm))
        task.records += len(batch)
        task.bytes += nbytes
        return wm

    def _forwarded_native(self, task: Task, batch: list[Message] | tuple[Fetched, int]) -> None:
        """``_keyed_repartitioned`` through the native hot path (a ``forwarded`` plan): the
        extension folds the forwarded records; a marker, or a record it cannot certify, runs
        ``_forwarded`` at its place (the record after its windows are handed over), a late
        record is dead-lettered here."""
        native, op = task.native, task.op
        assert isinstance(op, WindowOperator)
        cell, stored, adopt, process = op.watermark_cell, op.stored, op.adopt, op.process
        n, message_at = _messages(batch)
        if isinstance(batch, list):
            values = [m.value() for m in batch]
            keys = [m.key() for m in batch]

            def run(i: int, wm: int) -> Any:  # (index, code, late ts)
                return native.run_forwarded(values, keys, i, wm, cell, stored)

        else:
            fetch, group = batch[0].fetch, batch[1]

            def run(i: int, wm: int) -> Any:  # (index, code, late ts)
                return native.run_forwarded_fetched(fetch, group, i, wm, cell, stored)

        def handed_over(key: str, ts: int, record: dict[str, Any], wm: int) -> bool:
            native.evict(key, ts, adopt)
            return process(key, ts, record, wm)

        wm = self.watermarks.upstream_min(task)
        i = 0
        while i < n:
            i, code, ts = run(i, wm)
            if i == n:
                break
            if code == 1:
                task.late += 1
                self.dead_letter(message_at(i), LateRecord(ts, wm))
            else:  # a marker, or a record for the Python path
                wm = self._forwarded(task, [message_at(i)], wm, handed_over)
            i += 1
        records, nbytes = native.take_counts()
        task.records += records
        task.bytes += nbytes
        task.wm = max(task.wm, wm)
        self._flush_native(task)

    # -- time -------------------------------------------------------------------------
    def tick(
        self,
        now: float,
        wall_ms: int,
        caught_up: Callable[[Task], bool],
        position: Callable[[Task], int],
    ) -> None:
        """Periodic work: end replays, idle watermarks, watermark markers and firing.

        ``caught_up(task)``: the task has read all its partition holds; ``position(task)``: where
        the reader is in the task's partition (past transaction markers too)."""
        marks = self.watermarks
        repartition = self.graph.repartition_topic
        if self.tables is not None:
            self.tables.tick(now, caught_up, position)
        for task in self.tasks.values():
            if task.replay_until is not None and position(task) >= task.replay_until:
                self.end_replay(task)
            if task.topic == repartition:
                task.wm = max(task.wm, marks.upstream_min(task))
            else:
                marks.idle(task, now, wall_ms, caught_up)
            if task.forward:
                self._send_markers(task)
            else:
                self.fire(task)

    def _send_markers(self, task: Task) -> None:
        """Write a stage-1 task's watermark to every repartition partition, when it has news:
        ``{"src": "<topic>-<partition>", "wm": ms}``, with ``"idle": true`` while it is idle."""
        mark = self.watermarks.marker_due(task)
        if mark is None:
            return
        topic = self.graph.repartition_topic
        assert topic is not None
        wm, idle = mark
        fields: dict[str, Any] = {"src": task.label, "wm": wm}
        if idle:
            fields["idle"] = True
        marker = orjson.dumps(fields)
        for q in range(self.repartition_partitions):
            self.out(topic, marker, None, q)
        task.sent = mark

    # -- results ----------------------------------------------------------------------
    def fire(self, task: Task) -> None:
        """Emit what the task's watermark completes. In chunks, so closing a million windows
        never holds a million results in memory."""
        if task.op is None:
            return
        while self._fire_some(task):
            self.alive()

    def _fire_some(self, task: Task) -> bool:
        op = task.op
        if isinstance(op, ProcessOperator) or (isinstance(op, JoinStage) and not op.windowed):
            for made in op.take():
                self._emit(made.key, made.record, made.error, task)
            for made in op.advance(task.wm, _FIRE_CHUNK):
                self._emit(made.key, made.record, made.error, task)
            return op.firing
        assert op is not None and self.graph.window is not None
        results = op.advance(task.wm, _FIRE_CHUNK)
        if not results:
            return False
        topic = self.graph.sink_topic
        with_final = self.graph.window.emit == "updates"
        out = self.out
        dumps = orjson.dumps
        unrepresentable = self.graph.window.aggregator.unrepresentable
        on_result = self.on_result
        sent = 0
        for r in results:
            record = result_record(r, with_final)
            # A result that cannot be written must not stop the worker: it would fire again
            # after every restart (a crash loop). It goes to the dead-letter topic instead.
            try:
                bad = None if r.retract else unrepresentable(r.values)
                if bad is not None:
                    if isinstance(r.values[bad], FunctionError):
                        raise r.values[bad]
                    raise ValueError(
                        f"aggregate {bad!r} is {r.values[bad]!r}, which JSON output cannot carry"
                    )
                value = dumps(record)
            except (TypeError, ValueError, FunctionError) as exc:  # orjson.JSONEncodeError is a TypeError
                self._dead_letter_result(task, r, record, exc)
                continue
            out(topic, value, r.key.encode())
            sent += 1
            if on_result is not None:
                on_result(record)
        self.records_out += sent
        return op.firing

    def _emit(
        self, key: str, record: dict[str, Any] | None, error: Exception | None, task: Task | None = None
    ) -> None:
        """Write a record a function made (a process function's, or a stateless pipeline's);
        what cannot be written, or the error that replaced it, goes to the dead-letter topic."""
        if error is None and record is not None:
            try:
                value = orjson.dumps(record)
            except TypeError as exc:  # not JSON: a set, bytes, an int beyond 64 bits, NaN keys...
                error = exc
            else:
                self.out(self.graph.sink_topic, value, key.encode())
                self.records_out += 1
                if self.on_result is not None:
                    self.on_result(record)
                return
        reason = str(getattr(error, "reason", "unserializable_result"))
        detail = str(getattr(error, "detail", error))
        self._result_dead_letter(
            reason, f"output of key {key!r}: {detail}", key, record or {"key": key}, task
        )


def _messages(batch: list[Message] | tuple[Fetched, int]) -> tuple[int, Callable[[int], Message]]:
    """How many messages a batch of the native path holds, and the one at an index (of a
    ``Fetched`` group: built when asked for, for the Python path)."""
    if isinstance(batch, list):
        return len(batch), batch.__getitem__
    fetched, group = batch
    return fetched.groups[group][2], lambda i: fetched.records(group, i, i + 1)[0]
