"""Every example job (``weir.examples``) on the real broker gives exactly its reference output.

Each case takes the example's own manifest (one job, or several chained through topics),
rewritten on the parsed YAML to run in isolation without changing what it computes: unique topic
names, job names and namespace (so unique consumer groups and repartition topics), the test
broker, a ``file://`` checkpoint store in ``tmp_path`` with a 1 s interval, the earliest offset,
and an ``idleTimeout`` of at most 2 s (``rewritten`` says why that is safe, and why a job reading
another's output keeps its own). It creates the topics as ``weir demo`` does
(``weir.demo.topic_layout``), produces a bounded prefix of the example's generator with its clock
in the past (so once the input is read, the idle partitions' watermark follows the wall clock and
closes every window), runs the jobs through ``weir run`` (worker subprocesses) or ``weir up``
(the local platform), waits until the read_committed output topic holds as many records as the
reference, 3 s more for anything written twice, stops them with SIGTERM (exit 0), and compares
the output with the reference as a multiset (floats to a relative 1e-9: sums may be added in
another order). Every malformed (``raw``) record must be in a dead-letter topic.

The prefix spans ``SPAN_WINDOWS`` of the longest window (its size, or its session gap) and at
least ``MIN_SPAN_MS`` of event time, in ``RECORDS`` records: several windows or sessions whatever
the example.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from harness import up
from harness.kafka import KafkaHelper
from weir import demo
from weir.examples import Example, Record, examples
from weir.graph import compile_job
from weir.spec import Job, load_job, parse_duration

pytestmark = pytest.mark.kafka

START_MS = 1_704_067_200_000  # 2024-01-01: in the past, so idle partitions close every window
SEED = 11
RECORDS = 12_000
"""Records produced per case (an example whose generator writes a malformed record every 5000
gets two in the dead-letter topic)."""
SPAN_WINDOWS = 8
MIN_SPAN_MS = 40 * 60_000
"""What ``weir demo`` shows by default (40 s at 60x): what an example's notes tell the user to
look for (a spike, an alert) happens within it, so the test covers it too."""
CHECKPOINT_INTERVAL = "1s"
MAX_IDLE_MS = 2_000
WAIT_S = 90.0
"""How long the output may take to hold every expected record (a passing case takes 10-20 s; a
chained example waits for its second job's idle timeout; CI machines are slower)."""
NAMESPACE = "examples"

EXAMPLES = examples()


def step_ms(jobs: list[Job]) -> int:
    """The generator's clock step: ``RECORDS`` records over ``SPAN_WINDOWS`` of the longest window."""
    windows = [w for w in (job.pipeline.stages().window for job in jobs) if w is not None]
    longest = max((d for w in windows for d in (w.size, w.gap) if d), default=0)
    return max(1, max(MIN_SPAN_MS, SPAN_WINDOWS * longest) // RECORDS)


def rewritten(
    document: dict[str, Any], renamed: dict[str, str], name: str, bootstrap: str, store: Path, chained: bool
) -> dict[str, Any]:
    """The manifest ``document`` (parsed YAML) running under ``name`` in ``NAMESPACE`` on
    ``bootstrap`` with its topics ``renamed``, checkpointing to ``store`` every
    ``CHECKPOINT_INTERVAL``, reading from the earliest offset and, unless it is ``chained`` (reads
    another job's output), idle after at most ``MAX_IDLE_MS``. What it computes is unchanged: the
    idle timeout only decides when a partition read to its end stops holding windows open, and
    the test's input is all there before the job starts; another job's output is not (it comes at
    that job's checkpoints), so a chained job keeps the timeout its manifest chose for that."""
    doc = _renamed_topics(document, renamed)
    doc["metadata"] = {**doc.get("metadata", {}), "name": name, "namespace": NAMESPACE}
    spec = doc["spec"]
    spec["kafka"] = {**spec.get("kafka", {}), "bootstrapServers": bootstrap}
    checkpoint = {k: v for k, v in (spec.get("checkpoint") or {}).items() if k not in ("endpoint", "region")}
    spec["checkpoint"] = {**checkpoint, "url": store.as_uri(), "interval": CHECKPOINT_INTERVAL}
    # The input is produced before the job starts: a new job must read it from the start (on the
    # demo's fresh topics, "latest" and "earliest" read the same records).
    spec["pipeline"]["source"]["startFrom"] = "earliest"
    watermark = spec["pipeline"].setdefault("watermark", {})
    idle = parse_duration(watermark.get("idleTimeout", 0))
    if not chained and (idle == 0 or idle > MAX_IDLE_MS):
        watermark["idleTimeout"] = f"{MAX_IDLE_MS}ms"
    return doc


def _renamed_topics(value: Any, renamed: dict[str, str], key: str = "") -> Any:
    """A copy of ``value`` with every ``topic: NAME`` and ``topics: [NAME, ...]`` renamed."""
    if isinstance(value, dict):
        return {k: _renamed_topics(v, renamed, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_topics(v, renamed, key) for v in value]
    if key in ("topic", "topics") and isinstance(value, str):
        return renamed.get(value, value)
    return value


@contextmanager
def weir_run(manifests: list[Path], state: Path, bootstrap: str, log: Path) -> Iterator[Any]:
    """Each job's ``spec.parallelism`` ``weir run`` subprocesses until the block ends;
    ``running()`` fails if one exited, ``stop()`` returns their exit codes."""
    with log.open("wb") as sink:
        procs = []
        for manifest in manifests:
            workers = load_job(manifest).spec.parallelism
            procs += [
                subprocess.Popen(
                    [sys.executable, "-m", "weir", "run", str(manifest), "--bootstrap-servers", bootstrap,
                     "--state-dir", str(state / manifest.stem / f"w{i}"), "--http-port", "0",
                     "--workers", str(workers), "--worker-index", str(i), "--log-level", "WARNING"],
                    stdout=sink, stderr=subprocess.STDOUT,
                )
                for i in range(workers)
            ]

    class Workers:
        def running(self) -> bool:
            exited = [p.returncode for p in procs if p.poll() is not None]
            assert not exited, f"a worker exited with {exited}:\n{log.read_text(errors='replace')[-6000:]}"
            return True

        def stop(self) -> list[int]:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            return [p.wait(timeout=60) for p in procs]

    try:
        yield Workers()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def produce(
    kafka: KafkaHelper, records: list[Record], renamed: dict[str, str], producer_config: dict[str, Any]
) -> None:
    """The records in order through one producer (so tables and streams keyed alike are
    co-partitioned), each delivered or the test fails."""
    producer = kafka.producer(**producer_config)
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for record in records:
        key, value = demo.message(record)
        partition = -1 if record.partition is None else record.partition  # -1: the partitioner's choice
        stamp = record.timestamp or 0  # 0: the time now
        while True:
            try:
                producer.produce(renamed[record.topic], value, key, partition=partition, timestamp=stamp,
                                 on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0 and not errors, errors[:5]


def matched(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """``(missing, unexpected)`` of comparing two lists of records as multisets, floats equal to
    a relative 1e-9 (anything else exactly, types included)."""
    pending: dict[bytes, list[dict[str, Any]]] = {}
    for record in got:
        pending.setdefault(_shape(record), []).append(record)
    missing = []
    for record in expected:
        candidates = pending.get(_shape(record), [])
        floats = _floats(record)
        for i, candidate in enumerate(candidates):
            if _floats(candidate) == pytest.approx(floats, rel=1e-9):
                del candidates[i]
                break
        else:
            missing.append(record)
    unexpected = [record for left in pending.values() for record in left]
    return missing, unexpected


def _shape(value: Any) -> bytes:
    def strip(v: Any) -> Any:
        if isinstance(v, float):
            return "<float>"
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return orjson.dumps(strip(value), option=orjson.OPT_SORT_KEYS)


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for k in sorted(value) for f in _floats(value[k])]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("runner", ["run", "up"])
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_the_example_job_writes_exactly_its_reference_output_and_dead_letters_the_malformed(
    example: Example, runner: str, kafka: KafkaHelper, tmp_path: Path
) -> None:
    documents = demo.documents(example)
    originals = [compile_job(job) for job in demo.jobs(example)]
    tag = kafka.unique("x")[-8:]
    renamed = {
        t: f"{t}-{tag}"
        for p in originals
        for t in (*p.source_topics, *p.table_topics, p.sink_topic, p.dead_letter_topic)
        if t
    }
    outputs = {p.sink_topic for p in originals}
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    manifests = []
    for i, (document, original) in enumerate(zip(documents, originals, strict=True)):
        name = f"{document['metadata']['name']}-{runner}-{tag}"
        chained = bool(outputs & set(original.source_topics))
        manifests.append(jobs_dir / f"{i}-{name}.yaml")
        job = rewritten(document, renamed, name, kafka.bootstrap, tmp_path / "store", chained)
        manifests[-1].write_text(yaml.safe_dump(job, sort_keys=False))
    jobs = [load_job(m) for m in manifests]
    plans = [compile_job(job) for job in jobs]
    for topic, layout in demo.topic_layout(plans, [renamed[t] for t in example.table_topics]).items():
        kafka.create_topic(topic, layout.partitions, layout.config)

    records = list(islice(example.generate(SEED, START_MS, step_ms(jobs)), RECORDS))
    expected = example.reference(records)
    assert expected, "the reference expects no output: the prefix is too short to test anything"
    # The manifest's partitioner, if it names one: a copartitioned table must match the job's.
    producer = jobs[0].spec.kafka.producer
    produce(kafka, records, renamed, {k: v for k, v in producer.items() if k == "partitioner"})

    state, log = tmp_path / "state", tmp_path / f"{runner}.log"
    sink = demo.output_topic(plans)
    started = time.monotonic()
    if runner == "run":
        with weir_run(manifests, state, kafka.bootstrap, log) as workers:
            up.wait(lambda: workers.running() and len(kafka.read_all(sink, timeout=5)) >= len(expected),
                    WAIT_S, f"{len(expected)} results", log)
            time.sleep(3)  # anything written twice shows up now
            workers.running()
            assert set(workers.stop()) == {0}, log.read_text()
    else:
        with up.weir_up(jobs_dir, state, kafka.bootstrap, log) as process:
            def running() -> bool:
                assert process.poll() is None, f"weir up exited with {process.returncode}:\n{log.read_text()}"
                return True

            up.wait(lambda: running() and len(kafka.read_all(sink, timeout=5)) >= len(expected),
                    WAIT_S, f"{len(expected)} results", log)
            time.sleep(3)  # anything written twice shows up now
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=90) == 0, log.read_text()
    took = time.monotonic() - started
    print(f"{example.name} through weir {runner}: {len(expected)} results in {took:.1f}s")

    got = [orjson.loads(m.value) for m in kafka.read_all(sink) if m.value is not None]
    missing, unexpected = matched(expected, got)
    assert not missing and not unexpected, (
        f"{len(got)} results, {len(expected)} expected; {len(missing)} missing, e.g. {missing[:3]}; "
        f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"
    )
    raw = Counter(r.raw for r in records if r.raw is not None)
    dead_letters = {p.dead_letter_topic for p in plans if p.dead_letter_topic}
    dead = Counter(m.value for t in dead_letters for m in kafka.read_all(t))
    assert raw <= dead, f"malformed records not dead-lettered: {raw - dead}"


def test_the_demo_recreates_its_topics_empty_with_their_partitions_and_the_tables_compacted(
    kafka: KafkaHelper,
) -> None:
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    events, table = kafka.unique("events"), kafka.unique("table")
    layout = {events: demo.TopicLayout(4), table: demo.TopicLayout(2, {"cleanup.policy": "compact"})}
    demo.recreate(kafka.admin(), layout, [kafka.unique("group")])
    kafka.produce(events, [{"key": b"k", "value": b"{}"}])
    demo.recreate(kafka.admin(), layout, [kafka.unique("group")])

    assert kafka.end_offsets(events) == {0: 0, 1: 0, 2: 0, 3: 0}
    assert kafka.end_offsets(table) == {0: 0, 1: 0}
    described = kafka.admin().describe_configs([ConfigResource(ConfigResource.Type.TOPIC, table)])
    configs = next(iter(described.values())).result(timeout=30)
    assert configs["cleanup.policy"].value == "compact"

