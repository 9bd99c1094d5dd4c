"""Kafka security settings: spec, environment and flags combined into librdkafka properties,
the errors for incomplete settings, refusals told apart from outages, and secrets kept out
of every repr. No broker: tests/integration/test_kafka_security.py runs them against one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError, KafkaException

from weir import cli
from weir import kafka as kio
from weir.config import Environment, KafkaSecurityInputs, Secret
from weir.spec import KafkaSpec, StreamJob
from weir_operator import render

GOLDEN = Path(__file__).parent / "golden"
PASSWORD = "pa55-word-that-must-not-show"
KEY_PASSWORD = "key-pa55-that-must-not-show"


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    """Stand-ins for the PEM files (their existence is checked, their content is librdkafka's)."""
    files = {}
    for name in ("ca", "cert", "key", "other-ca"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        files[name] = str(path)
    return files


def _ref(name: str, key: str) -> dict[str, str]:
    return {"name": name, "key": key}


SASL = {
    m: {"mechanism": m, "usernameSecret": _ref("u", "user"), "passwordSecret": _ref("u", "pw")}
    for m in kio.SASL_MECHANISMS
}
TLS = {
    "system CAs": {},
    "CA": {"caSecret": _ref("ca", "ca.crt")},
    "mutual": {
        "caSecret": _ref("ca", "ca.crt"),
        "certSecret": _ref("c", "tls.crt"),
        "keySecret": _ref("c", "tls.key"),
    },
    "mutual, encrypted key": {
        "caSecret": _ref("ca", "ca.crt"),
        "certSecret": _ref("c", "tls.crt"),
        "keySecret": _ref("c", "tls.key"),
        "keyPasswordSecret": _ref("c", "pw"),
    },
}


def kafka_spec(sasl: str | None = None, tls: str | None = None, **extra: Any) -> KafkaSpec:
    doc: dict[str, Any] = {"bootstrapServers": "b:9093", **extra}
    if sasl is not None:
        doc["sasl"] = SASL[sasl]
    if tls is not None:
        doc["tls"] = TLS[tls]
    return KafkaSpec.model_validate(doc)


def operator_env(pem: dict[str, str]) -> KafkaSecurityInputs:
    """Every variable the operator may render, as the worker's environment has them."""
    return Environment.read(
        {
            "WEIR_KAFKA_SASL_USERNAME": "alice",
            "WEIR_KAFKA_SASL_PASSWORD": PASSWORD,
            "WEIR_KAFKA_SSL_CA_LOCATION": pem["ca"],
            "WEIR_KAFKA_SSL_CERTIFICATE_LOCATION": pem["cert"],
            "WEIR_KAFKA_SSL_KEY_LOCATION": pem["key"],
            "WEIR_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
        }
    ).kafka_security


def only(inputs: KafkaSecurityInputs, spec: KafkaSpec) -> KafkaSecurityInputs:
    """What the operator renders for ``spec``: only the variables its sasl/tls reference."""
    tls = spec.tls
    return KafkaSecurityInputs(
        sasl_username=inputs.sasl_username if spec.sasl else None,
        sasl_password=inputs.sasl_password if spec.sasl else None,
        ca_location=inputs.ca_location if tls and tls.ca_secret else None,
        certificate_location=inputs.certificate_location if tls and tls.cert_secret else None,
        key_location=inputs.key_location if tls and tls.key_secret else None,
        key_password=inputs.key_password if tls and tls.key_password_secret else None,
    )


@pytest.mark.parametrize(("sasl", "tls"), list(itertools.product([None, *kio.SASL_MECHANISMS], [None, *TLS])))
def test_every_combination_of_sasl_and_tls_in_the_spec_maps_to_its_librdkafka_properties(
    sasl: str | None, tls: str | None, pem: dict[str, str]
) -> None:
    spec = kafka_spec(sasl, tls)
    props = kio.security(spec, only(operator_env(pem), spec)).properties()

    expected: dict[str, str] = {}
    if sasl or tls is not None:
        expected["security.protocol"] = spec.security_protocol
    if sasl:
        expected.update({"sasl.mechanism": sasl, "sasl.username": "alice", "sasl.password": PASSWORD})
    if tls is not None and tls != "system CAs":
        expected["ssl.ca.location"] = pem["ca"]
    if tls in ("mutual", "mutual, encrypted key"):
        expected.update({"ssl.certificate.location": pem["cert"], "ssl.key.location": pem["key"]})
    if tls == "mutual, encrypted key":
        expected["ssl.key.password"] = KEY_PASSWORD
    assert props == expected


def test_the_variables_the_operator_renders_are_the_ones_the_worker_reads(tmp_path: Path) -> None:
    job = StreamJob.model_validate(yaml.safe_load((GOLDEN / "streamjob-full.yaml").read_text()))
    container = render.render(job, render.RenderOptions(default_image="weir:test")).stateful_set["spec"][
        "template"
    ]["spec"]["containers"][0]
    # As the kubelet would: secretKeyRefs resolved, the TLS volume mounted (here under tmp_path).
    values = {"username": "alice", "password": PASSWORD, "key-password": KEY_PASSWORD}
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"].replace(render.KAFKA_TLS_DIR, str(tmp_path))
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = values.get(var["valueFrom"]["secretKeyRef"]["key"], "other")
    for file in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / file).write_text("pem")

    props = kio.security(job.spec.kafka, Environment.read(env).kafka_security).properties()

    assert props == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "alice",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(tmp_path / "ca.crt"),
        "ssl.certificate.location": str(tmp_path / "tls.crt"),
        "ssl.key.location": str(tmp_path / "tls.key"),
        "ssl.key.password": KEY_PASSWORD,
    }


def test_flags_override_the_environment_which_overrides_the_spec(pem: dict[str, str]) -> None:
    spec = kafka_spec("SCRAM-SHA-512", "CA")
    env = KafkaSecurityInputs(
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="from-env",
        sasl_password=Secret("env-pw"),
        ca_location=pem["ca"],
    )
    flags = KafkaSecurityInputs(
        sasl_mechanism="PLAIN",
        sasl_username="from-flags",
        ca_location=pem["other-ca"],
        origin="the command line",
    )

    assert kio.security(spec, env).sasl_mechanism == "SCRAM-SHA-256"
    props = kio.security(spec, flags, env).properties()

    assert props["sasl.mechanism"] == "PLAIN"
    assert props["sasl.username"] == "from-flags"
    assert props["sasl.password"] == "env-pw"  # the flags do not name one: the environment's
    assert props["ssl.ca.location"] == pem["other-ca"]


def test_flags_alone_secure_a_job_whose_spec_has_no_security(pem: dict[str, str]) -> None:
    flags = KafkaSecurityInputs(
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="bob",
        sasl_password=Secret(PASSWORD),
        ca_location=pem["ca"],
    )
    security = kio.security(kafka_spec(), flags)
    assert security.protocol == "SASL_SSL"
    assert kio.security(kafka_spec(), KafkaSecurityInputs(tls=True)).properties() == {
        "security.protocol": "SSL"
    }
    assert kio.security(kafka_spec(), KafkaSecurityInputs()).properties() == {}
    assert kio.security(None).properties() == {}


@pytest.mark.parametrize(
    ("spec", "inputs", "message"),
    [
        (
            kafka_spec("SCRAM-SHA-512"),
            KafkaSecurityInputs(sasl_username="alice"),
            "SASL SCRAM-SHA-512 (from spec.kafka.sasl) needs a password for user 'alice': "
            "WEIR_KAFKA_SASL_PASSWORD or "
            "--sasl-password-file",
        ),
        (
            kafka_spec("PLAIN"),
            KafkaSecurityInputs(sasl_password=Secret(PASSWORD)),
            "SASL PLAIN (from spec.kafka.sasl) needs a username: --sasl-username or WEIR_KAFKA_SASL_USERNAME",
        ),
        (
            kafka_spec(),
            KafkaSecurityInputs(sasl_username="alice", sasl_password=Secret(PASSWORD)),
            "a SASL username is given (in the environment) but no SASL mechanism: set spec.kafka.sasl, "
            "--sasl-mechanism or WEIR_KAFKA_SASL_MECHANISM",
        ),
        (
            kafka_spec(),
            KafkaSecurityInputs(sasl_mechanism="GSSAPI"),
            "SASL mechanism 'GSSAPI' (from the environment) is not one of "
            "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            kafka_spec(tls="CA"),
            KafkaSecurityInputs(),
            "spec.kafka.tls.caSecret is set but its file is not given: "
            "--tls-ca or WEIR_KAFKA_SSL_CA_LOCATION",
        ),
        (
            kafka_spec(tls="mutual"),
            KafkaSecurityInputs(ca_location="{ca}"),
            "spec.kafka.tls.certSecret is set but its file is not given",
        ),
        (
            kafka_spec(tls="mutual, encrypted key"),
            KafkaSecurityInputs(ca_location="{ca}", certificate_location="{cert}", key_location="{key}"),
            "spec.kafka.tls.keyPasswordSecret is set but the key password is not given",
        ),
        (
            kafka_spec(),
            KafkaSecurityInputs(certificate_location="{cert}"),
            "a TLS client certificate is given (in the environment) without its key",
        ),
        (
            kafka_spec(),
            KafkaSecurityInputs(key_password=Secret(KEY_PASSWORD)),
            "a TLS key password is given without a client key",
        ),
        (
            kafka_spec(),
            KafkaSecurityInputs(ca_location="/nonexistent/ca.pem", origin="the command line"),
            "the TLS CA file /nonexistent/ca.pem (from the command line) does not exist",
        ),
        (
            kafka_spec(consumer={"security.protocol": "SSL"}),
            KafkaSecurityInputs(tls=True),
            "spec.kafka.consumer.security.protocol contradicts the security settings "
            "(SSL (system CAs)); remove it",
        ),
    ],
)
def test_incomplete_or_contradictory_settings_are_one_clear_error(
    spec: KafkaSpec, inputs: KafkaSecurityInputs, message: str, pem: dict[str, str]
) -> None:
    inputs = KafkaSecurityInputs(
        **{
            name: value.format(**pem) if isinstance(value, str) and name.endswith("location") else value
            for name, value in vars(inputs).items()
        }
    )
    with pytest.raises(kio.KafkaSecurityConfigError) as raised:
        kio.security(spec, inputs)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_secrets_never_show_in_a_repr_a_description_or_an_error() -> None:
    security = kio.KafkaSecurity(
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password=Secret(PASSWORD),
        tls=True,
        key_password=Secret(KEY_PASSWORD),
    )
    settings = kio.KafkaSettings("b:9093", {}, {}, security=security)
    env = Environment.read(
        {"WEIR_KAFKA_SASL_PASSWORD": PASSWORD, "WEIR_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD}
    )
    shown = [repr(settings), str(settings), security.describe(), repr(env), str(env.kafka_security)]
    for text in shown:
        assert PASSWORD not in text and KEY_PASSWORD not in text, text
    assert security.describe() == "SASL_SSL (SCRAM-SHA-512 as 'alice', system CAs)"
    assert env.kafka_security.sasl_password == Secret(PASSWORD)
    # Only the properties handed to a client hold them.
    assert kio.client_config(settings)["sasl.password"] == PASSWORD


def test_the_environment_a_child_process_gets_reads_back_as_the_same_settings(pem: dict[str, str]) -> None:
    inputs = KafkaSecurityInputs(
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="bob",
        sasl_password=Secret(PASSWORD),
        tls=True,
        ca_location=pem["ca"],
        certificate_location=pem["cert"],
        key_location=pem["key"],
        key_password=Secret(KEY_PASSWORD),
    )
    assert KafkaSecurityInputs.read(inputs.environment()) == inputs
    assert KafkaSecurityInputs().environment() == {}


def _error(code: int, text: str) -> KafkaError:
    return KafkaError(code, text)


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (
            _error(
                KafkaError._AUTHENTICATION,
                "sasl_ssl://h:9094/bootstrap: SASL authentication error: "
                "Authentication failed during authentication due to invalid credentials with SASL mechanism "
                "SCRAM-SHA-512 (after 300ms in state AUTH_REQ)",
            ),
            True,
        ),
        (
            _error(
                KafkaError._SSL, "ssl://h:9094/bootstrap: SSL handshake failed: certificate verify failed"
            ),
            True,
        ),
        (
            _error(
                KafkaError._TRANSPORT,
                "ssl://h:9095/bootstrap: Receive failed: error:0A000412:SSL routines::"
                "ssl/tls alert bad certificate: SSL alert number 42 (after 0ms in state APIVERSION_QUERY)",
            ),
            True,
        ),
        (
            _error(
                KafkaError._TRANSPORT, "h:9092/bootstrap: Connect to ipv4#h:9092 failed: Connection refused"
            ),
            False,
        ),
        (
            _error(
                KafkaError._TRANSPORT,
                "ssl://h:9095/1: SSL_read: error:0A000126:SSL routines::unexpected eof while reading",
            ),
            False,
        ),
        (_error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"), False),
    ],
)
def test_a_refusal_is_told_apart_from_a_broker_that_is_away(error: KafkaError, refused: bool) -> None:
    assert kio.refused(error) is refused


class RefusingAdmin:
    """Stands in for ``kio.Admin`` whose error_cb saw the broker refuse the login."""

    def __init__(self, refusal: KafkaError | None) -> None:
        self.refusal: KafkaError | None = None
        self._pending = refusal
        self.attempts: list[float] = []

    def list_topics(self, timeout: float) -> Any:
        self.attempts.append(timeout)
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))

    def poll(self, timeout: float) -> int:
        self.refusal = self._pending
        return 0


def test_a_refused_login_stops_waiting_for_the_broker_at_the_first_attempt() -> None:
    admin = RefusingAdmin(
        _error(
            KafkaError._AUTHENTICATION,
            "sasl_ssl://h:9094/bootstrap: SASL authentication "
            "error: Authentication failed (after 300ms in state AUTH_REQ)",
        )
    )
    security = kio.KafkaSecurity(
        sasl_mechanism="SCRAM-SHA-512", sasl_username="alice", sasl_password=Secret(PASSWORD), tls=True
    )
    settings = kio.KafkaSettings("h:9094", {}, {}, connect_timeout_s=60, security=security)
    slept: list[float] = []

    with pytest.raises(kio.KafkaAuthFailed) as raised:
        kio.wait_for_broker(admin, settings, sleep=slept.append, clock=lambda: 0.0)  # type: ignore[arg-type]

    assert admin.attempts == [1.0] and slept == []
    assert str(raised.value) == (
        "Kafka authentication failed for user 'alice' with SCRAM-SHA-512 at h:9094: "
        "SASL authentication error: Authentication failed; check the username and password "
        "(spec.kafka.sasl's Secrets, WEIR_KAFKA_SASL_*, "
        "--sasl-*)"
    )


def test_a_broker_that_is_away_is_retried_until_the_timeout() -> None:
    admin = RefusingAdmin(None)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    settings = kio.KafkaSettings("h:9092", {}, {}, connect_timeout_s=5)
    with pytest.raises(kio.KafkaUnavailable):
        kio.wait_for_broker(admin, settings, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert len(admin.attempts) > 2


def test_a_client_key_that_cannot_be_loaded_is_an_auth_failure_not_a_traceback(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nnot a key\n-----END ENCRYPTED PRIVATE KEY-----\n")
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate")
    security = kio.KafkaSecurity(
        tls=True, certificate_location=str(cert), key_location=str(key), key_password=Secret(KEY_PASSWORD)
    )
    with pytest.raises(kio.KafkaAuthFailed) as raised:
        kio.admin(kio.KafkaSettings("127.0.0.1:1", {}, {}, security=security))
    assert "Kafka client not created" in str(raised.value)
    assert KEY_PASSWORD not in str(raised.value)


def _job(tmp_path: Path, kafka: dict[str, Any]) -> Path:
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "weir.dev/v1alpha1",
                "kind": "StreamJob",
                "metadata": {"name": "j", "namespace": "test"},
                "spec": {
                    "kafka": {"bootstrapServers": "127.0.0.1:1", **kafka},
                    "pipeline": {
                        "source": {"topics": ["in"], "eventTime": {"field": "ts"}},
                        "steps": [
                            {"window": {"type": "tumbling", "size": "10s"}},
                            {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
                        ],
                        "sink": {"topic": "out"},
                    },
                },
            }
        )
    )
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("WEIR_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_weir_run_without_the_sasl_password_exits_2_with_one_line_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _job(tmp_path, {"sasl": SASL["SCRAM-SHA-512"]})
    monkeypatch.setenv("WEIR_KAFKA_SASL_USERNAME", "alice")

    code = cli.main(["run", str(job), "--state-dir", str(tmp_path / "state"), "--http-port", "0"])

    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_SPEC == 2
    assert err.strip().splitlines() == [
        f"{job}: SASL SCRAM-SHA-512 (from spec.kafka.sasl) needs a password for user 'alice': "
        "WEIR_KAFKA_SASL_PASSWORD or --sasl-password-file"
    ]


@pytest.mark.usefixtures("clean_env")
def test_weir_run_reads_the_sasl_password_from_a_file_and_an_unreadable_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job(tmp_path, {})
    args = [
        "run",
        str(job),
        "--sasl-mechanism",
        "SCRAM-SHA-256",
        "--sasl-username",
        "bob",
        "--sasl-password-file",
        str(tmp_path / "missing"),
        "--http-port",
        "0",
    ]

    code = cli.main(args)

    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"{job}: --sasl-password-file {tmp_path / 'missing'}: No such file or directory"
    )
