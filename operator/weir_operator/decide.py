"""The operator's decision: a pure function from (spec, status, observations, now) to a plan.

``decide`` never talks to Kubernetes, a worker or the clock; every input is an argument and
the output is the status to write and the actions to take (``weir_operator.plans``). Both
platforms run it: the kopf operator and ``weir up``.

**Status is a write-ahead log.** Anything that takes more than one step is an ``Intent``
(``status.intent``) recorded *before* its first action, with an id that doubles as the
savepoint request id. A decide that finds an intent continues it: re-sends the same
savepoint request (the workers answer a known id with the savepoint they already took),
re-applies the same children. So an operator restarted between deciding and acting
resumes the intent and never takes a second savepoint or picks a new one.

**Spec changes are classified** against what the workers run (``classify``): ignore <
scale < upgrade < redeploy, combined by taking the maximum, as the Flink operator's
``DiffType`` does. How the old workers stop and what the new ones restore from follows
from the change and ``spec.upgradeMode``:

==============  ===============================================================  ==============
upgradeMode     scale (parallelism)                                              upgrade / redeploy
==============  ===============================================================  ==============
``savepoint``   savepoint with stop, then redeploy restoring from it             the same
``last-state``  savepoint with stop, then redeploy restoring from it (a          redeploy; workers restore
                checkpoint is laid out per worker, a savepoint works with any    their latest checkpoint
                parallelism)
``stateless``   redeploy; workers start from the committed offsets               the same
==============  ===============================================================  ==============

Every weir pipeline ends in a keyed window, so every job is stateful and a parallelism
change hands state over through a savepoint unless the user said ``stateless``. Whatever the
mode, workers of two parallelisms never run at once: the old ones are scaled to zero and
gone before the new ones start (at the same parallelism a rolling replacement is safe: one
pod per ordinal, and a new worker's transactional ids fence its predecessor's).

**The upgrade life cycle** (``weir_operator.lifecycle``): a change whose saved state the new
version cannot use is refused before anything stops (``Stalled``: ``IncompatibleStateChange``)
unless a state reset is allowed; once a change's children are applied the job is
``Stabilizing`` until the stability gate holds (``Stable``: only then ``lastStableSpec``), and
a version not stable within ``upgrade.readinessTimeout`` is rolled back to ``lastStableSpec``
(or ``Failed``). A change while the running version is unhealthy (not ready, crash-looping)
takes no savepoint, which it could not: the new workers restore from the checkpoints, or from
the stable version's snapshot when the new spec is the stable one (a rollback by hand).
Periodic savepoints and their retention: ``weir_operator.savepoints``.

The module layout: ``drafts`` (the plan being built, ``Policy``), ``parallelism`` (autoscaler,
partition cap), ``lifecycle``, ``savepoints``, ``conditions`` (phase and conditions),
``deletion`` (``decide_deletion``).

**A failed savepoint never loses state**: the old workers keep running, the intent is
dropped, the failure goes to ``status.savepointHistory`` and ``Degraded``; the change is
retried after ``Policy.savepoint_retry_after``, at most ``Policy.savepoint_attempts`` times
per generation, then ``Stalled`` says what to do.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from weir import spec
from weir.spec_diff import Change
from weir_operator import conditions, lifecycle, model, parallelism, render, savepoints
from weir_operator.deletion import cleanup_url, decide_deletion
from weir_operator.drafts import Draft, Policy
from weir_operator.plans import Apply, Deployed, Observed, Plan, TakeSavepoint

__all__ = ["Change", "Policy", "classify", "cleanup_url", "decide", "decide_deletion"]


def classify(deployed: Deployed, desired: spec.JobSpec) -> Change:
    """The largest change between what runs and ``desired`` (``state`` is the life cycle, not a change)."""
    change = Change.IGNORE
    if deployed.workers != desired.parallelism:
        change = Change.SCALE
    old = deployed.spec
    if old is not None and old.restart_nonce != desired.restart_nonce:
        return Change.REDEPLOY
    if old is not None:
        # The fingerprint covers restartNonce: compare as if it had not changed.
        same_nonce = old.model_copy(update={"restart_nonce": desired.restart_nonce})
        if render.fingerprint(same_nonce) != render.fingerprint(desired):
            change = Change.UPGRADE
    elif deployed.fingerprint != render.fingerprint(desired):
        change = Change.UPGRADE
    return change


_PREFIX: dict[model.IntentAction, str] = {
    "deploy": "deploy",
    "scale": "scale",
    "redeploy": "redeploy",
    "upgrade": "upgrade",
    "savepoint": "sp",
    "suspend": "suspend",
    "resume": "resume",
    "restart": "restart",
    "rollback": "rollback",
    "cleanup": "cleanup",
}


def decide(
    job: spec.StreamJob,
    generation: int,
    status: model.StreamJobStatus,
    observed: Observed,
    now: datetime,
    *,
    shutdown: bool = False,
    policy: Policy = Policy(),  # noqa: B008 - frozen
) -> Plan:
    """The next step for ``job`` (at ``metadata.generation`` ``generation``).

    ``shutdown``: the platform is going away (``weir up`` stopping): stop the workers as a
    suspend would, recording the savepoint as ``trigger: shutdown``.
    """
    draft = Draft(status)
    deployed = observed.deployed
    draft.set(
        selector=render.selector_string(job.metadata.name),
        parallelism=deployed.replicas if deployed is not None else 0,
        ready_workers=observed.ready_workers,
        worker_restarts=sum(w.restarts for w in observed.workers),
    )
    _record_reports(draft, observed, now)
    savepoints.apply_disposed(draft, observed, now)
    rolled_back = lifecycle.target(job, generation, status)
    if rolled_back is not None:
        # Rolled back from this generation: the stable spec is what runs (the autoscaler waits
        # for the next generation, so it does not move the job off the spec it was returned to).
        job = rolled_back
        draft.apply_spec = job.spec
    else:
        job = parallelism.autoscale(draft, job, status, observed, now, shutdown=shutdown, policy=policy)
    draft.capped = parallelism.cap(job, draft.get("input_partitions"))
    if draft.capped is not None:
        # Everything below deploys, scales and compares with the capped job.
        capped = job.spec.model_copy(update={"parallelism": draft.capped.workers})
        job = job.model_copy(update={"spec": capped})
        if draft.apply_spec is not None:
            draft.apply_spec = capped

    intent = status.intent
    if intent is not None:
        _continue(draft, job, intent, observed, now, generation=generation, shutdown=shutdown, policy=policy)
    if draft.intent is None and not draft.actions and intent is None:
        _start(draft, job, generation, observed, now, shutdown=shutdown, policy=policy)
    idle = draft.intent is None and not draft.actions  # (an intent finished now: measure at once)
    if idle and intent is None:
        lifecycle.adopt(draft, job, generation, observed, now)
    if idle and not shutdown and lifecycle.gate(draft, job, observed, now) == "rollback":
        _begin_rollback(draft, job, generation, observed, now, policy)
    if draft.intent is None:
        savepoints.retention(draft, job, observed, now, policy)
    conditions.write(draft, job, observed, now)
    new_status = status.model_copy(update=draft.updates)
    return Plan(new_status, tuple(draft.actions), tuple(draft.events))


# --------------------------------------------------------------------------- starting


def _start(
    draft: Draft,
    job: spec.StreamJob,
    generation: int,
    observed: Observed,
    now: datetime,
    *,
    shutdown: bool,
    policy: Policy,
) -> None:
    job_spec = job.spec
    running = job_spec.state == "running" and not shutdown
    deployed = observed.deployed
    if deployed is None:
        if shutdown:
            return
        _begin(
            draft,
            job,
            "deploy",
            generation,
            now,
            parallelism=job_spec.parallelism,
            restore_from=savepoints.resume_point(draft.status)
            or lifecycle.initial_restore(job_spec, draft.status),
            message=f"creating the workers ({job_spec.parallelism})"
            + (
                f" from {job_spec.initial_savepoint_path}"
                if lifecycle.initial_restore(job_spec, draft.status)
                else ""
            ),
            observed=observed,
            policy=policy,
        )
        return
    if not running:
        if deployed.replicas > 0:
            trigger: model.SavepointTrigger = "shutdown" if shutdown else "suspend"
            with_savepoint = job_spec.upgrade_mode != "stateless"
            if with_savepoint and savepoints.blocked(draft, generation, trigger, now, policy):
                return
            _begin(
                draft,
                job,
                "suspend",
                generation,
                now,
                parallelism=job_spec.parallelism,
                savepoint=with_savepoint,
                message="stopping the workers" + (" with a savepoint" if with_savepoint else ""),
                observed=observed,
                policy=policy,
            )
        else:
            draft.set(observed_generation=generation)
        return
    if deployed.replicas == 0:
        _begin(
            draft,
            job,
            "resume",
            generation,
            now,
            parallelism=job_spec.parallelism,
            restore_from=deployed.restore_from,
            message=f"starting {job_spec.parallelism} workers"
            + (f" from {deployed.restore_from}" if deployed.restore_from else ""),
            observed=observed,
            policy=policy,
        )
        return

    change = classify(deployed, job_spec)
    if change == Change.IGNORE:
        draft.set(observed_generation=generation)
        if deployed.missing:
            # Someone deleted a ConfigMap or Service: put it back, nothing else changes.
            draft.apply(deployed.workers, deployed.replicas, deployed.restore_from)
            draft.event("Normal", "Repairing", f"recreating {', '.join(deployed.missing)}")
            return
        _routine_savepoints(draft, job, generation, observed, now, policy)
        return
    reset = ""
    stable: model.StableRecord | None = draft.get("stable")
    back_to_stable = stable is not None and render.fingerprint(job_spec) == stable.fingerprint
    # Back to the stable spec, its own state is what restores (its snapshot, or a snapshot of its
    # shape the runtime replays from): nothing to refuse.
    if change >= Change.UPGRADE and deployed.spec is not None and not back_to_stable:
        lines = lifecycle.incompatible_fields(
            deployed.spec, job_spec, namespace=job.metadata.namespace, name=job.metadata.name
        )
        if lines and not lifecycle.reset_allowed(job_spec):
            lifecycle.refuse(draft, generation, lines)
            _routine_savepoints(draft, job, generation, observed, now, policy)  # the old version runs on
            return
        if lines:
            reset = f"; state reset allowed: windows restart empty ({'; '.join(lines)})"
    healthy = lifecycle.healthy(observed)
    action, with_savepoint = _strategy(change, job_spec, deployed, healthy=healthy)
    restore_from = None
    leaving_stable = stable is not None and deployed.fingerprint == stable.fingerprint
    if not healthy and not with_savepoint and stable is not None and back_to_stable:
        # Back to the stable spec by hand while the running version fails: restore its snapshot.
        restore_from = stable.snapshot
    trigger = "upgrade"
    if with_savepoint and savepoints.blocked(draft, generation, trigger, now, policy):
        return
    if leaving_stable and stable is not None and not with_savepoint:
        draft.set(stable=stable.model_copy(update={"snapshot": None}))  # a rollback resumes from checkpoints
    what = {
        "scale": f"parallelism {deployed.workers} -> {job_spec.parallelism}"
        + (f" ({draft.capped.message()})" if draft.capped is not None else ""),
        "upgrade": "the workers' spec changed",
        "redeploy": "restartNonce changed",
    }[action]
    if with_savepoint:
        how = "savepoint with stop, then new workers restoring from it"
    elif restore_from is not None:
        how = f"the running version is not healthy: new workers restoring the stable version's {restore_from}"
    elif not healthy and job_spec.upgrade_mode == "savepoint":
        how = "the running version is not healthy (no savepoint possible): new workers restore checkpoints"
    else:
        how = "new workers"
    _begin(
        draft,
        job,
        action,
        generation,
        now,
        parallelism=job_spec.parallelism,
        savepoint=with_savepoint,
        restore_from=restore_from,
        message=f"{what} ({job_spec.upgrade_mode}): {how}{reset}",
        observed=observed,
        policy=policy,
    )


def _strategy(
    change: Change, job_spec: spec.JobSpec, deployed: Deployed, *, healthy: bool
) -> tuple[Literal["scale", "upgrade", "redeploy"], bool]:
    """Which intent carries a change, and whether the old workers stop through a savepoint.

    A version that is not healthy (workers not ready, crash-looping) cannot take a savepoint;
    at the same parallelism the new workers then restore from the checkpoints (``last-state``),
    the way out of a crash-looping upgrade under ``savepoint`` mode. A parallelism change still
    needs a savepoint (checkpoints are per worker): it waits for the workers to be healthy.
    """
    action: Literal["scale", "upgrade", "redeploy"] = (
        "scale" if change == Change.SCALE else "upgrade" if change == Change.UPGRADE else "redeploy"
    )
    mode = job_spec.upgrade_mode
    same_parallelism = deployed.workers == job_spec.parallelism
    if mode == "stateless":
        return action, False
    if mode == "last-state" or (not healthy and same_parallelism):
        # Checkpoints are per worker: only a savepoint can change the parallelism.
        return action, not same_parallelism
    return action, True


def _begin_rollback(
    draft: Draft, job: spec.StreamJob, generation: int, observed: Observed, now: datetime, policy: Policy
) -> None:
    """Begin the ``rollback`` intent ``lifecycle.gate`` asked for (``draft.rollback`` is written)."""
    stable_spec = lifecycle.stable_spec(draft.status)
    rollback: model.RollbackInfo | None = draft.get("rollback")
    if stable_spec is None or rollback is None:
        return
    stable_job = job.model_copy(update={"spec": stable_spec})
    draft.apply_spec = stable_spec
    _begin(
        draft,
        stable_job,
        "rollback",
        generation,
        now,
        parallelism=stable_spec.parallelism,
        restore_from=rollback.restored_from,
        message=f"stopping generation {rollback.from_generation}, then starting generation "
        f"{rollback.to_generation} from {rollback.restored_from or 'its checkpoints'}",
        observed=observed,
        policy=policy,
    )


def _routine_savepoints(
    draft: Draft, job: spec.StreamJob, generation: int, observed: Observed, now: datetime, policy: Policy
) -> None:
    """A savepoint without stop the running version owes: ``savepointTriggerNonce``, periodic."""
    _maybe_savepoint_nonce(draft, job, generation, observed, now, policy)
    if draft.intent is None and savepoints.periodic_due(draft, job, observed, now):
        deployed = observed.deployed
        assert deployed is not None
        _begin(
            draft,
            job,
            "savepoint",
            generation,
            now,
            parallelism=deployed.workers,
            savepoint=True,
            trigger="periodic",
            message="periodic savepoint (savepoints.interval)",
            observed=observed,
            policy=policy,
        )


def _maybe_savepoint_nonce(
    draft: Draft, job: spec.StreamJob, generation: int, observed: Observed, now: datetime, policy: Policy
) -> None:
    nonce = job.spec.savepoint_trigger_nonce
    if nonce is None or nonce == savepoints.answered_nonce(draft.status):
        return
    deployed = observed.deployed
    if deployed is None or deployed.replicas == 0 or observed.ready_workers < deployed.replicas:
        return  # taken once every worker is up; nothing to save while stopped
    _begin(
        draft,
        job,
        "savepoint",
        generation,
        now,
        parallelism=deployed.workers,
        savepoint=True,
        message=f"savepointTriggerNonce {nonce}",
        observed=observed,
        policy=policy,
    )


_BEGIN_STATE: dict[model.IntentAction, model.LifecycleState] = {
    "deploy": "Deploying",
    "resume": "Deploying",
    "suspend": "Suspended",
}
"""The life-cycle state an intent starts (others: ``Upgrading``; savepoints keep the state)."""


def _new_id(action: model.IntentAction, generation: int, now: datetime) -> str:
    return f"{_PREFIX[action]}-{generation}-{now.strftime('%Y%m%d%H%M%S')}"


def _begin(
    draft: Draft,
    job: spec.StreamJob,
    action: model.IntentAction,
    generation: int,
    now: datetime,
    *,
    parallelism: int,
    observed: Observed,
    message: str,
    savepoint: bool = False,
    restore_from: str | None = None,
    trigger: model.SavepointTrigger | None = None,
    policy: Policy = Policy(),  # noqa: B008 - frozen
) -> None:
    intent_id = _new_id(action, generation, now)
    intent = model.Intent(
        action=action,
        id=intent_id,
        generation=generation,
        started_at=now,
        fingerprint=render.fingerprint(job.spec),
        parallelism=parallelism,
        savepoint_id=intent_id if savepoint else None,
        restore_from=restore_from,
        trigger=trigger,
    )
    draft.set(intent=intent, observed_generation=generation, apply_failure=None)
    if action not in ("savepoint", "rollback"):
        # A new change: what failed before (Failed, RolledBack) is history now.
        draft.set(lifecycle_state=_BEGIN_STATE.get(action, "Upgrading"), stabilization=None, error=None)
    draft.event("Normal", conditions.PROGRESS_REASON[action], message)
    _continue(
        draft, job, intent, observed, now, generation=generation, shutdown=False, policy=policy, fresh=True
    )


# --------------------------------------------------------------------------- continuing


def _continue(
    draft: Draft,
    job: spec.StreamJob,
    intent: model.Intent,
    observed: Observed,
    now: datetime,
    *,
    generation: int,
    shutdown: bool,
    policy: Policy,
    fresh: bool = False,
) -> None:
    """One step of ``intent``: its savepoint first (if any), then applying the children.

    Refused children (``observed.apply_error``) are applied again after a back-off that
    doubles with each refusal of the same ``generation`` (``Policy.apply_retry_after`` up to
    ``Policy.apply_retry_max``), and at once for a new generation: a spec fixed by its user
    converges without waiting, a spec nobody fixes does not load the API server.
    """
    if intent.savepoint_id is not None and intent.restore_from is None:
        outcome = observed.savepoint if not fresh else None
        if outcome is None or outcome.id != intent.savepoint_id:
            draft.actions.append(TakeSavepoint(intent.savepoint_id, stop=intent.action != "savepoint"))
            return
        info = savepoints.info_of(job, intent, outcome, now, shutdown=shutdown)
        history = savepoints.bounded((info, *draft.get("savepoint_history")), job.spec, policy)
        draft.set(last_savepoint=info, savepoint_history=history)
        if info.trigger == "nonce":
            draft.set(answered_savepoint_nonce=job.spec.savepoint_trigger_nonce)
        if not outcome.completed:
            draft.set(intent=None)
            kept = "" if intent.action == "savepoint" else "; the workers keep running the previous spec"
            draft.event("Warning", "SavepointFailed", f"savepoint {outcome.id}: {info.error}{kept}")
            return
        draft.event("Normal", "SavepointCompleted", f"savepoint {outcome.id} at {outcome.url}")
        if intent.action == "savepoint":
            draft.set(intent=None)
            return
        stable: model.StableRecord | None = draft.get("stable")
        deployed = observed.deployed
        if stable is not None and deployed is not None and deployed.fingerprint == stable.fingerprint:
            # The stable version stopped here: a rollback to it restores this savepoint.
            draft.set(stable=stable.model_copy(update={"snapshot": outcome.url}))
        intent = intent.model_copy(update={"restore_from": outcome.url})
        draft.set(intent=intent)

    if intent.action == "rollback":
        stable_spec = lifecycle.stable_spec(draft.status)
        if stable_spec is None:  # pragma: no cover - a rollback begins only with a stable spec
            draft.set(intent=None)
            return
        job = job.model_copy(update={"spec": stable_spec})
        draft.apply_spec = stable_spec
    workers = intent.parallelism if intent.parallelism is not None else job.spec.parallelism
    # A job suspended while another intent runs gets its children without workers.
    replicas = 0 if intent.action == "suspend" or job.spec.state == "suspended" else workers
    deployed = observed.deployed
    fp = render.fingerprint(job.spec)
    if (
        not fresh
        and deployed is not None
        and deployed.fingerprint == fp
        and deployed.workers == workers
        and deployed.replicas == replicas
        and deployed.restore_from == intent.restore_from
        and not deployed.missing
    ):
        draft.set(intent=None, reconciled_fingerprint=fp, error=None, apply_failure=None)
        if replicas == 0:
            draft.set(lifecycle_state="Suspended", stabilization=None)
            draft.event(
                "Normal", lifecycle.DONE_REASON["suspend"], f"{intent.id}: no workers now run the spec {fp}"
            )
        else:
            lifecycle.begin_stabilizing(draft, job.spec, intent, replicas)
        return
    failure: model.ApplyFailure | None = draft.get("apply_failure")
    if observed.apply_error is not None and not fresh:
        # Stalled says why (with an event when it appears); retried after a back-off.
        attempts = failure.attempts + 1 if failure is not None and failure.generation == generation else 1
        delay = min(policy.apply_retry_max, policy.apply_retry_after * 2 ** min(attempts - 1, 16))
        draft.set(
            error=observed.apply_error,
            apply_failure=model.ApplyFailure(attempts=attempts, generation=generation, retry_at=now + delay),
        )
        return
    if failure is not None and not fresh and failure.generation == generation and now < failure.retry_at:
        return  # the same spec was refused: wait for the back-off (or a new spec)
    if intent.action == "rollback" and deployed is not None and deployed.replicas > 0:
        # The failing version takes no savepoint and never runs beside the stable one: stop all
        # of it first (its checkpoints stay; the stable version restores its own snapshot).
        draft.actions.append(Apply(deployed.workers, 0, deployed.restore_from, spec=deployed.spec))
        return
    if intent.action == "rollback" and observed.lingering:
        return  # failing workers still stopping
    if deployed is not None and deployed.workers != workers and replicas > 0:
        # Workers of two parallelisms never run side by side: a partition would have two owners
        # with different transactional ids, and exactly-once output would get duplicates (a
        # StatefulSet's rolling update would overlap them, and Kubernetes restarts a worker that
        # exited after a stop-savepoint). Stop every old worker first, then start the new ones.
        if deployed.replicas > 0:
            draft.apply(deployed.workers, 0, deployed.restore_from)
            return
        if observed.lingering:
            return  # old workers still stopping: the next reconcile starts the new ones
    draft.apply(workers, replicas, intent.restore_from)


# --------------------------------------------------------------------------- observing workers


def _record_reports(draft: Draft, observed: Observed, now: datetime) -> None:
    reports = observed.reports
    if not reports:
        return
    lags = [r.lag_records for r in reports if r.lag_records is not None]
    if lags:
        draft.set(lag=model.Lag(records=sum(lags), measured_at=now))
    counts: dict[str, int] = {}
    for report in reports:
        for topic, count in (report.input_partitions or {}).items():
            counts[topic] = max(count, counts.get(topic, 0))
    if counts and counts != draft.status.input_partitions:
        # The running workers' view replaces the stored one (topics an upgrade dropped go).
        draft.set(input_partitions=counts)
    deployed = observed.deployed
    checkpoints = [r.last_checkpoint for r in reports if r.last_checkpoint is not None]
    # The job's checkpoint is the oldest of the workers' newest: every worker has one at least as new.
    if deployed is not None and deployed.replicas > 0 and len(checkpoints) == deployed.replicas:
        oldest = min(checkpoints, key=lambda c: c.completed_at)
        previous = draft.status.last_checkpoint
        if previous is None or oldest.completed_at >= previous.completed_at:
            draft.set(last_checkpoint=oldest)
