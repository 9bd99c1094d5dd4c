"""The exactly-once commit of a Kafka transaction begun in the background (``start_commit``):
what ``commit`` does with the attempt's answer, on hand-written fakes of the producer and the
worker's edges. The broker-backed behaviour is in tests/integration (test_exactly_once,
test_outages)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from tests.unit.test_outages import FakeMessage

from weir import kafka_txn
from weir.edges import DeliveryFailed, Offset, Rollback
from weir.kafka import Deliveries
from weir.kafka_txn import KafkaTransaction

OFFSETS = [Offset("in", 0, 42, "checkpoint:1-w0")]


class Producer:
    """Answers each call from a script of outcomes (None = success, an exception = raised);
    ``gate`` holds the first commit until it is set."""

    def __init__(self, sends: list[Any] | None = None, commits: list[Any] | None = None) -> None:
        self.sends = list(sends or [])
        self.commits = list(commits or [])
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.reports: list[tuple[Any, Any]] = []  # failed deliveries, served by ``poll``
        self.on_delivery: Any = None
        self.raises: Exception | None = None  # raised once by the next poll, flush or produce

    def _raise(self) -> None:
        raises, self.raises = self.raises, None
        if raises is not None:
            raise raises

    def poll(self, timeout: float) -> int:
        self.calls.append("poll")
        self._raise()
        reports, self.reports = self.reports, []
        for err, msg in reports:
            self.on_delivery(err, msg)
        return len(reports)

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        self._raise()
        return 0

    def produce(self, topic: str, value: Any, key: Any, partition: int, headers: Any = None) -> None:
        self.calls.append("produce")
        self._raise()

    def send_offsets_to_transaction(self, tps: list[Any], group: Any, timeout: float) -> None:
        self.calls.append(f"send {[(tp.topic, tp.partition, tp.offset) for tp in tps]}")
        outcome = self.sends.pop(0) if self.sends else None
        if outcome is not None:
            raise outcome

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        self.gate.wait(30)
        outcome = self.commits.pop(0) if self.commits else None
        if outcome is not None:
            raise outcome


class Deps:
    def __init__(self) -> None:
        self.events: list[str] = []

    def down(self, name: str, error: str) -> bool:
        self.events.append(f"down {name}")
        return True

    def up(self, name: str) -> None:
        self.events.append(f"up {name}")


class Edges:
    """What a transaction uses of ``KafkaEdges``."""

    def __init__(self) -> None:
        self.start = type("Start", (), {"guarantee": "exactly-once"})()
        self.consumer = type("Consumer", (), {"consumer_group_metadata": lambda _self: "group"})()
        self.deps = Deps()
        self.pauses = 0
        self.waits = type("Waits", (), {"deps": self.deps, "pause": self._pause})()
        self.deliveries = Deliveries()

    def _pause(self, seconds: float) -> None:
        self.pauses += 1

    def bounded(self, what: str, call: Any) -> Any:
        return call()

    def check_delivery(self) -> None:
        self.deliveries.check()

    def probe(self) -> bool:
        return True


def retriable() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))


def fatal() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))


def abortable() -> KafkaException:
    return KafkaException(
        KafkaError(KafkaError._STATE, "transaction must be aborted", txn_requires_abort=True)
    )


def raising(exc: Exception, guarantee: str = "exactly-once") -> KafkaTransaction:
    """A transaction whose producer raises ``exc`` from its next poll, flush or produce."""
    producer = Producer()
    producer.raises = exc
    edges = Edges()
    edges.start.guarantee = guarantee
    return KafkaTransaction(edges, producer)  # type: ignore[arg-type]


def begun(producer: Producer) -> tuple[KafkaTransaction, Edges]:
    edges = Edges()
    producer.on_delivery = edges.deliveries.on_delivery
    txn = KafkaTransaction(edges, producer)  # type: ignore[arg-type]
    txn.start_commit(OFFSETS)
    return txn, edges


def wait_answered(txn: KafkaTransaction) -> None:
    deadline = time.monotonic() + 10
    while txn.committing():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_the_background_attempt_commits_once_and_commit_only_collects_its_answer() -> None:
    producer = Producer()
    producer.gate.clear()
    txn, edges = begun(producer)
    time.sleep(0.05)
    assert txn.committing()  # the broker has not answered: the worker goes on meanwhile
    producer.gate.set()
    wait_answered(txn)
    txn.commit(OFFSETS)
    assert producer.calls == ["send [('in', 0, 42)]", "commit"]
    assert edges.deps.events == ["up kafka"]


def test_commit_waits_for_an_attempt_still_running_keeping_the_worker_alive() -> None:
    producer = Producer()
    producer.gate.clear()
    txn, edges = begun(producer)
    threading.Timer(0.5, producer.gate.set).start()
    txn.commit(OFFSETS)
    assert producer.calls == ["send [('in', 0, 42)]", "commit"]
    assert edges.pauses >= 1  # alive and /status fresh while it waited


def test_a_retriable_commit_failure_is_retried_without_sending_the_offsets_again() -> None:
    producer = Producer(commits=[retriable()])
    txn, edges = begun(producer)
    wait_answered(txn)
    txn.commit(OFFSETS)
    assert producer.calls == ["send [('in', 0, 42)]", "commit", "commit"]
    assert edges.deps.events == ["down kafka", "up kafka"]


def test_offsets_that_failed_to_send_are_sent_again_before_the_retry() -> None:
    producer = Producer(sends=[retriable()])
    txn, _edges = begun(producer)
    wait_answered(txn)
    txn.commit(OFFSETS)
    assert producer.calls == ["send [('in', 0, 42)]", "send [('in', 0, 42)]", "commit"]


def test_a_transaction_that_cannot_commit_rolls_back() -> None:
    producer = Producer(commits=[fatal()])
    txn, _edges = begun(producer)
    wait_answered(txn)
    with pytest.raises(Rollback, match="cannot commit"):
        txn.commit(OFFSETS)
    assert producer.calls == ["send [('in', 0, 42)]", "commit", "poll"]  # poll: a refusal's report


def test_a_fenced_producer_rolls_back_even_when_its_poll_raises_the_fatal_error() -> None:
    # confluent-kafka raises a fatal error from the first poll after it (not via error_cb): the
    # commit's poll for refusals met it and the worker exited with the KafkaException (a CI run).
    producer = Producer(commits=[fatal()])
    producer.raises = fatal()
    txn, _edges = begun(producer)
    wait_answered(txn)
    with pytest.raises(Rollback, match="fenced"):
        txn.commit(OFFSETS)


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_a_fatal_error_met_by_the_checkpoint_flush_rolls_back(guarantee: str) -> None:
    with pytest.raises(Rollback, match="fatal: fenced"):
        raising(fatal(), guarantee).flush()


def test_the_exactly_once_checkpoint_leaves_waiting_for_acknowledgements_to_the_commit() -> None:
    # Nothing of the epoch is visible before the commit, which waits for every record itself.
    producer = Producer()
    edges = Edges()
    txn = KafkaTransaction(edges, producer)  # type: ignore[arg-type]
    txn.flush()
    assert producer.calls == ["poll"]
    edges.start.guarantee = "at-least-once"  # there the flush is what makes the output durable
    txn.flush()
    assert producer.calls == ["poll", "flush"]


def test_the_exactly_once_checkpoint_still_raises_for_a_failure_already_reported() -> None:
    producer = Producer()
    producer.reports.append((KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), FakeMessage()))
    edges = Edges()
    producer.on_delivery = edges.deliveries.on_delivery
    with pytest.raises(DeliveryFailed, match="MSG_SIZE_TOO_LARGE"):
        KafkaTransaction(edges, producer).flush()  # type: ignore[arg-type]


def test_producing_on_a_fenced_producer_rolls_back() -> None:
    txn = raising(KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce: Local: Fatal error")))
    with pytest.raises(Rollback, match="producing a result: fatal: Unable to produce"):
        txn.produce("out", b"v", b"k")


def test_a_client_call_that_lost_its_exception_rolls_back() -> None:
    # Seen on fencing: the client's log callback ran inside the flush and its exception was lost.
    lost = SystemError("<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an error")
    for guarantee in ("exactly-once", "at-least-once"):  # met by poll, by flush
        with pytest.raises(Rollback, match=r"the Kafka client failed: .*returned NULL"):
            raising(lost, guarantee).flush()
    producer = Producer(commits=[lost])
    txn, _edges = begun(producer)
    wait_answered(txn)
    with pytest.raises(Rollback, match=r"cannot commit: .*returned NULL"):
        txn.commit(OFFSETS)


def test_errors_that_are_not_fatal_are_not_turned_into_rollbacks() -> None:
    txn = raising(KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large")))
    with pytest.raises(KafkaException, match="too large"):
        txn.produce("out", b"v", b"k")
    producer = Producer()
    producer.raises = retriable()
    with pytest.raises(KafkaException, match="timed out"):
        Deliveries().poll(producer)


def test_a_record_refused_for_good_stops_the_worker_when_it_fails_the_commit() -> None:
    # The refusal's delivery report is served only now: the commit met it first.
    producer = Producer(commits=[abortable()])
    producer.reports.append((KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), FakeMessage()))
    txn, _edges = begun(producer)
    wait_answered(txn)
    with pytest.raises(DeliveryFailed, match=r"revenue-out \[3\]: .*MSG_SIZE_TOO_LARGE"):
        txn.commit(OFFSETS)


def test_an_abortable_commit_after_an_outage_rolls_back_with_the_undelivered_records() -> None:
    producer = Producer(commits=[abortable()])
    producer.reports.append((KafkaError(KafkaError._MSG_TIMED_OUT), FakeMessage()))
    txn, _edges = begun(producer)
    wait_answered(txn)
    with pytest.raises(Rollback, match="1 records undelivered"):
        txn.commit(OFFSETS)


def test_an_attempt_with_no_answer_past_its_bound_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # librdkafka can block past a call's timeout when the broker goes away mid-call (#5456).
    monkeypatch.setattr(kafka_txn, "CALL_TIMEOUT_S", -9.8)  # a bound of 0.4 s
    producer = Producer()
    producer.gate.clear()
    txn, _edges = begun(producer)
    time.sleep(0.5)
    assert not txn.committing()  # the loop stops waiting and lets commit decide
    with pytest.raises(Rollback, match="no answer from Kafka"):
        txn.commit(OFFSETS)
    producer.gate.set()


def test_at_least_once_commits_its_offsets_in_commit_only() -> None:
    producer = Producer()
    edges = Edges()
    edges.start.guarantee = "at-least-once"
    committed: list[Any] = []
    edges.consumer.commit = lambda offsets, asynchronous: committed.append(offsets)  # type: ignore[attr-defined]
    txn = KafkaTransaction(edges, producer)  # type: ignore[arg-type]
    txn.start_commit(OFFSETS)
    assert not txn.committing() and producer.calls == []
    txn.commit(OFFSETS)
    assert [(tp.topic, tp.partition, tp.offset) for tp in committed[0]] == [("in", 0, 42)]
