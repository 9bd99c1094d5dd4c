"""Sets up the peer runners of the benchmark once, cached under ~/.cache/weir/bench (`make bench-setup`).

- ``venv-quix``: Quix Streams from PyPI, pinned by ``bench/requirements-quix.txt`` (it pins
  older confluent-kafka and pydantic than weir, so it cannot share weir's environment);
- ``venv-bytewax``: Bytewax from PyPI, pinned by ``bench/requirements-bytewax.txt``;
- ``flink``: the Java job in ``bench/flink`` compiled with Maven, and its runtime classpath
  (Flink, the Kafka connector) copied from Maven Central into ``flink/lib``.

Each part is redone only when its inputs change (a stamp holds their hash). Nothing is
written into the repository. Usage: ``python bench/install.py [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("WEIR_CACHE", Path.home() / ".cache" / "weir")) / "bench"
FLINK_SRC = BENCH / "flink"
FLINK_DIR = CACHE / "flink"
VENVS = {
    "venv-quix": BENCH / "requirements-quix.txt",
    "venv-bytewax": BENCH / "requirements-bytewax.txt",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(BENCH)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def venv_python(name: str) -> Path:
    return CACHE / name / "bin" / "python"


def flink_classpath() -> str:
    """The Flink job's classpath: compiled classes, then every runtime jar."""
    return os.pathsep.join([str(FLINK_DIR / "target" / "classes"), str(FLINK_DIR / "lib" / "*")])


def ensure_venv(name: str, requirements: Path, force: bool) -> None:
    target = CACHE / name
    stamp = target / ".weir-bench-stamp"
    want = digest([requirements])
    if not force and stamp.exists() and stamp.read_text() == want and venv_python(name).exists():
        log(f"{name}: up to date ({target})")
        return
    log(f"{name}: creating {target} from {requirements.name}")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The base interpreter, not this virtualenv's: the peers must not see weir's packages.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(target)], check=True)
    pip = [str(venv_python(name)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(want)
    log(f"{name}: ready")


def ensure_flink(force: bool) -> None:
    sources = [FLINK_SRC / "pom.xml", *sorted((FLINK_SRC / "src").rglob("*.java"))]
    stamp = FLINK_DIR / ".weir-bench-stamp"
    want = digest(sources)
    if not force and stamp.exists() and stamp.read_text() == want:
        log(f"flink: up to date ({FLINK_DIR})")
        return
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise SystemExit("flink: needs `mvn` and a JDK 17 `java` on PATH")
    log(f"flink: building the job with Maven into {FLINK_DIR} (first time: downloads ~80 MB of jars)")
    shutil.rmtree(FLINK_DIR / "lib", ignore_errors=True)
    shutil.rmtree(FLINK_DIR / "target", ignore_errors=True)
    FLINK_DIR.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(FLINK_SRC / "pom.xml"),
            f"-Dbench.build={FLINK_DIR / 'target'}",
            "compile",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={FLINK_DIR / 'lib'}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"flink: Maven build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    stamp.write_text(want)
    log("flink: ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/install.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamps match")
    args = parser.parse_args(argv)
    for name, requirements in VENVS.items():
        ensure_venv(name, requirements, args.force)
    ensure_flink(args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
