"""Exactly-once, recovery, savepoints and rescaling against the real broker and S3 server.

Every test compares the read_committed output with the brute-force reference: a window
missing, emitted twice or with a wrong value fails it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.kafka import KafkaHelper
from harness.s3 import S3Helper
from weir.controlapi import SavepointRequest
from weir.testing import random_events, reference_windows

from .test_pipelines import (
    LATENESS_MS,
    OOO_MS,
    SPECS,
    START_MS,
    WINDOWS,
    Running,
    assert_same,
    manifest,
    results_of,
)

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

TUMBLING, (SIZE, _, _) = WINDOWS["tumbling"]
PHASE1_IDLE = "10m"
"""Idle timeout before a savepoint whose restore gets more input: idleness must not close windows
early while a slow savepoint is taken (the first half is read within the 2 s ``IDLE`` otherwise)."""


def events_for(seed: int, n: int, partitions: int = 4, keys: int = 64) -> list[Any]:
    return random_events(
        seed,
        n,
        partitions=partitions,
        keys=keys,
        start_ms=START_MS,
        mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS,
        too_late_fraction=0.0,
    )


def expected_of(events: list[Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    expected, late = reference_windows(events, "tumbling", SIZE, None, None, LATENESS_MS, OOO_MS, SPECS)
    assert not late
    return expected


def as_records(events: list[Any]) -> list[dict[str, Any]]:
    return [
        {"value": json.dumps({**record, "ts": ts, "k": key}).encode(), "key": key.encode(), "partition": p}
        for p, key, ts, record in events
    ]


class Trickle:
    """Produces events in chunks over ``seconds`` from a thread, so workers die mid-stream."""

    def __init__(self, kafka: KafkaHelper, topic: str, events: list[Any], seconds: float) -> None:
        self.records = as_records(events)
        self.kafka, self.topic, self.seconds = kafka, topic, seconds
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.done = threading.Event()

    def _run(self) -> None:
        chunks = 40
        size = -(-len(self.records) // chunks)
        for i in range(0, len(self.records), size):
            self.kafka.produce(self.topic, self.records[i : i + size])
            time.sleep(self.seconds / chunks)
        self.done.set()

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)


def wait_for_output(
    kafka: KafkaHelper, sink: str, expected: dict[Any, Any], timeout: float, check: Any = None
) -> dict[Any, Any]:
    """Until the committed output has as many windows as expected; then a little longer, to
    catch anything emitted twice after the last expected window."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        got = kafka.read_all(sink, timeout=30)
        if len(got) >= len(expected):
            time.sleep(2.5)
            return results_of(kafka.read_all(sink, timeout=30))
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(got)} of {len(expected)} windows after {timeout:.0f}s")
        time.sleep(0.5)


# --- the kill test ---------------------------------------------------------------------------


class WorkerProcs:
    """``weir run`` subprocesses, one per worker index, that can be SIGKILLed and restarted."""

    def __init__(
        self, job: Path, workers: int, root: Path, env: dict[str, str], url: str, args: tuple[str, ...] = ()
    ) -> None:
        self.job, self.workers, self.root, self.url, self.args = job, workers, root, url, args
        self.env = {**os.environ, **env}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def state_dir(self, i: int) -> Path:
        return self.root / f"state-w{i}"

    def start(self, i: int) -> None:
        log = open(self.root / f"w{i}.log", "ab")  # noqa: SIM115 - the child owns it while it runs
        with log:
            self.procs[i] = subprocess.Popen(
                [
                    sys.executable, "-m", "weir", "run", str(self.job),
                    "--worker-index", str(i), "--workers", str(self.workers),
                    "--state-dir", str(self.state_dir(i)), "--http-port", "0",
                    "--checkpoint-url", self.url, "--checkpoint-interval", "0.5",
                    "--connect-timeout", "30", *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.starts += 1

    def check(self) -> None:
        for i, p in self.procs.items():
            code = p.poll()
            if code is not None:
                raise AssertionError(f"worker {i} exited with {code}:\n{self.log_tail(i)}")

    def log_tail(self, i: int) -> str:
        return "\n".join((self.root / f"w{i}.log").read_text(errors="replace").splitlines()[-40:])

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10)

    def restores(self, i: int) -> int:
        """How many restores worker ``i``'s log shows (it is appended to across restarts)."""
        log = self.root / f"w{i}.log"
        return log.read_text(errors="replace").count("restored in") if log.exists() else 0

    def wait(self, done: Callable[[], bool], seconds: float, what: str) -> None:
        """Until ``done()``; every worker must keep running meanwhile."""
        deadline = time.monotonic() + seconds
        while not done():
            self.check()
            assert time.monotonic() < deadline, f"no {what} within {seconds:g}s"
            time.sleep(0.5)

    def kill_schedule(
        self, rng: random.Random, kills: int, pause: tuple[float, float], committed: Callable[[], bool]
    ) -> int:
        """SIGKILL a random worker ``kills`` times, ``pause`` seconds apart (uniform), half the
        time wiping its local state as if the pod moved (a restore from the store); returns how
        many were wiped. The first kill waits until ``committed()`` (a checkpoint is in the store),
        always wipes, and the next waits for that worker's restore: at least one restart restores
        from the store however slow the machine is. The others fall anywhere, start-up included."""
        self.wait(committed, 90, "first committed checkpoint")
        wiped = 0
        for k in range(kills):
            time.sleep(rng.uniform(*pause))
            self.check()
            victim = rng.randrange(self.workers)
            before = self.restores(victim)
            self.kill(victim)
            if k == 0 or rng.random() < 0.5:
                shutil.rmtree(self.state_dir(victim), ignore_errors=True)
                wiped += 1
            self.start(victim)
            print(f"kill {k + 1}: worker {victim}")
            if k == 0:
                self.wait(lambda v=victim, b=before: self.restores(v) > b, 90, "restore from the store")
        return wiped

    def stop_all(self) -> list[int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs.values():
            try:
                codes.append(p.wait(40))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes


def stuck_job_report(kafka: KafkaHelper, group: str, source: str, sink: str, procs: WorkerProcs) -> str:
    """Where a job that has not produced all its output stands: input read and committed per
    partition, the sink's records committed and not (an open transaction holds back the
    last stable offset), and the workers' logs."""
    ends, committed = kafka.end_offsets(source), kafka.committed(group, source)
    lines = [f"source {p}: committed {committed.get(p)} of {end}" for p, end in ends.items()]
    readable = len(kafka.read_all(sink, timeout=30))
    written = len(kafka.read_all(sink, isolation="read_uncommitted", timeout=30))
    lines.append(f"sink: {readable} records committed, {written} written (committed, open and aborted)")
    for i in range(procs.workers):
        lines.append(f"--- worker {i} log (tail) ---\n{procs.log_tail(i)}")
    return "\n".join(lines)


def run_kill_test(
    kafka: KafkaHelper,
    s3: S3Helper,
    tmp_path: Path,
    seed: int,
    n: int,
    kills: int,
    args: tuple[str, ...] = (),
) -> None:
    rng = random.Random(seed)
    events = events_for(seed, n)
    expected = expected_of(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    name = f"kill-{source[-6:]}"
    job = manifest(tmp_path, name, kafka, source, sink, dlq, TUMBLING)
    url = f"s3://{s3.new_bucket()}/checkpoints"
    procs = WorkerProcs(job, 2, tmp_path, s3.env(), url, args)
    for i in range(2):
        procs.start(i)
    group = f"weir-test-{name}"
    started = time.monotonic()
    try:
        with Trickle(kafka, source, events, seconds=25):
            wiped = procs.kill_schedule(
                rng, kills, (0.3, 2.5), lambda: any(o > 0 for o in kafka.committed(group, source).values())
            )
        # Fail before pytest-timeout (120 s) does, with what tells a slow job from a stuck one.
        left = 100 - (time.monotonic() - started)
        try:
            got = wait_for_output(kafka, sink, expected, timeout=max(5.0, left), check=procs.check)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stuck_job_report(kafka, group, source, sink, procs)}") from None
    finally:
        codes = procs.stop_all()
    assert_same(got, expected)
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    assert procs.starts == 2 + kills
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "restore exact" in logs or wiped == 0, "no restart restored a checkpoint from the store"
    # Offsets are committed to the job's consumer group, where any lag tool reads them.
    assert kafka.committed(f"weir-test-{name}", source) == kafka.end_offsets(source)


def test_a_worker_killed_at_random_instants_loses_and_duplicates_nothing(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    run_kill_test(kafka, s3, tmp_path, seed=20261121, n=200_000, kills=10)


def test_a_worker_killed_while_its_windows_spill_to_disk_between_checkpoints_loses_and_duplicates_nothing(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    # 8 windows in memory per partition: the store writes windows to RocksDB between
    # checkpoints all the time, so a killed worker's local database usually holds changes past
    # its last checkpoint (2 s apart here, so most kills land there); it must restore from the
    # store, not from that database.
    args = ("--max-cached-windows", "8", "--checkpoint-interval", "2")
    run_kill_test(kafka, s3, tmp_path, seed=20261201, n=100_000, kills=16, args=args)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_kill_test_with_random_seeds(kafka: KafkaHelper, s3: S3Helper, tmp_path: Path) -> None:
    rounds = int(os.environ.get("WEIR_SOAK_ROUNDS", "5"))
    for r in range(rounds):
        seed = random.SystemRandom().randrange(1 << 30)
        print(f"soak round {r + 1}/{rounds}: seed {seed}")
        round_dir = tmp_path / f"r{r}"
        round_dir.mkdir()
        run_kill_test(kafka, s3, round_dir, seed=seed, n=200_000, kills=15)


# --- in-process workers for the S3, savepoint and corruption tests ------------------------------


class Job(Running):
    """Workers of one job in threads of this process, with an S3 checkpoint store and metrics."""

    def __init__(
        self,
        job_path: Path,
        kafka: KafkaHelper,
        workers: int,
        state: Path,
        url: str,
        restore_from: str | None = None,
        interval: float = 0.5,
    ) -> None:
        super().__init__(
            job_path,
            kafka,
            workers,
            state,
            metrics=True,
            checkpoint_interval_s=interval,
            checkpoint_url=url,
            restore_from=restore_from,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            assert time.monotonic() < deadline, "workers not ready"
            assert len(self.codes) == 0, f"a worker exited: {self.codes}"
            time.sleep(0.1)

    def wait_read(self, kafka: KafkaHelper, topic: str, timeout: float = 60) -> None:
        """Until this job's tasks of ``topic`` have read all it holds now."""
        ends = sum(kafka.end_offsets(topic).values())
        deadline = time.monotonic() + timeout
        while sum(t.next_offset for w in self.workers for t in w.tasks.values() if t.topic == topic) < ends:
            assert time.monotonic() < deadline, f"the job did not read {topic} to its end"
            assert len(self.codes) == 0, f"a worker exited: {self.codes}"
            time.sleep(0.2)

    def check(self) -> None:
        assert len(self.codes) == 0, f"a worker exited: {self.codes}"

    def metric(self, name: str) -> float:
        total = 0.0
        for w in self.workers:
            for family in w.metrics.registry.collect():
                for sample in family.samples:
                    if sample.name == name:
                        total += sample.value
        return total

    def savepoint(self, sid: str, stop: bool) -> list[dict[str, Any]]:
        answers: list[Any] = [None] * len(self.workers)

        def take(i: int) -> None:
            answer = self.workers[i].savepoint(SavepointRequest(id=sid, stop=stop))
            answers[i] = answer.model_dump(by_alias=True)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(len(self.workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return answers


@pytest.fixture
def s3_env(s3: S3Helper, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Helper]:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    yield s3


def test_s3_outage_pauses_checkpoints_and_loses_and_duplicates_nothing(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    s3 = s3_env
    events = events_for(7, 60_000)
    expected = expected_of(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    job = manifest(tmp_path, f"outage-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
    url = f"s3://{s3.new_bucket()}/ck"
    with Job(job, kafka, 2, tmp_path / "state", url) as running, Trickle(kafka, source, events, seconds=40):
        running.wait_ready()
        deadline = time.monotonic() + 30
        while running.metric("weir_checkpoint_duration_seconds_count") < 2:
            assert time.monotonic() < deadline, "no checkpoint completed before the outage"
            time.sleep(0.2)
        failures_before = running.metric("weir_checkpoint_failures_total")
        s3.stop()
        try:
            time.sleep(20)
            running.check()
            completed_during = running.metric("weir_checkpoint_duration_seconds_count")
            failures_during = running.metric("weir_checkpoint_failures_total")
        finally:
            s3.start()
        assert failures_during > failures_before, "checkpoints did not fail while S3 was down"
        deadline = time.monotonic() + 60
        while running.metric("weir_checkpoint_duration_seconds_count") <= completed_during + 2:
            assert time.monotonic() < deadline, "checkpoints did not complete again after S3 came back"
            time.sleep(0.2)
        got = wait_for_output(kafka, sink, expected, timeout=90, check=running.check)
    assert_same(got, expected)


def test_a_worker_fenced_by_a_newer_instance_rolls_back_and_loses_and_duplicates_nothing(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    # A zombie's successor (same transactional ids) fences it mid-stream, over and over: the
    # fenced worker rolls back to its last checkpoint instead of exiting. confluent-kafka raises
    # the fatal error from whichever call meets it first: poll, flush, produce or commit.
    events = events_for(20261205, 60_000)
    expected = expected_of(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    job = manifest(tmp_path, f"fence-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
    url = f"s3://{s3_env.new_bucket()}/ck"
    with Job(job, kafka, 2, tmp_path / "state", url) as running, Trickle(kafka, source, events, seconds=30):
        running.wait_ready()
        group = running.workers[0].graph.group_id
        fences = 0
        for _ in range(4):
            time.sleep(3)
            running.check()
            for suffix in ("a", "b"):  # both of worker 0's transactional producers
                successor = kafka.producer(**{"transactional.id": f"{group}-w0-{suffix}"})
                successor.init_transactions(30)
                fences += 1
        got = wait_for_output(kafka, sink, expected, timeout=90, check=running.check)
        rolled_back = running.workers[0].rollbacks
    assert fences == 8 and rolled_back >= 1, f"worker 0 fenced {fences} times, rolled back {rolled_back}"
    assert_same(got, expected)


def test_savepoint_at_two_workers_restored_at_one_and_at_four_gives_the_uninterrupted_output(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    s3 = s3_env
    events = events_for(3, 40_000)
    expected = expected_of(events)
    records = as_records(events)
    source = kafka.create_topic(partitions=4)
    url = f"s3://{s3.new_bucket()}/ck"
    first_half, second_half = records[: len(records) // 2], records[len(records) // 2 :]
    kafka.produce(source, first_half)

    sink0, dlq = kafka.create_topic(), kafka.create_topic()
    # Phase 1 must not close windows by idleness (its partitions are read to the end well before
    # the savepoint on a loaded machine): the second half still belongs in them.
    job0 = manifest(tmp_path, f"rs-{source[-6:]}", kafka, source, sink0, dlq, TUMBLING, idle=PHASE1_IDLE)
    with Job(job0, kafka, 2, tmp_path / "s0", url) as running:
        running.wait_ready()
        running.wait_read(kafka, source)
        answers = running.savepoint("sp-1", stop=True)
        again = running.workers[0].savepoint(SavepointRequest(id="sp-1", stop=True)).model_dump(by_alias=True)
    assert all(a["status"] == "completed" for a in answers), answers
    assert again["path"] == answers[0]["path"], "the same savepoint id must answer the same savepoint"
    savepoint_url = answers[0]["path"]  # .../savepoints/sp-1: every worker's part
    assert savepoint_url.endswith("/savepoints/sp-1") and answers[1]["path"] == savepoint_url
    kafka.produce(source, second_half)
    before = results_of(kafka.read_all(sink0))

    for workers in (1, 4):
        sink = kafka.create_topic()
        job = manifest(tmp_path, f"rs{workers}-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
        with Job(job, kafka, workers, tmp_path / f"s{workers}", url, restore_from=savepoint_url) as running:
            got = wait_for_output(kafka, sink, {k: 0 for k in set(expected) - set(before)}, 90, running.check)
        assert not set(got) & set(before), "a window emitted before the savepoint was emitted again"
        assert_same({**before, **got}, expected)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_exact_output(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    s3 = s3_env
    events = events_for(5, 30_000, partitions=2)
    expected = expected_of(events)
    records = as_records(events)
    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/ck"
    job = manifest(tmp_path, f"corrupt-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
    half = len(records) // 2
    with Job(job, kafka, 1, tmp_path / "state", url, interval=0.3) as running:
        running.wait_ready()
        for i in range(0, half, 1000):  # several checkpoints at different offsets
            kafka.produce(source, records[i : min(i + 1000, half)])
            time.sleep(0.15)
        deadline = time.monotonic() + 30
        while running.workers[0].status().records_in < half:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # Delete one file that only the latest checkpoint has (its own directory's files).
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="ck/")["Contents"]]
    manifests = sorted(k for k in keys if "/checkpoints/" in k and k.endswith("/manifest.json"))
    latest_dir = manifests[-1].rsplit("/", 1)[0]
    own = [k for k in keys if k.startswith(latest_dir + "/") and not k.endswith("manifest.json")]
    assert own, f"the latest checkpoint {latest_dir} has no files of its own: {keys}"
    client.delete_object(Bucket=bucket, Key=own[0])
    shutil.rmtree(tmp_path / "state")  # a new pod: no local state

    kafka.produce(source, records[half:])
    with Job(job, kafka, 1, tmp_path / "state", url) as running:
        got = wait_for_output(kafka, sink, expected, timeout=90, check=running.check)
        skipped = running.metric("weir_checkpoints_skipped_total")
    assert skipped >= 1, "the corrupt checkpoint was not detected"
    assert_same(got, expected)


def test_savepoint_over_http_answers_with_its_path(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    s3 = s3_env
    events = events_for(9, 4000, partitions=2)
    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    kafka.produce(source, as_records(events))
    job = manifest(tmp_path, f"http-{source[-6:]}", kafka, source, sink, dlq, TUMBLING)
    url = f"s3://{s3.new_bucket()}/ck"
    procs = WorkerProcs(job, 1, tmp_path, s3.env(), url)
    procs.start(0)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            assert time.monotonic() < deadline, procs.log_tail(0)
            procs.check()
            for line in (tmp_path / "w0.log").read_text().splitlines():
                if "serving metrics and control on" in line:
                    port = int(line.rsplit(":", 1)[1])
            time.sleep(0.2)
        body = json.dumps({"id": "manual-1", "stop": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/savepoint", data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert procs.procs[0].wait(30) == 0, procs.log_tail(0)
    finally:
        procs.stop_all()
    assert answer["status"] == "completed"
    assert answer["path"].endswith("/savepoints/manual-1"), answer
    listing = subprocess.run(
        [sys.executable, "-m", "weir", "checkpoints", "ls", url],
        capture_output=True, text=True, env={**os.environ, **s3.env()}, check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert "manual-1" in listing.stdout


def test_a_repartitioned_job_savepoints_and_resumes_with_exact_output(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    # keyBy a record field: stage-1 partitions hold no state (only an offset and a watermark),
    # stage-2 partitions of the repartition topic hold the windows; both go into the savepoint.
    s3 = s3_env
    events = events_for(13, 20_000)
    expected = expected_of(events)
    records = as_records(events)
    source = kafka.create_topic(partitions=4)
    url = f"s3://{s3.new_bucket()}/ck"
    kafka.produce(source, records[: len(records) // 2])
    sink, dlq = kafka.create_topic(), kafka.create_topic()
    key_by = {"field": "k", "partitions": 4}
    name = f"rp-{source[-6:]}"
    job = manifest(tmp_path, name, kafka, source, sink, dlq, TUMBLING, key_by=key_by, idle=PHASE1_IDLE)
    with Job(job, kafka, 2, tmp_path / "s0", url) as running:
        running.wait_ready()
        running.wait_read(kafka, source)
        answers = running.savepoint("sp-rp", stop=True)
    assert all(a["status"] == "completed" for a in answers), answers
    kafka.produce(source, records[len(records) // 2 :])
    job = manifest(tmp_path, name, kafka, source, sink, dlq, TUMBLING, key_by=key_by)  # idle closes the end
    with Job(job, kafka, 1, tmp_path / "s1", url, restore_from=answers[0]["path"]) as running:
        got = wait_for_output(kafka, sink, expected, timeout=90, check=running.check)
    assert_same(got, expected)


def test_a_savepoint_restored_into_another_window_size_exits_2_or_with_a_reset_starts_empty_at_its_offsets(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    """``weir run --restore-from`` a savepoint of 10 s windows into 50 s windows: exit code 2
    naming the field, nothing committed; with ``--allow-state-reset`` the job starts at the
    savepoint's offsets with empty windows, so the new windows count exactly the records read
    after it (none is late: the input's disorder is below the watermark's)."""
    s3 = s3_env
    records = as_records(events_for(17, 6_000))
    first, second = records[: len(records) // 2], records[len(records) // 2 :]
    source = kafka.create_topic(partitions=4)
    sink, dlq = kafka.create_topic(), kafka.create_topic()
    url = f"s3://{s3.new_bucket()}/ck"
    name = f"ws-{source[-6:]}"
    kafka.produce(source, first)
    job = manifest(tmp_path, name, kafka, source, sink, dlq, TUMBLING, idle=PHASE1_IDLE)
    with Job(job, kafka, 1, tmp_path / "s0", url) as running:
        running.wait_ready()
        running.wait_read(kafka, source)
        answers = running.savepoint("sp-ws", stop=True)
    assert answers[0]["status"] == "completed", answers
    kafka.produce(source, second)
    before = results_of(kafka.read_all(sink))
    at_savepoint = kafka.committed(f"weir-test-{name}", source)
    (tmp_path / "v2").mkdir()
    wider = manifest(tmp_path / "v2", name, kafka, source, sink, dlq, {"type": "tumbling", "size": "50s"})
    command = [
        sys.executable, "-m", "weir", "run", str(wider), "--state-dir", str(tmp_path / "s1"),
        "--http-port", "0", "--checkpoint-url", url, "--checkpoint-interval", "0.5",
        "--restore-from", answers[0]["path"], "--connect-timeout", "30",
    ]
    env = {**os.environ, **s3.env()}
    refused = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    err = refused.stderr.decode(errors="replace")
    assert refused.returncode == 2, err[-2000:]
    assert "state shape mismatch" in err and "pipeline.window.size: 10s -> 50s" in err, err[-2000:]
    assert kafka.committed(f"weir-test-{name}", source) == at_savepoint
    with open(tmp_path / "reset.log", "wb") as log:
        reset = [*command, "--allow-state-reset"]
        proc = subprocess.Popen(reset, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "reset.log").read_text()[-2000:]
            after = {k: v for k, v in results_of(kafka.read_all(sink)).items() if k not in before}
            counted = sum(v["n"] for v in after.values())
            if counted >= len(second):
                break
            assert time.monotonic() < deadline, f"{counted} of {len(second)} records counted"
            time.sleep(0.5)
        time.sleep(2.5)  # anything emitted twice would show now
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
    assert code == 0
    after = {k: v for k, v in results_of(kafka.read_all(sink)).items() if k not in before}
    assert all(end - start == 50_000 for _key, start, end in after)
    assert sum(v["n"] for v in after.values()) == len(second)
    assert results_of(kafka.read_all(sink)).keys() >= before.keys()
    assert "state reset (allowed)" in (tmp_path / "reset.log").read_text()
