"""The test servers are the real thing: Kafka transactions and group offsets, S3 multipart."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from harness.common import wait_until
from harness.kafka import KafkaHelper
from harness.s3 import S3Helper


def _transactional_producer(kafka: KafkaHelper) -> Producer:
    producer = Producer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "transactional.id": kafka.unique("txn"),
            "enable.idempotence": True,
        }
    )
    producer.init_transactions(30)
    return producer


@pytest.mark.kafka
def test_an_aborted_transaction_stays_invisible_to_a_read_committed_reader(kafka: KafkaHelper) -> None:
    topic = kafka.create_topic(partitions=4)
    producer = _transactional_producer(kafka)

    producer.begin_transaction()
    for i in range(40):
        producer.produce(topic, f"committed-{i}".encode(), partition=i % 4)
    producer.commit_transaction(30)

    producer.begin_transaction()
    for i in range(40):
        producer.produce(topic, f"aborted-{i}".encode(), partition=i % 4)
    producer.flush(30)
    producer.abort_transaction(30)

    committed = kafka.read_all(topic, isolation="read_committed")
    uncommitted = kafka.read_all(topic, isolation="read_uncommitted")

    assert sorted(m.value for m in committed) == sorted(f"committed-{i}".encode() for i in range(40))
    assert {m.partition for m in committed} == {0, 1, 2, 3}
    # The aborted records really reached the log: only the isolation level hides them.
    assert sum(1 for m in uncommitted if m.value and m.value.startswith(b"aborted-")) == 40


@pytest.mark.kafka
def test_offsets_sent_with_a_transaction_become_the_groups_committed_offsets(kafka: KafkaHelper) -> None:
    source = kafka.create_topic(partitions=4)
    sink = kafka.create_topic(partitions=1)
    kafka.produce(source, ({"value": f"v{i}".encode(), "partition": i % 4} for i in range(100)))
    group = kafka.unique("group")

    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(source, p, 0) for p in range(4)])
    producer = _transactional_producer(kafka)
    consumed: dict[int, int] = {}
    while sum(consumed.values()) < 60:
        for msg in consumer.consume(100, timeout=1.0):
            assert msg.error() is None
            if sum(consumed.values()) >= 60:
                break
            consumed[msg.partition()] = consumed.get(msg.partition(), 0) + 1

    producer.begin_transaction()
    producer.produce(sink, b"result")
    positions = [TopicPartition(source, p, consumed.get(p, 0)) for p in range(4)]
    producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata(), 30)
    producer.commit_transaction(30)
    consumer.close()

    expected = {p: consumed.get(p, 0) for p in range(4)}
    # The commit marker reaches __consumer_offsets asynchronously: the offsets become the
    # group's committed offsets a moment after commit_transaction returns.
    wait_until(lambda: kafka.committed(group, source) == expected, 15, "transactional offsets")
    committed = kafka.committed(group, source)
    ends = kafka.end_offsets(source)
    assert committed == expected
    assert ends == {p: 25 for p in range(4)}
    lag = {p: ends[p] - committed[p] for p in range(4)}
    assert sum(lag.values()) == 40
    assert [m.value for m in kafka.read_all(sink)] == [b"result"]


@pytest.mark.s3
def test_a_20_mb_multipart_upload_reads_back_with_the_same_checksum(s3: S3Helper) -> None:
    from boto3.s3.transfer import TransferConfig

    payload = os.urandom(20 * 1024 * 1024)
    client = s3.client()
    config = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    client.upload_fileobj(io.BytesIO(payload), s3.bucket, "big/object.bin", Config=config)

    head = client.head_object(Bucket=s3.bucket, Key="big/object.bin")
    # A multipart ETag is "<md5 of the part md5s>-<parts>": proof the upload went in 4 parts.
    assert head["ETag"].strip('"').endswith("-4")
    assert head["ContentLength"] == len(payload)
    body = client.get_object(Bucket=s3.bucket, Key="big/object.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
