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

The seam for the full savepoint-upgrade state machine (stable-spec tracking, rollback to
``status.stableFingerprint``, a bounded policy for failed savepoints beyond retrying) is
``_strategy``: it picks the steps of a change; a later issue replaces the upgrade branch
with its own intents (``upgrade``, ``rollback``) without touching the rest.

**A failed savepoint never loses state**: the old workers keep running, the intent is
dropped, the failure goes to ``status.savepointHistory`` and ``Degraded``; the change is
retried after ``Policy.savepoint_retry_after``, at most ``Policy.savepoint_attempts`` times
per generation, then ``Stalled`` says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from weir import spec
from weir.objectstores import job_url
from weir.spec_diff import Change
from weir_operator import autoscaler, model, render
from weir_operator.plans import (
    Action,
    Apply,
    Deployed,
    Event,
    Observed,
    Plan,
    RemoveCheckpoints,
    StopWorkers,
    TakeSavepoint,
)

__all__ = ["Change", "Policy", "classify", "decide", "decide_deletion"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the decision, fixed per operator."""

    savepoint_history: int = 10
    """Savepoints kept in ``status.savepointHistory`` (newest first)."""
    savepoint_attempts: int = 3
    """Failed savepoints per generation and trigger before the job is ``Stalled``."""
    savepoint_retry_after: timedelta = timedelta(seconds=60)
    """Wait after a failed savepoint before trying the change again."""
    cleanup_timeout: timedelta = timedelta(minutes=10)
    """How long a deleted job with ``cleanupPolicy: delete`` waits for its store to be removed
    before it is let go anyway (with a Warning naming what is left)."""
    apply_retry_after: timedelta = timedelta(seconds=10)
    """Wait after the first refused apply of a job's children; doubled after each further
    refusal of the same generation (a new spec is applied at once)."""
    apply_retry_max: timedelta = timedelta(minutes=5)
    """Longest wait between two applies of children the API server refused."""
    autoscaler_interval: timedelta = timedelta(seconds=10)
    """The autoscaler measures and decides at most this often per job (reconciles in between, e.g.
    the one its own status write triggers, leave ``status.autoscaler`` alone)."""
    autoscaler_stale_after: timedelta = timedelta(seconds=30)
    """A worker status older than this is stale: no autoscaling decision on it."""


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
_PROGRESS_REASON: dict[model.IntentAction, str] = {
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
_DONE_REASON: dict[model.IntentAction, str] = {
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


@dataclass
class _Draft:
    """The plan being built: status changes, actions, events."""

    status: model.StreamJobStatus
    updates: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stalled: tuple[str, str] | None = None
    capped: _Cap | None = None

    def get(self, name: str) -> Any:
        return self.updates[name] if name in self.updates else getattr(self.status, name)

    def set(self, **values: Any) -> None:
        self.updates.update(values)

    @property
    def intent(self) -> model.Intent | None:
        intent: model.Intent | None = self.get("intent")
        return intent

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))


def decide(
    job: spec.StreamJob,
    generation: int,
    status: model.StreamJobStatus,
    observed: Observed,
    now: datetime,
    *,
    shutdown: bool = False,
    policy: Policy = Policy(),
) -> Plan:
    """The next step for ``job`` (at ``metadata.generation`` ``generation``).

    ``shutdown``: the platform is going away (``weir up`` stopping): stop the workers as a
    suspend would, recording the savepoint as ``trigger: shutdown``.
    """
    draft = _Draft(status)
    deployed = observed.deployed
    draft.set(
        selector=render.selector_string(job.metadata.name),
        parallelism=deployed.replicas if deployed is not None else 0,
        ready_workers=observed.ready_workers,
        worker_restarts=sum(w.restarts for w in observed.workers),
    )
    _record_reports(draft, observed, now)
    job = _autoscale(draft, job, status, observed, now, shutdown=shutdown, policy=policy)
    draft.capped = _parallelism_cap(job, draft.get("input_partitions"))
    if draft.capped is not None:
        # Everything below deploys, scales and compares with the capped job.
        capped = job.spec.model_copy(update={"parallelism": draft.capped.workers})
        job = job.model_copy(update={"spec": capped})

    intent = status.intent
    if intent is not None:
        _continue(draft, job, intent, observed, now, generation=generation, shutdown=shutdown, policy=policy)
    if draft.intent is None and not draft.actions and intent is None:
        _start(draft, job, generation, observed, now, shutdown=shutdown, policy=policy)
    _conditions(draft, job, observed, now)
    new_status = status.model_copy(update=draft.updates)
    return Plan(new_status, tuple(draft.actions), tuple(draft.events))


@dataclass(frozen=True, slots=True)
class _Cap:
    """A parallelism above the input partition count, and what runs instead."""

    wanted: int
    """``spec.parallelism``."""
    workers: int
    """The partition count of the largest input topic: the workers that run."""
    topic: str
    """That topic."""
    several: bool
    """Whether the job has more than one input topic (the message says "largest")."""

    def message(self) -> str:
        largest = "its largest input topic " if self.several else ""
        return (
            f"parallelism {self.wanted} exceeds the {self.workers} partitions of {largest}{self.topic}; "
            f"running {self.workers} workers"
        )


_DECISION_REASON: dict[model.ScalingDirection, str] = {
    "up": "AutoscalerScaleUp", "down": "AutoscalerScaleDown", "manual": "AutoscalerManualScale",
}


def _autoscale(
    draft: _Draft,
    job: spec.StreamJob,
    status: model.StreamJobStatus,
    observed: Observed,
    now: datetime,
    *,
    shutdown: bool,
    policy: Policy,
) -> spec.StreamJob:
    """Run the autoscaler (``weir_operator.autoscaler``) and return ``job`` at the parallelism it owns.

    **Who owns parallelism.** With ``autoscaler.enabled`` and ``mode: auto`` the autoscaler does:
    the job runs ``status.autoscaler.parallelism``; ``spec.parallelism`` is its starting value, and
    a *change* of ``spec.parallelism`` (``kubectl scale``, an edit) becomes the running parallelism
    once (a ``manual`` decision, then the cooldown). Re-applying the same manifest changes nothing,
    so a GitOps tool never fights the autoscaler, and the autoscaler never writes the spec. With
    ``mode: recommend``, or the autoscaler disabled, ``spec.parallelism`` is what runs.

    A decision here changes the job's parallelism before ``_start`` compares it with what runs: the
    rescale is the same ``scale`` intent (stop with a savepoint, restore at the new parallelism) as
    a change of ``spec.parallelism``, so exactly-once holds across it.
    """
    settings = job.spec.autoscaler
    if settings is None or not settings.enabled:
        before = status.autoscaler
        if before is not None and before.parallelism is not None:
            # Ownership goes back to spec.parallelism; enabling again starts from what runs then.
            draft.set(autoscaler=before.model_copy(update={
                "parallelism": None, "spec_parallelism": None, "recommendation": None,
                "reason": "disabled: spec.parallelism runs", "recommendations": (), "samples": (),
            }))
        return job
    deployed = observed.deployed
    running = deployed.workers if deployed is not None and deployed.replicas > 0 else None
    largest = _largest_input(job, draft.get("input_partitions"))
    partitions = largest[1] if largest is not None else None
    adopted = autoscaler.adopt_spec_parallelism(
        settings, status.autoscaler, job.spec.parallelism, running, partitions, now
    )
    current, decision = adopted.status, adopted.decision
    previous = current.measured_at
    due = previous is None or now - previous >= policy.autoscaler_interval or previous > now
    if (
        decision is None
        and due
        and job.spec.state == "running"
        and not shutdown
        and deployed is not None
        and deployed.replicas > 0
        and status.intent is None
    ):
        signals = autoscaler.Signals(observed.lag, observed.reports, deployed.workers,
                                     observed.ready_workers, partitions)
        interval = job.spec.checkpoint.interval if job.spec.checkpoint is not None else 5_000
        outcome = autoscaler.step(settings, current, signals, now, checkpoint_interval_ms=interval,
                                  stale_after=policy.autoscaler_stale_after)
        current, decision = outcome.status, outcome.decision
    draft.set(autoscaler=current)
    if decision is not None:
        draft.set(last_scaling=decision)
        reason = _DECISION_REASON[decision.direction] if decision.applied else "AutoscalerRecommendation"
        draft.event("Normal", reason, decision.reason)
    if settings.mode == "auto" and current.parallelism is not None:
        owned = job.spec.model_copy(update={"parallelism": current.parallelism})
        return job.model_copy(update={"spec": owned})
    return job


def _inputs(job: spec.StreamJob, reported: dict[str, int] | None) -> dict[str, int]:
    """The partition count of each input topic of ``job``, from the workers' reports.

    Only the topics this spec reads count (an upgrade may have changed them); with an
    ``entrypoint`` the operator does not know the pipeline, so every reported topic counts.
    """
    pipeline = job.spec.pipeline
    if not reported or pipeline is None:
        return dict(reported or {})
    repartition = f"weir-{job.metadata.namespace}-{job.metadata.name}-"
    return {
        topic: count
        for topic, count in reported.items()
        if topic in pipeline.source.topics
        or (topic.startswith(repartition) and topic.endswith("-repartition"))
    }


def _largest_input(job: spec.StreamJob, reported: dict[str, int] | None) -> tuple[str, int] | None:
    """The input topic with the most partitions, and its count (None: not reported yet)."""
    inputs = _inputs(job, reported)
    return max(inputs.items(), key=lambda item: (item[1], item[0])) if inputs else None


def _parallelism_cap(job: spec.StreamJob, reported: dict[str, int] | None) -> _Cap | None:
    """The cap on ``job``'s parallelism from the input partition counts the workers reported.

    A worker owns the partitions ``p`` with ``p % workers == index`` of every input topic (the
    sources and the repartition topic), so beyond the largest partition count a worker owns
    nothing in any stage: it would idle, yet hold a pod and take part in every savepoint.
    Only the topics this spec reads count; unknown counts (no worker has reported yet) cap nothing.
    """
    found = _largest_input(job, reported)
    if found is None:
        return None
    topic, largest = found
    if largest < 1 or job.spec.parallelism <= largest:
        return None
    return _Cap(job.spec.parallelism, largest, topic, several=len(_inputs(job, reported)) > 1)


# --------------------------------------------------------------------------- starting


def _start(
    draft: _Draft,
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
            restore_from=_resume_point(draft.status),
            message=f"creating the workers ({job_spec.parallelism})",
            observed=observed,
            policy=policy,
        )
        return
    if not running:
        if deployed.replicas > 0:
            trigger: model.SavepointTrigger = "shutdown" if shutdown else "suspend"
            with_savepoint = job_spec.upgrade_mode != "stateless"
            if with_savepoint and _savepoint_blocked(draft, generation, trigger, now, policy):
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
            draft.actions.append(Apply(deployed.workers, deployed.replicas, deployed.restore_from))
            draft.event("Normal", "Repairing", f"recreating {', '.join(deployed.missing)}")
            return
        _maybe_savepoint_nonce(draft, job, generation, observed, now, policy)
        return
    action, with_savepoint = _strategy(change, job_spec, deployed)
    trigger = "upgrade"
    if with_savepoint and _savepoint_blocked(draft, generation, trigger, now, policy):
        return
    what = {
        "scale": f"parallelism {deployed.workers} -> {job_spec.parallelism}"
        + (f" ({draft.capped.message()})" if draft.capped is not None else ""),
        "upgrade": "the workers' spec changed",
        "redeploy": "restartNonce changed",
    }[action]
    how = "savepoint with stop, then new workers restoring from it" if with_savepoint else "new workers"
    _begin(
        draft,
        job,
        action,
        generation,
        now,
        parallelism=job_spec.parallelism,
        savepoint=with_savepoint,
        message=f"{what} ({job_spec.upgrade_mode}): {how}",
        observed=observed,
        policy=policy,
    )


def _strategy(
    change: Change, job_spec: spec.JobSpec, deployed: Deployed
) -> tuple[Literal["scale", "upgrade", "redeploy"], bool]:
    """Which intent carries a change, and whether the old workers stop through a savepoint.

    The seam for the savepoint-upgrade state machine (a later issue): it will return its own
    intents for ``Change.UPGRADE`` (track stability, roll back) instead of this one-step
    savepoint-and-redeploy.
    """
    action: Literal["scale", "upgrade", "redeploy"] = (
        "scale" if change == Change.SCALE else "upgrade" if change == Change.UPGRADE else "redeploy"
    )
    mode = job_spec.upgrade_mode
    if mode == "stateless":
        return action, False
    if mode == "last-state":
        # Checkpoints are per worker: only a savepoint can change the parallelism.
        return action, deployed.workers != job_spec.parallelism
    return action, True


def _maybe_savepoint_nonce(
    draft: _Draft, job: spec.StreamJob, generation: int, observed: Observed, now: datetime, policy: Policy
) -> None:
    nonce = job.spec.savepoint_trigger_nonce
    if nonce is None or nonce == _answered_nonce(draft.status):
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


def _answered_nonce(status: model.StreamJobStatus) -> int | None:
    for info in (status.last_savepoint, *status.savepoint_history):
        if info is not None and info.trigger == "nonce":
            return info.trigger_nonce
    return None


def _resume_point(status: model.StreamJobStatus) -> str | None:
    """A savepoint the workers stopped with (suspend, shutdown) and nothing ran after it."""
    last = status.last_savepoint
    if last is None or last.url is None or last.trigger not in ("suspend", "shutdown"):
        return None
    checkpoint, saved_at = status.last_checkpoint, last.completed_at
    later = checkpoint is not None and saved_at is not None and checkpoint.completed_at > saved_at
    return None if later else last.url


def _savepoint_blocked(
    draft: _Draft, generation: int, trigger: model.SavepointTrigger, now: datetime, policy: Policy
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


def _new_id(action: model.IntentAction, generation: int, now: datetime) -> str:
    return f"{_PREFIX[action]}-{generation}-{now.strftime('%Y%m%d%H%M%S')}"


def _begin(
    draft: _Draft,
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
    policy: Policy = Policy(),
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
    )
    draft.set(intent=intent, observed_generation=generation, apply_failure=None)
    draft.event("Normal", _PROGRESS_REASON[action], message)
    _continue(
        draft, job, intent, observed, now, generation=generation, shutdown=False, policy=policy, fresh=True
    )


# --------------------------------------------------------------------------- continuing


def _continue(
    draft: _Draft,
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
        trigger: model.SavepointTrigger = (
            "nonce"
            if intent.action == "savepoint"
            else ("shutdown" if shutdown else "suspend")
            if intent.action == "suspend"
            else "upgrade"
        )
        info = model.SavepointInfo(
            id=outcome.id,
            url=outcome.url if outcome.completed else None,
            trigger=trigger,
            trigger_nonce=job.spec.savepoint_trigger_nonce if trigger == "nonce" else None,
            generation=intent.generation,
            completed_at=outcome.completed_at or now,
            error=None if outcome.completed else (outcome.error or "failed"),
        )
        history = (info, *draft.status.savepoint_history)[: policy.savepoint_history]
        draft.set(last_savepoint=info, savepoint_history=history)
        if not outcome.completed:
            draft.set(intent=None)
            kept = "" if intent.action == "savepoint" else "; the workers keep running the previous spec"
            draft.event("Warning", "SavepointFailed", f"savepoint {outcome.id}: {info.error}{kept}")
            return
        draft.event("Normal", "SavepointCompleted", f"savepoint {outcome.id} at {outcome.url}")
        if intent.action == "savepoint":
            draft.set(intent=None)
            return
        intent = intent.model_copy(update={"restore_from": outcome.url})
        draft.set(intent=intent)

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
        done = f"{replicas} workers" if replicas else "no workers"
        draft.event("Normal", _DONE_REASON[intent.action], f"{intent.id}: {done} now run the spec {fp}")
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
    if deployed is not None and deployed.workers != workers and replicas > 0:
        # Workers of two parallelisms never run side by side: a partition would have two owners
        # with different transactional ids, and exactly-once output would get duplicates (a
        # StatefulSet's rolling update would overlap them, and Kubernetes restarts a worker that
        # exited after a stop-savepoint). Stop every old worker first, then start the new ones.
        if deployed.replicas > 0:
            draft.actions.append(Apply(deployed.workers, 0, deployed.restore_from))
            return
        if observed.lingering:
            return  # old workers still stopping: the next reconcile starts the new ones
    draft.actions.append(Apply(workers, replicas, intent.restore_from))


# --------------------------------------------------------------------------- observing workers


def _record_reports(draft: _Draft, observed: Observed, now: datetime) -> None:
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


# --------------------------------------------------------------------------- deletion


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
    policy: Policy = Policy(),
) -> Plan:
    """The next step for a StreamJob being deleted that the platform holds (a finalizer).

    Stop the workers; wait until none is left, since a stopping worker may still write a last
    checkpoint; then, with ``cleanupPolicy: delete``, remove ``<store>/<namespace>/<job>/``;
    then ``release``. A store that cannot be removed is retried at every reconcile
    (``Stalled``, reason ``CleanupFailed``) until ``policy.cleanup_timeout`` after the
    deletion began; then the job is released anyway with a Warning naming what is left:
    deleting a StreamJob never hangs on an unreachable store, and never loses data silently.
    """
    draft = _Draft(status)
    url = cleanup_url(job)
    intent = status.intent
    if intent is None or intent.action != "cleanup":
        intent = model.Intent(
            action="cleanup", id=_new_id("cleanup", generation, now), generation=generation,
            started_at=now, fingerprint=render.fingerprint(job.spec), parallelism=0,
        )
        draft.set(intent=intent, error=None, apply_failure=None)
        then = f", then removing {url}" if url is not None else " (its store is kept: cleanupPolicy retain)"
        draft.event("Normal", "CleaningUp", f"{intent.id}: deleting: stopping the workers{then}")
    draft.set(phase="Deleting", parallelism=0, ready_workers=0)
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
        draft.event("Normal", _DONE_REASON["cleanup"],
                    f"{intent.id}: removed {observed.removed.objects} objects under {url}")
        release, waiting = True, ""
    else:
        error = observed.removed.error
        waiting = f"removing {url}"
        if now - intent.started_at >= policy.cleanup_timeout:
            draft.event("Warning", "CleanupAbandoned",
                        f"{intent.id}: {url} could not be removed within {policy.cleanup_timeout} and is "
                        f"left in place: {error}")
            release = True
        else:
            # The Stalled condition's event says it once; retries of the same failure add none.
            until = (intent.started_at + policy.cleanup_timeout).isoformat()
            draft.set(error=error)
            stalled = ("CleanupFailed", f"removing {url} failed (retried until {until}): {error}")
    if release:
        draft.set(intent=None)
    _write_conditions(draft, now, (
        ("False", "Deleting", "the StreamJob is being deleted"),
        ("True", _PROGRESS_REASON["cleanup"], waiting) if not release else ("False", "CleanedUp", ""),
        ("False", "AsExpected", ""),
        ("True", *stalled) if stalled is not None else ("False", "AsExpected", ""),
    ))
    new_status = status.model_copy(update=draft.updates)
    return Plan(new_status, tuple(draft.actions), tuple(draft.events), release=release)


# --------------------------------------------------------------------------- phase and conditions


def _phase(draft: _Draft, observed: Observed) -> model.Phase:
    intent = draft.intent
    deployed = observed.deployed
    if intent is not None:
        if intent.savepoint_id is not None and intent.restore_from is None:
            return "Savepointing"
        if draft.get("error") is not None:
            return "Failed"
        return {"upgrade": "Upgrading", "suspend": "Suspended"}.get(intent.action, "Deploying")  # type: ignore[return-value]
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


def _conditions(draft: _Draft, job: spec.StreamJob, observed: Observed, now: datetime) -> None:
    old = draft.status
    phase = _phase(draft, observed)
    intent = draft.intent
    deployed = observed.deployed
    replicas = deployed.replicas if deployed is not None else 0
    ready = observed.ready_workers

    looping = [w for w in observed.workers if w.crash_looping]
    unreachable = sorted({name for r in observed.reports for name in r.outages})
    degraded: tuple[str, str, str]
    if looping:
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
        progressing = ("True", _PROGRESS_REASON[intent.action], f"{intent.action} {intent.id}")
    elif phase == "Deploying":
        progressing = ("True", "WorkersStarting", f"{ready}/{replicas} workers ready")
    else:
        progressing = ("False", "Reconciled", "")

    error = draft.get("error")
    failure: model.ApplyFailure | None = draft.get("apply_failure")
    if error is not None and intent is not None:
        retry = ""
        if failure is not None:
            retry = (f" (refused {failure.attempts} times; tried again at {failure.retry_at.isoformat()} "
                     "or when the spec changes)")
        stalled = ("True", "ApplyFailed", f"{error}{retry}")
    elif draft.stalled is not None:
        stalled = ("True", *draft.stalled)
    else:
        stalled = ("False", "AsExpected", "")

    # A capped job runs as well as it can: it may become stable.
    healthy = degraded[0] == "False" or degraded[1] == "ParallelismCapped"
    if ready_c[0] == "True" and healthy and draft.get("last_checkpoint") is not None:
        draft.set(stable_fingerprint=draft.get("reconciled_fingerprint"))
    _write_conditions(draft, now, (ready_c, progressing, degraded, stalled))
    if phase != old.phase:
        draft.set(phase=phase)
        draft.event("Normal", f"Phase{phase}", f"phase {old.phase or 'none'} -> {phase}")


_Condition = tuple[str, str, str]
"""(status, reason, message) of one condition."""


def _write_conditions(
    draft: _Draft, now: datetime, values: tuple[_Condition, _Condition, _Condition, _Condition]
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


def _condition_event(draft: _Draft, type_: str, state: str, reason: str, message: str) -> None:
    if type_ == "Progressing":
        return  # the intents' own events say what is progressing
    warning = state == "True" and type_ in ("Degraded", "Stalled")
    text = f"{type_}={state}" + (f": {message}" if message else "")
    draft.event("Warning" if warning else "Normal", reason if state == "True" else f"{type_}Cleared", text)
