"""A single-node Apache Kafka broker (KRaft, combined broker + controller) for tests and dev.

The broker comes from the Maven Central jars (``kafka-pom.xml`` beside this file) fetched
with Maven into ``CACHE/kafka-<version>/libs`` and runs on the machine's JDK 17. Each fresh
start formats new storage, so a run never sees topics left by an earlier one; a broker that
is already up (``make services-up``) is reused as it is.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common import (
    CACHE,
    HOST,
    Running,
    ServerError,
    env_port,
    fetch_maven_jars,
    file_lock,
    java,
    port_open,
    read_live_info,
    run_dir,
    spawn,
    stop_pid,
    wait_until,
    write_info,
)

VERSION = "3.9.1"
POM = Path(__file__).with_name("kafka-pom.xml")
NAME = "kafka"

# Big enough for the runtime's oversized-value tests (a 2 MB record must reach the broker so
# that weir can dead-letter it); the real default of 1 MB is what users usually run.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
auto.create.topics.enable=false
# A single node: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
# Consumer groups in tests should not wait 3 s for more members before the first assignment.
group.initial.rebalance.delay.ms=0
message.max.bytes={max_message_bytes}
replica.fetch.max.bytes={max_message_bytes}
num.network.threads=2
num.io.threads=4
log.retention.check.interval.ms=60000
"""

LOG4J = """\
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
"""


def libs_dir() -> Path:
    return CACHE / f"kafka-{VERSION}" / "libs"


def ensure_jars() -> Path:
    """Fetch the broker's jars with Maven once; later calls return the cached directory."""
    return fetch_maven_jars(POM, libs_dir(), f"Kafka {VERSION} jars", {"kafka.version": VERSION})


def _java() -> str:
    return java()


def _broker_ready(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    metadata = admin.list_topics(timeout=2)
    return bool(metadata.brokers)


def up() -> Running:
    """Start the broker, or reuse the one already recorded as running."""
    rdir = run_dir(NAME)
    with file_lock(rdir):
        info = read_live_info(rdir)
        if info is not None and port_open(int(info["port"])):
            return Running(NAME, info, rdir, started_here=False)
        stop_pid(rdir)
        libs = ensure_jars()
        port = env_port("WEIR_KAFKA_PORT", 19092)
        controller_port = env_port("WEIR_KAFKA_CONTROLLER_PORT", 19093)
        for p in (port, controller_port):
            if port_open(p):
                raise ServerError(
                    f"port {p} is taken by another process; set WEIR_KAFKA_PORT / "
                    "WEIR_KAFKA_CONTROLLER_PORT to free ports"
                )
        data = rdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        props = rdir / "server.properties"
        props.write_text(
            SERVER_PROPERTIES.format(
                host=HOST,
                port=port,
                controller_port=controller_port,
                data=data,
                max_message_bytes=MAX_MESSAGE_BYTES,
            )
        )
        log4j = rdir / "log4j.properties"
        log4j.write_text(LOG4J.format(log=rdir / "broker.log"))
        classpath = f"{libs}/*"
        java = _java()
        log_opt = f"-Dlog4j.configuration=file:{log4j}"
        cluster_id = (
            subprocess.run(
                [java, "-cp", classpath, log_opt, "kafka.tools.StorageTool", "random-uuid"],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        fmt = subprocess.run(
            [
                java,
                "-cp",
                classpath,
                log_opt,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(props),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise ServerError(f"formatting Kafka storage failed:\n{fmt.stdout}\n{fmt.stderr}")
        spawn(
            [
                java,
                "-Xms256m",
                "-Xmx1g",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                log_opt,
                "-cp",
                classpath,
                "kafka.Kafka",
                str(props),
            ],
            rdir,
        )
        bootstrap = f"{HOST}:{port}"
        wait_until(lambda: port_open(port), 60, "Kafka broker port", rdir / "server.log")
        wait_until(lambda: _broker_ready(bootstrap), 60, "Kafka broker metadata", rdir / "server.log")
        info = {"bootstrap": bootstrap, "port": port, "version": VERSION, "log": str(rdir / "broker.log")}
        write_info(rdir, info)
        return Running(NAME, info, rdir, started_here=True)


def down() -> None:
    stop_pid(run_dir(NAME))


def describe(r: Running) -> str:
    return (
        f"Kafka {r.info['version']} (KRaft, single node): bootstrap.servers={r.info['bootstrap']}\n"
        f"  logs: {r.run_dir / 'server.log'}, {r.info['log']}"
    )


@dataclass(frozen=True)
class Message:
    """One consumed record, detached from the client library's object."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes], ...]


class KafkaHelper:
    """What tests need from the broker: topics, producing, and reading a topic to its end."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin: Any = None

    def admin(self) -> Any:
        """One AdminClient for the helper: a client must outlive the futures it returns."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    def unique(self, prefix: str = "t") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    def create_topic(
        self, name: str | None = None, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        from confluent_kafka.admin import NewTopic

        name = name or self.unique()
        futures = self.admin().create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30,
        )
        futures[name].result(timeout=30)
        # Metadata propagates asynchronously even on one node: wait until every partition
        # has a leader so the first produce does not race topic creation.
        wait_until(lambda: self._has_leaders(name, partitions), 30, f"topic {name} leaders")
        return name

    def _has_leaders(self, topic: str, partitions: int) -> bool:
        md = self.admin().list_topics(topic, timeout=5).topics.get(topic)
        return (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        )

    def producer(self, **config: Any) -> Any:
        from confluent_kafka import Producer

        return Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": 5,
                "message.max.bytes": MAX_MESSAGE_BYTES,
                **config,
            }
        )

    def produce(self, topic: str, records: Iterable[dict[str, Any]]) -> int:
        """Produce records given as dicts with ``value`` and optional ``key``, ``partition``,
        ``timestamp`` (ms) and ``headers``; waits for every delivery and fails on any error."""
        producer = self.producer()
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        count = 0
        for rec in records:
            kwargs = {k: rec[k] for k in ("key", "partition", "timestamp", "headers") if k in rec}
            while True:
                try:
                    producer.produce(topic, rec.get("value"), on_delivery=on_delivery, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.1)
            count += 1
            if count % 10_000 == 0:
                producer.poll(0)
        remaining = producer.flush(60)
        if remaining or errors:
            raise AssertionError(f"produce to {topic} failed: {remaining} undelivered, errors {errors[:5]}")
        return count

    def end_offsets(self, topic: str) -> dict[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.unique("probe")})
        try:
            md = consumer.list_topics(topic, timeout=10).topics[topic]
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in sorted(md.partitions)
            }
        finally:
            consumer.close()

    def read_all(self, topic: str, isolation: str = "read_committed", timeout: float = 60.0) -> list[Message]:
        """Every record of ``topic`` from the beginning to the end it has now.

        With ``read_committed`` the end is the last stable offset: records of open
        transactions are not waited for, records of aborted ones are never returned.
        """
        return list(self._iter_all(topic, isolation, timeout))

    def _iter_all(self, topic: str, isolation: str, timeout: float) -> Iterator[Message]:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.unique("reader"),
                "isolation.level": isolation,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            pending = set(partitions)
            deadline = time.monotonic() + timeout
            while pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"reading {topic} to its end timed out; partitions left {pending}")
                for msg in consumer.consume(1000, timeout=0.5):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(msg.partition())
                            continue
                        raise AssertionError(f"reading {topic}: {err}")
                    pending.add(msg.partition())  # more records after an earlier EOF
                    yield Message(
                        msg.topic(),
                        msg.partition(),
                        msg.offset(),
                        msg.key(),
                        msg.value(),
                        msg.timestamp()[1],
                        tuple(msg.headers() or ()),
                    )
        finally:
            consumer.close()

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offsets for ``topic`` as the AdminClient reports them."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        partitions = sorted(self.admin().list_topics(topic, timeout=10).topics[topic].partitions)
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
        result = self.admin().list_consumer_group_offsets([request])[group].result(timeout=30)
        return {tp.partition: tp.offset for tp in result.topic_partitions}
