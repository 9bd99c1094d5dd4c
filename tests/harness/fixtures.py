"""Session-scoped pytest fixtures for the real Kafka broker and S3 server.

A fixture reuses a server that is already up (``make services-up``) and leaves it running;
one it starts itself it stops when the session ends. A server that cannot be built or
started fails the tests that need it: it never skips them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import kafka as kafka_server
from harness import s3 as s3_server
from harness.common import Running, ServerError


def _start(module: object, request: pytest.FixtureRequest) -> Iterator[Running]:
    try:
        running: Running = module.up()  # type: ignore[attr-defined]
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield running
    finally:
        failed = request.session.testsfailed
        if failed:
            # The server log is the first thing to read when a server-backed test fails.
            print(f"\n--- {running.name} server log (tail) ---\n{running.log_tail()}")
        if running.started_here:
            module.down()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def kafka_running(request: pytest.FixtureRequest) -> Iterator[Running]:
    yield from _start(kafka_server, request)


@pytest.fixture(scope="session")
def kafka(kafka_running: Running) -> kafka_server.KafkaHelper:
    """The real broker: ``.bootstrap``, ``create_topic``, ``produce``, ``read_all``, ``committed``."""
    return kafka_server.KafkaHelper(str(kafka_running.info["bootstrap"]))


@pytest.fixture(scope="session")
def kafka_secured(kafka_running: Running) -> kafka_server.Secured:
    """The same broker's secured listeners: ``.sasl_bootstrap`` (SASL_SSL with SCRAM-SHA-512,
    SCRAM-SHA-256 and PLAIN ``.users``), ``.mtls_bootstrap`` (client certificate required),
    ``.tls`` (CA, client certificate and encrypted key)."""
    try:
        return kafka_server.Secured.of(kafka_running)
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def s3_running(request: pytest.FixtureRequest) -> Iterator[Running]:
    yield from _start(s3_server, request)


@pytest.fixture
def s3(s3_running: Running) -> s3_server.S3Helper:
    """The real S3 server with a fresh bucket for this test (``.bucket``)."""
    helper = s3_server.S3Helper(s3_running)
    helper.bucket = helper.new_bucket()
    return helper
