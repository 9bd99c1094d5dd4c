"""The autoscaler end to end: ``weir up`` with real workers of a known capacity on the real broker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from harness.kafka import KafkaHelper
from harness.up import status, wait, weir_up
from weir.testing import reference_windows

pytestmark = pytest.mark.kafka

START_MS = 1_704_067_200_000
OUTPUTS = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "price"}}
SPECS = [(name, o["fn"], o.get("field")) for name, o in OUTPUTS.items()]
CAPACITY = 200
"""Records per second one worker processes (WEIR_MAX_RECORDS_PER_SECOND)."""


class Load:
    """Produces records at a settable rate in a thread; keeps every event for the reference."""

    def __init__(self, kafka: KafkaHelper, topic: str, partitions: int) -> None:
        self.kafka, self.topic, self.partitions = kafka, topic, partitions
        self.rate = 0.0
        self.events: list[tuple[int, str, int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._producer = kafka.producer()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert self._producer.flush(60) == 0

    def _run(self) -> None:
        n, tick, due = 0, 0.05, 0.0
        while not self._stop.is_set():
            due += self.rate * tick
            while due >= 1:
                due -= 1
                key = n % 8
                partition = key % self.partitions
                # Event time advances 10 ms per record: in order, so nothing is late.
                ts = START_MS + n * 10
                record = {"price": n % 7}
                self.events.append((partition, f"k{key}", ts, record))
                self._producer.produce(self.topic, orjson.dumps({**record, "ts": ts}), f"k{key}".encode(),
                                       partition=partition)
                n += 1
            self._producer.poll(0)
            time.sleep(tick)


def _manifest(path: Path, name: str, kafka: KafkaHelper, source: str, sink: str) -> Path:
    document = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "local"},
        "spec": {
            "parallelism": 1,
            "kafka": {"bootstrapServers": kafka.bootstrap},
            "checkpoint": {"url": (path.parent / "store").as_uri(), "interval": "1s"},
            "autoscaler": {
                "enabled": True, "targetUtilization": 0.8, "metricsWindow": "6s",
                "scaleUpStabilizationWindow": "3s", "scaleDownStabilizationWindow": "12s",
                "maxScaleDownFactor": 0.5, "cooldown": "4s", "catchUpDuration": "20s",
                "lagThresholdTime": "4s",
            },
            "pipeline": {
                "source": {"topics": [source], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "1s", "idleTimeout": "3s"},
                "steps": [
                    {"window": {"type": "tumbling", "size": "10s"}},
                    {"aggregate": {"emit": "final", "outputs": OUTPUTS}},
                ],
                "sink": {"topic": sink},
                "deadLetter": {"topic": sink + "-dlq"},
            },
        },
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _history(state: Path, name: str) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = (status(state, name).get("autoscaler") or {}).get("history") or []
    return history


@pytest.mark.timeout(420)
def test_a_job_over_one_workers_capacity_scales_up_catches_up_then_down_after_the_load_drops_exactly(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    name = "auto-" + kafka.unique("j")[-8:]
    source, sink = kafka.unique("src"), kafka.unique("out")
    kafka.create_topic(source, 4)
    kafka.create_topic(sink, 1)
    kafka.create_topic(sink + "-dlq", 1)
    manifest = _manifest(tmp_path / "job.yaml", name, kafka, source, sink)
    state, log = tmp_path / "state", tmp_path / "up.log"
    env = {**os.environ, "WEIR_MAX_RECORDS_PER_SECOND": str(CAPACITY)}
    lags: list[tuple[float, int]] = []

    def watch() -> None:
        inputs = (status(state, name).get("autoscaler") or {}).get("inputs")
        if inputs:
            lags.append((time.monotonic(), inputs["lagRecords"]))

    with Load(kafka, source, 4) as load, weir_up(manifest, state, kafka.bootstrap, log, env) as process:
        wait(lambda: status(state, name).get("phase") == "Running", 60, "phase Running", log)
        # 3x one worker's capacity.
        load.rate = 3 * CAPACITY
        wait(lambda: (watch(), any(d["direction"] == "up" for d in _history(state, name)))[1], 90,
             "a scale-up", log)
        up_at = time.monotonic()
        wait(lambda: (watch(), status(state, name).get("parallelism", 0) >= 3
                      and status(state, name).get("phase") == "Running")[1], 60,
             "the new workers running", log)
        # The job catches up at the new parallelism: lag back to about a checkpoint's input.
        wait(lambda: (watch(), any(t > up_at and lag < 3 * CAPACITY for t, lag in lags))[1], 90,
             "lag back near 0", log)
        load.rate = CAPACITY / 4
        wait(lambda: (watch(), any(d["direction"] == "down" for d in _history(state, name)))[1], 120,
             "a scale-down after the load dropped", log)
        down_at = time.monotonic()
        load.rate = 0
        time.sleep(1)
        events = list(load.events)
        expected, _late = reference_windows(events, "tumbling", 10_000, None, None, 0, 1000, SPECS)
        wait(lambda: len(kafka.read_all(sink, timeout=10)) >= len(expected), 120, "every window", log)
        time.sleep(3)  # anything emitted twice would show up now
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0

    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    for message in kafka.read_all(sink):
        assert message.value is not None
        record = orjson.loads(message.value)
        key = (record["key"], record["windowStartMs"], record["windowEndMs"])
        assert key not in results, f"window {key} emitted twice"
        results[key] = {n: record[n] for n in OUTPUTS}
    assert results == expected

    history = _history(state, name)
    ups = [d for d in history if d["direction"] == "up"]
    downs = [d for d in history if d["direction"] == "down"]
    assert ups and downs, history
    # History is newest first: the first scale-up leaves parallelism 1. The autoscaler may reach
    # the parallelism the load needs in one step or in two (a rate measured while the load ramps
    # up asks for less); either way it reached at least 3 (waited for above) by scaling up.
    assert ups[-1]["fromParallelism"] == 1
    assert max(d["toParallelism"] for d in ups) >= 3, ups
    for decision in ups + downs:
        assert decision["applied"] and decision["reason"].startswith("lag ") and "need " in decision["reason"]
    assert down_at > up_at
    events_log = (state / "local" / name / "events.log").read_text()
    assert "AutoscalerScaleUp" in events_log and "AutoscalerScaleDown" in events_log
