"""The native reader (``weir_native.Fetch``) against the real broker: it reads exactly the
records confluent-kafka's ``Consumer.consume`` reads (every field, in partition order, none
lost or doubled, transactional markers and aborted records skipped under read_committed), the
consumer keeps serving its own calls, and misuse raises instead of crashing the process."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from harness.kafka import KafkaHelper
from weir import kafka as kio
from weir import native

pytestmark = pytest.mark.kafka

if native.weir_native is None or not hasattr(native.weir_native, "Fetch"):
    pytest.skip("the native extension is not built (make setup builds it)", allow_module_level=True)

Row = tuple[str, int, int, bytes | None, bytes | None, int]


def _consumer(kafka: KafkaHelper, **extra: Any) -> Consumer:
    config = kio.consumer_config(kio.KafkaSettings(kafka.bootstrap, {}, {}), kafka.unique("g"), "earliest")
    return Consumer({**config, **extra})


def _records(kafka: KafkaHelper, topic: str, partitions: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(3000):
        record: dict[str, Any] = {"partition": i % partitions, "timestamp": 1_700_000_000_000 + i}
        record["value"] = None if i % 97 == 0 else f'{{"i": {i}, "s": "{"x" * (i % 50)}"}}'.encode()
        if i % 89 != 0:
            record["key"] = f"k{i % 13}".encode()
        out.append(record)
    return out


def _read_python(consumer: Consumer, topic: str, partitions: int, total: int) -> list[Row]:
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    rows: list[Row] = []
    deadline = time.monotonic() + 60
    while len(rows) < total and time.monotonic() < deadline:
        for m in consumer.consume(500, 0.5):
            assert m.error() is None, m.error()
            rows.append((m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]))
    return rows


def _read_native(fetch: Any, total: int, batch: int = 500) -> tuple[list[Row], int]:
    rows: list[Row] = []
    batches = 0
    deadline = time.monotonic() + 60
    while len(rows) < total and time.monotonic() < deadline:
        groups, errors = fetch.consume(batch, 500)
        assert errors == []
        fetched = native.Fetched(fetch, groups)
        for g, (topic, partition, count, last) in enumerate(groups):
            records = fetched.records(g)
            assert len(records) == count and records[-1].offset() == last
            assert [r.offset() for r in records] == sorted(r.offset() for r in records)
            for r in records:
                assert (r.topic(), r.partition(), r.error()) == (topic, partition, None)
                rows.append((r.topic(), r.partition(), r.offset(), r.key(), r.value(), r.timestamp()[1]))
        batches += bool(groups)
    return rows, batches


def _by_partition(rows: list[Row]) -> dict[int, list[Row]]:
    out: dict[int, list[Row]] = {}
    for row in rows:
        out.setdefault(row[1], []).append(row)
    return out


def test_reads_what_confluent_kafka_reads(kafka: KafkaHelper) -> None:
    topic = kafka.create_topic(partitions=3)
    produced = _records(kafka, topic, 3)
    kafka.produce(topic, produced)
    expected = _read_python(_consumer(kafka), topic, 3, len(produced))
    assert len(expected) == len(produced)

    consumer = _consumer(kafka)
    fetch = native.weir_native.Fetch(consumer)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
    fetch.route([(topic, p) for p in range(3)])
    got, batches = _read_native(fetch, len(produced), batch=500)
    # Nothing reached the consumer's own queue after routing, and nothing more is there.
    leftover = consumer.consume(1000, 0.5)
    early = [(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]) for m in leftover]
    assert _by_partition(early + got) == _by_partition(expected)
    assert len(early) + len(got) == len(produced)
    assert batches >= len(produced) // 500  # batches of at most 500

    # The consumer's position follows what the native reader handed out.
    positions = consumer.position([TopicPartition(topic, p) for p in range(3)])
    ends = kafka.end_offsets(topic)
    assert {tp.partition: tp.offset for tp in positions} == ends

    fetch.close()
    fetch.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        fetch.consume(10, 0)
    consumer.close()


def test_read_committed_skips_aborted_and_markers(kafka: KafkaHelper) -> None:
    topic = kafka.create_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": kafka.unique("tx")})
    producer.init_transactions(30)
    for n, commit in enumerate([True, False, True]):
        producer.begin_transaction()
        for i in range(50):
            producer.produce(topic, value=f"{n}-{i}".encode(), key=b"k", partition=i % 2)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
    consumer = _consumer(kafka)
    fetch = native.weir_native.Fetch(consumer)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(2)])
    fetch.route([(topic, 0), (topic, 1)])
    got, _ = _read_native(fetch, 100)
    assert sorted(r[4] for r in got) == sorted(f"{n}-{i}".encode() for n in (0, 2) for i in range(50))  # type: ignore[type-var]
    time.sleep(0.5)
    more, _ = fetch.consume(100, 200)
    assert more == []
    fetch.close()
    consumer.close()


def test_records_that_reached_the_consumer_queue_first_come_back_there(kafka: KafkaHelper) -> None:
    """A partition routed after records were consumed into the consumer's queue: those records
    are still the consumer's to hand out, and the native reader continues after them."""
    topic = kafka.create_topic(partitions=1)
    kafka.produce(topic, [{"value": f"{i}".encode(), "partition": 0} for i in range(200)])
    consumer = _consumer(kafka)
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    first = consumer.consume(10, 10)
    assert first and first[0].offset() == 0
    fetch = native.weir_native.Fetch(consumer)
    fetch.route([(topic, 0)])
    leftover = consumer.consume(1000, 0.5)
    got, _ = _read_native(fetch, 200 - len(first) - len(leftover))
    offsets = [m.offset() for m in first + leftover] + [r[2] for r in got]
    assert offsets == list(range(200))
    fetch.close()
    consumer.close()


def test_misuse_raises_instead_of_crashing(kafka: KafkaHelper) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    with pytest.raises(RuntimeError, match="unexpected librdkafka handle"):
        native.weir_native.Fetch(producer)
    with pytest.raises(RuntimeError, match="not a confluent-kafka consumer"):
        native.weir_native.Fetch(object())
    consumer = _consumer(kafka)
    fetch = native.weir_native.Fetch(consumer)
    consumer.close()  # before the reader: its calls now raise, and closing it is harmless
    with pytest.raises(RuntimeError, match="consumer was closed"):
        fetch.consume(10, 0)
    fetch.close()
    closed = _consumer(kafka)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        native.weir_native.Fetch(closed)


def test_a_batch_smaller_than_asked_for_comes_back_when_it_is_there_not_at_the_timeout(
    kafka: KafkaHelper,
) -> None:
    """``rd_kafka_consume_batch_queue`` alone waits for ``max`` records or the whole timeout: the
    records that end a burst (or the few of a quiet stream) would wait out the timeout. The
    reader takes what is there, and when nothing is, waits only for the first record."""
    topic = kafka.create_topic(partitions=2)
    kafka.produce(topic, [{"value": f"{i}".encode(), "partition": i % 2} for i in range(7)])
    consumer = _consumer(kafka)
    fetch = native.weir_native.Fetch(consumer)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(2)])
    fetch.route([(topic, 0), (topic, 1)])
    timeout_ms = 30_000
    started = time.monotonic()
    got, calls = 0, 0
    while got < 7:
        groups, errors = fetch.consume(5000, timeout_ms)
        assert errors == []
        got += sum(count for _t, _p, count, _last in groups)
        calls += 1
        assert time.monotonic() - started < timeout_ms / 1000 / 2, "a partial batch waited out the timeout"
    assert got == 7

    # Nothing queued: the call waits for the first record, then takes what came with it.
    later = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 50})

    def produce_later() -> None:
        time.sleep(0.5)
        for i in range(5):
            later.produce(topic, value=f"late-{i}".encode(), partition=0)
        later.flush(10)

    thread = threading.Thread(target=produce_later)
    started = time.monotonic()
    thread.start()
    late = 0
    while late < 5:
        groups, errors = fetch.consume(5000, timeout_ms)
        late += sum(count for _t, _p, count, _last in groups)
        assert time.monotonic() - started < timeout_ms / 1000 / 2, "a partial batch waited out the timeout"
    thread.join()
    assert late == 5
    fetch.close()
    consumer.close()
