"""The one place the runtime reads its environment: worker identity, paths, ports and the
Kafka security values the operator renders from Secrets."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_ORDINAL = re.compile(r"-(\d+)$")


class Secret:
    """A secret value that never shows in ``repr``/``str`` (so not in logs, tracebacks,
    ``/status`` or a dataclass's repr); ``reveal()`` is called only where a client library
    needs the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class KafkaSecurityInputs:
    """Kafka security values from one source (the environment, or ``weir run``'s flags);
    None means the source does not say. ``weir.kafka.security`` combines sources with
    ``spec.kafka.sasl``/``tls`` into client properties.
    """

    sasl_mechanism: str | None = None
    """``WEIR_KAFKA_SASL_MECHANISM`` / ``--sasl-mechanism``: overrides ``spec.kafka.sasl.mechanism``."""
    sasl_username: str | None = None
    """``WEIR_KAFKA_SASL_USERNAME`` / ``--sasl-username``."""
    sasl_password: Secret | None = None
    """``WEIR_KAFKA_SASL_PASSWORD`` / the content of ``--sasl-password-file``."""
    tls: bool | None = None
    """``WEIR_KAFKA_TLS`` / ``--tls``: TLS verified against the system CAs even without files."""
    ca_location: str | None = None
    """``WEIR_KAFKA_SSL_CA_LOCATION`` / ``--tls-ca``: PEM file of the CA(s) to trust."""
    certificate_location: str | None = None
    """``WEIR_KAFKA_SSL_CERTIFICATE_LOCATION`` / ``--tls-cert``: PEM client certificate."""
    key_location: str | None = None
    """``WEIR_KAFKA_SSL_KEY_LOCATION`` / ``--tls-key``: PEM private key of the client certificate."""
    key_password: Secret | None = None
    """``WEIR_KAFKA_SSL_KEY_PASSWORD`` / the content of ``--tls-key-password-file``."""
    origin: str = "the environment"
    """Where the values come from, for error messages."""

    @classmethod
    def read(cls, env: Mapping[str, str]) -> KafkaSecurityInputs:
        def get(name: str) -> str | None:
            return env.get(name) or None

        password, key_password = get("WEIR_KAFKA_SASL_PASSWORD"), get("WEIR_KAFKA_SSL_KEY_PASSWORD")
        tls = get("WEIR_KAFKA_TLS")
        return cls(
            sasl_mechanism=get("WEIR_KAFKA_SASL_MECHANISM"),
            sasl_username=get("WEIR_KAFKA_SASL_USERNAME"),
            sasl_password=Secret(password) if password is not None else None,
            tls=None if tls is None else tls.strip().lower() in ("1", "true", "yes", "on"),
            ca_location=get("WEIR_KAFKA_SSL_CA_LOCATION"),
            certificate_location=get("WEIR_KAFKA_SSL_CERTIFICATE_LOCATION"),
            key_location=get("WEIR_KAFKA_SSL_KEY_LOCATION"),
            key_password=Secret(key_password) if key_password is not None else None,
        )

    def environment(self) -> dict[str, str]:
        """The inverse of ``read``: the variables that give a child process these values."""
        values = {
            "WEIR_KAFKA_SASL_MECHANISM": self.sasl_mechanism,
            "WEIR_KAFKA_SASL_USERNAME": self.sasl_username,
            "WEIR_KAFKA_SASL_PASSWORD": self.sasl_password.reveal() if self.sasl_password else None,
            "WEIR_KAFKA_TLS": None if self.tls is None else str(self.tls).lower(),
            "WEIR_KAFKA_SSL_CA_LOCATION": self.ca_location,
            "WEIR_KAFKA_SSL_CERTIFICATE_LOCATION": self.certificate_location,
            "WEIR_KAFKA_SSL_KEY_LOCATION": self.key_location,
            "WEIR_KAFKA_SSL_KEY_PASSWORD": self.key_password.reveal() if self.key_password else None,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class Environment:
    """What a worker learns from its environment; command-line flags override each field."""

    worker_index: int | None
    """``WEIR_WORKER_INDEX``, else, inside Kubernetes, the ordinal at the end of ``HOSTNAME``
    (a StatefulSet pod is named ``<job>-<ordinal>``), else None."""
    workers: int | None
    """``WEIR_WORKERS``: how many workers the job has."""
    state_dir: Path
    """``WEIR_STATE_DIR``: where RocksDB state lives (default: a ``weir`` folder in the temp dir)."""
    http_port: int
    """``WEIR_HTTP_PORT``: the metrics and control port (default 9249)."""
    bootstrap_servers: str | None
    """``WEIR_KAFKA_BOOTSTRAP_SERVERS``: overrides ``spec.kafka.bootstrapServers``."""
    checkpoint_url: str | None = None
    """``WEIR_CHECKPOINT_URL``: overrides ``spec.checkpoint.url``."""
    restore_from: str | None = None
    """``WEIR_RESTORE_FROM``: a savepoint to start from (set by the operator for an upgrade)."""
    in_kubernetes: bool = False
    """``KUBERNETES_SERVICE_HOST`` is set (in every pod): a starting worker then waits for an
    unreachable broker or store for ever, not ready, instead of exiting."""
    memory_budget: str | None = None
    """``WEIR_MEMORY_BUDGET``: the worker's memory budget, bytes or a quantity such as ``256Mi``
    (set by the operator from the pod's memory limit; parsed by ``weir.memory.parse_size``)."""
    kafka_security: KafkaSecurityInputs = KafkaSecurityInputs()
    """``WEIR_KAFKA_SASL_*``, ``WEIR_KAFKA_TLS`` and ``WEIR_KAFKA_SSL_*``: see KafkaSecurityInputs."""
    max_records_per_second: float | None = None
    """``WEIR_MAX_RECORDS_PER_SECOND``: a worker processes at most this many input records per
    second (tests and benchmarks of the autoscaler: a known capacity); None: no limit."""
    allow_state_reset: bool = False
    """``WEIR_ALLOW_STATE_RESET=1`` (``true``/``yes``): a restore whose snapshot holds state of
    another shape starts empty from the snapshot's offsets instead of exiting with code 2 (set
    by the operator for ``spec.upgrade.allowStateReset`` or ``upgradeMode: stateless``)."""

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if env is None else env
        index: int | None = None
        if env.get("WEIR_WORKER_INDEX"):
            index = int(env["WEIR_WORKER_INDEX"])
        elif env.get("KUBERNETES_SERVICE_HOST") and (m := _ORDINAL.search(env.get("HOSTNAME", ""))):
            index = int(m.group(1))
        return cls(
            worker_index=index,
            workers=int(env["WEIR_WORKERS"]) if env.get("WEIR_WORKERS") else None,
            state_dir=Path(env.get("WEIR_STATE_DIR") or Path(tempfile.gettempdir()) / "weir"),
            http_port=int(env.get("WEIR_HTTP_PORT") or 9249),
            bootstrap_servers=env.get("WEIR_KAFKA_BOOTSTRAP_SERVERS") or None,
            checkpoint_url=env.get("WEIR_CHECKPOINT_URL") or None,
            restore_from=env.get("WEIR_RESTORE_FROM") or None,
            in_kubernetes=bool(env.get("KUBERNETES_SERVICE_HOST")),
            memory_budget=env.get("WEIR_MEMORY_BUDGET") or None,
            kafka_security=KafkaSecurityInputs.read(env),
            max_records_per_second=float(env["WEIR_MAX_RECORDS_PER_SECOND"])
            if env.get("WEIR_MAX_RECORDS_PER_SECOND") else None,
            allow_state_reset=(env.get("WEIR_ALLOW_STATE_RESET") or "").strip().lower()
            in ("1", "true", "yes"),
        )
