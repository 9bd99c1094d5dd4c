"""Client of the workers' control API (``weir.control``): their status, and savepoints across all of them.

What workers answer is parsed with the runtime's payload models (``weir.controlapi``), the same
ones the worker serialises, so the two sides cannot drift apart field by field.

Both platforms reach workers over HTTP: Kubernetes through the headless Service
(``render.worker_url``), the local platform on 127.0.0.1. Blocking calls (urllib); the
operator runs them in threads.
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import orjson

from weir.controlapi import ControlPayloadError, SavepointAnswer, SavepointRequest, WorkerStatus, parse
from weir_operator import model
from weir_operator.plans import SavepointOutcome, WorkerReport

__all__ = ["fetch_report", "job_savepoint_url", "report", "take_savepoint"]

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 2.0
"""A worker that does not answer ``/status`` within this is reported as unknown (not as failed)."""

_WORKER_PART = re.compile(r"/w[0-9]+/?$")


def _request(url: str, body: SavepointRequest | None, timeout: float) -> bytes:
    """The answer's body; an HTTP error status raises RuntimeError with the worker's ``error``."""
    data = body.to_json() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read()[:2000]
        try:
            message = orjson.loads(detail).get("error", "")
        except (orjson.JSONDecodeError, AttributeError):
            message = detail.decode("utf-8", "replace")
        raise RuntimeError(f"HTTP {exc.code}: {message}") from None


def fetch_report(index: int, base_url: str, timeout: float = STATUS_TIMEOUT_S) -> WorkerReport | None:
    """Worker ``index``'s ``GET /status`` as a report, or None when it does not answer or its answer
    does not fit ``WorkerStatus`` (logged as a warning: a worker of an incompatible weir version)."""
    try:
        body = _request(f"{base_url}/status", None, timeout)
    except (OSError, RuntimeError) as exc:
        logger.debug("worker %d at %s: no status (%s)", index, base_url, exc)
        return None
    try:
        status = parse(WorkerStatus, body)
    except ControlPayloadError as exc:
        logger.warning("worker %d at %s: unreadable status: %s", index, base_url, exc)
        return None
    return report(index, status)


def report(index: int, status: WorkerStatus) -> WorkerReport:
    """What ``decide`` and the autoscaler need from worker ``index``'s status: lag summed and the
    oldest watermark over its partitions, its last checkpoint, outages as one line each."""
    lags = [p.lag for p in status.partitions if p.lag is not None]
    wm_lags = [p.watermark_lag_ms for p in status.partitions if p.watermark_lag_ms is not None]
    last = status.last_checkpoint
    checkpoint = None
    if last is not None:
        checkpoint = model.CheckpointInfo(id=last.id, url=last.url or last.id, completed_at=last.completed_at)
    published = status.published_at
    outages = {name: f"{o.error or 'unreachable'} (for {o.seconds} s)" for name, o in status.outages.items()}
    return WorkerReport(
        index, checkpoint, sum(lags) if lags else None,
        dict(status.input_partitions) if status.input_partitions is not None else None,
        records_per_second=status.records_per_second,
        busy_ratio=min(1.0, status.busy_ratio) if status.busy_ratio is not None else None,
        published_at=datetime.fromtimestamp(published / 1000, UTC) if published is not None else None,
        watermark_lag_ms=max(wm_lags) if wm_lags else None,
        outages=outages,
    )


def job_savepoint_url(worker_path: str) -> str:
    """The job-level savepoint from one worker's part: ``.../savepoints/<id>/w3`` becomes
    ``.../savepoints/<id>``."""
    return _WORKER_PART.sub("", worker_path).rstrip("/")


def take_savepoint(
    base_urls: Sequence[str], savepoint_id: str, stop: bool, now: datetime, timeout: float
) -> SavepointOutcome:
    """POST ``/savepoint`` to every worker at once and wait for all; completed only if every part is.

    The request is idempotent by id, so calling this again after a crash or a timeout asks
    for the same savepoint, not a second one.
    """
    if not base_urls:
        return SavepointOutcome(savepoint_id, completed=False, error="no workers are running")
    body = SavepointRequest(id=savepoint_id, stop=stop)

    def one(url: str) -> SavepointAnswer:
        return parse(SavepointAnswer, _request(f"{url}/savepoint", body, timeout))

    with ThreadPoolExecutor(max_workers=min(16, len(base_urls))) as pool:
        futures = [pool.submit(one, url) for url in base_urls]
        answers: list[SavepointAnswer] = []
        errors: list[str] = []
        for index, future in enumerate(futures):
            try:
                answer = future.result()
            except (OSError, RuntimeError, ControlPayloadError) as exc:
                errors.append(f"worker {index}: {exc}")
                continue
            if not answer.completed:
                errors.append(f"worker {index}: savepoint {answer.status}")
                continue
            answers.append(answer)
    if errors:
        return SavepointOutcome(savepoint_id, completed=False, error="; ".join(errors)[:2000])
    paths = {job_savepoint_url(a.path) for a in answers if a.path}
    if len(paths) != 1:
        return SavepointOutcome(
            savepoint_id, completed=False, error=f"workers answered different savepoints: {sorted(paths)}"
        )
    return SavepointOutcome(savepoint_id, completed=True, url=paths.pop(), completed_at=now)
