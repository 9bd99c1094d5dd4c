"""Kafka security against the suite's real broker: its SASL_SSL listener (SCRAM-SHA-512,
SCRAM-SHA-256 and PLAIN users, TLS with the test CA) and its mutual-TLS listener.

Each job runs as `weir run` subprocesses, configured the way the operator configures a pod
(spec.kafka.sasl/tls plus the WEIR_KAFKA_* variables it renders) or by flags, and its
read_committed output must equal the brute-force reference. Input is produced and output
read over the plaintext listener of the same broker: the worker's own clients are the
ones under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.common import free_port
from harness.kafka import KafkaHelper, Secured, ensure_tls
from harness.s3 import S3Helper

from .test_exactly_once import TUMBLING, as_records, events_for, expected_of, wait_for_output
from .test_pipelines import assert_same, manifest

pytestmark = pytest.mark.kafka

SAFE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("WEIR_KAFKA_S", "WEIR_KAFKA_TLS"))}


@dataclass
class Security:
    """How one run is secured: the bootstrap, what goes into spec.kafka, the environment the
    operator would render, the flags, and every secret that must never show."""

    bootstrap: str
    spec: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    expect_in_log: str = ""


def _ref(name: str, key: str) -> dict[str, str]:
    return {"name": name, "key": key}


def _sasl_as_the_operator_renders_it(s: Secured, mechanism: str) -> Security:
    """``spec.kafka.sasl`` + ``tls`` naming Secrets, and the variables the operator renders from them."""
    user = s.users[mechanism]
    return Security(
        bootstrap=s.sasl_bootstrap,
        spec={
            "sasl": {
                "mechanism": mechanism,
                "usernameSecret": _ref("kafka-user", "username"),
                "passwordSecret": _ref("kafka-user", "password"),
            },
            "tls": {"caSecret": _ref("kafka-ca", "ca.crt")},
        },
        env={
            "WEIR_KAFKA_SASL_USERNAME": user.name,
            "WEIR_KAFKA_SASL_PASSWORD": user.password,
            "WEIR_KAFKA_SSL_CA_LOCATION": str(s.tls.ca),
        },
        secrets=[user.password],
        expect_in_log=f"over SASL_SSL ({mechanism} as '{user.name}', CA {s.tls.ca})",
    )


def scram_512_as_the_operator_renders_it(s: Secured, tmp: Path) -> Security:
    return _sasl_as_the_operator_renders_it(s, "SCRAM-SHA-512")


def scram_256_from_flags_and_a_password_file(s: Secured, tmp: Path) -> Security:
    user = s.users["SCRAM-SHA-256"]
    password_file = tmp / "sasl-password"
    password_file.write_text(user.password + "\n")
    return Security(
        bootstrap=s.sasl_bootstrap,
        flags=[
            "--sasl-mechanism",
            "SCRAM-SHA-256",
            "--sasl-username",
            user.name,
            "--sasl-password-file",
            str(password_file),
            "--tls-ca",
            str(s.tls.ca),
        ],
        secrets=[user.password],
        expect_in_log=f"over SASL_SSL (SCRAM-SHA-256 as '{user.name}', CA {s.tls.ca})",
    )


def plain_from_the_spec_with_the_environment(s: Secured, tmp: Path) -> Security:
    return _sasl_as_the_operator_renders_it(s, "PLAIN")


def mutual_tls_with_an_encrypted_key_from_flags(s: Secured, tmp: Path) -> Security:
    return Security(
        bootstrap=s.mtls_bootstrap,
        flags=[
            "--tls-ca",
            str(s.tls.ca),
            "--tls-cert",
            str(s.tls.client_cert),
            "--tls-key",
            str(s.tls.client_key),
            "--tls-key-password-file",
            str(s.tls.client_key_password_file),
        ],
        secrets=[s.tls.client_key_password],
        expect_in_log=f"over SSL (CA {s.tls.ca}, client certificate {s.tls.client_cert})",
    )


def mutual_tls_from_the_spec_as_the_operator_renders_it(s: Secured, tmp: Path) -> Security:
    return Security(
        bootstrap=s.mtls_bootstrap,
        spec={
            "tls": {
                "caSecret": _ref("kafka-ca", "ca.crt"),
                "certSecret": _ref("kafka-client", "tls.crt"),
                "keySecret": _ref("kafka-client", "tls.key"),
                "keyPasswordSecret": _ref("kafka-client", "password"),
            }
        },
        env={
            "WEIR_KAFKA_SSL_CA_LOCATION": str(s.tls.ca),
            "WEIR_KAFKA_SSL_CERTIFICATE_LOCATION": str(s.tls.client_cert),
            "WEIR_KAFKA_SSL_KEY_LOCATION": str(s.tls.client_key),
            "WEIR_KAFKA_SSL_KEY_PASSWORD": s.tls.client_key_password,
        },
        secrets=[s.tls.client_key_password],
        expect_in_log="over SSL (CA",
    )


WAYS: dict[str, Callable[[Secured, Path], Security]] = {
    f.__name__: f
    for f in (
        scram_512_as_the_operator_renders_it,
        scram_256_from_flags_and_a_password_file,
        plain_from_the_spec_with_the_environment,
        mutual_tls_with_an_encrypted_key_from_flags,
        mutual_tls_from_the_spec_as_the_operator_renders_it,
    )
}


def secured_manifest(
    tmp_path: Path, name: str, kafka: KafkaHelper, sec: Security, topics: tuple[str, ...]
) -> Path:
    source, sink, dlq = topics
    path = manifest(tmp_path, name, kafka, source, sink, dlq, TUMBLING)
    doc = json.loads(path.read_text())
    doc["spec"]["kafka"] = {"bootstrapServers": sec.bootstrap, **sec.spec}
    path.write_text(json.dumps(doc))
    return path


class Worker:
    """One `weir run` subprocess with its stdout and stderr kept apart."""

    def __init__(
        self, job: Path, root: Path, sec: Security, *extra: str, store_url: str | None = None
    ) -> None:
        self.root = root
        self.port = free_port()
        self.state = root / "state"
        self.store = root / "store"
        self.store_url = store_url or self.store.as_uri()
        self.out, self.err = root / "stdout.log", root / "stderr.log"
        self.started = time.monotonic()
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "weir",
                    "run",
                    str(job),
                    "--state-dir",
                    str(self.state),
                    "--http-host",
                    "127.0.0.1",
                    "--http-port",
                    str(self.port),
                    "--checkpoint-url",
                    self.store_url,
                    "--checkpoint-interval",
                    "0.5",
                    "--connect-timeout",
                    "30",
                    *sec.flags,
                    *extra,
                ],
                stdout=out,
                stderr=err,
                env={**SAFE_ENV, **sec.env},
            )

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"the worker exited with {code}:\n{self.output()[-4000:]}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return str(r.read().decode())

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait(self, timeout: float) -> tuple[int, float]:
        code = self.proc.wait(timeout)
        return code, time.monotonic() - self.started

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def files_containing(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path} holds {n[:4]}…" for n in needles if n.encode() in data]
    return found


def run_secured_job(
    kafka: KafkaHelper, sec: Security, tmp_path: Path, store_url: str | None = None
) -> tuple[Worker, list[str]]:
    """Run a job secured by ``sec`` to its exact output, stop it with SIGTERM, and return the
    worker and every place in its output, ``/status``, ``/metrics`` or state directory that
    shows one of ``sec.secrets``."""
    events = events_for(12, 800)
    expected = expected_of(events)
    topics = (kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic())
    job = secured_manifest(tmp_path, f"sec-{topics[0][-6:]}", kafka, sec, topics)
    kafka.produce(topics[0], as_records(events))
    worker = Worker(job, tmp_path, sec, "--log-level", "DEBUG", store_url=store_url)
    try:
        got = wait_for_output(kafka, topics[1], expected, timeout=90, check=worker.check)
        status, metrics = worker.get("/status"), worker.get("/metrics")
    finally:
        code = worker.stop()
    assert_same(got, expected)
    assert code == 0, worker.output()[-4000:]
    log = worker.output()
    assert sec.expect_in_log in log
    # The transactions committed the input offsets to the job's group.
    assert kafka.committed(f"weir-test-{json.loads(job.read_text())['metadata']['name']}", topics[0]) == (
        kafka.end_offsets(topics[0])
    )
    assert sec.secrets
    leaks = [
        f"{where} holds {s[:4]}…"
        for where, text in (("log", log), ("/status", status), ("/metrics", metrics))
        for s in sec.secrets
        if s in text
    ]
    return worker, leaks + files_containing(worker.state, sec.secrets)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_a_secured_job_reads_and_writes_exactly_once_and_no_secret_leaves_the_worker(
    way: str, kafka: KafkaHelper, kafka_secured: Secured, tmp_path: Path
) -> None:
    sec = WAYS[way](kafka_secured, tmp_path)
    worker, leaks = run_secured_job(kafka, sec, tmp_path)
    leaks += files_containing(worker.store, sec.secrets)
    assert not leaks, leaks
    assert any(worker.store.rglob("manifest.json")), "no checkpoint reached the store"


@pytest.mark.s3
def test_a_secured_job_checkpointing_to_s3_leaves_no_secret_in_the_bucket(
    kafka: KafkaHelper, kafka_secured: Secured, s3: S3Helper, tmp_path: Path
) -> None:
    sec = scram_512_as_the_operator_renders_it(kafka_secured, tmp_path)
    sec.env.update(s3.env())
    sec.secrets.append(s3.secret_key)
    _, leaks = run_secured_job(kafka, sec, tmp_path, store_url=f"s3://{s3.bucket}/checkpoints")
    client = s3.client()
    try:
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
            for o in page.get("Contents", ())
        ]
        for key in keys:
            data = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
            leaks += [f"s3://{s3.bucket}/{key} holds {x[:4]}…" for x in sec.secrets if x.encode() in data]
    finally:
        client.close()
    assert not leaks, leaks
    assert any(k.endswith("manifest.json") for k in keys), keys


@dataclass
class Refusal:
    security: Callable[[Secured, Path], Security]
    cause: str


def _wrong_password(s: Secured, tmp: Path) -> Security:
    sec = scram_512_as_the_operator_renders_it(s, tmp)
    sec.env["WEIR_KAFKA_SASL_PASSWORD"] = "wrong-" + s.users["SCRAM-SHA-512"].password
    sec.secrets = [sec.env["WEIR_KAFKA_SASL_PASSWORD"], s.users["SCRAM-SHA-512"].password]
    return sec


def _unknown_user(s: Secured, tmp: Path) -> Security:
    sec = scram_512_as_the_operator_renders_it(s, tmp)
    sec.env["WEIR_KAFKA_SASL_USERNAME"] = "mallory"
    return sec


def _wrong_mechanism(s: Secured, tmp: Path) -> Security:
    sec = scram_256_from_flags_and_a_password_file(s, tmp)  # bob exists for SCRAM-SHA-256 only
    sec.flags[1] = "SCRAM-SHA-512"
    return sec


def _untrusted_broker(s: Secured, tmp: Path) -> Security:
    sec = scram_512_as_the_operator_renders_it(s, tmp)
    del sec.env["WEIR_KAFKA_SSL_CA_LOCATION"]
    sec.spec["tls"] = {}  # verified against the system CAs, which never signed the test broker
    return sec


def _no_client_certificate(s: Secured, tmp: Path) -> Security:
    return Security(bootstrap=s.mtls_bootstrap, flags=["--tls-ca", str(s.tls.ca)])


def _wrong_key_password(s: Secured, tmp: Path) -> Security:
    sec = mutual_tls_from_the_spec_as_the_operator_renders_it(s, tmp)
    sec.env["WEIR_KAFKA_SSL_KEY_PASSWORD"] = "wrong-" + s.tls.client_key_password
    sec.secrets = [sec.env["WEIR_KAFKA_SSL_KEY_PASSWORD"], s.tls.client_key_password]
    return sec


REFUSALS = {
    "wrong password": Refusal(
        _wrong_password, "Kafka authentication failed for user 'alice' with SCRAM-SHA-512"
    ),
    "unknown user": Refusal(
        _unknown_user, "Kafka authentication failed for user 'mallory' with SCRAM-SHA-512"
    ),
    "wrong mechanism": Refusal(
        _wrong_mechanism, "Kafka authentication failed for user 'bob' with SCRAM-SHA-512"
    ),
    "untrusted broker certificate": Refusal(_untrusted_broker, "certificate verify failed"),
    "no client certificate": Refusal(_no_client_certificate, "the broker refused the connection"),
    "wrong key password": Refusal(_wrong_key_password, "client key"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_credentials_or_tls_exit_4_at_once_with_one_line_naming_the_cause(
    case: str, kafka: KafkaHelper, kafka_secured: Secured, tmp_path: Path
) -> None:
    refusal = REFUSALS[case]
    sec = refusal.security(kafka_secured, tmp_path)
    topics = (kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic())
    job = secured_manifest(tmp_path, "refused", kafka, sec, topics)
    worker = Worker(job, tmp_path, sec)
    code, elapsed = worker.wait(60)
    stderr = worker.err.read_text(errors="replace")
    assert code == 4, worker.output()
    # Well before --connect-timeout (30 s): a refusal is not retried.
    assert elapsed < 10, f"took {elapsed:.1f}s"
    problems = [line for line in stderr.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(problems) == 1, stderr
    assert refusal.cause in problems[0], problems[0]
    assert "Traceback" not in stderr and "%3|" not in stderr, stderr
    leaked = [s[:4] for s in sec.secrets if s in worker.output()]
    assert not leaked, leaked


def test_weir_demo_runs_over_sasl_ssl_with_flags_and_a_wrong_password_exits_4(
    kafka_secured: Secured, tmp_path: Path
) -> None:
    user = kafka_secured.users["SCRAM-SHA-512"]
    command = [
        sys.executable,
        "-m",
        "weir",
        "demo",
        "--bootstrap-servers",
        kafka_secured.sasl_bootstrap,
        "--sasl-mechanism",
        "SCRAM-SHA-512",
        "--sasl-username",
        user.name,
        "--tls-ca",
        str(kafka_secured.tls.ca),
    ]
    env = {**SAFE_ENV, "WEIR_KAFKA_SASL_PASSWORD": "wrong-" + user.password}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "Kafka authentication failed for user 'alice' with SCRAM-SHA-512" in refused.stdout

    env["WEIR_KAFKA_SASL_PASSWORD"] = user.password
    done = subprocess.run(
        [*command, "--duration", "10", "--rate", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Its producer, its reader and its worker (a `weir run` under `weir up`) all went over SASL_SSL.
    summary = done.stdout.strip().splitlines()[-1]
    produced, read = int(summary.split()[0]), int(summary.split(", ")[1].split()[0])
    assert produced > 0 and read > 0, summary
    assert user.password not in done.stdout + done.stderr


def test_the_test_pki_is_made_once_per_directory_and_again_when_a_file_is_missing(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    files = ensure_tls(tls_dir)
    first_ca = files.ca.read_bytes()
    for cert in (files.broker, files.client_cert):
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(files.ca), str(cert)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verified.returncode == 0, verified.stderr
    san = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(files.broker)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in san and "DNS:localhost" in san

    assert ensure_tls(tls_dir).ca.read_bytes() == first_ca  # cached
    files.client_key.unlink()
    again = ensure_tls(tls_dir)
    assert again.complete() and again.ca.read_bytes() != first_ca  # a new, consistent set
