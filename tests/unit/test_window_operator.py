"""The window operator over random multi-partition streams, against the brute-force reference."""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weir.aggregates import AggSpec, Overflow, compile_aggregates
from weir.state import PartitionStore
from weir.testing import Event, FakeClock, InMemoryWindowStore, random_events, reference_windows
from weir.window_operator import NO_WATERMARK, EmitMode, WindowOperator, WindowResult, WindowStore

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

SPECS: list[AggSpec] = [
    ("n", "count", None),
    ("revenue", "sum", "price"),
    ("cheapest", "min", "price"),
    ("dearest", "max", "price"),
    ("avg_qty", "avg", "qty"),
    ("users", "count_distinct", "user"),
    ("first_user", "first", "user"),
    ("last_price", "last", "price"),
]
EMIT_MODES: list[EmitMode] = ["final", "updates"]
END_OF_TIME = 2**62

Window = tuple[str, int, int]


@dataclass(frozen=True)
class Shape:
    kind: str
    size: int | None
    slide: int | None
    gap: int | None
    lateness: int


@dataclass
class Run:
    outputs: list[list[WindowResult]] = field(default_factory=list)
    late: list[Event] = field(default_factory=list)

    def finals(self) -> dict[Window, dict[str, Any]]:
        out: dict[Window, dict[str, Any]] = {}
        for batch in self.outputs:
            for r in batch:
                if r.final:
                    assert (r.key, r.start, r.end) not in out, f"{r} fired twice"
                    out[(r.key, r.start, r.end)] = r.values
        return out


def typed(results: dict[Window, dict[str, Any]]) -> dict[Window, str]:
    """Compare values with their JSON types (1 vs 1.0 vs True), which == ignores."""
    return {k: json.dumps(v, sort_keys=True) for k, v in results.items()}


def run_operator(
    events: list[Event],
    shape: Shape,
    ooo: int,
    emit: EmitMode,
    *,
    seed: int,
    advance_probability: float = 0.3,
    restore_at: int | None = None,
    serialised_store: bool = False,
    new_store: Callable[[int], WindowStore] | None = None,
    limit: int | None = None,
) -> Run:
    """Feed ``events`` partition by partition in random batches, advancing at random boundaries.

    Each record's watermark is its partition's max event time before it minus ``ooo``. With
    ``restore_at``, every partition's operator is thrown away at that batch boundary and a new
    one is restored from a copy of its store that went through dumps/loads (as a restart would;
    in "updates" mode after emitting, as the worker does before every checkpoint).
    """
    agg = compile_aggregates(SPECS)
    rng = random.Random(seed)

    def default_store(_partition: int) -> WindowStore:
        return InMemoryWindowStore(agg.dumps, agg.loads) if serialised_store else InMemoryWindowStore()

    store_for = new_store or default_store

    def new_operator(store: WindowStore) -> WindowOperator:
        return WindowOperator(
            shape.kind, shape.size, shape.slide, shape.gap, shape.lateness, agg, emit, store
        )

    partitions = sorted({e[0] for e in events})
    stores = {p: store_for(p) for p in partitions}
    ops = {p: new_operator(stores[p]) for p in partitions}
    max_ts: dict[int, int] = {}
    run = Run()
    i = 0
    restored = False
    while i < len(events):
        if restore_at is not None and not restored and i >= restore_at:
            restored = True
            for p in partitions:
                if emit == "updates" and p in max_ts:
                    # The worker emits after every batch, so a checkpoint never holds unemitted
                    # updates (or retractions); restoring relies on it.
                    run.outputs.append(ops[p].advance(max_ts[p] - ooo))
                copy = default_store(p)
                for k, acc in stores[p].items():
                    copy.put(k, agg.loads(agg.dumps(acc)))
                stores[p] = copy
                ops[p] = new_operator(copy)
                ops[p].restore()
        batch = events[i : i + rng.randint(1, 12)]
        i += len(batch)
        by_partition: dict[int, list[tuple[str, int, dict[str, Any], int]]] = {}
        origin: dict[int, list[Event]] = {}
        for event in batch:
            p, key, ts, record = event
            watermark = max_ts[p] - ooo if p in max_ts else NO_WATERMARK
            max_ts[p] = max(max_ts.get(p, ts), ts)
            by_partition.setdefault(p, []).append((key, ts, record, watermark))
            origin.setdefault(p, []).append(event)
        late_items: list[tuple[str, int, dict[str, Any], int]] = []
        for p, items in by_partition.items():
            late_items.extend(ops[p].process_batch(items))
            if rng.random() < advance_probability:
                run.outputs.append(ops[p].advance(max_ts[p] - ooo, limit))
        # process_batch returns the late items themselves; map them back to events, in order.
        late_ids = {id(item[2]) for item in late_items}
        run.late.extend(e for e in batch if id(e[3]) in late_ids)
    for p in partitions:
        run.outputs.append(ops[p].advance(END_OF_TIME, limit))
        while ops[p].firing:
            run.outputs.append(ops[p].advance(END_OF_TIME, limit))
        assert ops[p].open_windows == 0
        assert len(stores[p]) == 0
    return run


def rank(r: WindowResult) -> int:
    return 0 if r.retract else 2 if r.final else 1


def check_output_order(run: Run) -> None:
    for batch in run.outputs:
        ranks = [rank(r) for r in batch]
        assert ranks == sorted(ranks), "retractions come before updates, updates before finals"
        for group in (0, 1, 2):
            order = [(r.end, r.key, r.start) for r in batch if rank(r) == group]
            assert order == sorted(order)
            assert len(set(order)) == len(order), "a window is emitted at most once per advance"


@st.composite
def scenarios(draw: st.DrawFn, kind: str) -> tuple[list[Event], Shape, int]:
    size = draw(st.integers(min_value=1, max_value=60))
    shape = Shape(
        kind=kind,
        size=size,
        slide=draw(st.integers(min_value=1, max_value=size)),
        gap=draw(st.integers(min_value=1, max_value=40)),
        lateness=draw(st.integers(min_value=0, max_value=30)),
    )
    ooo = draw(st.integers(min_value=0, max_value=40))
    events = random_events(
        draw(st.integers(min_value=0, max_value=2**32)),
        draw(st.integers(min_value=0, max_value=250)),
        partitions=draw(st.integers(min_value=1, max_value=3)),
        keys=draw(st.integers(min_value=1, max_value=6)),
        start_ms=draw(st.sampled_from([0, -1000, 1_700_000_000_000])),
        mean_step_ms=draw(st.integers(min_value=0, max_value=10)),
        max_out_of_orderness_ms=draw(st.integers(min_value=0, max_value=50)),
        too_late_fraction=draw(st.sampled_from([0.0, 0.05, 0.2])),
    )
    return events, shape, ooo


def check_against_reference(scenario: tuple[list[Event], Shape, int], emit: EmitMode, seed: int) -> None:
    events, shape, ooo = scenario
    expected, expected_late = reference_windows(
        events, shape.kind, shape.size, shape.slide, shape.gap, shape.lateness, ooo, SPECS
    )
    run = run_operator(events, shape, ooo, emit, seed=seed, serialised_store=seed % 2 == 0)
    check_output_order(run)
    assert typed(run.finals()) == typed(expected)
    assert run.late == expected_late
    if emit == "updates":
        check_every_update_ends_in_its_final_value_or_a_retraction(run)
        if shape.kind != "session":
            assert not any(r.retract for batch in run.outputs for r in batch)
    else:
        assert all(r.final for batch in run.outputs for r in batch)


def check_every_update_ends_in_its_final_value_or_a_retraction(run: Run) -> None:
    """The changelog contract of "updates" mode, with ``(key, start, end)`` as the row identity."""
    open_updates: dict[Window, dict[str, Any]] = {}
    finished: set[Window] = set()
    for batch in run.outputs:
        for r in batch:
            w = (r.key, r.start, r.end)
            assert w not in finished, "nothing is emitted for a window after its final result or retraction"
            if r.retract:
                assert not r.final and r.values == {}
                assert w in open_updates, "only bounds emitted as an update are retracted"
                open_updates.pop(w, None)
                finished.add(w)
            elif r.final:
                last = open_updates.pop(w)
                assert typed({w: last}) == typed({w: r.values}), "the final repeats the last update"
                finished.add(w)
            else:
                open_updates[w] = r.values
    assert not open_updates, f"updates never finalised nor retracted: {sorted(open_updates)}"


@pytest.mark.parametrize("emit", EMIT_MODES)
@SETTINGS
@given(scenario=scenarios("tumbling"), seed=st.integers(min_value=0, max_value=1000))
def test_tumbling_windows_match_the_brute_force_reference(
    emit: EmitMode, scenario: tuple[list[Event], Shape, int], seed: int
) -> None:
    check_against_reference(scenario, emit, seed)


@pytest.mark.parametrize("emit", EMIT_MODES)
@SETTINGS
@given(scenario=scenarios("sliding"), seed=st.integers(min_value=0, max_value=1000))
def test_sliding_windows_match_the_brute_force_reference(
    emit: EmitMode, scenario: tuple[list[Event], Shape, int], seed: int
) -> None:
    check_against_reference(scenario, emit, seed)


@pytest.mark.parametrize("emit", EMIT_MODES)
@SETTINGS
@given(scenario=scenarios("session"), seed=st.integers(min_value=0, max_value=1000))
def test_session_windows_match_the_brute_force_reference(
    emit: EmitMode, scenario: tuple[list[Event], Shape, int], seed: int
) -> None:
    check_against_reference(scenario, emit, seed)


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
@SETTINGS
@given(data=st.data(), seed=st.integers(min_value=0, max_value=1000))
def test_restoring_from_the_store_mid_stream_gives_the_same_results(
    kind: str, data: st.DataObject, seed: int
) -> None:
    events, shape, ooo = data.draw(scenarios(kind))
    restore_at = data.draw(st.integers(min_value=0, max_value=max(0, len(events))))
    emit = data.draw(st.sampled_from(EMIT_MODES))
    expected, expected_late = reference_windows(
        events, shape.kind, shape.size, shape.slide, shape.gap, shape.lateness, ooo, SPECS
    )
    run = run_operator(events, shape, ooo, emit, seed=seed, restore_at=restore_at)
    assert typed(run.finals()) == typed(expected)
    assert run.late == expected_late
    if emit == "updates":
        check_every_update_ends_in_its_final_value_or_a_retraction(run)


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
@settings(deadline=None, max_examples=15)
@given(scenario=st.data())
def test_results_do_not_depend_on_how_often_advance_is_called(kind: str, scenario: st.DataObject) -> None:
    events, shape, ooo = scenario.draw(scenarios(kind))
    never = run_operator(events, shape, ooo, "final", seed=1, advance_probability=0.0)
    always = run_operator(events, shape, ooo, "final", seed=2, advance_probability=1.0)
    assert typed(never.finals()) == typed(always.finals())
    assert never.late == always.late


# -- memory: spilled windows and chunked firing -------------------------------------------------


def flat(run: Run, final_only: bool = False) -> list[WindowResult]:
    return [r for batch in run.outputs for r in batch if r.final or not final_only]


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
@pytest.mark.parametrize("emit", EMIT_MODES)
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(min_value=0, max_value=1000))
def test_windows_spilled_to_disk_fire_the_same_results_in_the_same_order_as_in_memory(
    kind: str, emit: EmitMode, data: st.DataObject, seed: int
) -> None:
    events, shape, ooo = data.draw(scenarios(kind))
    every = data.draw(st.integers(min_value=1, max_value=5))
    agg = compile_aggregates(SPECS)
    unlimited = run_operator(events, shape, ooo, emit, seed=seed)
    faked = run_operator(
        events, shape, ooo, emit, seed=seed,
        new_store=lambda _p: InMemoryWindowStore(agg.dumps, agg.loads, evict_every=every),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[PartitionStore] = []

        def rocksdb_store(p: int) -> WindowStore:
            # A budget of 16 windows: almost everything lives on disk.
            store = PartitionStore(Path(tmp) / str(p), agg.dumps, agg.loads, max_cached=16)
            stores.append(store)
            return store

        try:
            on_disk = run_operator(events, shape, ooo, emit, seed=seed, new_store=rocksdb_store)
        finally:
            for store in stores:
                store.close()
    assert faked.outputs == unlimited.outputs
    assert on_disk.outputs == unlimited.outputs
    assert on_disk.late == unlimited.late


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(min_value=0, max_value=1000))
def test_firing_with_a_limit_gives_the_same_windows_in_the_same_order_in_chunks(
    kind: str, data: st.DataObject, seed: int
) -> None:
    events, shape, ooo = data.draw(scenarios(kind))
    # One partition: with a limit, another partition's results may come before this one's rest.
    events = [e for e in events if e[0] == events[0][0]]
    limit = data.draw(st.integers(min_value=1, max_value=3))
    every = data.draw(st.sampled_from([None, 1, 3]))
    unlimited = run_operator(events, shape, ooo, "final", seed=seed)
    chunked = run_operator(
        events, shape, ooo, "final", seed=seed, limit=limit,
        new_store=lambda _p: InMemoryWindowStore(evict_every=every),
    )  # fmt: skip
    assert all(len(batch) <= limit for batch in chunked.outputs)
    assert flat(chunked) == flat(unlimited)
    assert chunked.late == unlimited.late


def test_the_timer_index_does_not_grow_in_memory_with_spilled_windows(tmp_path: Path) -> None:
    # 20,000 windows open in one hour, 100 of them allowed in memory: the in-memory timer index
    # stays near the cache's size (before, it held one entry per open window: 20,000), and the
    # hour still fires every window, in order, from disk.
    agg = compile_aggregates([("n", "count", None), ("s", "sum", "x")])
    store = PartitionStore(tmp_path / "db", agg.dumps, agg.loads, max_cached=100)
    op = WindowOperator("tumbling", 3_600_000, None, None, 0, agg, "final", store)
    most = 0
    for i in range(20_000):
        assert op.process(f"key-{i:05d}", i, {"x": i}, NO_WATERMARK)
        if i % 100 == 99:
            assert op.advance(i) == []
            most = max(most, op.timer_entries)
    assert len(store) == 20_000
    assert store.cached <= 100
    assert most <= 200
    fired: list[WindowResult] = []
    while True:
        fired += op.advance(END_OF_TIME, limit=3_000)
        assert op.timer_entries <= 200
        if not op.firing:
            break
    assert [r.key for r in fired] == [f"key-{i:05d}" for i in range(20_000)]
    assert all(r.values == {"n": 1, "s": int(r.key[4:])} for r in fired)
    assert len(store) == 0
    store.close()


def test_a_restored_operator_over_spilled_windows_indexes_their_ends_only(tmp_path: Path) -> None:
    agg = compile_aggregates([("n", "count", None)])
    store = PartitionStore(tmp_path / "db", agg.dumps, agg.loads, max_cached=1000)
    op = WindowOperator("sliding", 10, 5, None, 0, agg, "final", store)
    for i in range(500):
        op.process(f"k{i:03d}", i % 20, {}, NO_WATERMARK)
    store.flush({"offset": 500})
    store.close()

    reopened = PartitionStore(tmp_path / "db", agg.dumps, agg.loads, max_cached=1000)
    restored = WindowOperator("sliding", 10, 5, None, 0, agg, "final", reopened)
    restored.restore()
    assert restored.timer_entries == 0
    assert restored.open_windows == 1000
    fired = restored.advance(END_OF_TIME)
    assert [(r.end, r.key) for r in fired] == sorted((r.end, r.key) for r in fired)
    assert len(fired) == 1000
    assert {r.values["n"] for r in fired} == {1}
    reopened.close()


# -- specific behaviours ----------------------------------------------------------------------


def operator(kind: str = "tumbling", emit: EmitMode = "final", lateness: int = 0) -> WindowOperator:
    agg = compile_aggregates([("n", "count", None), ("s", "sum", "x")])
    return WindowOperator(kind, 10, 5, 10, lateness, agg, emit, InMemoryWindowStore())


def test_a_record_whose_windows_are_all_closed_is_late_and_stores_nothing() -> None:
    op = operator(lateness=3)
    assert op.process("a", 5, {"x": 1}, 11)  # [0,10) closes at W = 9 + 3 = 12
    assert not op.process("a", 5, {"x": 1}, 12)
    assert op.open_windows == 1
    assert op.advance(12) == [WindowResult("a", 0, 10, {"n": 1, "s": 1}, True)]
    assert op.open_windows == 0


def test_lateness_comes_from_the_watermark_not_from_what_is_in_memory() -> None:
    # [0,10) has fired and gone; a record for it that arrives with a watermark of 8 would be
    # in time, but watermarks never go back: the operator already saw 9, so the record is late
    # and the window is not emitted a second time.
    op = operator()
    assert op.process("a", 1, {"x": 1}, NO_WATERMARK)
    assert [r.final for r in op.advance(9)] == [True]
    assert not op.process("a", 2, {"x": 1}, 8)
    assert op.advance(END_OF_TIME) == []


def test_closed_windows_fire_in_order_of_end_then_key() -> None:
    op = operator()
    for key, ts in [("b", 3), ("a", 13), ("a", 4), ("c", 1), ("b", 25)]:
        assert op.process(key, ts, {"x": ts}, NO_WATERMARK)
    fired = op.advance(19)
    assert [(r.key, r.start) for r in fired] == [("a", 0), ("b", 0), ("c", 0), ("a", 10)]
    assert op.open_windows == 1
    assert [(r.key, r.start) for r in op.advance(END_OF_TIME)] == [("b", 20)]


def test_updates_mode_emits_each_changed_window_once_per_advance_then_its_final_value() -> None:
    op = operator(emit="updates")
    op.process("a", 1, {"x": 1}, NO_WATERMARK)
    op.process("a", 2, {"x": 2}, NO_WATERMARK)
    op.process("b", 12, {"x": 5}, NO_WATERMARK)
    assert op.advance(0) == [
        WindowResult("a", 0, 10, {"n": 2, "s": 3}, False),
        WindowResult("b", 10, 20, {"n": 1, "s": 5}, False),
    ]
    assert op.advance(1) == []  # nothing changed
    op.process("a", 3, {"x": 3}, 1)
    assert op.advance(9) == [
        WindowResult("a", 0, 10, {"n": 3, "s": 6}, False),
        WindowResult("a", 0, 10, {"n": 3, "s": 6}, True),
    ]


def test_a_record_bridging_two_sessions_merges_them() -> None:
    op = operator("session")
    op.process("a", 0, {"x": 1}, NO_WATERMARK)  # [0,10)
    op.process("a", 15, {"x": 2}, NO_WATERMARK)  # [15,25)
    assert op.open_windows == 2
    op.process("a", 9, {"x": 4}, NO_WATERMARK)  # [9,19) touches both
    assert op.open_windows == 1
    assert op.advance(END_OF_TIME) == [WindowResult("a", 0, 25, {"n": 3, "s": 7}, True)]


def test_a_session_absorbed_by_a_merge_after_emitting_an_update_is_retracted() -> None:
    op = operator("session", emit="updates")  # gap 10
    op.process("a", 0, {"x": 1}, NO_WATERMARK)  # [0,10)
    op.process("a", 15, {"x": 2}, NO_WATERMARK)  # [15,25)
    assert op.advance(NO_WATERMARK) == [
        WindowResult("a", 0, 10, {"n": 1, "s": 1}, False),
        WindowResult("a", 15, 25, {"n": 1, "s": 2}, False),
    ]
    op.process("a", 9, {"x": 4}, NO_WATERMARK)  # [9,19) bridges both: one session [0,25)
    assert op.advance(NO_WATERMARK) == [
        WindowResult("a", 0, 10, {}, False, True),
        WindowResult("a", 15, 25, {}, False, True),
        WindowResult("a", 0, 25, {"n": 3, "s": 7}, False),
    ]
    assert op.advance(END_OF_TIME) == [WindowResult("a", 0, 25, {"n": 3, "s": 7}, True)]


def test_a_growing_session_retracts_only_the_bounds_it_emitted() -> None:
    op = operator("session", emit="updates")
    op.process("a", 0, {"x": 1}, NO_WATERMARK)  # [0,10)
    assert [r.end for r in op.advance(NO_WATERMARK)] == [10]
    op.process("a", 5, {"x": 1}, NO_WATERMARK)  # [0,15), not emitted
    op.process("a", 8, {"x": 1}, NO_WATERMARK)  # [0,18)
    assert op.advance(NO_WATERMARK) == [
        WindowResult("a", 0, 10, {}, False, True),
        WindowResult("a", 0, 18, {"n": 3, "s": 3}, False),
    ]
    op.process("a", 2, {"x": 1}, NO_WATERMARK)  # inside: same bounds, no retraction
    assert op.advance(END_OF_TIME) == [
        WindowResult("a", 0, 18, {"n": 4, "s": 4}, False),
        WindowResult("a", 0, 18, {"n": 4, "s": 4}, True),
    ]


def test_sessions_restored_in_updates_mode_count_as_emitted_and_are_retracted_when_they_grow() -> None:
    agg = compile_aggregates([("n", "count", None)])
    store = InMemoryWindowStore()
    op = WindowOperator("session", None, None, 10, 0, agg, "updates", store)
    op.process("a", 0, {}, NO_WATERMARK)
    assert op.advance(NO_WATERMARK) == [WindowResult("a", 0, 10, {"n": 1}, False)]
    restored = WindowOperator("session", None, None, 10, 0, agg, "updates", store)
    restored.restore()
    restored.process("a", 5, {}, NO_WATERMARK)
    assert restored.advance(END_OF_TIME) == [
        WindowResult("a", 0, 10, {}, False, True),
        WindowResult("a", 0, 15, {"n": 2}, False),
        WindowResult("a", 0, 15, {"n": 2}, True),
    ]


BIG = 2**62


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
def test_a_record_that_would_overflow_a_sum_changes_no_window_and_raises_overflow(kind: str) -> None:
    agg = compile_aggregates([("n", "count", None), ("s", "sum", "x")])
    store = InMemoryWindowStore(agg.dumps, agg.loads)
    op = WindowOperator(kind, 10, 5, 10, 0, agg, "updates", store)
    # Sliding (size 10, slide 5): the record at 14 would fit [5,15) but overflow [10,20).
    assert op.process("a", 7, {"x": -1}, NO_WATERMARK)
    assert op.process("a", 15, {"x": BIG}, NO_WATERMARK)
    assert op.process("a", 16, {"x": BIG - 1}, NO_WATERMARK)
    before = sorted(store.items())
    with pytest.raises(Overflow, match="'s' of field 'x' would be 92233720368547758"):
        op.process("a", 14, {"x": 2}, NO_WATERMARK)
    assert sorted(store.items()) == before, "no window took the record"
    assert op.process("a", 14, {"x": -1}, NO_WATERMARK), "the window still takes representable records"
    finals = {(r.start, r.end): r.values for r in op.advance(END_OF_TIME) if r.final}
    expected = {
        "tumbling": {(0, 10): {"n": 1, "s": -1}, (10, 20): {"n": 3, "s": 2**63 - 2}},
        "sliding": {
            (0, 10): {"n": 1, "s": -1},
            (5, 15): {"n": 2, "s": -2},
            (10, 20): {"n": 3, "s": 2**63 - 2},
            (15, 25): {"n": 2, "s": 2**63 - 1},
        },
        "session": {(7, 26): {"n": 4, "s": 2**63 - 3}},
    }[kind]
    assert finals == expected


def test_a_record_whose_merge_of_two_sessions_would_overflow_leaves_both_sessions_as_they_were() -> None:
    agg = compile_aggregates([("n", "count", None), ("s", "sum", "x")])
    op = WindowOperator("session", None, None, 10, 0, agg, "updates", InMemoryWindowStore())
    op.process("a", 0, {"x": BIG}, NO_WATERMARK)  # [0,10)
    op.process("a", 15, {"x": BIG}, NO_WATERMARK)  # [15,25)
    op.advance(NO_WATERMARK)
    with pytest.raises(Overflow):
        op.process("a", 9, {"x": 0}, NO_WATERMARK)  # would bridge them: 2**63 is one too many
    assert op.open_windows == 2
    assert op.advance(END_OF_TIME) == [
        WindowResult("a", 0, 10, {"n": 1, "s": BIG}, True),
        WindowResult("a", 15, 25, {"n": 1, "s": BIG}, True),
    ]


def test_records_exactly_one_gap_apart_share_a_session_as_in_flink() -> None:
    op = operator("session")  # gap 10
    op.process("a", 0, {"x": 1}, NO_WATERMARK)  # [0,10)
    op.process("a", 10, {"x": 2}, NO_WATERMARK)  # [10,20) touches it: one session [0,20)
    op.process("a", 31, {"x": 4}, NO_WATERMARK)  # 11 after the last record: a new session
    assert op.advance(END_OF_TIME) == [
        WindowResult("a", 0, 20, {"n": 2, "s": 3}, True),
        WindowResult("a", 31, 41, {"n": 1, "s": 4}, True),
    ]


@pytest.mark.parametrize("advance_first", [True, False])
def test_a_record_never_joins_a_session_that_is_already_closed(advance_first: bool) -> None:
    op = operator("session")
    op.process("a", 0, {"x": 1}, NO_WATERMARK)  # [0,10), closed from W = 9
    fired = op.advance(9) if advance_first else []
    # In time for its own session [5,15) but overlapping the closed [0,10): a new session,
    # whether or not [0,10) has been fired yet.
    assert op.process("a", 5, {"x": 2}, 9)
    fired += op.advance(END_OF_TIME)
    assert fired == [
        WindowResult("a", 0, 10, {"n": 1, "s": 1}, True),
        WindowResult("a", 5, 15, {"n": 1, "s": 2}, True),
    ]


def test_a_closed_but_unfired_session_survives_a_restore_without_absorbing_new_records() -> None:
    agg = compile_aggregates([("n", "count", None)])
    store = InMemoryWindowStore()
    op = WindowOperator("session", None, None, 10, 0, agg, "final", store)
    op.process("a", 0, {}, NO_WATERMARK)
    op.process("a", 20, {}, 9)  # [0,10) is closed now but not fired
    restored = WindowOperator("session", None, None, 10, 0, agg, "final", store)
    restored.restore()
    assert restored.open_windows == 2
    assert restored.process("a", 5, {}, 10)
    assert restored.advance(END_OF_TIME) == [
        WindowResult("a", 0, 10, {"n": 1}, True),
        WindowResult("a", 5, 15, {"n": 1}, True),
        WindowResult("a", 20, 30, {"n": 1}, True),
    ]


def test_sliding_records_skip_their_closed_windows_but_fill_the_open_ones() -> None:
    op = operator("sliding")  # size 10, slide 5
    assert op.process("a", 12, {"x": 1}, 14)  # [5,15) closed at W=14; [10,20) open
    assert op.advance(END_OF_TIME) == [WindowResult("a", 10, 20, {"n": 1, "s": 1}, True)]


def test_a_store_that_copies_on_get_sees_every_change() -> None:
    agg = compile_aggregates([("n", "count", None)])
    store = InMemoryWindowStore(agg.dumps, agg.loads)
    op = WindowOperator("tumbling", 10, None, None, 0, agg, "final", store)
    for ts in range(5):
        op.process("a", ts, {}, NO_WATERMARK)
    assert store.puts == 5
    assert op.advance(END_OF_TIME) == [WindowResult("a", 0, 10, {"n": 5}, True)]


def test_the_operator_rejects_an_unknown_emit_mode_and_bad_shapes() -> None:
    agg = compile_aggregates([("n", "count", None)])
    with pytest.raises(ValueError, match="emit"):
        WindowOperator("tumbling", 10, None, None, 0, agg, "sometimes", InMemoryWindowStore())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slide_ms"):
        WindowOperator("sliding", 10, 20, None, 0, agg, "final", InMemoryWindowStore())


def test_the_fake_clock_moves_only_when_told_and_never_backwards() -> None:
    clock = FakeClock(1_000)
    assert clock() == 1_000
    assert clock.advance(250) == 1_250
    clock.now_ms = 5_000
    assert clock() == 5_000
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
