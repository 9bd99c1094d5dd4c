"""The Kafka boundary of a worker: client configuration, broker checks and topic set-up.

Only this module and ``worker`` talk to confluent-kafka; everything it returns to the
rest of the runtime is plain data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

log = logging.getLogger(__name__)


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached within the configured time."""


class TopicMissing(RuntimeError):
    """A topic the job reads or writes does not exist."""


@dataclass(frozen=True)
class KafkaSettings:
    """How a worker reaches Kafka. ``consumer``/``producer`` are extra librdkafka properties
    from the spec (and secret-bearing ones from the environment); they override defaults."""

    bootstrap_servers: str
    consumer: Mapping[str, Any]
    producer: Mapping[str, Any]
    connect_timeout_s: float = 60.0


def _common(settings: KafkaSettings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.bootstrap_servers, "client.id": "weir"}


def consumer_config(
    settings: KafkaSettings,
    group_id: str,
    start_from: str,
    queue_kbytes: int = 65536,
    fetch_max_bytes: int = 52428800,
    queue_min_messages: int = 100000,
) -> dict[str, Any]:
    """``queue_kbytes``, ``queue_min_messages`` and ``fetch_max_bytes`` size the prefetch queue
    (from the worker's memory budget, ``weir.memory``; librdkafka's defaults otherwise)."""
    return {
        **_common(settings),
        "group.id": group_id,
        # Partitions are assigned statically by worker index; offsets are committed by the
        # worker itself at commit points, never in the background.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": start_from,
        "isolation.level": "read_committed",
        # Bigger fetches amortise per-request overhead; the hot loop takes batches.
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": 100,
        "queued.max.messages.kbytes": queue_kbytes,
        "queued.min.messages": queue_min_messages,
        "fetch.max.bytes": fetch_max_bytes,
        # librdkafka backs a partition's fetcher off for fetch.queue.backoff.ms (default 1 s)
        # once its local queue is full; a Python loop drains in bursts, so the default stalls
        # consumption for most of each second. 10 ms measured 5x the raw consume rate.
        "fetch.queue.backoff.ms": 10,
        **settings.consumer,
    }


def producer_config(
    settings: KafkaSettings,
    on_error: Callable[[Any, Any], None],
    queue_kbytes: int = 1048576,
    queue_messages: int = 200_000,
) -> dict[str, Any]:
    """``queue_kbytes`` and ``queue_messages`` bound what waits for delivery (from the memory
    budget, ``weir.memory``)."""
    return {
        **_common(settings),
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": queue_messages,
        "queue.buffering.max.kbytes": queue_kbytes,
        # Only failed deliveries call back: no per-record Python call for successes.
        "delivery.report.only.error": True,
        "on_delivery": on_error,
        **settings.producer,
    }


def admin(settings: KafkaSettings) -> AdminClient:
    return AdminClient(
        {
            **_common(settings),
            **{k: v for k, v in settings.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))},
        }
    )


def wait_for_broker(
    client: AdminClient,
    settings: KafkaSettings,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, int]:
    """Block until the broker answers (exponential backoff up to ``connect_timeout_s``).

    Returns every topic's partition count. Raises KafkaUnavailable with the last error.
    """
    deadline = clock() + settings.connect_timeout_s
    delay = 0.5
    while True:
        try:
            md = client.list_topics(timeout=min(5.0, max(0.5, deadline - clock())))
            if md.brokers:
                return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
            error: Exception = RuntimeError("no broker in metadata")
        except KafkaException as exc:
            error = exc
        remaining = deadline - clock()
        if remaining <= 0:
            raise KafkaUnavailable(
                f"cannot reach Kafka at {settings.bootstrap_servers} after {settings.connect_timeout_s:.0f}s "
                f"(last error: {error}); check spec.kafka.bootstrapServers and that the broker is up"
            )
        log.warning(
            "Kafka at %s not reachable yet (%s); retrying in %.1fs",
            settings.bootstrap_servers,
            error,
            min(delay, remaining),
        )
        sleep(min(delay, remaining))
        delay = min(delay * 2, 10.0)


def require_topics(partitions: Mapping[str, int], topics: Mapping[str, str], bootstrap: str) -> None:
    """Raise TopicMissing naming every missing topic and the spec field that names it."""
    missing = [f"'{topic}' ({field})" for topic, field in topics.items() if topic not in partitions]
    if missing:
        raise TopicMissing(
            f"topic {', '.join(missing)} does not exist on {bootstrap}; create it, or fix the spec"
        )


def ensure_topic(client: AdminClient, name: str, partitions: int, existing: Mapping[str, int]) -> int:
    """Create ``name`` with ``partitions`` unless it exists; returns its partition count."""
    if name in existing:
        return existing[name]
    futures = client.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=-1)], operation_timeout=30
    )
    try:
        futures[name].result(timeout=30)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):  # another worker created it first
            raise
    return wait_for_leaders(client, name)


def wait_for_leaders(client: AdminClient, name: str, timeout_s: float = 30.0) -> int:
    """Wait until every partition of ``name`` has a leader; returns its partition count."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = client.list_topics(name, timeout=5).topics.get(name)
        if (
            md is not None
            and md.error is None
            and md.partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return len(md.partitions)
        time.sleep(0.2)
    raise TopicMissing(f"topic '{name}' has no leaders after {timeout_s:.0f}s")


def recreate_topics(client: AdminClient, topics: Mapping[str, int], timeout_s: float = 60.0) -> None:
    """Delete each of ``topics`` that exists and create them all empty with the given
    partition counts (for demos and benchmarks that own their topics). Deletion completes
    asynchronously on the broker, so creation is retried until it goes through."""
    existing = set(client.list_topics(timeout=10).topics)
    doomed = [t for t in topics if t in existing]
    if doomed:
        for f in client.delete_topics(doomed, operation_timeout=30).values():
            f.result(timeout=30)
    deadline = time.monotonic() + timeout_s
    pending = dict(topics)
    while pending:
        futures = client.create_topics(
            [NewTopic(t, num_partitions=n, replication_factor=-1) for t, n in pending.items()],
            operation_timeout=30,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=30)
                del pending[name]
            except KafkaException as exc:
                if "marked for deletion" not in str(exc) and "already exists" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise TopicMissing(f"topic '{name}' could not be recreated: {exc}") from exc
        if pending:
            time.sleep(0.5)
    for name in topics:
        wait_for_leaders(client, name, timeout_s)


def new_consumer(config: dict[str, Any]) -> Consumer:
    return Consumer(config)


def new_producer(config: dict[str, Any]) -> Producer:
    return Producer(config)
