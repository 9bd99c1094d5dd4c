"""The upgrade life cycle: the stability gate, the rollback to the last stable spec, the refusal of
changes that would make the saved state unusable.

Pure, like ``decide`` which calls it: every function reads the draft, the observations and
``now`` and writes into the draft. The states (``model.LifecycleState``)::

    Deploying ─┐                                        ┌─> Stable
    Upgrading ─┴─ children applied ─> Stabilizing ─ gate┤
                                                        └─ readinessTimeout ─┬─ rollback: auto ─> RollingBack
                                                                             └─ otherwise ──────> Failed
    RollingBack ─ stable spec applied, gate holds ─> RolledBack   (─ readinessTimeout ─> Failed)

**The gate.** A version is stable once, for ``upgrade.stabilityWindow`` without a break (the
*window*), every worker is ready and runs it (``Observed.ready_workers`` counts ready workers of
the current revision), none crash-loops, none restarted (a restart starts the window again;
the deadline keeps running), a checkpoint completed since the window began (jobs with
``spec.checkpoint``) and the lag did not grow by more than ``LAG_SLACK_RECORDS`` plus
``LAG_SLACK_FRACTION`` of its value at the window's start (a grown lag also starts the window
again). Only then are ``lastStableSpec``, ``status.stable`` and ``stableFingerprint`` written and
the ``Deployed``/``Upgraded``/... event emitted.

**Rollback.** Not stable by ``startedAt + upgrade.readinessTimeout``: with ``rollback: auto`` and
a stable spec that differs from the one under test, a ``rollback`` intent stops every failing
worker (scale to zero, wait until none is left: a failing version takes no savepoint) and
applies ``lastStableSpec`` restoring from ``stable.snapshot``, the savepoint taken when the
upgrade left it (none after a ``last-state`` upgrade: the workers resume from their
checkpoints). While ``status.rollback.fromGeneration`` is the job's generation, the stable spec
is what the job runs (``target``): a rolled-back job never re-upgrades to the spec that failed;
a new generation is an upgrade from the stable spec. A rollback that is not stable in time
either is ``Failed``: there is no loop.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import ValidationError

from weir import spec, spec_diff
from weir_operator import model, render
from weir_operator.drafts import Draft
from weir_operator.plans import Deployed, Observed

__all__ = [
    "DONE_REASON",
    "LAG_SLACK_FRACTION",
    "LAG_SLACK_RECORDS",
    "adopt",
    "begin_stabilizing",
    "degraded",
    "gate",
    "healthy",
    "incompatible_fields",
    "initial_restore",
    "refuse",
    "reset_allowed",
    "spec_document",
    "stable_spec",
    "target",
]

LAG_SLACK_RECORDS = 1000
"""Lag growth over a window that still counts as "not growing", in records, on top of
``LAG_SLACK_FRACTION``. An exactly-once job's committed offsets move at checkpoint pace, so its
lag saws up and down by about one checkpoint interval of input; the slack keeps that sawtooth
from restarting the window while a real backlog (a version too slow for its input) still does."""
LAG_SLACK_FRACTION = 0.1
"""Lag growth over a window that still counts as "not growing", as a fraction of the lag at the
window's start (see ``LAG_SLACK_RECORDS``)."""

DONE_REASON: dict[model.IntentAction, str] = {
    "deploy": "Deployed",
    "scale": "Scaled",
    "redeploy": "Redeployed",
    "upgrade": "Upgraded",
    "savepoint": "SavepointCompleted",
    "suspend": "Suspended",
    "resume": "Resumed",
    "restart": "Restarted",
    "rollback": "RolledBack",
    "cleanup": "CleanedUp",
}
"""The event of a change once its version passed the gate (a suspend: once the workers stopped)."""


# --------------------------------------------------------------------------- specs


def spec_document(job_spec: spec.JobSpec) -> dict[str, object]:
    """``job_spec`` as ``status.lastStableSpec`` holds it: camelCase JSON with defaults written."""
    document: dict[str, object] = job_spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return document


def stable_spec(status: model.StreamJobStatus) -> spec.JobSpec | None:
    """``status.lastStableSpec`` as a spec; None when absent or no longer valid (an older weir wrote it)."""
    if status.last_stable_spec is None:
        return None
    try:
        return spec.JobSpec.model_validate(status.last_stable_spec)
    except ValidationError:
        return None


def target(job: spec.StreamJob, generation: int, status: model.StreamJobStatus) -> spec.StreamJob | None:
    """The job with ``lastStableSpec`` while it is rolled back from ``generation``; None otherwise
    (the job's own spec is the target)."""
    rollback = status.rollback
    if rollback is None or rollback.from_generation != generation:
        return None
    stable = stable_spec(status)
    return None if stable is None else job.model_copy(update={"spec": stable})


def initial_restore(job_spec: spec.JobSpec, status: model.StreamJobStatus) -> str | None:
    """``initialSavepointPath`` for a job that has never run (nothing deployed, checkpointed, stable)."""
    never_ran = (
        status.reconciled_fingerprint is None and status.stable is None and status.last_checkpoint is None
    )
    return job_spec.initial_savepoint_path if never_ran else None


def reset_allowed(job_spec: spec.JobSpec) -> bool:
    """Whether the user accepts a new version starting with empty windows (``WEIR_ALLOW_STATE_RESET``)."""
    return job_spec.upgrade.allow_state_reset or job_spec.upgrade_mode == "stateless"


def incompatible_fields(
    old: spec.JobSpec, new: spec.JobSpec, *, namespace: str, name: str
) -> tuple[str, ...]:
    """One line per field of the change ``old`` -> ``new`` that makes ``old``'s saved state unusable
    for ``new`` (``"pipeline.window.size: 1m -> 5m"``); () when the state stays usable or this
    cannot be known from the specs (entrypoint jobs: the runtime's restore check guards them).

    The one place the operator asks the spec-change table (``weir.spec_diff``)."""
    found = spec_diff.diff(old, new, namespace=namespace, name=name)
    if found.state is None or found.state.compatible:
        return ()
    return tuple(found.incompatible_fields())


def refuse(draft: Draft, generation: int, lines: tuple[str, ...]) -> None:
    """Refuse a change whose state is incompatible: no intent, the running version keeps running;
    ``Stalled`` (reason ``IncompatibleStateChange``) names each field and the two ways out. Its
    condition event is the one Warning (the same refusal again adds none)."""
    fields = "; ".join(lines)
    draft.set(observed_generation=generation)
    draft.stalled = (
        "IncompatibleStateChange",
        f"generation {generation} is not applied, the running version keeps running: the change makes "
        f"its saved state unusable ({fields}). Either change the spec back, or set "
        "spec.upgrade.allowStateReset: true (or upgradeMode: stateless) to start the new version with "
        "empty windows from the savepoint's offsets.",
    )


# --------------------------------------------------------------------------- the gate


def healthy(observed: Observed) -> bool:
    """Whether every worker asked for runs the current revision, ready, and none crash-loops:
    the running version can take a savepoint."""
    deployed = observed.deployed
    if deployed is None or deployed.replicas == 0:
        return False
    return observed.ready_workers >= deployed.replicas and not any(w.crash_looping for w in observed.workers)


def begin_stabilizing(draft: Draft, job_spec: spec.JobSpec, intent: model.Intent, replicas: int) -> None:
    """The children of ``intent`` are applied: the gate starts (its deadline counts from the intent's)."""
    upgrade = job_spec.upgrade
    deadline = intent.started_at + timedelta(milliseconds=upgrade.readiness_timeout)
    fp = intent.fingerprint or render.fingerprint(job_spec)
    draft.set(
        lifecycle_state="RollingBack" if intent.action == "rollback" else "Stabilizing",
        stabilization=model.Stabilization(
            kind=intent.action,
            generation=intent.generation,
            fingerprint=fp,
            started_at=intent.started_at,
            deadline=deadline,
        ),
    )
    draft.event(
        "Normal",
        "Stabilizing",
        f"{intent.id}: {replicas} workers run the spec {fp}; "
        f"stable after {_duration(upgrade.stability_window)} "
        f"healthy, else {'failed' if intent.action == 'rollback' else _fallback(job_spec)} at "
        f"{deadline.isoformat()}",
    )


def adopt(draft: Draft, job: spec.StreamJob, generation: int, observed: Observed, now: datetime) -> None:
    """A job an older operator deployed (no ``lifecycleState``): its running workers go through
    the gate from now on, so it gets a ``lastStableSpec`` without a change; stopped ones are
    ``Suspended``."""
    deployed = observed.deployed
    if draft.get("lifecycle_state") is not None or deployed is None or draft.intent is not None:
        return
    if deployed.replicas == 0:
        draft.set(lifecycle_state="Suspended")
        return
    fp = deployed.fingerprint or render.fingerprint(job.spec)
    draft.set(
        lifecycle_state="Stabilizing",
        stabilization=model.Stabilization(
            kind="deploy",
            generation=generation,
            fingerprint=fp,
            started_at=now,
            deadline=now + timedelta(milliseconds=job.spec.upgrade.readiness_timeout),
        ),
    )


def _fallback(job_spec: spec.JobSpec) -> str:
    return "rolled back" if job_spec.upgrade.rollback == "auto" else "failed (rollback: manual)"


def gate(draft: Draft, job: spec.StreamJob, observed: Observed, now: datetime) -> Literal["rollback"] | None:
    """Measure the version under test and move the life cycle on; "rollback": begin one now
    (``draft.rollback`` is written, the caller begins the intent)."""
    current: model.Stabilization | None = draft.get("stabilization")
    deployed = observed.deployed
    if current is None or deployed is None or deployed.replicas == 0:
        return None
    window = timedelta(milliseconds=job.spec.upgrade.stability_window)
    replicas = deployed.replicas
    restarts = sum(w.restarts for w in observed.workers if w.current)  # an old pod's restarts are not ours
    lag: model.Lag | None = draft.get("lag")
    lag_now = lag.records if lag is not None and lag.measured_at == now else None
    passed = ""
    stabilization = current
    if not healthy(observed):
        stabilization = current.model_copy(
            update={
                "window_start": None,
                "measured": _unhealthy(observed, replicas, None),
            }
        )
    elif current.window_start is None or restarts != current.restarts:
        restarted = current.window_start is not None
        stabilization = current.model_copy(
            update={
                "window_start": now,
                "restarts": restarts,
                "lag_at_start": lag_now,
                "window_restarts": current.window_restarts + (1 if restarted else 0),
                # No running time in the text: a status write per change, not per reconcile.
                "measured": (f"a worker restarted ({restarts} restarts): " if restarted else "")
                + f"{replicas}/{replicas} workers ready since {now.isoformat()}, stable at "
                f"{(now + window).isoformat()}",
            }
        )
    else:
        start = current.window_start
        checkpoint: model.CheckpointInfo | None = draft.get("last_checkpoint")
        need_checkpoint = job.spec.checkpoint is not None
        checkpointed = checkpoint is not None and checkpoint.completed_at >= start
        grew = (
            current.lag_at_start is not None
            and lag_now is not None
            and lag_now > current.lag_at_start + _slack(current.lag_at_start)
        )
        if now - start < window:
            pass  # the window runs: its start wrote what there is to say
        elif grew:
            stabilization = current.model_copy(
                update={
                    "window_start": now,
                    "lag_at_start": lag_now,
                    "measured": f"lag grew {current.lag_at_start} -> {lag_now} records over "
                    f"{_duration_td(now - start)}: "
                    "the window starts again",
                }
            )
        elif need_checkpoint and not checkpointed:
            stabilization = current.model_copy(
                update={
                    "measured": f"{replicas}/{replicas} workers ready since {start.isoformat()}, but no "
                    "checkpoint completed since",
                }
            )
        else:
            cp = f", checkpoints to {checkpoint.id}" if checkpoint is not None and checkpointed else ""
            lag_part = (
                f", lag {current.lag_at_start} -> {lag_now} records"
                if current.lag_at_start is not None and lag_now is not None
                else ""
            )
            passed = (
                f"{_duration_td(now - start)} with {replicas}/{replicas} workers ready, 0 restarts{cp}"
                f"{lag_part}"
            )
    if passed:
        _pass(draft, job, deployed, current, passed, now)
        return None
    draft.set(stabilization=stabilization)
    state = draft.get("lifecycle_state")
    if now >= current.deadline and state in ("Stabilizing", "RollingBack"):
        unreachable = sorted({name for r in observed.reports for name in r.outages})
        if unreachable:
            # A broker or store outage is not the new version's fault, and the version a rollback
            # would return to needs the same dependencies: the deadline waits for the outage (it
            # moves one stability window at a time, so status is not rewritten every reconcile).
            waiting = stabilization.model_copy(update={
                "deadline": now + window,
                "measured": f"{', '.join(unreachable)} unreachable: the readiness deadline waits for it",
            })
            draft.set(stabilization=waiting)
            return None
        if not healthy(observed):
            cause = _unhealthy(observed, replicas, now - current.started_at)
        else:
            cause = stabilization.measured
            if stabilization.window_restarts:
                cause += (
                    f"; the window started again {stabilization.window_restarts} times after worker restarts"
                )
        return _timed_out(draft, job, stabilization, cause, now)
    return None


def _pass(
    draft: Draft,
    job: spec.StreamJob,
    deployed: Deployed,
    current: model.Stabilization,
    measured: str,
    now: datetime,
) -> None:
    under_test = _spec_under_test(job, deployed, current)
    if under_test is None:
        draft.set(stabilization=current.model_copy(update={"measured": "the spec under test is not known"}))
        return None
    draft.set(stabilization=None, error=None)
    rollback: model.RollbackInfo | None = draft.get("rollback")
    stable: model.StableRecord | None = draft.get("stable")
    still_rolled_back = (  # redeployed (weir up restarted) while rolled back from this generation
        rollback is not None
        and rollback.from_generation == current.generation
        and stable is not None
        and stable.fingerprint == current.fingerprint
    )
    if current.kind == "rollback" or still_rolled_back:
        # The Degraded condition's event (a Warning, reason RolledBack) says what was rolled back and why.
        draft.set(lifecycle_state="RolledBack")
        if rollback is not None:
            draft.set(rollback=rollback.model_copy(update={"outcome": "RolledBack"}))
            draft.event("Normal", "Stable", f"generation {rollback.to_generation} stable again: {measured}")
        return None
    draft.set(
        lifecycle_state="Stable",
        last_stable_spec=spec_document(under_test),
        stable=model.StableRecord(generation=current.generation, fingerprint=current.fingerprint, since=now),
        stable_fingerprint=current.fingerprint,
    )
    draft.event("Normal", "Stable", f"generation {current.generation} stable: {measured}")
    draft.event(
        "Normal",
        DONE_REASON[current.kind],
        f"generation {current.generation}: {deployed.replicas} workers run the spec {current.fingerprint}",
    )
    return None


def _spec_under_test(
    job: spec.StreamJob, deployed: Deployed, current: model.Stabilization
) -> spec.JobSpec | None:
    """The spec whose fingerprint is under test: the job's (the usual case), else the deployed one
    (a newer spec was refused or waits for its savepoint meanwhile)."""
    if render.fingerprint(job.spec) == current.fingerprint:
        return job.spec
    if deployed.spec is not None and render.fingerprint(deployed.spec) == current.fingerprint:
        return deployed.spec
    return None


def _timed_out(
    draft: Draft, job: spec.StreamJob, current: model.Stabilization, cause: str, now: datetime
) -> Literal["rollback"] | None:
    timeout = _duration(job.spec.upgrade.readiness_timeout)
    if current.kind == "rollback":
        rollback: model.RollbackInfo | None = draft.get("rollback")
        message = (
            f"the rollback is not stable within {timeout} either: {cause}; the workers are left as they are"
        )
        if rollback is not None:
            draft.set(rollback=rollback.model_copy(update={"outcome": "Failed"}))
            message = (
                f"generation {rollback.from_generation} rolled back to generation {rollback.to_generation}, "
                f"which is not stable within {timeout} either: {cause}; the workers are left as they are"
            )
        draft.set(lifecycle_state="Failed", error=message)  # Degraded (RollbackFailed) says it, as an event
        return None
    stable: model.StableRecord | None = draft.get("stable")
    stable_job = stable_spec(draft.status)
    different = (
        stable is not None
        and stable_job is not None
        and (stable.fingerprint != current.fingerprint or stable_job.parallelism != job.spec.parallelism)
    )
    if job.spec.upgrade.rollback == "auto" and different and stable is not None:
        rollback = model.RollbackInfo(
            from_generation=current.generation,
            to_generation=stable.generation,
            reason=f"not stable within {timeout}: {cause}",
            restored_from=stable.snapshot,
            started_at=now,
        )
        # The Degraded condition's event (a Warning, reason RollingBack) announces it with the cause.
        draft.set(rollback=rollback, lifecycle_state="RollingBack", error=None)
        return "rollback"
    why = (
        "rollback: manual"
        if job.spec.upgrade.rollback == "manual"
        else "no stable version to roll back to"
        if stable is None or stable_job is None
        else "the stable version is the same spec"
    )
    message = (
        f"generation {current.generation} is not stable within {timeout}: {cause}; {why}: the workers are "
        "left as they are until the spec changes"
    )
    draft.set(lifecycle_state="Failed", error=message)  # Degraded (UpgradeFailed) says it, as an event
    return None


def _unhealthy(observed: Observed, replicas: int, since: timedelta | None) -> str:
    """What keeps the workers from being healthy; with ``since``, how long it has been going on."""
    looping = [w for w in observed.workers if w.crash_looping]
    span = f" in {_duration_td(since)}" if since is not None else ""
    if looping:
        return "; ".join(
            f"worker {w.index} crash-looping ({w.reason or 'CrashLoopBackOff'}), {w.restarts} restarts{span}"
            for w in looping
        )
    after = f" after {_duration_td(since)}" if since is not None else ""
    return f"{observed.ready_workers}/{replicas} workers ready{after}"


def _slack(lag: int) -> int:
    return LAG_SLACK_RECORDS + int(lag * LAG_SLACK_FRACTION)


def _rolled_back(rollback: model.RollbackInfo) -> str:
    source = rollback.restored_from or "its checkpoints"
    return (
        f"generation {rollback.from_generation} rolled back to generation {rollback.to_generation} "
        f"(restored from {source}): {rollback.reason}"
    )


def degraded(draft: Draft) -> tuple[str, str] | None:
    """The ``Degraded`` (reason, message) the life cycle asks for: rolling back, rolled back, failed."""
    state = draft.get("lifecycle_state")
    rollback: model.RollbackInfo | None = draft.get("rollback")
    if state == "RolledBack" and rollback is not None:
        return ("RolledBack", _rolled_back(rollback))
    if state == "RollingBack" and rollback is not None:
        source = rollback.restored_from or "its checkpoints"
        return (
            "RollingBack",
            f"generation {rollback.from_generation} is {rollback.reason}; rolling back to generation "
            f"{rollback.to_generation} from {source}",
        )
    if state == "Failed":
        reason = (
            "RollbackFailed" if rollback is not None and rollback.outcome == "Failed" else "UpgradeFailed"
        )
        return (reason, draft.get("error") or "not stable within upgrade.readinessTimeout")
    return None


def _duration(ms: int) -> str:
    return _duration_td(timedelta(milliseconds=ms))


def _duration_td(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60}s"
