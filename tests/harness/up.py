"""Running ``weir up`` from a test: the process, its status file, waiting for a condition."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson


@contextmanager
def weir_up(
    manifest: Path, state: Path, bootstrap: str, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``weir up MANIFEST`` until the block ends (then SIGTERM: a savepoint of every job)."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "weir", "up", str(manifest), "--state-dir", str(state),
             "--bootstrap-servers", bootstrap, "--interval", "1"],
            stdout=sink, stderr=subprocess.STDOUT, env=dict(env) if env is not None else None,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def status(state: Path, name: str, namespace: str = "local") -> dict[str, Any]:
    """The job's ``status.json`` ({} until written)."""
    try:
        loaded: dict[str, Any] = orjson.loads((state / namespace / name / "status.json").read_bytes())
        return loaded
    except (OSError, orjson.JSONDecodeError):
        return {}


def wait(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Poll ``check`` until true; else fail with the tail of ``weir up``'s log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-80:])
    raise AssertionError(f"{what}: not within {timeout}s\n--- weir up ---\n{tail}")
