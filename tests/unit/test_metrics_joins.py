"""The join series on /metrics (weir.join_metrics): they follow what the joins do, step by step
on a real join store, and through a whole job on the in-memory broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from rocksdict import WriteBatch
from tests.unit.test_join_pipeline import SINK_GRAPH, broker_with, data, reasons

from weir.join import JoinOperator, JoinSpec
from weir.join_metrics import publish_joins
from weir.join_stage import JoinStage, JoinStep
from weir.join_table import JoinStore
from weir.metrics import WorkerMetrics
from weir.tasks import Task
from weir.testing.broker import memory_worker

STEP = JoinStep(
    index=2,
    topic="catalog",
    key_field=None,
    mode="global",
    spec=JoinSpec(fields=("price",), kind="inner", grace_ms=0, retention_ms=10_000),
    idle_timeout_ms=0,
)
IDENTITY = {"streamjob": "ns/job", "worker": "0"}


class Metrics:
    def __init__(self) -> None:
        self.m = WorkerMetrics("ns/job", 0)

    def __call__(self, name: str, step: str = "2", topic: str = "catalog", **labels: str) -> float | None:
        return self.m.registry.get_sample_value(name, {**IDENTITY, "step": step, "topic": topic, **labels})

    def updates(self) -> tuple[float | None, ...]:
        return tuple(self("weir_join_table_updates_total", outcome=o) for o in ("applied", "late", "dropped"))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def task_with(op: JoinOperator, dead: list[Any]) -> Task:
    task = Task("purchases", 0, "purchases-0")
    task.op = JoinStage([(STEP, op)], None, on_dead=lambda error, key, record: dead.append(error.reason))
    return task


def test_the_join_series_follow_held_records_table_updates_misses_bootstrap_and_versions(
    metrics: Metrics, tmp_path: Path
) -> None:
    dead: list[Any] = []
    store = JoinStore(tmp_path / "join")
    op = JoinOperator(STEP.spec, store, [0])
    task = task_with(op, dead)
    stage = task.op
    op.bootstrap({0: 2})  # the table partition has two records at the start
    publish_joins(metrics.m, [task])
    assert metrics("weir_join_bootstrapped") == 0
    assert metrics("weir_join_held_records") == 0 and metrics("weir_join_table_versions") == 0
    assert metrics.updates() == (0, 0, 0) and metrics("weir_join_misses_total") == 0

    stage.process("a", 1_000, {"n": 1}, 0)  # held: the table is not read up to its start yet
    publish_joins(metrics.m, [task])
    assert metrics("weir_join_held_records") == 1

    op.table_record(0, 0, "a", 500, {"price": 5})
    op.table_record(0, 1, "b", 2_000, {"price": 1})  # bootstrapped; the table's time is 2,000
    assert [e.record for e in stage.advance(0, 100)] == [{"n": 1, "price": 5}]
    publish_joins(metrics.m, [task])
    assert metrics("weir_join_bootstrapped") == 1 and metrics("weir_join_held_records") == 0
    assert metrics.updates() == (2, 0, 0) and metrics("weir_join_table_versions") == 2

    op.table_record(0, 2, "a", 1_500, {"price": 6})  # behind the partition's time: late
    op.table_record(0, 3, "a", -20_000, {"price": 0})  # behind it by more than the retention
    op.table_record(0, 3, "a", 9_000, {"price": 9})  # an offset read already: not an update
    stage.process("zz", 1_800, {"n": 2}, 0)  # no value for zz: an inner miss, dead-lettered
    publish_joins(metrics.m, [task])
    assert metrics.updates() == (2, 1, 1) and metrics("weir_join_table_versions") == 3
    assert metrics("weir_join_misses_total") == 1 and dead == ["join_miss"]

    # A restart builds the operator anew from its flushed store: the counters do not go back or
    # count again, the versions come back with the store.
    store.flush({"offset": 2})
    store.close()
    reopened = JoinStore(tmp_path / "join")
    try:
        again = JoinOperator(STEP.spec, reopened, [0])
        task = task_with(again, dead)
        publish_joins(metrics.m, [task])
        assert metrics.updates() == (2, 1, 1) and metrics("weir_join_misses_total") == 1
        assert metrics("weir_join_table_versions") == 3
        again.table_record(0, 4, "c", 3_000, {"price": 3})
        publish_joins(metrics.m, [task])
        assert metrics.updates() == (3, 1, 1) and metrics("weir_join_table_versions") == 4
    finally:
        reopened.close()


def test_a_store_opened_without_a_stored_count_counts_its_versions(tmp_path: Path) -> None:
    store = JoinStore(tmp_path / "join")
    op = JoinOperator(STEP.spec, store, [0])
    for offset, key in enumerate("abc"):
        op.table_record(0, offset, key, 100 + offset, {"price": offset})
    store.flush({"offset": 0})
    older = WriteBatch(raw_mode=True)  # the operator's progress as an older weir stored it: no count
    older.put(b"\x00join", orjson.dumps({k: v for k, v in store.saved_meta.items() if k != "versions"}))
    store._db.write(older)
    store.close()
    reopened = JoinStore(tmp_path / "join")
    try:
        assert reopened.version_count == 3
    finally:
        reopened.close()


def test_a_job_s_join_metrics_agree_with_its_output_and_dead_letters(tmp_path: Path) -> None:
    broker = broker_with(*data(2))
    m = WorkerMetrics("test/enrich", 0)

    def on_consume(n: int) -> None:
        if n == 0:
            worker.stop()

    worker = memory_worker(SINK_GRAPH, broker, tmp_path / "state", on_consume=on_consume, metrics=m)
    assert worker.run() == 0
    labels = {"streamjob": "test/enrich", "worker": "0", "step": "0", "topic": "catalog"}

    def value(name: str, **more: str) -> float | None:
        return m.registry.get_sample_value(name, {**labels, **more})

    misses = reasons(broker)[b"join_miss"]
    assert misses > 0
    assert value("weir_join_misses_total") == misses
    identity = {"streamjob": "test/enrich", "worker": "0", "reason": "join_miss"}
    assert m.registry.get_sample_value("weir_dead_letter_total", identity) == misses
    applied = value("weir_join_table_updates_total", outcome="applied")
    assert applied is not None and applied > 0
    assert value("weir_join_bootstrapped") == 1 and value("weir_join_held_records") == 0
    late = value("weir_join_table_updates_total", outcome="late")
    versions = value("weir_join_table_versions")  # both tasks hold the whole table, some pruned
    assert late is not None and versions is not None and 0 < versions <= applied + late
