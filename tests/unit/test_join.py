"""The stream-table temporal join on a real RocksDB store: as-of lookups, lateness, retention,
bootstrap, restore, determinism."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weir.join import END_OF_TIME, NO_TIME, JoinMiss, JoinOperator, JoinSpec, TableRecord
from weir.join_table import JoinStore, Put, Version, VersionedTable
from weir.state_sst import export_sst, import_sst

SPEC = JoinSpec(fields=("price", "category"), prefix="p_", kind="inner", grace_ms=0, retention_ms=10_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JoinStore]:
    s = JoinStore(tmp_path / "join")
    yield s
    s.close()


def table(store: JoinStore, retention_ms: int = 10_000) -> VersionedTable:
    return VersionedTable(store, retention_ms)


def drain(op: JoinOperator, limit: int = 1000) -> list[Any]:
    """Everything the operator has to give now: ``take`` then ``advance`` until not firing."""
    out = list(op.take())
    while True:
        out.extend(op.advance(0, limit))
        if not op.firing:
            return out


def prices(out: list[Any]) -> list[tuple[str, int, Any]]:
    return [(j.key, j.ts, j.record.get("p_price")) for j in out]


# -- the versioned table -----------------------------------------------------------------------
def test_as_of_answers_the_newest_version_at_or_before_the_time_whatever_order_updates_came_in(
    store: JoinStore,
) -> None:
    t = table(store)
    for ts in (300, 100, 200):  # out of order: each lands in place in the history
        assert t.put("k", ts, {"v": ts}, NO_TIME) is Put.APPLIED
    assert t.as_of("k", 99) is None
    assert t.as_of("k", 100) == {"v": 100}
    assert t.as_of("k", 250) == {"v": 200}
    assert t.as_of("k", 10**12) == {"v": 300}
    assert t.as_of("other", 250) is None
    assert [v.ts for v in store.versions("k")] == [100, 200, 300]


def test_a_second_update_of_a_key_at_the_same_time_replaces_the_first(store: JoinStore) -> None:
    t = table(store)
    t.put("k", 100, {"v": 1}, NO_TIME)
    t.put("k", 100, {"v": 2}, NO_TIME)
    assert store.versions("k") == [Version(100, 100, {"v": 2})]


def test_a_tombstone_deletes_the_key_from_its_time_on_only(store: JoinStore) -> None:
    t = table(store)
    t.put("k", 100, {"v": 1}, NO_TIME)
    t.put("k", 200, None, NO_TIME)
    t.put("k", 300, {"v": 3}, NO_TIME)
    assert t.as_of("k", 150) == {"v": 1}
    assert t.as_of("k", 200) is None
    assert t.as_of("k", 299) is None
    assert t.as_of("k", 300) == {"v": 3}


def test_a_late_update_is_seen_only_by_lookups_after_the_frontier(store: JoinStore) -> None:
    t = table(store)
    t.put("k", 100, {"v": 1}, NO_TIME)
    assert t.put("k", 150, {"v": 2}, frontier=500) is Put.LATE
    assert t.as_of("k", 200) == {"v": 1}  # an answer that may have been given stays
    assert t.as_of("k", 500) == {"v": 1}
    assert t.as_of("k", 501) == {"v": 2}
    assert store.versions("k")[1] == Version(150, 501, {"v": 2})


def test_an_update_older_than_the_frontier_minus_retention_is_dropped(store: JoinStore) -> None:
    t = table(store, retention_ms=100)
    assert t.put("k", 399, {"v": 1}, frontier=500) is Put.DROPPED
    assert t.put("k", 400, {"v": 2}, frontier=500) is Put.LATE
    assert [v.ts for v in store.versions("k")] == [400]


def test_retention_prunes_history_but_keeps_the_newest_version_at_the_cutoff(store: JoinStore) -> None:
    t = table(store)
    for ts in (100, 200, 300, 400):
        t.put("k", ts, {"v": ts}, NO_TIME)
    t.put("single", 100, {"v": 0}, NO_TIME)
    assert t.expire(cutoff=250, limit=10) is False
    assert [v.ts for v in store.versions("k")] == [200, 300, 400]
    assert t.as_of("k", 250) == {"v": 200}  # a lookup at the cutoff still answers
    assert t.as_of("k", 350) == {"v": 300}
    assert [v.ts for v in store.versions("single")] == [100]
    t.expire(cutoff=10_000, limit=10)
    assert [v.ts for v in store.versions("k")] == [400]
    assert t.as_of("k", 10_000) == {"v": 400}


def test_retention_drops_a_key_whose_newest_version_at_the_cutoff_is_a_tombstone(store: JoinStore) -> None:
    t = table(store)
    t.put("k", 100, {"v": 1}, NO_TIME)
    t.put("k", 200, None, NO_TIME)
    t.expire(cutoff=250, limit=10)
    assert store.versions("k") == []
    assert store.due_keys(END_OF_TIME, 10) == []
    assert t.as_of("k", 300) is None


def test_retention_keeps_a_late_version_until_the_cutoff_passes_its_visibility(store: JoinStore) -> None:
    t = table(store)
    t.put("k", 100, {"v": 1}, NO_TIME)
    t.put("k", 150, {"v": 2}, frontier=500)  # visible from 501
    t.expire(cutoff=300, limit=10)
    assert t.as_of("k", 300) == {"v": 1}
    assert t.as_of("k", 600) == {"v": 2}
    t.expire(cutoff=600, limit=10)
    assert store.versions("k") == [Version(150, 501, {"v": 2})]


def test_pruning_goes_in_chunks_of_keys_and_says_when_more_are_due(store: JoinStore) -> None:
    t = table(store)
    for key in "abcde":
        t.put(key, 100, {"v": 1}, NO_TIME)
        t.put(key, 200, {"v": 2}, NO_TIME)
    assert t.expire(250, limit=2) is True
    assert t.expire(250, limit=2) is True
    assert t.expire(250, limit=2) is False
    assert all(len(store.versions(k)) == 1 for k in "abcde")


def test_a_key_due_for_pruning_before_where_the_last_pruning_stopped_is_still_pruned(
    store: JoinStore,
) -> None:
    t = table(store)
    t.put("a", 100, {"v": 1}, NO_TIME)
    t.put("a", 200, {"v": 2}, NO_TIME)
    assert t.expire(cutoff=150, limit=10) is False  # nothing due yet: "a" is due at 200
    t.put("b", 100, {"v": 1}, NO_TIME)
    t.put("b", 120, {"v": 2}, NO_TIME)  # due at 120, before "a"
    t.expire(cutoff=150, limit=10)
    assert [v.ts for v in store.versions("b")] == [120]
    assert [v.ts for v in store.versions("a")] == [100, 200]


# -- the join ----------------------------------------------------------------------------------
def operator(store: JoinStore, spec: JoinSpec = SPEC, partitions: tuple[int, ...] = (0,)) -> JoinOperator:
    return JoinOperator(spec, store, partitions)


def test_a_stream_record_joins_the_table_value_valid_at_its_event_time(store: JoinStore) -> None:
    op = operator(store)
    op.table_record(0, 0, "apple", 100, {"price": 1, "category": "fruit"})
    op.table_record(0, 1, "apple", 200, {"price": 2, "category": "fruit"})
    op.table_record(0, 2, "zzz", 1000, {"price": 0})  # moves the table's time to 1000
    op.process("apple", 150, {"id": 1}, 0)
    op.process("apple", 250, {"id": 2}, 0)
    out = drain(op)
    assert [j.record for j in out] == [
        {"id": 1, "p_price": 1, "p_category": "fruit"},
        {"id": 2, "p_price": 2, "p_category": "fruit"},
    ]
    assert op.joined == 2 and op.misses == 0


def test_a_stream_record_waits_until_the_tables_time_reaches_it(store: JoinStore) -> None:
    op = operator(store)
    op.table_record(0, 0, "apple", 100, {"price": 1})
    op.process("apple", 300, {"id": 1}, 0)
    assert drain(op) == [] and op.held == 1
    op.table_record(0, 1, "apple", 250, {"price": 2})  # arrives after the stream record: still counts
    assert drain(op) == []
    op.table_record(0, 2, "zzz", 300, {"price": 0})
    assert prices(drain(op)) == [("apple", 300, 2)]
    assert op.held == 0


def test_a_late_table_update_within_grace_changes_the_join_and_after_grace_only_later_lookups(
    store: JoinStore,
) -> None:
    op = operator(store, JoinSpec(fields=("price",), prefix="p_", grace_ms=100))
    op.table_record(0, 0, "k", 1000, {"price": "A"})
    op.table_record(0, 1, "o", 2000, {"price": "X"})  # table time 1900
    op.process("k", 1960, {"id": 1}, 0)  # held: 1960 > 1900
    assert op.table_record(0, 2, "k", 1950, {"price": "B"}) is TableRecord.APPLIED  # within grace
    op.process("k", 1870, {"id": 2}, 0)  # joinable now (1870 <= 1900): A
    assert op.table_record(0, 3, "k", 1850, {"price": "C"}) is TableRecord.LATE  # past grace
    op.process("k", 1880, {"id": 3}, 0)  # still A: C may not change answers up to 1900
    op.table_record(0, 4, "o", 2100, {"price": "X"})  # table time 2000
    op.process("k", 1940, {"id": 4}, 0)  # C is visible from 1901 on
    out = drain(op)
    assert {j.record["id"]: j.record["p_price"] for j in out} == {1: "B", 2: "A", 3: "A", 4: "C"}
    assert op.late_table_updates == 1


def test_a_stream_record_read_before_the_table_is_bootstrapped_waits_for_it(store: JoinStore) -> None:
    op = operator(store, partitions=(0, 1))
    op.bootstrap({0: 1, 1: 3})
    op.table_record(0, 0, "z", 5000, {"price": 0})
    op.table_record(1, 0, "c", 700, {"price": 9})
    op.table_record(1, 1, "y", 900, {"price": 0})
    assert op.table_time == NO_TIME and not op.bootstrapped
    op.process("c", 800, {"id": 1}, 0)  # both partitions are past 800, but not read to their end
    assert drain(op) == [] and op.held == 1
    op.table_record(1, 2, "q", 5000, {"price": 0})
    assert op.bootstrapped
    assert prices(drain(op)) == [("c", 800, 9)]


def test_bootstrap_counts_a_reader_position_past_markers_as_read(store: JoinStore) -> None:
    op = operator(store)
    op.bootstrap({0: 5})
    op.table_record(0, 3, "c", 900, {"price": 9})
    assert not op.bootstrapped
    op.table_position(0, 5)  # offset 4 was a transaction marker
    assert op.bootstrapped


def test_an_idle_table_partition_holds_back_nothing_until_its_next_record(store: JoinStore) -> None:
    op = operator(store, partitions=(0, 1))
    op.table_record(0, 0, "c", 100, {"price": 1})
    op.table_record(1, 0, "d", 5000, {"price": 2})
    op.process("c", 4000, {"id": 1}, 0)
    assert drain(op) == []
    op.table_idle(0)
    assert op.table_time == 5000
    assert prices(drain(op)) == [("c", 4000, 1)]
    # An update read after the idle partition let 4000 join cannot change that answer.
    assert op.table_record(0, 1, "c", 3000, {"price": 7}) is TableRecord.LATE
    assert op.table_time == 3000  # its own time again, no longer +inf


def test_left_join_emits_a_miss_with_null_table_fields_and_counts_it(store: JoinStore) -> None:
    op = operator(store, JoinSpec(fields=("price", "category"), prefix="p_", kind="left"))
    op.table_record(0, 0, "apple", 100, {"price": 1})  # no category: null
    op.table_record(0, 1, "zzz", 1000, {"price": 0})
    op.process("apple", 500, {"id": 1}, 0)
    op.process("pear", 500, {"id": 2}, 0)
    out = drain(op)
    assert [(j.record, j.error) for j in out] == [
        ({"id": 1, "p_price": 1, "p_category": None}, None),
        ({"id": 2, "p_price": None, "p_category": None}, None),
    ]
    assert (op.joined, op.misses) == (2, 1)


def test_inner_join_returns_a_miss_as_a_join_miss_with_the_stream_record_and_counts_it(
    store: JoinStore,
) -> None:
    op = operator(store)
    op.table_record(0, 0, "apple", 100, {"price": 1})
    op.table_record(0, 1, "apple", 200, None)  # deleted from 200 on
    op.table_record(0, 2, "zzz", 1000, {"price": 0})
    op.process("apple", 150, {"id": 1}, 0)
    op.process("apple", 250, {"id": 2}, 0)
    op.process("pear", 250, {"id": 3}, 0)
    out = drain(op)
    assert [j.error is None for j in out] == [True, False, False]
    miss = out[1]
    assert miss.record == {"id": 2}
    assert isinstance(miss.error, JoinMiss)
    assert miss.error.reason == "join_miss" and "'apple' at event time 250" in miss.error.detail
    assert (op.joined, op.misses) == (1, 2)


def test_held_records_are_released_in_event_time_order_ties_by_arrival_before_any_later_arrival(
    store: JoinStore,
) -> None:
    op = operator(store)
    for i, ts in enumerate((300, 100, 200, 100)):
        op.process("k", ts, {"id": i}, 0)
    op.table_record(0, 0, "k", 1000, {"price": 1})
    op.process("k", 50, {"id": 9}, 0)  # joinable at once, but after the released ones
    assert [j.record["id"] for j in drain(op, limit=1)] == [1, 3, 2, 0, 9]


def test_a_stream_record_older_than_stream_time_minus_retention_is_late(store: JoinStore) -> None:
    op = operator(store, JoinSpec(fields=("price",), retention_ms=1000))
    assert op.process("k", 5000, {"id": 1}, 0)
    assert op.process("k", 4000, {"id": 2}, 0)
    assert not op.process("k", 3999, {"id": 3}, 0)
    assert op.late_stream_records == 1 and op.held == 2


def test_a_table_record_at_an_offset_already_read_is_skipped(store: JoinStore) -> None:
    op = operator(store)
    assert op.table_record(0, 0, "k", 100, {"price": 1}) is TableRecord.APPLIED
    assert op.table_record(0, 0, "k", 100, {"price": 2}) is TableRecord.SEEN
    assert op.table.as_of("k", 100) == {"price": 1}
    assert op.table_offsets() == {0: 1}


def test_a_record_of_a_table_partition_the_task_does_not_read_is_refused(store: JoinStore) -> None:
    op = operator(store)
    with pytest.raises(ValueError, match=r"table partition 3 is not read by this task \(it reads \[0\]\)"):
        op.table_record(3, 0, "k", 100, {"price": 1})


def test_a_join_spec_refuses_no_fields_and_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="fields"):
        JoinSpec(fields=())
    with pytest.raises(ValueError, match="kind"):
        JoinSpec(fields=("a",), kind="outer")  # type: ignore[arg-type]


def test_a_write_after_a_flush_withdraws_the_stores_claim_to_match_its_offset(store: JoinStore) -> None:
    op = operator(store)
    store.flush({"offset": 7})
    assert store.progress == {"offset": 7}
    op.table_record(0, 0, "k", 100, {"price": 1})
    assert store.progress is None
    store.flush({"offset": 8})
    assert store.progress == {"offset": 8}


# -- checkpoints and determinism ---------------------------------------------------------------
Step = tuple[str, int]  # ("s", 0) a stream record, ("t", p) the next record of table partition p,
# ("i", p) the caller declares table partition p idle


def scenario(rng: random.Random, partitions: int) -> tuple[list[Any], list[list[Any]], JoinSpec]:
    """Random stream and table inputs over a few keys, out of order, with tombstones."""
    keys = ["a", "b", "c"]
    stream = []
    for i in range(rng.randint(1, 25)):
        stream.append((rng.choice(keys), rng.randint(0, 1000), {"i": i}))
    tables: list[list[Any]] = [[] for _ in range(partitions)]
    for p in range(partitions):
        for _ in range(rng.randint(0, 12)):
            key = rng.choice(keys[p::partitions])  # a keyed topic: each key in one partition
            value = None if rng.random() < 0.15 else {"price": rng.randint(1, 99)}
            tables[p].append((key, rng.randint(0, 1100), value))
    spec = JoinSpec(
        fields=("price",),
        prefix="p_",
        kind=rng.choice(["inner", "left"]),
        grace_ms=rng.choice([0, 50, 300]),
        retention_ms=rng.choice([100, 400, 10_000]),
    )
    return stream, tables, spec


def interleaving(rng: random.Random, stream: list[Any], tables: list[list[Any]]) -> list[Step]:
    steps = [("s", 0)] * len(stream) + [("t", p) for p, recs in enumerate(tables) for _ in recs]
    rng.shuffle(steps)  # per-source order is kept by consuming each source in sequence
    return steps


def run(
    tmp: Path,
    stream: list[Any],
    tables: list[list[Any]],
    spec: JoinSpec,
    steps: list[Step],
    boot: dict[int, int],
    restart_at: int | None = None,
    make: type[JoinOperator] = JoinOperator,
) -> list[tuple[Any, ...]]:
    """Feed the inputs in the order ``steps`` gives, optionally checkpointing, closing and
    restoring at step ``restart_at`` (then bootstrapping to every table record read so far);
    at the end every table partition has been read and goes idle. Returns the outputs by
    stream record."""
    parts = tuple(range(len(tables)))
    store = JoinStore(tmp / "live")
    op = make(spec, store, parts)
    op.bootstrap(boot)
    si, pos = 0, [0] * len(tables)
    idle: set[int] = set()
    out: list[tuple[Any, ...]] = []

    def collect(joined: list[Any]) -> None:
        out.extend(
            (j.record["i"], j.key, j.ts, tuple(sorted(j.record.items())), j.error is None) for j in joined
        )

    for n, (kind, p) in enumerate(steps):
        if kind == "s":
            key, ts, record = stream[si]
            si += 1
            if not op.process(key, ts, record, 0):
                out.append((record["i"], "late"))
            collect(op.take())
        elif kind == "i":
            op.table_idle(p)
            idle.add(p)
        else:
            key, ts, value = tables[p][pos[p]]
            op.table_record(p, pos[p], key, ts, value)
            pos[p] += 1
            idle.discard(p)
        while True:
            collect(op.advance(0, 2))
            if not op.firing:
                break
        if n == restart_at:
            store.flush({"offset": si})
            cp = store.checkpoint(tmp / f"cp{n}")
            store.close()
            store = JoinStore(cp)
            op = make(spec, store, parts)
            assert op.table_offsets() == {q: pos[q] if pos[q] else -1 for q in parts}
            op.bootstrap({q: pos[q] for q in parts if pos[q]})
            for q in idle:  # the restarted caller finds the same partitions quiet again
                op.table_idle(q)
    for q in parts:
        op.table_idle(q)
    collect(drain(op, limit=2))
    store.close()
    return sorted(out, key=lambda o: o[0])


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_any_interleaving_of_the_same_stream_and_table_gives_the_same_joins(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    partitions = rng.choice([1, 2])
    stream, tables, spec = scenario(rng, partitions)
    runs = []
    for attempt in range(3):
        boot = {p: rng.randint(0, len(t)) for p, t in enumerate(tables)}
        boot = {p: o for p, o in boot.items() if o}
        steps = interleaving(rng, stream, tables)
        restart = rng.randrange(len(steps)) if attempt else None
        runs.append(run(tmp_path / f"{seed}-{attempt}", stream, tables, spec, steps, boot, restart))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == len(stream)  # every stream record is answered exactly once


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_a_restart_at_any_step_joins_like_the_uninterrupted_run_idleness_included(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    partitions = rng.choice([1, 2])
    stream, tables, spec = scenario(rng, partitions)
    steps = interleaving(rng, stream, tables)
    for _ in range(rng.randint(1, 4)):  # idleness is a timing decision: the same in both runs
        steps.insert(rng.randrange(len(steps) + 1), ("i", rng.randrange(partitions)))
    uninterrupted = run(tmp_path / f"{seed}-a", stream, tables, spec, steps, {})
    restarted = run(tmp_path / f"{seed}-b", stream, tables, spec, steps, {}, rng.randrange(len(steps)))
    assert restarted == uninterrupted


class EagerJoin(JoinOperator):
    """The rule the determinism test must catch breaking: join on arrival, not when the
    table's time reaches the record."""

    @property
    def table_time(self) -> int:
        return END_OF_TIME if self.bootstrapped else NO_TIME


def test_the_determinism_check_fails_for_a_join_that_does_not_wait_for_the_tables_time(
    tmp_path: Path,
) -> None:
    differing = 0
    for seed in range(40):
        rng = random.Random(seed)
        stream, tables, spec = scenario(rng, 1)
        first, second = (
            run(tmp_path / f"{seed}-{n}", stream, tables, spec, interleaving(rng, stream, tables), {},
                make=EagerJoin)
            for n in range(2)
        )
        differing += first != second
    assert differing >= 5


def test_a_store_restored_from_a_checkpoint_or_a_savepoint_joins_like_the_original(tmp_path: Path) -> None:
    live = JoinStore(tmp_path / "live")
    op = operator(live, JoinSpec(fields=("price",), prefix="p_", grace_ms=50, retention_ms=500))
    op.bootstrap({0: 2})
    op.table_record(0, 0, "a", 100, {"price": 1})
    op.process("a", 400, {"i": 0}, 0)  # held: bootstrap
    op.table_record(0, 1, "b", 300, {"price": 2})
    op.process("a", 420, {"i": 1}, 0)
    op.table_record(0, 2, "a", 380, {"price": 3})  # within grace of 300
    before = drain(op)
    live.flush({"offset": 2})
    cp = live.checkpoint(tmp_path / "cp")
    assert export_sst(cp, tmp_path / "sp.sst") > 0
    import_sst(tmp_path / "from-savepoint", tmp_path / "sp.sst")

    def rest(o: JoinOperator) -> list[Any]:
        o.process("b", 410, {"i": 2}, 0)
        o.table_record(0, 3, "a", 405, {"price": 4})
        o.table_record(0, 4, "a", 900, None)
        o.process("a", 800, {"i": 3}, 0)
        o.process("a", 950, {"i": 4}, 0)
        o.table_record(0, 5, "z", 2000, {"price": 0})
        return prices(drain(o))

    expected = rest(op)
    assert prices(before) == [] and len(expected) == 5
    for path in (cp, tmp_path / "from-savepoint"):
        restored_store = JoinStore(path)
        restored = operator(restored_store, op.spec)
        assert restored.held == 2 and restored.table_offsets() == {0: 3}
        assert rest(restored) == expected
        restored_store.close()
    live.close()


def test_a_restored_task_still_treats_an_update_behind_what_it_joined_as_late(tmp_path: Path) -> None:
    def after_idle_join(op: JoinOperator) -> None:
        op.table_record(0, 0, "c", 100, {"price": 1})
        op.table_idle(0)
        op.process("c", 4000, {"i": 0}, 0)  # joined at once: the partition is idle

    def rest(op: JoinOperator) -> list[Any]:
        assert op.table_record(0, 1, "c", 3000, {"price": 2}) is TableRecord.LATE
        op.process("c", 3500, {"i": 1}, 0)
        op.table_record(0, 2, "z", 5000, {"price": 0})
        return prices(drain(op))

    live = JoinStore(tmp_path / "live")
    op = operator(live)
    after_idle_join(op)
    assert prices(drain(op)) == [("c", 4000, 1)]
    live.flush({})
    restored_store = JoinStore(live.checkpoint(tmp_path / "cp"))
    assert rest(operator(restored_store)) == rest(op) == [("c", 3500, 1)]
    restored_store.close()
    live.close()
