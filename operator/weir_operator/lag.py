"""The consumer lag of a job's input partitions, read from Kafka with the operator's own admin client.

Per partition of every input topic (the sources, and the repartition topic of a two-stage
pipeline), the lag is the records between where the job resumes and the end a
``read_committed`` consumer can reach:

- **end** is the partition's *last stable offset* (``ListOffsets`` with ``READ_COMMITTED``), not its
  high watermark: records of open transactions are not readable yet, so they are not lag;
- **where the job resumes** is the group's committed offset. A partition without one is read as
  the job's ``startFrom`` would: ``earliest`` starts at the log start (the whole retained log is
  lag), ``latest`` at the end (no lag). A committed offset below the log start (retention deleted
  the records) resumes at the log start: deleted records are not lag.
- **Markers are not lag.** An exactly-once job commits the offset after the last record it read;
  behind it the broker writes the transaction's commit marker, which takes an offset and no
  consumer ever receives; and stage 1 of a two-stage job writes watermark markers (records without
  a key) to the repartition topic several times a second, idle or not. So a caught-up job's
  committed offsets sit some offsets below the end. Where the gap is at most ``PROBE_LIMIT``
  offsets, a ``read_committed`` consumer reads it from the committed offset and the lag is the
  records it gets that are not watermark markers: 0 for a caught-up job (KEDA reads such a job as
  lagging forever).

Security: ``weir.kafka.security`` from ``spec.kafka`` and the *operator's own* environment
(``WEIR_KAFKA_SASL_*``, ``WEIR_KAFKA_TLS``, ``WEIR_KAFKA_SSL_*``): the operator never reads Secrets,
so on a secured cluster it is given credentials of its own that may describe the job's group.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

from weir import kafka as kio
from weir import spec
from weir.config import KafkaSecurityInputs
from weir_operator.plans import LagReading, PartitionLag, WorkerReport

__all__ = ["PROBE_LIMIT", "LagReader", "autoscaled", "input_topics", "lag_of", "reported_inputs"]

logger = logging.getLogger(__name__)

PROBE_LIMIT = 1000
"""Gaps between committed offset and end up to this many offsets are counted by reading them (see
the module docstring): a caught-up job's gap is markers, and reading is cheap at this size."""
PROBE_TIMEOUT_S = 3.0
"""How long counting may take; partitions not read to their end keep their offset difference."""
RETRIES = 2
"""Retries of a reading that failed with a retriable error (NOT_LEADER_FOR_PARTITION, ...)."""
RATE_WINDOW_S = 60.0
"""Per-partition rates are measured over up to this long."""
TIMEOUT_S = 10.0
"""How long one reading may wait for the broker."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def input_topics(job: spec.StreamJob, reported: Mapping[str, int] | None = None) -> list[str]:
    """The topics whose lag is the job's: its sources and its repartition topic.

    With ``spec.entrypoint`` the operator does not know the pipeline: the topics the workers
    reported (``inputPartitions``)."""
    pipeline = job.spec.pipeline
    if pipeline is None:
        return sorted(reported or {})
    topics = list(pipeline.source.topics)
    loaded = spec.Job(job.metadata.name, job.metadata.namespace, job.spec, pipeline)
    repartition = loaded.repartition_topic
    if repartition is not None:
        topics.append(repartition)
    return topics


def autoscaled(job: spec.StreamJob) -> bool:
    """Whether the platform should read ``job``'s lag (its autoscaler is enabled)."""
    return job.spec.autoscaler is not None and job.spec.autoscaler.enabled


def reported_inputs(reports: Iterable[WorkerReport]) -> dict[str, int]:
    """The input topics the workers reported, with their largest partition count."""
    counts: dict[str, int] = {}
    for report in reports:
        for topic, count in (report.input_partitions or {}).items():
            counts[topic] = max(count, counts.get(topic, 0))
    return counts


def lag_of(end: int, log_start: int, committed: int | None, start_from: str) -> int:
    """A partition's lag in records from its read_committed end, log start and committed offset."""
    if committed is None or committed < 0:
        return max(0, end - log_start) if start_from == "earliest" else 0
    return max(0, end - max(committed, log_start))


class LagReader:
    """Reads lag for any job; keeps one admin client per (brokers, security), built on first use.

    ``env``: where the operator's own Kafka credentials come from (default: its environment).
    Thread-safe: the Kubernetes operator reconciles jobs in threads.
    """

    def __init__(
        self, env: Mapping[str, str] | None = None, *, timeout_s: float = TIMEOUT_S,
        min_interval_s: float = 0.0, now: Callable[[], datetime] = _utcnow,
    ) -> None:
        """``min_interval_s``: a job read less than this ago gets the same reading again (a
        reconcile observes several times in a row)."""
        self._env = dict(os.environ if env is None else env)
        self._timeout_s = timeout_s
        self._min_interval_s = min_interval_s
        self._now = now
        self._admins: dict[tuple[str, str], tuple[Any, kio.KafkaSettings]] = {}
        self._recent: dict[tuple[str, str], tuple[float, LagReading]] = {}
        # Per job, the readings of the last RATE_WINDOW_S: (monotonic time, {partition: (end, position)}).
        self._history: dict[tuple[str, str], deque[tuple[float, dict[tuple[str, int], tuple[int, int]]]]] = {}
        self._lock = threading.Lock()

    def _admin(self, job: spec.StreamJob, bootstrap_servers: str | None) -> tuple[Any, kio.KafkaSettings]:
        kafka = job.spec.kafka
        security = kio.security(kafka, KafkaSecurityInputs.read(self._env))
        servers = bootstrap_servers or kafka.bootstrap_servers
        key = (servers, repr(sorted(security.properties().items())))
        with self._lock:
            known = self._admins.get(key)
            if known is None:
                # spec.kafka.consumer tunes the workers' consumers, not the operator's own clients.
                settings = kio.KafkaSettings(servers, consumer={}, producer={}, security=security)
                known = (kio.admin(settings), settings)
                self._admins[key] = known
        return known

    def read(
        self, job: spec.StreamJob, *, bootstrap_servers: str | None = None,
        reported: Mapping[str, int] | None = None,
    ) -> LagReading:
        """The lag of every partition of ``job``'s input topics, or a reading with ``error``."""
        key = (job.metadata.namespace, job.metadata.name)
        with self._lock:
            recent = self._recent.get(key)
        if recent is not None and time.monotonic() - recent[0] < self._min_interval_s:
            return recent[1]
        at = self._now()
        for attempt in range(RETRIES + 1):
            try:
                reading = self._with_rates(key, self._read(job, bootstrap_servers, reported))
                reading = replace(reading, measured_at=at)
                break
            except KafkaException as exc:
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if error is not None and error.retriable() and attempt < RETRIES:
                    time.sleep(0.3)  # e.g. a leader that moved (or a topic just created): new metadata
                    continue
                reading = LagReading(error=_one_line(exc), measured_at=at)
                break
            except (kio.KafkaSecurityConfigError, kio.KafkaAuthFailed, TimeoutError) as exc:
                reading = LagReading(error=_one_line(exc), measured_at=at)
                break
        with self._lock:
            self._recent[key] = (time.monotonic(), reading)
        return reading

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job's recent reading."""
        with self._lock:
            self._recent.pop((namespace, name), None)
            self._history.pop((namespace, name), None)

    def _with_rates(self, key: tuple[str, str], reading: LagReading) -> LagReading:
        """Each partition's input and processing rate, against the oldest reading of the last
        ``RATE_WINDOW_S`` (an exactly-once job commits once per checkpoint: shorter spans see its
        processing in bursts)."""
        now = time.monotonic()
        current = {(p.topic, p.partition): (p.end_offset, p.end_offset - p.lag) for p in reading.partitions}
        with self._lock:
            history = self._history.setdefault(key, deque())
            while len(history) > 1 and now - history[1][0] >= RATE_WINDOW_S:
                history.popleft()
            base = history[0] if history else None
            history.append((now, current))
        if base is None or now - base[0] <= 0:
            return reading
        span = now - base[0]
        rows = []
        for p in reading.partitions:
            before = base[1].get((p.topic, p.partition))
            if before is None:
                rows.append(p)
                continue
            end, position = current[(p.topic, p.partition)]
            rows.append(replace(p, input_rate=max(0.0, (end - before[0]) / span),
                                processing_rate=max(0.0, (position - before[1]) / span)))
        return replace(reading, partitions=tuple(rows))

    def _read(
        self, job: spec.StreamJob, bootstrap_servers: str | None, reported: Mapping[str, int] | None
    ) -> LagReading:
        topics = input_topics(job, reported)
        if not topics:
            return LagReading()
        admin, settings = self._admin(job, bootstrap_servers)
        metadata = admin.list_topics(timeout=self._timeout_s)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata.topics and metadata.topics[topic].error is None
            for p in sorted(metadata.topics[topic].partitions)
        ]
        if not partitions:
            return LagReading()
        ends = self._offsets(admin, partitions, OffsetSpec.latest())  # type: ignore[no-untyped-call]
        starts = self._offsets(admin, partitions, OffsetSpec.earliest())  # type: ignore[no-untyped-call]
        group = f"weir-{job.metadata.namespace}-{job.metadata.name}"
        committed = self._committed(settings, group, partitions)
        start_from = job.spec.pipeline.source.start_from if job.spec.pipeline is not None else "earliest"
        rows = []
        suspects = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            end, start, offset = ends[key], starts[key], committed.get(key)
            lag = lag_of(end, start, offset, start_from)
            if offset is not None and 0 < lag <= PROBE_LIMIT and offset >= start:
                suspects.append(TopicPartition(tp.topic, tp.partition, offset))
            rows.append(PartitionLag(tp.topic, tp.partition, end, offset, lag))
        if suspects:
            repartition = {t for t in topics if t.endswith("-repartition") and t.startswith(f"{group}-")}
            counted = self._probe(settings, group, suspects, ends, repartition)
            rows = [
                replace(r, lag=counted[(r.topic, r.partition)]) if (r.topic, r.partition) in counted else r
                for r in rows
            ]
        return LagReading(tuple(rows))

    def _committed(
        self, settings: kio.KafkaSettings, group: str, partitions: list[TopicPartition]
    ) -> dict[tuple[str, int], int]:
        """The group's committed offsets, read by a consumer of that group that never joins it
        (no subscribe, no commit). Not ``AdminClient.list_consumer_group_offsets``: librdkafka
        crashes the process (NULL group handle in ``rd_kafka_handle_OffsetFetch``) when that
        request is retried, as it is while a fresh broker's offsets topic is still loading."""
        consumer = Consumer({
            **kio.client_config(settings),
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        })
        try:
            answer = consumer.committed(partitions, timeout=self._timeout_s)
        finally:
            consumer.close()
        return {
            (tp.topic, tp.partition): tp.offset for tp in answer if tp.error is None and tp.offset >= 0
        }

    def _offsets(
        self, admin: Any, partitions: list[TopicPartition], which: Any
    ) -> dict[tuple[str, int], int]:
        futures = admin.list_offsets(
            {tp: which for tp in partitions}, isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=self._timeout_s,
        )
        timeout = self._timeout_s
        return {(tp.topic, tp.partition): int(_result(f, timeout).offset) for tp, f in futures.items()}

    def _probe(
        self, settings: kio.KafkaSettings, group: str, suspects: list[TopicPartition],
        ends: Mapping[tuple[str, int], int], repartition: set[str],
    ) -> dict[tuple[str, int], int]:
        """Count the records a ``read_committed`` consumer gets between each suspect's committed
        offset and its end: the exact lag where the offsets alone overstate it. Transaction markers
        are never delivered, and a watermark marker of the repartition topic (no key) is bookkeeping
        stage 1 writes even when idle, not a record to process. Partitions not read to their end
        within the time keep their offset difference (the safe side)."""
        consumer = Consumer({
            **kio.client_config(settings),
            # Never joins the job's group or commits to it: it only reads from explicit offsets.
            "group.id": f"{group}-lag-probe",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        })
        counts = {(tp.topic, tp.partition): 0 for tp in suspects}
        pending = set(counts)
        try:
            consumer.assign(suspects)
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while pending and time.monotonic() < deadline:
                for message in consumer.consume(1000, timeout=0.2):
                    key = (str(message.topic()), int(message.partition() or 0))
                    if key not in pending:
                        continue
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            pending.discard(key)
                        continue
                    if (message.offset() or 0) >= ends[key]:
                        pending.discard(key)  # beyond the end measured: newer input
                        continue
                    if not (message.topic() in repartition and message.key() is None):
                        counts[key] += 1
        finally:
            consumer.close()
        return {key: count for key, count in counts.items() if key not in pending}


def _result(future: Future[Any], timeout: float) -> Any:
    return future.result(timeout=timeout)


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    return " ".join(text.split())[:500] or type(exc).__name__
