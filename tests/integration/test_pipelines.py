"""Windowed pipelines against the real broker: output equals the brute-force reference."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from harness.kafka import KafkaHelper, Message
from weir import kafka as kio
from weir.control import ControlServer
from weir.graph import compile_job
from weir.metrics import WorkerMetrics
from weir.spec import load_job
from weir.testing import random_events, reference_windows
from weir.worker import Worker, WorkerSettings

pytestmark = pytest.mark.kafka

START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z: far enough in the past for idle closing
OOO_MS = 2_000
LATENESS_MS = 1_000
IDLE = "2s"
OUTPUTS = {
    "n": {"fn": "count"},
    "total": {"fn": "sum", "field": "price"},
    "lo": {"fn": "min", "field": "price"},
    "hi": {"fn": "max", "field": "price"},
    "mean": {"fn": "avg", "field": "price"},
    "users": {"fn": "count_distinct", "field": "user"},
    "opening": {"fn": "first", "field": "price"},
    "closing": {"fn": "last", "field": "price"},
}
SPECS = [(name, o["fn"], o.get("field")) for name, o in OUTPUTS.items()]
WINDOWS = {
    "tumbling": ({"type": "tumbling", "size": "10s"}, (10_000, None, None)),
    "sliding": ({"type": "sliding", "size": "10s", "slide": "5s"}, (10_000, 5_000, None)),
    "session": ({"type": "session", "gap": "3s"}, (None, None, 3_000)),
}


def manifest(
    tmp_path: Path,
    name: str,
    kafka: KafkaHelper,
    source: str,
    sink: str,
    dlq: str,
    window: dict[str, Any],
    key_by: dict[str, Any] | None = None,
    producer: dict[str, Any] | None = None,
    steps: list[dict[str, Any]] | None = None,
    idle: str = IDLE,
    **source_extra: Any,
) -> Path:
    """A job manifest; ``steps`` replaces the keyBy/window/aggregate steps made of the others."""
    if steps is None:
        steps = [{"keyBy": key_by}] if key_by is not None else []
        steps.append({"window": {**window, "allowedLateness": f"{LATENESS_MS}ms"}})
        steps.append({"aggregate": {"emit": "final", "outputs": OUTPUTS}})
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": kafka.bootstrap, "producer": producer or {}},
            "pipeline": {
                "source": {"topics": [source], "eventTime": {"field": "ts"}, **source_extra},
                "watermark": {"maxOutOfOrderness": f"{OOO_MS}ms", "idleTimeout": idle},
                "steps": steps,
                "sink": {"topic": sink},
                "deadLetter": {"topic": dlq},
            },
        },
    }
    path = tmp_path / f"{name}.json"
    path.write_bytes(orjson.dumps(doc))
    return path


class Running:
    """Workers of one job in threads of this process, stopped when the job has caught up."""

    def __init__(
        self,
        job_path: Path,
        kafka: KafkaHelper,
        workers: int,
        state: Path,
        metrics: bool = False,
        **worker_settings: Any,
    ) -> None:
        job = load_job(job_path)
        worker_settings = {"checkpoint_interval_s": 1, **worker_settings}
        settings = kio.KafkaSettings(
            kafka.bootstrap,
            dict(job.spec.kafka.consumer),
            dict(job.spec.kafka.producer),
            connect_timeout_s=20,
        )
        self.workers = [
            Worker(
                compile_job(job),
                settings,
                WorkerSettings(i, workers, state / f"w{i}", **worker_settings),
                metrics=WorkerMetrics(f"test/{job.name}", i) if metrics else None,
            )
            for i in range(workers)
        ]
        self.codes: list[int] = []
        self.threads = [
            threading.Thread(target=lambda w=w: self.codes.append(w.run()), daemon=True) for w in self.workers
        ]

    def __enter__(self) -> Running:
        for t in self.threads:
            t.start()
        return self

    def wait_caught_up(self, ends: dict[str, dict[int, int]], timeout: float = 90.0) -> None:
        """Until every input partition is consumed to ``ends`` and no window is left open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            parts = [p for w in self.workers for p in w.status().partitions]
            # Source partitions must have gone idle (their watermark then closes everything);
            # repartition partitions follow the upstream watermarks and need only be empty.
            done = bool(parts) and all(
                p.open_windows == 0 and (p.idle or "-repartition-" in p.partition) for p in parts
            )
            offsets = {p.partition: p.offset for p in parts}
            consumed = all(
                offsets.get(f"{t}-{p}", -1) >= end for t, e in ends.items() for p, end in e.items() if end > 0
            )
            if done and consumed:
                return
            time.sleep(0.3)
        raise AssertionError(f"job did not catch up: {[w.status() for w in self.workers]}")

    def __exit__(self, *exc: object) -> None:
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.join(60)
        assert self.codes == [0] * len(self.workers), f"worker exit codes {self.codes}"


def produce_events(
    kafka: KafkaHelper, topic: str, events: list[Any], key_in_message: bool = True
) -> list[Any]:
    """Produce ``(partition, key, ts, record)`` events; returns (partition, offset) per event."""
    offsets: dict[int, int] = {}
    placed = []
    records = []
    for partition, key, ts, record in events:
        value = orjson.dumps({**record, "ts": ts, "k": key})
        records.append(
            {"value": value, "key": key.encode() if key_in_message else None, "partition": partition}
        )
        placed.append((partition, offsets.get(partition, 0)))
        offsets[partition] = offsets.get(partition, 0) + 1
    kafka.produce(topic, records)
    return placed


def results_of(messages: list[Message]) -> dict[tuple[str, int, int], dict[str, Any]]:
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for m in messages:
        assert m.value is not None
        r = orjson.loads(m.value)
        k = (r["key"], r["windowStartMs"], r["windowEndMs"])
        assert k not in out, f"window {k} emitted twice: {out.get(k)} then {r} at {m.partition}@{m.offset}"
        assert m.key == r["key"].encode()
        out[k] = {name: r[name] for name in OUTPUTS}
    return out


def assert_same(
    actual: dict[tuple[str, int, int], dict[str, Any]], expected: dict[tuple[str, int, int], dict[str, Any]]
) -> None:
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:5]}, extra {sorted(set(actual) - set(expected))[:5]}"
    )
    for k, values in expected.items():
        got = actual[k]
        assert {n: v for n, v in got.items() if n != "mean"} == {
            n: v for n, v in values.items() if n != "mean"
        }, k
        assert got["mean"] == pytest.approx(values["mean"]), k


@pytest.mark.parametrize("kind", sorted(WINDOWS))
def test_each_window_kind_writes_exactly_the_reference_results_and_dead_letters_the_late(
    kind: str, kafka: KafkaHelper, tmp_path: Path
) -> None:
    window, (size, slide, gap) = WINDOWS[kind]
    events = random_events(
        11,
        3000,
        partitions=4,
        keys=40,
        start_ms=START_MS,
        mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS,
        too_late_fraction=0.02,
        too_late_by_ms=15_000,
    )
    expected, late = reference_windows(events, kind, size, slide, gap, LATENESS_MS, OOO_MS, SPECS)
    assert late, "the stream must contain records later than allowedLateness"
    source, sink, dlq = (kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic())
    placed = produce_events(kafka, source, events)
    late_at = {placed[i] for i, e in enumerate(events) if any(e is x for x in late)}

    job = manifest(tmp_path, f"{kind}-{source[-6:]}", kafka, source, sink, dlq, window)
    with Running(job, kafka, 1, tmp_path / "state") as running:
        running.wait_caught_up({source: kafka.end_offsets(source)})

    assert_same(results_of(kafka.read_all(sink)), expected)
    dead = kafka.read_all(dlq)
    headers = [dict(m.headers) for m in dead]
    assert {h["weir.reason"] for h in headers} == {b"late"}
    assert {(int(h["weir.source.partition"]), int(h["weir.source.offset"])) for h in headers} == late_at
    assert all(h["weir.source.topic"] == source.encode() for h in headers)


def test_two_workers_over_four_partitions_give_the_same_output_as_one(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    events = random_events(
        5,
        2000,
        partitions=4,
        keys=32,
        start_ms=START_MS,
        mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS,
        too_late_fraction=0.02,
        too_late_by_ms=15_000,
    )
    source = kafka.create_topic(partitions=4)
    produce_events(kafka, source, events)
    outputs = []
    for workers in (1, 2):
        sink, dlq = kafka.create_topic(), kafka.create_topic()
        job = manifest(
            tmp_path, f"par{workers}-{source[-6:]}", kafka, source, sink, dlq, WINDOWS["sliding"][0]
        )
        with Running(job, kafka, workers, tmp_path / f"state{workers}") as running:
            running.wait_caught_up({source: kafka.end_offsets(source)})
        outputs.append((results_of(kafka.read_all(sink)), len(kafka.read_all(dlq))))
    assert outputs[0][0] and outputs[0] == outputs[1]


def test_key_by_a_record_field_goes_through_a_repartition_topic_and_gives_the_reference(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    # No record later than the bound: with a repartition the watermark is the minimum over
    # upstream partitions, so only on-time records have a parallelism-independent result.
    events = random_events(
        3,
        3000,
        partitions=4,
        keys=24,
        start_ms=START_MS,
        mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS // 2,
        too_late_fraction=0.0,
    )
    expected, late = reference_windows(events, "tumbling", 10_000, None, None, LATENESS_MS, OOO_MS, SPECS)
    assert not late
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    # Message keys are unrelated to the grouping key: records of one key sit in every partition.
    shuffled = [
        (i % 4, f"user-{i % 7}", ts, {**rec, "group": key}) for i, (_p, key, ts, rec) in enumerate(events)
    ]
    produce_events(kafka, source, shuffled)
    expected_by_group = {(k, s, e): v for (k, s, e), v in expected.items()}

    # A producer queue of 20 records: stage 1 forwards faster than it can be delivered, so
    # the worker must pause on a full queue again and again, and still lose nothing.
    job = manifest(
        tmp_path,
        f"keyby-{source[-6:]}",
        kafka,
        source,
        sink,
        dlq,
        WINDOWS["tumbling"][0],
        key_by={"field": "group", "partitions": 3},
        producer={"queue.buffering.max.messages": 20},
    )
    with Running(job, kafka, 2, tmp_path / "state") as running:
        running.wait_caught_up({source: kafka.end_offsets(source)})
        paused = sum(w.status().producer_queue_full for w in running.workers)
    assert_same(results_of(kafka.read_all(sink)), expected_by_group)
    assert kafka.read_all(dlq) == []
    assert paused > 0


def test_bad_records_are_dead_lettered_with_reasons_and_the_job_keeps_running(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    source = kafka.create_topic(partitions=1, config={"max.message.bytes": str(4 * 1024 * 1024)})
    sink, dlq = kafka.create_topic(), kafka.create_topic()
    good = [
        {"value": orjson.dumps({"ts": START_MS + i * 100, "price": 2, "user": "u"}), "key": b"a"}
        for i in range(50)
    ]
    bad = [
        {"value": b'{"ts": 1, "price": ', "key": b"a"},  # decode_error
        {"value": orjson.dumps({"price": 3}), "key": b"a"},  # missing_field
        {
            "value": orjson.dumps({"ts": START_MS + 10, "price": "three", "user": "u"}),
            "key": b"a",
        },  # wrong_type
        {
            "value": orjson.dumps({"ts": START_MS, "price": 1, "pad": "x" * 2_000_000}),
            "key": b"a",
        },  # too_large
    ]
    kafka.produce(source, good[:25] + bad + good[25:])
    job = manifest(tmp_path, f"bad-{source[-6:]}", kafka, source, sink, dlq, WINDOWS["tumbling"][0])
    with Running(job, kafka, 1, tmp_path / "state", metrics=True) as running:
        running.wait_caught_up({source: kafka.end_offsets(source)})
        status = running.workers[0].status()
        exposition = running.workers[0].metrics.registry  # type: ignore[union-attr]
        from prometheus_client import generate_latest

        families = {f.name: f for f in text_string_to_metric_families(generate_latest(exposition).decode())}

    reasons = sorted(dict(m.headers)["weir.reason"].decode() for m in kafka.read_all(dlq))
    assert reasons == ["decode_error", "missing_field", "too_large", "wrong_type"]
    assert status.dead_lettered == {"decode_error": 1, "missing_field": 1, "too_large": 1, "wrong_type": 1}
    dead = {
        s.labels["reason"]: s.value for s in families["weir_dead_letter"].samples if s.name.endswith("_total")
    }
    assert dead == {"decode_error": 1.0, "missing_field": 1.0, "too_large": 1.0, "wrong_type": 1.0}
    results = [orjson.loads(m.value or b"") for m in kafka.read_all(sink)]
    assert sum(r["n"] for r in results) == 50  # every good record counted, before and after the bad ones


def test_a_result_the_broker_refuses_for_good_stops_the_job_without_committing_it(
    kafka: KafkaHelper, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a rollback loop: a result Kafka will never take (the sink's ``max.message.bytes`` is
    below any record batch) stops the exactly-once worker with the broker's reason, nothing of
    the epoch committed."""
    source = kafka.create_topic(partitions=1)
    sink, dlq = kafka.create_topic(config={"max.message.bytes": "16"}), kafka.create_topic()
    events = [{"ts": START_MS + i * 1_000, "price": 1, "user": "u"} for i in range(40)]
    kafka.produce(source, ({"value": orjson.dumps(e), "key": b"a"} for e in events))
    job = manifest(tmp_path, f"refused-{source[-6:]}", kafka, source, sink, dlq, WINDOWS["tumbling"][0])
    caplog.set_level("ERROR", logger="weir")
    running = Running(job, kafka, 1, tmp_path / "state")
    (worker,), (thread,) = running.workers, running.threads
    thread.start()
    try:
        thread.join(90)
        stopped = not thread.is_alive()
    finally:
        worker.stop()
        thread.join(60)
    assert stopped and running.codes == [1]
    assert worker.rollbacks == 0
    assert any(
        "stopping without commit" in r.getMessage() and "MSG_SIZE_TOO_LARGE" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert kafka.read_all(sink, isolation="read_uncommitted") == []  # the broker took none


def test_metrics_parse_and_move_as_records_flow(kafka: KafkaHelper, tmp_path: Path) -> None:
    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    job = manifest(tmp_path, f"metrics-{source[-6:]}", kafka, source, sink, dlq, WINDOWS["tumbling"][0])
    with Running(job, kafka, 1, tmp_path / "state", metrics=True) as running:
        worker = running.workers[0]
        server = ControlServer(
            worker.metrics.registry,
            alive=worker.alive,  # type: ignore[union-attr]
            ready=lambda: (worker.ready, ""),
            status=worker.status,
            host="127.0.0.1",
        )
        server.start()
        try:

            def scrape() -> dict[str, float]:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
                    text = resp.read().decode()
                return {
                    f"{s.name}{sorted(s.labels.items())}": s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                }

            def records_in(sample: dict[str, float]) -> float:
                return sum(v for k, v in sample.items() if k.startswith("weir_records_in_total"))

            before = scrape()
            kafka.produce(
                source,
                (
                    {
                        "value": orjson.dumps({"ts": START_MS + i, "price": 1, "user": "u"}),
                        "key": b"k",
                        "partition": i % 2,
                    }
                    for i in range(500)
                ),
            )
            deadline = time.monotonic() + 30
            after = scrape()
            while records_in(after) < 500 and time.monotonic() < deadline:
                time.sleep(0.3)
                after = scrape()
        finally:
            server.stop()
    assert records_in(before) == 0
    assert records_in(after) == 500
    assert any(k.startswith("weir_watermark_ms") and v >= START_MS + 499 - OOO_MS for k, v in after.items())
    assert any(k.startswith("weir_busy_ratio") for k in after)
    assert all("streamjob" in k and "worker" in k for k in after if k.startswith("weir_records_in_total"))


def test_sigterm_finishes_the_batch_commits_and_exits_zero(kafka: KafkaHelper, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    events = random_events(
        9,
        20_000,
        partitions=2,
        keys=8,
        start_ms=START_MS,
        mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS,
        too_late_fraction=0.0,
    )
    produce_events(kafka, source, events)
    job = manifest(tmp_path, f"term-{source[-6:]}", kafka, source, sink, dlq, WINDOWS["tumbling"][0])
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weir",
                "run",
                str(job),
                "--http-port",
                "0",
                "--state-dir",
                str(tmp_path / "s"),
                "--commit-interval",
                "60",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Stop it mid-stream, once the first window results show records are flowing.
        deadline = time.monotonic() + 60
        while not kafka.read_all(sink) and time.monotonic() < deadline:
            time.sleep(0.2)
        started = time.monotonic()
        os.kill(worker.pid, signal.SIGTERM)
        code = worker.wait(30)
        took = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = log.read_text()
    assert code == 0, output
    assert took < 20, f"SIGTERM took {took:.1f}s"
    # With a 60 s commit interval the only commit is the one SIGTERM made: the group's
    # offsets prove the batch was finished and committed on the way out.
    committed = kafka.committed(f"weir-test-term-{source[-6:]}", source)
    assert sum(committed.values()) > 0
    assert all(o >= 0 for o in committed.values())


def test_windows_spilled_to_disk_give_the_same_results_as_windows_in_memory(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    # 16 windows in memory per partition: every commit evicts most of them to RocksDB and
    # later records read them back, so this exercises the disk path of the state store.
    window, (size, slide, gap) = WINDOWS["sliding"]
    events = random_events(
        21,
        3000,
        partitions=2,
        keys=60,
        start_ms=START_MS,
        mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS,
        too_late_fraction=0.0,
    )
    expected, _late = reference_windows(events, "sliding", size, slide, gap, LATENESS_MS, OOO_MS, SPECS)
    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    produce_events(kafka, source, events)
    job = manifest(tmp_path, f"spill-{source[-6:]}", kafka, source, sink, dlq, window)
    with Running(job, kafka, 1, tmp_path / "state", max_cached_windows=16) as running:
        running.wait_caught_up({source: kafka.end_offsets(source)})
    assert_same(results_of(kafka.read_all(sink)), expected)


def test_a_worker_with_a_memory_budget_reports_each_parts_share_and_use_and_stays_exact(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    from weir.memory import rss_bytes

    window, (size, slide, gap) = WINDOWS["tumbling"]
    events = random_events(
        22, 3000, partitions=2, keys=60, start_ms=START_MS, mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS, too_late_fraction=0.0,
    )  # fmt: skip
    expected, _late = reference_windows(events, "tumbling", size, slide, gap, LATENESS_MS, OOO_MS, SPECS)
    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    produce_events(kafka, source, events)
    job = manifest(tmp_path, f"budget-{source[-6:]}", kafka, source, sink, dlq, window)
    # The base is this (pytest) process as the worker starts; 150 MiB above it for the parts.
    budget = rss_bytes() + (150 << 20)
    with Running(job, kafka, 1, tmp_path / "state", metrics=True, memory_budget=budget) as running:
        running.wait_caught_up({source: kafka.end_offsets(source)})
        worker = running.workers[0]
        time.sleep(6)  # librdkafka's statistics (every 5 s) and one more publish
        status = worker.status().memory
        text = generate_latest(worker.metrics.registry).decode()  # type: ignore[union-attr]
    assert_same(results_of(kafka.read_all(sink)), expected)
    assert status is not None and status.budget_bytes == budget and status.share_bytes is not None
    assert sum(status.share_bytes.values()) == budget
    assert set(status.used_bytes) == {"window_cache", "timers", "rocksdb", "kafka_queues"}
    assert status.used_bytes["rocksdb"] > 0  # the checkpoints' writes, charged to the shared cache
    assert status.rss_bytes > 0
    samples = {
        (s.name, s.labels.get("part")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("weir_memory_")
    }
    assert samples[("weir_memory_budget_bytes", None)] == budget
    assert {part for name, part in samples if name == "weir_memory_used_bytes"} == {
        "window_cache", "timers", "rocksdb", "kafka_queues",
    }  # fmt: skip
    assert {part for name, part in samples if name == "weir_memory_share_bytes"} == {
        "base", "windows", "rocksdb", "kafka_queues",
    }  # fmt: skip
