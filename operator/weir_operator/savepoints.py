"""Savepoint bookkeeping of the decision: the history, periodic savepoints and retention.

**History.** Every savepoint outcome (completed or failed) goes first into
``status.savepointHistory``. Without ``spec.savepoints`` the history keeps the newest
``Policy.savepoint_history`` entries and nothing is deleted from the store (as before). With it,
every completed savepoint stays in the history until retention has deleted it from the store,
and failed ones are bounded by the policy.

**Periodic savepoints** (``savepoints.interval``): while the job is ``Stable``, ``Stabilizing``
or ``RolledBack`` (also while a change is refused), every worker ready and no intent running,
a savepoint without stop (``trigger: periodic``) is taken when the newest savepoint (or failed
periodic attempt) is older than the interval, or none was taken yet.

**Retention**, at every decision: completed savepoints beyond ``savepoints.maxCount`` (the newest
are kept) or older than ``savepoints.maxAge`` are deleted (``DisposeSavepoint``) — never one
that the stable version resumes from (``stable.snapshot``), the running intent restores from,
the workers were started from (``Deployed.restore_from``), a suspended or shut-down job resumes
from, or a rollback restored from. A deleted savepoint leaves the history with a ``SavepointDisposed``
event. A failed deletion stays in the history with ``disposeError`` and one Warning event, and
is retried after ``Policy.savepoint_retry_after``; it does not make the job ``Degraded``: the job
processes as well as before, the cost is storage, and ``Degraded`` (one reason at a time) must
stay free to say what does hurt processing (a crash loop, a rollback).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from weir import spec
from weir_operator import model
from weir_operator.drafts import Draft, Policy
from weir_operator.plans import DisposeSavepoint, Observed, SavepointOutcome

__all__ = [
    "answered_nonce",
    "apply_disposed",
    "blocked",
    "bounded",
    "info_of",
    "periodic_due",
    "resume_point",
    "retention",
]


def bounded(
    history: tuple[model.SavepointInfo, ...], job_spec: spec.JobSpec, policy: Policy
) -> tuple[model.SavepointInfo, ...]:
    """``history`` (newest first) cut to what the status keeps (see the module docstring)."""
    if job_spec.savepoints is None:
        return history[: policy.savepoint_history]
    kept: list[model.SavepointInfo] = []
    others = 0
    for info in history:
        if info.url is not None and info.error is None:
            kept.append(info)
        elif others < policy.savepoint_history:
            kept.append(info)
            others += 1
    return tuple(kept)


def answered_nonce(status: model.StreamJobStatus) -> int | None:
    """The ``savepointTriggerNonce`` last answered (taken or failed)."""
    if status.answered_savepoint_nonce is not None:
        return status.answered_savepoint_nonce
    for info in (status.last_savepoint, *status.savepoint_history):  # statuses of older operators
        if info is not None and info.trigger == "nonce":
            return info.trigger_nonce
    return None


def resume_point(status: model.StreamJobStatus) -> str | None:
    """A savepoint the workers stopped with (suspend, shutdown) and nothing ran after it."""
    last = status.last_savepoint
    if last is None or last.url is None or last.trigger not in ("suspend", "shutdown"):
        return None
    checkpoint, saved_at = status.last_checkpoint, last.completed_at
    later = checkpoint is not None and saved_at is not None and checkpoint.completed_at > saved_at
    return None if later else last.url


def periodic_due(draft: Draft, job: spec.StreamJob, observed: Observed, now: datetime) -> bool:
    """Whether a periodic savepoint is due now (see the module docstring)."""
    settings = job.spec.savepoints
    if settings is None or settings.interval is None:
        return False
    if draft.get("lifecycle_state") not in ("Stable", "Stabilizing", "RolledBack"):
        return False
    deployed = observed.deployed
    if deployed is None or deployed.replicas == 0 or observed.ready_workers < deployed.replicas:
        return False
    if any(w.crash_looping for w in observed.workers):
        return False
    history: tuple[model.SavepointInfo, ...] = draft.get("savepoint_history")
    times = [
        s.completed_at
        for s in history
        if s.completed_at is not None and (s.error is None or s.trigger == "periodic")
    ]
    return not times or now - max(times) >= timedelta(milliseconds=settings.interval)


def apply_disposed(draft: Draft, observed: Observed, now: datetime) -> None:
    """Take in the outcomes of the deletions asked for in the previous round."""
    if not observed.disposed:
        return
    history: list[model.SavepointInfo] = list(draft.get("savepoint_history"))
    for url, error in observed.disposed:
        found = next((i for i, s in enumerate(history) if s.url == url), None)
        if found is None:
            continue
        info = history[found]
        if error is None:
            del history[found]
            draft.event("Normal", "SavepointDisposed", f"savepoint {info.id} deleted from the store ({url})")
        else:
            if info.dispose_error != error:
                draft.event(
                    "Warning",
                    "SavepointDisposeFailed",
                    f"deleting savepoint {info.id} ({url}) failed, retried later: {error}",
                )
            history[found] = info.model_copy(update={"dispose_error": error, "dispose_failed_at": now})
    draft.set(savepoint_history=tuple(history))


def retention(draft: Draft, job: spec.StreamJob, observed: Observed, now: datetime, policy: Policy) -> None:
    """Ask for the deletion of the savepoints retention lets go (see the module docstring)."""
    settings = job.spec.savepoints
    if settings is None:
        return
    protected = _protected(draft, observed)
    history: tuple[model.SavepointInfo, ...] = draft.get("savepoint_history")
    completed = [s for s in history if s.url is not None and s.error is None]
    max_age = timedelta(milliseconds=settings.max_age) if settings.max_age is not None else None
    for index, info in enumerate(completed):
        assert info.url is not None
        too_many = index >= settings.max_count
        too_old = max_age is not None and info.completed_at is not None and now - info.completed_at > max_age
        if not (too_many or too_old) or info.url in protected:
            continue
        if info.dispose_failed_at is not None and now - info.dispose_failed_at < policy.savepoint_retry_after:
            continue
        draft.actions.append(DisposeSavepoint(info.url))


def _protected(draft: Draft, observed: Observed) -> set[str]:
    status = draft.status
    urls: set[str | None] = {resume_point(status)}
    stable: model.StableRecord | None = draft.get("stable")
    if stable is not None:
        urls.add(stable.snapshot)
    intent = draft.intent
    if intent is not None:
        urls.add(intent.restore_from)
    if status.intent is not None:
        urls.add(status.intent.restore_from)
    if observed.deployed is not None:
        urls.add(observed.deployed.restore_from)
    rollback: model.RollbackInfo | None = draft.get("rollback")
    if rollback is not None and rollback.outcome == "RollingBack":  # later, Deployed.restore_from has it
        urls.add(rollback.restored_from)
    return {url.rstrip("/") for url in urls if url is not None} | {url for url in urls if url is not None}


def blocked(
    draft: Draft, generation: int, trigger: model.SavepointTrigger, now: datetime, policy: Policy
) -> bool:
    """Whether failed savepoints for this generation hold the change back (retry later, or stalled)."""
    failures = [
        s
        for s in draft.status.savepoint_history
        if s.error is not None and s.generation == generation and s.trigger == trigger
    ]
    if not failures:
        return False
    if len(failures) >= policy.savepoint_attempts:
        draft.stalled = (
            "SavepointFailed",
            f"{len(failures)} savepoints for generation {generation} failed (last: {failures[0].error}); "
            "the workers keep running the previous spec. Fix the cause, or set upgradeMode: stateless "
            "to redeploy without state.",
        )
        return True
    failed_at = failures[0].completed_at
    return failed_at is not None and now - failed_at < policy.savepoint_retry_after


def info_of(
    job: spec.StreamJob, intent: model.Intent, outcome: SavepointOutcome, now: datetime, *, shutdown: bool
) -> model.SavepointInfo:
    """The history entry of the outcome of ``intent``'s savepoint."""
    trigger: model.SavepointTrigger = (
        (intent.trigger or "nonce")
        if intent.action == "savepoint"
        else ("shutdown" if shutdown else "suspend")
        if intent.action == "suspend"
        else "upgrade"
    )
    return model.SavepointInfo(
        id=outcome.id,
        url=outcome.url if outcome.completed else None,
        trigger=trigger,
        trigger_nonce=job.spec.savepoint_trigger_nonce if trigger == "nonce" else None,
        generation=intent.generation,
        completed_at=outcome.completed_at or now,
        error=None if outcome.completed else (outcome.error or "failed"),
    )
