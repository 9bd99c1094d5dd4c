"""The job's phase and its four conditions, written from the draft of one decision.

``Ready``, ``Progressing``, ``Degraded``, ``Stalled`` (``model.CONDITION_TYPES``) keep their
transition times while they hold; each change is an event (``Degraded``/``Stalled`` as Warnings).
"""

from __future__ import annotations

from datetime import datetime

from weir import spec
from weir_operator import lifecycle, model
from weir_operator.drafts import Draft
from weir_operator.plans import Observed

__all__ = ["PROGRESS_REASON", "phase_of", "write", "write_conditions"]

PROGRESS_REASON: dict[model.IntentAction, str] = {
    "deploy": "Deploying",
    "scale": "Scaling",
    "redeploy": "Redeploying",
    "upgrade": "Upgrading",
    "savepoint": "Savepointing",
    "suspend": "Suspending",
    "resume": "Resuming",
    "restart": "Restarting",
    "rollback": "RollingBack",
    "cleanup": "CleaningUp",
}
"""The ``Progressing`` reason (and the first event) of each intent."""


def phase_of(draft: Draft, observed: Observed) -> model.Phase:
    intent = draft.intent
    deployed = observed.deployed
    if intent is not None:
        if intent.savepoint_id is not None and intent.restore_from is None:
            return "Savepointing"
        if draft.get("error") is not None:
            return "Failed"
        return {"upgrade": "Upgrading", "suspend": "Suspended", "rollback": "RollingBack"}.get(  # type: ignore[return-value]
            intent.action, "Deploying"
        )
    if deployed is None:
        return "Pending"
    if deployed.replicas == 0:
        return "Suspended"
    return "Running" if observed.ready_workers >= deployed.replicas else "Deploying"


_DEPENDENCY = {
    "kafka": ("Kafka", "KafkaUnreachable"),
    "store": ("checkpoint store", "CheckpointStoreUnreachable"),
}
"""What a worker's ``outages`` key names, and the ``Degraded`` reason while it is unreachable."""


def write(draft: Draft, job: spec.StreamJob, observed: Observed, now: datetime) -> None:
    old = draft.status
    phase = phase_of(draft, observed)
    intent = draft.intent
    deployed = observed.deployed
    replicas = deployed.replicas if deployed is not None else 0
    ready = observed.ready_workers

    looping = [w for w in observed.workers if w.crash_looping]
    unreachable = sorted({name for r in observed.reports for name in r.outages})
    degraded: tuple[str, str, str]
    # The life cycle's cause first: its message names the measurement that failed the change.
    failed = lifecycle.degraded(draft)
    if failed is not None:
        degraded = ("True", *failed)
    elif looping:
        detail = ", ".join(
            f"worker {w.index}: {w.reason or 'crash-looping'} ({w.restarts} restarts)" for w in looping
        )
        degraded = ("True", "WorkersCrashLooping", detail)
    elif draft.get("last_savepoint") is not None and draft.get("last_savepoint").error is not None:
        info = draft.get("last_savepoint")
        degraded = ("True", "SavepointFailed", f"savepoint {info.id} failed: {info.error}")
    elif unreachable:
        # The workers ride the outage out (retrying, not ready); the condition says what they
        # wait for, so `kubectl get sj` shows a broker or store outage, not just unready pods.
        detail = "; ".join(
            f"worker {r.index}: {_DEPENDENCY.get(name, (name, ''))[0]} unreachable: {error}"
            for r in observed.reports
            for name, error in sorted(r.outages.items())
        )
        why = _DEPENDENCY.get(unreachable[0], ("", "DependencyUnreachable"))[1]
        degraded = ("True", why if len(unreachable) == 1 else "DependenciesUnreachable", detail)
    elif draft.capped is not None:
        degraded = ("True", "ParallelismCapped", draft.capped.message())
    else:
        degraded = ("False", "AsExpected", "")

    if phase == "Running" and replicas > 0 and ready >= replicas:
        ready_c = ("True", "WorkersReady", f"{ready}/{replicas} workers ready")
    elif phase == "Suspended":
        why = "spec.state is suspended" if job.spec.state == "suspended" else "stopped"
        ready_c = ("False", "Suspended", why)
    else:
        ready_c = ("False", "WorkersNotReady", f"{ready}/{replicas} workers ready")

    if intent is not None:
        progressing = ("True", PROGRESS_REASON[intent.action], f"{intent.action} {intent.id}")
    elif phase == "Deploying":
        progressing = ("True", "WorkersStarting", f"{ready}/{replicas} workers ready")
    else:
        progressing = ("False", "Reconciled", "")

    error = draft.get("error")
    failure: model.ApplyFailure | None = draft.get("apply_failure")
    if error is not None and intent is not None:
        retry = ""
        if failure is not None:
            retry = (
                f" (refused {failure.attempts} times; tried again at {failure.retry_at.isoformat()} "
                "or when the spec changes)"
            )
        stalled = ("True", "ApplyFailed", f"{error}{retry}")
    elif draft.stalled is not None:
        stalled = ("True", *draft.stalled)
    else:
        stalled = ("False", "AsExpected", "")

    write_conditions(draft, now, (ready_c, progressing, degraded, stalled))
    if phase != old.phase:
        draft.set(phase=phase)
        draft.event("Normal", f"Phase{phase}", f"phase {old.phase or 'none'} -> {phase}")


_Condition = tuple[str, str, str]
"""(status, reason, message) of one condition."""


def write_conditions(
    draft: Draft, now: datetime, values: tuple[_Condition, _Condition, _Condition, _Condition]
) -> None:
    """Set the conditions (in ``CONDITION_TYPES`` order), keeping transition times and emitting
    an event for each that changed."""
    previous = {c.type: c for c in draft.status.conditions}
    conditions = []
    for type_, (state, reason, message) in zip(model.CONDITION_TYPES, values, strict=True):
        before = previous.get(type_)
        changed = before is None or before.status != state
        conditions.append(
            model.StatusCondition(
                type=type_,
                status=state,
                reason=reason,
                message=message[:32768],
                last_transition_time=now if changed or before is None else before.last_transition_time,
            )
        )
        appeared = before is None and state == "True"
        new_cause = before is not None and before.reason != reason and state == "True"
        if appeared or (before is not None and changed) or new_cause:
            _condition_event(draft, type_, state, reason, message)
    draft.set(conditions=tuple(conditions))


def _condition_event(draft: Draft, type_: str, state: str, reason: str, message: str) -> None:
    if type_ == "Progressing":
        return  # the intents' own events say what is progressing
    warning = state == "True" and type_ in ("Degraded", "Stalled")
    text = f"{type_}={state}" + (f": {message}" if message else "")
    draft.event("Warning" if warning else "Normal", reason if state == "True" else f"{type_}Cleared", text)
