"""Outage bookkeeping: back-off, one log line per change of state, status and totals (fake clocks)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from weir.outages import Backoff, Dependencies

pytestmark = pytest.mark.timeout(5)


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocks() -> tuple[FakeClock, FakeClock]:
    return FakeClock(1000.0), FakeClock(1_767_225_600.0)  # monotonic, wall (2026-01-01T00:00:00Z)


@pytest.fixture
def deps(clocks: tuple[FakeClock, FakeClock]) -> Dependencies:
    mono, wall = clocks
    return Dependencies(clock=mono, wall=wall, logger=logging.getLogger("test.outages"))


def test_backoff_doubles_from_the_initial_delay_and_stops_at_the_cap() -> None:
    backoff = Backoff(0.5, 30.0)

    assert [backoff.next() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_starts_over_after_a_reset() -> None:
    backoff = Backoff(1.0, 4.0)
    for _ in range(5):
        backoff.next()
    backoff.reset()

    assert backoff.next() == 1.0


def test_backoff_refuses_an_initial_delay_above_its_cap() -> None:
    with pytest.raises(ValueError, match="initial_s <= cap_s"):
        Backoff(10.0, 5.0)


def test_an_outage_logs_one_line_going_down_and_one_coming_back_however_many_failures(
    deps: Dependencies, clocks: tuple[FakeClock, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    mono, _ = clocks
    caplog.set_level(logging.INFO, logger="test.outages")

    assert deps.down("kafka", "127.0.0.1:9092: 1/1 brokers are down") is True
    for i in range(200):  # librdkafka reports every failed reconnect
        mono.now += 0.3
        assert deps.down("kafka", f"Connect to 127.0.0.1:9092 failed (attempt {i})") is False
    assert deps.up("kafka") == pytest.approx(60.0)
    assert deps.up("kafka") is None  # already up: nothing to say

    assert [r.getMessage() for r in caplog.records] == [
        "kafka unreachable: 127.0.0.1:9092: 1/1 brokers are down; retrying",
        "kafka back after 60.0 s",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]


def test_status_names_each_unreachable_dependency_since_when_and_why(
    deps: Dependencies, clocks: tuple[FakeClock, FakeClock]
) -> None:
    mono, _ = clocks
    deps.down("store", "listing s3://b/ck/checkpoints/ failed:\n  Connect timeout")
    mono.now += 12.34
    deps.down("store", "writing s3://b/ck/x failed: Connection refused")

    assert deps.status() == {
        "store": {
            "since": "2026-01-01T00:00:00.000Z",
            "seconds": 12.3,
            "error": "listing s3://b/ck/checkpoints/ failed: Connect timeout",
            "lastError": "writing s3://b/ck/x failed: Connection refused",
            "outages": 1,
        }
    }
    assert deps.reason() == "store unreachable: writing s3://b/ck/x failed: Connection refused"
    assert deps.is_down("store") and not deps.is_down("kafka")


def test_nothing_is_reported_while_every_dependency_is_up(deps: Dependencies) -> None:
    assert deps.status() == {}
    assert deps.reason() == ""
    assert deps.seconds_total("kafka") == 0.0


def test_outage_seconds_add_up_over_outages_and_grow_during_one(
    deps: Dependencies, clocks: tuple[FakeClock, FakeClock]
) -> None:
    mono, _ = clocks
    deps.down("kafka", "down")
    mono.now += 61.2
    deps.up("kafka")
    mono.now += 100.0  # up: does not count
    deps.down("kafka", "down again")
    mono.now += 5.0

    assert deps.seconds_total("kafka") == pytest.approx(66.2)
    assert deps.status()["kafka"]["outages"] == 2
    assert deps.seconds_total("store") == 0.0


def test_the_two_dependencies_go_down_and_come_back_independently(
    deps: Dependencies, clocks: tuple[FakeClock, FakeClock]
) -> None:
    mono, _ = clocks
    deps.down("kafka", "brokers down")
    deps.down("store", "connect timeout")
    mono.now += 3.0

    assert deps.up("store") == pytest.approx(3.0)
    assert deps.reason() == "kafka unreachable: brokers down"
    assert list(deps.status()) == ["kafka"]


# -- what is an outage and what is the user's mistake -------------------------------------------


def s3_error(code: str, message: str, operation: str = "ListObjectsV2") -> Exception:
    from botocore.exceptions import ClientError

    error: Exception = ClientError({"Error": {"Code": code, "Message": message}}, operation)
    return error


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
        ("SignatureDoesNotMatch", "The request signature we calculated does not match."),
        ("AccessDenied", "Access Denied"),
        ("NoSuchBucket", "The specified bucket does not exist"),
        ("AuthorizationHeaderMalformed", "the region 'us-east-1' is wrong; expecting 'eu-west-1'"),
    ],
)
def test_an_s3_refusal_the_user_must_fix_is_store_refused_on_one_line_naming_the_cause(
    code: str, message: str
) -> None:
    from weir.objectstores import S3Settings, StoreRefused
    from weir.s3_backend import S3Backend

    backend = S3Backend("jobs", S3Settings(endpoint_url="http://s3.example:9000", access_key_id="AKIA",
                                           secret_access_key="very-secret", region="us-east-1"))
    error = backend._fail("listing", "weir/ns/job/checkpoints/", s3_error(code, message))

    assert isinstance(error, StoreRefused)
    where = "listing s3://jobs/weir/ns/job/checkpoints/ refused by http://s3.example:9000: "
    assert str(error).startswith(where)
    assert code in str(error) and "\n" not in str(error)
    assert "very-secret" not in str(error)


def test_an_unreachable_s3_endpoint_is_a_checkpoint_error_worth_retrying_not_a_refusal() -> None:
    from botocore.exceptions import EndpointConnectionError

    from weir.objectstores import CheckpointError, NotFound, S3Settings, StoreRefused
    from weir.s3_backend import S3Backend

    backend = S3Backend("jobs", S3Settings(endpoint_url="http://127.0.0.1:9"))
    error = backend._fail("listing", "p/", EndpointConnectionError(endpoint_url="http://127.0.0.1:9/jobs"))

    assert type(error) is CheckpointError
    assert "Could not connect to the endpoint URL" in str(error)
    assert not isinstance(backend._fail("reading", "k", s3_error("NoSuchKey", "no")), StoreRefused)
    assert isinstance(backend._fail("reading", "k", s3_error("NoSuchKey", "no")), NotFound)


def test_an_unusable_s3_endpoint_url_is_refused_when_the_client_is_made() -> None:
    from weir.objectstores import S3Settings, StoreRefused
    from weir.s3_backend import S3Backend

    with pytest.raises(StoreRefused, match="Invalid endpoint"):
        S3Backend("jobs", S3Settings(endpoint_url="htp//minio:9000"))


# -- librdkafka's lines -------------------------------------------------------------------------


def librdkafka_record(text: str, level: int = logging.ERROR) -> logging.LogRecord:
    # confluent-kafka calls logger.log(level, "%s [%s] %s", facility, client name, message)
    args = ("FAIL", "rdkafka#producer-1", text)
    return logging.LogRecord("weir.kafka.librdkafka", level, "", 0, "%s [%s] %s", args, None)


def test_librdkafka_reconnect_failures_are_debug_and_hidden_at_info_level() -> None:
    from weir.kafka import _QuietLibrdkafka

    quiet = _QuietLibrdkafka(clock=FakeClock(0.0))
    logging.getLogger("weir.kafka.librdkafka").setLevel(logging.INFO)
    record = librdkafka_record("127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused")

    assert quiet.filter(record) is False
    assert record.levelno == logging.DEBUG


def test_other_librdkafka_lines_show_once_a_minute_whatever_their_numbers() -> None:
    from weir.kafka import _QuietLibrdkafka

    clock = FakeClock(0.0)
    quiet = _QuietLibrdkafka(every_s=60.0, clock=clock)
    shown = []
    for i in range(100):
        clock.now = i * 1.5
        record = librdkafka_record(f"Topic t-1 partition {i % 4} produce failed: queue full")
        shown.append(quiet.filter(record))

    assert shown.count(True) == 3  # at 0, 60 and 120 s


# -- how long a starting worker waits -----------------------------------------------------------


def test_a_starting_worker_waits_for_ever_inside_kubernetes_and_a_minute_on_a_laptop() -> None:
    import math

    from weir.cli import _connect_timeout
    from weir.config import Environment

    in_pod = Environment.read({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).in_kubernetes
    assert _connect_timeout(None, in_pod) == math.inf
    assert _connect_timeout(None, Environment.read({}).in_kubernetes) == 60.0
    assert _connect_timeout(0, False) == math.inf
    assert _connect_timeout(5, True) == 5


# -- undelivered records: an outage rolls back, a refused record stops, both name the cause -------


class FakeMessage:
    def topic(self) -> str:
        return "revenue-out"

    def partition(self) -> int:
        return 3


def example_worker(tmp_path: Any) -> Any:
    from pathlib import Path

    from weir import kafka as kio
    from weir.graph import compile_job
    from weir.spec import load_job
    from weir.worker import Worker, WorkerSettings

    job = load_job(Path(__file__).parents[2] / "runtime" / "weir" / "examples" / "revenue.yaml")
    return Worker(compile_job(job), kio.KafkaSettings("127.0.0.1:9", {}, {}), WorkerSettings(0, 1, tmp_path))


def test_records_that_timed_out_during_an_outage_roll_back_naming_the_cause_in_full() -> None:
    from confluent_kafka import KafkaError

    from weir.edges import Rollback
    from weir.kafka import Deliveries

    deliveries = Deliveries()
    for _ in range(590):
        deliveries.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), FakeMessage())

    with pytest.raises(Rollback) as raised:
        deliveries.check()
    cause = "revenue-out [3]: Local: Message timed out (_MSG_TIMED_OUT)"
    assert str(raised.value) == "590 records undelivered: " + "; ".join([cause] * 3)


def test_a_record_kafka_refuses_for_good_stops_the_worker_naming_the_cause() -> None:
    from confluent_kafka import KafkaError

    from weir.edges import DeliveryFailed
    from weir.kafka import Deliveries

    deliveries = Deliveries()
    deliveries.on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), FakeMessage())

    with pytest.raises(
        DeliveryFailed, match=r"1 records undelivered: revenue-out \[3\]: .*MSG_SIZE_TOO_LARGE"
    ):
        deliveries.check()


def test_while_a_dependency_is_down_the_worker_is_not_ready_and_says_why(tmp_path: Any) -> None:
    worker = example_worker(tmp_path)
    worker.ready = True
    assert worker.readiness() == (True, "")

    worker.deps.down("store", "listing s3://b/ck/ failed: connect timeout")

    assert worker.readiness() == (False, "store unreachable: listing s3://b/ck/ failed: connect timeout")


def test_stop_during_a_start_up_outage_ends_the_wait_at_once(tmp_path: Any) -> None:
    from weir.worker import Stopped

    worker = example_worker(tmp_path)
    worker.deps.down("kafka", "127.0.0.1:9: Connection refused")
    worker.stop()

    with pytest.raises(Stopped, match=r"kafka unreachable: 127\.0\.0\.1:9: Connection refused"):
        worker._pause(60.0)


def test_a_wait_out_of_an_outage_keeps_the_worker_alive_and_its_status_fresh(tmp_path: Any) -> None:
    worker = example_worker(tmp_path)
    worker.alive_at = 0.0
    worker.deps.down("store", "connect timeout")

    worker._pause(0.3)

    assert worker.alive()
    assert worker.status().outages["store"].error == "connect timeout"
    assert worker.status().ready is False
