"""The control API's payload models as the one contract between a worker and the operator.

A status the worker publishes goes through the real HTTP server into the operator's parser and
reads back with the same values; payloads of newer and older workers still parse.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from weir import kafka as kio
from weir.control import ControlServer
from weir.controlapi import (
    CheckpointStatus,
    ControlPayloadError,
    SavepointAnswer,
    SavepointRequest,
    WorkerStatus,
    parse,
)
from weir.graph import compile_job
from weir.results import iso
from weir.spec import load_job
from weir.tasks import Task
from weir.worker import Worker, WorkerSettings
from weir_operator import workers

pytestmark = pytest.mark.timeout(10)

EXAMPLE = Path(__file__).parents[2] / "runtime" / "weir" / "examples" / "revenue.yaml"
WALL_MS = 1_767_225_605_000  # 2026-01-01T00:00:05Z
END_OFFSET = 120


class FakeEdges:
    """The one edge call publishing makes: every partition ends at ``END_OFFSET``."""

    def lag(self, task: Task) -> int | None:
        return max(0, END_OFFSET - task.next_offset)


def published_status(tmp_path: Path) -> WorkerStatus:
    """What a real ``Worker`` publishes with two partitions, a checkpoint, a savepoint and an outage."""
    worker = Worker(compile_job(load_job(EXAMPLE)), kio.KafkaSettings("127.0.0.1:9", {}, {}),
                    WorkerSettings(1, 2, tmp_path), wall_ms=lambda: WALL_MS)
    worker.edges = FakeEdges()  # type: ignore[assignment]
    worker.core.tasks = {
        ("orders", 0): Task(
            "orders", 0, "orders-0", None, None, wm=WALL_MS - 1500, next_offset=100, records=100, late=2
        ),
        ("orders", 2): Task("orders", 2, "orders-2", None, None, next_offset=117, records=17, idle=True),
    }
    worker.input_partitions = {"orders": 4}
    worker.core.dead_lettered = {"decode_error": 3}
    # The shape ``Committer.complete`` records for a completed checkpoint.
    worker.last_checkpoint = {
        "kind": "checkpoint", "id": "0000000007-w1", "completedAt": iso(WALL_MS - 2000),
        "durationSeconds": 0.25, "bytes": 4096, "bytesUploaded": 1024,
        "url": "file:///store/ns/job/checkpoints/0000000007-w1",
    }
    worker.savepoints.last = SavepointAnswer(id="sp-1", status="completed", path="file:///sp/sp-1/w1",
                                            bytes=2048, offsets={"orders/0": 90})
    worker.deps.down("store", "connect timeout to http://s3:9000")
    worker._publish(0.0)
    return worker.status()


def test_a_status_the_worker_publishes_reads_back_in_the_operator_with_the_same_values(
    tmp_path: Path,
) -> None:
    status = published_status(tmp_path)

    with ControlServer(CollectorRegistry(), alive=lambda: True, ready=lambda: (True, ""),
                       status=lambda: status, host="127.0.0.1") as server:
        report = workers.fetch_report(1, f"http://127.0.0.1:{server.port}")

    assert report is not None
    assert report.lag_records == (END_OFFSET - 100) + (END_OFFSET - 117)
    assert report.watermark_lag_ms == 1500
    assert report.input_partitions == {"orders": 4}
    assert report.published_at == datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert report.busy_ratio == status.busy_ratio and report.records_per_second == status.records_per_second
    assert report.last_checkpoint is not None
    assert (report.last_checkpoint.id, report.last_checkpoint.url) == (
        "0000000007-w1", "file:///store/ns/job/checkpoints/0000000007-w1")
    assert report.last_checkpoint.completed_at == datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)
    assert list(report.outages) == ["store"]
    assert report.outages["store"].startswith("connect timeout to http://s3:9000 (for ")


def test_every_field_of_a_published_status_survives_the_json_round_trip(tmp_path: Path) -> None:
    status = published_status(tmp_path)

    again = parse(WorkerStatus, status.to_json())

    assert again == status
    assert [(p.partition, p.offset, p.lag, p.idle, p.late) for p in again.partitions] == [
        ("orders-0", 100, 20, False, 2), ("orders-2", 117, 3, True, 0)]
    assert again.dead_lettered == {"decode_error": 3} and again.records_in == 117
    assert again.last_savepoint is not None and again.last_savepoint.offsets == {"orders/0": 90}
    assert again.memory is not None and again.memory.rss_bytes > 0


def test_the_wire_form_keeps_the_camel_case_names_and_nulls_readers_already_use(tmp_path: Path) -> None:
    wire = orjson.loads(published_status(tmp_path).to_json())

    assert wire["publishedAt"] == WALL_MS and wire["inputPartitions"] == {"orders": 4}
    assert wire["partitions"][1]["watermark"] is None and wire["partitions"][0]["watermarkLagMs"] == 1500
    assert wire["lastCheckpoint"]["bytesUploaded"] == 1024
    assert wire["lastCheckpoint"]["completedAt"] == "2026-01-01T00:00:03.000Z"  # as iso() writes it
    assert wire["outages"]["store"]["since"].endswith("Z")
    assert wire["outages"]["store"]["lastError"] == "connect timeout to http://s3:9000"
    assert set(wire["memory"]["usedBytes"]) == {"window_cache", "timers", "rocksdb", "kafka_queues"}


def test_a_newer_workers_status_with_fields_this_version_does_not_know_parses(tmp_path: Path) -> None:
    status = published_status(tmp_path)
    wire = orjson.loads(status.to_json())
    wire["shinyNewGauge"] = 3
    wire["partitions"][0]["skew"] = {"ms": 4}
    wire["lastCheckpoint"]["region"] = "eu"
    wire["outages"]["store"]["retryInSeconds"] = 5

    assert parse(WorkerStatus, orjson.dumps(wire)) == status


def test_an_older_workers_status_without_optional_fields_parses_and_reports_what_it_has() -> None:
    older = {
        "partitions": [{"partition": "orders-0", "offset": 5}],
        "lastCheckpoint": {"id": "c-1", "completedAt": "2026-01-01T00:00:05Z"},
        "outages": {"kafka": {"error": "connection refused"}},
    }

    status = parse(WorkerStatus, orjson.dumps(older))
    report = workers.report(0, status)

    assert status.partitions[0].lag is None and status.input_partitions is None
    assert (report.lag_records, report.input_partitions, report.published_at) == (None, None, None)
    assert report.last_checkpoint is not None and report.last_checkpoint.url == "c-1"  # id, as before
    assert report.outages == {"kafka": "connection refused (for 0.0 s)"}


def test_an_empty_status_from_a_worker_that_has_not_published_yet_parses() -> None:
    assert workers.report(3, parse(WorkerStatus, b"{}")).index == 3


def test_a_status_that_does_not_fit_names_the_payload_and_the_field_path() -> None:
    bad = {"partitions": [{"partition": "orders-0", "offset": "far"}], "busyRatio": -1}

    with pytest.raises(ControlPayloadError) as raised:
        parse(WorkerStatus, orjson.dumps(bad))

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("worker status: partitions[0].offset: input should be a valid integer")
    assert message.endswith("; busyRatio: must be >= 0.0 (got -1)")


def test_a_savepoint_request_and_its_answer_round_trip_through_json() -> None:
    request = SavepointRequest(id="sp-7", path="s3://b/sp", stop=True)
    answer = SavepointAnswer(id="sp-7", status="completed", path="s3://b/sp/w0", bytes=10,
                             offsets={"orders/0": 3})

    assert orjson.loads(request.to_json()) == {"id": "sp-7", "path": "s3://b/sp", "stop": True}
    assert parse(SavepointRequest, request.to_json()) == request
    assert parse(SavepointAnswer, answer.to_json()) == answer and answer.completed


def test_a_savepoint_answer_in_a_state_this_version_does_not_know_is_not_completed() -> None:
    answer = parse(SavepointAnswer, b'{"id": "sp-7", "status": "uploading", "progress": 0.5}')

    assert not answer.completed


def test_a_savepoint_request_rejects_unknown_fields_and_wrong_types_instead_of_guessing() -> None:
    with pytest.raises(ControlPayloadError, match=r"^savepoint request: stpo: unknown field$"):
        parse(SavepointRequest, b'{"id": "sp-1", "stpo": true}')
    with pytest.raises(ControlPayloadError, match=r"stop: must be true or false \(got 'yes'\)"):
        parse(SavepointRequest, b'{"id": "sp-1", "stop": "yes"}')


def test_a_checkpoint_without_a_time_zone_is_refused() -> None:
    with pytest.raises(ControlPayloadError, match=r"lastCheckpoint\.completedAt"):
        parse(WorkerStatus, b'{"lastCheckpoint": {"id": "c-1", "completedAt": "2026-01-01T00:00:05"}}')
    assert CheckpointStatus(id="c", completed_at=datetime(2026, 1, 1, tzinfo=UTC)).kind == "checkpoint"
