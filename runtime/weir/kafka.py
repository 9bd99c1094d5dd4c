"""The Kafka boundary of a worker: client configuration (security included), broker checks
and topic set-up.

Only this module and ``worker`` talk to confluent-kafka; everything it returns to the
rest of the runtime is plain data. ``security`` is the one place that turns
``spec.kafka.sasl``/``tls`` and the secret-bearing environment (or ``weir run``'s flags) into
librdkafka properties; every client built here gets them, and the operator may call it
for clients of its own.

Errors, and the ``weir run`` exit code each leads to::

    KafkaSecurityConfigError  security settings incomplete or contradictory    2
    TopicMissing              a topic the job names does not exist            2
    KafkaUnavailable          no broker answered within connect_timeout_s      3
    KafkaAuthFailed           the broker refused the credentials, or TLS failed 4
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from weir.edges import DeliveryFailed, Rollback
from weir.kafka_security import (  # the Kafka boundary's security names, defined apart
    PLAINTEXT,
    SASL_MECHANISMS,
    KafkaSecurity,
    KafkaSecurityConfigError,
    security,
)

__all__ = [
    "PLAINTEXT",
    "SASL_MECHANISMS",
    "Admin",
    "Deliveries",
    "KafkaAuthFailed",
    "KafkaSecurity",
    "KafkaSecurityConfigError",
    "KafkaSettings",
    "KafkaUnavailable",
    "TopicMissing",
    "kafka_error",
    "security",
]

log = logging.getLogger(__name__)



class KafkaUnavailable(RuntimeError):
    """The broker could not be reached within the configured time."""


class TopicMissing(RuntimeError):
    """A topic the job reads or writes does not exist."""


class KafkaAuthFailed(RuntimeError):
    """The broker refused the SASL credentials, or TLS could not be set up (the broker's
    certificate is not trusted, the broker refused the client certificate, or a client
    certificate or key cannot be loaded). Retrying does not help: the settings must change."""


@dataclass(frozen=True)
class KafkaSettings:
    """How a worker reaches Kafka. ``consumer``/``producer`` are extra librdkafka properties
    from the spec; they override defaults. ``security`` applies to every client."""

    bootstrap_servers: str
    consumer: Mapping[str, Any]
    producer: Mapping[str, Any]
    connect_timeout_s: float = 60.0
    security: KafkaSecurity = field(default=PLAINTEXT)


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """What every client needs: the brokers and the security properties (with secrets: hand
    it to a client, never to a log)."""
    return _common(settings)


def _common(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": "weir",
        **settings.security.properties(),
    }


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


class Admin(AdminClient):
    """An AdminClient that keeps the errors librdkafka reports through ``error_cb``: a refused
    login or a failed TLS handshake shows only there (a metadata request merely times out),
    and ``wait_for_broker`` stops on it at once instead of retrying until the timeout."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.refusal: KafkaError | None = None
        full: dict[str, Any] = {"logger": _DebugLog(), **config, "error_cb": self._on_error}
        super().__init__(full)

    def _on_error(self, error: KafkaError) -> None:
        if self.refusal is None and refused(error):
            self.refusal = error


class _DebugLog:
    """librdkafka's own log lines of an ``Admin`` go to DEBUG: at start-up they repeat, line
    by line and several times a second, what ``wait_for_broker`` reports once (a retry
    warning, or the one-line refusal)."""

    _log = logging.getLogger(f"{__name__}.librdkafka")

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._log.debug(msg, *args)


def refused(error: KafkaError) -> bool:
    """Whether ``error`` means the broker refused us (credentials, TLS) rather than being away.

    SASL failures are ``_AUTHENTICATION``, our side of a failed TLS handshake (untrusted
    broker certificate) is ``_SSL``. When the broker rejects the client certificate, the
    client sees a transport error carrying the peer's TLS alert ("ssl/tls alert bad
    certificate"); an alert is a deliberate refusal, unlike an EOF from a broker going away.
    """
    code = error.code()
    if code in (KafkaError._AUTHENTICATION, KafkaError._SSL):
        return True
    text = error.str()
    return code == KafkaError._TRANSPORT and "SSL routines" in text and "alert" in text


def admin(settings: KafkaSettings) -> Admin:
    client: Admin = _create(
        Admin,
        {
            **_common(settings),
            **{k: v for k, v in settings.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))},
        },
    )
    return client


def _create(factory: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """Build a client; a TLS file librdkafka cannot load (a key whose password is wrong, a CA
    file that is not PEM) fails here, before any connection: KafkaAuthFailed, not a traceback."""
    try:
        return factory(config)
    except KafkaException as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        text = error.str() if error is not None else str(exc)
        if "ssl." not in text and "sasl." not in text:
            raise
        if "ssl.key.location" in text:
            what = (
                f"the TLS client key {config.get('ssl.key.location')} cannot be loaded (wrong key password?)"
            )
        else:
            what = "a TLS/SASL setting cannot be used"
        raise KafkaAuthFailed(f"Kafka client not created: {what}: {text}") from None


# librdkafka's error text: "<proto>://<host:port>/<broker id or bootstrap>: <what> (after Nms in state X)".
_BROKER_PREFIX = re.compile(r"^\w+://\S+?/\w+: ")
_TIMING_SUFFIX = re.compile(r" \(after \d+ms in state \w+(, [^)]*)?\)$")


def _refusal_error(settings: KafkaSettings, error: KafkaError) -> KafkaAuthFailed:
    """One line naming what was refused, for whom, and which settings to check."""
    sec = settings.security
    detail = _TIMING_SUFFIX.sub("", _BROKER_PREFIX.sub("", error.str()))
    at = settings.bootstrap_servers
    if error.code() == KafkaError._AUTHENTICATION:
        who = f"user {sec.sasl_username!r} with {sec.sasl_mechanism}" if sec.sasl_mechanism else "SASL"
        return KafkaAuthFailed(
            f"Kafka authentication failed for {who} at {at}: {detail}; check the username and password "
            "(spec.kafka.sasl's Secrets, WEIR_KAFKA_SASL_*, --sasl-*)"
        )
    if error.code() == KafkaError._SSL:
        return KafkaAuthFailed(
            f"Kafka TLS failed at {at} over {sec.describe()}: {detail}; check the CA "
            "(spec.kafka.tls.caSecret, WEIR_KAFKA_SSL_CA_LOCATION, --tls-ca)"
        )
    return KafkaAuthFailed(
        f"Kafka TLS failed at {at} over {sec.describe()}: the broker refused the connection ({detail}); "
        "it may require a client certificate it trusts "
        "(spec.kafka.tls.certSecret/keySecret, --tls-cert/--tls-key)"
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
    ``weir.kafka.librdkafka``, without the per-reconnect flood of an outage (``_QuietLibrdkafka``)."""
    logger = logging.getLogger(f"{__name__}.librdkafka")
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

    Returns every topic's partition count. Raises KafkaUnavailable with the last error, and
    KafkaAuthFailed as soon as a client built by ``admin()`` sees the broker refuse its
    credentials or TLS fail (the first attempts are short so that this shows within about a
    second). Each failed attempt is logged, or handed to ``on_retry(error)`` when given (which
    may log it once per outage, and may raise to give up).
    """
    timeout_s = settings.connect_timeout_s if timeout_s is None else timeout_s
    deadline = clock() + timeout_s
    delay = 0.5
    attempt_s = 1.0
    while True:
        try:
            md = client.list_topics(timeout=min(attempt_s, max(0.5, deadline - clock())))
            if md.brokers:
                return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
            error: Exception = RuntimeError("no broker in metadata")
        except KafkaException as exc:
            error = RuntimeError(exc.args[0].str()) if exc.args and hasattr(exc.args[0], "str") else exc
        if hasattr(client, "refusal"):  # an Admin (or a test's stand-in for one)
            client.poll(0)  # serves error_cb
            if client.refusal is not None:
                raise _refusal_error(settings, client.refusal)
        attempt_s = min(attempt_s * 2, 5.0)
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
    consumer: Consumer = _create(Consumer, config)
    return consumer


def end_offsets(
    consumer: Consumer, tps: list[tuple[str, int]], timeout_s: float
) -> dict[tuple[str, int], Any]:
    """The ``(low, high)`` watermark offsets of each ``(topic, partition)`` now (not cached)."""
    get = consumer.get_watermark_offsets
    return {tp: get(TopicPartition(*tp), timeout=timeout_s, cached=False) for tp in tps}


def new_producer(config: dict[str, Any]) -> Producer:
    producer: Producer = _create(Producer, config)
    return producer


# Delivery errors that no retry fixes: the record (or the client's permission) is the problem,
# not the broker's availability. Everything else an outage can cause, and rolling back to the
# last commit and producing again is the cure.
_PERMANENT_DELIVERY = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION, KafkaError.INVALID_RECORD, KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG, KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
})


def kafka_error(exc: BaseException) -> tuple[KafkaError | None, str]:
    """The KafkaError a KafkaException carries (None if it carries none) and its text."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return err, (err.str() if err is not None else str(exc))


def fatal_cause(exc: BaseException) -> str | None:
    """What a producer call's exception says when the producer is done for, else None.

    After a fatal error (fenced by a newer instance, ...) every call of the producer fails, and
    new clients made from the last commit are the only cure. A ``SystemError`` from the client
    (see ``Deliveries.poll``) leaves it in an unknown state: the same cure."""
    if isinstance(exc, SystemError):
        return f"the Kafka client failed: {exc}"
    err, text = kafka_error(exc)
    if err is not None and (err.fatal() or err.code() == KafkaError._FATAL):
        return f"fatal: {text} ({err.name()})"
    return None


def fatal_rollback(what: str, exc: Exception) -> Rollback:
    """The ``Rollback`` a fatal producer error calls for (``exc`` itself raised if not one)."""
    cause = fatal_cause(exc)
    if cause is None:
        raise exc
    return Rollback(f"{what}: {cause}")


class Deliveries:
    """Failed deliveries reported by librdkafka (on the worker's thread, in poll/flush)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.undelivered = 0
        self.permanent = False

    def on_delivery(self, err: Any, msg: Any) -> None:
        """The producers' delivery callback (called for failures only)."""
        if err is None:
            return
        self.undelivered += 1
        if err.code() in _PERMANENT_DELIVERY:
            self.permanent = True
        if len(self.errors) < 3:
            self.errors.append(f"{msg.topic()} [{msg.partition()}]: {err.str()} ({err.name()})")

    def fatal(self, error: str) -> None:
        """A fatal client error: nothing produced since the last commit can be trusted."""
        self.errors.append(error)
        self.undelivered = max(self.undelivered, 1)

    def poll(self, producer: Any, timeout: float = 0.0) -> None:
        """``producer.poll``: serve its delivery reports (failures land here).

        confluent-kafka raises a producer's fatal error (fenced by a newer instance, ...) from
        the first poll or flush after it, instead of passing it to ``error_cb``; it is recorded
        here like the others, so ``check`` rolls back instead of the exception ending the
        worker. When the client's log callback runs in the same call, the exception can be lost
        and the call raise ``SystemError`` ("returned NULL without setting an exception"; seen
        on fencing): the producer's state is then unknown, and it is handled the same way."""
        try:
            producer.poll(timeout)
        except (KafkaException, SystemError) as exc:
            self._fatal_raised(exc)

    def flush(self, producer: Any, timeout: float) -> int:
        """``producer.flush``: the records still unacknowledged (0 after a fatal error, which
        is recorded as in ``poll``)."""
        try:
            return int(producer.flush(timeout))
        except (KafkaException, SystemError) as exc:
            self._fatal_raised(exc)
            return 0

    def _fatal_raised(self, exc: Exception) -> None:
        cause = fatal_cause(exc)
        if cause is None:
            raise exc
        self.fatal(cause)

    def check(self) -> None:
        """Raise what failed deliveries call for: ``DeliveryFailed`` when Kafka refused a record
        for good, ``Rollback`` when an outage made them fail (the records are produced again)."""
        if not self.undelivered:
            return
        causes = "; ".join(self.errors[:3]) or "no cause reported"
        cause = f"{self.undelivered} records undelivered: {causes}"
        if self.permanent:
            raise DeliveryFailed(cause)
        raise Rollback(cause)
