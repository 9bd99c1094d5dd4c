"""Client of the workers' control API (``weir.control``): their status, and savepoints across all of them.

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
from datetime import datetime
from typing import Any

import orjson

from weir_operator import model
from weir_operator.plans import SavepointOutcome, WorkerReport

__all__ = ["fetch_report", "job_savepoint_url", "take_savepoint"]

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 2.0
"""A worker that does not answer ``/status`` within this is reported as unknown (not as failed)."""

_WORKER_PART = re.compile(r"/w[0-9]+/?$")


def _request(url: str, body: dict[str, Any] | None, timeout: float) -> Any:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read()[:2000]
        try:
            message = orjson.loads(detail).get("error", "")
        except (orjson.JSONDecodeError, AttributeError):
            message = detail.decode("utf-8", "replace")
        raise RuntimeError(f"HTTP {exc.code}: {message}") from None


def fetch_report(index: int, base_url: str, timeout: float = STATUS_TIMEOUT_S) -> WorkerReport | None:
    """Worker ``index``'s ``GET /status`` as a report, or None when it does not answer."""
    try:
        status = _request(f"{base_url}/status", None, timeout)
    except (OSError, RuntimeError, orjson.JSONDecodeError) as exc:
        logger.debug("worker %d at %s: no status (%s)", index, base_url, exc)
        return None
    lags = [p.get("lag") for p in status.get("partitions") or () if isinstance(p, dict)]
    known = [lag for lag in lags if isinstance(lag, int)]
    checkpoint = None
    last = status.get("lastCheckpoint")
    if isinstance(last, dict) and last.get("id") and last.get("completedAt"):
        try:
            checkpoint = model.CheckpointInfo(
                id=str(last["id"]),
                url=str(last.get("url") or last["id"]),
                completed_at=datetime.fromisoformat(str(last["completedAt"]).replace("Z", "+00:00")),
            )
        except ValueError:
            checkpoint = None
    inputs = status.get("inputPartitions")
    input_partitions = None
    if isinstance(inputs, dict):
        input_partitions = {
            str(topic): count for topic, count in inputs.items() if isinstance(count, int) and count >= 0
        }
    return WorkerReport(index, checkpoint, sum(known) if known else None, input_partitions)


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
    body = {"id": savepoint_id, "path": None, "stop": stop}

    def one(url: str) -> Any:
        return _request(f"{url}/savepoint", body, timeout)

    with ThreadPoolExecutor(max_workers=min(16, len(base_urls))) as pool:
        futures = [pool.submit(one, url) for url in base_urls]
        answers: list[Any] = []
        errors: list[str] = []
        for index, future in enumerate(futures):
            try:
                answer = future.result()
            except (OSError, RuntimeError, orjson.JSONDecodeError) as exc:
                errors.append(f"worker {index}: {exc}")
                continue
            if not isinstance(answer, dict) or answer.get("status") != "completed":
                state = answer.get("status") if isinstance(answer, dict) else answer
                errors.append(f"worker {index}: savepoint {state}")
                continue
            answers.append(answer)
    if errors:
        return SavepointOutcome(savepoint_id, completed=False, error="; ".join(errors)[:2000])
    paths = {job_savepoint_url(str(a["path"])) for a in answers if a.get("path")}
    if len(paths) != 1:
        return SavepointOutcome(
            savepoint_id, completed=False, error=f"workers answered different savepoints: {sorted(paths)}"
        )
    return SavepointOutcome(savepoint_id, completed=True, url=paths.pop(), completed_at=now)
