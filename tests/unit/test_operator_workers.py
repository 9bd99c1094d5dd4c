"""The operator's client of the workers' control API, against real ControlServers with fake workers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from weir.control import ControlServer
from weir.controlapi import CheckpointStatus, OutageStatus, PartitionStatus
from weir_operator import workers
from weir_operator.testing import FakeWorkerAPI, serve_workers, worker_status

NOW = datetime(2026, 1, 1, tzinfo=UTC)
STORE = "file:///store/ns/job/savepoints"

STATUS = worker_status(
    0,
    workers=2,
    published_at=datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC),
    partitions=[PartitionStatus(partition="t-0", offset=10, lag=3, watermark_lag_ms=1500),
                PartitionStatus(partition="t-2", offset=20, lag=4, watermark_lag_ms=2500)],
    records_per_second=950.5,
    busy_ratio=0.42,
    input_partitions={"t": 4, "weir-ns-job-3-repartition": 8},
    outages={"store": OutageStatus(error="connect timeout to http://s3:9000", seconds=4.0, outages=1,
                                   since=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))},
    last_checkpoint=CheckpointStatus(id="c-9", url="file:///store/ns/job/checkpoints/c-9",
                                     completed_at=datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)),
)


@pytest.fixture
def served() -> Iterator[tuple[list[FakeWorkerAPI], list[str]]]:
    fakes = [FakeWorkerAPI(i, STORE, lambda: STATUS) for i in range(2)]
    with serve_workers(fakes) as urls:
        yield fakes, urls


def test_a_savepoint_completes_when_every_worker_answers_and_names_the_job_level_directory(
    served: tuple[list[FakeWorkerAPI], list[str]],
) -> None:
    fakes, urls = served

    outcome = workers.take_savepoint(urls, "sp-1", stop=False, now=NOW, timeout=5)

    assert outcome.completed and outcome.url == f"{STORE}/sp-1" and outcome.completed_at == NOW
    assert all("sp-1" in f.taken for f in fakes)


def test_asking_again_with_the_same_id_takes_no_second_savepoint(
    served: tuple[list[FakeWorkerAPI], list[str]],
) -> None:
    fakes, urls = served

    first = workers.take_savepoint(urls, "sp-2", stop=True, now=NOW, timeout=5)
    again = workers.take_savepoint(urls, "sp-2", stop=True, now=NOW, timeout=5)

    assert first == again
    assert [len(f.taken) for f in fakes] == [1, 1]


def test_one_failing_worker_fails_the_savepoint_and_says_which(
    served: tuple[list[FakeWorkerAPI], list[str]],
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
    served: tuple[list[FakeWorkerAPI], list[str]],
) -> None:
    _, urls = served

    report = workers.fetch_report(0, urls[0])

    assert report is not None and report.lag_records == 7
    assert report.last_checkpoint is not None and report.last_checkpoint.id == "c-9"
    assert report.last_checkpoint.completed_at == datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert report.input_partitions == {"t": 4, "weir-ns-job-3-repartition": 8}


def test_a_worker_report_carries_the_autoscalers_metrics_and_when_they_were_measured(
    served: tuple[list[FakeWorkerAPI], list[str]],
) -> None:
    _, urls = served

    report = workers.fetch_report(0, urls[0])

    assert report is not None
    assert (report.records_per_second, report.busy_ratio) == (950.5, 0.42)
    assert report.published_at == datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert report.watermark_lag_ms == 2500


def test_a_worker_report_names_the_dependencies_the_worker_cannot_reach(
    served: tuple[list[FakeWorkerAPI], list[str]],
) -> None:
    _, urls = served

    report = workers.fetch_report(0, urls[0])

    assert report is not None
    assert report.outages == {"store": "connect timeout to http://s3:9000 (for 4.0 s)"}


def test_a_worker_that_does_not_answer_gives_no_report() -> None:
    assert workers.fetch_report(0, "http://127.0.0.1:9", timeout=0.5) is None


class Garbled(BaseModel):
    """A status from a worker that breaks the contract: partitions is not a list."""

    partitions: str = "many"


def test_a_status_that_does_not_fit_the_model_gives_no_report_and_a_warning_naming_the_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ControlServer(CollectorRegistry(), alive=lambda: True, ready=lambda: (True, ""),
                       status=Garbled, host="127.0.0.1") as server:
        report = workers.fetch_report(0, f"http://127.0.0.1:{server.port}")

    assert report is None
    assert "unreadable status: worker status: partitions: " in caplog.text


def test_a_savepoint_answer_that_does_not_fit_fails_the_savepoint_naming_the_worker_and_field() -> None:
    with ControlServer(CollectorRegistry(), alive=lambda: True, ready=lambda: (True, ""), status=Garbled,
                       savepoint=lambda request: Garbled(), host="127.0.0.1") as server:
        outcome = workers.take_savepoint([f"http://127.0.0.1:{server.port}"], "sp-5", stop=False, now=NOW,
                                         timeout=5)

    assert not outcome.completed
    missing = "id: required field is missing; status: required field is missing"
    assert outcome.error == f"worker 0: savepoint answer: {missing}"


@pytest.mark.parametrize(
    ("part", "job"),
    [(f"{STORE}/x/w0", f"{STORE}/x"), (f"{STORE}/x/w12/", f"{STORE}/x"), (f"{STORE}/x", f"{STORE}/x")],
)
def test_the_job_level_savepoint_url_drops_the_worker_part(part: str, job: str) -> None:
    assert workers.job_savepoint_url(part) == job
