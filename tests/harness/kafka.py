"""A single-node Apache Kafka broker (KRaft, combined broker + controller) for tests and dev.

The broker comes from the Maven Central jars (``kafka-pom.xml`` beside this file) fetched
with Maven into ``CACHE/kafka-<version>/libs`` and runs on the machine's JDK 17. Each fresh
start formats new storage, so a run never sees topics left by an earlier one; a broker that
is already up (``make services-up``) is reused as it is.

Besides the plaintext listener every test uses, the broker has two secured listeners for the
Kafka security tests (``Secured`` describes them; inter-broker and controller traffic stays
plaintext):

- ``SASL_SSL`` on the broker's port + 2 (or ``WEIR_KAFKA_SASL_PORT``): SCRAM-SHA-512 and
  SCRAM-SHA-256 users created at format time (``kafka-storage format --add-scram``) and a
  PLAIN user from the listener's JAAS config; passwords are random per formatted storage;
- ``SSL`` with required client certificates (mutual TLS) on the broker's port + 3 (or
  ``WEIR_KAFKA_MTLS_PORT``).

Certificates come from the openssl CLI: a CA, a broker certificate for 127.0.0.1/localhost
(subjectAltName, so clients verify the host name) and a client certificate whose key is
encrypted with a password. They are kept in ``<run dir>/tls`` and made again when a file is
missing.
"""

from __future__ import annotations

import secrets
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
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port},SASL_SSL://{host}:{sasl_port},SSL://{host}:{mtls_port}
advertised.listeners=PLAINTEXT://{host}:{port},SASL_SSL://{host}:{sasl_port},SSL://{host}:{mtls_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
# The secured listeners (see the module docstring). PEM key stores need no keytool step.
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\\
    org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=\\
    org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=\\
    org.apache.kafka.common.security.plain.PlainLoginModule required user_{plain_user}="{plain_password}";
ssl.keystore.type=PEM
ssl.keystore.location={broker_pem}
ssl.truststore.type=PEM
ssl.truststore.location={ca_pem}
listener.name.ssl.ssl.client.auth=required
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


# Extensions for the certificates the CA signs: the broker's names what clients dial (librdkafka
# verifies the host name by default), the client's is for mutual TLS.
_CERT_EXTENSIONS = """\
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[broker]
basicConstraints = CA:FALSE
subjectAltName = IP:127.0.0.1, DNS:localhost
extendedKeyUsage = serverAuth
[client]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the test PKI: the CA, the broker's key store (key + chain), and a client
    certificate for mutual TLS whose key is encrypted with ``client_key_password``."""

    ca: Path
    broker: Path
    client_cert: Path
    client_key: Path
    client_key_password_file: Path

    @property
    def client_key_password(self) -> str:
        return self.client_key_password_file.read_text().strip()

    @classmethod
    def under(cls, directory: Path) -> TlsFiles:
        return cls(
            ca=directory / "ca.pem",
            broker=directory / "broker.pem",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
            client_key_password_file=directory / "client-key-password",
        )

    def complete(self) -> bool:
        return all(
            p.is_file()
            for p in (self.ca, self.broker, self.client_cert, self.client_key, self.client_key_password_file)
        )


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServerError(f"openssl {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def ensure_tls(directory: Path) -> TlsFiles:
    """The test PKI under ``directory``, made with the openssl CLI when a file is missing.

    EC P-256 keys: generating them takes milliseconds, where RSA keys would slow every fresh
    start. Files are written to a temporary directory and moved into place together, so an
    interrupted run never leaves a half-made set that looks complete.
    """
    files = TlsFiles.under(directory)
    if files.complete():
        return files
    if shutil.which("openssl") is None:
        raise ServerError("no `openssl` on PATH: the Kafka test broker's TLS listeners need it")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "ext.cnf").write_text(_CERT_EXTENSIONS)
    key_password = secrets.token_hex(12)
    (tmp / "client-key-password").write_text(key_password + "\n")
    ec = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    _openssl("genpkey", *ec, "-out", "ca.key", cwd=tmp)
    _openssl("req", "-new", "-key", "ca.key", "-subj", "/CN=weir test CA", "-out", "ca.csr", cwd=tmp)
    _openssl(
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-signkey",
        "ca.key",
        "-days",
        "3650",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "ca",
        "-out",
        "ca.pem",
        cwd=tmp,
    )
    _openssl("genpkey", *ec, "-out", "broker.key", cwd=tmp)
    _openssl("req", "-new", "-key", "broker.key", "-subj", "/CN=localhost", "-out", "broker.csr", cwd=tmp)
    _openssl(
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "2",
        "-days",
        "3650",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "broker",
        "-out",
        "broker.crt",
        cwd=tmp,
    )
    # Kafka's PEM key store: the (PKCS#8) private key followed by the certificate chain.
    (tmp / "broker.pem").write_text(
        (tmp / "broker.key").read_text() + (tmp / "broker.crt").read_text() + (tmp / "ca.pem").read_text()
    )
    _openssl("genpkey", *ec, "-aes-256-cbc", "-pass", f"pass:{key_password}", "-out", "client.key", cwd=tmp)
    _openssl(
        "req",
        "-new",
        "-key",
        "client.key",
        "-passin",
        f"pass:{key_password}",
        "-subj",
        "/CN=weir-client",
        "-out",
        "client.csr",
        cwd=tmp,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "3",
        "-days",
        "3650",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "client",
        "-out",
        "client.pem",
        cwd=tmp,
    )
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return files


@dataclass(frozen=True)
class User:
    """A SASL user of the test broker's SASL_SSL listener."""

    name: str
    mechanism: str
    password: str


@dataclass(frozen=True)
class Secured:
    """How to reach the broker's secured listeners (from ``Running.info["secured"]``)."""

    sasl_bootstrap: str
    """``SASL_SSL`` listener: TLS with the test CA, then SASL."""
    mtls_bootstrap: str
    """``SSL`` listener that requires a client certificate signed by the test CA."""
    tls: TlsFiles
    users: dict[str, User]
    """By mechanism: ``SCRAM-SHA-512``, ``SCRAM-SHA-256`` and ``PLAIN``."""

    @classmethod
    def of(cls, running: Running) -> Secured:
        info = running.info.get("secured")
        if not info:
            raise ServerError(
                f"the broker recorded in {running.run_dir} was started without the secured listeners "
                "(by an older harness); stop it (`python -m harness down kafka`) and start it again"
            )
        tls = TlsFiles.under(Path(info["tls_dir"]))
        return cls(
            sasl_bootstrap=info["sasl_bootstrap"],
            mtls_bootstrap=info["mtls_bootstrap"],
            tls=tls,
            users={u["mechanism"]: User(**u) for u in info["users"]},
        )

    def sasl_config(self, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """librdkafka properties for the SASL_SSL listener as the user of ``mechanism``."""
        user = self.users[mechanism]
        return {
            "bootstrap.servers": self.sasl_bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": mechanism,
            "sasl.username": user.name,
            "sasl.password": user.password,
            "ssl.ca.location": str(self.tls.ca),
        }

    def mtls_config(self) -> dict[str, str]:
        """librdkafka properties for the mutual-TLS listener with the client certificate."""
        return {
            "bootstrap.servers": self.mtls_bootstrap,
            "security.protocol": "SSL",
            "ssl.ca.location": str(self.tls.ca),
            "ssl.certificate.location": str(self.tls.client_cert),
            "ssl.key.location": str(self.tls.client_key),
            "ssl.key.password": self.tls.client_key_password,
        }


def _users() -> list[User]:
    """Fresh random passwords for each formatted storage (hex: no character needs quoting in
    ``--add-scram`` or the JAAS line)."""
    return [
        User("alice", "SCRAM-SHA-512", "alice-" + secrets.token_hex(12)),
        User("bob", "SCRAM-SHA-256", "bob-" + secrets.token_hex(12)),
        User("carol", "PLAIN", "carol-" + secrets.token_hex(12)),
    ]


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
        # Derived from the broker's port so that each checkout's ports stay one block.
        sasl_port = env_port("WEIR_KAFKA_SASL_PORT", port + 2)
        mtls_port = env_port("WEIR_KAFKA_MTLS_PORT", port + 3)
        for p in (port, controller_port, sasl_port, mtls_port):
            if port_open(p):
                raise ServerError(
                    f"port {p} is taken by another process; set WEIR_KAFKA_PORT / "
                    "WEIR_KAFKA_CONTROLLER_PORT / WEIR_KAFKA_SASL_PORT / WEIR_KAFKA_MTLS_PORT to free ports"
                )
        tls = ensure_tls(rdir / "tls")
        users = _users()
        plain = next(u for u in users if u.mechanism == "PLAIN")
        data = rdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        props = rdir / "server.properties"
        props.write_text(
            SERVER_PROPERTIES.format(
                host=HOST,
                port=port,
                controller_port=controller_port,
                sasl_port=sasl_port,
                mtls_port=mtls_port,
                plain_user=plain.name,
                plain_password=plain.password,
                broker_pem=tls.broker,
                ca_pem=tls.ca,
                data=data,
                max_message_bytes=MAX_MESSAGE_BYTES,
            )
        )
        props.chmod(0o600)  # it holds the PLAIN user's password
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
                *(
                    arg
                    for u in users
                    if u.mechanism.startswith("SCRAM-")
                    for arg in ("--add-scram", f"{u.mechanism}=[name={u.name},password={u.password}]")
                ),
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
        info = {
            "bootstrap": bootstrap,
            "port": port,
            "version": VERSION,
            "log": str(rdir / "broker.log"),
            "secured": {
                "sasl_bootstrap": f"{HOST}:{sasl_port}",
                "mtls_bootstrap": f"{HOST}:{mtls_port}",
                "tls_dir": str(rdir / "tls"),
                "users": [vars(u) for u in users],
            },
        }
        write_info(rdir, info)
        (rdir / "info.json").chmod(0o600)  # it holds the test users' passwords
        return Running(NAME, info, rdir, started_here=True)


def down() -> None:
    stop_pid(run_dir(NAME))


def describe(r: Running) -> str:
    text = f"Kafka {r.info['version']} (KRaft, single node): bootstrap.servers={r.info['bootstrap']}\n"
    if r.info.get("secured"):
        secured = Secured.of(r)
        users = ", ".join(f"{u.name} {m}" for m, u in secured.users.items())
        text += (
            f"  SASL_SSL: {secured.sasl_bootstrap} (users {users}; passwords in {r.run_dir / 'info.json'}), "
            f"mutual TLS: {secured.mtls_bootstrap}, CA {secured.tls.ca}\n"
        )
    return text + f"  logs: {r.run_dir / 'server.log'}, {r.info['log']}"


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

    def __init__(self, bootstrap: str, config: dict[str, str] | None = None) -> None:
        """``config``: librdkafka properties every client of the helper gets (security
        settings for a secured listener, e.g. ``Secured.sasl_config()``)."""
        self.bootstrap = bootstrap
        self._base: dict[str, Any] = {"bootstrap.servers": bootstrap, **(config or {})}
        self._admin: Any = None

    def admin(self) -> Any:
        """One AdminClient for the helper: a client must outlive the futures it returns."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient(dict(self._base))
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
                **self._base,
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

        consumer = Consumer({**self._base, "group.id": self.unique("probe")})
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
                **self._base,
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
