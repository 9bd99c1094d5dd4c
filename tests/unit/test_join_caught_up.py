"""When a partition counts as read to its end (``KafkaEdges.caught_up``, what idleness needs),
with a hand-written consumer: a partition written by a transactional producer (a weir job's
output: the enrichment example's chained topic) ends in commit markers, past the last record's
offset, and must still count as caught up once the consumer is past them."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from weir.kafka_io import KafkaEdges
from weir.tasks import Task


class Consumer:
    """The two calls ``caught_up`` makes: the cached watermark offsets and the position."""

    def __init__(self, low: int, high: int, position: int) -> None:
        self.low, self.high, self.at = low, high, position

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return self.low, self.high

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.at) for tp in tps]


def edges(consumer: Any) -> KafkaEdges:
    made = KafkaEdges.__new__(KafkaEdges)  # no clients: only the consumer is used
    made.consumer = consumer
    return made


def task(next_offset: int) -> Task:
    t = Task("enriched", 0, "enriched-0")
    t.next_offset = next_offset
    return t


def test_a_partition_ending_in_commit_markers_is_caught_up_once_the_consumer_is_past_them() -> None:
    # Records at 0..9, a commit marker at 10: the high watermark is 11, the next record 10.
    assert edges(Consumer(0, 11, position=11)).caught_up(task(10))


def test_a_partition_with_records_after_the_consumers_position_is_not_caught_up() -> None:
    assert not edges(Consumer(0, 12, position=10)).caught_up(task(10))
    assert not edges(Consumer(0, 12, position=11)).caught_up(task(10))
