"""One epoch of a worker's Kafka output: the transaction (exactly-once) or the batch of records
and offsets (at-least-once) that a checkpoint commits (``weir.commit.Transaction`` on librdkafka).

``KafkaEdges.begin`` (``weir.kafka_io``) opens one on the producer whose turn it is. Producing
waits out a full queue (back-pressure, never a drop), ``flush`` waits out an unreachable broker,
and ``commit`` retries what is retriable and raises ``Rollback`` for a transaction that can no
longer commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException, TopicPartition

from weir.commit import RETRY_CAP_S
from weir.edges import Offset, Rollback
from weir.kafka import fatal_rollback, kafka_error
from weir.outages import Backoff
from weir.tasks import Headers

if TYPE_CHECKING:
    from weir.kafka_io import KafkaEdges

__all__ = ["CALL_TIMEOUT_S", "KafkaTransaction"]

CALL_TIMEOUT_S = 10.0
"""Longest a single blocking Kafka call (init/commit a transaction, read offsets) may take before
the worker comes back to its loop: it must stay under the 60 s liveness window during an outage."""


class KafkaTransaction:
    """One epoch of output on one producer (see ``weir.commit.Transaction``)."""

    def __init__(self, edges: KafkaEdges, producer: Any) -> None:
        self.edges = edges
        self.producer = producer
        self._paused = 0.0
        self._attempt: threading.Thread | None = None
        self._attempt_deadline = 0.0
        self._attempt_outcome: list[BaseException | None] = []
        self._attempt_sent = False

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int = -1,
        headers: Headers | None = None,
    ) -> None:
        producer = self.producer
        while True:
            try:
                producer.produce(topic, value, key, partition, headers=headers)
                return
            except (KafkaException, SystemError) as exc:
                raise fatal_rollback("producing a result", exc) from exc
            except BufferError:
                # The producer's queue is full: back-pressure. Stop taking input until
                # deliveries make room; never drop and never crash. During an outage this is
                # where the worker waits: alive, status fresh, until delivery or rollback.
                self.edges.start.on_queue_full()
                self.edges.deliveries.poll(producer, 0.05)
                self.edges.check_delivery()
                now = time.monotonic()
                if now - self._paused >= 1.0:  # alive and status fresh, without a publish per retry
                    self._paused = now
                    self.edges.waits.pause(0)

    def flush(self) -> None:
        """At-least-once: wait until the output is acknowledged; while the broker is unreachable
        keep waiting (alive, not ready, status fresh) until the records are delivered or time
        out (then ``Rollback``). Exactly-once: only raise for what has failed already."""
        edges, deps = self.edges, self.edges.waits.deps
        if edges.start.guarantee == "exactly-once":
            # Nothing of the epoch is visible before its commit, and ``commit_transaction``
            # waits for every record itself (a refused one fails it): waiting here too would
            # only hold the snapshot back. The reports served so far still count.
            edges.deliveries.poll(self.producer)
            edges.check_delivery()
            return
        first_wait = CALL_TIMEOUT_S
        remaining = edges.deliveries.flush(self.producer, first_wait)
        waited = False
        while remaining:
            edges.check_delivery()
            if not waited:
                known = deps.reason()
                why = f"{remaining} records not acknowledged after {first_wait:.0f}s"
                deps.down("kafka", why + (f" ({known})" if known else ""))
                waited = True
            edges.waits.pause(0)
            remaining = edges.deliveries.flush(self.producer, 1.0)
        edges.check_delivery()
        if waited:
            deps.up("kafka")

    def start_commit(self, offsets: Sequence[Offset]) -> None:
        """Exactly-once: make the first attempt of ``commit`` on a helper thread (send the
        offsets, commit the transaction: two round trips to the coordinator, 10-50 ms), while
        the worker writes the next epoch on its other producer. ``commit`` waits for it and
        retries what failed, as if it had made the attempt itself."""
        if self.edges.start.guarantee != "exactly-once" or self._attempt is not None:
            return
        tps = _partitions(offsets)
        producer, group = self.producer, self.edges.consumer.consumer_group_metadata()
        outcome = self._attempt_outcome

        def attempt() -> None:
            try:
                if tps:
                    producer.send_offsets_to_transaction(tps, group, CALL_TIMEOUT_S)
                self._attempt_sent = True
                producer.commit_transaction(CALL_TIMEOUT_S)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to ``commit``
                outcome.append(exc)

        # Each call is bounded like ``KafkaEdges.bounded`` bounds it (librdkafka#5456).
        self._attempt_deadline = time.monotonic() + 2 * (CALL_TIMEOUT_S + 10.0)
        self._attempt = threading.Thread(target=attempt, name="weir-kafka-commit", daemon=True)
        self._attempt.start()

    def committing(self) -> bool:
        attempt = self._attempt
        return attempt is not None and attempt.is_alive() and time.monotonic() < self._attempt_deadline

    def _finish_attempt(self) -> tuple[bool, BaseException | None]:
        """Wait for the attempt ``start_commit`` made: (offsets sent, its error or None)."""
        attempt, self._attempt = self._attempt, None
        assert attempt is not None
        while attempt.is_alive():
            if time.monotonic() >= self._attempt_deadline:
                raise Rollback(
                    "committing a checkpoint's transaction: no answer from Kafka within "
                    f"{2 * (CALL_TIMEOUT_S + 10.0):.0f}s"
                )
            attempt.join(0.2)
            if attempt.is_alive():
                self.edges.waits.pause(0)
        return self._attempt_sent, self._attempt_outcome[0]

    def commit(self, offsets: Sequence[Offset]) -> None:
        """Exactly-once: commit the transaction with the offsets, retrying while the broker is
        unreachable. At-least-once: commit the offsets (the output was flushed already).

        Retriable failures (a timeout, no coordinator) are retried with back-off; a transaction
        that can no longer commit (aborted by the broker after ``transaction.timeout.ms``,
        fenced, a fatal producer error) raises ``Rollback``: its output is dropped and produced
        again from the last committed state, so nothing is lost or duplicated."""
        edges, deps = self.edges, self.edges.waits.deps
        tps = _partitions(offsets)
        if edges.start.guarantee != "exactly-once":
            if tps:
                try:
                    edges.consumer.commit(offsets=tps, asynchronous=False)
                except KafkaException as exc:
                    # The next checkpoint commits them; an outage shows once, not per checkpoint.
                    deps.down("kafka", f"committing offsets: {kafka_error(exc)[1]}")
            return
        backoff = Backoff(0.5, RETRY_CAP_S)
        offsets_sent = not tps
        producer, group = self.producer, edges.consumer.consumer_group_metadata()
        what = "committing a checkpoint's transaction"

        def send_offsets() -> None:
            producer.send_offsets_to_transaction(tps, group, CALL_TIMEOUT_S)

        def commit() -> None:
            producer.commit_transaction(CALL_TIMEOUT_S)

        started = self._finish_attempt() if self._attempt is not None else None
        while True:
            try:
                if started is not None:  # the attempt start_commit made
                    sent, error = started
                    started = None
                    offsets_sent = offsets_sent or sent
                    if error is not None:
                        raise error
                else:
                    if not offsets_sent:
                        edges.bounded(what, send_offsets)
                        offsets_sent = True
                    edges.bounded(what, commit)
                if tps:
                    deps.up("kafka")
                return
            except (KafkaException, SystemError) as exc:  # SystemError: see Deliveries.poll
                err, detail = kafka_error(exc)
                text = f"{what}: {detail}" + (f" ({err.name()})" if err is not None else "")
                if err is None or err.fatal() or err.txn_requires_abort() or not err.retriable():
                    # A record Kafka refused for good (its report served here, if not yet) stops
                    # the worker (``DeliveryFailed``): a rollback would produce it again, forever.
                    edges.deliveries.poll(producer)
                    edges.check_delivery()
                    raise Rollback(f"the transaction cannot commit: {text}") from exc
                deps.down("kafka", text)
                # Retried only once the broker answers again: a retry made while it is down can
                # block past its timeout (librdkafka#5456).
                while True:
                    edges.waits.pause(backoff.next())
                    edges.check_delivery()
                    if edges.probe():
                        break


def _partitions(offsets: Sequence[Offset]) -> list[TopicPartition]:
    return [TopicPartition(o.topic, o.partition, o.offset, metadata=o.metadata) for o in offsets]
