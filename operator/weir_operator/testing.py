"""Hand-written fakes of the operator's boundaries, shared by the tests and by users' tests.

``FakePlatform`` runs "workers" in memory: applying makes them exist (and, by default,
ready), savepoints are idempotent by id like the real control API, and every call is
logged in order, so a test can check that the status (the intent) was written before the
action it announces.

``FakeWorkerAPI`` plays one worker's control API for tests that talk HTTP to
real ``weir.control.ControlServer`` instances (``serve_workers``), with statuses built by
``worker_status`` from the runtime's payload models, as a worker builds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from weir import spec
from weir.control import ControlServer, RequestRejected
from weir.controlapi import (
    CheckpointStatus,
    OutageStatus,
    PartitionStatus,
    SavepointAnswer,
    SavepointRequest,
    WorkerStatus,
)
from weir.objectstores import CheckpointError
from weir_operator import model, render
from weir_operator.plans import (
    Apply,
    Deployed,
    Event,
    LagReading,
    Observed,
    PartitionLag,
    SavepointOutcome,
    WorkerReport,
    WorkerState,
)
from weir_operator.platforms import ApplyRejected

__all__ = [
    "Clock",
    "FakePlatform",
    "FakeWorkerAPI",
    "OperatorCrashed",
    "SimulatedJob",
    "serve_workers",
    "worker_status",
]


class OperatorCrashed(Exception):
    """Raised by ``FakePlatform`` to simulate the operator process dying in the middle of an action."""


@dataclass
class Clock:
    """Injected time: starts at a fixed instant, moves only when told."""

    current: datetime = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> datetime:
        self.current += timedelta(seconds=seconds)
        return self.current


@dataclass
class FakePlatform:
    """An in-memory platform. Set the public fields to shape what ``observe`` sees."""

    store: str = "file:///var/lib/weir/checkpoints"
    deployed: Deployed | None = None
    workers_ready: bool = True
    """Whether workers are ready as soon as they are applied."""
    crash_looping: frozenset[int] = frozenset()
    """Indices of workers that crash-loop."""
    reports: tuple[WorkerReport, ...] = ()
    lag: LagReading | None = None
    """What ``observe`` says the job's consumer lag is (None: not read)."""
    savepoint_error: str | None = None
    """Every new savepoint fails with this message."""
    reject_apply: str | None = None
    """Every apply is refused with this message."""
    remove_error: str | None = None
    """Every removal of the job's store fails with this message."""
    store_objects: int = 7
    """Objects a removal of the job's store deletes."""
    lingering: int = 0
    """Workers still stopping that the children no longer ask for."""
    crash_before: frozenset[str] = frozenset()
    """Actions ("apply", "savepoint", "remove", "dispose") that crash the 'operator' before they happen."""
    crash_after: frozenset[str] = frozenset()
    """Actions that crash the 'operator' after they happened, before it learns the outcome."""
    crash_at_step: int | None = None
    """Crash the 'operator' right after its step number ``crash_at_step`` (counted from 1 over every
    status write, apply, savepoint, deletion of a savepoint): a test injects a restart after each
    step of a run in turn. Cleared when it fires (one crash)."""
    steps: int = 0
    """Steps taken so far (see ``crash_at_step``)."""
    broken_images: frozenset[str] = frozenset()
    """Workers of a spec whose ``image`` is one of these crash-loop (a version that fails)."""
    restarts: dict[int, int] = field(default_factory=dict)
    """Extra restarts of worker ``index`` (a test bumps them to simulate a restart)."""
    not_current: frozenset[int] = frozenset()
    """Indices of workers still running an older revision of the children (a rolling update)."""
    dispose_error: str | None = None
    """Every deletion of a savepoint fails with this message."""
    disposed: list[str] = field(default_factory=list)
    """Savepoint URLs deleted, in order."""
    statuses: list[model.StreamJobStatus] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    applied: list[Apply] = field(default_factory=list)
    savepoints: dict[str, SavepointOutcome] = field(default_factory=dict)
    """Savepoints taken, by id; a request with a known id answers the same outcome."""
    calls: list[str] = field(default_factory=list)
    """Every call in order: ``status:<phase>:<intent id>``, ``apply``, ``savepoint:<id>``, ``deleted``,
    ``removed``, ``dispose:<url>``."""
    clock: Clock = field(default_factory=Clock)

    @property
    def status(self) -> model.StreamJobStatus:
        return self.statuses[-1] if self.statuses else model.StreamJobStatus()

    def observe(self, job: spec.StreamJob) -> Observed:
        deployed = self.deployed
        if deployed is None:
            return Observed(reports=self.reports, lingering=self.lingering, lag=self.lag)
        looping = self._looping()
        workers = tuple(
            WorkerState(
                index=i,
                ready=self.workers_ready and i not in looping,
                restarts=(5 if i in looping else 0) + self.restarts.get(i, 0),
                crash_looping=i in looping,
                reason="CrashLoopBackOff" if i in looping else "",
                current=i not in self.not_current,
            )
            for i in range(deployed.replicas)
        )
        return Observed(deployed=deployed, workers=workers, reports=self.reports, lingering=self.lingering,
                        lag=self.lag)

    def _looping(self) -> frozenset[int]:
        deployed = self.deployed
        if deployed is None:
            return frozenset()
        if deployed.spec is not None and deployed.spec.image in self.broken_images:
            return frozenset(range(deployed.replicas))
        return self.crash_looping

    def _step(self, what: str) -> None:
        self.steps += 1
        if self.crash_at_step is not None and self.steps == self.crash_at_step:
            self.crash_at_step = None
            raise OperatorCrashed(f"after step {self.steps} ({what})")

    def apply(self, job: spec.StreamJob, action: Apply) -> None:
        if "apply" in self.crash_before:
            raise OperatorCrashed("apply")
        self.calls.append("apply")
        if self.reject_apply is not None:
            raise ApplyRejected(self.reject_apply)
        self.applied.append(action)
        job_spec = action.spec if action.spec is not None else job.spec
        self.deployed = Deployed(
            fingerprint=render.fingerprint(job_spec),
            workers=action.workers,
            replicas=action.replicas,
            restore_from=action.restore_from,
            spec=job_spec.model_copy(update={"parallelism": action.workers}),
        )
        if "apply" in self.crash_after:
            raise OperatorCrashed("after apply")
        self._step("apply")

    def savepoint(self, job: spec.StreamJob, savepoint_id: str, stop: bool) -> SavepointOutcome:
        if "savepoint" in self.crash_before:
            raise OperatorCrashed("savepoint")
        self.calls.append(f"savepoint:{savepoint_id}")
        known = self.savepoints.get(savepoint_id)
        if known is not None:
            self._step("savepoint")
            return known
        looping = sorted(self._looping())
        if self.savepoint_error is not None:
            outcome = SavepointOutcome(savepoint_id, completed=False, error=self.savepoint_error)
        elif looping:
            error = f"worker {looping[0]}: connection refused"
            outcome = SavepointOutcome(savepoint_id, completed=False, error=error)
        else:
            url = f"{self.store}/{job.metadata.namespace}/{job.metadata.name}/savepoints/{savepoint_id}"
            outcome = SavepointOutcome(savepoint_id, completed=True, url=url, completed_at=self.clock())
        self.savepoints[savepoint_id] = outcome
        if "savepoint" in self.crash_after:
            raise OperatorCrashed("after savepoint")
        self._step("savepoint")
        return outcome

    def write_status(self, job: spec.ObjectMeta, status: model.StreamJobStatus) -> None:
        intent = status.intent.id if status.intent is not None else "-"
        self.calls.append(f"status:{status.phase}:{intent}")
        self.statuses.append(status)
        self._step("status")

    def dispose_savepoint(self, job: spec.StreamJob, url: str) -> None:
        if "dispose" in self.crash_before:
            raise OperatorCrashed("dispose")
        self.calls.append(f"dispose:{url}")
        if self.dispose_error is not None:
            raise CheckpointError(self.dispose_error)
        self.disposed.append(url)
        self._step("dispose")

    def record_event(self, job: spec.ObjectMeta, event: Event) -> None:
        self.events.append(event)

    def delete(self, namespace: str, name: str) -> None:
        self.calls.append("deleted")
        self.deployed = None

    def remove_checkpoints(self, job: spec.StreamJob) -> int:
        if "remove" in self.crash_before:
            raise OperatorCrashed("remove")
        self.calls.append("removed")
        if self.remove_error is not None:
            raise CheckpointError(self.remove_error)
        return self.store_objects


@dataclass
class SimulatedJob:
    """A job as a fluid model, for the autoscaler: records arrive, workers process them at a known
    capacity, the rest is lag.

    ``capacity`` is one worker's records per second with every partition it owns; a worker owns
    whole partitions, so ``workers`` workers process at most ``capacity x P / ceil(P / workers)``
    (the busiest worker sets the pace). A rescale stops processing for ``restore_s`` seconds.
    Exactly-once commits are not modelled (lag is exact).
    """

    partitions: int = 8
    capacity: float = 1000.0
    workers: int = 1
    restore_s: float = 20.0
    topic: str = "orders"
    end: float = 0.0
    lag: float = 0.0
    processed_rate: float = 0.0
    stopped_until: float = 0.0
    now_s: float = 0.0

    def job_capacity(self) -> float:
        per_worker = math.ceil(self.partitions / self.workers)
        return self.capacity * self.partitions / per_worker

    def advance(self, seconds: float, input_rate: float) -> None:
        """Let ``seconds`` pass with ``input_rate`` records per second arriving."""
        arrived = input_rate * seconds
        self.end += arrived
        running = max(0.0, self.now_s + seconds - max(self.stopped_until, self.now_s))
        processed = min(self.lag + arrived, self.job_capacity() * running)
        self.lag = self.lag + arrived - processed
        self.processed_rate = processed / seconds if seconds > 0 else 0.0
        self.now_s += seconds

    def rescale(self, workers: int) -> None:
        self.workers = workers
        self.stopped_until = self.now_s + self.restore_s

    @property
    def restoring(self) -> bool:
        return self.now_s < self.stopped_until

    def reading(self) -> LagReading:
        """The lag of each partition, spread evenly."""
        p = self.partitions
        return LagReading(tuple(
            PartitionLag(self.topic, i, int(self.end / p), int(self.end / p) - int(self.lag / p),
                         int(self.lag / p))
            for i in range(p)
        ))

    def reports(self, at: datetime) -> tuple[WorkerReport, ...]:
        """Every worker's status: its share of the processing, busy in proportion to its capacity."""
        share = self.processed_rate / self.workers
        busy = min(1.0, self.processed_rate / self.job_capacity())
        return tuple(
            WorkerReport(i, records_per_second=share, busy_ratio=busy, published_at=at)
            for i in range(self.workers)
        )


def worker_status(
    index: int = 0,
    *,
    published_at: datetime,
    workers: int = 1,
    job: str = "jobs/job",
    ready: bool = True,
    input_partitions: Mapping[str, int] | None = None,
    partitions: Iterable[PartitionStatus] = (),
    records_per_second: float | None = None,
    busy_ratio: float | None = None,
    last_checkpoint: CheckpointStatus | None = None,
    outages: Mapping[str, OutageStatus] | None = None,
) -> WorkerStatus:
    """A ``GET /status`` answer as worker ``index`` of ``workers`` builds it, with what a test sets.

    The counters a test does not set are what a worker that has just started reports (zero);
    ``published_at`` is required because a reader distrusts an old snapshot.
    """
    parts = tuple(partitions)
    return WorkerStatus(
        job=job,
        worker=index,
        workers=workers,
        ready=ready,
        input_partitions=dict(input_partitions) if input_partitions is not None else None,
        partitions=parts,
        outages=dict(outages or {}),
        published_at=int(published_at.timestamp() * 1000),
        busy_ratio=busy_ratio,
        busy_ratio_since_start=busy_ratio,
        records_per_second=records_per_second,
        records_in=sum(p.records for p in parts),
        guarantee="exactly-once",
        last_checkpoint=last_checkpoint,
    )


@dataclass
class FakeWorkerAPI:
    """One worker's control API without a worker: the status a test gives, savepoints idempotent by id.

    ``savepoints`` is the job's savepoint directory (``<store>/<namespace>/<job>/savepoints``); a
    savepoint ``id`` answers with the part ``<savepoints>/<id>/w<index>``, as a worker does.
    ``fail`` makes every savepoint answer 503 with that message.
    """

    index: int
    savepoints: str
    status_of: Callable[[], WorkerStatus]
    """Called on every ``GET /status`` (a test can publish a fresh ``publishedAt`` each time)."""
    fail: str | None = None
    taken: dict[str, SavepointAnswer] = field(default_factory=dict)
    """Savepoints answered, by id."""

    def status(self) -> WorkerStatus:
        return self.status_of()

    def savepoint(self, request: SavepointRequest) -> SavepointAnswer:
        if self.fail:
            raise RequestRejected(self.fail, 503)
        return self.taken.setdefault(request.id, SavepointAnswer(
            id=request.id, status="completed", path=f"{self.savepoints}/{request.id}/w{self.index}",
        ))


@contextmanager
def serve_workers(fakes: Sequence[FakeWorkerAPI]) -> Iterator[list[str]]:
    """Serve each fake on a real ``ControlServer`` on 127.0.0.1; yields their base URLs, in order."""
    with ExitStack() as stack:
        urls = []
        for fake in fakes:
            server = ControlServer(CollectorRegistry(), alive=lambda: True, ready=lambda: (True, ""),
                                   status=fake.status, savepoint=fake.savepoint, host="127.0.0.1")
            stack.enter_context(server)
            urls.append(f"http://127.0.0.1:{server.port}")
        yield urls
