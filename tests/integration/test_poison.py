"""Records that cannot be aggregated or dated, against the real broker: dead-lettered, never fatal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from harness.kafka import KafkaHelper

pytestmark = pytest.mark.kafka

START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z: far in the past, so idleness closes every window
YEAR_3000_MS = 32_503_680_000_000
U64_MAX = 2**64 - 1
OUTPUTS = {
    "n": {"fn": "count"},
    "total": {"fn": "sum", "field": "amount"},
    "hi": {"fn": "max", "field": "amount"},
    "mean": {"fn": "avg", "field": "amount"},
}


def record(key: str | None, ts: int, amount: float) -> dict[str, Any]:
    return {"value": orjson.dumps({"ts": ts, "amount": amount}), "key": None if key is None else key.encode()}


def test_overflowing_values_and_a_year_3000_timestamp_are_dead_lettered_while_every_other_result_stays_exact(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    # One partition, so the year-3000 record would move the watermark every later record sees.
    source, sink, dlq = kafka.create_topic(), kafka.create_topic(), kafka.create_topic()
    t0 = START_MS
    records = [
        record("ints", t0 + 100, 5),
        record("ints", t0 + 200, U64_MAX),  # overflow: beyond signed 64 bits on its own
        record("ints", YEAR_3000_MS, 1),  # bad_timestamp: far past maxFutureSkew (1 day)
        record("ints", t0 + 300, U64_MAX),  # overflow
        record("ints", t0 + 400, 7),
        record("big", t0 + 500, 2**62),
        record("big", t0 + 600, 2**62 - 1),  # the sum is now 2**63 - 1, the largest there is
        record("big", t0 + 700, 1),  # overflow: the sum would pass 2**63 - 1
        record("floats", t0 + 800, 1.7e308),
        record("floats", t0 + 900, 1.7e308),  # overflow: the sum would be infinite
        record("floats", t0 + 1000, 1.0),
        record(None, t0 + 1100, 3),  # bad_key: windows are keyed by the message key
        record("later", t0 + 15_000, 2),  # after the year-3000 record: on time, not late
        record("later", t0 + 25_000, 3),
    ]
    kafka.produce(source, records)
    name = f"poison-{source[-6:]}"
    job = tmp_path / "job.json"
    job.write_bytes(
        orjson.dumps(
            {
                "apiVersion": "weir.dev/v1alpha1",
                "kind": "StreamJob",
                "metadata": {"name": name, "namespace": "test"},
                "spec": {
                    "kafka": {"bootstrapServers": kafka.bootstrap},
                    "pipeline": {
                        "source": {"topics": [source], "eventTime": {"field": "ts"}},
                        "watermark": {"maxOutOfOrderness": "2s", "idleTimeout": "2s"},
                        "steps": [
                            {"window": {"type": "tumbling", "size": "10s"}},
                            {"aggregate": {"outputs": OUTPUTS}},
                        ],
                        "sink": {"topic": sink},
                        "deadLetter": {"topic": dlq},
                    },
                },
            }
        )
    )
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "weir", "run", str(job), "--http-port", "0"]
    command += ["--state-dir", str(tmp_path / "state"), "--checkpoint-interval", "1"]
    with open(log, "w") as out:
        worker = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        expected_windows = 5
        deadline = time.monotonic() + 90
        results = kafka.read_all(sink, timeout=5)
        while len(results) < expected_windows and time.monotonic() < deadline:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}: {log.read_text()}"
            time.sleep(0.5)
            results = kafka.read_all(sink, timeout=5)
        time.sleep(2)  # anything emitted twice would show up now
        results = kafka.read_all(sink, timeout=5)
        dead = kafka.read_all(dlq, timeout=5)
        assert worker.poll() is None, f"the worker exited with {worker.returncode}: {log.read_text()}"
        os.kill(worker.pid, signal.SIGTERM)
        code = worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == 0, log.read_text()

    by_window = {}
    for m in results:
        r = orjson.loads(m.value or b"")
        window = (r["key"], r["windowStartMs"] - t0)
        assert window not in by_window, f"{window} emitted twice"
        by_window[window] = {k: r[k] for k in OUTPUTS}
    assert by_window == {
        ("ints", 0): {"n": 2, "total": 12, "hi": 7, "mean": 6.0},
        ("big", 0): {"n": 2, "total": 2**63 - 1, "hi": 2**62, "mean": (2**63 - 1) / 2},
        ("floats", 0): {"n": 2, "total": 1.7e308, "hi": 1.7e308, "mean": (1.7e308 + 1.0) / 2},
        ("later", 10_000): {"n": 1, "total": 2, "hi": 2, "mean": 2.0},
        ("later", 20_000): {"n": 1, "total": 3, "hi": 3, "mean": 3.0},
    }

    letters = []
    for m in dead:
        headers = {k: (v or b"").decode() for k, v in m.headers}
        letters.append((orjson.loads(m.value or b"")["ts"], headers["weir.reason"], headers["weir.detail"]))
    assert [(ts, reason) for ts, reason, _ in letters] == [
        (t0 + 200, "overflow"),
        (YEAR_3000_MS, "bad_timestamp"),
        (t0 + 300, "overflow"),
        (t0 + 700, "overflow"),
        (t0 + 900, "overflow"),
        (t0 + 1100, "bad_key"),
    ]
    details = [detail for _, _, detail in letters]
    assert details[0] == (
        f"aggregate field 'amount' is {U64_MAX}, beyond signed 64-bit integers (Flink's BIGINT)"
    )
    assert "more than maxFutureSkew 86400000 ms past the wall clock" in details[1]
    assert details[3].startswith("aggregate 'total' of field 'amount' would be 9223372036854775808")
    assert details[4].startswith("aggregate 'total' of field 'amount' would overflow a 64-bit float")
    assert "Traceback" not in log.read_text()
