"""``KafkaEdges.assign`` with a hand-written consumer: partitions that start at a logical offset
(earliest, latest) get their topic's metadata asked for first, so librdkafka resolves the offset
at once instead of at its next metadata refresh (a fresh start sat idle for about a second); a
broker that does not answer does not stop the assignment."""

from __future__ import annotations

from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from weir.kafka_io import KafkaEdges
from weir.tasks import Task


class Consumer:
    def __init__(self, metadata_fails: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.metadata_fails = metadata_fails

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> None:
        self.calls.append(("list_topics", topic))
        if self.metadata_fails:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))

    def assign(self, tps: list[TopicPartition]) -> None:
        self.calls.append(("assign", sorted((tp.topic, tp.partition, tp.offset) for tp in tps)))


def edges(consumer: Consumer) -> KafkaEdges:
    made = KafkaEdges.__new__(KafkaEdges)  # no clients: only the consumer is used
    made.consumer = consumer
    made.fetch = None
    return made


def task(topic: str, partition: int, next_offset: int) -> Task:
    t = Task(topic, partition, f"{topic}-{partition}")
    t.next_offset = next_offset
    return t


def test_topics_starting_at_a_logical_offset_are_looked_up_once_each_before_the_assignment() -> None:
    consumer = Consumer()
    start = OFFSET_BEGINNING
    tasks = [task("b", 0, start), task("b", 1, start), task("a", 0, 17), task("c", 0, 5)]
    edges(consumer).assign(tasks)
    assert consumer.calls == [
        ("list_topics", "b"),
        ("assign", [("a", 0, 17), ("b", 0, OFFSET_BEGINNING), ("b", 1, OFFSET_BEGINNING), ("c", 0, 5)]),
    ]


def test_a_restore_at_concrete_offsets_asks_for_no_metadata() -> None:
    consumer = Consumer()
    edges(consumer).assign([task("a", 0, 0), task("a", 1, 42)])
    assert [c[0] for c in consumer.calls] == ["assign"]


def test_a_broker_that_does_not_answer_the_lookup_still_gets_the_assignment() -> None:
    consumer = Consumer(metadata_fails=True)
    edges(consumer).assign([task("a", 0, OFFSET_BEGINNING)])
    assert consumer.calls == [("list_topics", "a"), ("assign", [("a", 0, OFFSET_BEGINNING)])]
