"""One reconcile of one job: observe, decide, write the status, act; repeated while actions have outcomes.

Shared by the kopf operator and ``weir up``. The status returned by ``decide`` is written
*before* the plan's actions run, so the intent they carry out is durable first (status as a
write-ahead log). Action outcomes (a savepoint's answer, an apply refused) are observations
for the next round; a reconcile ends when a round has nothing to do, or after
``MAX_ROUNDS`` (the next reconcile picks up from the status).

``finalize`` is the same loop for a job being deleted (``decide.decide_deletion``): it
stops the workers and, with ``cleanupPolicy: delete``, removes the job's store directory;
it returns whether the platform may let the job go.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from weir import spec
from weir.objectstores import CheckpointError
from weir_operator import decide as deciding
from weir_operator import model
from weir_operator.plans import (
    Apply,
    DisposeSavepoint,
    RemoveCheckpoints,
    RemovedCheckpoints,
    SavepointOutcome,
    StopWorkers,
    TakeSavepoint,
)
from weir_operator.platforms import ApplyRejected, Platform

__all__ = ["MAX_ROUNDS", "finalize", "reconcile"]

logger = logging.getLogger(__name__)

MAX_ROUNDS = 6
"""Rounds per reconcile: deploy needs 2 (apply, see it applied), a savepoint-and-rescale 4
(savepoint, stop the old workers, start the new ones, see them applied), a rollback 3 (stop the
failing workers, start the stable ones, see them applied)."""


def reconcile(
    platform: Platform,
    job: spec.StreamJob,
    generation: int,
    status: model.StreamJobStatus,
    now: Callable[[], datetime],
    *,
    shutdown: bool = False,
    policy: deciding.Policy = deciding.Policy(),  # noqa: B008 - frozen
) -> model.StreamJobStatus:
    """Move ``job`` one or more steps towards its spec; returns the status as written."""
    savepoint: SavepointOutcome | None = None
    apply_error: str | None = None
    disposed: list[tuple[str, str | None]] = []
    for _ in range(MAX_ROUNDS):
        observed = platform.observe(job)
        observed = replace(observed, savepoint=savepoint, apply_error=apply_error, disposed=tuple(disposed))
        plan = deciding.decide(job, generation, status, observed, now(), shutdown=shutdown, policy=policy)
        if plan.status != status:
            platform.write_status(job.metadata, plan.status)
            status = plan.status
        for event in plan.events:
            platform.record_event(job.metadata, event)
        if not plan.actions:
            break
        savepoint, apply_error, disposed = None, None, []
        for action in plan.actions:
            if isinstance(action, TakeSavepoint):
                logger.info("%s/%s: savepoint %s (stop=%s)", _ns(job), _name(job), action.id, action.stop)
                savepoint = platform.savepoint(job, action.id, action.stop)
            elif isinstance(action, Apply):
                logger.info(
                    "%s/%s: apply %d workers (replicas %d, restore from %s%s)",
                    _ns(job), _name(job), action.workers, action.replicas, action.restore_from,
                    "" if action.spec is None else ", the last stable spec",
                )
                try:
                    platform.apply(job, action)
                except ApplyRejected as exc:
                    apply_error = str(exc)
                    logger.warning("%s/%s: apply refused: %s", _ns(job), _name(job), exc)
            elif isinstance(action, DisposeSavepoint):
                logger.info("%s/%s: deleting savepoint %s (retention)", _ns(job), _name(job), action.url)
                try:
                    platform.dispose_savepoint(job, action.url)
                    disposed.append((action.url, None))
                except (CheckpointError, OSError) as exc:
                    disposed.append((action.url, str(exc)))
                    logger.warning("%s/%s: deleting %s failed: %s", _ns(job), _name(job), action.url, exc)
    return status


def finalize(
    platform: Platform,
    job: spec.StreamJob,
    generation: int,
    status: model.StreamJobStatus,
    now: Callable[[], datetime],
    *,
    policy: deciding.Policy = deciding.Policy(),  # noqa: B008 - frozen
) -> bool:
    """Move a job being deleted towards its end; True when the platform may let it go."""
    removed: RemovedCheckpoints | None = None
    for _ in range(MAX_ROUNDS):
        observed = replace(platform.observe(job), removed=removed)
        plan = deciding.decide_deletion(job, generation, status, observed, now(), policy=policy)
        if plan.status != status:
            platform.write_status(job.metadata, plan.status)
            status = plan.status
        for event in plan.events:
            platform.record_event(job.metadata, event)
        if plan.release or not plan.actions:
            return plan.release
        for action in plan.actions:
            if isinstance(action, StopWorkers):
                logger.info("%s/%s: deleted: stopping the workers", _ns(job), _name(job))
                platform.delete(_ns(job), _name(job))
            elif isinstance(action, RemoveCheckpoints):
                logger.info("%s/%s: deleted: removing %s", _ns(job), _name(job), action.url)
                try:
                    removed = RemovedCheckpoints(objects=platform.remove_checkpoints(job))
                except (CheckpointError, OSError) as exc:
                    removed = RemovedCheckpoints(error=str(exc))
                    logger.warning("%s/%s: removing %s failed: %s", _ns(job), _name(job), action.url, exc)
    return False


def _ns(job: spec.StreamJob) -> str:
    return job.metadata.namespace


def _name(job: spec.StreamJob) -> str:
    return job.metadata.name
