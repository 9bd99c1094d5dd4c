"""How workers reach Kafka and the checkpoint store: connection, security and store settings."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from weir.spec_common import (
    LocatedError,
    ObjectName,
    PositiveDuration,
    SecretKey,
    SecretKeyRef,
    SpecModel,
)

# Properties the runtime sets itself: overriding them would break offsets, exactly-once
# delivery or the consumer group that lag is measured on.
_RUNTIME_OWNED_KAFKA_PROPERTIES = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "isolation.level",
        "transactional.id",
        "enable.idempotence",
    }
)
_SECRET_PROPERTY_RE = re.compile(r"password|secret|ssl\.key\.pem|sasl\.jaas\.config")

_KAFKA_PROPERTIES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {"x-kubernetes-int-or-string": True},
}


def _check_kafka_properties(value: dict[str, Any]) -> dict[str, Any]:
    for name, prop in value.items():
        if name in _RUNTIME_OWNED_KAFKA_PROPERTIES:
            raise LocatedError((name,), "is set by the weir runtime and must not be given here")
        if _SECRET_PROPERTY_RE.search(name):
            raise LocatedError(
                (name,), "is a secret: secrets never go in a StreamJob; workers get them from the environment"
            )
        if not isinstance(prop, str | int | bool):
            raise LocatedError((name,), f"must be a string, integer or boolean (got {prop!r})")
    return value


KafkaProperties = Annotated[dict[str, Any], WithJsonSchema(_KAFKA_PROPERTIES_SCHEMA)]




class KafkaSasl(SpecModel):
    """SASL authentication to the brokers; the username and password come from Secrets.

    Workers receive them as the environment variables ``WEIR_KAFKA_SASL_USERNAME`` and
    ``WEIR_KAFKA_SASL_PASSWORD`` (``secretKeyRef``), never through the StreamJob or its ConfigMap.
    """

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    """The SASL mechanism (librdkafka ``sasl.mechanism``)."""
    username_secret: SecretKeyRef
    """Secret key holding the username."""
    password_secret: SecretKeyRef
    """Secret key holding the password."""


class KafkaTls(SpecModel):
    """TLS to the brokers. An empty object means TLS verified against the image's system CAs.

    Workers find each PEM file at the path named by ``WEIR_KAFKA_SSL_CA_LOCATION``,
    ``WEIR_KAFKA_SSL_CERTIFICATE_LOCATION`` and ``WEIR_KAFKA_SSL_KEY_LOCATION`` (mounted
    from the Secrets), and the key's password in ``WEIR_KAFKA_SSL_KEY_PASSWORD``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.certSecret) == has(self.keySecret)",
                    "message": "certSecret and keySecret go together (mutual TLS needs both)",
                },
                {
                    "rule": "!has(self.keyPasswordSecret) || has(self.keySecret)",
                    "message": "keyPasswordSecret only applies with keySecret",
                },
            ]
        }
    )

    ca_secret: SecretKeyRef | None = None
    """PEM certificate(s) of the CA that signed the brokers' certificates; omitted means the
    system CAs."""
    cert_secret: SecretKeyRef | None = None
    """PEM client certificate for mutual TLS; needs ``keySecret``."""
    key_secret: SecretKeyRef | None = None
    """PEM private key of the client certificate; needs ``certSecret``."""
    key_password_secret: SecretKeyRef | None = None
    """Password of an encrypted ``keySecret``."""

    @model_validator(mode="after")
    def _pairs(self) -> KafkaTls:
        if (self.cert_secret is None) != (self.key_secret is None):
            pair = ("keySecret", "certSecret")
            missing, given = pair if self.key_secret is None else pair[::-1]
            raise LocatedError((missing,), f"is required with {given} (mutual TLS needs both)")
        if self.key_password_secret is not None and self.key_secret is None:
            raise LocatedError(("keyPasswordSecret",), "only applies with keySecret")
        return self


SecurityProtocol: TypeAlias = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]

# Properties that kafka.sasl and kafka.tls decide; giving them as well would contradict them.
_SECURITY_KAFKA_PROPERTIES = frozenset(
    {"security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username"}
)


class KafkaSpec(SpecModel):
    """How workers reach Kafka; secrets are not part of it, only references to them."""

    bootstrap_servers: Annotated[str, Field(min_length=1)]
    """``host:port[,host:port...]`` of the brokers."""
    consumer: KafkaProperties = {}
    """Extra librdkafka consumer properties (string, integer or boolean values)."""
    producer: KafkaProperties = {}
    """Extra librdkafka producer properties (string, integer or boolean values)."""
    sasl: KafkaSasl | None = None
    """SASL authentication; omitted means none."""
    tls: KafkaTls | None = None
    """TLS to the brokers; omitted means plaintext."""

    @field_validator("consumer", "producer")
    @classmethod
    def _properties(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_kafka_properties(value)

    @model_validator(mode="after")
    def _security_set_once(self) -> KafkaSpec:
        if self.sasl is None and self.tls is None:
            return self
        for side, properties in (("consumer", self.consumer), ("producer", self.producer)):
            for name in properties:
                if name in _SECURITY_KAFKA_PROPERTIES or name.startswith("ssl."):
                    raise LocatedError((side, name), "is decided by kafka.sasl / kafka.tls; remove it here")
        return self

    @property
    def security_protocol(self) -> SecurityProtocol:
        """librdkafka ``security.protocol`` implied by ``sasl`` and ``tls``."""
        if self.sasl is not None:
            return "SASL_SSL" if self.tls is not None else "SASL_PLAINTEXT"
        return "SSL" if self.tls is not None else "PLAINTEXT"


# --------------------------------------------------------------------------- checkpoints

# s3://bucket[/prefix] with S3's bucket naming rules, or an absolute file:// path.
_STORE_URL_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.*)$"


def _check_store_url(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(_STORE_URL_PATTERN, value):
        raise ValueError(
            f"must be s3://bucket[/prefix] (a valid S3 bucket name) or file:///absolute/path (got {value!r})"
        )
    return value


class CheckpointCredentials(SpecModel):
    """The Secret with the S3 access key; workers get its values as ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` (``secretKeyRef``)."""

    name: ObjectName
    """Name of the Secret."""
    access_key_id_key: SecretKey = "AWS_ACCESS_KEY_ID"
    """Key holding the access key id."""
    secret_access_key_key: SecretKey = "AWS_SECRET_ACCESS_KEY"
    """Key holding the secret access key."""


class CheckpointSpec(SpecModel):
    """Where and how often workers checkpoint their state and offsets.

    Checkpoints go to ``<url>/<namespace>/<job>/checkpoints/<id>/`` and savepoints to
    ``<url>/<namespace>/<job>/savepoints/<id>/``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.url.startsWith('s3://') || "
                    "!(has(self.endpoint) || has(self.region) || has(self.credentialsSecret))",
                    "message": "endpoint, region and credentialsSecret only apply to an s3:// url",
                }
            ]
        }
    )

    url: Annotated[str, Field(pattern=_STORE_URL_PATTERN), BeforeValidator(_check_store_url)]
    """The store: ``s3://bucket/prefix`` or ``file:///absolute/path``."""
    interval: PositiveDuration = 10_000
    """Time between checkpoints (default 10s)."""
    retain: Annotated[int, Field(ge=1, strict=True)] = 3
    """Completed checkpoints kept per job; older ones are deleted (savepoints are never)."""
    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/.*)?$")] | None = None
    """S3 endpoint of an S3-compatible server (path-style addressing); omitted means AWS."""
    region: Annotated[str, Field(min_length=1)] | None = None
    """S3 region; omitted means the AWS SDK's default."""
    credentials_secret: CheckpointCredentials | None = None
    """Secret with the S3 access key; omitted means the pod's ambient credentials (e.g. a
    ServiceAccount bound to an IAM role)."""
    cleanup_policy: Literal["retain", "delete"] = "retain"
    """What happens to the job's checkpoints and savepoints when the StreamJob is deleted:
    ``retain`` keeps them; ``delete`` makes the operator hold the StreamJob (a finalizer)
    until its workers have stopped and it has removed ``<url>/<namespace>/<name>/`` with its
    own credentials; a store it cannot reach for 10 minutes is left, with a Warning event."""

    @model_validator(mode="after")
    def _s3_only_members(self) -> CheckpointSpec:
        if not self.url.startswith("s3://"):
            for name in ("endpoint", "region", "credentials_secret"):
                if getattr(self, name) is not None:
                    alias = to_camel(name)
                    raise LocatedError((alias,), "only applies to an s3:// url")
        return self


# --------------------------------------------------------------------------- pods
