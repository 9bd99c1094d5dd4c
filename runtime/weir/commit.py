"""The commit protocol: snapshot → upload → transaction commit, and the recovery choice.

One epoch of output is written into one open ``Transaction``. A checkpoint closes the epoch:

1. *snapshot* (on the worker's thread): close the epoch's output (``Transaction.flush``:
   at-least-once waits until it is acknowledged, exactly-once leaves that to the commit),
   write every task's changed state to its RocksDB together with its progress (offset,
   watermark, snapshot id) and take a RocksDB checkpoint (hard links);
2. *upload* (on the checkpoint thread): the files, then the manifest, to the ``Store``; a
   manifest present means the checkpoint is complete. Meanwhile the next epoch's output goes to
   a new transaction (``Sink.begin``), so processing does not stop for the upload;
3. *commit*: the epoch's transaction commits its output together with the input offsets, each
   carrying the snapshot id as metadata (``Transaction.commit``).

A crash anywhere leaves either a committed transaction whose state is in the store, or an
uncommitted one (aborted by the next start) whose records are read again. At start, recovery
(``Committer.restore``) reads the committed offsets and snapshot ids from the ``Source`` and
picks, per task, the state that matches them (``weir.recovery.choose``): never newer, never
older. ``weir.testing`` has in-memory Source/Sink/Store doubles with which the whole protocol
is run and aborted at every step in the unit tests; ``weir.worker`` wires it to Kafka and S3.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weir import checkpoint as ck
from weir import recovery
from weir.core import TaskCore
from weir.edges import Offset, Sink, Source, Store, StoreUnavailable, Transaction
from weir.outages import Backoff, Dependencies
from weir.results import iso
from weir.state_migration import (
    StateShapeMismatch,
    check_restore_source,
    layout_of,
    migrate_state,
    mismatch,
    verdict,
)
from weir.state_shape import StateShape
from weir.tasks import EARLIEST, LATEST, NO_WATERMARK, Task

log = logging.getLogger(__name__)

SNAPSHOT_THREADS = 4
"""Stores snapshotted at once: a snapshot mostly waits on the disk (the memtable's file and the
metadata files are synced), so a worker's partitions are taken side by side."""

RETRY_CAP_S = 10.0
"""Longest wait between two attempts to reach an unreachable broker or store: bounds how long a
worker stays down after its dependency is back."""


class _Snap:
    """A checkpoint or savepoint manifest as ``weir.recovery`` sees it."""

    def __init__(self, manifest: ck.Manifest, shape: StateShape) -> None:
        self.manifest = manifest
        self.id = f"{manifest.kind}:{manifest.id}"
        self.created_ms = manifest.created_ms
        self.verdict = verdict(manifest.state_shape, shape)
        """Whether this snapshot's state can be loaded into the running pipeline."""

    def progress(self, partition: str) -> dict[str, Any] | None:
        entry = self.manifest.partitions.get(partition)
        if entry is None:
            return None
        wm = NO_WATERMARK if entry.watermark is None else entry.watermark
        return {"upstream": {}, **entry.progress, "offset": entry.offset, "wm": wm}


def _compatible(s: recovery.Snapshot) -> bool:
    return not isinstance(s, _Snap) or s.verdict.compatible


@dataclass
class Pending:
    """A checkpoint (or savepoint) taken but not yet committed: its snapshot is uploading."""

    kind: str
    id: str
    txn: Transaction
    offsets: list[Offset]
    future: Future[Any]
    started: float
    sync_s: float
    stores: list[Any] = field(default_factory=list)
    """The task stores fenced for this snapshot (``weir.rocksdb_options.RocksStore``)."""
    snapped: list[Future[None]] = field(default_factory=list)
    """Each store's snapshot (in the order of ``stores``), taken on the snapshot threads."""
    committing: bool = False
    """Uploaded, and the transaction's commit begun in the background (``Committer.ready``)."""


@dataclass
class Waits:
    """How the protocol waits out an outage: the worker's pause (alive, status fresh; raises
    ``Stopped``), whether this is the first start (then a dependency gets ``timeout_s`` and a
    refusal is final) and the dependency board."""

    pause: Callable[[float], None]
    deps: Dependencies
    first: bool = True
    started_at: float = field(default_factory=time.monotonic)
    timeout_s: float = math.inf


@dataclass(frozen=True)
class Policy:
    """The worker settings the protocol reads."""

    index: int
    count: int
    state_dir: Path
    restore_from: str | None = None
    checkpoint_retain: int = 3
    start_from: str = "earliest"
    allow_state_reset: bool = False
    """A snapshot whose state shape does not fit starts its partitions empty from its offsets
    (``WEIR_ALLOW_STATE_RESET``), instead of ``StateShapeMismatch``."""


class Committer:
    """Runs the protocol for one start of a worker (new clients, new committer)."""

    def __init__(
        self,
        core: TaskCore,
        source: Source,
        sink: Sink,
        store: Store,
        policy: Policy,
        waits: Waits,
        open_state: Callable[[Task, Path], None],
        seq: int = 1,
        metrics: Any = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        uploader: Executor | None = None,
        on_commit: Callable[[dict[str, Any]], None] = lambda _record: None,
    ) -> None:
        self.core = core
        self.source = source
        self.sink = sink
        self.store = store
        self.policy = policy
        self.waits = waits
        self.open_state = open_state
        self.seq = seq
        self.metrics = metrics
        self.wall_ms = wall_ms
        self.uploader = (
            uploader if uploader is not None else ThreadPoolExecutor(1, thread_name_prefix="weir-checkpoint")
        )
        self.snapshotter = ThreadPoolExecutor(SNAPSHOT_THREADS, thread_name_prefix="weir-snapshot")
        """Takes the stores' snapshots, several at once, never queued behind an upload or a
        retention pass."""
        self.on_commit = on_commit
        """Called with what each commit completed (``lastCheckpoint`` in /status)."""
        self.closing = threading.Event()
        self.pending: Pending | None = None
        self.txn: Transaction | None = None
        self.committed_once = False
        self.last_checkpoint: dict[str, Any] | None = None
        self._retain_failing = False
        self.shape = core.graph.shape
        self.shape_json = self.shape.to_json()
        window = core.graph.window
        self.state_meta: dict[str, Any] = {"shape": self.shape_json}
        """Stored with every flush of a task's state: what it means and (windows) its slot layout."""
        if window is not None:
            self.state_meta["slots"] = layout_of(window.aggregator)
        self._reset: list[str] = []

    # -- epochs -----------------------------------------------------------------------------
    def begin(self) -> None:
        """Open the next epoch's transaction and point the core's output at it."""
        self.txn = self.sink.begin()
        self.core.send = self.txn.produce

    def close(self) -> None:
        """Give up what is pending (an upload still retrying stops); idempotent."""
        self.closing.set()
        self.uploader.shutdown(wait=False, cancel_futures=True)
        self.snapshotter.shutdown(wait=False, cancel_futures=True)
        pending, self.pending = self.pending, None
        if pending is not None:
            for db, snapped in zip(pending.stores, pending.snapped, strict=True):
                if snapped.cancelled():  # never taken: the store may be written and closed
                    db.end_checkpoint()

    def trigger(self, kind: str, cid: str, path: str | None = None) -> Pending:
        """Snapshot state and offsets now; upload in the background; commit when uploaded."""
        t0 = time.monotonic()
        txn = self.txn
        assert txn is not None and self.pending is None
        txn.flush()
        snapshot_id = f"{kind}:{cid}"
        work = self.policy.state_dir / "snapshots" / cid.replace("/", "_")
        shutil.rmtree(work, ignore_errors=True)
        parts: dict[str, ck.PartitionSnapshot] = {}
        offsets: list[Offset] = []
        shape = self.shape_json
        tasks = [task for task in self.core.tasks.values() if task.next_offset >= 0]
        stores: list[tuple[Any, Path, Any]] = []
        for task in tasks:
            local = work / task.label
            if task.store is not None:
                task.store.flush({**task.progress(), "id": snapshot_id, **self.state_meta})
                task.store.start_checkpoint()  # fenced until ``snapshot`` below has taken it
                stores.append((task.store, local, task.metrics))
            else:  # a stage-1 task of a repartitioned job: only its offset and watermark
                local.mkdir(parents=True)
            wm = None if task.wm == NO_WATERMARK else task.wm
            parts[task.name] = ck.PartitionSnapshot(local, task.next_offset, wm, task.marks())
            # The snapshot's id rides along as offset metadata: it names the committed state. A
            # task still re-reading up to its committed offset commits none: the committed one is
            # ahead of it, and moving it back would un-suppress output committed before.
            if task.replay_until is None:
                offsets.append(Offset(task.topic, task.partition, task.next_offset, snapshot_id))

        def snapshot(db: Any, local: Path, task_metrics: Any) -> None:
            # On a snapshot thread: the memtable flush and the hard links, the GIL released,
            # while the worker goes on (a write to the store waits until its snapshot is taken).
            db.checkpoint(local)  # lifts the store's fence, whether or not it succeeds
            if task_metrics is not None:
                task_metrics.state_size.set(db.size_bytes())

        worker = (self.policy.index, self.policy.count)
        store, closing, deps, metrics = self.store, self.closing, self.waits.deps, self.metrics

        snapped = [self.snapshotter.submit(snapshot, *each) for each in stores]

        def upload() -> Any:
            # On the checkpoint thread: an unreachable store is retried (processing goes on and
            # results wait to be committed); one line when it goes down, one when it is back.
            for taken in snapped:
                taken.result()  # a snapshot that failed fails the checkpoint (and the worker)
            backoff = Backoff(0.5, RETRY_CAP_S)
            while True:
                try:
                    if kind == "savepoint":
                        result = store.write_savepoint(cid, worker, parts, path=path, state_shape=shape)
                    else:
                        result = store.write_checkpoint(cid, worker, parts, state_shape=shape)
                    shutil.rmtree(work, ignore_errors=True)
                    deps.up("store")
                    return result
                except ck.CheckpointError as exc:
                    if metrics is not None:
                        metrics.checkpoint_failures_total.inc()
                    if closing.is_set():
                        raise
                    deps.down("store", f"{kind} {cid}: {exc}")
                    if closing.wait(backoff.next()):
                        raise

        pending = Pending(
            kind, cid, txn, offsets, self.uploader.submit(upload), t0, time.monotonic() - t0,
            [db for db, _local, _metrics in stores], snapped,
        )
        self.pending = pending
        if metrics is not None:
            metrics.checkpoint_sync_seconds.observe(pending.sync_s)
        self.begin()
        return pending

    def checkpoint(self) -> Pending:
        """Trigger the next checkpoint (ids ``<seq>-w<index>``, rising per worker)."""
        pending = self.trigger("checkpoint", ck.checkpoint_id(self.seq, self.policy.index))
        self.seq += 1
        return pending

    def ready(self) -> bool:
        """Whether ``complete`` can run without waiting. Once the snapshot is uploaded, the
        commit is begun in the background (the worker goes on with the next epoch meanwhile)
        and this turns true when the broker has answered it."""
        pending = self.pending
        if pending is None or not pending.future.done():
            return False
        if not pending.committing:
            pending.committing = True
            if not pending.future.cancelled() and pending.future.exception() is None:
                pending.txn.start_commit(pending.offsets)
        return not pending.txn.committing()

    def complete(self) -> Any:
        """The pending snapshot is in the store: commit the output and offsets that match it."""
        pending = self.pending
        assert pending is not None
        self.pending = None
        result = pending.future.result()  # raises if the upload gave up (only while closing)
        pending.txn.commit(pending.offsets)
        self.committed_once = True
        seconds = time.monotonic() - pending.started
        self.last_checkpoint = {
            "kind": pending.kind,
            "id": pending.id,
            "completedAt": iso(self.wall_ms()),
            "durationSeconds": round(seconds, 3),
            "bytes": result.bytes_total,
            "bytesUploaded": result.bytes_uploaded,
            "url": result.url,
        }
        self.on_commit(self.last_checkpoint)
        if self.metrics is not None:
            m = self.metrics
            m.checkpoint_duration_seconds.observe(seconds)
            m.checkpoint_size_bytes.set(result.bytes_total)
            m.checkpoint_uploaded_bytes_total.inc(result.bytes_uploaded)
            if pending.kind == "checkpoint":
                m.last_checkpoint_id.set(int(pending.id.split("-", 1)[0]))
                m.last_checkpoint_timestamp_seconds.set(time.time())
        if pending.kind == "checkpoint" and not self.closing.is_set():
            owned = [t.name for t in self.core.tasks.values()]
            self.uploader.submit(self._retain, owned)
        return result

    def _retain(self, owned: list[str]) -> None:
        policy = self.policy
        try:
            self.store.retain(policy.checkpoint_retain, policy.index, owned, workers=policy.count)
            self._retain_failing = False
        except ck.StoreRefused as exc:
            if not self._retain_failing:  # once per streak, not after every checkpoint
                log.warning("deleting old checkpoints failed (retried after the next one): %s", exc)
            self._retain_failing = True
        except ck.CheckpointError as exc:
            self.waits.deps.down("store", f"deleting old checkpoints: {exc}")  # retried after the next one

    def wait_pending(self, deadline: float | None = None) -> bool:
        """Block until the pending snapshot is uploaded and committed; False at the deadline."""
        pending = self.pending
        if pending is None:
            return True
        shown = time.monotonic()
        while not pending.future.done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            self.sink.poll()
            wait_futures([pending.future], timeout=0.05)
            if now - shown >= 1.0:  # a store outage can make this long: keep /status fresh
                self.waits.pause(0)
                shown = now
        self.complete()
        return True

    def final_checkpoint(self, shutdown_timeout_s: float) -> None:
        """On stop: commit what was processed, bounded by the shutdown timeout. What cannot be
        committed in time (the store is down) is produced again by the next start."""
        deadline = time.monotonic() + shutdown_timeout_s
        if self.wait_pending(deadline):
            self.checkpoint()
            if self.wait_pending(deadline):
                return
        self.closing.set()
        log.error(
            "the final checkpoint did not complete within %.0fs; what it holds stays uncommitted "
            "and is processed again by the next start",
            shutdown_timeout_s,
        )

    def savepoint(self, sid: str, path: str | None) -> dict[str, Any]:
        """Take a savepoint now (after the pending checkpoint) and wait until it is committed."""
        self.wait_pending()
        pending = self.trigger("savepoint", sid, path)
        self.wait_pending()
        result = pending.future.result()
        return {
            "id": sid,
            "path": result.url,
            "status": "completed",
            "bytes": result.bytes_total,
            "offsets": {t.name: t.next_offset for t in self.core.tasks.values()},
        }

    # -- recovery ---------------------------------------------------------------------------
    def from_store(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` until the store answers, waiting out an outage with back-off.

        A refusal (``StoreRefused``: credentials, bucket, region) is raised on the first start
        and waited out after a rollback (credentials may come back while the job runs); an
        unreachable store is waited for ``timeout_s`` on the first start (then
        ``StoreUnavailable``), else for ever. A corrupt or missing object is raised at once."""
        waits = self.waits
        backoff = Backoff(0.5, RETRY_CAP_S)
        while True:
            try:
                result = call()
            except (ck.CorruptCheckpoint, ck.NotFound):
                raise
            except ck.CheckpointError as exc:
                if isinstance(exc, ck.StoreRefused) and waits.first:
                    raise
                waits.deps.down("store", str(exc))
                if waits.first and time.monotonic() - waits.started_at > waits.timeout_s:
                    raise StoreUnavailable(
                        f"the checkpoint store stayed unreachable for {waits.timeout_s:.0f}s "
                        f"(--connect-timeout): {exc}"
                    ) from exc
                waits.pause(backoff.next())
                continue
            waits.deps.up("store")
            return result

    def _skipped(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.checkpoints_skipped_total.labels(reason=reason).inc()

    def restore(self) -> None:
        """Give every task its state and start offset (the decision is ``weir.recovery.choose``)."""
        started = time.monotonic()
        store, policy, core = self.store, self.policy, self.core
        tasks = list(core.tasks.values())
        committed = self.source.committed(tasks) if tasks else {}
        scans = [
            self.from_store("listing checkpoints", lambda: store.scan_kind("checkpoint")),
            self.from_store("listing savepoints", lambda: store.scan_kind("savepoint")),
        ]
        for scan in scans:
            for bad in scan.unreadable:
                log.warning("skipping an unreadable manifest: %s", bad)
                self._skipped("corrupt")
        shape = self.shape
        snapshots = [_Snap(m, shape) for scan in scans for m in scan.manifests]
        # Never below what this process used: an upload abandoned by a rollback may still write.
        self.seq = max(self.seq, self.from_store("listing checkpoints", lambda: store.next_seq(policy.index)))
        source = policy.restore_from
        read = self.from_store(f"reading {source}", lambda: store.read_savepoint(source)) if source else []
        explicit = [_Snap(m, shape) for m in read]
        check_restore_source(source, explicit, snapshots, policy.allow_state_reset)
        start = EARLIEST if policy.start_from == "earliest" else LATEST
        self._reset = []
        for task in tasks:
            try:
                self._restore_task(task, committed, snapshots, explicit, start)
            except recovery.IncompatibleState as exc:
                snap = exc.snapshot
                assert isinstance(snap, _Snap)
                raise StateShapeMismatch(mismatch(snap, f"{exc} ({snap.manifest.url})")) from None
        if self._reset:
            log.warning(
                "state reset (allowed): %s start with empty state at their snapshot's offsets; "
                "windows open there restart empty and see only the records from that offset on",
                ", ".join(self._reset),
            )
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.restore_duration_seconds.set(seconds)
        log.info(
            "restored in %.2fs: %s",
            seconds,
            ", ".join(
                f"{t.name}@{t.next_offset}" + (f" (replay to {t.replay_until})" if t.replay_until else "")
                for t in tasks
            ),
        )

    def _restore_task(
        self,
        task: Task,
        committed: dict[str, tuple[int, str | None]],
        snapshots: list[_Snap],
        explicit: list[_Snap],
        start: int,
    ) -> None:
        state_dir = self.policy.state_dir
        path = state_dir / task.label
        local: tuple[int, str | None] | None = None
        local_progress = None
        if not task.forward and (path / "CURRENT").exists():
            # Opened once: kept when it is the committed state, closed and replaced otherwise.
            self.open_state(task, path)
            assert task.store is not None
            local_progress = task.store.progress
            if local_progress is not None and verdict(local_progress.get("shape"), self.shape).compatible:
                local = (int(local_progress["offset"]), local_progress.get("id"))
        fetched: dict[str, Path] = {}

        def usable(s: Any) -> bool:
            if task.forward:
                return True
            dest = state_dir / "restore" / f"{task.label}-{len(fetched)}"
            try:
                self.from_store(
                    f"restoring {task.name} from {s.manifest.url}",
                    lambda: self.store.restore(s.manifest, task.name, dest),
                )
            except ck.CorruptCheckpoint as exc:
                log.warning("%s: skipping %s: %s", task.name, s.manifest.url, exc)
                self._skipped("corrupt")
                return False
            fetched[s.id] = dest
            return True

        offset, committed_id = committed.get(task.name, (None, None))
        decision = recovery.choose(
            task.name, offset, snapshots, explicit, local, usable, committed_id,
            # A task without state (a repartitioned job's stage 1) needs only the offsets.
            compatible=(lambda s: True) if task.forward else _compatible,
            allow_reset=self.policy.allow_state_reset, replayable=self.core.replay_exact(task),
        )
        log.info("%s: restore %s (%s)", task.name, decision.how, decision.reason)
        if not task.forward and decision.how != "local":
            if task.store is not None:
                task.store.close()
            shutil.rmtree(path, ignore_errors=True)
            if decision.source is not None and decision.how != "reset":
                fetched[decision.source.id].rename(path)
            self.open_state(task, path)
        shutil.rmtree(state_dir / "restore", ignore_errors=True)
        if decision.how == "reset" and not task.forward:
            self._reset.append(task.name)
        if not task.forward and decision.how in ("local", "exact", "replay"):
            migrate_state(task, self.core.graph.window, self.shape, self.state_meta)
        if decision.how == "local":
            task.restore_progress(local_progress)
        elif decision.source is not None:
            task.restore_progress(decision.source.progress(task.name))
        task.next_offset = decision.offset if decision.offset is not None else start
        if decision.how == "replay" and decision.replay_until is not None:
            # From the start position (a negative logical offset) or an older checkpoint.
            task.replay_until = decision.replay_until
            task.replay_wm = decision.replay_wm
        if task.op is not None:
            task.op.restore()
