"""The kubelet of ``weir up``: worker processes started, recorded in their job directory, and stopped.

Every worker ``weir up`` starts is recorded in ``<state>/<namespace>/<name>/workers.json``
(index, pid, control port, worker count, store). A ``weir up`` that is killed (SIGKILL, the
OOM killer) cannot stop its workers, and they outlive it: the next ``weir up`` finds them
through that record (``previous_workers``; a pid is only trusted when the process still runs
``weir run`` with that worker's state directory, since pids are reused). Those workers are
*adopted*, not ignored: a savepoint the killed ``weir up`` had asked for is asked again under
the same id and they answer it (the control API is idempotent by id), and they are stopped
(``stop``: SIGTERM, a wait, SIGKILL) before any new worker of the job starts. Two workers on
one RocksDB directory, the second crashing on the first one's lock, cannot happen.

**Why no parent-death signal.** ``prctl(PR_SET_PDEATHSIG)`` would end the workers with
``weir up``. But a SIGTERM ends a worker's loop before a savepoint it has been asked for and
not yet begun (the request is served by the loop), so a ``weir up`` killed just after asking
for an upgrade's stop-savepoint would lose it, and the restarted one would have to take a
second savepoint or fall back to checkpoints. Left running, the workers finish what they were
asked; the restarted ``weir up`` collects the answer and then stops them. This is also how the
operator behaves on Kubernetes, where an operator restart does not touch the pods. The price
is that workers of a killed ``weir up`` keep running until the next ``weir up`` (which says so
in its log) or until stopped by hand; a ``weir up`` stopped by Ctrl-C or SIGTERM stops them
itself, with a savepoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

__all__ = [
    "RECORD",
    "STOP_TIMEOUT_S",
    "UNKNOWN_EXIT",
    "Worker",
    "free_port",
    "is_ready",
    "previous_workers",
    "start_worker",
    "stop",
    "stop_after_savepoint",
    "write_record",
]

logger = logging.getLogger(__name__)

RECORD = "workers.json"
"""The job directory's record of the workers the last ``weir up`` started."""
STOP_TIMEOUT_S = 60.0
"""SIGTERM lets a worker finish its batch and write a last checkpoint; after this long it is killed."""
UNKNOWN_EXIT = -1
"""The exit code of an adopted worker that has ended (not this process's child: the code is lost)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _command_line(pid: int) -> list[str] | None:
    """The arguments process ``pid`` runs with (None: no such process, or a zombie)."""
    proc = Path("/proc") / str(pid)
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            words = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"]):
            return None
        return [w.decode(errors="replace") for w in words if w]
    if Path("/proc/self").is_dir():
        return None  # Linux, and no such process
    try:  # no /proc (macOS): ask ps
        shown = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True,
                               timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shown.stdout.split() if shown.returncode == 0 and shown.stdout.strip() else None


@dataclass
class Worker:
    """One worker process: this process's child, or adopted from a previous ``weir up``."""

    index: int
    count: int
    """The worker count it was started with (``--workers``)."""
    port: int
    pid: int
    state_dir: str
    """Its ``--state-dir``: what tells it apart from another process that got its pid later."""
    store: str
    """The checkpoint store it writes to (where its savepoints are)."""
    popen: subprocess.Popen[bytes] | None = None
    """None: adopted, not this process's child."""
    log: IO[bytes] | None = None
    applied: int = 0
    """The ``Apply`` that started it (``LocalPlatform`` counts them)."""
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    exit_code: int | None = None
    last_exit: int | None = None
    """The exit code of the process this one restarted (None: not a restart)."""

    @property
    def adopted(self) -> bool:
        return self.popen is None

    def poll(self) -> int | None:
        """None while it runs; then its exit code (``UNKNOWN_EXIT`` for an adopted worker)."""
        if self.popen is not None:
            return self.popen.poll()
        words = _command_line(self.pid)
        return None if words is not None and self.state_dir in words else UNKNOWN_EXIT

    def signal(self, signum: signal.Signals) -> None:
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Whether it ended within ``timeout`` seconds."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def close_log(self) -> None:
        if self.log is not None and not self.log.closed:
            self.log.close()


def start_worker(
    python: str,
    manifest: Path,
    job_dir: Path,
    index: int,
    count: int,
    *,
    store: str,
    bootstrap_servers: str | None,
    env: Mapping[str, str],
) -> Worker:
    """``weir run MANIFEST`` as worker ``index`` of ``count``, logging to ``<job_dir>/w<index>.log``."""
    port = free_port()
    state_dir = str(job_dir / f"w{index}")
    command = [
        python, "-m", "weir", "run", str(manifest),
        "--worker-index", str(index), "--workers", str(count),
        "--http-host", "127.0.0.1", "--http-port", str(port),
        "--state-dir", state_dir,
    ]
    if bootstrap_servers:
        command += ["--bootstrap-servers", bootstrap_servers]
    log = (job_dir / f"w{index}.log").open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
    return Worker(index, count, port, process.pid, state_dir, store, popen=process, log=log)


def stop(workers: Iterable[Worker], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every running one, wait up to ``timeout`` for all, SIGKILL what is left."""
    workers = list(workers)
    for worker in workers:
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        if not worker.wait(max(0.1, deadline - time.monotonic())):
            logger.warning("worker %d (pid %d) did not stop within %.0f s: killed", worker.index, worker.pid,
                           timeout)
            worker.signal(signal.SIGKILL)
            worker.wait(10.0)
        worker.close_log()


def stop_after_savepoint(workers: Iterable[Worker], timeout: float = STOP_TIMEOUT_S) -> None:
    """Wait for workers that completed a stop-savepoint to exit by themselves; kill what is left."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        if not worker.wait(max(0.1, deadline - time.monotonic())):
            logger.warning("worker %d (pid %d) still ran %.0f s after its stop-savepoint: killed",
                           worker.index, worker.pid, timeout)
            worker.signal(signal.SIGKILL)
            worker.wait(10.0)


def write_record(job_dir: Path, workers: Iterable[Worker]) -> None:
    """Record ``workers`` (replacing the record) so that a later ``weir up`` can find them."""
    entries = [
        {"index": w.index, "count": w.count, "pid": w.pid, "port": w.port, "stateDir": w.state_dir,
         "store": w.store}
        for w in sorted(workers, key=lambda w: w.index)
    ]
    path = job_dir / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(entries, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


def previous_workers(job_dir: Path) -> list[Worker]:
    """The recorded workers of a previous ``weir up`` that still run (adopted: no exit code, no log)."""
    try:
        entries = orjson.loads((job_dir / RECORD).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return []
    found = []
    for entry in entries if isinstance(entries, list) else ():
        try:
            worker = Worker(int(entry["index"]), int(entry["count"]), int(entry["port"]), int(entry["pid"]),
                            str(entry["stateDir"]), str(entry["store"]))
        except (KeyError, TypeError, ValueError):
            continue
        if worker.pid != os.getpid() and worker.poll() is None:
            found.append(worker)
    return found
