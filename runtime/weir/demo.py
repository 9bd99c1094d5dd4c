"""`weir demo [NAME]`: an example job (``weir.examples``) on its generated input, on a laptop.

The job runs the way a user runs it on a laptop: through `weir up`, the local platform
(the operator's reconciler with worker subprocesses and a file:// checkpoint store). The
demo produces the example's generated records and prints the results as they become
readable (read_committed: with exactly-once they appear at each checkpoint).

The demo owns its topics on the broker it is pointed at: each run deletes and recreates
them (and the job's consumer group), so every run starts from nothing. Event time runs at
60x: one wall-clock second is one minute of shop time, so a one-minute window closes
about every second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from weir import examples
from weir import kafka as kio
from weir.config import Environment, KafkaSecurityInputs
from weir.examples import Example, Record
from weir.graph import JobGraph, compile_job
from weir.spec import Job, load_job

__all__ = [
    "DEFAULT", "SOURCE_PARTITIONS", "SPEED", "TopicLayout", "documents", "jobs", "list_lines", "main",
    "message", "output_topic", "recreate", "topic_layout",
]

SPEED = 60
"""Shop time runs this many times faster than the wall clock."""
DEFAULT = "revenue"
"""The example ``weir demo`` runs without a NAME (``make demo``)."""
SEED = 7
SOURCE_PARTITIONS = 4
"""Partitions of each source topic: enough for the job's keyed stage to have several tasks."""
HISTORY_MS = 2 * 3_600_000
"""Shop time starts this long ago (aligned to a minute): windows then close by event time as
the records arrive, and idle partitions cannot close them early by the wall clock."""


@dataclass(frozen=True)
class TopicLayout:
    """How the demo (and the example tests) create one of a job's topics."""

    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def documents(example: Example) -> list[dict[str, Any]]:
    """The example's manifest documents: one job, or several chained through topics (one job's
    sink another's source), which `weir up` runs together."""
    text = example.manifest_path().read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d]


def jobs(example: Example) -> list[Job]:
    """The example's jobs, loaded (``SpecError`` names the field)."""
    return [load_job(orjson.dumps(d).decode()) for d in documents(example)]


def output_topic(plans: Sequence[JobGraph]) -> str:
    """Where the example's results are: the sink of the last job whose output no job reads."""
    read = {t for p in plans for t in p.source_topics}
    final = [p.sink_topic for p in plans if p.sink_topic not in read]
    return (final or [plans[-1].sink_topic])[-1]


def topic_layout(
    plans: JobGraph | Sequence[JobGraph], compacted: Collection[str] = ()
) -> dict[str, TopicLayout]:
    """Every topic the jobs read or write, with its partitions and configuration: sources
    ``SOURCE_PARTITIONS``; join tables as many as the keyed stage's stream (a copartitioned
    join needs that), compacted when named in ``compacted``; a repartition topic as its keyBy
    says; sinks and dead-letter topics one (the demo prints results in order), unless another
    job reads the sink (then it is that job's source)."""
    topics: dict[str, TopicLayout] = {}
    for plan in [plans] if isinstance(plans, JobGraph) else plans:
        keyed = SOURCE_PARTITIONS
        if plan.repartition_topic:
            keyed = plan.repartition_partitions or SOURCE_PARTITIONS
        wanted = {t: TopicLayout(SOURCE_PARTITIONS) for t in plan.source_topics}
        for table in plan.table_topics:
            wanted[table] = TopicLayout(keyed, {"cleanup.policy": "compact"} if table in compacted else {})
        if plan.repartition_topic:
            wanted[plan.repartition_topic] = TopicLayout(keyed)
        wanted.setdefault(plan.sink_topic, TopicLayout(1))
        if plan.dead_letter_topic:
            wanted.setdefault(plan.dead_letter_topic, TopicLayout(1))
        for topic, layout in wanted.items():
            known = topics.get(topic)
            if known is not None:  # in two jobs: as many partitions as either wants
                partitions = max(known.partitions, layout.partitions)
                layout = TopicLayout(partitions, {**known.config, **layout.config})
            topics[topic] = layout
    return topics


def message(record: Record) -> tuple[bytes | None, bytes | None]:
    """A generated record's Kafka key and value: ``raw`` as is, a dict as JSON, None a tombstone."""
    key = None if record.key is None else record.key.encode()
    if record.raw is not None:
        return key, record.raw
    return key, None if record.value is None else orjson.dumps(record.value)


def list_lines() -> list[str]:
    """``weir demo --list``: each example's name and summary, one line each."""
    found = examples.examples()
    width = max((len(e.name) for e in found), default=0)
    return [f"{e.name:<{width}}  {e.summary}" for e in found]


def main(
    bootstrap: str,
    duration: float,
    rate: int,
    security: KafkaSecurityInputs | None = None,
    name: str | None = None,
) -> int:
    """Run the example ``name`` (default ``DEFAULT``) against ``bootstrap``; ``security``
    (``weir demo``'s flags) overrides the environment's Kafka security settings, for the demo's
    own clients and its worker alike. Exit codes: 2 for an unknown name, 3 without a broker, 4
    when it refuses the credentials, else `weir up`'s."""
    try:
        example = examples.example(name or DEFAULT)
    except KeyError as exc:
        print(f"weir demo: {exc.args[0]}", file=sys.stderr)
        return 2
    loaded = jobs(example)
    plans = [compile_job(job) for job in loaded]
    sink = output_topic(plans)
    flags = security or KafkaSecurityInputs()
    kafka = kio.KafkaSettings(
        bootstrap_servers=bootstrap,
        consumer={},
        # The generator's records go where the job's own producer would put their keys.
        producer={k: v for k, v in loaded[0].spec.kafka.producer.items() if k == "partitioner"},
        connect_timeout_s=20,
        security=kio.security(loaded[0].spec.kafka, flags, Environment.read().kafka_security),
    )
    try:
        admin = kio.admin(kafka)
        kio.wait_for_broker(admin, kafka)
    except kio.KafkaUnavailable as exc:
        print(f"{exc}\nStart the dev broker with `make services-up`, or use `make demo`.")
        return 3
    except kio.KafkaAuthFailed as exc:
        print(exc)
        return 4
    recreate(admin, topic_layout(plans, example.table_topics), [p.group_id for p in plans])
    written = {t for p in plans for t in (p.sink_topic, p.repartition_topic)}
    inputs = ", ".join(
        f"'{t}'" for t in dict.fromkeys(t for p in plans for t in (*p.source_topics, *p.table_topics))
        if t not in written
    )
    print(
        f"weir demo {example.name}: {example.summary}.\n"
        f"{rate} records/s into {inputs} at {SPEED}x shop time (a minute a second); results from "
        f"'{sink}' as they are committed. Ctrl-C stops.\n"
    )
    for line in example.notes:
        print(f"  {line}")
    if example.notes:
        print()
    print(example.header)

    def show(r: dict[str, Any]) -> None:
        print(example.show(r), flush=True)

    stop = threading.Event()
    counts: dict[str, int] = {}
    step_ms = max(1, round(SPEED * 1000 / rate))
    generator = threading.Thread(
        target=_produce, args=(kafka, example, rate, step_ms, stop, counts), daemon=True
    )
    done = threading.Event()
    follower = threading.Thread(
        target=_follow, args=(kafka, sink, show, done, counts), daemon=True
    )
    with tempfile.TemporaryDirectory(prefix="weir-demo-") as state:
        command = [
            sys.executable, "-m", "weir", "up", str(example.manifest_path()),
            "--bootstrap-servers", bootstrap, "--state-dir", state,
            "--duration", f"{duration:g}", "--interval", "15", "--log-level", "WARNING",
        ]
        generator.start()
        follower.start()
        # The worker (a `weir run` under `weir up`) reads the same settings from its environment.
        up = subprocess.Popen(command, env={**os.environ, **flags.environment()})
        try:
            code = up.wait()
        except KeyboardInterrupt:  # the child has the same Ctrl-C: it savepoints and stops
            code = up.wait()
        finally:
            stop.set()
            generator.join(15)
            time.sleep(1.0)  # the last results were committed by the stop-savepoint
            done.set()
            follower.join(15)
    dead_letters = list(dict.fromkeys(p.dead_letter_topic for p in plans if p.dead_letter_topic))
    dead = sum(_count(kafka, t) for t in dead_letters)
    print(
        f"\n{counts.get('records', 0)} records produced, {counts.get('results', 0)} results read; "
        f"{dead} records dead-lettered (in {', '.join(repr(t) for t in dead_letters)}, each with its reason "
        "in the headers)."
    )
    return code


def recreate(admin: AdminClient, topics: dict[str, TopicLayout], groups: Sequence[str]) -> None:
    """Start from nothing: each of ``topics`` deleted if it exists and created empty with its
    layout, and the consumer ``groups`` gone."""
    for group in groups:
        try:
            for f in admin.delete_consumer_groups([group], request_timeout=10).values():
                f.result(timeout=10)
        except Exception:  # noqa: BLE001 - the group does not exist on a first run
            pass
    kio.recreate_topics(admin, {t: layout.partitions for t, layout in topics.items()})
    configured = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            topic,
            incremental_configs=[ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                                 for k, v in layout.config.items()],
        )
        for topic, layout in topics.items()
        if layout.config
    ]
    if configured:
        # Set while the topics are still empty: a table is compacted before its first record.
        for f in admin.incremental_alter_configs(configured).values():
            f.result(timeout=30)


def _produce(
    kafka: kio.KafkaSettings, example: Example, rate: int, step_ms: int, stop: threading.Event,
    counts: dict[str, int],
) -> None:
    """The example's records at ``rate`` per second, its clock starting ``HISTORY_MS`` ago and
    moving ``step_ms`` per record (``SPEED`` times the wall clock at the default rate)."""
    producer: Producer = kio.new_producer({**kio.client_config(kafka), **kafka.producer, "linger.ms": 20})
    origin_wall = time.time()
    origin_shop = (int(origin_wall * 1000) - HISTORY_MS) // 60_000 * 60_000
    records: Iterator[Record] = example.generate(SEED, origin_shop, step_ms)
    sent = 0
    while not stop.is_set():
        due = int((time.time() - origin_wall) * rate)
        while sent < due:
            record = next(records)
            key, value = message(record)
            _send(producer, record, key, value)
            sent += 1
            if sent % 1000 == 0:
                producer.poll(0)
        time.sleep(0.01)
    producer.flush(10)
    counts["records"] = sent


def _send(producer: Producer, record: Record, key: bytes | None, value: bytes | None) -> None:
    # librdkafka's "none": -1 lets the partitioner choose, 0 stamps the record with the time now.
    partition = -1 if record.partition is None else record.partition
    stamp = record.timestamp or 0
    while True:
        try:
            producer.produce(record.topic, value, key, partition=partition, timestamp=stamp)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.1)


def _consumer(kafka: kio.KafkaSettings) -> Consumer:
    return kio.new_consumer(
        {
            **kio.client_config(kafka),
            "group.id": f"weir-demo-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )


def _follow(
    kafka: kio.KafkaSettings,
    topic: str,
    show: Callable[[dict[str, Any]], None],
    done: threading.Event,
    counts: dict[str, int],
) -> None:
    """Print each result as soon as it is committed; window results each batch in ``reading_order``."""
    consumer = _consumer(kafka)
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while not done.is_set():
            batch = [
                orjson.loads(value)
                for m in consumer.consume(500, timeout=0.2)
                if m.error() is None and (value := m.value()) is not None
            ]
            if all("windowStartMs" in r for r in batch):
                batch.sort(key=reading_order)
            for result in batch:
                show(result)
            counts["results"] = counts.get("results", 0) + len(batch)
    finally:
        consumer.close()


def reading_order(result: dict[str, Any]) -> tuple[Any, ...]:
    """A window result's place: by window start, then key, numbers in keys in numeric order (p-2
    before p-10). A checkpoint commits every keyed task's results at once, task after task:
    printed as written, the minutes would go back and forth."""
    key = str(result.get("key", ""))
    natural = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _DIGITS.split(key))
    return (result["windowStartMs"], natural)


_DIGITS = re.compile(r"(\d+)")


def _count(kafka: kio.KafkaSettings, topic: str, timeout_s: float = 10.0) -> int:
    """Committed records in ``topic`` (read to its end: offsets would count transaction markers)."""
    consumer = kio.new_consumer(
        {
            **kio.client_config(kafka),
            "group.id": f"weir-demo-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending, count = set(partitions), 0
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in consumer.consume(500, timeout=0.2):
                error = m.error()
                if error is None:
                    count += 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
        return count
    except (KafkaException, KeyError):
        return 0
    finally:
        consumer.close()
