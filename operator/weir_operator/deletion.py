"""The decision for a StreamJob being deleted: stop the workers, remove the store, let it go."""

from __future__ import annotations

from datetime import datetime

from weir import spec
from weir.objectstores import job_url
from weir_operator import conditions, model, render
from weir_operator.drafts import Draft, Policy
from weir_operator.plans import Observed, Plan, RemoveCheckpoints, StopWorkers

__all__ = ["cleanup_url", "decide_deletion"]


def cleanup_url(job: spec.StreamJob) -> str | None:
    """The store directory deleting ``job`` removes (``cleanupPolicy: delete``), else None."""
    checkpoint = job.spec.checkpoint
    if checkpoint is None or checkpoint.cleanup_policy != "delete":
        return None
    return job_url(checkpoint.url, job.metadata.namespace, job.metadata.name)


def decide_deletion(
    job: spec.StreamJob,
    generation: int,
    status: model.StreamJobStatus,
    observed: Observed,
    now: datetime,
    *,
    policy: Policy = Policy(),  # noqa: B008 - frozen
) -> Plan:
    """The next step for a StreamJob being deleted that the platform holds (a finalizer).

    Stop the workers; wait until none is left, since a stopping worker may still write a last
    checkpoint; then, with ``cleanupPolicy: delete``, remove ``<store>/<namespace>/<job>/``;
    then ``release``. A store that cannot be removed is retried at every reconcile
    (``Stalled``, reason ``CleanupFailed``) until ``policy.cleanup_timeout`` after the
    deletion began; then the job is released anyway with a Warning naming what is left:
    deleting a StreamJob never hangs on an unreachable store, and never loses data silently.
    """
    draft = Draft(status)
    url = cleanup_url(job)
    intent = status.intent
    if intent is None or intent.action != "cleanup":
        intent = model.Intent(
            action="cleanup",
            id=f"cleanup-{generation}-{now.strftime('%Y%m%d%H%M%S')}",
            generation=generation,
            started_at=now,
            fingerprint=render.fingerprint(job.spec),
            parallelism=0,
        )
        draft.set(intent=intent, error=None, apply_failure=None)
        then = f", then removing {url}" if url is not None else " (its store is kept: cleanupPolicy retain)"
        draft.event("Normal", "CleaningUp", f"{intent.id}: deleting: stopping the workers{then}")
    draft.set(
        phase="Deleting", lifecycle_state="Deleting", parallelism=0, ready_workers=0, stabilization=None
    )
    if status.phase != "Deleting":
        draft.event("Normal", "PhaseDeleting", f"phase {status.phase or 'none'} -> Deleting")
    release = False
    stalled: tuple[str, str] | None = None
    if observed.deployed is not None:
        draft.actions.append(StopWorkers())
        waiting = "stopping the workers"
    elif observed.lingering:
        waiting = f"waiting for {observed.lingering} workers to stop before removing the store"
    elif url is None:
        release, waiting = True, ""
    elif observed.removed is None:
        draft.actions.append(RemoveCheckpoints(url))
        waiting = f"removing {url}"
        before = next((c for c in status.conditions if c.type == "Stalled"), None)
        if before is not None and before.reason == "CleanupFailed":
            stalled = (before.reason, before.message)  # a retry: stalled until it works
    elif observed.removed.error is None:
        draft.event(
            "Normal", "CleanedUp", f"{intent.id}: removed {observed.removed.objects} objects under {url}"
        )
        release, waiting = True, ""
    else:
        error = observed.removed.error
        waiting = f"removing {url}"
        if now - intent.started_at >= policy.cleanup_timeout:
            draft.event(
                "Warning",
                "CleanupAbandoned",
                f"{intent.id}: {url} could not be removed within {policy.cleanup_timeout} and is "
                f"left in place: {error}",
            )
            release = True
        else:
            # The Stalled condition's event says it once; retries of the same failure add none.
            until = (intent.started_at + policy.cleanup_timeout).isoformat()
            draft.set(error=error)
            stalled = ("CleanupFailed", f"removing {url} failed (retried until {until}): {error}")
    if release:
        draft.set(intent=None)
    conditions.write_conditions(
        draft,
        now,
        (
            ("False", "Deleting", "the StreamJob is being deleted"),
            ("True", conditions.PROGRESS_REASON["cleanup"], waiting)
            if not release
            else ("False", "CleanedUp", ""),
            ("False", "AsExpected", ""),
            ("True", *stalled) if stalled is not None else ("False", "AsExpected", ""),
        ),
    )
    new_status = status.model_copy(update=draft.updates)
    return Plan(new_status, tuple(draft.actions), tuple(draft.events), release=release)
