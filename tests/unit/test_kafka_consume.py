"""``KafkaEdges._consume`` (the Python path's read) with a hand-written consumer that behaves
like librdkafka's ``consume(n, timeout)``: it returns when it has ``n`` records or when the
timeout has passed. The worker must not wait out the timeout for the records that end a burst
(exactly-once results would stay unreadable that much longer), nor for the first record of a
quiet stream beyond its arrival."""

from __future__ import annotations

from typing import Any

from weir.kafka_io import KafkaEdges
from weir.outages import Dependencies


class Message:
    def __init__(self, offset: int, error: Any = None) -> None:
        self._offset, self._error = offset, error

    def offset(self) -> int:
        return self._offset

    def error(self) -> Any:
        return self._error


class Consumer:
    """Records arrive at given (simulated) times; ``consume`` waits like librdkafka's does."""

    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = sorted(arrivals)
        self.now = 0.0
        self.next = 0
        self.calls: list[tuple[int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.calls.append((num_messages, timeout))
        deadline = self.now + timeout
        out: list[Message] = []
        while len(out) < num_messages and self.next < len(self.arrivals):
            at = self.arrivals[self.next]
            if at > deadline:
                break
            self.now = max(self.now, at)
            out.append(Message(self.next))
            self.next += 1
        if len(out) < num_messages:
            self.now = max(self.now, deadline)  # librdkafka waits out the rest of the timeout
        return out


class Waits:
    def __init__(self) -> None:
        self.deps = Dependencies()


def edges(consumer: Consumer) -> KafkaEdges:
    made = KafkaEdges.__new__(KafkaEdges)  # no clients: only the consumer is used
    made.consumer = consumer
    made.fetch = None
    made.waits = Waits()  # type: ignore[assignment]
    return made


def test_the_records_that_end_a_burst_come_back_at_once() -> None:
    consumer = Consumer([0.0] * 4)  # four records there, fewer than a batch
    got = edges(consumer)._consume(5000, 0.1)
    assert [m.offset() for m in got] == [0, 1, 2, 3]
    assert consumer.now == 0.0, "waited out the timeout for a batch that was never coming"


def test_a_quiet_stream_waits_for_its_first_record_only_then_takes_what_came_with_it() -> None:
    consumer = Consumer([0.03, 0.03, 0.03, 0.5])
    got = edges(consumer)._consume(5000, 0.1)
    assert [m.offset() for m in got] == [0, 1, 2]
    assert consumer.now == 0.03


def test_nothing_there_waits_the_timeout_and_returns_nothing() -> None:
    consumer = Consumer([0.5])
    assert edges(consumer)._consume(5000, 0.1) == []
    assert consumer.now == 0.1


def test_a_full_batch_is_one_call_and_a_zero_timeout_never_blocks() -> None:
    consumer = Consumer([0.0] * 12_000)
    got = edges(consumer)._consume(5000, 0.1)
    assert len(got) == 5000 and consumer.calls == [(5000, 0)]
    consumer.arrivals.append(9.0)
    assert len(edges(consumer)._consume(10_000, 0)) == 7000
    assert edges(consumer)._consume(10, 0) == [] and consumer.now == 0.0


def test_records_with_errors_are_left_out_of_the_batch() -> None:
    consumer = Consumer([0.0, 0.0])
    original = consumer.consume

    def consume(num_messages: int, timeout: float) -> list[Message]:
        msgs = original(num_messages, timeout)
        return [Message(m.offset(), _Err() if m.offset() == 0 else None) for m in msgs]

    consumer.consume = consume  # type: ignore[method-assign]
    got = edges(consumer)._consume(5000, 0.1)
    assert [m.offset() for m in got] == [1]


class _Err:
    def code(self) -> int:
        from confluent_kafka import KafkaError

        return KafkaError._PARTITION_EOF

    def fatal(self) -> bool:
        return False
