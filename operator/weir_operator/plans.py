"""What ``decide`` reads and returns: observations of a job's workers, and the plan (status + actions).

Plain frozen dataclasses with no Kubernetes or kopf types, so the decision logic is tested with
hand-made values and both platforms (Kubernetes, local processes) produce the same ones.

The flow of one reconcile (``weir_operator.reconciler``)::

    observed = platform.observe(job)            # the observer never acts
    plan = decide(job, generation, status, observed, now)
    platform.write_status(plan.status)          # the intent is durable before any action
    for action in plan.actions: platform.<act>  # Apply / TakeSavepoint
    -> the outcomes are fed to the next decide() as observations

A StreamJob being deleted goes through ``decide_deletion`` instead, with the actions
``StopWorkers`` and ``RemoveCheckpoints``; its plan's ``release`` lets the job go.

A ``TakeSavepoint`` is idempotent by id (the workers' control API promises it), so re-running
an action after an operator restart is safe; the outcome of a savepoint is observed by
asking for it again under the same id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeAlias

from weir import spec
from weir_operator import model

__all__ = [
    "Action",
    "Apply",
    "Deployed",
    "DisposeSavepoint",
    "Event",
    "LagReading",
    "Observed",
    "PartitionLag",
    "Plan",
    "RemoveCheckpoints",
    "RemovedCheckpoints",
    "SavepointOutcome",
    "StopWorkers",
    "TakeSavepoint",
    "WorkerReport",
    "WorkerState",
]


@dataclass(frozen=True, slots=True)
class Deployed:
    """What the platform runs for a job now (Kubernetes: its StatefulSet, Service, ConfigMap)."""

    fingerprint: str | None
    """``render.fingerprint`` of the spec the workers were given (None when unknown)."""
    workers: int
    """The parallelism the workers were configured with (``WEIR_WORKERS``)."""
    replicas: int
    """Worker processes/pods asked for: ``workers`` while running, 0 when stopped."""
    restore_from: str | None = None
    """Checkpoint or savepoint URL the workers were started from."""
    spec: spec.JobSpec | None = None
    """The spec the workers were given (the ConfigMap's manifest); None when unreadable."""
    missing: tuple[str, ...] = ()
    """Children that should exist but do not (``ConfigMap``, ``Service``)."""


@dataclass(frozen=True, slots=True)
class WorkerState:
    """One worker as the platform sees it (a pod, a local process)."""

    index: int
    ready: bool
    restarts: int = 0
    """Restarts of this worker since it was created."""
    crash_looping: bool = False
    """Kubernetes: ``CrashLoopBackOff``; local: restarted again and again within a short time."""
    reason: str = ""
    """Why it is not running, when known (``CrashLoopBackOff``, ``exit code 1``)."""
    current: bool = True
    """Whether it runs what the children ask for now. Kubernetes: its pod's
    ``controller-revision-hash`` is the StatefulSet's ``status.updateRevision`` and the
    StatefulSet controller has seen the latest spec (``observedGeneration``); local: its
    process was started by the latest ``Apply``. A worker of the previous revision that is
    still up (a rolling update not yet at its ordinal, a stale ready count) is not current,
    so it never passes for the new spec."""


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What ``decide`` and the autoscaler need from a worker's ``GET /status``.

    Derived from the payload (``weir.controlapi.WorkerStatus``) by ``workers.report``: lag summed
    and the oldest watermark over its partitions, outages as one line each. Kept apart from the
    payload so the decision logic is tested with hand-made values of only what it reads."""

    index: int
    last_checkpoint: model.CheckpointInfo | None = None
    lag_records: int | None = None
    input_partitions: Mapping[str, int] | None = None
    """Partition count of each input topic the worker reads (``inputPartitions``); None from
    workers that do not say."""
    records_per_second: float | None = None
    """Records the worker processed per second over its last seconds (``recordsPerSecond``)."""
    busy_ratio: float | None = None
    """Fraction of those seconds it was busy processing (``busyRatio``, 0-1)."""
    published_at: datetime | None = None
    """When the worker's loop last refreshed its status (``publishedAt``): a loop that stopped
    coming round serves an old snapshot, which the autoscaler must not trust."""
    watermark_lag_ms: int | None = None
    """Now - its oldest partition watermark (event-time lag), in milliseconds."""
    outages: Mapping[str, str] = field(default_factory=dict)
    """Dependencies the worker cannot reach right now (``outages``: ``kafka``, ``store``),
    each with the error and how long it has lasted; empty when all are reachable."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """The consumer lag of one input partition (``weir_operator.lag``)."""

    topic: str
    partition: int
    end_offset: int
    """The end offset a ``read_committed`` consumer reaches (the last stable offset)."""
    committed: int | None
    """The job's committed offset; None when the group has none for this partition."""
    lag: int
    """Records between where the job resumes and ``end_offset`` (see ``weir_operator.lag``)."""
    input_rate: float | None = None
    """Records per second arriving (growth of ``end_offset``), over the reader's last minute."""
    processing_rate: float | None = None
    """Records per second the job works off (growth of ``end_offset - lag``), over the same time."""

    @property
    def lag_seconds(self) -> float | None:
        """How long this partition's lag takes at its processing rate (None: nothing processed)."""
        if self.lag == 0:
            return 0.0
        if not self.processing_rate:
            return None
        return self.lag / self.processing_rate


@dataclass(frozen=True, slots=True)
class LagReading:
    """The lag of every input partition of a job at one time, or why it could not be read."""

    partitions: tuple[PartitionLag, ...] = ()
    error: str | None = None
    measured_at: datetime | None = None
    """When it was read (a reader may hand out a recent reading again); None: now."""

    @property
    def records(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def end_offsets(self) -> int:
        return sum(p.end_offset for p in self.partitions)


@dataclass(frozen=True, slots=True)
class SavepointOutcome:
    """The answer of every worker to one savepoint request (one id)."""

    id: str
    completed: bool
    url: str | None = None
    """The job-level savepoint: ``<store>/<namespace>/<job>/savepoints/<id>`` (all workers' parts)."""
    error: str | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RemovedCheckpoints:
    """The outcome of ``RemoveCheckpoints``: how many objects went, or why it failed."""

    objects: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything ``decide`` knows about the world besides the spec and the status."""

    deployed: Deployed | None = None
    """None: no children at all."""
    workers: tuple[WorkerState, ...] = ()
    reports: tuple[WorkerReport, ...] = ()
    savepoint: SavepointOutcome | None = None
    """Outcome of the savepoint the current intent asked for, once it has been taken."""
    apply_error: str | None = None
    """Why the last ``Apply`` was refused (invalid for the platform, forbidden); None if it worked."""
    lingering: int = 0
    """Workers alive that the children no longer ask for: pods terminating after a scale to
    fewer replicas or after ``StopWorkers``. New workers of another parallelism start, and a
    deleted job's store is removed, only once none is left."""
    removed: RemovedCheckpoints | None = None
    """Outcome of the ``RemoveCheckpoints`` of this reconcile, once it has run."""
    lag: LagReading | None = None
    """The consumer lag of the job's input partitions, read from Kafka when its autoscaler is
    enabled (None: not read)."""
    disposed: tuple[tuple[str, str | None], ...] = ()
    """Outcomes of the ``DisposeSavepoint`` actions of this reconcile: (savepoint URL, error or None)."""

    @property
    def ready_workers(self) -> int:
        """Workers that are ready AND current: a ready worker of the previous revision does
        not count for the spec the children ask for now."""
        return sum(1 for w in self.workers if w.ready and w.current)


@dataclass(frozen=True, slots=True)
class Apply:
    """Create or update the job's children: ``spec`` (default the job's own), run by ``workers`` workers.

    ``replicas`` is ``workers`` or 0 (suspended); ``restore_from`` is given to workers started
    by this apply only (a worker restarted after a crash recovers from its latest checkpoint).
    """

    workers: int
    replicas: int
    restore_from: str | None = None
    spec: spec.JobSpec | None = None
    """The spec to run; None: the job's own. A rollback applies ``status.lastStableSpec``."""


@dataclass(frozen=True, slots=True)
class TakeSavepoint:
    """Ask every worker for savepoint ``id`` (idempotent by id); ``stop``: the workers exit after it."""

    id: str
    stop: bool


@dataclass(frozen=True, slots=True)
class StopWorkers:
    """Remove the job's children so its workers stop (the StreamJob is being deleted)."""


@dataclass(frozen=True, slots=True)
class RemoveCheckpoints:
    """Delete the job's checkpoints, savepoints and shared files: ``<url>/<namespace>/<job>/``."""

    url: str


@dataclass(frozen=True, slots=True)
class DisposeSavepoint:
    """Delete one savepoint from the store (retention); the outcome is ``Observed.disposed``."""

    url: str


Action: TypeAlias = Apply | TakeSavepoint | StopWorkers | RemoveCheckpoints | DisposeSavepoint


@dataclass(frozen=True, slots=True)
class Event:
    """A Kubernetes event on the StreamJob (the local platform logs it)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The decision: the status to write first, then the actions to take, and the events to emit."""

    status: model.StreamJobStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = field(default=())
    release: bool = False
    """A job being deleted: its clean-up is over, the platform may let it go (the finalizer)."""
