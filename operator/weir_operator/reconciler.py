"""One reconcile of one job: observe, decide, write the status, act; repeated while actions have outcomes.

Shared by the kopf operator and ``weir up``. The status returned by ``decide`` is written
*before* the plan's actions run, so the intent they carry out is durable first (status as a
write-ahead log). Action outcomes (a savepoint's answer, an apply refused) are observations
for the next round; a reconcile ends when a round has nothing to do, or after
``MAX_ROUNDS`` (the next reconcile picks up from the status).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from weir import spec
from weir_operator import decide as deciding
from weir_operator import model
from weir_operator.plans import Apply, SavepointOutcome, TakeSavepoint
from weir_operator.platforms import ApplyRejected, Platform

__all__ = ["MAX_ROUNDS", "reconcile"]

logger = logging.getLogger(__name__)

MAX_ROUNDS = 4
"""Rounds per reconcile: deploy needs 2 (apply, see it applied), a savepoint-and-redeploy 3."""


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
    for _ in range(MAX_ROUNDS):
        observed = platform.observe(job)
        observed = replace(observed, savepoint=savepoint, apply_error=apply_error)
        plan = deciding.decide(job, generation, status, observed, now(), shutdown=shutdown, policy=policy)
        if plan.status != status:
            platform.write_status(job.metadata, plan.status)
            status = plan.status
        for event in plan.events:
            platform.record_event(job.metadata, event)
        if not plan.actions:
            break
        savepoint, apply_error = None, None
        for action in plan.actions:
            if isinstance(action, TakeSavepoint):
                logger.info("%s/%s: savepoint %s (stop=%s)", _ns(job), _name(job), action.id, action.stop)
                savepoint = platform.savepoint(job, action.id, action.stop)
            elif isinstance(action, Apply):
                logger.info(
                    "%s/%s: apply %d workers (replicas %d, restore from %s)",
                    _ns(job), _name(job), action.workers, action.replicas, action.restore_from,
                )
                try:
                    platform.apply(job, action)
                except ApplyRejected as exc:
                    apply_error = str(exc)
                    logger.warning("%s/%s: apply refused: %s", _ns(job), _name(job), exc)
    return status


def _ns(job: spec.StreamJob) -> str:
    return job.metadata.namespace


def _name(job: spec.StreamJob) -> str:
    return job.metadata.name
