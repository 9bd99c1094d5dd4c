"""The StreamJob status models: what the operator writes under ``status`` (and the CRD's status schema).

The spec models live in the runtime (``weir.spec``), which workers also read; the status is
the operator's alone. Like the spec models they are frozen pydantic models with camelCase
aliases, and the CRD's status schema is generated from them (``weir_operator.crd``).

Reading a status back from the API server ignores keys these models do not know: kopf keeps
its own bookkeeping under ``status.kopf``, which the CRD allows (``x-kubernetes-preserve-
unknown-fields`` on ``status``).

Status is the operator's write-ahead log: before it acts (take a savepoint, replace the
workers, ...) it records an ``Intent`` with a fresh id, so that an operator restarted in
between resumes the intent instead of starting it again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

from pydantic import AwareDatetime, BaseModel, Field, WithJsonSchema

from weir.controlapi import WIRE_MODEL_CONFIG

__all__ = [
    "CONDITION_TYPES",
    "ApplyFailure",
    "AutoscalerInputs",
    "AutoscalerStatus",
    "CheckpointInfo",
    "ConditionStatus",
    "ConditionType",
    "Intent",
    "IntentAction",
    "Lag",
    "LagSample",
    "LifecycleState",
    "Phase",
    "RecommendationRun",
    "Rescale",
    "RollbackInfo",
    "SavepointInfo",
    "SavepointTrigger",
    "ScalingDecision",
    "ScalingDirection",
    "Stabilization",
    "StableRecord",
    "StatusCondition",
    "StreamJobStatus",
]


class _Status(BaseModel):
    """Base of the status models: frozen, camelCase, unknown keys ignored on reading."""

    model_config = WIRE_MODEL_CONFIG


Phase: TypeAlias = Literal[
    "Pending",
    "Deploying",
    "Running",
    "Upgrading",
    "Savepointing",
    "Suspended",
    "RollingBack",
    "Failed",
    "Deleting",
]
"""The job's phase, one word for ``kubectl get sj``; conditions carry the detail. ``RollingBack``
while a rollback's intent runs; the upgrade life cycle itself is ``lifecycleState``."""

LifecycleState: TypeAlias = Literal[
    "Deploying",
    "Upgrading",
    "Stabilizing",
    "Stable",
    "RollingBack",
    "RolledBack",
    "Suspended",
    "Failed",
    "Deleting",
]
"""Where the job is in its upgrade life cycle (``status.lifecycleState``, the ``Lifecycle`` column)::

    Deploying / Upgrading --children applied--> Stabilizing --gate holds--> Stable
    Stabilizing --readinessTimeout, rollback: auto--> RollingBack --stable--> RolledBack
    Stabilizing --readinessTimeout, rollback: manual or nothing stable before--> Failed
    RollingBack --readinessTimeout--> Failed
    Suspended (spec.state: suspended), Deleting (the StreamJob is being deleted)

``RolledBack`` and ``Failed`` last until ``metadata.generation`` changes (a ``Failed`` job whose
workers later pass the gate becomes ``Stable``)."""

ConditionType: TypeAlias = Literal["Ready", "Progressing", "Degraded", "Stalled"]
ConditionStatus: TypeAlias = Literal["True", "False", "Unknown"]
CONDITION_TYPES: tuple[ConditionType, ...] = ("Ready", "Progressing", "Degraded", "Stalled")
"""Every condition type, in the order the operator writes them."""


class StatusCondition(_Status):
    """One condition, shaped like Kubernetes' ``metav1.Condition``.

    ``Ready``: all workers are ready and checkpoints complete. ``Progressing``: the operator
    is moving the job towards its spec (deploying, scaling, upgrading). ``Degraded``: the job
    runs but something is wrong (workers crash-looping, checkpoints failing). ``Stalled``:
    the operator cannot make progress without a change to the spec or the cluster.
    """

    type: ConditionType
    """Which condition."""
    status: ConditionStatus
    """Whether it holds."""
    reason: Annotated[str, Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)]
    """CamelCase machine-readable cause (``WorkersCrashLooping``)."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable detail; never a secret value."""
    last_transition_time: AwareDatetime
    """When ``status`` last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` this condition was computed for."""


class Lag(_Status):
    """Consumer lag of the job's consumer group, summed over its input partitions."""

    records: Annotated[int, Field(ge=0)]
    """Records not yet processed."""
    seconds: Annotated[float, Field(ge=0)] | None = None
    """Age of the oldest unprocessed record, where known."""
    measured_at: AwareDatetime
    """When the lag was measured."""


class CheckpointInfo(_Status):
    """A completed checkpoint."""

    id: Annotated[str, Field(min_length=1)]
    """Checkpoint id (its directory name in the store)."""
    url: Annotated[str, Field(min_length=1)]
    """Where it is: ``<store>/<namespace>/<job>/checkpoints/<id>/``."""
    completed_at: AwareDatetime
    """When its manifest was written."""


SavepointTrigger: TypeAlias = Literal["nonce", "upgrade", "suspend", "shutdown", "manual", "periodic"]


class SavepointInfo(_Status):
    """A completed (or failed) savepoint."""

    id: Annotated[str, Field(min_length=1)]
    """Savepoint id (its directory name in the store); also the request id sent to the workers."""
    url: str | None = None
    """Where it is: ``<store>/<namespace>/<job>/savepoints/<id>/``; absent when it failed."""
    trigger: SavepointTrigger
    """Why it was taken: ``savepointTriggerNonce``, an upgrade, a suspend, a shutdown, by hand."""
    trigger_nonce: int | None = None
    """The ``spec.savepointTriggerNonce`` it answered, for ``trigger: nonce``."""
    generation: Annotated[int, Field(ge=0)] | None = None
    """``metadata.generation`` of the spec the workers ran."""
    completed_at: AwareDatetime | None = None
    """When its manifest was written."""
    error: str | None = None
    """Why it failed; absent for a completed savepoint."""
    dispose_error: str | None = None
    """Why deleting it from the store failed (retention, ``spec.savepoints``); it is tried again
    after ``disposeFailedAt`` + the operator's retry delay. A disposed savepoint leaves the history."""
    dispose_failed_at: AwareDatetime | None = None
    """When the last attempt to delete it failed."""


IntentAction: TypeAlias = Literal[
    "deploy",
    "scale",
    "redeploy",
    "upgrade",
    "savepoint",
    "suspend",
    "resume",
    "restart",
    "rollback",
    "cleanup",
]


class Intent(_Status):
    """The action the operator has decided on and is carrying out (the write-ahead log entry).

    Written to status before the action starts and cleared when it is done; an operator that
    finds an intent on start-up resumes it (the id makes the worker requests idempotent).
    """

    action: IntentAction
    """What is being done."""
    id: Annotated[str, Field(min_length=1)]
    """Unique id of this intent; used as the request id of savepoints it triggers."""
    generation: Annotated[int, Field(ge=0)]
    """``metadata.generation`` of the spec the intent works towards."""
    started_at: AwareDatetime
    """When the intent was recorded."""
    fingerprint: str | None = None
    """Fingerprint of the pod-relevant spec the intent deploys (``weir_operator.render.fingerprint``)."""
    parallelism: Annotated[int, Field(ge=0)] | None = None
    """Parallelism the intent deploys or scales to."""
    savepoint_id: str | None = None
    """Savepoint the intent takes or restores from."""
    restore_from: str | None = None
    """URL of the checkpoint or savepoint the new workers restore from."""
    trigger: SavepointTrigger | None = None
    """For ``action: savepoint``: why it is taken (``nonce`` when absent, ``periodic``)."""


class ApplyFailure(_Status):
    """Refused applies of a job's children, retried with a growing back-off.

    A refusal (an invalid pod template, a quota, a webhook) rarely goes away by itself, so
    retries slow down (``weir_operator.decide.Policy``); a new spec is tried at once.
    """

    attempts: Annotated[int, Field(ge=1)]
    """Consecutive refused applies."""
    generation: Annotated[int, Field(ge=0)]
    """The ``metadata.generation`` whose children were refused."""
    retry_at: AwareDatetime
    """When the same spec is applied again."""


ScalingDirection: TypeAlias = Literal["up", "down", "manual"]


class ScalingDecision(_Status):
    """One parallelism change the autoscaler decided (or, in ``mode: recommend``, would have made)."""

    at: AwareDatetime
    """When it was made."""
    from_parallelism: Annotated[int, Field(ge=0)]
    """Parallelism before."""
    to_parallelism: Annotated[int, Field(ge=0)]
    """Parallelism after (recommended)."""
    direction: ScalingDirection = "up"
    """``up``, ``down``, or ``manual`` (``spec.parallelism`` changed, e.g. by ``kubectl scale``)."""
    applied: bool = False
    """Whether the operator rescaled the job (``mode: auto``) or only recommended it."""
    reason: str = ""
    """The numbers behind it, in words: lag, rates, busy ratio, workers needed."""


class AutoscalerInputs(_Status):
    """The measurements one recommendation was computed from."""

    lag_records: Annotated[int, Field(ge=0)]
    """Lag summed over the input partitions (read_committed end offset - committed offset)."""
    lag_seconds: Annotated[float, Field(ge=0)] | None = None
    """``lagRecords`` / the job's processing rate; absent while nothing is processed."""
    lag_growth_per_second: float | None = None
    """Change of ``lagRecords`` per second over the metrics window (negative: shrinking)."""
    input_rate: Annotated[float, Field(ge=0)] | None = None
    """Records per second arriving on the input topics (growth of their end offsets)."""
    processing_rate: Annotated[float, Field(ge=0)] | None = None
    """Records per second the workers process, summed."""
    busy_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    """The workers' mean busy ratio."""
    capacity_per_worker: Annotated[float, Field(ge=0)] | None = None
    """True processing rate of one worker: processing rate / busy ratio (DS2)."""
    required_rate: Annotated[float, Field(ge=0)] | None = None
    """Input rate + backlog / catchUpDuration."""
    workers_needed: Annotated[float, Field(ge=0)] | None = None
    """``requiredRate`` / (capacity per worker x targetUtilization)."""
    event_time_lag_seconds: Annotated[float, Field(ge=0)] | None = None
    """Now - the oldest watermark the workers report (event-time lag)."""
    slowest_partition: str | None = None
    """The input partition (``topic-partition``) whose lag takes longest at its own processing rate."""
    slowest_partition_lag_seconds: Annotated[float, Field(ge=0)] | None = None
    """Its lag in seconds (its lag records / the rate its committed offset advanced over the last
    minute); absent when it has lag and advanced not at all."""
    partitions: Annotated[int, Field(ge=0)] | None = None
    """Partition count of the largest input topic."""
    workers: Annotated[int, Field(ge=0)] | None = None
    """Workers running when measured."""


class LagSample(_Status):
    """Input end offsets and lag at one time; rates are differences of two samples."""

    at: AwareDatetime
    end_offsets: Annotated[int, Field(ge=0)]
    """End offsets (read_committed) summed over the input partitions."""
    lag_records: Annotated[int, Field(ge=0)]


class RecommendationRun(_Status):
    """A recommendation that held from ``since`` until the next run began (or now)."""

    since: AwareDatetime
    parallelism: Annotated[int, Field(ge=1)]


class Rescale(_Status):
    """The autoscaler's latest rescale: when it began and when its workers were ready again."""

    started_at: AwareDatetime
    ready_at: AwareDatetime | None = None
    """When every new worker was ready; the cooldown counts from here."""
    to_parallelism: Annotated[int, Field(ge=1)]

    @property
    def restore_seconds(self) -> float | None:
        """The measured time of the rescale: savepoint, stop, restore, until every worker is ready."""
        return None if self.ready_at is None else (self.ready_at - self.started_at).total_seconds()


class AutoscalerStatus(_Status):
    """``status.autoscaler``: what the autoscaler recommends now, why, and what it decided before."""

    mode: Literal["auto", "recommend"] = "auto"
    """``spec.autoscaler.mode`` when written."""
    parallelism: Annotated[int, Field(ge=1)] | None = None
    """The parallelism the autoscaler has set (``mode: auto``): what the job runs; ``spec.parallelism``
    is only its starting value."""
    spec_parallelism: Annotated[int, Field(ge=1)] | None = None
    """``spec.parallelism`` as last seen: a different value (``kubectl scale``, an edit) is taken as
    the new running parallelism once; a re-apply of the same value changes nothing."""
    recommendation: Annotated[int, Field(ge=1)] | None = None
    """The parallelism the latest measurements call for; absent when no decision was possible."""
    reason: str = ""
    """Why, in words and numbers (or why no decision was possible)."""
    measured_at: AwareDatetime | None = None
    """When the recommendation was computed."""
    inputs: AutoscalerInputs | None = None
    """The measurements behind it."""
    samples: tuple[LagSample, ...] = ()
    """Recent lag samples, oldest first, covering the metrics window (the input rate and the lag's
    growth are differences of these)."""
    recommendations: tuple[RecommendationRun, ...] = ()
    """Recent recommendations, oldest first, covering the stabilization windows."""
    last_rescale: Rescale | None = None
    """The latest rescale, with its measured duration."""
    history: tuple[ScalingDecision, ...] = ()
    """The latest decisions, newest first (bounded)."""


_SPEC_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
SpecDocument = Annotated[dict[str, Any], WithJsonSchema(_SPEC_OBJECT_SCHEMA)]
"""A whole ``JobSpec`` as JSON (camelCase): the API server keeps it as given."""


class StableRecord(_Status):
    """The version that last passed the stability gate: what a rollback returns to."""

    generation: Annotated[int, Field(ge=0)]
    """``metadata.generation`` of that spec."""
    fingerprint: str
    """Its ``render.fingerprint``."""
    since: AwareDatetime
    """When it passed the gate."""
    snapshot: str | None = None
    """The savepoint a rollback restores it from: the one taken when an upgrade left it. Absent
    while it runs and after a ``last-state``/``stateless`` upgrade: a rollback then resumes from
    the workers' checkpoints."""


class Stabilization(_Status):
    """The stability gate running for the version just applied (``lifecycleState: Stabilizing``)."""

    kind: IntentAction
    """The change that applied it (``deploy``, ``upgrade``, ``scale``, ``rollback``, ...)."""
    generation: Annotated[int, Field(ge=0)]
    """The ``metadata.generation`` it was started for (a rollback: the one rolled back)."""
    fingerprint: str
    """The fingerprint of the spec under test."""
    started_at: AwareDatetime
    """When the change began (its intent): the readiness timeout counts from here."""
    deadline: AwareDatetime
    """``startedAt + upgrade.readinessTimeout``: not stable by then, it is rolled back or failed."""
    window_start: AwareDatetime | None = None
    """When the current healthy stretch began (every worker ready); absent while one is not."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Worker restarts counted at ``windowStart``: any change restarts the window."""
    lag_at_start: Annotated[int, Field(ge=0)] | None = None
    """``status.lag.records`` at ``windowStart`` (absent: not known then)."""
    window_restarts: Annotated[int, Field(ge=0)] = 0
    """Times a worker restart started the window again."""
    measured: str = ""
    """What the gate measured last, in words (why it is not stable yet)."""


class RollbackInfo(_Status):
    """The latest rollback: from which generation, why, and from what it restored."""

    from_generation: Annotated[int, Field(ge=0)]
    """The generation that did not become stable; the job stays rolled back until the generation changes."""
    to_generation: Annotated[int, Field(ge=0)]
    """The generation of ``lastStableSpec``."""
    reason: str
    """What the gate measured when the timeout passed."""
    restored_from: str | None = None
    """The savepoint the stable spec was restarted from (absent: the workers' checkpoints)."""
    started_at: AwareDatetime
    """When the rollback began."""
    outcome: Literal["RollingBack", "RolledBack", "Failed"] = "RollingBack"
    """Where it is: running, done (the stable spec passed the gate again), or failed too."""


class StreamJobStatus(_Status):
    """``status`` of a StreamJob, written only by the operator."""

    phase: Phase | None = None
    """Life-cycle phase."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` the operator last acted on."""
    conditions: tuple[StatusCondition, ...] = ()
    """``Ready``, ``Progressing``, ``Degraded``, ``Stalled``."""
    parallelism: Annotated[int, Field(ge=0)] | None = None
    """Workers the job currently runs with (the scale subresource's ``status.replicas``)."""
    selector: str | None = None
    """Label selector of the worker pods (the scale subresource's ``status.selector``)."""
    ready_workers: Annotated[int, Field(ge=0)] | None = None
    """Workers passing their readiness probe."""
    worker_restarts: Annotated[int, Field(ge=0)] | None = None
    """Container restarts summed over the current workers."""
    lag: Lag | None = None
    """Consumer lag of the job."""
    last_checkpoint: CheckpointInfo | None = None
    """Latest completed checkpoint."""
    last_savepoint: SavepointInfo | None = None
    """Latest savepoint attempt."""
    savepoint_history: tuple[SavepointInfo, ...] = ()
    """Recent savepoints, newest first (bounded by the operator)."""
    reconciled_fingerprint: str | None = None
    """Fingerprint of the spec the workers were last deployed with."""
    stable_fingerprint: str | None = None
    """Fingerprint of the last spec that passed the stability gate (``stable.fingerprint``)."""
    lifecycle_state: LifecycleState | None = None
    """Where the job is in its upgrade life cycle (see ``LifecycleState``)."""
    last_stable_spec: SpecDocument | None = None
    """The whole spec (camelCase JSON) that last passed the stability gate: what a rollback applies."""
    stable: StableRecord | None = None
    """The version of ``lastStableSpec``: its generation, since when, the snapshot it resumes from."""
    stabilization: Stabilization | None = None
    """The stability gate of the version being tried (``Stabilizing``, ``RollingBack``)."""
    rollback: RollbackInfo | None = None
    """The latest rollback."""
    answered_savepoint_nonce: int | None = None
    """The ``spec.savepointTriggerNonce`` last answered with a savepoint (taken or failed)."""
    intent: Intent | None = None
    """The action in progress, recorded before it starts."""
    apply_failure: ApplyFailure | None = None
    """The children were refused (the reason is in ``error`` and the ``Stalled`` condition):
    when the apply is tried again."""
    last_scaling: ScalingDecision | None = None
    """The autoscaler's latest decision (also first in ``autoscaler.history``)."""
    autoscaler: AutoscalerStatus | None = None
    """The autoscaler's recommendation, its inputs and reason, and its recent decisions
    (``spec.autoscaler.enabled``)."""
    input_partitions: dict[str, Annotated[int, Field(ge=0)]] | None = None
    """Partition count of each input topic (the sources, and the repartition topic of a
    two-stage pipeline), as the workers last reported it. A worker owns whole partitions, so
    the job runs at most as many workers as the largest of these has partitions."""
    error: str | None = None
    """Why the job cannot run (an invalid spec, a failed upgrade); never a secret value."""
