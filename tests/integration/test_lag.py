"""The operator's lag reader (``weir_operator.lag``) against the real broker."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from harness.kafka import KafkaHelper, Secured
from harness.up import wait as _wait
from harness.up import weir_up
from weir import spec
from weir_operator.lag import LagReader, input_topics

pytestmark = pytest.mark.kafka


def _job(name: str, kafka: KafkaHelper, source: str, sink: str, **source_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "local"},
        "spec": {
            "parallelism": 2,
            "kafka": {"bootstrapServers": kafka.bootstrap},
            "checkpoint": {"url": "file:///tmp/unused", "interval": "1s"},
            "pipeline": {
                "source": {"topics": [source], "eventTime": {"field": "ts"}, **source_extra},
                "watermark": {"maxOutOfOrderness": "1s", "idleTimeout": "1s"},
                "steps": [
                    {"keyBy": {"field": "g"}},
                    {"window": {"type": "tumbling", "size": "10s"}},
                    {"aggregate": {"emit": "final", "outputs": {"n": {"fn": "count"}}}},
                ],
                "sink": {"topic": sink},
                "deadLetter": {"topic": sink},
            },
        },
    }


def _produce(kafka: KafkaHelper, topic: str, partitions: int, count: int) -> None:
    start = 1_704_067_200_000
    kafka.produce(topic, [
        {"value": orjson.dumps({"ts": start + i * 100, "g": f"g{i % 5}"}), "key": f"k{i}".encode(),
         "partition": i % partitions}
        for i in range(count)
    ])


@pytest.mark.timeout(240)
def test_a_caught_up_exactly_once_job_reads_lag_zero_on_every_partition_though_markers_follow_its_offsets(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    name = "lag-" + kafka.unique("j")[-8:]
    source, sink = kafka.unique("src"), kafka.unique("out")
    kafka.create_topic(source, 4)
    kafka.create_topic(sink, 1)
    _produce(kafka, source, 4, 400)
    document = _job(name, kafka, source, sink)
    document["spec"]["checkpoint"]["url"] = (tmp_path / "store").as_uri()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    job = spec.parse_manifest(manifest)
    repartition = f"weir-local-{name}-0-repartition"
    assert input_topics(job) == [source, repartition]
    reader = LagReader({})
    state, log = tmp_path / "state", tmp_path / "up.log"

    with weir_up(manifest, state, kafka.bootstrap, log) as process:
        _wait(lambda: len(kafka.read_all(sink, timeout=5)) > 0, 120, "first windows", log)

        def caught_up() -> bool:
            reading = reader.read(job)
            assert reading.error is None, reading.error
            seen.append(reading)
            return len(reading.partitions) == 4 + 4 and reading.records == 0

        seen: list[Any] = []

        try:
            _wait(caught_up, 60, "lag 0 on every partition", log)
        except AssertionError:
            raise AssertionError(f"last reading: {seen[-1]}") from None
        reading = reader.read(job)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0

    assert {(p.topic, p.partition): p.lag for p in reading.partitions} == {
        (topic, p): 0 for topic in (source, repartition) for p in range(4)
    }
    # The repartition topic is written in transactions: its high watermark is past the committed
    # offsets (commit markers), which a naive "high watermark - committed" would count as lag.
    high = kafka.end_offsets(repartition)
    committed = kafka.committed(f"weir-local-{name}", repartition)
    assert any(high[p] > committed[p] for p in high), (high, committed)


def test_a_group_that_never_committed_reads_per_start_from(kafka: KafkaHelper) -> None:
    source, sink = kafka.unique("src"), kafka.unique("out")
    kafka.create_topic(source, 3)
    _produce(kafka, source, 3, 90)
    reader = LagReader({})

    earliest = spec.StreamJob.model_validate(_job("fresh-e-" + source[-6:], kafka, source, sink))
    latest = spec.StreamJob.model_validate(
        _job("fresh-l-" + source[-6:], kafka, source, sink, startFrom="latest"))

    early, late = reader.read(earliest), reader.read(latest)
    assert early.error is None and late.error is None
    # The repartition topic does not exist before the job first runs: only the source is read.
    assert {(p.topic, p.partition): (p.committed, p.lag) for p in early.partitions} == {
        (source, p): (None, 30) for p in range(3)
    }
    assert {(p.topic, p.partition): p.lag for p in late.partitions} == {(source, p): 0 for p in range(3)}
    assert [p.end_offset for p in late.partitions] == [30, 30, 30]


def test_a_committed_offset_below_the_log_start_counts_from_the_log_start(kafka: KafkaHelper) -> None:
    from confluent_kafka.admin import AdminClient

    source, sink = kafka.unique("src"), kafka.unique("out")
    kafka.create_topic(source, 1)
    _produce(kafka, source, 1, 50)
    job = spec.StreamJob.model_validate(_job("ret-" + source[-6:], kafka, source, sink))
    group = f"weir-local-{job.metadata.name}"
    committer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group,
                          "enable.auto.commit": False})
    try:
        committer.commit(offsets=[TopicPartition(source, 0, 5)], asynchronous=False)
    finally:
        committer.close()
    # Retention (here: an explicit delete) removes offsets 0..19 while the group sits at 5.
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for future in admin.delete_records([TopicPartition(source, 0, 20)]).values():
        future.result(timeout=30)

    deadline = time.monotonic() + 30
    while True:
        reading = LagReader({}).read(job)
        assert reading.error is None, reading.error
        if reading.partitions[0].lag == 30 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (partition,) = reading.partitions
    assert (partition.committed, partition.end_offset, partition.lag) == (5, 50, 30)


def test_an_unreachable_broker_is_a_reading_with_an_error_not_an_exception(kafka: KafkaHelper) -> None:
    document = _job("gone", kafka, "t", "o")
    document["spec"]["kafka"]["bootstrapServers"] = "127.0.0.1:1"
    reading = LagReader({}, timeout_s=2).read(spec.StreamJob.model_validate(document))

    assert reading.error is not None and reading.partitions == ()


def test_the_lag_reader_uses_the_operators_own_credentials_on_a_sasl_ssl_listener(
    kafka: KafkaHelper, kafka_secured: Secured
) -> None:
    source, sink = kafka.unique("src"), kafka.unique("out")
    kafka.create_topic(source, 2)
    _produce(kafka, source, 2, 20)
    document = _job("sec-" + source[-6:], kafka, source, sink)
    user = kafka_secured.users["SCRAM-SHA-512"]
    document["spec"]["kafka"] = {
        "bootstrapServers": kafka_secured.sasl_bootstrap,
        "sasl": {"mechanism": "SCRAM-SHA-512", "usernameSecret": {"name": "k", "key": "u"},
                 "passwordSecret": {"name": "k", "key": "p"}},
        "tls": {"caSecret": {"name": "ca", "key": "ca.crt"}},
    }
    job = spec.StreamJob.model_validate(document)
    env = {"WEIR_KAFKA_SASL_USERNAME": user.name, "WEIR_KAFKA_SASL_PASSWORD": user.password,
           "WEIR_KAFKA_SSL_CA_LOCATION": str(kafka_secured.tls.ca)}

    reading = LagReader(env).read(job)
    assert reading.error is None, reading.error
    assert [p.lag for p in reading.partitions] == [10, 10]

    wrong = LagReader({**env, "WEIR_KAFKA_SASL_PASSWORD": "not-the-password"}, timeout_s=5).read(job)
    assert wrong.error is not None and wrong.partitions == ()
    assert user.password not in wrong.error and "not-the-password" not in wrong.error


def test_a_second_reading_gives_each_partition_its_input_rate_and_lag_in_seconds(kafka: KafkaHelper) -> None:
    source, sink = kafka.unique("src"), kafka.unique("out")
    kafka.create_topic(source, 2)
    job = spec.StreamJob.model_validate(_job("rate-" + source[-6:], kafka, source, sink))
    reader = LagReader({})
    first = reader.read(job)
    assert [p.input_rate for p in first.partitions] == [None, None]  # nothing to compare with yet

    kafka.produce(source, [{"value": b"{}", "key": b"k", "partition": 1} for _ in range(500)])
    time.sleep(1)
    second = reader.read(job)

    by_partition = {p.partition: p for p in second.partitions}
    assert by_partition[0].input_rate == 0.0 and by_partition[0].lag_seconds == 0.0
    rate = by_partition[1].input_rate
    assert rate is not None and 500 / 30 < rate <= 500 / 0.9
    # Nobody processes the group's records: lag in seconds is unbounded, so unknown.
    assert by_partition[1].lag == 500 and by_partition[1].processing_rate == 0.0
    assert by_partition[1].lag_seconds is None
