"""Outages of the broker and of the checkpoint store are ridden out, against the real servers.

Each test runs two exactly-once ``weir run`` workers with input flowing, takes a dependency
away for the time the issue names (the broker SIGKILLed for 60 s; S3 stopped for 120 s with a
worker SIGKILLed and restarted meanwhile) and checks that no worker exits, that the outage is
visible in ``/readyz``, ``/status`` and ``/metrics`` while it lasts, and that the read_committed
output equals the brute-force reference exactly: no window missing, none twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from harness import kafka as kafka_server
from harness.common import Running
from harness.kafka import KafkaHelper
from harness.s3 import S3Helper

from .test_exactly_once import TUMBLING, WorkerProcs, as_records, events_for, expected_of, wait_for_output
from .test_pipelines import assert_same, manifest

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


class Chunks:
    """Produces the input in chunks from a thread; ``hold()`` waits for the chunk in flight and
    holds the next ones back (the broker is about to go), ``release()`` lets them go on."""

    def __init__(self, kafka: KafkaHelper, topic: str, events: list[Any], seconds: float, chunks: int = 40):
        self.records = as_records(events)
        self.kafka, self.topic, self.pause = kafka, topic, seconds / chunks
        self.size = -(-len(self.records) // chunks)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def _run(self) -> None:
        for i in range(0, len(self.records), self.size):
            with self.lock:
                self.kafka.produce(self.topic, self.records[i : i + self.size])
                self.sent = i + self.size
            time.sleep(self.pause)

    def hold(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> Chunks:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(180)
        assert not self.thread.is_alive(), "the input did not finish"


class Control:
    """The HTTP control API of the workers of ``WorkerProcs`` (ports read from their logs)."""

    def __init__(self, procs: WorkerProcs) -> None:
        self.procs = procs
        self.starts: dict[int, int] = {}

    def restart(self, i: int) -> None:
        """SIGKILL worker ``i`` and start it again (the next port in its log is the new one's)."""
        self.procs.kill(i)
        self.starts[i] = self.starts.get(i, 1) + 1
        self.procs.start(i)

    def port(self, i: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            lines = (self.procs.root / f"w{i}.log").read_text(errors="replace").splitlines()
            ports = [int(m.group(1)) for line in lines if (m := re.search(r"control on .*:(\d+)$", line))]
            if len(ports) >= self.starts.get(i, 1):
                return ports[-1]  # the latest start's
            assert time.monotonic() < deadline, self.procs.log_tail(i)
            self.procs.check()
            time.sleep(0.2)

    def get(self, i: int, path: str) -> tuple[int, str]:
        self.procs.check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port(i)}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def status(self, i: int) -> dict[str, Any]:
        code, body = self.get(i, "/status")
        assert code == 200, body
        return dict(json.loads(body))

    def metric(self, i: int, name: str, **labels: str) -> float | None:
        _, text = self.get(i, "/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + "{") and want in line:
                return float(line.rsplit(" ", 1)[1])
        return None

    def wait_ready(self, i: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.get(i, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, f"worker {i} not ready:\n{self.procs.log_tail(i)}"
            self.procs.check()
            time.sleep(0.3)


def outage_seen(control: Control, i: int, dependency: str, timeout: float) -> dict[str, Any]:
    """Until worker ``i`` reports ``dependency`` down on every channel; returns its /status entry."""
    deadline = time.monotonic() + timeout
    while True:
        control.procs.check()
        status = control.status(i)
        entry = status.get("outages", {}).get(dependency)
        ready = control.get(i, "/readyz")
        up = control.metric(i, "weir_dependency_up", dependency=dependency)
        if entry is not None and ready[0] == 503 and up == 0:
            assert f"{dependency} unreachable" in json.loads(ready[1])["reason"]
            assert (control.metric(i, "weir_outage_seconds_total", dependency=dependency) or 0) > 0
            return dict(entry)
        assert time.monotonic() < deadline, f"worker {i} shows no {dependency} outage: {status} {ready} {up}"
        time.sleep(0.5)


def log_lines(procs: WorkerProcs, i: int) -> list[str]:
    return (procs.root / f"w{i}.log").read_text(errors="replace").splitlines()


BROKER_OUTAGE_IDLE = "15s"


def test_the_broker_killed_for_60_seconds_is_ridden_out_with_exact_output(
    kafka: KafkaHelper, kafka_running: Running, tmp_path: Path
) -> None:
    events = events_for(20261201, 120_000)
    expected = expected_of(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    # The input is live across a broker restart, and the test's own producer may take seconds
    # to reconnect after it (librdkafka's reconnect backoff): with the usual 2 s idleTimeout such
    # a gap made every partition idle, its watermark jumped to the wall clock, and the rest of
    # the input (dated 2024) was dead-lettered as late (a cold rehearsal: 3,517 of 7,752
    # windows). A live stream's idle timeout must outlast its producers' gaps.
    job = manifest(tmp_path, f"bo-{source[-6:]}", kafka, source, sink, dlq, TUMBLING, idle=BROKER_OUTAGE_IDLE)
    procs = WorkerProcs(job, 2, tmp_path, {}, (tmp_path / "store").as_uri())
    control = Control(procs)
    for i in range(2):
        procs.start(i)
    try:
        with Chunks(kafka, source, events, seconds=30) as chunks:
            for i in range(2):
                control.wait_ready(i)
            while chunks.sent < len(chunks.records) // 3:  # well into the input
                procs.check()
                time.sleep(0.2)
            chunks.hold()
            try:
                lines_before = [len(log_lines(procs, i)) for i in range(2)]
                kafka_server.kill(kafka_running)
                killed = time.monotonic()
                try:
                    seen = [outage_seen(control, i, "kafka", timeout=45) for i in range(2)]
                    time.sleep(max(0.0, 60 - (time.monotonic() - killed)))
                    procs.check()
                finally:
                    kafka_server.restart(kafka_running)  # whatever happened: later tests need it
            finally:
                chunks.release()
            for i in range(2):
                control.wait_ready(i, timeout=120)
        got = wait_for_output(kafka, sink, expected, timeout=180, check=procs.check)
        during = [log_lines(procs, i)[lines_before[i]:] for i in range(2)]
        back = [control.status(i) for i in range(2)]
    finally:
        codes = procs.stop_all()
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    assert_same(got, expected)
    for i in range(2):
        assert seen[i]["error"], seen[i]
        assert back[i]["outages"] == {}, back[i]
        downs = [line for line in during[i] if "kafka unreachable:" in line]
        ups = [line for line in during[i] if re.search(r"kafka back after \d+\.\d s", line)]
        assert 1 <= len(downs) <= 3 and len(ups) == len(downs), "\n".join(during[i])
        # One line per change of state, not one per failed reconnect (a few lines of start-over).
        assert len(during[i]) < 60, f"{len(during[i])} log lines during the outage:\n" + "\n".join(during[i])


@pytest.mark.s3
def test_s3_stopped_for_120_seconds_with_a_worker_restarted_meanwhile_is_ridden_out_with_exact_output(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    events = events_for(20261202, 120_000)
    expected = expected_of(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    job = manifest(tmp_path, f"so-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
    url = f"s3://{s3.new_bucket()}/ck"
    # As under Kubernetes: a starting worker waits for its store for ever instead of exiting.
    procs = WorkerProcs(job, 2, tmp_path, s3.env(), url, args=("--connect-timeout", "0"))
    control = Control(procs)
    for i in range(2):
        procs.start(i)
    try:
        with Chunks(kafka, source, events, seconds=60):
            for i in range(2):
                control.wait_ready(i)
            deadline = time.monotonic() + 60
            while not all(o > 0 for o in kafka.committed(f"weir-test-{job.stem}", source).values()):
                assert time.monotonic() < deadline, "no checkpoint with records committed before the outage"
                time.sleep(0.3)
            s3.stop()
            stopped = time.monotonic()
            try:
                seen = [outage_seen(control, i, "store", timeout=60) for i in range(2)]
                control.restart(1)  # SIGKILLed during the outage, started again while S3 is still down
                restarted = outage_seen(control, 1, "store", timeout=60)
                assert not control.status(1)["ready"]
                time.sleep(max(0.0, 120 - (time.monotonic() - stopped)))
                procs.check()
            finally:
                s3.start()
            for i in range(2):
                control.wait_ready(i, timeout=180)
        got = wait_for_output(kafka, sink, expected, timeout=180, check=procs.check)
        back = [control.status(i) for i in range(2)]
    finally:
        codes = procs.stop_all()
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    assert_same(got, expected)
    assert all(entry["error"] for entry in [*seen, restarted])
    assert back[0]["outages"] == {} and back[1]["outages"] == {}, back
    restarted_log = "\n".join(log_lines(procs, 1)[-400:])
    assert "store unreachable:" in restarted_log and re.search(r"store back after \d+\.\d s", restarted_log)
    assert "restore exact" in restarted_log, "the restarted worker did not restore its checkpoint from S3"
    assert "Traceback" not in restarted_log


@pytest.mark.s3
def test_wrong_s3_credentials_at_start_exit_5_with_one_line_naming_the_cause_and_not_the_secret(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    source, sink, dlq = kafka.create_topic(), kafka.create_topic(), kafka.create_topic()
    job = manifest(tmp_path, f"cred-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
    secret = "not-the-secret-4f9c2a"
    env = {**os.environ, **s3.env(), "AWS_SECRET_ACCESS_KEY": secret}
    done = subprocess.run(
        [sys.executable, "-m", "weir", "run", str(job), "--state-dir", str(tmp_path / "state"),
         "--http-port", "0", "--checkpoint-url", f"s3://{s3.bucket}/ck"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line]

    assert done.returncode == 5, output
    assert len(errors) == 1, output
    assert "SignatureDoesNotMatch" in errors[0] and f"s3://{s3.bucket}/ck" in errors[0], errors[0]
    assert "AWS_SECRET_ACCESS_KEY" in errors[0]  # says what to check
    assert "Traceback" not in output
    assert secret not in output


def unreachable_broker_job(tmp_path: Path) -> Path:
    """A job whose broker address has nothing listening (a port just freed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "nobroker", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": f"127.0.0.1:{port}"},
            "pipeline": {
                "source": {"topics": ["in"], "eventTime": {"field": "ts"}},
                "steps": [{"window": TUMBLING}, {"aggregate": {"outputs": {"n": {"fn": "count"}}}}],
                "sink": {"topic": "out"},
            },
        },
    }
    path = tmp_path / "nobroker.json"
    path.write_text(json.dumps(doc))
    return path


def test_inside_kubernetes_a_worker_waits_for_an_unreachable_broker_not_ready_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    job = unreachable_broker_job(tmp_path)
    log = tmp_path / "w0.log"
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}  # as in every pod
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "weir", "run", str(job), "--worker-index", "0", "--workers", "1",
             "--state-dir", str(tmp_path / "state"), "--http-port", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    procs = WorkerProcs(job, 1, tmp_path, {}, "")
    procs.procs[0] = proc
    try:
        control = Control(procs)
        entry = outage_seen(control, 0, "kafka", timeout=60)
        time.sleep(8)  # still waiting, still not ready: no exit, no back-off into a crash loop
        procs.check()
        assert control.get(0, "/readyz")[0] == 503
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text
    assert "127.0.0.1" in entry["error"], entry
    assert text.count("weir.outages: kafka unreachable:") == 1, text  # once, however many retries
    assert "stopped during an outage" in text, text
    assert "Traceback" not in text


def test_on_a_laptop_an_unreachable_broker_at_start_exits_3_after_the_connect_timeout_in_one_line(
    tmp_path: Path,
) -> None:
    job = unreachable_broker_job(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "weir", "run", str(job), "--state-dir", str(tmp_path / "state"),
         "--http-port", "0", "--connect-timeout", "4"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line]

    assert done.returncode == 3, output
    assert time.monotonic() - started < 30
    assert len(errors) == 1 and "cannot reach Kafka at 127.0.0.1:" in errors[0], output
    assert "Traceback" not in output
