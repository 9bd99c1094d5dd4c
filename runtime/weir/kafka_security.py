"""Kafka client security: ``spec.kafka.sasl``/``tls`` and the secret-bearing environment (or
``weir run``'s flags) turned into librdkafka properties, in one place.

Every client ``weir.kafka`` builds gets them, and the operator may call ``security`` for clients
of its own. No client library is imported here: it is configuration, checked before any client
exists (``KafkaSecurityConfigError``: ``weir run`` exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weir.config import KafkaSecurityInputs, Secret

if TYPE_CHECKING:
    from weir.spec import KafkaSpec

__all__ = ["PLAINTEXT", "SASL_MECHANISMS", "KafkaSecurity", "KafkaSecurityConfigError", "security"]

SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaSecurityConfigError(ValueError):
    """The security settings are incomplete or contradict each other (e.g. SASL without a
    password, a CA file that does not exist). Raised before any client is created."""


@dataclass(frozen=True)
class KafkaSecurity:
    """Resolved Kafka security: what every client of a job uses. Secrets stay ``Secret``s
    until ``properties()`` builds the librdkafka dict, which is handed to the client and
    never logged. ``describe()`` is what logs may show."""

    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    tls: bool = False
    ca_location: str | None = None
    certificate_location: str | None = None
    key_location: str | None = None
    key_password: Secret | None = None

    @property
    def protocol(self) -> str:
        """librdkafka ``security.protocol``."""
        if self.sasl_mechanism is not None:
            return "SASL_SSL" if self.tls else "SASL_PLAINTEXT"
        return "SSL" if self.tls else "PLAINTEXT"

    def properties(self) -> dict[str, str]:
        """The librdkafka properties; empty for plaintext, so properties given another way
        (``spec.kafka.consumer``) are left alone."""
        if self.protocol == "PLAINTEXT":
            return {}
        props = {"security.protocol": self.protocol}
        if self.sasl_mechanism is not None:
            assert self.sasl_username is not None and self.sasl_password is not None
            props["sasl.mechanism"] = self.sasl_mechanism
            props["sasl.username"] = self.sasl_username
            props["sasl.password"] = self.sasl_password.reveal()
        for name, value in (
            ("ssl.ca.location", self.ca_location),
            ("ssl.certificate.location", self.certificate_location),
            ("ssl.key.location", self.key_location),
        ):
            if value is not None:
                props[name] = value
        if self.key_password is not None:
            props["ssl.key.password"] = self.key_password.reveal()
        return props

    def describe(self) -> str:
        """One line for logs and errors, without secrets: ``SASL_SSL (SCRAM-SHA-512 as
        'alice', CA /etc/ca.pem)``."""
        parts = []
        if self.sasl_mechanism is not None:
            parts.append(f"{self.sasl_mechanism} as {self.sasl_username!r}")
        if self.tls:
            parts.append(f"CA {self.ca_location}" if self.ca_location else "system CAs")
            if self.certificate_location:
                parts.append(f"client certificate {self.certificate_location}")
        return f"{self.protocol} ({', '.join(parts)})" if parts else self.protocol


PLAINTEXT = KafkaSecurity()


def security(kafka: KafkaSpec | None, *sources: KafkaSecurityInputs) -> KafkaSecurity:
    """Combine ``spec.kafka.sasl``/``tls`` with ``sources`` (highest precedence first, e.g.
    flags then the environment) into the security every client of the job uses.

    - The SASL mechanism is the first source's that names one, else the spec's; with a
      mechanism, a username and a password are required (from a source: the spec only
      references Secrets). A username or password without any mechanism is an error rather
      than silently connecting without them.
    - TLS is on when the spec has ``tls``, a source says ``tls``, or any source names a TLS
      file; each file is the first source's that names it. A file the spec's ``tls``
      requires (``caSecret``, ``certSecret``/``keySecret``, ``keyPasswordSecret``) must be
      given, and every file named must exist.
    - With security from anywhere, ``spec.kafka.consumer``/``producer`` may not set
      ``security.*``/``sasl.*``/``ssl.*`` too.

    Raises KafkaSecurityConfigError with one line naming the setting and where to give it.
    """

    def first(name: str) -> Any:
        for source in sources:
            value = getattr(source, name)
            if value is not None:
                return value, source.origin
        return None, None

    sasl = kafka.sasl if kafka is not None else None
    tls_spec = kafka.tls if kafka is not None else None

    mechanism, mech_origin = first("sasl_mechanism")
    if mechanism is None and sasl is not None:
        mechanism, mech_origin = sasl.mechanism, "spec.kafka.sasl"
    username, user_origin = first("sasl_username")
    password, password_origin = first("sasl_password")
    if mechanism is not None and mechanism not in SASL_MECHANISMS:
        raise KafkaSecurityConfigError(
            f"SASL mechanism {mechanism!r} (from {mech_origin}) is not one of {', '.join(SASL_MECHANISMS)}"
        )
    if mechanism is None and (username is not None or password is not None):
        given = "username" if username is not None else "password"
        raise KafkaSecurityConfigError(
            f"a SASL {given} is given (in {user_origin or password_origin}) but no SASL mechanism: set "
            "spec.kafka.sasl, --sasl-mechanism or WEIR_KAFKA_SASL_MECHANISM"
        )
    if mechanism is not None:
        if username is None:
            raise KafkaSecurityConfigError(
                f"SASL {mechanism} (from {mech_origin}) needs a username: --sasl-username or "
                "WEIR_KAFKA_SASL_USERNAME"
            )
        if password is None:
            raise KafkaSecurityConfigError(
                f"SASL {mechanism} (from {mech_origin}) needs a password for user {username!r}: "
                "WEIR_KAFKA_SASL_PASSWORD or --sasl-password-file"
            )

    files: dict[str, tuple[str | None, str | None]] = {
        name: first(name) for name in ("ca_location", "certificate_location", "key_location")
    }
    key_password, _ = first("key_password")
    tls_flag, _ = first("tls")
    tls = tls_spec is not None or bool(tls_flag) or any(value for value, _ in files.values())
    if tls_spec is not None:
        required = [
            ("caSecret", tls_spec.ca_secret, "ca_location", "--tls-ca or WEIR_KAFKA_SSL_CA_LOCATION"),
            (
                "certSecret",
                tls_spec.cert_secret,
                "certificate_location",
                "--tls-cert or WEIR_KAFKA_SSL_CERTIFICATE_LOCATION",
            ),
            ("keySecret", tls_spec.key_secret, "key_location", "--tls-key or WEIR_KAFKA_SSL_KEY_LOCATION"),
        ]
        for spec_field, ref, name, where in required:
            if ref is not None and files[name][0] is None:
                raise KafkaSecurityConfigError(
                    f"spec.kafka.tls.{spec_field} is set but its file is not given: {where} "
                    "(the operator mounts it and sets the variable)"
                )
        if tls_spec.key_password_secret is not None and key_password is None:
            raise KafkaSecurityConfigError(
                "spec.kafka.tls.keyPasswordSecret is set but the key password is not given: "
                "WEIR_KAFKA_SSL_KEY_PASSWORD or --tls-key-password-file"
            )
    cert, cert_origin = files["certificate_location"]
    key, key_origin = files["key_location"]
    if (cert is None) != (key is None):
        given, origin = ("certificate", cert_origin) if cert is not None else ("key", key_origin)
        raise KafkaSecurityConfigError(
            f"a TLS client {given} is given (in {origin}) without its "
            f"{'key' if given == 'certificate' else 'certificate'}: mutual TLS needs --tls-cert and "
            "--tls-key (WEIR_KAFKA_SSL_CERTIFICATE_LOCATION and WEIR_KAFKA_SSL_KEY_LOCATION)"
        )
    if key_password is not None and key is None:
        raise KafkaSecurityConfigError("a TLS key password is given without a client key (--tls-key)")
    for name, (value, origin) in files.items():
        if value is not None and not Path(value).is_file():
            what = {
                "ca_location": "CA",
                "certificate_location": "client certificate",
                "key_location": "client key",
            }[name]
            raise KafkaSecurityConfigError(f"the TLS {what} file {value} (from {origin}) does not exist")

    resolved = KafkaSecurity(
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        tls=tls,
        ca_location=files["ca_location"][0],
        certificate_location=cert,
        key_location=key,
        key_password=key_password,
    )
    if kafka is not None and resolved.protocol != "PLAINTEXT":
        for side, properties in (("consumer", kafka.consumer), ("producer", kafka.producer)):
            for name in properties:
                if name.startswith(("security.", "sasl.", "ssl.")):
                    raise KafkaSecurityConfigError(
                        f"spec.kafka.{side}.{name} contradicts the security settings "
                        f"({resolved.describe()}); remove it"
                    )
    return resolved
