"""Upgrades across a savepoint, in process: the real worker loop on the in-memory broker and
store, one pipeline version stopped with a savepoint and the next restored from it, the
committed read_committed output (sink and dead letters) compared exactly with an uninterrupted
run and with the brute-force windowing reference.

The input is split in phases: phase 1 is read by v1, which then takes a savepoint and stops
(what the operator does before an upgrade); the next phase is appended and read by v2, restored
from that savepoint; a rollback appends a third phase read by v1 again.
"""

from __future__ import annotations

import itertools
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from weir.aggregates import compile_aggregates
from weir.checkpoint_manifest import CorruptCheckpoint, Manifest
from weir.config import Environment
from weir.controlapi import SavepointRequest
from weir.custom_aggregates import compile_custom_aggregates
from weir.examples.dedup import Dedup
from weir.graph import JobGraph, compile_job
from weir.recovery import IncompatibleState, choose
from weir.spec import Aggregate, load_job
from weir.state_migration import StateShapeMismatch, accumulator_migration, layout_of, verdict
from weir.testing import reference_windows
from weir.testing.broker import STEPS, Crash, Faults, FaultyStore, MemoryBroker, memory_worker
from weir.worker import Worker

T0 = 1_704_067_200_000
PARTITIONS = 2
END_KEY = "~end"
V1 = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "amount"}}
V2 = {**V1, "mx": {"fn": "max", "field": "amount"}}
Event = tuple[int, str, int, dict[str, Any] | None]


def graph(
    outputs: dict[str, Any],
    size: str = "10s",
    name: str = "eo",
    key_by: bool = False,
    process: str | None = None,
    window: dict[str, Any] | None = None,
) -> JobGraph:
    steps: list[dict[str, Any]] = [
        {"window": window or {"type": "tumbling", "size": size}},
        {"aggregate": {"outputs": outputs}},
    ]
    if process is not None:
        steps = [{"process": {"function": process}}]
    if key_by:
        steps.insert(0, {"keyBy": {"field": "user"}})
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": {"topics": ["events"], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "2s"},
                "steps": steps,
                "sink": {"topic": "out"},
                "deadLetter": {"topic": "dlq"},
            },
        },
    }
    return compile_job(load_job(orjson.dumps(doc).decode()), wall_ms=lambda: T0 + 86_400_000)


def events(seed: int, count: int = 90) -> list[Event]:
    """``(partition, key, ts, record)`` with a few out-of-order, late and undecodable records; a
    key lives in one partition; the last records (one per partition) close every window."""
    rng = random.Random(seed)
    out: list[Event] = []
    clock = [T0, T0]
    for _ in range(count):
        p = rng.randrange(PARTITIONS)
        clock[p] += rng.randrange(0, 1500)
        ts = clock[p] - (rng.randrange(0, 15_000) if rng.random() < 0.15 else 0)
        key = f"k{p}-{rng.randrange(3)}"
        record = None if rng.random() < 0.05 else {"ts": ts, "amount": rng.randrange(100), "user": key}
        out.append((p, key, ts, record))
    for p in range(PARTITIONS):
        end = clock[p] + 3_600_000
        out.append((p, f"{END_KEY}{p}", end, {"ts": end, "amount": 0, "user": f"{END_KEY}{p}"}))
    return out


def phases(evts: list[Event], *cuts: int) -> list[list[Event]]:
    bounds = [0, *cuts, len(evts)]
    return [evts[a:b] for a, b in itertools.pairwise(bounds)]


def append(broker: MemoryBroker, evts: list[Event]) -> None:
    for p, key, _ts, record in evts:
        value = b"{not json" if record is None else orjson.dumps(record)
        broker.append("events", value, key.encode(), p)


def new_broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.create("events", PARTITIONS)
    broker.create("out", PARTITIONS)
    return broker


@dataclass
class Cluster:
    """One broker, one checkpoint store and one worker's state directory, across versions."""

    root: Path
    broker: MemoryBroker = field(default_factory=new_broker)
    faults: Faults = field(default_factory=Faults)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.backend = FaultyStore(self.faults)

    def run(
        self,
        g: JobGraph,
        *,
        savepoint: str | None = None,
        restore_from: str | None = None,
        allow_reset: bool = False,
        schedule: list[tuple[str, int]] | None = None,
        wipe: bool = False,
        seed: int = 0,
    ) -> None:
        """Run ``g`` until its input is read, through the aborts of ``schedule`` (a restart gets
        the same settings, as a pod does); then stop, with a savepoint named ``savepoint`` if
        given (the operator's stop-with-savepoint)."""
        rng = random.Random(seed)
        pending = list(schedule or [])
        state = self.root / "state"
        if wipe:
            shutil.rmtree(state, ignore_errors=True)
        while True:
            self.faults.arm(*pending.pop(0)) if pending else self.faults.arm(None)
            worker = self._worker(g, state, rng.randrange(3, 12), savepoint, restore_from, allow_reset)
            try:
                assert worker.run() == 0
                return
            except Crash:
                self.restarts += 1
                assert self.restarts < 50, "the job never got through its schedule"
                if rng.random() < 0.5:
                    shutil.rmtree(state, ignore_errors=True)

    def _worker(
        self,
        g: JobGraph,
        state: Path,
        batch_size: int,
        savepoint: str | None,
        restore_from: str | None,
        allow_reset: bool,
    ) -> Worker:
        asked = [False]

        def on_consume(n: int) -> None:
            if n or asked[0]:
                return
            asked[0] = True  # the input is read
            if savepoint is None:
                worker.stop()
            else:
                worker.savepoints.ask(SavepointRequest(id=savepoint, stop=True))

        worker = memory_worker(
            g, self.broker, state, on_consume=on_consume, backend=self.backend, faults=self.faults,
            batch_size=batch_size, restore_from=restore_from, allow_state_reset=allow_reset,
        )
        return worker

    def mark(self) -> tuple[int, ...]:
        """Where the committed output ends now (per partition)."""
        return tuple(len(part) for part in self.broker.topics["out"])

    def out(
        self, since: tuple[int, ...] | None = None, until: tuple[int, ...] | None = None
    ) -> list[dict[str, Any]]:
        """The committed results, partition by partition; only those between two marks if given."""
        parts = self.broker.topics["out"]
        return [
            orjson.loads(m.value() or b"")
            for p, part in enumerate(parts)
            for m in part[(since[p] if since else 0) : (until[p] if until else len(part))]
        ]

    def dead_letters(self) -> int:
        return len(self.broker.records("dlq"))


def savepoint_url(sid: str, job: str = "eo") -> str:
    return f"memory://mem/ck/test/{job}/savepoints/{sid}"


def window(r: dict[str, Any]) -> tuple[str, int, int]:
    return (r["key"], r["windowStartMs"], r["windowEndMs"])


def without(records: list[dict[str, Any]], *names: str) -> Counter[bytes]:
    return Counter(orjson.dumps({k: v for k, v in r.items() if k not in names}, option=orjson.OPT_SORT_KEYS)
                   for r in records)


def uninterrupted(
    root: Path, outputs: dict[str, Any], *parts: list[Event], window: dict[str, Any] | None = None
) -> Cluster:
    """One version reading the phases one after the other, stopping (with a final checkpoint)
    after each: the run an upgrade is compared with."""
    c = Cluster(root)
    for part in parts:
        append(c.broker, part)
        c.run(graph(outputs, window=window))
    return c


def phase_two_reference(
    evts: list[Event], first: int, last: int, size_ms: int
) -> tuple[dict[tuple[str, int, int], dict[str, Any]], int]:
    """What a pipeline restarted with empty state at record ``first`` computes from the records
    ``first..last-1`` (``n`` and ``total``; windows with none of them do not exist), and how many
    of them it dead-letters. The records before ``first`` still move the watermark: the restored
    one is theirs."""
    marked = []
    for i, (p, k, ts, r) in enumerate(evts[:last]):
        if r is not None:
            mine = first <= i
            only = {"one": 1 if mine else None, "amount": r["amount"] if mine else None}
            marked.append((p, k, ts, {**r, **only}))
    specs = [("n", "sum", "one"), ("total", "sum", "amount")]
    windows, late = reference_windows(marked, "tumbling", size_ms, None, None, 0, 2_000, specs)
    # Only the windows closed by the watermark after record ``last - 1`` (a window is closed
    # when its end <= watermark + 1; a key lives in one partition).
    wm = {
        p: max(ts for q, _k, ts, r in evts[:last] if q == p and r is not None) - 2_000
        for p in range(PARTITIONS)
    }
    partition = {k: p for p, k, _ts, _r in evts}
    got = {
        w: v for w, v in windows.items()
        if v["n"] and not w[0].startswith(END_KEY) and w[2] <= wm[partition[w[0]]] + 1
    }
    late_mine = sum(1 for e in late if e[3] is not None and e[3]["one"])
    undecodable = sum(1 for e in evts[first:last] if e[3] is None)
    return got, late_mine + undecodable


# -- the accumulator migration ----------------------------------------------------------------
def test_a_migrated_accumulator_keeps_outputs_by_name_starts_added_ones_empty_drops_removed_ones() -> None:
    old = compile_aggregates([("n", "count", None), ("d", "count_distinct", "u"), ("a", "avg", "x")])
    new = compile_aggregates([("a", "avg", "x"), ("mx", "max", "x"), ("d", "count_distinct", "u")])
    acc = old.create()
    for i, rec in enumerate([{"u": "a", "x": 2}, {"u": "b", "x": 4}, {"u": "a", "x": 9}]):
        old.add(acc, rec, i)
    migrate = accumulator_migration(tuple(old.specs), new)
    assert migrate is not None
    moved = new.loads(migrate(old.dumps(acc)))
    assert new.result(moved) == {"a": 5.0, "mx": None, "d": 2}
    new.add(moved, {"u": "c", "x": 1}, 3)
    assert new.result(moved) == {"a": 4.0, "mx": 1, "d": 3}


class Top:
    """A custom aggregate: the largest value seen (for the custom-slot migration)."""

    def create(self) -> Any:
        return None

    def add(self, acc: Any, value: Any) -> Any:
        return value if acc is None or value > acc else acc

    def merge(self, a: Any, b: Any) -> Any:
        return b if a is None or (b is not None and b > a) else a

    def result(self, acc: Any) -> Any:
        return acc


def custom(outputs: dict[str, Any]) -> Any:
    aggregate = Aggregate.model_validate({"outputs": outputs})
    return compile_custom_aggregates(aggregate, {n: Top() for n, o in outputs.items() if o["fn"] == "custom"})


def test_custom_outputs_keep_their_accumulators_by_name_across_a_migration() -> None:
    top = {"fn": "custom", "function": "tests.unit.test_state_migration:Top", "field": "x"}
    old = custom({"n": {"fn": "count"}, "t": top})
    new = custom({"t2": top, "t": top, "s": {"fn": "sum", "field": "x"}})
    acc = old.create()
    for i, x in enumerate([3, 7, 5]):
        old.add(acc, {"x": x}, i)
    migrate = accumulator_migration(tuple(old.specs), new)
    assert migrate is not None
    moved = new.loads(migrate(old.dumps(acc)))
    assert new.result(moved) == {"t2": None, "t": 7, "s": 0}
    back = accumulator_migration(tuple(new.specs), old)
    assert back is not None
    assert old.result(old.loads(back(new.dumps(moved)))) == {"n": 0, "t": 7}


def test_an_unchanged_layout_needs_no_migration() -> None:
    agg = compile_aggregates([("n", "count", None)])
    assert accumulator_migration(tuple(tuple(s) for s in layout_of(agg)), agg) is None  # type: ignore[arg-type]


# -- (1) and (2): adding and removing an output across a savepoint ------------------------------
WINDOWS = {
    "tumbling": ({"type": "tumbling", "size": "10s"}, (10_000, None, None)),
    "sliding": ({"type": "sliding", "size": "10s", "slide": "5s"}, (10_000, 5_000, None)),
    "session": ({"type": "session", "gap": "3s"}, (None, None, 3_000)),
}


@pytest.mark.parametrize("kind", sorted(WINDOWS))
@pytest.mark.parametrize("seed", range(3))
def test_an_output_added_across_a_savepoint_is_in_every_window_closing_after_it_and_the_rest_is_exact(
    seed: int, kind: str, tmp_path: Path
) -> None:
    """Windows open at the upgrade carry ``mx`` over the records processed since the upgrade
    only (its state starts empty there; a session merged after it takes the maximum of both
    parts' since-upgrade records); their other outputs are exact."""
    spec, (size, slide, gap) = WINDOWS[kind]
    evts = events(seed)
    one, two = phases(evts, 45)
    want = uninterrupted(tmp_path / "ref", V1, one, two, window=spec)
    c = Cluster(tmp_path / "up")
    append(c.broker, one)
    c.run(graph(V1, window=spec), savepoint="sp-up")
    upgrade = c.mark()
    append(c.broker, two)
    c.run(graph(V2, window=spec), restore_from=savepoint_url("sp-up"))
    assert without(c.out(), "mx") == without(want.out())
    assert c.dead_letters() == want.dead_letters()
    old, new = c.out(until=upgrade), c.out(since=upgrade)
    assert all("mx" not in r for r in old) and all("mx" in r for r in new)
    assert new, "no window closed after the upgrade"
    marked = [(p, k, ts, {**r, "since": r["amount"] if i >= 45 else None})
              for i, (p, k, ts, r) in enumerate(evts) if r is not None]
    mx, _late = reference_windows(marked, kind, size, slide, gap, 0, 2_000, [("mx", "max", "since")])
    assert {window(r): r["mx"] for r in new} == {window(r): mx[window(r)]["mx"] for r in new}


@pytest.mark.parametrize("seed", range(3))
def test_an_output_removed_across_a_savepoint_is_gone_from_later_windows_and_the_rest_is_exact(
    seed: int, tmp_path: Path
) -> None:
    evts = events(seed)
    one, two = phases(evts, 45)
    want = uninterrupted(tmp_path / "ref", V2, one, two)
    c = Cluster(tmp_path / "up")
    append(c.broker, one)
    c.run(graph(V2), savepoint="sp-up")
    upgrade = c.mark()
    append(c.broker, two)
    c.run(graph(V1), restore_from=savepoint_url("sp-up"))
    assert without(c.out(), "mx") == without(want.out(), "mx")
    assert without(c.out(until=upgrade)) == without(want.out(until=upgrade))
    assert all("mx" in r for r in c.out(until=upgrade))
    assert all("mx" not in r for r in c.out(since=upgrade))
    assert c.dead_letters() == want.dead_letters()


# -- (3): an incompatible change -------------------------------------------------------------
def test_a_changed_window_size_is_refused_naming_the_field_and_commits_nothing(tmp_path: Path) -> None:
    evts = events(0)
    one, two = phases(evts, 45)
    c = Cluster(tmp_path)
    append(c.broker, one)
    c.run(graph(V1), savepoint="sp-up")
    committed = (c.mark(), c.dead_letters())
    append(c.broker, two)
    refused = r"state shape mismatch: .*window\.size.*allow a state reset"
    with pytest.raises(StateShapeMismatch, match=refused):
        c.run(graph(V1, size="50s"), restore_from=savepoint_url("sp-up"))
    assert (c.mark(), c.dead_letters()) == committed


@pytest.mark.parametrize("seed", range(3))
def test_with_a_reset_allowed_a_changed_window_size_starts_empty_at_the_savepoints_offsets(
    seed: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented effect: windows open at the savepoint restart empty (the records before it
    are in no later window); nothing committed before is produced again."""
    evts = events(seed)
    one, two = phases(evts, 45)
    c = Cluster(tmp_path)
    append(c.broker, one)
    c.run(graph(V1), savepoint="sp-up")
    before, upgrade, dead_before = c.out(), c.mark(), c.dead_letters()
    append(c.broker, two)
    with caplog.at_level("WARNING", logger="weir.commit"):
        c.run(graph(V1, size="50s"), restore_from=savepoint_url("sp-up"), allow_reset=True)
    resets = [r for r in caplog.records if "state reset" in r.getMessage()]
    assert len(resets) == 1 and "events/0" in resets[0].getMessage()
    assert c.out(until=upgrade) == before
    after = c.out(since=upgrade)
    want, dead = phase_two_reference(evts, 45, len(evts), 50_000)
    assert {window(r): {"n": r["n"], "total": r["total"]} for r in after} == want
    assert len(after) == len(want)
    assert c.dead_letters() - dead_before == dead


# -- (4) and (5): rollbacks ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_a_rollback_after_a_state_reset_replays_the_old_savepoint_and_commits_every_window_once(
    seed: int, tmp_path: Path
) -> None:
    """v1 -> savepoint -> v2 (window 20s, state reset) commits output -> v1 restarted from its
    savepoint: it replays what v2 read with output suppressed, then goes on. The committed
    output is v1's windows closed before the upgrade, v2's windows, and v1's windows closing
    after the rollback (exactly those an uninterrupted v1 emits then); the 10s windows that
    closed while v2 ran are covered by v2's 20s windows instead."""
    rollback_after_a_reset(seed, tmp_path, crashes=False)


@pytest.mark.parametrize("seed", range(6))
def test_crashes_around_a_reset_upgrade_and_its_rollback_still_commit_every_window_once(
    seed: int, tmp_path: Path
) -> None:
    rollback_after_a_reset(seed, tmp_path, crashes=True)


def rollback_after_a_reset(seed: int, tmp_path: Path, crashes: bool) -> None:
    rng = random.Random(seed)

    def schedule() -> list[tuple[str, int]]:
        return [(rng.choice(STEPS), rng.randrange(1, 4))] if crashes else []

    evts = events(seed % 3)
    one, two, three = phases(evts, 35, 65)
    want = uninterrupted(tmp_path / "ref", V1, one)
    want_upgrade = want.mark()
    append(want.broker, two)
    want.run(graph(V1))
    want_rollback, want_dead = want.mark(), want.dead_letters()
    append(want.broker, three)
    want.run(graph(V1))
    c = Cluster(tmp_path / "up")
    append(c.broker, one)
    c.run(graph(V1), savepoint="sp-up", schedule=schedule(), seed=seed)
    upgrade, dead_at_upgrade = c.mark(), c.dead_letters()
    append(c.broker, two)
    c.run(graph(V1, size="20s"), restore_from=savepoint_url("sp-up"), allow_reset=True, schedule=schedule(),
          seed=seed + 1)
    rollback, dead = c.mark(), c.dead_letters()
    v2 = c.out(since=upgrade)
    v2_want, v2_dead = phase_two_reference(evts, 35, 65, 20_000)
    assert {window(r): {"n": r["n"], "total": r["total"]} for r in v2} == v2_want and len(v2) == len(v2_want)
    assert v2, "v2 committed no window"
    assert dead - dead_at_upgrade == v2_dead
    append(c.broker, three)
    c.run(graph(V1), restore_from=savepoint_url("sp-up"), wipe=seed % 2 == 0, schedule=schedule(),
          seed=seed + 2)
    assert c.restarts >= 1 or not crashes
    assert c.out(until=upgrade) == want.out(until=want_upgrade)
    assert without(c.out(since=rollback)) == without(want.out(since=want_rollback))
    assert c.out(since=rollback), "no window closed after the rollback"
    assert c.dead_letters() - dead == want.dead_letters() - want_dead


@pytest.mark.parametrize("restore_from", [None, "sp-up"])
@pytest.mark.parametrize("wipe", [False, True])
def test_a_rollback_after_an_added_output_restores_the_new_versions_checkpoint_without_it_exactly(
    restore_from: str | None, wipe: bool, tmp_path: Path
) -> None:
    evts = events(1)
    one, two, three = phases(evts, 35, 65)
    want = uninterrupted(tmp_path / "ref", V1, one, two, three)
    c = Cluster(tmp_path / "up")
    append(c.broker, one)
    c.run(graph(V1), savepoint="sp-up")
    append(c.broker, two)
    c.run(graph(V2), restore_from=savepoint_url("sp-up"))
    rollback = c.mark()
    append(c.broker, three)
    c.run(graph(V1), restore_from=restore_from and savepoint_url(restore_from), wipe=wipe)
    assert without(c.out(), "mx") == without(want.out())
    assert c.out(since=rollback) and all("mx" not in r for r in c.out(since=rollback))
    assert c.dead_letters() == want.dead_letters()


# -- (6): a renamed keyBy job ------------------------------------------------------------------
def test_a_keyby_jobs_savepoint_restored_into_a_renamed_job_is_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    append(c.broker, events(0)[:40])
    c.run(graph(V1, key_by=True), savepoint="sp-up")
    with pytest.raises(StateShapeMismatch, match="keyBy"):
        c.run(graph(V1, name="eo2", key_by=True), restore_from=savepoint_url("sp-up"))


class Renamed(Dedup):
    """The dedup process function under another reference (its state is another's)."""


def test_a_process_functions_savepoint_restored_into_another_function_is_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    append(c.broker, [(p, k, ts, r and {**r, "eventId": f"e{ts % 5}"}) for p, k, ts, r in events(0)[:40]])
    c.run(graph(V1, process="weir.examples.dedup:Dedup"), savepoint="sp-up")
    with pytest.raises(StateShapeMismatch, match="process"):
        c.run(graph(V1, process=f"{__name__}:Renamed"), restore_from=savepoint_url("sp-up"))
    c.run(graph(V1, process="weir.examples.dedup:Dedup"), restore_from=savepoint_url("sp-up"))


# -- (7): crashes around the upgrade -----------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_crashes_around_an_upgrade_that_adds_an_output_still_commit_exactly_once(
    seed: int, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    evts = events(seed % 3)
    one, two = phases(evts, 45)
    want = uninterrupted(tmp_path / "ref", V1, one, two)
    c = Cluster(tmp_path / "up")
    append(c.broker, one)
    c.run(graph(V1), savepoint="sp-up", schedule=[(rng.choice(STEPS), rng.randrange(1, 4))], seed=seed)
    append(c.broker, two)
    c.run(graph(V2), restore_from=savepoint_url("sp-up"),
          schedule=[(rng.choice(STEPS), rng.randrange(1, 4)) for _ in range(2)], seed=seed + 1)
    assert without(c.out(), "mx") == without(want.out())
    assert c.dead_letters() == want.dead_letters()
    assert c.restarts >= 1


# -- the pieces: manifests, settings, the recovery choice ------------------------------------------
def test_a_manifest_records_the_state_shape_and_reads_back_without_one_from_an_older_weir() -> None:
    shape = graph(V2).shape.to_json()
    m = Manifest("checkpoint", "0000000001-w0", T0, "0", "test", "eo", 0, 1, {}, "job", state_shape=shape)
    assert Manifest.from_json(m.to_json(), "memory://mem/x").state_shape == shape
    older = orjson.loads(m.to_json())
    del older["stateShape"]
    assert Manifest.from_json(orjson.dumps(older), "memory://mem/x").state_shape is None
    with pytest.raises(CorruptCheckpoint, match="stateShape"):
        Manifest.from_json(orjson.dumps({**older, "stateShape": [1]}), "memory://mem/x")


def test_shapes_are_compared_by_output_name_and_a_missing_one_is_taken_as_matching() -> None:
    v1, v2 = graph(V1).shape, graph(V2).shape
    assert verdict(None, v2).kind == "same"
    assert verdict(v1.to_json(), v2).kind == "migrate"
    assert verdict(v2.to_json(), v1).kind == "migrate"
    assert verdict(graph(V1, size="50s").shape.to_json(), v1).kind == "incompatible"
    assert not verdict({"stage": 3}, v1).compatible


def test_the_state_reset_is_allowed_by_the_environment_or_not_at_all() -> None:
    assert Environment.read({"WEIR_ALLOW_STATE_RESET": "1"}).allow_state_reset
    assert Environment.read({"WEIR_ALLOW_STATE_RESET": "true"}).allow_state_reset
    assert not Environment.read({"WEIR_ALLOW_STATE_RESET": "0"}).allow_state_reset
    assert not Environment.read({}).allow_state_reset


@dataclass(frozen=True)
class Snap:
    id: str
    created_ms: int
    offset: int
    fits: bool = True

    def progress(self, partition: str) -> dict[str, Any] | None:
        return {"offset": self.offset, "wm": self.offset * 10}


def fits(s: Any) -> bool:
    return bool(s.fits)


def test_an_incompatible_committed_checkpoint_is_replayed_from_the_newest_compatible_one_behind_it() -> None:
    old, savepoint, other = Snap("c1", 1, 100), Snap("sp", 2, 150), Snap("c9", 3, 300, fits=False)
    r = choose("t/0", 300, [old, other], [savepoint], committed_id="c9", compatible=fits)
    assert (r.how, r.source, r.offset, r.replay_until, r.replay_wm) == ("replay", savepoint, 150, 300, 3000)
    # The newer checkpoint matching the commit means the job already resumed: it is not rewound.
    r = choose("t/0", 300, [old, other], [], committed_id="c9", compatible=fits)
    assert (r.how, r.source) == ("replay", old)


def test_a_replay_that_crashed_resumes_from_its_own_checkpoint_taken_after_the_incompatible_one() -> None:
    # The replay from "sp" checkpointed at 240 without committing (a replaying partition commits
    # no offset), then died: the next start replays from there, not from the savepoint again.
    savepoint, other, own = Snap("sp", 2, 150), Snap("c9", 3, 300, fits=False), Snap("c10", 4, 240)
    r = choose("t/0", 300, [other, own], [savepoint], committed_id="c9", compatible=fits)
    assert (r.how, r.source, r.offset, r.replay_until) == ("replay", own, 240, 300)


def test_a_compatible_checkpoint_after_the_restore_source_still_wins_over_it() -> None:
    savepoint, later = Snap("sp", 2, 150), Snap("c3", 3, 300)
    r = choose("t/0", 300, [later], [savepoint], committed_id="c3", compatible=fits)
    assert (r.how, r.source) == ("exact", later)


def test_state_that_cannot_be_loaded_is_refused_or_with_a_reset_starts_empty_at_its_offset() -> None:
    bad_source, bad_commit = Snap("sp", 2, 150, fits=False), Snap("c9", 3, 300, fits=False)
    with pytest.raises(IncompatibleState):
        choose("t/0", None, [], [bad_source], compatible=fits)
    r = choose("t/0", None, [], [bad_source], compatible=fits, allow_reset=True)
    assert (r.how, r.source, r.offset) == ("reset", bad_source, 150)
    with pytest.raises(IncompatibleState):
        choose("t/0", 300, [bad_commit], committed_id="c9", compatible=fits)
    r = choose("t/0", 300, [bad_commit], committed_id="c9", compatible=fits, allow_reset=True)
    assert (r.how, r.source, r.offset) == ("reset", bad_commit, 300)
    # Never downloaded: an incompatible snapshot is not even checked for intactness.
    tried: list[str] = []
    choose("t/0", 300, [bad_commit], committed_id="c9", compatible=fits, allow_reset=True,
           usable=lambda s: tried.append(s.id) or True)
    assert tried == []


def test_checkpoints_inspect_shows_the_state_shape_a_snapshot_was_written_with(tmp_path: Path) -> None:
    import argparse
    import io

    from weir import checkpoint_cli
    from weir.checkpoint import CheckpointStore, PartitionSnapshot

    store = CheckpointStore.open(f"file://{tmp_path}/store", "test", "eo")
    (tmp_path / "empty").mkdir()
    part = {"events/0": PartitionSnapshot(tmp_path / "empty", 7)}
    new = store.write_savepoint("sp-new", (0, 1), part, state_shape=graph(V2).shape.to_json())
    old = store.write_savepoint("sp-old", (0, 1), part)
    shown = []
    for url in (new.url, old.url):
        parser = argparse.ArgumentParser()
        checkpoint_cli.add_cli(parser.add_subparsers(dest="command"))
        out = io.StringIO()
        args = parser.parse_args(["checkpoints", "inspect", url])
        assert checkpoint_cli.run_cli(args, out, io.StringIO()) == 0
        shown.append(next(line.strip() for line in out.getvalue().splitlines() if "state:" in line))
    assert shown == [
        "state: window tumbling 10s by messageKey; outputs n=count, total=sum(amount), mx=max(amount)",
        "state: (not recorded: written by an older weir)",
    ]


def test_a_migration_that_dies_half_way_leaves_state_that_claims_no_offset(tmp_path: Path) -> None:
    """So recovery restores that partition from the checkpoint store again instead of trusting
    a half-rewritten local database."""
    from weir.state import PartitionStore

    agg = compile_aggregates([("n", "count", None)])
    store = PartitionStore(tmp_path / "db", agg.dumps, agg.loads)
    for i in range(30):
        store.put((f"k{i}", 0, 10), [i])
    store.flush({"offset": 30, "wm": 5})
    store.close()
    store = PartitionStore(tmp_path / "db", agg.dumps, agg.loads)
    seen = [0]

    def dies(data: bytes) -> bytes:
        seen[0] += 1
        if seen[0] == 20:
            raise RuntimeError("the process died")
        return data

    with pytest.raises(RuntimeError):
        store.rewrite(dies, {"offset": 30, "wm": 5, "migrated": True})
    assert store.progress is None
    assert store.rewrite(lambda data: data, {"offset": 30, "wm": 5, "migrated": True}) == 30
    assert store.progress == {"offset": 30, "wm": 5, "migrated": True}
    store.close()
