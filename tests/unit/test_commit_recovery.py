"""Exactly-once, proved in process: the real worker loop on the in-memory broker and store,
aborted at every step of the commit protocol, restarted, and its committed output compared
with a run that never crashed (and that run with an independent reference: the brute-force
windowing reference for a windowed job, ``weir.examples.dedup.reference`` for a job with a
map and a keyed process function with state TTL and timers).

A schedule is a seeded list of aborts (step, occurrence); after each abort a new worker starts
on the same broker and store, half the time with its local state wiped (a pod on a new node).
Savepoints are requested along the way, so aborts also land mid-savepoint.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from weir.examples import dedup
from weir.graph import compile_job
from weir.spec import Job, load_job
from weir.testing import reference_windows
from weir.testing.broker import STEPS, MemoryBroker, run_through

T0 = 1_704_067_200_000
PARTITIONS = 2
OUTPUTS = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "amount"}}
END_KEY = "~end"


def tag(record: dict[str, Any]) -> dict[str, Any]:
    """The dedup job's map step (a user function, loaded by reference)."""
    return {**record, "seen": True}


DEDUP_STEPS = [
    {"map": {"function": "tests.unit.test_commit_recovery:tag"}},
    {"process": {"function": "weir.examples.dedup:Dedup"}},
]


def job(steps: list[dict[str, Any]] | None = None) -> Job:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "eo", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": {"topics": ["events"], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "2s"},
                "steps": steps
                or [
                    {"window": {"type": "tumbling", "size": "10s"}},
                    {"aggregate": {"outputs": OUTPUTS}},
                ],
                "sink": {"topic": "out"},
                "deadLetter": {"topic": "dlq"},
            },
        },
    }
    return load_job(orjson.dumps(doc).decode())


def events(seed: int, count: int = 60) -> list[tuple[int, str, int, dict[str, Any] | None]]:
    """``(partition, key, ts, record)`` with a few out-of-order, late and undecodable records;
    a key lives in one partition. ``record`` None: an undecodable value (dead-lettered)."""
    rng = random.Random(seed)
    out: list[tuple[int, str, int, dict[str, Any] | None]] = []
    clock = [T0, T0]
    for _ in range(count):
        p = rng.randrange(PARTITIONS)
        clock[p] += rng.randrange(0, 1500)
        ts = clock[p] - (rng.randrange(0, 15_000) if rng.random() < 0.15 else 0)  # some late
        key = f"k{p}-{rng.randrange(3)}"
        record = None if rng.random() < 0.05 else {"ts": ts, "amount": rng.randrange(100)}
        out.append((p, key, ts, record))
    for p in range(PARTITIONS):  # closes every window of the partition
        out.append((p, f"{END_KEY}{p}", clock[p] + 3_600_000, {"ts": clock[p] + 3_600_000, "amount": 0}))
    return out


def dedup_events(seed: int, count: int = 60) -> list[tuple[int, str, int, dict[str, Any] | None]]:
    """Events for the dedup job, keyed by user in the message key: ids repeat, times rise per
    partition (nothing late: ``weir.examples.dedup.reference`` is exact), a few undecodable."""
    rng = random.Random(seed)
    out: list[tuple[int, str, int, dict[str, Any] | None]] = []
    clock = [T0, T0]
    for _ in range(count):
        p = rng.randrange(PARTITIONS)
        clock[p] += rng.randrange(1, 4000)
        user = f"u{p}-{rng.randrange(3)}"
        record = None if rng.random() < 0.05 else {"ts": clock[p], "eventId": f"e{rng.randrange(8)}"}
        out.append((p, user, clock[p], record))
    for p in range(PARTITIONS):  # its watermark fires every earlier minute's summary
        end = clock[p] + 3_600_000
        out.append((p, f"{END_KEY}{p}", end, {"ts": end, "eventId": "end"}))
    return out


def broker_with(evts: list[tuple[int, str, int, dict[str, Any] | None]]) -> MemoryBroker:
    broker = MemoryBroker()
    broker.create("events", PARTITIONS)
    broker.create("out", PARTITIONS)
    for p, key, _ts, record in evts:
        value = b"{not json" if record is None else orjson.dumps(record)
        broker.append("events", value, key.encode(), p)
    return broker


def run(
    broker: MemoryBroker,
    root: Path,
    schedule: list[tuple[str, int]],
    seed: int,
    savepoint_every: int = 0,
    wipe: float = 0.5,
    steps: list[dict[str, Any]] | None = None,
) -> int:
    """Run the job to the end of its input through every abort of ``schedule``; returns the
    number of restarts. After an abort the local state is wiped with probability ``wipe``."""
    graph = compile_job(job(steps), wall_ms=lambda: T0 + 86_400_000)
    return run_through(graph, broker, root, schedule, seed, savepoint_every=savepoint_every, wipe=wipe)


def output(broker: MemoryBroker) -> Counter[tuple[str, bytes | None, bytes | None]]:
    return Counter((m.topic(), m.key(), m.value()) for t in ("out", "dlq") for m in broker.records(t))


def schedules(seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(rng.choice(STEPS), rng.randrange(1, 6)) for _ in range(rng.randrange(1, 4))]


@pytest.fixture(scope="module")
def dedup_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Counter[Any]]:
    """Committed output of crash-free runs of the dedup job, per input seed."""
    out = {}
    for input_seed in range(3):
        broker = broker_with(dedup_events(input_seed))
        assert (
            run(broker, tmp_path_factory.mktemp(f"dref{input_seed}"), [], input_seed, steps=DEDUP_STEPS) == 0
        )
        out[input_seed] = output(broker)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Counter[Any]]:
    """Committed output of crash-free runs, per input seed."""
    out = {}
    for input_seed in range(4):
        broker = broker_with(events(input_seed))
        assert run(broker, tmp_path_factory.mktemp(f"ref{input_seed}"), [], input_seed) == 0
        out[input_seed] = output(broker)
    return out


def test_a_crash_free_run_matches_the_brute_force_windowing_reference(
    reference: dict[int, Counter[Any]],
) -> None:
    for input_seed, got in reference.items():
        evts = events(input_seed)
        decodable = [(p, k, ts, r) for p, k, ts, r in evts if r is not None]
        specs = [(name, o["fn"], o.get("field")) for name, o in OUTPUTS.items()]
        windows, late = reference_windows(decodable, "tumbling", 10_000, None, None, 0, 2_000, specs)
        results = {}
        for topic, _key, value in got.elements():
            if topic == "out":
                r = orjson.loads(value or b"")
                results[(r["key"], r["windowStartMs"], r["windowEndMs"])] = {"n": r["n"], "total": r["total"]}
        expected = {w: v for w, v in windows.items() if not w[0].startswith(END_KEY)}
        assert results == expected
        assert sum(n for (t, _k, _v), n in got.items() if t == "dlq") == len(late) + (
            len(evts) - len(decodable)
        )


@pytest.mark.parametrize("seed", range(240))
def test_every_abort_schedule_commits_the_output_exactly_once(
    seed: int, reference: dict[int, Counter[Any]], tmp_path: Path
) -> None:
    input_seed = seed % 4
    broker = broker_with(events(input_seed))
    schedule = schedules(seed)
    restarts = run(broker, tmp_path, schedule, seed, savepoint_every=17 if seed % 3 == 0 else 0)
    got = output(broker)
    assert got == reference[input_seed], f"schedule {schedule} ({restarts} restarts)"


@pytest.mark.parametrize("step", STEPS)
def test_an_abort_at_each_step_restarts_and_still_commits_exactly_once(
    step: str, reference: dict[int, Counter[Any]], tmp_path: Path
) -> None:
    broker = broker_with(events(0))
    # Restoring happens after a first abort, from the store when the local state is gone.
    schedule = [("after-commit", 3), (step, 1)] if step == "restore" else [(step, 2)]
    restarts = run(broker, tmp_path, schedule, 0, savepoint_every=11, wipe=1.0)
    assert restarts == len(schedule), f"the abort at {step} did not happen"
    assert output(broker) == reference[0]


def test_a_crash_free_dedup_run_matches_the_examples_reference(
    dedup_reference: dict[int, Counter[Any]],
) -> None:
    for input_seed, got in dedup_reference.items():
        evts = dedup_events(input_seed)
        decodable = [(k, ts, tag(r)) for _p, k, ts, r in evts if r is not None]
        want = Counter(
            ("out", k.encode(), orjson.dumps(r))
            for k, r in dedup.reference(decodable)
            if not k.startswith(END_KEY) or r.get("kind") != "summary"
        )
        assert Counter({k: n for k, n in got.items() if k[0] == "out"}) == want
        assert sum(n for k, n in got.items() if k[0] == "dlq") == len(evts) - len(decodable)


@pytest.mark.parametrize("seed", range(60))
def test_every_abort_schedule_commits_a_process_functions_output_exactly_once(
    seed: int, dedup_reference: dict[int, Counter[Any]], tmp_path: Path
) -> None:
    input_seed = seed % 3
    broker = broker_with(dedup_events(input_seed))
    schedule = schedules(seed + 1000)
    restarts = run(broker, tmp_path, schedule, seed, savepoint_every=13 if seed % 2 else 0, steps=DEDUP_STEPS)
    assert output(broker) == dedup_reference[input_seed], f"schedule {schedule} ({restarts} restarts)"
