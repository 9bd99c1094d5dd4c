"""A Helm 3 binary for rendering and linting the chart, built from the Go module proxy and cached.

``helm.sh/helm/v3`` has no local ``replace`` directives, so a plain ``go install`` builds it
(unlike kube-apiserver and etcd, see ``harness.kube``). The version is pinned and the version
string set through ``-ldflags`` so ``helm version`` and the ``.Capabilities.HelmVersion`` the
templates see are the real ones. Built once into ``CACHE/helm/<version>/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness.common import CACHE, ServerError, file_lock

HELM_MODULE = "helm.sh/helm/v3"
HELM_VERSION = "v3.21.4"
BUILD_DIR = CACHE / "helm"


def binary() -> Path:
    return BUILD_DIR / HELM_VERSION / "helm"


def _go() -> str:
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", str(Path.home() / "go/bin/go")) if Path(p).exists()), None
    )
    if found is None:
        raise ServerError(
            "no `go` on PATH (nor /usr/local/go/bin/go): building helm needs Go (https://go.dev/dl/)"
        )
    return found


def ensure_built() -> Path:
    """The helm binary, built with ``go install`` on first use (a few minutes on two cores)."""
    path = binary()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent):
        if path.exists():
            return path
        started = time.monotonic()
        pkg = "helm.sh/helm/v3/internal/version"
        ldflags = f"-s -w -X {pkg}.version={HELM_VERSION} -X {pkg}.gitTreeState=clean"
        env = {**os.environ, "GOBIN": str(path.parent), "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
        log = path.parent / "build.log"
        with open(log, "w") as fh:
            done = subprocess.run(
                [
                    _go(),
                    "install",
                    "-trimpath",
                    "-ldflags",
                    ldflags,
                    f"{HELM_MODULE}/cmd/helm@{HELM_VERSION}",
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
        if done.returncode != 0 or not path.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise ServerError(f"building helm {HELM_VERSION} failed (log {log}):\n{tail}")
        with open(log, "a") as fh:
            fh.write(f"built {path} in {time.monotonic() - started:.0f}s\n")
    return path


class Helm:
    """Runs the pinned helm binary with its state directories inside a scratch directory.

    Helm writes a cache, config and data directory (repositories, plugins); pointing them at
    ``home`` keeps a test from touching the user's own Helm setup.
    """

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.home = home

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        done = subprocess.run(
            [str(self.path), *args], capture_output=True, text=True, env=env, check=False, timeout=60
        )
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr}")
        return done


_build_error: ServerError | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build helm before the first test that needs it, outside the per-test timeout."""
    global _build_error
    if session.config.option.collectonly:
        return
    wanted = any("helm" in getattr(item, "fixturenames", ()) for item in session.items)
    if not wanted or binary().exists():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"weir: building helm {HELM_VERSION} from Go modules into {BUILD_DIR} (first run only)"
        )
    try:
        ensure_built()
    except ServerError as exc:
        _build_error = exc


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned helm binary; a build failure fails the tests that need it, never skips them."""
    if _build_error is not None:
        pytest.fail(str(_build_error), pytrace=False)
    try:
        path = ensure_built()
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Helm(path, tmp_path_factory.mktemp("helm-home"))
