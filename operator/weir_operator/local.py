"""The local platform and ``weir up``: StreamJobs run as ``weir run`` subprocesses on this machine.

Same reconciler, same ``decide`` as on Kubernetes; this module plays the parts the cluster
plays there: the StatefulSet (one process per worker index, control API on a free
127.0.0.1 port), the kubelet (a worker that exits non-zero is restarted with a backoff and
recovers from its latest checkpoint; one that exits 0 stopped on purpose and stays
stopped), the API server (status in ``<state>/<namespace>/<name>/status.json``, events in
``events.log`` next to it) and the checkpoint store (``file://<state>/checkpoints`` for jobs
that name none).

``weir up PATH`` (registered with the ``weir`` command through the ``weir.commands`` entry
point, so the runtime never imports the operator) runs the manifests in PATH, re-reads them
every second (an edit is a new generation; a manifest taken out of PATH is a deleted job:
its workers stop and, with ``cleanupPolicy: delete``, its checkpoints and savepoints are
removed), prints a ``kubectl get sj``-like table, and on Ctrl-C or SIGTERM stops every job
with a savepoint (``trigger: shutdown``) that the next ``weir up`` resumes from.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import orjson
import yaml

from weir import spec
from weir_operator import decide, model, render, workers
from weir_operator.lag import LagReader, autoscaled, reported_inputs
from weir_operator.plans import Apply, Deployed, Event, Observed, SavepointOutcome, WorkerState
from weir_operator.platforms import remove_job_store
from weir_operator.reconciler import finalize, reconcile

__all__ = ["COMMAND", "LocalPlatform", "UpCommand", "load_manifests"]

logger = logging.getLogger(__name__)

CRASH_LOOP_RESTARTS = 3
"""Restarts within ``CRASH_LOOP_WINDOW_S`` that make a worker crash-looping (Degraded)."""
CRASH_LOOP_WINDOW_S = 300.0
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Delay before restarting a crashed worker, by consecutive crash (as the kubelet backs off)."""
_STOP_TIMEOUT_S = 60.0


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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class _Worker:
    index: int
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    exit_code: int | None = None


@dataclass
class _Job:
    deployed: Deployed | None = None
    manifest: Path | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)


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

    # ------------------------------------------------------------------ the "kubelet"

    def tick(self) -> None:
        """Notice exited workers; restart crashed ones once their backoff has passed."""
        with self._lock:
            for (namespace, name), job in self._jobs.items():
                for worker in list(job.workers.values()):
                    self._supervise(namespace, name, job, worker)

    def _supervise(self, namespace: str, name: str, job: _Job, worker: _Worker) -> None:
        code = worker.process.poll()
        if code is None:
            return
        if worker.exit_code is None:
            worker.exit_code = code
            worker.log.close()
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
            fresh = self._start(namespace, name, job.manifest, worker.index, deployed.workers, None)
            fresh.restarts = worker.restarts + 1
            fresh.crashes = worker.crashes
            job.workers[worker.index] = fresh

    def _start(
        self, namespace: str, name: str, manifest: Path, index: int, count: int, restore_from: str | None
    ) -> _Worker:
        directory = self.job_dir(namespace, name)
        port = _free_port()
        command = [
            self.python, "-m", "weir", "run", str(manifest),
            "--worker-index", str(index), "--workers", str(count),
            "--http-host", "127.0.0.1", "--http-port", str(port),
            "--state-dir", str(directory / f"w{index}"),
        ]
        if self.bootstrap_servers:
            command += ["--bootstrap-servers", self.bootstrap_servers]
        env = {**os.environ, **self.extra_env}
        if job_has_no_store(manifest):
            env.setdefault("WEIR_CHECKPOINT_URL", self.store)
        env.pop(render.ENV_RESTORE_FROM, None)
        if restore_from is not None:
            env[render.ENV_RESTORE_FROM] = restore_from
        log = (directory / f"w{index}.log").open("ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        logger.info("%s/%s: worker %d/%d started (pid %d, port %d%s)", namespace, name, index, count,
                    process.pid, port, f", restoring {restore_from}" if restore_from else "")
        return _Worker(index, port, process, log)

    def _stop_all(self, job: _Job) -> None:
        for worker in job.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for worker in job.workers.values():
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            if not worker.log.closed:
                worker.log.close()
        job.workers.clear()

    # ------------------------------------------------------------------ Platform

    def observe(self, job: spec.StreamJob) -> Observed:
        with self._lock:
            local = self._jobs.get((job.metadata.namespace, job.metadata.name))
            if local is None or local.deployed is None:
                return Observed()
            states = []
            ready_ports = []
            now = time.monotonic()
            for index in range(local.deployed.replicas):
                worker = local.workers.get(index)
                if worker is None:
                    states.append(WorkerState(index, ready=False, reason="not started"))
                    continue
                alive = worker.process.poll() is None
                ready = alive and _ready(worker.port)
                if ready:
                    ready_ports.append((index, worker.port))
                recent = sum(1 for t in worker.crashes if now - t <= CRASH_LOOP_WINDOW_S)
                reason = "" if alive else f"exit code {worker.process.returncode}"
                states.append(
                    WorkerState(index, ready=ready, restarts=worker.restarts,
                                crash_looping=recent >= CRASH_LOOP_RESTARTS, reason=reason)
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
        return Observed(deployed=deployed, workers=tuple(states), reports=reports, lag=lag)

    def apply(self, job: spec.StreamJob, action: Apply) -> None:
        namespace, name = job.metadata.namespace, job.metadata.name
        sized = job.model_copy(update={"spec": job.spec.model_copy(update={"parallelism": action.workers})})
        fingerprint = render.fingerprint(job.spec)
        directory = self.job_dir(namespace, name)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / f"job-{fingerprint}-{action.workers}.yaml"
        manifest.write_text(yaml.safe_dump(render.job_document(sized), sort_keys=False))
        deployed = Deployed(fingerprint, action.workers, action.replicas, action.restore_from, sized.spec)
        with self._lock:
            local = self._jobs.setdefault((namespace, name), _Job())
            if local.deployed == deployed and len(local.workers) == action.replicas:
                return
            self._stop_all(local)
            local.deployed, local.manifest = deployed, manifest
            for index in range(action.replicas):
                local.workers[index] = self._start(
                    namespace, name, manifest, index, action.workers, action.restore_from
                )

    def savepoint(self, job: spec.StreamJob, savepoint_id: str, stop: bool) -> SavepointOutcome:
        with self._lock:
            local = self._jobs.get((job.metadata.namespace, job.metadata.name))
            running = [w for w in (local.workers.values() if local else ()) if w.process.poll() is None]
        urls = [f"http://127.0.0.1:{w.port}" for w in sorted(running, key=lambda w: w.index)]
        outcome = workers.take_savepoint(urls, savepoint_id, stop, self.now(), self.savepoint_timeout_s)
        if stop and outcome.completed:
            for worker in running:
                try:
                    worker.process.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
        return outcome

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
            local = self._jobs.pop((namespace, name), None)
            if local is not None:
                self._stop_all(local)

    def remove_checkpoints(self, job: spec.StreamJob) -> int:
        return remove_job_store(job, {**os.environ, **self.extra_env})

    def close(self) -> None:
        """Stop every worker (SIGTERM: each finishes its batch and checkpoints)."""
        with self._lock:
            for key in list(self._jobs):
                self.delete(*key)


# --------------------------------------------------------------------------- manifests


@dataclass
class _Tracked:
    """A manifest ``weir up`` runs, with its local generation (bumped when its spec changes)."""

    job: spec.StreamJob
    generation: int
    digest: str
    created: datetime


def load_manifests(path: Path, *, allow_empty: bool = False) -> list[spec.StreamJob]:
    """The StreamJobs in ``path`` (a file, or the ``*.yaml``/``*.yml``/``*.json`` files of a directory).

    ``allow_empty``: a directory without manifests is no error (every job was taken out)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
    )
    jobs = []
    for file in files:
        documents = [d for d in yaml.safe_load_all(file.read_text(encoding="utf-8")) if d]
        for document in documents:
            if isinstance(document, dict) and document.get("kind") == spec.KIND:
                jobs.append(spec.parse_manifest(orjson.dumps(document).decode()))
    if not jobs and not (allow_empty and path.is_dir()):
        raise spec.SpecError([f"{path}: no StreamJob manifests"])
    return jobs


def _digest(job: spec.StreamJob) -> str:
    document = orjson.dumps(job.spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(document).hexdigest()


def _age(since: datetime, now: datetime) -> str:
    seconds = int((now - since).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def status_table(rows: list[tuple[str, model.StreamJobStatus, datetime]], now: datetime) -> str:
    """``kubectl get sj``: NAME PHASE PARALLELISM READY LAG LAST CHECKPOINT AGE."""
    header = ("NAME", "PHASE", "PARALLELISM", "READY", "LAG", "LAST CHECKPOINT", "AGE")
    lines = [header]
    for name, status, created in rows:
        checkpoint = status.last_checkpoint
        lines.append((
            name,
            status.phase or "",
            str(status.parallelism if status.parallelism is not None else ""),
            f"{status.ready_workers or 0}/{status.parallelism or 0}",
            str(status.lag.records) if status.lag is not None else "",
            _age(checkpoint.completed_at, now) + " ago" if checkpoint is not None else "",
            _age(created, now),
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


# --------------------------------------------------------------------------- weir up


class UpCommand:
    """``weir up PATH``: the ``weir.commands`` entry point."""

    name = "up"
    help = "run StreamJob manifests on this machine (workers as local processes)"
    description = (
        "Run the StreamJob manifests in PATH (a file or a directory) on this machine with the operator's "
        "reconciler: one `weir run` process per worker, restarted when it crashes, savepoints on "
        "savepointTriggerNonce, and on Ctrl-C a savepoint the next `weir up` resumes from. Prints the "
        "jobs like `kubectl get sj`; status and events are in STATE_DIR/<namespace>/<name>/."
    )

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", type=Path, help="a StreamJob manifest, or a directory of them")
        parser.add_argument("--state-dir", type=Path, default=None,
                            help="worker state, checkpoints, status (default: ~/.cache/weir/up)")
        parser.add_argument("--bootstrap-servers", help="override spec.kafka.bootstrapServers of every job")
        parser.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                            help="print the status table this often (default 5; 0: never)")
        parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                            help="stop (with a savepoint) after this long (default 0: until Ctrl-C)")
        parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    def run(self, args: argparse.Namespace) -> int:
        cache = Path(os.environ.get("WEIR_CACHE") or Path.home() / ".cache" / "weir")
        state_dir = (args.state_dir or cache / "up").resolve()
        try:
            load_manifests(args.path)
        except (spec.SpecError, OSError) as exc:
            print(f"{args.path}: {exc}", file=sys.stderr)
            return 2
        platform = LocalPlatform(state_dir, bootstrap_servers=args.bootstrap_servers)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        try:
            return _up(platform, args, stop)
        finally:
            platform.close()


def _up(platform: LocalPlatform, args: argparse.Namespace, stop: threading.Event) -> int:
    tracked: dict[tuple[str, str], _Tracked] = {}
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    next_print = time.monotonic()
    # weir up reconciles every second: the autoscaler measures as often.
    policy = decide.Policy(autoscaler_interval=timedelta(seconds=1))
    while not stop.is_set():
        try:
            jobs = load_manifests(args.path, allow_empty=True)
        except (spec.SpecError, OSError) as exc:
            logger.error("%s (keeping the last valid manifests)", exc)
            jobs = [t.job for t in tracked.values()]
        present = {(job.metadata.namespace, job.metadata.name) for job in jobs}
        for key in [k for k in tracked if k not in present]:
            # A manifest taken out of PATH is a deleted StreamJob (kubectl delete -f).
            item = tracked[key]
            if finalize(platform, item.job, item.generation, platform.read_status(*key), platform.now,
                        policy=policy):
                del tracked[key]
        for job in jobs:
            key = (job.metadata.namespace, job.metadata.name)
            digest = _digest(job)
            known = tracked.get(key)
            if known is None:
                status = platform.read_status(*key)
                # A new run of `weir up` is a new generation: whatever ran before is gone.
                generation = (status.observed_generation or 0) + 1
                tracked[key] = known = _Tracked(job, generation, digest, platform.now())
            elif known.digest != digest:
                known.job, known.digest, known.generation = job, digest, known.generation + 1
        platform.tick()
        for key, item in tracked.items():
            status = platform.read_status(*key)
            reconcile(platform, item.job, item.generation, status, platform.now, policy=policy)
        if args.interval > 0 and time.monotonic() >= next_print:
            next_print = time.monotonic() + args.interval
            rows = [(k[1], platform.read_status(*k), t.created) for k, t in tracked.items()]
            print(status_table(rows, platform.now()), flush=True)
        if deadline is not None and time.monotonic() >= deadline:
            break
        stop.wait(1.0)
    logger.info("stopping: a savepoint of every job, then its workers")
    for key, item in tracked.items():
        reconcile(platform, item.job, item.generation, platform.read_status(*key), platform.now,
                  shutdown=True, policy=policy)
    rows = [(k[1], platform.read_status(*k), t.created) for k, t in tracked.items()]
    print(status_table(rows, platform.now()), flush=True)
    return 0


COMMAND = UpCommand()
