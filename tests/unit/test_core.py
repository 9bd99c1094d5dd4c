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


def graph_of(tmp_path: Path, steps: list[dict[str, Any]]) -> JobGraph:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "core", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": {"topics": ["events"], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "0ms"},
                "steps": steps,
                "sink": {"topic": "out"},
                "deadLetter": {"topic": "dlq"},
            },
        },
    }
    return compile_job(load_job(orjson.dumps(doc).decode()), wall_ms=lambda: WALL)


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
