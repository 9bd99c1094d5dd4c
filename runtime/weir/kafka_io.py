"""A worker's Kafka edges: the ``Source`` and ``Sink`` of the commit protocol on librdkafka.

``connect(start)`` waits for the broker, checks the topics (creating the repartition topic),
and returns a ``KafkaEdges``: one consumer (statically assigned partitions, read_committed) and
one producer (at-least-once) or two transactional ones (exactly-once). With two, the next
checkpoint's transaction runs on one producer while the previous checkpoint uploads and its
transaction waits to commit on the other. Transactional ids are stable per worker index, so a
restarted worker fences its zombie (and aborts whatever it left open) in ``init_transactions``.

Outages. Every blocking call is bounded and retried with back-off while the broker is
unreachable (the worker stays alive, not ready, its status fresh: ``Waits.pause``); what can no
longer be committed (records timed out, a transaction aborted or fenced) raises ``Rollback``,
and a record Kafka refuses for good raises ``DeliveryFailed``.

One epoch's output and its commit are ``weir.kafka_txn.KafkaTransaction``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition

from weir import kafka as kio
from weir import memory, native
from weir.commit import RETRY_CAP_S, Waits
from weir.edges import Rollback
from weir.graph import JobGraph, assigned
from weir.kafka import Deliveries, kafka_error
from weir.kafka_txn import CALL_TIMEOUT_S, KafkaTransaction
from weir.outages import Backoff
from weir.tasks import EARLIEST, LATEST, Message, Task

log = logging.getLogger(__name__)

assert (OFFSET_BEGINNING, OFFSET_END) == (EARLIEST, LATEST)  # the core's logical offsets are Kafka's

@dataclass
class Start:
    """What connecting needs to know about the worker starting."""

    graph: JobGraph
    kafka: kio.KafkaSettings
    index: int
    count: int
    guarantee: str
    waits: Waits
    memory: memory.MemoryPlan | None = None
    on_queue_full: Callable[[], None] = lambda: None
    kafka_queued: dict[str, int] | None = None
    """Filled with the bytes in librdkafka's queues (statistics every 5 s) when a budget is set."""


def connect(start: Start) -> KafkaEdges:
    """Wait for the broker, check the topics, create the clients (see the module docstring).

    On the first start a broker that stays unreachable for ``connect_timeout_s`` raises
    ``KafkaUnavailable``; after a rollback it is waited for."""
    graph, waits, settings = start.graph, start.waits, start.kafka
    admin = kio.admin(settings)

    def unreachable(error: str) -> None:
        waits.deps.down("kafka", error)

    partitions = kio.wait_for_broker(
        admin,
        settings,
        sleep=waits.pause,
        on_retry=unreachable,
        timeout_s=settings.connect_timeout_s if waits.first else math.inf,
    )
    waits.deps.up("kafka")
    wanted = {t: "spec.pipeline.source.topics" for t in graph.source_topics}
    wanted[graph.sink_topic] = "spec.pipeline.sink.topic"
    if graph.dead_letter_topic:
        wanted[graph.dead_letter_topic] = "spec.pipeline.deadLetter.topic"
    wanted.update({j.topic: f"spec.pipeline.steps[{j.index}].join.topic" for j in reversed(graph.joins)})
    kio.require_topics(partitions, wanted, settings.bootstrap_servers)
    inputs = {t: partitions[t] for t in graph.source_topics}
    if graph.repartition_topic:
        inputs[graph.repartition_topic] = kio.ensure_topic(
            admin,
            graph.repartition_topic,
            graph.repartition_partitions or max(partitions[t] for t in graph.source_topics),
            partitions,
        )
    del admin  # its connections would keep reconnecting (and logging) through an outage
    return KafkaEdges(start, inputs, {t: partitions[t] for t in graph.table_topics})


class KafkaEdges:
    """The consumer and the producers of one start of a worker: ``Source`` and ``Sink``."""

    def __init__(self, start: Start, partitions: dict[str, int], tables: dict[str, int] | None = None):
        self.start = start
        self.partitions = partitions
        """Partition count of each input topic (sources, repartition topic)."""
        self.table_partitions = tables or {}
        """Partition count of each join table topic (read, never committed: ``weir.join_feed``)."""
        self.waits = start.waits
        self.deliveries = Deliveries()
        self.suspect: str | None = None
        self.next_probe = 0.0
        self._hooks: dict[str, Any] = {"error_cb": self._on_kafka_error, "logger": kio.client_logger()}
        self.consumer = kio.new_consumer({**self._consumer_config(), **self._hooks})
        plan = start.graph.native
        self.fetch = native.fetcher(self.consumer) if plan is not None and not plan.prepared else None
        """Reads the records of a natively run pipeline (``weir.native.fetcher``), or None."""
        self.producers = self._new_producers()
        self._next = 0
        self.current: Any = self.producers[0]

    # -- clients ----------------------------------------------------------------------------
    def _consumer_config(self) -> dict[str, Any]:
        start, graph = self.start, self.start.graph
        plan = start.memory
        if plan is None:
            return kio.consumer_config(start.kafka, graph.group_id, graph.start_from)
        # librdkafka applies the prefetch limit to each partition's queue.
        inputs = sum(len(assigned(n, start.index, start.count)) for n in self.partitions.values())
        return {
            **kio.consumer_config(
                start.kafka,
                graph.group_id,
                graph.start_from,
                queue_kbytes=plan.consumer_queue_kbytes // max(1, inputs),
                fetch_max_bytes=plan.fetch_max_bytes,
                queue_min_messages=plan.consumer_queue_messages(inputs),
            ),
            **self._stats_config("consumer"),
        }

    def _new_producers(self) -> list[Any]:
        start = self.start
        plan = start.memory
        if plan is not None:
            config = {
                **kio.producer_config(
                    start.kafka,
                    self.deliveries.on_delivery,
                    queue_kbytes=plan.producer_queue_kbytes,
                    queue_messages=plan.producer_queue_messages,
                ),
                **self._stats_config("producer"),
            }
        else:
            config = kio.producer_config(start.kafka, self.deliveries.on_delivery)
        config = {**config, **self._hooks}
        if start.guarantee != "exactly-once":
            return [kio.new_producer(config)]
        producers = []
        for suffix in ("a", "b"):
            tx_config = {
                **config,
                "transactional.id": f"{start.graph.group_id}-w{start.index}-{suffix}",
                "transaction.timeout.ms": 120_000,
                **start.kafka.producer,
            }
            producer = kio.new_producer(tx_config)

            def init(p: Any = producer) -> None:
                p.init_transactions(CALL_TIMEOUT_S)

            self.retry(f"initialising transactions of {tx_config['transactional.id']}", init)
            producers.append(producer)
        return producers

    def _stats_config(self, client: str) -> dict[str, Any]:
        """librdkafka statistics every 5 s: the bytes in its queues, for the memory metrics."""
        queued = self.start.kafka_queued
        if queued is None:
            return {}

        def on_stats(raw: str) -> None:
            stats = orjson.loads(raw)
            if client == "producer":
                queued[f"producer-{stats.get('name')}"] = int(stats.get("msg_size") or 0)
                return
            total = 0
            for topic in (stats.get("topics") or {}).values():
                for part in (topic.get("partitions") or {}).values():
                    total += int(part.get("fetchq_size") or 0)
            queued["consumer"] = total

        return {"statistics.interval.ms": 5000, "stats_cb": on_stats}

    def close(self) -> None:
        """Drop the clients; transactions left open are aborted by the next start's
        ``init_transactions``, which fences these producers."""
        for producer in self.producers:
            with contextlib.suppress(Exception):
                producer.purge()
        self.producers = []
        if self.fetch is not None:  # before the consumer: it holds records of the consumer's
            self.fetch.close()
            self.fetch = None
        with contextlib.suppress(Exception):
            self.consumer.close()

    # -- errors and outages -------------------------------------------------------------------
    def _on_kafka_error(self, err: Any) -> None:
        """librdkafka's error callback (served in poll/consume, on the worker's thread).

        "All brokers down" only makes the loop probe the broker at once: each client reports it
        from its own queue, some of them after the broker is back, so the probe's answer decides
        whether it is an outage (``probe``)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.suspect = f"{self.start.kafka.bootstrap_servers}: {err.str()}"
            self.next_probe = 0.0
        elif err.fatal():
            self.deliveries.fatal(f"fatal: {err.str()} ({err.name()})")

    def check_delivery(self) -> None:
        self.deliveries.check()

    def probe_due(self, now: float) -> bool:
        return bool(self.suspect or self.waits.deps.is_down("kafka")) and now >= self.next_probe

    def probe(self) -> bool:
        """Ask the broker for metadata (1 s at most) and record the answer: whether Kafka is
        reachable. Run after a client reported every broker down, and every 2 s during an
        outage, to notice the broker is back even when no record arrives (librdkafka reports
        brokers going down, never coming back)."""
        self.next_probe = time.monotonic() + 2.0
        try:
            md = self.consumer.list_topics(self.start.graph.sink_topic, timeout=1.0)
            reachable = bool(md.brokers) and md.orig_broker_id >= 0
            error = "no broker in the metadata"
        except KafkaException as exc:
            reachable = False
            error = kafka_error(exc)[1]
        deps = self.waits.deps
        if reachable:
            self.suspect = None
            deps.up("kafka")
        else:
            deps.down("kafka", self.suspect or f"{self.start.kafka.bootstrap_servers}: {error}")
        return reachable

    def retry(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` until it succeeds, waiting out an unreachable broker with back-off.

        On the first start the broker gets ``connect_timeout_s`` (then ``KafkaUnavailable``);
        after a rollback it gets for ever. A fatal client error raises (``KafkaUnavailable`` on
        the first start, else ``Rollback``: new clients are the only cure)."""
        waits, timeout = self.waits, self.start.kafka.connect_timeout_s
        backoff = Backoff(0.5, RETRY_CAP_S)
        failures = 0
        while True:
            try:
                return call()
            except KafkaException as exc:
                err, text = kafka_error(exc)
                if err is not None and err.fatal():
                    if waits.first:
                        raise kio.KafkaUnavailable(f"{what}: {text}") from exc
                    raise Rollback(f"{what}: {text}") from exc
                failures += 1
                if failures > 1:  # the first retry is routine ("not coordinator" while it loads)
                    waits.deps.down("kafka", f"{what}: {text}")
                if waits.first and time.monotonic() - waits.started_at > timeout:
                    raise kio.KafkaUnavailable(
                        f"{what} failed for {timeout:.0f}s (last error: {text}); "
                        "check spec.kafka.bootstrapServers and that the broker is up"
                    ) from exc
                waits.pause(backoff.next())

    def bounded(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` on a helper thread, waited for at most ``CALL_TIMEOUT_S`` + 10 s.

        librdkafka's transaction calls take a timeout but can block past it when the broker
        goes away mid-call (librdkafka#5456); on the worker's thread that would stop the
        liveness probe, /status and SIGTERM. A call that does not return in time raises
        ``Rollback``: its producer is abandoned (fenced by the next one) with the helper thread
        still in it.
        """
        outcome: list[tuple[bool, Any]] = []

        def target() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.append((False, exc))

        thread = threading.Thread(target=target, name="weir-kafka-call", daemon=True)
        thread.start()
        deadline = time.monotonic() + CALL_TIMEOUT_S + 10.0
        while True:
            thread.join(0.2)
            if not thread.is_alive():
                break
            if time.monotonic() >= deadline:
                raise Rollback(f"{what}: no answer from Kafka within {CALL_TIMEOUT_S + 10.0:.0f}s")
            self.waits.pause(0)
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    # -- Source -----------------------------------------------------------------------------
    def consume(self, max_records: int, timeout_s: float) -> list[Message] | native.Fetched:
        fetch = self.fetch
        if fetch is None:
            return self._consume(max_records, timeout_s)
        # The consumer's own queue first: its events (errors, logs, statistics) are served
        # here, and a record that reached it before its partition was routed runs before
        # anything after it.
        msgs = self._consume(max_records, 0)
        if msgs:
            return msgs
        groups, errors = fetch.consume(max_records, max(0, round(timeout_s * 1000)))
        for code, text in errors:
            self._consume_error(KafkaError(code, text))
        if not groups:
            return []
        if self.waits.deps.is_down("kafka"):
            self.waits.deps.up("kafka")
        return native.Fetched(fetch, groups)

    def _consume(self, max_records: int, timeout_s: float) -> list[Message]:
        # ``Consumer.consume`` waits until it has ``max_records`` or the timeout has passed: the
        # records that end a burst would wait out the timeout. Take what is there; when nothing
        # is, wait for the first record and take what came with it (as ``native.Fetch`` does).
        consume = self.consumer.consume
        msgs = consume(max_records, timeout=0)
        if not msgs and timeout_s > 0:
            msgs = consume(1, timeout=timeout_s)
            if msgs and max_records > 1:
                msgs += consume(max_records - 1, timeout=0)
        good = msgs
        for m in msgs:
            if m.error() is not None:  # rare: filter the batch only when it has errors
                good = [m for m in msgs if m.error() is None]
                for bad in msgs:
                    if bad.error() is not None:
                        self._consume_error(bad.error())
                break
        if good and self.waits.deps.is_down("kafka"):
            self.waits.deps.up("kafka")
        return cast(list[Message], good)

    def _consume_error(self, err: Any) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer: %s", err)

    def assign(self, tasks: Sequence[Task]) -> None:
        # librdkafka resolves a logical start offset (earliest, latest) only once it knows the
        # partition's leader, and learns the leaders of an assigned topic at its next metadata
        # refresh: a fresh start sat idle for about a second before its first fetch. Asking for
        # the topics' metadata first starts it at once; a broker that does not answer in time
        # only costs the wait, the assignment proceeds (and the outage shows where it always did).
        for topic in sorted({t.topic for t in tasks if t.next_offset < 0}):
            with contextlib.suppress(KafkaException):
                self.consumer.list_topics(topic, timeout=2.0)
        self.consumer.assign([TopicPartition(t.topic, t.partition, t.next_offset) for t in tasks])
        if self.fetch is not None:
            self.fetch.route([(t.topic, t.partition) for t in tasks])

    def committed(self, tasks: Sequence[Task]) -> dict[str, tuple[int, str | None]]:
        """The group's committed offset per task and the snapshot id committed with it (read
        explicitly, retried while the coordinator is not ready, so a slow start shows as a
        logged retry, not a stall)."""
        tps = [TopicPartition(t.topic, t.partition) for t in tasks]
        if not tps:
            return {}
        committed = self.retry(
            f"reading the committed offsets of {self.start.graph.group_id}",
            lambda: self.consumer.committed(tps, timeout=CALL_TIMEOUT_S),
        )
        found = [tp for tp in committed if tp.offset >= 0]
        return {f"{tp.topic}/{tp.partition}": (tp.offset, tp.metadata or None) for tp in found}

    def position(self, task: Task) -> int:
        """Where the consumer is in the task's partition (past transaction markers too)."""
        try:
            (tp,) = self.consumer.position([TopicPartition(task.topic, task.partition)])
        except KafkaException:
            return task.next_offset
        return max(task.next_offset, int(tp.offset))

    def _ends(self, task: Task) -> tuple[int, int] | None:
        try:
            lo, hi = self.consumer.get_watermark_offsets(
                TopicPartition(task.topic, task.partition, task.next_offset), cached=True
            )
        except KafkaException:
            return None
        return int(lo), int(hi)

    def caught_up(self, task: Task) -> bool:
        """Whether the task has consumed all its partition holds. Only such a partition can be
        idle: one with records waiting (a slow start, back-pressure) is slow, not quiet, and
        must not have its watermark moved past the records still to come."""
        ends = self._ends(task)
        if ends is None or ends[1] < 0:  # no fetch response yet: nothing is known about the end
            return False
        lo, hi = ends
        if task.next_offset == OFFSET_END:  # started at the end and nothing came since
            return True
        if task.next_offset == OFFSET_BEGINNING:  # nothing consumed: caught up if it is empty
            return lo == hi
        return self.position(task) >= hi  # past transaction markers: a job's output is read caught up

    def table_ends(self, tasks: list[Task]) -> dict[tuple[str, int], tuple[int, int]]:
        """The low and high watermark offsets of each (table) task's partition now, uncached."""
        tps = [(t.topic, t.partition) for t in tasks]
        ends = self.retry("join table ends", lambda: kio.end_offsets(self.consumer, tps, CALL_TIMEOUT_S))
        return {tp: (int(lo), int(hi)) for tp, (lo, hi) in ends.items()}

    def lag(self, task: Task) -> int | None:
        ends = self._ends(task)
        if ends is None or ends[1] < 0 or task.next_offset < 0:
            return None
        return max(0, ends[1] - task.next_offset)

    # -- Sink -------------------------------------------------------------------------------
    def begin(self) -> KafkaTransaction:
        """The next epoch's transaction: on the other producer under exactly-once, so the
        previous epoch can commit on its own while this one is written."""
        producer = self.producers[self._next % len(self.producers)]
        self._next += 1
        self.current = producer
        if self.start.guarantee == "exactly-once":
            try:
                producer.begin_transaction()
            except (KafkaException, SystemError) as exc:
                raise kio.fatal_rollback("beginning a transaction", exc) from exc
        return KafkaTransaction(self, producer)

    def poll(self) -> None:
        self.deliveries.poll(self.current)
        self.check_delivery()
