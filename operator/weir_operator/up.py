"""``weir up PATH``: StreamJob manifests run on this machine by the local platform (``weir_operator.local``).

Registered with the ``weir`` command through the ``weir.commands`` entry point, so the runtime
never imports the operator. It runs the manifests in PATH, re-reads them every second (an
edit is a new generation; a manifest taken out of PATH is a deleted job: its workers stop and,
with ``cleanupPolicy: delete``, its checkpoints and savepoints are removed), prints a
``kubectl get sj``-like table, and on Ctrl-C or SIGTERM stops every job with a savepoint
(``trigger: shutdown``) that the next ``weir up`` resumes from.

**Generations survive a restart.** A job's generation and the digest of the spec it counts
are kept in ``<state>/<namespace>/<name>/generation.json``: a ``weir up`` started again on an
unchanged manifest continues the same generation (as an operator restarted on Kubernetes
does), so an upgrade it was in the middle of is resumed, not taken for a new change, and a
job rolled back stays rolled back. A manifest edited while ``weir up`` was not running is a
new generation.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import yaml

from weir import spec
from weir_operator import crashpoints, decide, model
from weir_operator.local import LocalPlatform
from weir_operator.reconciler import finalize, reconcile

__all__ = ["COMMAND", "UpCommand", "load_manifests", "status_table"]

logger = logging.getLogger(__name__)

GENERATION = "generation.json"
"""A job directory's record of its generation and the digest of the spec it counts."""


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


def _generation(platform: LocalPlatform, key: tuple[str, str], digest: str) -> int:
    """The generation of a job this ``weir up`` starts tracking: the recorded one for the same spec,
    else one past everything known of it (a new job: 1)."""
    path = platform.job_dir(*key) / GENERATION
    try:
        recorded = orjson.loads(path.read_bytes())
        generation, known = int(recorded["generation"]), str(recorded["digest"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        generation, known = 0, ""
    if known == digest and generation > 0:
        return generation
    observed = platform.read_status(*key).observed_generation or 0
    generation = max(generation, observed) + 1
    _record_generation(platform, key, generation, digest)
    return generation


def _record_generation(platform: LocalPlatform, key: tuple[str, str], generation: int, digest: str) -> None:
    directory = platform.job_dir(*key)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (GENERATION + ".tmp")
    tmp.write_bytes(orjson.dumps({"generation": generation, "digest": digest}))
    tmp.replace(directory / GENERATION)


def _age(since: datetime, now: datetime) -> str:
    seconds = int((now - since).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def status_table(rows: list[tuple[str, model.StreamJobStatus, datetime]], now: datetime) -> str:
    """``kubectl get sj``: NAME PHASE PARALLELISM READY LIFECYCLE LAG LAST CHECKPOINT AGE."""
    header = ("NAME", "PHASE", "PARALLELISM", "READY", "LIFECYCLE", "LAG", "LAST CHECKPOINT", "AGE")
    lines = [header]
    for name, status, created in rows:
        checkpoint = status.last_checkpoint
        lines.append((
            name,
            status.phase or "",
            str(status.parallelism if status.parallelism is not None else ""),
            f"{status.ready_workers or 0}/{status.parallelism or 0}",
            status.lifecycle_state or "",
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
        crash_at = os.environ.get(crashpoints.ENV_CRASH_AT)
        if crash_at:  # the kill tests' fault injection (weir_operator.crashpoints)
            try:
                point = crashpoints.CrashPoint.parse(crash_at)
            except ValueError as exc:
                print(exc, file=sys.stderr)
                return 2
            platform = crashpoints.CrashingPlatform(point, state_dir,
                                                    bootstrap_servers=args.bootstrap_servers)
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
                generation = _generation(platform, key, digest)
                tracked[key] = known = _Tracked(job, generation, digest, platform.now())
            elif known.digest != digest:
                known.job, known.digest, known.generation = job, digest, known.generation + 1
                _record_generation(platform, key, known.generation, digest)
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
