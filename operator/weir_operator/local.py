"""The local platform: StreamJobs run as ``weir run`` subprocesses on this machine (``weir up``).

Same reconciler, same ``decide`` as on Kubernetes; this module plays the parts the cluster
plays there: the StatefulSet (one process per worker index, control API on a free
127.0.0.1 port), the kubelet (``weir_operator.local_workers``: a worker that exits non-zero is
restarted with a backoff and recovers from its latest checkpoint; one that exits 0 stopped on
purpose and stays stopped), the API server (status in
``<state>/<namespace>/<name>/status.json``, events in ``events.log`` next to it) and the
checkpoint store (``file://<state>/checkpoints`` for jobs that name none). The command itself
is ``weir_operator.up``.

**Restarts of ``weir up``.** Workers a killed ``weir up`` left running are adopted when this
platform first meets their job (``local_workers.previous_workers``): they are reported as
lingering, a savepoint the killed one had asked for is asked of them again under the same id,
and they are stopped before any new worker of the job starts. A savepoint nobody answers
for (its workers stopped after taking it) is looked up in the store: complete there, it is
the answer; only a savepoint missing from the store is a failure.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import yaml

from weir import spec
from weir.objectstores import CheckpointError
from weir_operator import local_workers, model, render, workers
from weir_operator.lag import LagReader, autoscaled, reported_inputs
from weir_operator.lifecycle import reset_allowed
from weir_operator.local_workers import Worker
from weir_operator.plans import Apply, Deployed, Event, Observed, SavepointOutcome, WorkerState
from weir_operator.platforms import (
    completed_in_store,
    dispose_job_savepoint,
    find_savepoint,
    remove_job_store,
    store_s3,
)

__all__ = ["LocalPlatform", "job_has_no_store"]

logger = logging.getLogger(__name__)

CRASH_LOOP_RESTARTS = 3
"""Restarts within ``CRASH_LOOP_WINDOW_S`` that make a worker crash-looping (Degraded)."""
CRASH_LOOP_WINDOW_S = 300.0
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Delay before restarting a crashed worker, by consecutive crash (as the kubelet backs off)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def job_has_no_store(manifest: Path) -> bool:
    """Whether the manifest leaves the checkpoint store to the platform (no spec.checkpoint):
    the local store is a default, never an override of the job's own."""
    from weir.spec import SpecError, load_job

    try:
        return load_job(manifest).spec.checkpoint is None
    except SpecError:
        return True


@dataclass
class _Job:
    deployed: Deployed | None = None
    manifest: Path | None = None
    workers: dict[int, Worker] = field(default_factory=dict)
    previous: list[Worker] = field(default_factory=list)
    """Workers a previous ``weir up`` started that still ran when this one met the job."""
    applied: int = 0
    """Applies that started workers so far: a worker started by the latest one is current."""
    env: dict[str, str] = field(default_factory=dict)
    """The environment the workers of the latest apply (and their restarts) get."""


class LocalPlatform:
    """Workers as subprocesses of this process; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        *,
        bootstrap_servers: str | None = None,
        python: str = sys.executable,
        now: Callable[[], datetime] = _utcnow,
        savepoint_timeout_s: float = 600.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.bootstrap_servers = bootstrap_servers
        self.python = python
        self.now = now
        self.savepoint_timeout_s = savepoint_timeout_s
        self.extra_env = extra_env or {}
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._lock = threading.RLock()
        # weir up reconciles every second, each reconcile observes a few times: one reading a second.
        self._lag = LagReader({**os.environ, **self.extra_env}, min_interval_s=0.9, now=now)

    def job_dir(self, namespace: str, name: str) -> Path:
        return self.state_dir / namespace / name

    @property
    def store(self) -> str:
        return (self.state_dir / "checkpoints").as_uri()

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    def store_url(self, job_spec: spec.JobSpec) -> str:
        """Where the workers of ``job_spec`` keep checkpoints and savepoints (``WEIR_CHECKPOINT_URL``
        overrides the spec, as in ``weir run``; a job without a store gets this platform's)."""
        override = self._env().get("WEIR_CHECKPOINT_URL")
        checkpoint = job_spec.checkpoint
        return override or (checkpoint.url if checkpoint is not None else self.store)

    def _job(self, namespace: str, name: str) -> _Job:
        """The job's record, created on first use: then a previous ``weir up``'s workers are adopted."""
        key = (namespace, name)
        local = self._jobs.get(key)
        if local is None:
            local = self._jobs[key] = _Job()
            local.previous = local_workers.previous_workers(self.job_dir(namespace, name))
            if local.previous:
                logger.warning(
                    "%s/%s: %d workers of a previous weir up still run (pids %s): they answer a savepoint it "
                    "had asked for, if any, and are stopped before any new worker starts", namespace, name,
                    len(local.previous), ", ".join(str(w.pid) for w in local.previous),
                )
        return local

    # ------------------------------------------------------------------ the "kubelet"

    def tick(self) -> None:
        """Notice exited workers; restart crashed ones once their backoff has passed."""
        with self._lock:
            for (namespace, name), job in self._jobs.items():
                job.previous = [w for w in job.previous if w.poll() is None]
                for worker in list(job.workers.values()):
                    self._supervise(namespace, name, job, worker)

    def _supervise(self, namespace: str, name: str, job: _Job, worker: Worker) -> None:
        code = worker.poll()
        if code is None:
            return
        if worker.exit_code is None:
            worker.exit_code = code
            worker.close_log()
            if code == 0:
                logger.info("%s/%s: worker %d stopped", namespace, name, worker.index)
                return
            now = time.monotonic()
            worker.crashes.append(now)
            while worker.crashes and now - worker.crashes[0] > CRASH_LOOP_WINDOW_S:
                worker.crashes.popleft()
            delay = _BACKOFF_S[min(len(worker.crashes), len(_BACKOFF_S)) - 1]
            worker.restart_at = now + delay
            logger.warning("%s/%s: worker %d exited with %d; restarting in %.0f s",
                           namespace, name, worker.index, code, delay)
            return
        if code != 0 and worker.restart_at is not None and time.monotonic() >= worker.restart_at:
            deployed = job.deployed
            if deployed is None or job.manifest is None:
                return
            # A restart recovers from the worker's latest checkpoint, never the deploy's restore point.
            fresh = self._start(namespace, name, job, worker.index, None)
            fresh.restarts = worker.restarts + 1
            fresh.crashes = worker.crashes
            fresh.last_exit = code
            job.workers[worker.index] = fresh
            local_workers.write_record(self.job_dir(namespace, name), job.workers.values())

    def _start(self, namespace: str, name: str, job: _Job, index: int, restore_from: str | None) -> Worker:
        assert job.deployed is not None and job.manifest is not None and job.deployed.spec is not None
        env = dict(job.env)
        if restore_from is not None:
            env[render.ENV_RESTORE_FROM] = restore_from
        worker = local_workers.start_worker(
            self.python, job.manifest, self.job_dir(namespace, name), index, job.deployed.workers,
            store=self.store_url(job.deployed.spec), bootstrap_servers=self.bootstrap_servers, env=env,
        )
        worker.applied = job.applied
        logger.info("%s/%s: worker %d/%d started (pid %d, port %d%s)", namespace, name, index,
                    job.deployed.workers, worker.pid, worker.port,
                    f", restoring {restore_from}" if restore_from else "")
        return worker

    def _stop_all(self, job: _Job) -> None:
        local_workers.stop([*job.previous, *job.workers.values()])
        job.previous = []
        job.workers.clear()

    # ------------------------------------------------------------------ Platform

    def observe(self, job: spec.StreamJob) -> Observed:
        with self._lock:
            local = self._job(job.metadata.namespace, job.metadata.name)
            lingering = sum(1 for w in local.previous if w.poll() is None)
            if local.deployed is None:
                return Observed(lingering=lingering)
            states = []
            ready_ports = []
            now = time.monotonic()
            for index in range(local.deployed.replicas):
                worker = local.workers.get(index)
                if worker is None:
                    states.append(WorkerState(index, ready=False, reason="not started", current=False))
                    continue
                code = worker.poll()
                ready = code is None and local_workers.is_ready(worker.port)
                if ready:
                    ready_ports.append((index, worker.port))
                recent = sum(1 for t in worker.crashes if now - t <= CRASH_LOOP_WINDOW_S)
                reason = "" if code is None else f"exit code {code}"
                if code is None and recent >= CRASH_LOOP_RESTARTS and worker.last_exit is not None:
                    # Running again, but crash-looping: say how it last ended (the kubelet's lastState).
                    reason = f"exit code {worker.last_exit}, restarted"
                states.append(
                    WorkerState(index, ready=ready, restarts=worker.restarts,
                                crash_looping=recent >= CRASH_LOOP_RESTARTS, reason=reason,
                                current=worker.applied == local.applied)
                )
            deployed = local.deployed
        reports = tuple(
            r for r in (workers.fetch_report(i, f"http://127.0.0.1:{port}") for i, port in ready_ports)
            if r is not None
        )
        lag = None
        if autoscaled(job) and deployed.replicas > 0:
            lag = self._lag.read(job, bootstrap_servers=self.bootstrap_servers,
                                 reported=reported_inputs(reports))
        return Observed(deployed=deployed, workers=tuple(states), reports=reports, lag=lag,
                        lingering=lingering)

    def apply(self, job: spec.StreamJob, action: Apply) -> None:
        namespace, name = job.metadata.namespace, job.metadata.name
        # A rollback applies the last stable spec (action.spec) under the job's own name.
        job_spec = action.spec if action.spec is not None else job.spec
        sized = job.model_copy(update={"spec": job_spec.model_copy(update={"parallelism": action.workers})})
        fingerprint = render.fingerprint(job_spec)
        directory = self.job_dir(namespace, name)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / f"job-{fingerprint}-{action.workers}.yaml"
        manifest.write_text(yaml.safe_dump(render.job_document(sized), sort_keys=False))
        deployed = Deployed(fingerprint, action.workers, action.replicas, action.restore_from, sized.spec)
        with self._lock:
            local = self._job(namespace, name)
            local.previous = [w for w in local.previous if w.poll() is None]
            if local.deployed == deployed and len(local.workers) == action.replicas and not local.previous:
                return
            # Every old worker (and any a previous weir up left) is gone before a new one starts:
            # two workers never share a RocksDB directory or a partition.
            self._stop_all(local)
            local.deployed, local.manifest = deployed, manifest
            local.applied += 1
            local.env = self._worker_env(sized.spec, manifest)
            for index in range(action.replicas):
                local.workers[index] = self._start(namespace, name, local, index, action.restore_from)
            local_workers.write_record(directory, local.workers.values())

    def _worker_env(self, job_spec: spec.JobSpec, manifest: Path) -> dict[str, str]:
        env = self._env()
        if job_has_no_store(manifest):
            env.setdefault("WEIR_CHECKPOINT_URL", self.store)
        env.pop(render.ENV_RESTORE_FROM, None)
        env.pop(render.ENV_ALLOW_STATE_RESET, None)
        if reset_allowed(job_spec):
            env[render.ENV_ALLOW_STATE_RESET] = "1"
        return env

    def savepoint(self, job: spec.StreamJob, savepoint_id: str, stop: bool) -> SavepointOutcome:
        namespace, name = job.metadata.namespace, job.metadata.name
        with self._lock:
            local = self._job(namespace, name)
            running = [w for w in local.workers.values() if w.poll() is None]
            if not running:
                # Only before this weir up started workers of its own: a savepoint the previous one
                # asked for is asked of its workers again (same id, same savepoint).
                running = [w for w in local.previous if w.poll() is None]
            deployed_spec = local.deployed.spec if local.deployed is not None else None
        running.sort(key=lambda w: w.index)
        urls = [f"http://127.0.0.1:{w.port}" for w in running]
        outcome = workers.take_savepoint(urls, savepoint_id, stop, self.now(), self.savepoint_timeout_s)
        self._answered(outcome)
        if stop and outcome.completed:
            local_workers.stop_after_savepoint(running)
        store = running[0].store if running else self.store_url(deployed_spec or job.spec)
        count = running[0].count if running else None
        asked_all = count is not None and sorted(w.index for w in running) == list(range(count))
        return completed_in_store(
            outcome,
            lambda: find_savepoint(store, namespace, name, savepoint_id, store_s3(store, job, self._env())),
            self.now(),
            asked_all=asked_all,
        )

    def _answered(self, outcome: SavepointOutcome) -> None:
        """The workers' answers are in, before stopping workers wait to exit (``crashpoints``' seam)."""

    def write_status(self, job: spec.ObjectMeta, status: model.StreamJobStatus) -> None:
        path = self.job_dir(job.namespace, job.name) / "status.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True),
                                     option=orjson.OPT_INDENT_2))
        tmp.replace(path)

    def read_status(self, namespace: str, name: str) -> model.StreamJobStatus:
        path = self.job_dir(namespace, name) / "status.json"
        try:
            return model.StreamJobStatus.model_validate(orjson.loads(path.read_bytes()))
        except (OSError, ValueError):
            return model.StreamJobStatus()

    def record_event(self, job: spec.ObjectMeta, event: Event) -> None:
        line = f"{self.now().isoformat()} {event.type} {event.reason}: {event.message}\n"
        path = self.job_dir(job.namespace, job.name) / "events.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as sink:
            sink.write(line)
        log = logger.warning if event.type == "Warning" else logger.info
        log("%s/%s: %s: %s", job.namespace, job.name, event.reason, event.message)

    def delete(self, namespace: str, name: str) -> None:
        with self._lock:
            local = self._job(namespace, name)
            self._stop_all(local)
            del self._jobs[(namespace, name)]
            (self.job_dir(namespace, name) / local_workers.RECORD).unlink(missing_ok=True)

    def remove_checkpoints(self, job: spec.StreamJob) -> int:
        return remove_job_store(job, self._env())

    def dispose_savepoint(self, job: spec.StreamJob, url: str) -> None:
        store = self.store_url(job.spec)
        try:
            deleted = dispose_job_savepoint(job, url, store_s3(url, job, self._env()))
        except OSError as exc:
            raise CheckpointError(f"deleting {url} failed: {exc}") from exc
        logger.info("%s/%s: savepoint %s disposed (%d objects; store %s)", job.metadata.namespace,
                    job.metadata.name, url, deleted, store)

    def close(self) -> None:
        """Stop every worker (SIGTERM: each finishes its batch and checkpoints)."""
        with self._lock:
            for key in list(self._jobs):
                self.delete(*key)
