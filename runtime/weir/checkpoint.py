"""Checkpoints and savepoints of partition state in a ``file://`` or ``s3://`` store.

The layout of a store and the ``manifest.json`` format are in ``weir.checkpoint_manifest``;
reading (listing, verifying, restoring) is ``weir.checkpoint_reader.StoreReader``, which
``CheckpointStore`` extends with writing and retention.

A **checkpoint** of a partition is a RocksDB checkpoint directory (``PartitionStore.checkpoint``).
Its SST and blob files never change once written, so they go to the content-addressed
``shared`` area and are uploaded only when not there yet: a checkpoint after a small change
uploads the few new files and the small metadata files. Checkpoint ids are
``checkpoint_id(seq, worker_index)`` = ``"{seq:010d}-w{index}"``; ``next_seq`` gives a worker
the next free sequence number.

A **savepoint** is self-contained and portable: per partition one SST file holding every
entry (``state_sst.export_sst``; SST rather than a format of our own because RocksDB ingests it
into a fresh database without rewriting it, it is RocksDB's stable, versioned table format
with a checksum per block, and it is readable by ``sst_dump`` and every RocksDB binding), and
no reference to checkpoint files. A savepoint taken by N workers is N manifests under one
savepoint directory; restoring reads the union, so any later parallelism can restore it.

Errors (``CheckpointError`` and ``NotFound`` come from ``weir.objectstores``, the backends)::

    CheckpointError          the store is unreachable, a write failed, a bad URL or argument
    ├── CorruptCheckpoint    a missing file, a size or sha256 mismatch, an unreadable manifest
    └── NotFound             a read found no object (``fetch``/``restore`` turn it into Corrupt...)

Use::

    store = CheckpointStore.open("s3://bucket/weir", "default", "revenue", S3Settings.from_env())
    snap = PartitionSnapshot(partition_store.checkpoint(tmp / "orders-0"), offset=42, watermark=wm)
    res = store.write_checkpoint(checkpoint_id(seq, i), (i, n), {"orders/0": snap})
    store.retain(keep=3, worker_index=i, owned_partitions=["orders/0"])
    for m in store.manifests("checkpoint"): ...         # complete ones, newest first
    store.restore(m, "orders/0", state_dir / "orders-0")  # verified download, ready to open
    res = store.write_savepoint("sp-1", (i, n), {"orders/0": snap})   # -> res.url
    manifests = store.read_savepoint(res.url)             # all workers' manifests

A store object is used by one thread at a time (the worker's checkpoint thread); it holds one
S3 client. ``weir checkpoints ls|inspect`` is ``weir.checkpoint_cli``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from weir import __version__, state_sst
from weir.checkpoint_manifest import (
    CHECKPOINTS,
    FORMAT_CHECKPOINT,
    FORMAT_EXPORT,
    MANIFEST,
    SAVEPOINTS,
    SHARED,
    CorruptCheckpoint,
    FileEntry,
    Manifest,
    PartitionEntry,
    PartitionSnapshot,
    WriteResult,
    check_name,
    checkpoint_id,
    encode_manifest,
    parse_checkpoint_id,
    partition_dir,
)
from weir.checkpoint_reader import Scan, StoreReader, sha256_file
from weir.objectstores import (
    Backend,
    CheckpointError,
    FileBackend,
    NotFound,
    S3Settings,
    StoreRefused,
    job_url,
    join_key,
    join_url,
    split_url,
)

# The checkpoint store's API: the store, what it takes, returns and raises. (The manifest
# model is weir.checkpoint_manifest, the reader weir.checkpoint_reader, the backends
# weir.objectstores.)
__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CorruptCheckpoint",
    "Manifest",
    "NotFound",
    "PartitionSnapshot",
    "S3Settings",
    "Scan",
    "StoreReader",
    "StoreRefused",
    "WriteResult",
    "checkpoint_id",
]

log = logging.getLogger(__name__)

# RocksDB files that never change once written (named by a file number that is never
# reused within a database): they can be shared between checkpoints.
_IMMUTABLE_SUFFIXES = (".sst", ".blob")


# -- writing ---------------------------------------------------------------------------------
class CheckpointStore(StoreReader):
    """Checkpoints and savepoints of one job: ``<url>/<namespace>/<job>/...``."""

    def __init__(
        self,
        url: str,
        namespace: str,
        job: str,
        s3: S3Settings | None = None,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(s3, [backend] if backend is not None else ())
        scheme, bucket, key = split_url(url)
        if backend is not None and (backend.scheme, backend.bucket) != (scheme, bucket):
            raise CheckpointError(
                f"backend for {backend.scheme}://{backend.bucket} cannot serve store URL {url!r}"
            )
        self.namespace = check_name("namespace", namespace)
        self.job = check_name("job name", job)
        self.url = join_url(scheme, bucket, key)
        self.job_url = job_url(url, namespace, job)
        self._backend, self._root = self._resolve(self.job_url)
        self._clock = clock
        # Shared keys known to be in the store, per partition directory: listed once on first
        # use, then kept up to date by this object's uploads and deletions (no HEAD per file).
        self._present: dict[str, set[str]] = {}
        # sha256 of local files by (device, inode, size, mtime): the SST files of successive
        # RocksDB checkpoints are hard links of the same inodes, so each is hashed once.
        self._digests: dict[tuple[int, int, int, int, str], str] = {}

    @classmethod
    def open(
        cls,
        url: str,
        namespace: str,
        job: str,
        s3: S3Settings | None = None,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> CheckpointStore:
        """A store for ``url`` (``file:///path`` or ``s3://bucket/prefix``). Nothing is contacted
        until the first read or write."""
        return cls(url, namespace, job, s3=s3, backend=backend, clock=clock)

    def __enter__(self) -> CheckpointStore:
        return self

    def _key(self, *parts: str) -> str:
        return join_key(self._root, *parts)

    def _url(self, *parts: str) -> str:
        return join_url(self._backend.scheme, self._backend.bucket, self._key(*parts))

    # listing
    def scan_kind(self, kind: str = "checkpoint") -> Scan:
        """Checkpoints (or savepoints) of this job: complete ones newest first, plus problems."""
        if kind == "checkpoint":
            return self.scan(self._url(CHECKPOINTS), max_depth=1)
        if kind == "savepoint":
            return self.scan(self._url(SAVEPOINTS), max_depth=2)
        raise CheckpointError(f"kind must be 'checkpoint' or 'savepoint', got {kind!r}")

    def manifests(self, kind: str = "checkpoint") -> list[Manifest]:
        """Complete checkpoints (or savepoint manifests) of this job, newest first; incomplete
        ones are left out, unreadable ones are logged and left out (``scan_kind`` lists them)."""
        found = self.scan_kind(kind)
        for problem in found.unreadable:
            log.warning("ignoring an unreadable %s manifest: %s", kind, problem)
        return found.manifests

    def next_seq(self, worker_index: int) -> int:
        """One more than the highest sequence number worker ``worker_index`` has used,
        complete or not (so a restarted worker never reuses an id)."""
        prefix = self._key(CHECKPOINTS) + "/"
        highest = -1
        for obj in self._backend.list(prefix):
            parsed = parse_checkpoint_id(obj.key[len(prefix) :].partition("/")[0])
            if parsed and parsed[1] == worker_index:
                highest = max(highest, parsed[0])
        return highest + 1

    # writing
    def write_checkpoint(
        self, checkpoint_id: str, worker: tuple[int, int], partitions: Mapping[str, PartitionSnapshot],
        state_shape: Mapping[str, Any] | None = None,
    ) -> WriteResult:
        """Upload the partitions' RocksDB checkpoint directories and then the manifest
        (recording ``state_shape``, the pipeline's ``StateShape.to_json()``).

        SST/blob files already in the shared area are not uploaded again. Until the manifest is
        written the checkpoint does not exist for readers; a failure leaves only unreferenced
        files, which ``retain`` removes. The local directories are left for the caller.
        """
        t0 = time.monotonic()
        check_name("checkpoint id", checkpoint_id)
        index, count = self._check_worker(worker)
        uploaded = [0, 0]
        entries: dict[str, PartitionEntry] = {}
        puts: list[tuple[str, Path, int, set[str] | None]] = []  # key, file, size, shared index
        digests: dict[tuple[int, int, int, int, str], str] = {}  # of the files in this checkpoint
        for name, snap in sorted(partitions.items()):
            pdir = partition_dir(name)
            if not snap.path.is_dir():
                raise CheckpointError(f"partition {name}: {snap.path} is not a RocksDB checkpoint directory")
            present = self._present_keys(pdir)
            files: list[FileEntry] = []
            with os.scandir(snap.path) as listing:
                found = sorted((e.name, Path(e.path), e.stat()) for e in listing if e.is_file())
            for _name, path, st in found:
                size, digest = self._digest(path, st, digests)
                if path.name.endswith(_IMMUTABLE_SUFFIXES):
                    rel = join_key(SHARED, pdir, f"{digest}-{path.name}")
                    if rel not in present:
                        puts.append((rel, path, size, present))
                else:
                    rel = join_key(CHECKPOINTS, checkpoint_id, pdir, path.name)
                    puts.append((rel, path, size, None))
                files.append(FileEntry(path.name, rel, size, digest))
            entries[name] = PartitionEntry(
                snap.offset, snap.watermark, dict(snap.progress), FORMAT_CHECKPOINT, tuple(files)
            )
        if isinstance(self._backend, FileBackend):
            # A RocksDB checkpoint's files are synced and final: linked, not copied, when they can be.
            self._backend.put_synced_files([(self._key(rel), path) for rel, path, _size, _present in puts])
            uploaded[0] += sum(size for _rel, _path, size, _present in puts)
            uploaded[1] += len(puts)
        else:
            for rel, path, size, _present in puts:
                self._put_file(rel, path, size, uploaded)
        for rel, _path, _size, shared in puts:
            if shared is not None:
                shared.add(rel)
        self._digests = digests  # the next checkpoint shares most of these files
        manifest = self._manifest(
            "checkpoint", checkpoint_id, index, count, entries, "job", self._url(CHECKPOINTS, checkpoint_id),
            state_shape,
        )
        data = encode_manifest(manifest)
        self._backend.put_bytes(self._key(CHECKPOINTS, checkpoint_id, MANIFEST), data)
        self._manifest_cache[manifest.url] = manifest
        return WriteResult(
            manifest,
            manifest.url,
            manifest.total_bytes,
            uploaded[0] + len(data),
            uploaded[1] + 1,
            time.monotonic() - t0,
        )

    def write_savepoint(
        self,
        savepoint_id: str,
        worker: tuple[int, int],
        partitions: Mapping[str, PartitionSnapshot],
        path: str | None = None,
        state_shape: Mapping[str, Any] | None = None,
    ) -> WriteResult:
        """Export each partition to one SST file and upload it with a manifest of kind savepoint
        to ``<path or <job>/savepoints>/<savepoint_id>/w<index>/`` (recording ``state_shape``).

        Idempotent: when that manifest already exists nothing is written and the existing
        savepoint is returned (``existing=True``).
        """
        t0 = time.monotonic()
        check_name("savepoint id", savepoint_id)
        index, count = self._check_worker(worker)
        sp_url = _join_url(path, savepoint_id) if path else self._url(SAVEPOINTS, savepoint_id)
        dir_url = _join_url(sp_url, f"w{index}")
        with contextlib.suppress(NotFound):
            old = self.read_manifest(dir_url)
            return WriteResult(old, sp_url, old.total_bytes, 0, 0, time.monotonic() - t0, existing=True)
        backend, dir_key = self._resolve(dir_url)
        uploaded = [0, 0]
        entries: dict[str, PartitionEntry] = {}
        with tempfile.TemporaryDirectory(prefix="weir-savepoint-") as tmp:
            for name, snap in sorted(partitions.items()):
                pdir = partition_dir(name)
                if snap.path.is_dir() and not (snap.path / "CURRENT").exists():
                    ssts, n = list[Path](), 0  # a partition without state (a repartitioning stage's input)
                elif snap.path.is_dir():  # every part of the task's state (weir.join_stage.StoreSet)
                    ssts, n = state_sst.export_parts(snap.path, Path(tmp), pdir)
                elif snap.path.is_file():
                    ssts, n = [snap.path], None
                else:
                    raise CheckpointError(f"partition {name}: {snap.path} does not exist")
                files: tuple[FileEntry, ...] = ()
                for sst in ssts if n != 0 else []:
                    size, digest = _sha256_size(sst)
                    rel = f"{pdir}.sst" if sst.parent != Path(tmp) else sst.name
                    _put_counted(backend, join_key(dir_key, rel), sst, size, uploaded)
                    files += (FileEntry(rel, rel, size, digest),)
                entries[name] = PartitionEntry(
                    snap.offset, snap.watermark, dict(snap.progress), FORMAT_EXPORT, files, n
                )
        manifest = self._manifest(
            "savepoint", savepoint_id, index, count, entries, "manifest", dir_url, state_shape
        )
        data = encode_manifest(manifest)
        backend.put_bytes(join_key(dir_key, MANIFEST), data)
        self._manifest_cache[dir_url] = manifest
        return WriteResult(
            manifest,
            sp_url,
            manifest.total_bytes,
            uploaded[0] + len(data),
            uploaded[1] + 1,
            time.monotonic() - t0,
        )

    def _check_worker(self, worker: tuple[int, int]) -> tuple[int, int]:
        index, count = worker
        if not 0 <= index < count:
            raise CheckpointError(f"worker index {index} is outside 0..{count - 1}")
        return index, count

    def _manifest(
        self, kind: str, mid: str, index: int, count: int, entries: dict[str, PartitionEntry], rel: str,
        url: str, state_shape: Mapping[str, Any] | None = None,
    ) -> Manifest:
        return Manifest(
            kind=kind,
            id=mid,
            created_ms=int(self._clock() * 1000),
            weir_version=__version__,
            namespace=self.namespace,
            job=self.job,
            worker_index=index,
            workers=count,
            partitions=entries, files_relative_to=rel, url=url, state_shape=state_shape,
        )

    def _put_file(self, rel: str, path: Path, size: int, counter: list[int]) -> None:
        _put_counted(self._backend, self._key(rel), path, size, counter)

    def _present_keys(self, pdir: str) -> set[str]:
        present = self._present.get(pdir)
        if present is None:
            prefix = self._key(SHARED, pdir) + "/"
            strip = len(self._key()) + 1 if self._key() else 0
            present = {obj.key[strip:] for obj in self._backend.list(prefix)}
            self._present[pdir] = present
        return present

    def _digest(
        self, path: Path, st: os.stat_result, digests: dict[tuple[int, int, int, int, str], str]
    ) -> tuple[int, str]:
        """``path``'s size and sha256, remembered in ``digests`` by file identity: a file of an
        earlier checkpoint (the same inode, size and mtime) is not read again."""
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, path.name)
        digest = self._digests.get(ident) or digests.get(ident)
        if digest is None:
            digest = sha256_file(path)
        digests[ident] = digest
        return st.st_size, digest

    # retention
    def retain(
        self, keep: int, worker_index: int, owned_partitions: Iterable[str], workers: int | None = None
    ) -> int:
        """Delete worker ``worker_index``'s checkpoints beyond its newest ``keep`` complete ones
        (and its abandoned incomplete ones older than those), then the shared files of
        ``owned_partitions`` that no remaining checkpoint of any worker references.
        Savepoints are never touched. Returns the number of objects deleted.

        With ``workers`` (the job's current worker count), worker 0 also deletes the
        checkpoints of indices ``>= workers`` left by a larger earlier deployment, once every
        current worker has a complete checkpoint newer than them: until then a partition's
        committed offsets may still name one of them as its state.

        When any checkpoint manifest is unreadable, no shared file is deleted (what it
        references is unknown); its own old checkpoints are still cleaned up.
        """
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1, got {keep}")
        owned = [partition_dir(p) for p in owned_partitions]
        prefix = self._key(CHECKPOINTS) + "/"
        by_id: dict[str, list[str]] = {}
        for obj in self._backend.list(prefix):
            by_id.setdefault(obj.key[len(prefix) :].partition("/")[0], []).append(obj.key)
        found = self.scan_kind("checkpoint")
        mine = sorted(
            (m for m in found.manifests if (parse_checkpoint_id(m.id) or (-1, -1))[1] == worker_index),
            key=lambda m: m.seq,
            reverse=True,
        )
        kept, dropped = mine[:keep], mine[keep:]
        oldest_kept = kept[-1].seq if kept else -1
        doomed_ids = [m.id for m in dropped]
        for cid in found.incomplete:
            parsed = parse_checkpoint_id(cid)
            if parsed and parsed[1] == worker_index and parsed[0] < oldest_kept:
                doomed_ids.append(cid)
        if workers is not None and worker_index == 0:
            doomed_ids += self._departed(found, workers)
        deleted = 0
        for cid in doomed_ids:
            keys = by_id.get(cid, [])
            # The manifest goes first: a half-deleted checkpoint must never look complete.
            self._backend.delete([k for k in keys if k.endswith("/" + MANIFEST)])
            self._backend.delete([k for k in keys if not k.endswith("/" + MANIFEST)])
            self._manifest_cache.pop(self._url(CHECKPOINTS, cid), None)
            deleted += len(keys)
        if found.unreadable:
            log.warning(
                "not deleting shared files: %d checkpoint manifest(s) unreadable, e.g. %s",
                len(found.unreadable),
                found.unreadable[0],
            )
            return deleted
        gone = set(doomed_ids)
        referenced = {
            f.key for m in found.manifests if m.id not in gone for p in m.partitions.values() for f in p.files
        }
        root_strip = len(self._key()) + 1 if self._key() else 0
        for pdir in owned:
            listed = {obj.key[root_strip:] for obj in self._backend.list(self._key(SHARED, pdir) + "/")}
            orphans = sorted(listed - referenced)
            self._backend.delete([self._key(k) for k in orphans])
            deleted += len(orphans)
            # The listing is fresh: it is now the index of what is present.
            self._present[pdir] = listed - set(orphans)
        return deleted


    def _departed(self, found: Scan, workers: int) -> list[str]:
        """Checkpoints of worker indices ``>= workers`` that every current worker has superseded
        with a checkpoint written at this parallelism (``workers`` in its manifest)."""

        def index(cid: str) -> int:
            return (parse_checkpoint_id(cid) or (-1, -1))[1]

        newest: dict[int, int] = {}
        for m in found.manifests:
            if 0 <= index(m.id) < workers and m.workers == workers:
                newest[index(m.id)] = max(newest.get(index(m.id), 0), m.created_ms)
        if len(newest) < workers:
            return []
        horizon = min(newest.values())
        departed = [m for m in found.manifests if index(m.id) >= workers]
        gone = [m.id for m in departed if m.created_ms < horizon]
        if gone:
            log.info("deleting %d checkpoints of worker indices >= %d (a smaller deployment runs now)",
                     len(gone), workers)
        if len(gone) < len(departed):
            return gone
        # Every departed complete one is superseded: their unfinished ones will never complete.
        return gone + [c for c in found.incomplete if index(c) >= workers]

    def remove_all(self) -> int:
        """Delete everything of this job: its checkpoints, savepoints and shared files
        (``<store>/<namespace>/<job>/``), manifests first so a half-removed store never holds
        a complete-looking checkpoint. Returns the number of objects deleted.

        Only the job's own directory is touched: job ``rev`` never removes ``revenue``'s.
        """
        keys = [obj.key for obj in self._backend.list(self._key() + "/")]
        self._backend.delete([k for k in keys if k.endswith("/" + MANIFEST)])
        self._backend.delete([k for k in keys if not k.endswith("/" + MANIFEST)])
        self._present.clear()
        self._manifest_cache.clear()
        if isinstance(self._backend, FileBackend):
            _prune_empty_dirs(self._backend.root / self._key())
        return len(keys)


def _prune_empty_dirs(top: Path) -> None:
    """Remove ``top`` and the directories below it that hold no file (a file store's leftovers)."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            Path(dirpath).rmdir()



def _join_url(url: str, *parts: str) -> str:
    scheme, bucket, key = split_url(url)
    return join_url(scheme, bucket, join_key(key, *parts))


def _sha256_size(path: Path) -> tuple[int, str]:
    return path.stat().st_size, sha256_file(path)


def _put_counted(backend: Backend, key: str, path: Path, size: int, counter: list[int]) -> None:
    backend.put_file(key, path)
    counter[0] += size
    counter[1] += 1


# -- the `weir checkpoints` command -------------------------------------------------------------

