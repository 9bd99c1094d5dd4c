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


def consumer_config(settings: KafkaSettings, group_id: str, start_from: str) -> dict[str, Any]:
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
        "queued.max.messages.kbytes": 65536,
        # librdkafka backs a partition's fetcher off for fetch.queue.backoff.ms (default 1 s)
        # once its local queue is full; a Python loop drains in bursts, so the default stalls
        # consumption for most of each second. 10 ms measured 5x the raw consume rate.
        "fetch.queue.backoff.ms": 10,
        **settings.consumer,
    }


def producer_config(settings: KafkaSettings, on_error: Callable[[Any, Any], None]) -> dict[str, Any]:
    return {
        **_common(settings),
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
        # Only failed deliveries call back: no per-record Python call for successes.
        "delivery.report.only.error": True,
        "on_delivery": on_error,
        **settings.producer,
    }


def admin(settings: KafkaSettings, hooks: Mapping[str, Any] | None = None) -> AdminClient:
    """An admin client; ``hooks`` adds callbacks (``error_cb``, ``logger``: see ``client_logger``)."""
    return AdminClient(
        {
            **_common(settings),
            **{k: v for k, v in settings.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))},
            **(hooks or {}),
        }
    )


class _QuietLibrdkafka(logging.Filter):
    """librdkafka's own log lines, without the flood.

    While a broker is down every client logs each failed reconnect (``Connect to ... failed:
    Connection refused``, ``1/1 brokers are down``), several lines a second; the worker reports
    the outage itself in one line (``weir.outages``), so these go to DEBUG. Any other line is
    shown at most once per ``every_s`` seconds (the same text with its numbers ignored).
    """

    _CONNECTION = (
        "Connect to ", "Connection refused", "brokers are down", "Disconnected", "Receive failed",
        "Send failed", "Connection setup timed out", "Failed to resolve", "timed out in state",
        "Failed to connect", "Timed out", "Broker transport failure", "Coordinator", "coordinator",
    )

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(marker in text for marker in self._CONNECTION):
            if record.levelno > logging.DEBUG:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        key = "".join(c for c in text if not c.isdigit())
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = now
        return True


def client_logger() -> logging.Logger:
    """The logger librdkafka's lines go to (pass it as a client's ``logger`` property): named
    ``weir.librdkafka``, without the per-reconnect flood of an outage (``_QuietLibrdkafka``)."""
    logger = logging.getLogger("weir.librdkafka")
    if not any(isinstance(f, _QuietLibrdkafka) for f in logger.filters):
        logger.addFilter(_QuietLibrdkafka())
    return logger


def wait_for_broker(
    client: AdminClient,
    settings: KafkaSettings,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> dict[str, int]:
    """Block until the broker answers (exponential backoff, for ``timeout_s``, default
    ``connect_timeout_s``; ``math.inf`` waits for ever).

    Returns every topic's partition count. Raises KafkaUnavailable with the last error. Each
    failed attempt is logged, or handed to ``on_retry(error)`` when given (which may log it
    once per outage, and may raise to give up).
    """
    timeout_s = settings.connect_timeout_s if timeout_s is None else timeout_s
    deadline = clock() + timeout_s
    delay = 0.5
    while True:
        try:
            md = client.list_topics(timeout=min(5.0, max(0.5, deadline - clock())))
            if md.brokers:
                return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
            error: Exception = RuntimeError("no broker in metadata")
        except KafkaException as exc:
            error = RuntimeError(exc.args[0].str()) if exc.args and hasattr(exc.args[0], "str") else exc
        remaining = deadline - clock()
        if remaining <= 0:
            raise KafkaUnavailable(
                f"cannot reach Kafka at {settings.bootstrap_servers} after {timeout_s:.0f}s "
                f"(last error: {error}); check spec.kafka.bootstrapServers and that the broker is up"
            )
        if on_retry is not None:
            on_retry(f"{settings.bootstrap_servers}: {error}")
        else:
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
