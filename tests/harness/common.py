"""Shared plumbing for the real servers the test suite runs: cache and run directories,
process start/stop with pid files, readiness polling, and the record of a running server.

Every server (Kafka, S3, kube-apiserver) follows one life cycle so that `make services-up`,
the pytest fixtures and CI behave the same way:

- binaries and jars are built or fetched once into ``CACHE`` (``~/.cache/weir`` unless
  ``WEIR_CACHE`` says otherwise), never into the repository;
- a running server owns ``RUN/<name>/`` holding ``pid``, ``server.log`` and ``info.json``
  (how to reach it); a fixture that finds a live server there reuses it and leaves it up,
  a fixture that starts one stops it at the end of the session;
- servers bind to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Servers started by this process: kept referenced so their Popen objects are not
# garbage-collected (with a ResourceWarning) while the server still runs.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}

CACHE = Path(os.environ.get("WEIR_CACHE", Path.home() / ".cache" / "weir"))
# Where running servers record themselves. ``WEIR_RUN`` separates the servers of concurrent
# checkouts (each with its own ports) while they share the built binaries and jars in CACHE.
RUN = Path(os.environ.get("WEIR_RUN") or CACHE / "run")
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A test server could not be built, started or reached; the message says which and why."""


@dataclass
class Running:
    """A server that is up: its name, what clients need to reach it, and whether we own it."""

    name: str
    info: dict[str, Any]
    run_dir: Path
    started_here: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.run_dir / "server.log"

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


def run_dir(name: str) -> Path:
    path = RUN / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log: Path | None = None, interval: float = 0.2
) -> None:
    """Poll ``check`` until it is true; on timeout raise ServerError with the log's tail."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - readiness probes fail in many ways while starting
            last_exc = exc
        time.sleep(interval)
    tail = ""
    if log is not None and log.exists():
        tail = "\n--- log tail ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    raise ServerError(f"{what} not ready after {timeout:.0f}s (last error: {last_exc}){tail}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(rdir: Path) -> int | None:
    try:
        return int((rdir / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def spawn(cmd: list[str], rdir: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start ``cmd`` detached in its own session, output appended to ``server.log``."""
    log = open(rdir / "server.log", "ab")  # noqa: SIM115 - handed to the child process
    log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    log.close()
    _CHILDREN[proc.pid] = proc
    (rdir / "pid").write_text(str(proc.pid))
    return proc.pid


def stop_pid(rdir: Path, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``timeout``, forget its files."""
    pid = read_pid(rdir)
    if pid is not None and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    child = _CHILDREN.pop(pid, None) if pid is not None else None
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
    for name in ("pid", "info.json"):
        with contextlib.suppress(FileNotFoundError):
            (rdir / name).unlink()


def write_info(rdir: Path, info: dict[str, Any]) -> None:
    tmp = rdir / "info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(rdir / "info.json")


def read_live_info(rdir: Path) -> dict[str, Any] | None:
    """The recorded info of a server that is still alive, else None (stale files are removed)."""
    pid = read_pid(rdir)
    info_path = rdir / "info.json"
    if pid is None or not info_path.exists():
        return None
    if not pid_alive(pid):
        stop_pid(rdir)
        return None
    try:
        return dict(json.loads(info_path.read_text()))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(rdir: Path) -> Iterator[None]:
    """Serialise start-up of one server between concurrent pytest/make invocations."""
    import fcntl

    with open(rdir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_maven_jars(pom: Path, libs: Path, what: str, properties: dict[str, str] | None = None) -> Path:
    """Copy ``pom``'s runtime dependencies from Maven Central into ``libs`` once.

    ``libs/.complete`` marks a finished copy, so an interrupted fetch is redone, never used
    half-way; concurrent callers wait on a lock beside ``libs``.
    """
    marker = libs / ".complete"
    if marker.exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(libs.parent):
        if marker.exists():
            return libs
        if shutil.which("mvn") is None:
            raise ServerError(
                f"{what} come from Maven Central through `mvn`, which is not on PATH: "
                "install a JDK 17 and Maven (apt-get install openjdk-17-jdk-headless maven)"
            )
        tmp = libs.with_name(libs.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        defines = [f"-D{k}={v}" for k, v in (properties or {}).items()]
        cmd = [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
            *defines,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServerError(
                f"fetching {what} with Maven failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        marker.write_text(what)
    return libs


def java() -> str:
    """The JDK the Java servers (Kafka, S3Proxy) run on."""
    found = shutil.which("java")
    if found is None:
        raise ServerError(
            "no `java` on PATH: the test servers need a JDK 17 (apt-get install openjdk-17-jdk-headless)"
        )
    return found


def env_port(var: str, default: int) -> int:
    value = os.environ.get(var)
    return int(value) if value else default
