"""The worker control API over real HTTP on 127.0.0.1: routes, status codes, savepoints, shutdown."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from weir.control import ControlServer, RequestRejected
from weir.controlapi import PartitionStatus, SavepointAnswer, SavepointRequest, WorkerStatus
from weir.metrics import WorkerMetrics

pytestmark = pytest.mark.timeout(5)

# No proxy: an http_proxy in the environment must not intercept requests to 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def call(server: ControlServer, method: str, path: str, body: bytes | None = None,
         headers: Mapping[str, str] | None = None) -> Reply:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body, method=method,
                                     headers=dict(headers or {}))
    try:
        with _opener.open(request, timeout=3) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, dict(error.headers), error.read())


def post_json(server: ControlServer, path: str, value: object) -> Reply:
    return call(server, "POST", path, orjson.dumps(value), {"Content-Type": "application/json"})


@dataclass
class FakeWorker:
    """What the worker hands the server: flags and snapshots the test flips."""

    alive: bool = True
    ready: bool = False
    reason: str = "restoring state for events-0"
    status: WorkerStatus = field(default_factory=lambda: WorkerStatus(busy_ratio=0.5))
    savepoints: list[SavepointRequest] = field(default_factory=list)
    savepoint_error: Exception | None = None

    def take_savepoint(self, request: SavepointRequest) -> SavepointAnswer:
        if self.savepoint_error is not None:
            raise self.savepoint_error
        self.savepoints.append(request)
        return SavepointAnswer(id=request.id, status="completed", path=request.path or "file:///sp/1")

    def reset(self) -> None:
        self.__dict__.update(FakeWorker().__dict__)


@pytest.fixture(scope="module")
def metrics() -> WorkerMetrics:
    return WorkerMetrics(job="ns/clicks", worker=0)


@pytest.fixture(scope="module")
def shared_worker() -> FakeWorker:
    return FakeWorker()


@pytest.fixture
def worker(shared_worker: FakeWorker) -> FakeWorker:
    shared_worker.reset()
    return shared_worker


def make_server(metrics: WorkerMetrics, worker: FakeWorker, *, savepoints: bool = True) -> ControlServer:
    return ControlServer(
        metrics.registry,
        alive=lambda: worker.alive,
        ready=lambda: (worker.ready, worker.reason),
        status=lambda: worker.status,
        savepoint=worker.take_savepoint if savepoints else None,
        host="127.0.0.1",
    )


@pytest.fixture(scope="module")
def shared_server(metrics: WorkerMetrics, shared_worker: FakeWorker) -> Iterator[ControlServer]:
    # One server for the module: each start/stop costs a poll interval, and the routes are what is tested.
    with make_server(metrics, shared_worker) as srv:
        yield srv


@pytest.fixture
def server(shared_server: ControlServer, worker: FakeWorker) -> ControlServer:
    return shared_server


def test_metrics_parse_as_prometheus_text_and_values_move_after_incrementing(
        server: ControlServer, metrics: WorkerMetrics) -> None:
    part = metrics.bind_partition("events-0")

    def records_in() -> float:
        reply = call(server, "GET", "/metrics")
        assert reply.status == 200
        families = text_string_to_metric_families(reply.body.decode())
        return next(s.value for f in families for s in f.samples
                    if s.name == "weir_records_in_total" and s.labels["partition"] == "events-0")

    before = records_in()
    part.records_in.inc(42)

    assert records_in() == before + 42


def test_metrics_answer_with_the_prometheus_text_content_type(server: ControlServer) -> None:
    reply = call(server, "GET", "/metrics")

    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_metrics_answer_openmetrics_when_the_scraper_asks_for_it(server: ControlServer) -> None:
    reply = call(server, "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})

    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")


def test_a_query_string_does_not_change_the_route(server: ControlServer) -> None:
    assert call(server, "GET", "/metrics?name[]=weir_busy_ratio").status == 200


def test_healthz_is_200_while_the_loop_is_alive_and_503_once_it_is_not(
        server: ControlServer, worker: FakeWorker) -> None:
    alive = call(server, "GET", "/healthz")
    worker.alive = False
    dead = call(server, "GET", "/healthz")

    assert (alive.status, alive.json()) == (200, {"alive": True})
    assert (dead.status, dead.json()) == (503, {"alive": False})


def test_readyz_is_503_with_the_reason_until_the_worker_says_ready(
        server: ControlServer, worker: FakeWorker) -> None:
    waiting = call(server, "GET", "/readyz")
    worker.ready = True
    ready = call(server, "GET", "/readyz")

    assert waiting.status == 503
    assert waiting.json() == {"ready": False, "reason": "restoring state for events-0"}
    assert waiting.headers["Content-Type"] == "application/json"
    assert (ready.status, ready.json()) == (200, {"ready": True})


def test_status_returns_the_workers_snapshot_as_camel_case_json(
        server: ControlServer, worker: FakeWorker) -> None:
    partition = PartitionStatus(partition="events-0", offset=17, watermark=1000)
    worker.status = WorkerStatus(partitions=(partition,), busy_ratio=0.25)

    reply = call(server, "GET", "/status")

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == worker.status.model_dump(mode="json", by_alias=True)
    assert reply.json()["partitions"][0]["watermarkLagMs"] is None and reply.json()["busyRatio"] == 0.25


def test_a_failing_status_callable_answers_500_with_its_message(
        metrics: WorkerMetrics, worker: FakeWorker) -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("snapshot not published yet")

    with ControlServer(metrics.registry, alive=lambda: True, ready=lambda: (True, ""), status=broken,
                       host="127.0.0.1") as srv:
        reply = call(srv, "GET", "/status")

    assert (reply.status, reply.json()) == (500, {"error": "snapshot not published yet"})


def test_savepoint_passes_the_validated_request_with_defaults_and_returns_the_answer(
        server: ControlServer, worker: FakeWorker) -> None:
    reply = post_json(server, "/savepoint", {"id": "sp-1"})

    assert reply.status == 200
    assert reply.json() == {"id": "sp-1", "status": "completed", "path": "file:///sp/1", "bytes": None,
                            "offsets": {}}
    assert worker.savepoints == [SavepointRequest(id="sp-1", path=None, stop=False)]


def test_savepoint_passes_path_and_stop_through(server: ControlServer, worker: FakeWorker) -> None:
    reply = post_json(server, "/savepoint", {"id": "sp-2", "path": "s3://b/sp", "stop": True})

    assert reply.status == 200
    assert worker.savepoints == [SavepointRequest(id="sp-2", path="s3://b/sp", stop=True)]


@pytest.mark.parametrize(("body", "complaint"), [
    (b"{not json", "body is not valid JSON: "),
    (b"", "savepoint request: (top level): must be an object (got None)"),
    (b"[1, 2]", "savepoint request: (top level): must be an object (got [1, 2])"),
    (b"{}", "savepoint request: id: required field is missing"),
    (b'{"id": ""}', "savepoint request: id: must not be empty (got '')"),
    (b'{"id": 7}', "savepoint request: id: input should be a valid string (got 7)"),
    (b'{"id": "sp-1", "stop": "yes"}', "savepoint request: stop: must be true or false (got 'yes')"),
    (b'{"id": "sp-1", "path": 3}', "savepoint request: path: input should be a valid string (got 3)"),
    (b'{"id": "sp-1", "path": ""}', "savepoint request: path: must not be empty (got '')"),
    (b'{"id": "sp-1", "stpo": true}', "savepoint request: stpo: unknown field"),
])
def test_savepoint_answers_400_with_a_clear_error_for_a_bad_body(
        server: ControlServer, worker: FakeWorker, body: bytes, complaint: str) -> None:
    reply = call(server, "POST", "/savepoint", body, {"Content-Type": "application/json"})

    assert reply.status == 400
    assert reply.json()["error"].startswith(complaint)
    assert worker.savepoints == []


def test_savepoint_without_a_body_length_is_400(server: ControlServer) -> None:
    # urllib always sends Content-Length, so speak HTTP directly.
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        sock.sendall(b"POST /savepoint HTTP/1.0\r\n\r\n")
        head = sock.makefile("rb").readline()

    assert head.split()[1] == b"400"


def test_savepoint_body_over_the_limit_is_413(server: ControlServer) -> None:
    reply = post_json(server, "/savepoint", {"id": "x" * 70_000})

    assert reply.status == 413


def test_savepoint_is_501_when_the_worker_cannot_take_savepoints(
        metrics: WorkerMetrics, worker: FakeWorker) -> None:
    with make_server(metrics, worker, savepoints=False) as srv:
        reply = post_json(srv, "/savepoint", {"id": "sp-1"})

    assert reply.status == 501
    assert "does not take savepoints" in reply.json()["error"]


def test_a_failing_savepoint_answers_500_with_only_the_exception_message(
        server: ControlServer, worker: FakeWorker) -> None:
    worker.savepoint_error = OSError("upload to s3://bucket/sp-1 failed")

    reply = post_json(server, "/savepoint", {"id": "sp-1"})

    assert (reply.status, reply.json()) == (500, {"error": "upload to s3://bucket/sp-1 failed"})
    assert b"Traceback" not in reply.body


def test_a_rejected_savepoint_answers_the_status_the_worker_chose(
        server: ControlServer, worker: FakeWorker) -> None:
    worker.savepoint_error = RequestRejected("id sp-1 was already used with stop=false")

    reply = post_json(server, "/savepoint", {"id": "sp-1", "stop": True})

    assert (reply.status, reply.json()) == (409, {"error": "id sp-1 was already used with stop=false"})


def test_an_unknown_path_is_404(server: ControlServer) -> None:
    assert call(server, "GET", "/nope").status == 404


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("POST", "/metrics", "GET"),
    ("DELETE", "/status", "GET"),
    ("GET", "/savepoint", "POST"),
    ("PUT", "/savepoint", "POST"),
])
def test_a_known_path_with_the_wrong_method_is_405_naming_the_allowed_one(
        server: ControlServer, method: str, path: str, allow: str) -> None:
    reply = call(server, method, path, b"{}" if method in ("POST", "PUT") else None)

    assert reply.status == 405
    assert reply.headers["Allow"] == allow


def test_stop_returns_within_a_second_and_frees_the_port(metrics: WorkerMetrics, worker: FakeWorker) -> None:
    srv = make_server(metrics, worker)
    srv.start()
    port = srv.port
    assert call(srv, "GET", "/healthz").status == 200

    started = time.monotonic()
    srv.stop()
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_stop_is_idempotent_and_the_port_is_unknown_until_started(
        metrics: WorkerMetrics, worker: FakeWorker) -> None:
    srv = make_server(metrics, worker)
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port
    srv.stop()
    srv.start()
    srv.stop()
    srv.stop()


def test_a_port_already_in_use_fails_start_loudly(metrics: WorkerMetrics, worker: FakeWorker) -> None:
    with make_server(metrics, worker) as first:
        second = ControlServer(metrics.registry, alive=lambda: True, ready=lambda: (True, ""),
                               status=WorkerStatus, host="127.0.0.1", port=first.port)
        with pytest.raises(OSError):
            second.start()
