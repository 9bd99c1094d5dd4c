"""The operator's client of the workers' control API, against real ControlServers with fake workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from weir.control import ControlServer, RequestRejected
from weir_operator import workers

NOW = datetime(2026, 1, 1, tzinfo=UTC)
STORE = "file:///store/ns/job/savepoints"


class FakeWorker:
    """Answers savepoints idempotently by id, like the contract says a worker must."""

    def __init__(self, index: int, fail: str | None = None) -> None:
        self.index, self.fail = index, fail
        self.taken: dict[str, dict[str, Any]] = {}

    def savepoint(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise RequestRejected(self.fail, 503)
        return self.taken.setdefault(
            request["id"],
            {"id": request["id"], "path": f"{STORE}/{request['id']}/w{self.index}", "status": "completed"},
        )

    def status(self) -> dict[str, Any]:
        return {
            "partitions": [{"partition": "t-0", "lag": 3}, {"partition": "t-2", "lag": 4}],
            "inputPartitions": {"t": 4, "weir-ns-job-3-repartition": 8, "broken": "many"},
            "lastCheckpoint": {"id": "c-9", "url": "file:///store/ns/job/checkpoints/c-9",
                               "completedAt": "2026-01-01T00:00:05Z"},
        }


@pytest.fixture
def served() -> Iterator[tuple[list[FakeWorker], list[str]]]:
    fakes = [FakeWorker(0), FakeWorker(1)]
    with ExitStack() as stack:
        urls = []
        for fake in fakes:
            server = ControlServer(CollectorRegistry(), alive=lambda: True, ready=lambda: (True, ""),
                                   status=fake.status, savepoint=fake.savepoint, host="127.0.0.1")
            stack.enter_context(server)
            urls.append(f"http://127.0.0.1:{server.port}")
        yield fakes, urls


def test_a_savepoint_completes_when_every_worker_answers_and_names_the_job_level_directory(
    served: tuple[list[FakeWorker], list[str]],
) -> None:
    fakes, urls = served

    outcome = workers.take_savepoint(urls, "sp-1", stop=False, now=NOW, timeout=5)

    assert outcome.completed and outcome.url == f"{STORE}/sp-1" and outcome.completed_at == NOW
    assert all("sp-1" in f.taken for f in fakes)


def test_asking_again_with_the_same_id_takes_no_second_savepoint(
    served: tuple[list[FakeWorker], list[str]],
) -> None:
    fakes, urls = served

    first = workers.take_savepoint(urls, "sp-2", stop=True, now=NOW, timeout=5)
    again = workers.take_savepoint(urls, "sp-2", stop=True, now=NOW, timeout=5)

    assert first == again
    assert [len(f.taken) for f in fakes] == [1, 1]


def test_one_failing_worker_fails_the_savepoint_and_says_which(
    served: tuple[list[FakeWorker], list[str]],
) -> None:
    fakes, urls = served
    fakes[1].fail = "disk full"

    outcome = workers.take_savepoint(urls, "sp-3", stop=False, now=NOW, timeout=5)

    assert not outcome.completed and outcome.url is None
    assert outcome.error == "worker 1: HTTP 503: disk full"


def test_no_workers_is_a_failed_savepoint_not_an_empty_success() -> None:
    outcome = workers.take_savepoint([], "sp-4", stop=True, now=NOW, timeout=1)

    assert not outcome.completed and outcome.error == "no workers are running"


def test_a_worker_report_sums_partition_lag_and_reads_its_last_checkpoint(
    served: tuple[list[FakeWorker], list[str]],
) -> None:
    _, urls = served

    report = workers.fetch_report(0, urls[0])

    assert report is not None and report.lag_records == 7
    assert report.last_checkpoint is not None and report.last_checkpoint.id == "c-9"
    assert report.last_checkpoint.completed_at == datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert report.input_partitions == {"t": 4, "weir-ns-job-3-repartition": 8}


def test_a_worker_that_does_not_answer_gives_no_report() -> None:
    assert workers.fetch_report(0, "http://127.0.0.1:9", timeout=0.5) is None


@pytest.mark.parametrize(
    ("part", "job"),
    [(f"{STORE}/x/w0", f"{STORE}/x"), (f"{STORE}/x/w12/", f"{STORE}/x"), (f"{STORE}/x", f"{STORE}/x")],
)
def test_the_job_level_savepoint_url_drops_the_worker_part(part: str, job: str) -> None:
    assert workers.job_savepoint_url(part) == job
