"""When exactly-once results become readable: the real worker loop on the in-memory broker and
store, with a checkpoint interval long enough that only the early ("eager") checkpoint can
explain a commit. A worker that has read all there is and holds results not yet committed
checkpoints at once, and again no sooner than a quarter interval after its last early one."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson

from weir import kafka as kio
from weir.graph import compile_job
from weir.spec import load_job
from weir.testing.broker import Faults, InlineExecutor, MemoryBackend, MemoryBroker
from weir.worker import Worker, WorkerSettings

T0 = 1_704_067_200_000
INTERVAL_S = 4.0  # a quarter of it, 1 s, is the shortest time between two early checkpoints


def job() -> Any:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "eager", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": {"topics": ["events"], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "0s"},
                "steps": [
                    {"window": {"type": "tumbling", "size": "10s"}},
                    {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
                ],
                "sink": {"topic": "out"},
            },
        },
    }
    return load_job(orjson.dumps(doc).decode())


def burst(broker: MemoryBroker, window: int) -> None:
    """Ten records of window ``window`` and one past it, which closes it: one result."""
    for i in range(11):
        ts = T0 + window * 10_000 + i * 1_000
        broker.append("events", orjson.dumps({"ts": ts}), b"k", 0)


def exactly_once_worker(
    tmp_path: Path,
    broker: MemoryBroker,
    on_consume: Any,
    checkpoint_interval_s: float,
    watermark_interval_s: float,
    wall_ms: Any = None,
) -> Worker:
    """The real worker loop, exactly-once, on ``broker`` and an in-memory store."""
    return Worker(
        compile_job(job(), wall_ms=lambda: T0),
        kio.KafkaSettings("memory", {}, {}),
        WorkerSettings(
            0,
            1,
            tmp_path / "state",
            batch_size=100,
            checkpoint_interval_s=checkpoint_interval_s,
            watermark_interval_s=watermark_interval_s,
            checkpoint_url="memory://mem/ck",
            shutdown_timeout_s=5,
            guarantee="exactly-once",
        ),
        connect=broker.connect(Faults(), on_consume),
        store_backend=MemoryBackend(),
        uploader=InlineExecutor,
        wall_ms=wall_ms,
    )


def test_results_are_committed_early_and_early_checkpoints_keep_a_quarter_interval_apart(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create("events", 1)
    broker.create("out", 1)
    burst(broker, 0)
    started = time.monotonic()
    readable_at: dict[int, float] = {}  # results readable -> when first seen
    fed_at: dict[int, float] = {}  # burst -> when it was written
    commits_at_first = [0]
    lock = threading.Lock()
    worker: Worker | None = None

    def feed(window: int) -> None:
        burst(broker, window)
        fed_at[window] = time.monotonic()

    def on_consume(_n: int) -> None:
        with lock:
            now = time.monotonic()
            readable = len(broker.records("out"))
            if readable not in readable_at:
                readable_at[readable] = now
                if readable == 1:
                    commits_at_first[0] = broker.commits
                elif readable == 2:
                    feed(2)  # right after an early checkpoint: the next one waits a quarter interval
            if readable == 1 and 1 not in fed_at and broker.commits > commits_at_first[0]:
                feed(1)  # right after the interval's checkpoint: an early one may follow at once
            if readable >= 3 or now - started > 4 * INTERVAL_S:
                assert worker is not None
                worker.stop()

    worker = exactly_once_worker(tmp_path, broker, on_consume, INTERVAL_S, watermark_interval_s=0.01)
    worker.run()

    assert sorted(readable_at) == [0, 1, 2, 3], f"results readable over time: {readable_at}"
    # Without the early checkpoint the first result would wait for the interval.
    first = readable_at[1] - started
    assert first < INTERVAL_S / 2, f"the first result became readable after {first:.2f} s"
    # The interval's checkpoint does not hold back the early one that follows it.
    after_interval = readable_at[2] - fed_at[1]
    assert after_interval < INTERVAL_S / 8, f"readable {after_interval:.2f} s after the interval's checkpoint"
    # Two early checkpoints keep a quarter interval apart; the second comes as soon as it may
    # (not at the next interval).
    second = readable_at[3] - readable_at[2]
    assert INTERVAL_S / 4 * 0.9 <= second < INTERVAL_S * 0.75, f"the next early one after {second:.2f} s"


def test_status_shows_the_first_record_and_when_it_came_at_once_not_at_the_next_interval(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create("events", 1)
    broker.create("out", 1)
    clock = [T0]
    seen: list[tuple[int, int, int | None]] = []  # (records consumed, recordsIn, firstRecordAt)
    worker: Worker | None = None

    def on_consume(n: int) -> None:
        assert worker is not None
        status = worker.status()
        seen.append((n, status.records_in, status.first_record_at))
        if len(seen) == 3:  # idle so far
            clock[0] = T0 + 7_000
            for i in range(3):
                broker.append("events", orjson.dumps({"ts": T0 + i}), b"k", 0)
        elif status.records_in == 3 and clock[0] == T0 + 7_000:
            clock[0] = T0 + 20_000
            broker.append("events", orjson.dumps({"ts": T0 + 5}), b"k", 0)
        elif (n and clock[0] == T0 + 20_000) or len(seen) > 50:
            worker.stop()

    # With a 1-hour interval the status is otherwise published once, at the loop's start.
    worker = exactly_once_worker(
        tmp_path, broker, on_consume, 3600, watermark_interval_s=3600, wall_ms=lambda: clock[0]
    )
    worker.run()

    assert seen[:3] == [(0, 0, None)] * 3, seen
    consumed = [i for i, (n, _in, _at) in enumerate(seen) if n]
    assert len(consumed) == 2, seen
    # The consume after the first records sees them in /status, stamped when they came.
    assert seen[consumed[0] + 1][1:] == (3, T0 + 7_000), seen
    # Later records do not move it.
    assert seen[consumed[1]][1:] == (3, T0 + 7_000), seen
    assert worker.first_record_ms == T0 + 7_000
