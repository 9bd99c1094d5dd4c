"""Replay recovery and joins: why a join's partition is never replayed (``weir.recovery``), and
what a worker does instead when its committed checkpoint is lost.

The replay re-reads a partition from an older snapshot with output suppressed for the records
before the committed offset. That is exact only if the output committed before that offset is
a function of the input before it. Behind a join it is not: the first test shows two valid runs
of the same input that had written different records by the same stream offset.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.unit.test_join_pipeline import SINK_GRAPH, WINDOW_GRAPH, broker_with, data, output, run

from weir.graph import JobGraph
from weir.join import JoinOperator, JoinSpec
from weir.join_table import JoinStore
from weir.recovery import ReplayRefused
from weir.state_migration import StateShapeMismatch
from weir.testing.broker import Faults, FaultyStore, MemoryBroker, memory_worker
from weir.worker import Worker

SPEC = JoinSpec(fields=("price",), kind="left")


def test_which_records_a_join_wrote_by_a_stream_offset_depends_on_how_far_the_table_was_read(
    tmp_path: Path,
) -> None:
    """The same stream and table records, read in two interleavings: the joined values agree,
    but by stream offset 1 (a commit there) one run has written the purchase and the other still
    holds it. A replay suppressing by stream offset cannot know which run it repeats: it would
    write the purchase twice after the first, or never after the second."""

    def one_run(path: Path, table_first: bool) -> tuple[list[Any], list[Any]]:
        store = JoinStore(path)
        op = JoinOperator(SPEC, store, [0])
        try:
            op.table_record(0, 0, "a", 1_000, {"price": 5})
            if table_first:
                op.table_record(0, 1, "a", 2_000, {"price": 7})
            assert op.process("a", 1_500, {"n": 1}, 0)  # stream offset 0
            before_commit = [*op.take(), *op.advance(0, 100)]
            if not table_first:
                op.table_record(0, 1, "a", 2_000, {"price": 7})
            after_commit = [*op.take(), *op.advance(0, 100)]
            return before_commit, after_commit
        finally:
            store.close()

    read_ahead = one_run(tmp_path / "table-first", table_first=True)
    read_behind = one_run(tmp_path / "stream-first", table_first=False)
    joined = {"n": 1, "price": 5}  # the price valid at 1,500 either way: the values are deterministic
    assert [j.record for j in read_ahead[0]] == [joined] and read_ahead[1] == []
    assert read_behind[0] == [] and [j.record for j in read_behind[1]] == [joined]


def worker(
    broker: MemoryBroker,
    backend: FaultyStore,
    state: Path,
    stop_after: int | None,
    allow_reset: bool = False,
    graph: JobGraph = SINK_GRAPH,
) -> Worker:
    seen = [0]

    def on_consume(n: int) -> None:
        seen[0] += n
        if n == 0 or (stop_after is not None and seen[0] >= stop_after):
            w.stop()

    w = memory_worker(
        graph, broker, state, on_consume=on_consume, backend=backend, allow_state_reset=allow_reset
    )
    return w


def lose_the_committed_checkpoint(backend: FaultyStore, state: Path) -> None:
    """Delete the newest checkpoint's manifest (the one committed at the stop) and the local
    state, so the next start finds only older checkpoints behind the committed offsets."""
    manifests = sorted(k for k in backend.objects if "/checkpoints/" in k and k.endswith("manifest.json"))
    assert len(manifests) >= 2
    backend.delete([manifests[-1]])
    shutil.rmtree(state)


@pytest.mark.parametrize("graph", [SINK_GRAPH, WINDOW_GRAPH], ids=["sink", "window"])
def test_a_join_job_whose_committed_checkpoint_is_lost_exits_2_instead_of_replaying(
    graph: JobGraph, tmp_path: Path
) -> None:
    broker = broker_with(*data(1))
    backend = FaultyStore(Faults())
    assert worker(broker, backend, tmp_path / "state", stop_after=40, graph=graph).run() == 0
    committed = output(broker)
    assert committed
    lose_the_committed_checkpoint(backend, tmp_path / "state")

    second = worker(broker, backend, tmp_path / "state", stop_after=None, graph=graph)
    with pytest.raises(StateShapeMismatch) as refused:  # weir run: exit code 2
        second.run()
    assert isinstance(refused.value, ReplayRefused)
    assert str(refused.value).startswith("purchases/0: cannot restore the state committed at offset")
    assert "is gone" in str(refused.value) and "--allow-state-reset" in str(refused.value)
    assert output(broker) == committed  # nothing written, nothing committed


def test_with_a_state_reset_allowed_the_join_starts_empty_at_the_committed_offsets_and_writes_nothing_twice(
    tmp_path: Path,
) -> None:
    reference = broker_with(*data(1))
    assert run(reference, tmp_path / "reference", SINK_GRAPH, [], 1) == 0
    want = output(reference)

    broker = broker_with(*data(1))
    backend = FaultyStore(Faults())
    assert worker(broker, backend, tmp_path / "state", stop_after=40).run() == 0
    committed = output(broker)
    lose_the_committed_checkpoint(backend, tmp_path / "state")

    assert worker(broker, backend, tmp_path / "state", stop_after=None, allow_reset=True).run() == 0
    got = output(broker)
    assert sum(got.values()) > sum(committed.values())  # it went on from the committed offsets
    assert got - want == Counter()  # every record it wrote is the reference's, none twice
