"""The task core's result path with a recording output: results that cannot be written are dead-lettered."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from weir.core import TaskCore
from weir.graph import compile_job
from weir.results import result_record
from weir.spec import load_job
from weir.tasks import Task
from weir.testing import InMemoryWindowStore
from weir.window_operator import WindowOperator, WindowResult

END_OF_TIME = 2**62
OUTPUTS = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "amount"}}


class RecordingProducer:
    """Keeps what the core writes (its ``send``: the open transaction's ``produce``)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]] = []

    def produce(
        self, topic: str, value: bytes | None, key: bytes | None, partition: int = -1, headers: Any = None
    ) -> None:
        self.sent.append((topic, value, key, {k: v for k, v in headers or ()}))


class FakeMessage:
    def __init__(self, value: bytes, key: bytes, offset: int) -> None:
        self._value, self._key, self._offset = value, key, offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def worker_and_task(tmp_path: Path) -> tuple[TaskCore, Task, RecordingProducer]:
    job_path = tmp_path / "job.json"
    job_path.write_bytes(
        orjson.dumps(
            {
                "apiVersion": "weir.dev/v1alpha1",
                "kind": "StreamJob",
                "metadata": {"name": "poison", "namespace": "test"},
                "spec": {
                    "kafka": {"bootstrapServers": "127.0.0.1:1"},
                    "pipeline": {
                        "source": {"topics": ["events"], "eventTime": {"field": "ts"}},
                        "steps": [
                            {"window": {"type": "tumbling", "size": "10s"}},
                            {"aggregate": {"outputs": OUTPUTS}},
                        ],
                        "sink": {"topic": "out"},
                        "deadLetter": {"topic": "dlq"},
                    },
                },
            }
        )
    )
    graph = compile_job(load_job(job_path), wall_ms=lambda: 1_704_067_200_000)
    core = TaskCore(graph)
    producer = RecordingProducer()
    core.send = producer.produce
    agg = graph.window.aggregator
    store = InMemoryWindowStore(agg.dumps, agg.loads)
    op = WindowOperator("tumbling", 10_000, None, None, 0, agg, "final", store)
    return core, Task("events", 0, "events-0", op, None), producer


def test_a_window_whose_restored_sum_was_lost_is_dead_lettered_and_the_others_are_written(
    tmp_path: Path,
) -> None:
    worker, task, producer = worker_and_task(tmp_path)
    assert task.op is not None
    store = task.op._store
    agg = worker.graph.window.aggregator
    # What a weir before the overflow rule checkpointed: an infinite sum, written as null.
    poisoned = agg.create()
    poisoned[:2] = [2, math.inf]
    store.put(("a", 0, 10_000), poisoned)
    healthy = agg.create()
    healthy[:2] = [1, 5]
    store.put(("b", 0, 10_000), healthy)
    task.op.restore()
    task.wm = END_OF_TIME

    worker.fire(task)

    sent = {topic: (value, key, headers) for topic, value, key, headers in producer.sent}
    assert set(sent) == {"out", "dlq"}
    assert orjson.loads(sent["out"][0] or b"")["key"] == "b"
    value, key, headers = sent["dlq"]
    assert key == b"a"
    assert headers["weir.reason"] == b"unserializable_result"
    assert headers["weir.detail"] == (
        b"window [0, 10000) of key 'a': aggregate 'total' is nan, which JSON output cannot carry"
    )
    assert orjson.loads(value or b"")["total"] == "nan"
    assert worker.dead_lettered == {"unserializable_result": 1}
    assert worker.records_out == 1


def test_records_that_would_overflow_are_dead_lettered_without_moving_the_watermark(tmp_path: Path) -> None:
    worker, task, producer = worker_and_task(tmp_path)
    assert task.op is not None
    t0 = 1_704_067_200_000
    batch = [
        FakeMessage(orjson.dumps({"ts": t0, "amount": 2**63 - 1}), b"a", 0),
        FakeMessage(orjson.dumps({"ts": t0 + 5_000, "amount": 1}), b"a", 1),  # overflow
        FakeMessage(orjson.dumps({"ts": t0 + 900_000, "amount": 2**64 - 1}), b"a", 2),  # overflow
        FakeMessage(orjson.dumps({"ts": t0 + 3_000, "amount": -1}), b"a", 3),
    ]

    worker._prepare(task, batch, task.op.process)  # type: ignore[arg-type]

    assert [headers["weir.reason"] for _, _, _, headers in producer.sent] == [b"overflow", b"overflow"]
    assert [headers["weir.source.offset"] for _, _, _, headers in producer.sent] == [b"1", b"2"]
    assert task.wm == t0 + 3_000, "only records that were applied move the watermark"
    assert task.late == 0
    (result,) = task.op.advance(END_OF_TIME)
    assert result.values == {"n": 2, "total": 2**63 - 2}


@pytest.mark.parametrize(
    ("result", "with_final", "expected"),
    [
        (WindowResult("k", 0, 10, {"n": 1}, True), False, {"n": 1}),
        (WindowResult("k", 0, 10, {"n": 1}, False), True, {"n": 1, "final": False}),
        (WindowResult("k", 0, 10, {}, False, True), True, {"final": False, "retract": True}),
    ],
)
def test_a_retraction_is_a_result_record_with_retract_true_and_no_values(
    result: WindowResult, with_final: bool, expected: dict[str, Any]
) -> None:
    record = result_record(result, with_final)
    bounds = {"key", "windowStart", "windowEnd", "windowStartMs", "windowEndMs"}
    assert {k: v for k, v in record.items() if k not in bounds} == expected
