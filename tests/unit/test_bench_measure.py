"""What the throughput benchmark says about where a machine's CPU went (``bench/measure.py``,
``bench/run.py``, ``bench/report.py``): the broker found by its port, a process's threads by
kind, and the scaling paragraph built from them."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import measure  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


def test_the_process_listening_on_a_port_is_found_and_a_free_port_has_none() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert measure.listener_pid(port) == os.getpid()
    assert measure.listener_pid(port) is None  # closed: nothing listens there now


def test_thread_cpu_counts_a_busy_python_thread_as_python() -> None:
    before = measure.thread_cpu_s(os.getpid())

    spun, done = threading.Event(), threading.Event()

    def spin() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        spun.set()
        done.wait(10)  # alive while read: /proc lists a thread's time only while it lives

    worker = threading.Thread(target=spin)
    worker.start()
    assert spun.wait(10)
    after = measure.thread_cpu_s(os.getpid())
    done.set()
    worker.join()
    assert set(after) == {"python", "librdkafka", "rocksdb", "other"}
    assert after["python"] - before["python"] >= 0.2
    assert after["librdkafka"] == before["librdkafka"] and after["rocksdb"] == before["rocksdb"]


def test_thread_cores_are_the_difference_of_two_snapshots_per_second_between_them() -> None:
    first = (100.0, {"python": 1.0, "librdkafka": 0.5, "rocksdb": 0.0, "other": 0.0})
    last = (102.0, {"python": 3.0, "librdkafka": 1.5, "rocksdb": 0.0, "other": 0.0})
    assert run.thread_cores([first, last]) == {
        "python_cores": 1.0, "librdkafka_cores": 0.5, "rocksdb_cores": 0.0, "other_cores": 0.0,
    }  # fmt: skip
    # Read later than the run's start: the split is per second of what it saw, not of the run.
    late = (101.0, {"python": 2.0, "librdkafka": 1.0, "rocksdb": 0.0, "other": 0.0})
    assert run.thread_cores([late, last])["python_cores"] == 1.0
    assert run.thread_cores([first]) == {}, "a run never seen starting has no split"


def _figures(**cores: float) -> dict[str, Any]:
    return {k: {"median": v, "min": v, "max": v} for k, v in cores.items()}


def test_the_scaling_note_splits_the_busy_cores_and_states_the_bound() -> None:
    one = _figures(
        machine_busy_cores=1.55, python_cores=0.88, librdkafka_cores=0.37, rocksdb_cores=0.0,
        broker_cores=0.15, reader_cores=0.14,
    )  # fmt: skip
    two = _figures(
        machine_busy_cores=1.87, python_cores=1.11, librdkafka_cores=0.41, rocksdb_cores=0.0,
        broker_cores=0.18, reader_cores=0.15,
    )  # fmt: skip
    doc = {"summary": {"throughput": {"weir": one, "weir_2w": two}}, "machine": {"nproc": 2}}
    text = "\n".join(report._scaling_note(doc))
    assert "kept **1.55 of its 2 CPUs**" in text and "**1.29×**" in text
    assert "weir's Python threads 0.88 → 1.11; its librdkafka threads 0.37 → 0.41" in text
    assert "the broker 0.15 → 0.18; the benchmark's result reader 0.14 → 0.15" in text
    assert "everything else 0.01 → 0.02" in text
    assert "at most 2 ÷ 1.7 = 1.18" in text and "its own threads alone took 1.25" in text


def test_a_run_without_the_split_keeps_the_old_note() -> None:
    one = _figures(machine_busy_cores=1.74)
    doc = {"summary": {"throughput": {"weir": one, "weir_2w": _figures(machine_busy_cores=1.97)}},
           "machine": {"nproc": 2}}  # fmt: skip
    text = "\n".join(report._scaling_note(doc))
    assert "**1.15×**" in text and "Where those cores went" not in text


def test_own_cpu_reads_one_process_and_a_gone_one_raises() -> None:
    before = measure.own_cpu_s(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert measure.own_cpu_s(os.getpid()) - before >= 0.15
    with pytest.raises(OSError):
        measure.own_cpu_s(2**22 + 1)  # above the kernel's largest pid: no such process


class _Msg:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value


class _ScriptedConsumer:
    """A hand-written stand-in for confluent_kafka's Consumer: each batch becomes readable at
    its own monotonic time; ``consume(n, timeout)`` hands out what is readable, waiting for it
    up to ``timeout`` (in steps, like librdkafka's queue)."""

    def __init__(self, batches: list[tuple[float, list[bytes]]], fail: BaseException | None = None) -> None:
        self.batches = [(at, [_Msg(v) for v in values]) for at, values in batches]
        self.fail = fail
        self.closed = False

    def consume(self, n: int, timeout: float) -> list[_Msg]:
        end = time.monotonic() + timeout
        while True:
            if self.fail is not None:
                raise self.fail
            out: list[_Msg] = []
            while self.batches and self.batches[0][0] <= time.monotonic() and len(out) < n:
                at, msgs = self.batches[0]
                take, rest = msgs[: n - len(out)], msgs[n - len(out) :]
                out += take
                self.batches[0] = (at, rest)
                if not rest:
                    self.batches.pop(0)
            if out or time.monotonic() >= end:
                return out
            time.sleep(0.001)

    def close(self) -> None:
        self.closed = True


def test_results_readable_while_the_reader_parses_a_burst_are_stamped_when_they_became_readable() -> None:
    # A checkpoint's burst of 400 results, then (50 ms later) the next checkpoint's one result,
    # while parsing the burst takes at least 400 ms: the late result must be stamped about when
    # it became readable, not when the reader got through the burst before it.
    start = time.monotonic()
    burst = [b'{"k": %d}' % i for i in range(400)]
    consumer = _ScriptedConsumer([(start, burst), (start + 0.05, [b'{"k": "last"}'])])
    parsed_burst_at: list[float] = []

    def parse(record: dict[str, Any]) -> tuple[Any, Any]:
        if record["k"] != "last":
            time.sleep(0.001)
            if record["k"] == 399:
                parsed_burst_at.append(time.time())
        return record["k"], None

    reader = measure.SinkReader("unused", "unused", parse, expected=[*range(400), "last"], consumer=consumer)
    try:
        became_readable = time.time() - (time.monotonic() - (start + 0.05))
        deadline = time.monotonic() + 10
        while reader.awaiting and time.monotonic() < deadline:
            reader.poll(0.05)
        assert not reader.awaiting
        assert parsed_burst_at and parsed_burst_at[0] - reader.arrived[0] >= 0.35
        # stamped before the reader had parsed the burst, within a few thread switches of when
        # it became readable
        assert reader.arrived["last"] < parsed_burst_at[0] - 0.2
        assert abs(reader.arrived["last"] - became_readable) < 0.1
    finally:
        reader.close()
    assert consumer.closed


def test_a_failing_consumer_fails_the_next_poll() -> None:
    failing = _ScriptedConsumer([], fail=OSError("gone"))
    reader = measure.SinkReader("unused", "unused", expected=[1], consumer=failing)
    try:
        with pytest.raises(RuntimeError, match="reading the results failed"):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                reader.poll(0.05)
    finally:
        reader.close()


def test_weirs_first_record_is_the_earliest_worker_stamp_once_every_worker_shows_records() -> None:
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    statuses: list[dict[str, Any]] = [{"recordsIn": 0}, {"recordsIn": 0}]
    servers = []
    for status in statuses:

        class Handler(BaseHTTPRequestHandler):
            body = status

            def do_GET(self) -> None:
                data = json.dumps(self.body).encode()
                self.send_response(200 if self.path == "/status" else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    ports = [s.server_address[1] for s in servers]
    try:
        assert measure.weir_first_record(ports) is None
        statuses[1].update(recordsIn=10, firstRecordAt=1_700_000_000_250)
        assert measure.weir_first_record(ports) is None, "worker 0 has no record yet"
        statuses[0].update(recordsIn=3, firstRecordAt=1_700_000_000_100)
        assert measure.weir_first_record(ports) == 1_700_000_000.1
        assert measure.weir_first_record(ports[1:]) == 1_700_000_000.25
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
