"""The StreamJob ``spec``: worker pods, resources, the autoscaler and ``JobSpec`` itself."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from weir.spec_common import (
    Duration,
    LocatedError,
    ObjectName,
    PositiveDuration,
    SpecModel,
)
from weir.spec_connections import CheckpointSpec, KafkaSpec
from weir.spec_pipeline import Pipeline

MAX_PARALLELISM = 1024
"""The most workers a job may ask for (``parallelism``, the autoscaler's bounds).

A worker owns whole input partitions, so more workers than the largest input topic has
partitions only sit idle (the operator caps a job at its partition count once the workers
report it). 1024 is above the partition count of nearly every topic (Kafka sizes partitions
per cluster and broker: thousands per broker, rarely more than a few hundred per topic),
and at it the operator already polls 1024 control APIs per resync and a savepoint waits for
1024 answers; a million workers is a typo, refused at ``kubectl apply``.
"""

_ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"

# Kubernetes' resource.Quantity syntax (k8s.io/apimachinery/pkg/api/resource).
_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(_QUANTITY_PATTERN)
_QUANTITY_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string", "pattern": _QUANTITY_PATTERN}],
    "x-kubernetes-int-or-string": True,
}


def _check_quantity(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _QUANTITY_RE.fullmatch(value):
        return value
    if isinstance(value, float):
        # The API server takes a quantity as an integer or a string only.
        raise ValueError(f"write a fractional quantity as a string, e.g. '{value}' or '500m' (got {value!r})")
    raise ValueError(f"must be a quantity such as 500m, 2, 1.5, 512Mi or 2Gi (got {value!r})")


Quantity = Annotated[int | str, BeforeValidator(_check_quantity), WithJsonSchema(_QUANTITY_SCHEMA)]
"""A Kubernetes resource quantity: an integer or a string such as ``"500m"`` or ``"2Gi"``."""

# A free-form Kubernetes object (an affinity, an EnvVarSource): the models pass it through
# unchanged and the API server validates it where it lands, in the pod template.
_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
KubernetesObject = Annotated[dict[str, Any], WithJsonSchema(_OBJECT_SCHEMA)]


class Resources(SpecModel):
    """Compute resources of each worker container, as in a Kubernetes container's ``resources``."""

    limits: dict[Annotated[str, Field(min_length=1)], Quantity] = {}
    """Maximum amount per resource (``cpu``, ``memory``, ``ephemeral-storage``, ...)."""
    requests: dict[Annotated[str, Field(min_length=1)], Quantity] = {}
    """Amount per resource the scheduler reserves."""


_ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

WORKER_ENV_PREFIX = "WEIR_"
"""Environment variables starting with this are the operator's way of configuring workers;
``spec.env`` may not set them."""


class EnvVar(SpecModel):
    """An environment variable of the worker container (a Kubernetes ``EnvVar``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.value) && has(self.valueFrom))",
                    "message": "set value or valueFrom, not both",
                }
            ]
        }
    )

    name: Annotated[str, Field(pattern=_ENV_NAME_PATTERN)]
    """Variable name."""
    value: str | None = None
    """Literal value; never put a secret here, use ``valueFrom.secretKeyRef``."""
    value_from: KubernetesObject | None = None
    """A Kubernetes ``EnvVarSource``: ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` or
    ``resourceFieldRef``."""

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise LocatedError(("valueFrom",), "set value or valueFrom, not both")
        return self


class Toleration(SpecModel):
    """A Kubernetes pod toleration."""

    key: str | None = None
    """Taint key; omitted with ``operator: Exists`` tolerates every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """How ``value`` is compared (Kubernetes default ``Equal``)."""
    value: str | None = None
    """Taint value for ``Equal``."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; omitted means all."""
    toleration_seconds: Annotated[int, Field(strict=True)] | None = None
    """For ``NoExecute``: how long the pod stays bound after the taint appears."""


class LocalObjectReference(SpecModel):
    """A reference to an object by name in the StreamJob's namespace."""

    name: ObjectName
    """The object's name."""


RESERVED_LABEL_PREFIX = "weir.dev/"
"""Labels and annotations under this prefix belong to weir (the StatefulSet selector uses them)."""


class PodTemplate(SpecModel):
    """Overrides applied to every worker pod."""

    labels: dict[str, str] = {}
    """Extra pod labels (not under ``weir.dev/``)."""
    annotations: dict[str, str] = {}
    """Extra pod annotations (not under ``weir.dev/``)."""
    node_selector: dict[str, str] = {}
    """Node labels a worker's node must have."""
    tolerations: tuple[Toleration, ...] = ()
    """Taints the workers tolerate."""
    affinity: KubernetesObject | None = None
    """A Kubernetes ``Affinity`` (node, pod and pod anti-affinity)."""
    service_account_name: ObjectName | None = None
    """ServiceAccount the workers run as; omitted means the namespace's ``default`` (workers
    need no Kubernetes API access, so no token is mounted unless this is set)."""
    image_pull_secrets: tuple[LocalObjectReference, ...] = ()
    """Secrets for pulling the image from a private registry."""

    @field_validator("labels", "annotations")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise LocatedError((key,), f"keys under {RESERVED_LABEL_PREFIX} are set by weir")
        return value


# --------------------------------------------------------------------------- autoscaler


class AutoscalerSpec(SpecModel):
    """The operator's autoscaler: parallelism follows the job's consumer lag and its workers' capacity.

    Every reconcile the operator reads the lag of the job's consumer group (the end offset a
    ``read_committed`` consumer reaches minus the committed offset, per partition of every input
    topic) and each worker's processing rate and busy ratio, and computes, DS2-style, the
    parallelism that processes the input rate plus the backlog within ``catchUpDuration`` at
    ``targetUtilization``, rounded up to the smallest parallelism with the same most partitions
    per worker. It scales up once that holds for ``scaleUpStabilizationWindow``, down once it
    holds for ``scaleDownStabilizationWindow`` and never while catching up, and waits
    ``cooldown`` after each rescale. Each recommendation and its reason are in
    ``status.autoscaler`` and in an event. While enabled (``mode: auto``) the autoscaler owns
    the running parallelism; ``parallelism`` is the starting value and a change of it (``kubectl
    scale``) sets the running parallelism once.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxParallelism) || "
                    "(has(self.minParallelism) ? self.minParallelism : 1) <= self.maxParallelism",
                    "message": "minParallelism must not exceed maxParallelism",
                    "fieldPath": ".minParallelism",
                }
            ]
        }
    )

    enabled: Annotated[bool, Field(strict=True)] = False
    """Whether the autoscaler runs for this job (with ``mode: auto`` it changes the running
    parallelism; with ``mode: recommend`` it only writes its recommendations)."""
    mode: Literal["auto", "recommend"] = "auto"
    """``auto``: act on the recommendations (a rescale through a savepoint, as a change of
    ``parallelism``). ``recommend``: passive, write them to ``status.autoscaler`` and events only."""
    min_parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM, strict=True)] = 1
    """Lowest parallelism the autoscaler sets."""
    max_parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM, strict=True)] | None = None
    """Highest parallelism the autoscaler sets; omitted means the partition count of the largest
    input topic."""
    target_utilization: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Busy ratio (0-1] the workers should run at: the headroom kept for bursts."""
    lag_threshold_records: Annotated[int, Field(ge=0, strict=True)] | None = None
    """A job whose lag exceeds this many records (summed over its input partitions) is catching
    up: it is never scaled down. Omitted: only ``lagThresholdTime`` applies."""
    lag_threshold_time: Duration | None = None
    """A job whose lag exceeds this in time (lag records / processing rate) is catching up: it is
    never scaled down. Omitted: 3 checkpoint intervals, at least 30s (an exactly-once job's
    committed offsets trail by up to one interval)."""
    metrics_window: PositiveDuration = 300_000
    """Window over which the input rate and the lag's growth are measured (default 5m)."""
    scale_up_stabilization_window: Duration = 60_000
    """A scale-up happens once every recommendation of this long is above the running
    parallelism (to the lowest of them; default 1m)."""
    scale_down_stabilization_window: Duration = 900_000
    """A scale-down happens once every recommendation of this long is below the running
    parallelism (to the highest of them; default 15m)."""
    max_scale_down_factor: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Largest fraction of the workers one scale-down removes (0.5: at most half)."""
    cooldown: Duration = 60_000
    """No decision for this long after a rescale's new workers are all ready (the rescale
    itself, savepoint and restore, is waited for and measured; default 1m)."""
    catch_up_duration: PositiveDuration = 300_000
    """Time in which a scaled job should work off its backlog (default 5m)."""

    @model_validator(mode="after")
    def _min_not_above_max(self) -> AutoscalerSpec:
        if self.max_parallelism is not None and self.min_parallelism > self.max_parallelism:
            raise LocatedError(
                ("minParallelism",),
                f"must not exceed maxParallelism ({self.min_parallelism} > {self.max_parallelism})",
            )
        return self


# --------------------------------------------------------------------------- upgrades and savepoints


class UpgradeSpec(SpecModel):
    """How the operator carries out a spec change and decides whether the new version works.

    After every deploy, upgrade, rescale, redeploy, resume or rollback the job is
    ``Stabilizing``; it becomes ``Stable`` once, for ``stabilityWindow`` without a break, every
    worker is ready and runs the new spec, no worker restarted, a checkpoint completed (jobs with
    ``checkpoint`` only) and the lag did not grow. Only a stable spec becomes
    ``status.lastStableSpec``, the spec a rollback returns to.
    """

    stability_window: Duration = 60_000
    """How long the new version must run healthy to count as stable (default 1m; ``0``: as soon as
    every worker is ready, a checkpoint completed since they were, and the lag is known)."""
    readiness_timeout: PositiveDuration = 300_000
    """Time from the start of a change until its version must be stable (default 5m); after it
    the change is rolled back (``rollback: auto``) or the job is ``Failed`` (``manual``)."""
    rollback: Literal["auto", "manual"] = "auto"
    """``auto``: a version that is not stable within ``readinessTimeout`` is stopped and
    ``lastStableSpec`` is started again from the savepoint taken when it was left (or, after a
    ``last-state`` upgrade, from its checkpoints). ``manual``: the job is ``Failed`` and its
    workers are left as they are until the spec changes."""
    allow_state_reset: Annotated[bool, Field(strict=True)] = False
    """Allow a change that makes the saved state unusable (window type, size, slide or gap, the
    key, an aggregate's function, ...): the new version starts with empty windows at the
    savepoint's offsets. Without it such a change is refused and the old version keeps running
    (``upgradeMode: stateless`` allows it too)."""


class SavepointsSpec(SpecModel):
    """Periodic savepoints and how many savepoints the store keeps."""

    interval: Duration | None = None
    """Take a savepoint (without stopping) when the newest one is older than this, while the job
    runs; omitted: no periodic savepoints."""
    max_count: Annotated[int, Field(ge=1, le=1000, strict=True)] = 10
    """Completed savepoints kept; older ones are deleted from the store (never the one
    ``lastStableSpec`` or a running restore needs)."""
    max_age: Duration | None = None
    """Savepoints older than this are deleted from the store (same exceptions); omitted: no limit."""


# --------------------------------------------------------------------------- job spec

UpgradeMode: TypeAlias = Literal["stateless", "savepoint", "last-state"]
JobState: TypeAlias = Literal["running", "suspended"]
DeliveryGuarantee: TypeAlias = Literal["exactly-once", "at-least-once"]


class JobSpec(SpecModel):
    """A StreamJob ``spec``: what to run, where and how the operator manages it.

    Exactly one of ``pipeline`` (declarative) and ``entrypoint`` (a Python function
    returning a pipeline) is set.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.pipeline) != has(self.entrypoint)",
                    "message": "must set exactly one of pipeline, entrypoint",
                }
            ]
        }
    )

    image: Annotated[str, Field(min_length=1)] | None = None
    """Worker image; omitted means the operator's default worker image. With ``entrypoint``
    the module must be importable in it."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Kubernetes image pull policy; omitted means the Kubernetes default."""
    parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM, strict=True)] = 1
    """Number of workers (1-1024). A worker owns whole input partitions: once the workers
    report the partition counts, a job asking for more workers than its largest input topic
    has partitions runs one worker per partition, with the condition ``Degraded`` (reason
    ``ParallelismCapped``) naming both numbers."""
    resources: Resources | None = None
    """Compute resources of each worker."""
    env: tuple[EnvVar, ...] = ()
    """Extra environment variables of each worker (not starting with ``WEIR_``)."""
    pod_template: PodTemplate | None = None
    """Overrides for the worker pods."""
    kafka: KafkaSpec
    """Kafka connection."""
    pipeline: Pipeline | None = None
    """The declarative pipeline."""
    entrypoint: Annotated[str, Field(pattern=_ENTRYPOINT_PATTERN)] | None = None
    """``package.module:function``; the function takes no arguments and returns a Pipeline
    or a pipeline builder. The module must be importable in the worker image."""
    checkpoint: CheckpointSpec | None = None
    """Checkpoint store and cadence; omitted means no durable state (a restart starts from
    the committed offsets with empty windows)."""
    delivery_guarantee: DeliveryGuarantee = "exactly-once"
    """``exactly-once``: output and offsets commit in one Kafka transaction.
    ``at-least-once``: no transactions; after a failure some results may be written twice."""
    upgrade_mode: UpgradeMode = "savepoint"
    """How a changed spec replaces running workers: ``savepoint`` (stop with a savepoint,
    restore from it), ``last-state`` (restore from the latest checkpoint) or ``stateless``
    (start from the committed offsets without state). Default ``savepoint``, which the API
    server writes into the object."""
    state: JobState = "running"
    """``suspended`` stops the workers (with a savepoint unless ``upgradeMode`` is stateless);
    ``running`` starts them again from it."""
    restart_nonce: Annotated[int, Field(strict=True)] | None = None
    """Change it to restart every worker (using ``upgradeMode``)."""
    savepoint_trigger_nonce: Annotated[int, Field(strict=True)] | None = None
    """Change it to take a savepoint of the running job."""
    autoscaler: AutoscalerSpec | None = None
    """The lag-driven autoscaler (omitted: off; ``parallelism`` is what runs)."""
    upgrade: UpgradeSpec = UpgradeSpec()
    """The stability gate and rollback of spec changes, and whether a state reset is allowed."""
    savepoints: SavepointsSpec | None = None
    """Periodic savepoints and their retention (omitted: savepoints are taken for upgrades,
    suspends and ``savepointTriggerNonce`` only, and none is deleted)."""
    initial_savepoint_path: Annotated[str, Field(min_length=1)] | None = None
    """A savepoint URL a new job starts from (e.g. one taken by another job); ignored once the
    job has run."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: tuple[EnvVar, ...]) -> tuple[EnvVar, ...]:
        seen: set[str] = set()
        for index, var in enumerate(value):
            if var.name.startswith(WORKER_ENV_PREFIX):
                raise LocatedError(
                    (index, "name"), f"variables starting with {WORKER_ENV_PREFIX} are set by the operator"
                )
            if var.name in seen:
                raise LocatedError((index, "name"), f"{var.name} is set twice")
            seen.add(var.name)
        return value

    @model_validator(mode="after")
    def _pipeline_or_entrypoint(self) -> JobSpec:
        if (self.pipeline is None) == (self.entrypoint is None):
            got = "both" if self.pipeline is not None else "neither"
            raise ValueError(f"must set exactly one of pipeline, entrypoint (got {got})")
        credentials = self.checkpoint.credentials_secret if self.checkpoint is not None else None
        if credentials is not None:
            for index, var in enumerate(self.env):
                if var.name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    raise LocatedError(
                        ("env", index, "name"), "is set from checkpoint.credentialsSecret; remove one of them"
                    )
        return self
