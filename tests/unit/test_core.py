"""The task core with hand-written fakes: watermarks and idleness on an injected clock, and each
keyed stage (window, process function, none) fed messages and writing to a recording output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from weir.core import TaskCore
from weir.functions import FunctionFailed
from weir.graph import JobGraph, compile_job
from weir.native import available as native_available
from weir.process import Context, ProcessFunction
from weir.spec import load_job
from weir.tasks import NO_WATERMARK, Consumed, Task, Watermarks

T0 = 1_704_067_200_000
WALL = T0 + 3_600_000


# -- watermarks on an injected clock -------------------------------------------------------------


def test_a_caught_up_partition_goes_idle_after_the_timeout_and_its_watermark_follows_the_wall_clock() -> None:
    marks = Watermarks(max_out_of_orderness_ms=2_000, idle_timeout_ms=5_000)
    task = Task("events", 0, "events-0", wm=T0)
    marks.saw_records(task, now=100.0)

    marks.idle(task, now=104.9, wall_ms=WALL, caught_up=lambda _t: True)
    assert (task.idle, task.wm) == (False, T0), "quiet for less than the timeout: not idle"

    marks.idle(task, now=105.0, wall_ms=WALL, caught_up=lambda _t: True)
    assert (task.idle, task.wm) == (True, WALL - 2_000)

    marks.saw_records(task, now=106.0)
    assert not task.idle, "a record ends idleness"


def test_a_partition_with_records_waiting_is_slow_not_idle_and_keeps_its_watermark() -> None:
    marks = Watermarks(2_000, 5_000)
    task = Task("events", 0, "events-0", wm=T0)
    asked: list[Task] = []

    def behind(t: Task) -> bool:
        asked.append(t)
        return False

    marks.idle(task, now=1_000.0, wall_ms=WALL, caught_up=behind)

    assert (task.idle, task.wm, asked) == (False, T0, [task])


def test_idleness_never_lowers_a_watermark_and_a_zero_timeout_disables_it() -> None:
    task = Task("events", 0, "events-0", wm=WALL + 60_000)  # event times ahead of the wall clock
    Watermarks(0, 5_000).idle(task, now=1_000.0, wall_ms=WALL, caught_up=lambda _t: True)
    assert task.wm == WALL + 60_000
    other = Task("events", 1, "events-1", wm=T0)
    Watermarks(0, 0).idle(other, now=1_000.0, wall_ms=WALL, caught_up=lambda _t: True)
    assert (other.idle, other.wm) == (False, T0)


def test_a_repartitioned_task_waits_for_every_upstream_partition_then_takes_the_minimum() -> None:
    marks = Watermarks(0, 0, upstream_count=3)
    task = Task("rp", 0, "rp-0")
    assert marks.marker(task, "events-0", T0 + 50)
    assert marks.marker(task, "events-1", T0 + 10)
    assert marks.upstream_min(task) == NO_WATERMARK, "one upstream partition has not reported"
    assert marks.marker(task, "events-2", T0 + 30)
    assert marks.upstream_min(task) == T0 + 10
    assert not marks.marker(task, "events-1", T0 + 5), "an older marker does not move it back"
    assert marks.upstream_min(task) == T0 + 10


# -- the keyed stages ----------------------------------------------------------------------------


class Counter(ProcessFunction):
    """Counts records per key; raises on ``boom``; emits the count at a timer 10 s later."""

    def open(self, state: Any) -> None:
        self.count = state.value("count")

    def process(self, record: dict[str, Any], ctx: Context) -> Any:
        if record.get("boom"):
            raise ValueError("boom record")
        self.count.set((self.count.get() or 0) + 1)
        ctx.timers.register(ctx.timestamp + 10_000)
        if record.get("bad_output"):
            return {"not json": {1, 2}}
        return None

    def on_timer(self, timestamp: int, ctx: Context) -> Any:
        return {"key": ctx.key, "count": self.count.get(), "at": timestamp}


def graph_of(
    tmp_path: Path, steps: list[dict[str, Any]], idle_timeout: str = "0s", native: bool | None = None
) -> JobGraph:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "core", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": {"topics": ["events"], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "0ms", "idleTimeout": idle_timeout},
                "steps": steps,
                "sink": {"topic": "out"},
                "deadLetter": {"topic": "dlq"},
            },
        },
    }
    return compile_job(load_job(orjson.dumps(doc).decode()), wall_ms=lambda: WALL, native=native)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, bytes | None, dict[str, bytes]]] = []

    def produce(
        self, topic: str, value: bytes | None, key: bytes | None, partition: int = -1, headers: Any = None
    ) -> None:
        self.sent.append((topic, orjson.loads(value) if value else None, key, dict(headers or ())))

    def to(self, topic: str) -> list[Any]:
        return [v for t, v, _k, _h in self.sent if t == topic]


def core_with(tmp_path: Path, graph: JobGraph) -> tuple[TaskCore, Recorder]:
    core = TaskCore(graph)
    out = Recorder()
    core.send = out.produce
    core.build({"events": 1}, 0, 1, 0.0)
    for task in core.tasks.values():
        core.open_state(task, tmp_path / task.label)
        task.next_offset = 0
    return core, out


def messages(*records: dict[str, Any], key: bytes = b"u1") -> list[Consumed]:
    return [Consumed("events", 0, i, key, orjson.dumps(r)) for i, r in enumerate(records)]


def test_a_process_function_emits_at_its_timers_and_its_failures_are_dead_lettered_alone(
    tmp_path: Path,
) -> None:
    graph = graph_of(tmp_path, [{"process": {"function": "tests.unit.test_core:Counter"}}])
    core, out = core_with(tmp_path, graph)

    core.process(
        messages(
            {"ts": T0},
            {"ts": T0 + 1_000, "boom": True},
            {"ts": T0 + 2_000},
            {"ts": T0 + 30_000},  # moves the watermark past the first two timers
        ),
        now=1.0,
    )

    assert out.to("out") == [
        {"key": "u1", "count": 3, "at": T0 + 10_000},
        {"key": "u1", "count": 3, "at": T0 + 12_000},
    ]
    ((_t, value, key, headers),) = [s for s in out.sent if s[0] == "dlq"]
    assert headers["weir.reason"] == b"function_error"
    assert headers["weir.detail"] == b"tests.unit.test_core:Counter: ValueError: boom record"
    assert headers["weir.source.offset"] == b"1" and key == b"u1" and value["boom"] is True
    assert core.dead_lettered == {"function_error": 1}
    assert core.records_out == 2


def test_a_process_output_json_cannot_carry_is_dead_lettered_and_the_rest_written(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, [{"process": {"function": "tests.unit.test_core:Counter"}}])
    core, out = core_with(tmp_path, graph)

    core.process(messages({"ts": T0, "bad_output": True}, {"ts": T0 + 20_000}, {"ts": T0 + 20_001}), now=1.0)

    (dead,) = [h for t, _v, _k, h in out.sent if t == "dlq"]
    assert dead["weir.reason"] == b"unserializable_result"
    assert out.to("out") == [{"key": "u1", "count": 2, "at": T0 + 10_000}]


def test_on_error_fail_stops_the_core_with_the_cause(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, [{"process": {"function": "tests.unit.test_core:Counter", "onError": "fail"}}])
    core, _out = core_with(tmp_path, graph)

    with pytest.raises(FunctionFailed, match=r"Counter raised on a record \(onError: fail\): ValueError"):
        core.process(messages({"ts": T0, "boom": True}), now=1.0)


def test_a_stateless_pipeline_writes_every_mapped_record_once_keyed_by_its_key(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, [{"map": {"function": "user_functions:add_total"}}])
    core, out = core_with(tmp_path, graph)

    core.process(
        messages(
            {"ts": T0, "price": 2, "qty": 3}, {"ts": T0 + 1, "price": 5}, {"ts": T0 + 2, "price": 1, "qty": 1}
        ),
        now=1.0,
    )

    assert out.to("out") == [
        {"ts": T0, "price": 2, "qty": 3, "total": 6},
        {"ts": T0 + 2, "price": 1, "qty": 1, "total": 1},
    ]
    assert [h["weir.reason"] for t, _v, _k, h in out.sent if t == "dlq"] == [b"function_error"]
    assert all(k == b"u1" for t, _v, k, _h in out.sent if t == "out")


def test_a_flat_map_feeds_every_record_it_makes_to_the_window(tmp_path: Path) -> None:
    graph = graph_of(
        tmp_path,
        [
            {"flatMap": {"function": "user_functions:explode"}},
            {"window": {"type": "tumbling", "size": "10s"}},
            {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
        ],
    )
    core, out = core_with(tmp_path, graph)

    core.process(
        messages(
            {"ts": T0, "user": "u1", "items": ["a", "b", "c"]},
            {"ts": T0 + 1, "user": "u1", "items": []},
            {"ts": T0 + 60_000, "user": "u1", "items": ["z"]},
        ),
        now=1.0,
    )

    assert [(r["windowStartMs"], r["n"]) for r in out.to("out")] == [(T0, 3)]


# -- an upstream partition back from idleness ----------------------------------------------------


class Pipe:
    """A repartitioned job's core on two source partitions and one repartition partition: what
    stage 1 writes to the repartition topic comes back to stage 2 when ``deliver`` is called."""

    def __init__(self, tmp_path: Path, native: bool) -> None:
        steps = [
            {"keyBy": {"field": "user"}},
            {"window": {"type": "tumbling", "size": "10s"}},
            {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
        ]
        graph = graph_of(tmp_path, steps, idle_timeout="5s", native=native)
        assert (graph.native is not None) == native
        self.rp = graph.repartition_topic
        assert self.rp is not None
        self.core = TaskCore(graph)
        self.core.send = self.send
        self.core.build({"events": 2, self.rp: 1}, 0, 1, 0.0)
        for task in self.core.tasks.values():
            if not task.forward:
                self.core.open_state(task, tmp_path / task.label)
            task.next_offset = 0
        self.pending: list[Consumed] = []
        self.offsets = {0: 0, 1: 0}
        self.results: list[tuple[int, int]] = []
        self.late: list[int] = []

    def send(
        self, topic: str, value: bytes | None, key: bytes | None, partition: int = -1, headers: Any = None
    ) -> None:
        if topic == self.rp:
            self.pending.append(Consumed(topic, 0, 0, key, value))
        elif topic == "out":
            r = orjson.loads(value or b"null")
            self.results.append(((r["windowStartMs"] - T0) // 1000, r["n"]))
        elif topic == "dlq":
            forwarded = orjson.loads(value or b"null")  # [ts, record]
            self.late.append((forwarded[0] - T0) // 1000)

    def records(self, partition: int, *seconds: float, now: float) -> None:
        batch = []
        for s in seconds:
            value = orjson.dumps({"user": "u", "ts": T0 + int(s * 1000)})
            batch.append(Consumed("events", partition, self.offsets[partition], b"k", value))
            self.offsets[partition] += 1
        self.core.process(batch, now)

    def tick(self, now: float) -> None:
        self.core.tick(now, WALL, lambda _t: True, lambda t: t.next_offset)

    def deliver(self, now: float) -> None:
        batch = [Consumed(m.topic(), 0, i, m.key(), m.value()) for i, m in enumerate(self.pending)]
        self.pending = []
        if batch:
            self.core.process(batch, now)
        self.tick(now)


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_an_upstream_partition_back_from_idleness_holds_the_keyed_stage_again_and_loses_nothing_past_it(
    tmp_path: Path, native: bool
) -> None:
    if native and not native_available():
        pytest.skip("the native extension is not built (make setup builds it)")
    pipe = Pipe(tmp_path, native)
    pipe.records(0, 1, now=1.0)
    pipe.tick(now=1.0)
    pipe.records(0, 12, now=5.5)
    pipe.tick(now=6.0)  # partition 1 empty for longer than idleTimeout: idle
    pipe.deliver(now=6.0)
    idle = {t.partition: t.idle for t in pipe.core.tasks.values() if t.forward}
    assert idle == {0: False, 1: True}
    assert pipe.results == [(0, 1)], "the idle partition does not hold the window [0 s, 10 s) open"

    # Partition 1 wakes up behind partition 0, which runs far ahead in the same delivery.
    pipe.records(1, 13, 15, now=8.0)
    pipe.records(0, 35, now=8.0)
    pipe.tick(now=8.0)
    pipe.deliver(now=8.0)
    assert pipe.results == [(0, 1)], "partition 1 holds the window [10 s, 20 s) open again"

    pipe.records(1, 18, 40, now=9.0)
    pipe.records(0, 41, now=9.0)
    pipe.tick(now=9.0)
    pipe.deliver(now=9.0)

    assert pipe.late == [], "no record of the partition that came back is late"
    assert pipe.results == [(0, 1), (10, 4), (30, 1)]
    stage2 = pipe.core.tasks[(pipe.rp, 0)]
    assert stage2.upstream_idle == set() and stage2.wm == T0 + 40_000


def test_an_idle_stage_1_partition_marks_idle_at_the_wall_clock_and_keeps_its_own_watermark() -> None:
    marks = Watermarks(max_out_of_orderness_ms=2_000, idle_timeout_ms=5_000)
    task = Task("events", 0, "events-0", forward=True, wm=T0)
    marks.saw_records(task, now=100.0)
    assert marks.marker_due(task) == (T0, False)
    task.sent = (T0, False)
    assert marks.marker_due(task) is None, "nothing new"

    marks.idle(task, now=105.0, wall_ms=WALL, caught_up=lambda _t: True)
    assert (task.idle, task.wm, marks.marker_due(task)) == (True, T0, (WALL - 2_000, True))
    task.sent = (WALL - 2_000, True)

    marks.saw_records(task, now=106.0)
    assert marks.marker_due(task) == (T0, False), "back: its own watermark again, not the wall clock's"

    task.sent = (T0, False)
    marks.idle(task, now=112.0, wall_ms=WALL + 1_000, caught_up=lambda _t: True)
    restarted = Task("events", 0, "events-0", forward=True)
    restarted.restore_progress(task.progress())
    assert (restarted.idle, restarted.wm) == (True, T0), "a restart keeps its idleness and its own watermark"
    assert marks.marker_due(restarted) == (WALL - 1_000, True), "so the keyed stage is not held back again"

    fresh = Task("events", 1, "events-1", forward=True)
    assert marks.marker_due(fresh) == (NO_WATERMARK, False), "the first marker says it is not idle"
    fresh.sent = (NO_WATERMARK, False)
    assert marks.marker_due(fresh) is None


def test_an_upstream_partition_back_from_idleness_counts_though_lower_and_never_lowers_the_task() -> None:
    marks = Watermarks(0, 0, upstream_count=2)
    task = Task("rp", 0, "rp-0")
    assert marks.marker(task, "events-0", T0 + 50)
    assert marks.marker(task, "events-1", WALL, idle=True)
    task.wm = marks.upstream_min(task)
    assert task.wm == T0 + 50
    assert marks.marker(task, "events-0", T0 + 90)
    task.wm = marks.upstream_min(task)
    assert task.wm == T0 + 90, "the idle partition does not hold it back"

    assert marks.marker(task, "events-1", T0 + 20), "back from idleness: it counts though lower"
    assert task.upstream == {"events-0": T0 + 90, "events-1": T0 + 20} and task.upstream_idle == set()
    assert marks.upstream_min(task) == T0 + 90, "the task's watermark never goes back"
    assert not marks.marker(task, "events-1", T0 + 10), "a non-idle partition's marks only rise"
    assert marks.marker(task, "events-0", T0 + 200)
    assert marks.upstream_min(task) == T0 + 90, "held by the partition that came back"

    restored = Task("rp", 0, "rp-0")
    assert marks.marker(restored, "events-1", WALL, idle=True)
    restored.restore_progress({"wm": T0, **restored.marks()})
    assert restored.upstream_idle == {"events-1"}, "which upstream partitions are idle survives a restart"
