"""Checkpoints and savepoints of partition state in a ``file://`` or ``s3://`` store.

Layout (``<store>`` is the store URL, e.g. ``s3://bucket/prefix`` or ``file:///var/weir``)::

    <store>/<namespace>/<job>/checkpoints/<id>/manifest.json         written last: presence = complete
    <store>/<namespace>/<job>/checkpoints/<id>/<topic>-<p>/CURRENT    small mutable RocksDB files
    <store>/<namespace>/<job>/shared/<topic>-<p>/<sha256>-000123.sst  immutable files, shared by checkpoints
    <store>/<namespace>/<job>/savepoints/<id>/w<index>/manifest.json  one manifest per worker
    <store>/<namespace>/<job>/savepoints/<id>/w<index>/<topic>-<p>.sst

A **checkpoint** of a partition is a RocksDB checkpoint directory (``PartitionStore.checkpoint``).
Its SST and blob files never change once written, so they go to the content-addressed
``shared`` area and are uploaded only when not there yet: a checkpoint after a small change
uploads the few new files and the small metadata files. Checkpoint ids are
``checkpoint_id(seq, worker_index)`` = ``"{seq:010d}-w{index}"``; ``next_seq`` gives a worker
the next free sequence number.

A **savepoint** is self-contained and portable: per partition one SST file holding every
entry (``state.export_sst``; SST rather than a format of our own because RocksDB ingests it
into a fresh database without rewriting it, it is RocksDB's stable, versioned table format
with a checksum per block, and it is readable by ``sst_dump`` and every RocksDB binding), and
no reference to checkpoint files. A savepoint taken by N workers is N manifests under one
savepoint directory; restoring reads the union, so any later parallelism can restore it.

``manifest.json`` (``"format": 1``)::

    {"format": 1, "kind": "checkpoint" | "savepoint", "id": "...",
     "createdAt": "2026-01-01T00:00:00.000Z", "createdAtMs": 1767225600000,
     "weirVersion": "0.1.0", "job": {"namespace": "...", "name": "..."},
     "worker": {"index": 0, "workers": 2}, "filesRelativeTo": "job" | "manifest",
     "partitions": {"orders/0": {"offset": 42, "watermark": 1700000000000, "progress": {...},
                                 "format": "rocksdb-checkpoint" | "sst-export", "entries": null | 7,
                                 "files": [{"name": "000012.sst", "key": "shared/orders-0/<sha>-000012.sst",
                                            "size": 1234, "sha256": "..."}]}},
     "totals": {"bytes": 1234, "files": 1}}

A file's ``key`` is relative to the job directory (checkpoints) or to the manifest's own
directory (savepoints, so the directory can be copied anywhere).

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
S3 client. ``weir checkpoints ls|inspect`` are ``cli_ls`` / ``cli_inspect``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from weir import __version__, state
from weir.objectstores import (
    CHUNK,
    Backend,
    CheckpointError,
    FileBackend,
    MemoryBackend,
    NotFound,
    ObjectInfo,
    S3Backend,
    S3Settings,
    StoreRefused,
    job_url,
    join_key,
    join_url,
    norm_key,
    open_backend,
    parent_key,
    split_url,
)

__all__ = [
    "FORMAT",
    "Backend",
    "CheckpointError",
    "CheckpointStore",
    "CorruptCheckpoint",
    "FileBackend",
    "FileEntry",
    "Manifest",
    "MemoryBackend",
    "NotFound",
    "ObjectInfo",
    "PartitionEntry",
    "PartitionSnapshot",
    "S3Backend",
    "S3Settings",
    "Scan",
    "StoreReader",
    "StoreRefused",
    "WriteResult",
    "checkpoint_id",
    "parse_checkpoint_id",
]

log = logging.getLogger(__name__)

FORMAT = 1
"""The manifest format this weir writes and the newest it reads."""

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
SAVEPOINTS = "savepoints"
SHARED = "shared"
FORMAT_CHECKPOINT = "rocksdb-checkpoint"
FORMAT_EXPORT = "sst-export"

# RocksDB files that never change once written (named by a file number that is never
# reused within a database): they can be shared between checkpoints.
_IMMUTABLE_SUFFIXES = (".sst", ".blob")
# Checkpoint ids sort by sequence number first, so a listing is in order per worker.
_ID = re.compile(r"^(\d{10})-w(\d+)$")
_PARTITION = re.compile(r"^([^/]+)/(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# -- errors -------------------------------------------------------------------------------
class CorruptCheckpoint(CheckpointError):
    """A checkpoint or savepoint cannot be used: a file is missing or differs, or its manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- ids ----------------------------------------------------------------------------------
def checkpoint_id(seq: int, worker_index: int) -> str:
    """The id of worker ``worker_index``'s checkpoint number ``seq``: ``"0000000012-w1"``."""
    if seq < 0 or worker_index < 0:
        raise CheckpointError(f"checkpoint seq and worker index must be >= 0, got {seq}, {worker_index}")
    return f"{seq:010d}-w{worker_index}"


def parse_checkpoint_id(cid: str) -> tuple[int, int] | None:
    """``(seq, worker_index)`` of a checkpoint id, or None for an id of another form."""
    m = _ID.match(cid)
    return (int(m.group(1)), int(m.group(2))) if m else None


def partition_dir(partition: str) -> str:
    """``"orders/3"`` -> ``"orders-3"``: unambiguous, since the partition number is last."""
    m = _PARTITION.match(partition)
    if m is None or not _NAME.match(m.group(1)):
        raise CheckpointError(f"partition {partition!r} is not of the form '<topic>/<partition number>'")
    return f"{m.group(1)}-{int(m.group(2))}"


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise CheckpointError(
            f"{what} {value!r} must be non-empty and use only letters, digits, '.', '_' and '-'"
        )
    return value


# -- manifests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    name: str
    """The file's name in the restored directory."""
    key: str
    """Its store key, relative to the manifest's ``files_base`` (see ``Manifest``)."""
    size: int
    sha256: str


@dataclass(frozen=True)
class PartitionEntry:
    offset: int
    """The next input offset to read: the state holds every record before it, none after."""
    watermark: int | None
    progress: Mapping[str, Any]
    format: str
    """``rocksdb-checkpoint`` (a database directory) or ``sst-export`` (one SST to ingest)."""
    files: tuple[FileEntry, ...]
    entries: int | None = None
    """Number of entries (savepoints only)."""

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Manifest:
    kind: str
    id: str
    created_ms: int
    weir_version: str
    namespace: str
    job: str
    worker_index: int
    workers: int
    partitions: Mapping[str, PartitionEntry]
    files_relative_to: str
    url: str = ""
    """Where this manifest's directory is (set when read from or written to a store)."""

    @property
    def seq(self) -> int:
        parsed = parse_checkpoint_id(self.id)
        return parsed[0] if parsed else -1

    @property
    def created_iso(self) -> str:
        return _iso(self.created_ms)

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.partitions.values())

    @property
    def total_files(self) -> int:
        return sum(len(p.files) for p in self.partitions.values())

    @property
    def files_base(self) -> str:
        """The URL file keys are relative to: the job directory or the manifest's directory."""
        if self.files_relative_to == "job":
            scheme, bucket, key = split_url(self.url)
            return join_url(scheme, bucket, parent_key(key, 2))
        return self.url

    def file_url(self, entry: FileEntry) -> str:
        scheme, bucket, key = split_url(self.files_base)
        return join_url(scheme, bucket, join_key(key, entry.key))

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "kind": self.kind,
            "id": self.id,
            "createdAt": self.created_iso,
            "createdAtMs": self.created_ms,
            "weirVersion": self.weir_version,
            "job": {"namespace": self.namespace, "name": self.job},
            "worker": {"index": self.worker_index, "workers": self.workers},
            "filesRelativeTo": self.files_relative_to,
            "partitions": {
                name: {
                    "offset": p.offset,
                    "watermark": p.watermark,
                    "progress": dict(p.progress),
                    "format": p.format,
                    "entries": p.entries,
                    "files": [
                        {"name": f.name, "key": f.key, "size": f.size, "sha256": f.sha256} for f in p.files
                    ],
                }
                for name, p in sorted(self.partitions.items())
            },
            "totals": {"bytes": self.total_bytes, "files": self.total_files},
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes, url: str) -> Manifest:
        """Parse a manifest; anything unreadable raises ``CorruptCheckpoint`` naming the field."""
        where = f"{url}/{MANIFEST}"
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise CorruptCheckpoint(f"{where}: not JSON ({exc})") from exc
        try:
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            fmt = doc["format"]
            if not isinstance(fmt, int) or fmt < 1 or fmt > FORMAT:
                raise CorruptCheckpoint(
                    f"{where}: manifest format {fmt!r} is not supported by weir {__version__} "
                    f"(reads formats 1..{FORMAT})"
                )
            partitions = {}
            for name, p in doc["partitions"].items():
                files = tuple(
                    FileEntry(str(f["name"]), str(f["key"]), int(f["size"]), str(f["sha256"]))
                    for f in p["files"]
                )
                for f in files:
                    norm_key(f.key)  # refuses '..': a manifest may not point outside its store
                    if "/" in f.name or f.name in ("", ".", ".."):
                        raise ValueError(f"file name {f.name!r} in partition {name}")
                wm = p.get("watermark")
                partitions[str(name)] = PartitionEntry(
                    offset=int(p["offset"]),
                    watermark=None if wm is None else int(wm),
                    progress=dict(p.get("progress") or {}),
                    format=str(p["format"]),
                    files=files,
                    entries=None if p.get("entries") is None else int(p["entries"]),
                )
            return cls(
                kind=str(doc["kind"]),
                id=str(doc["id"]),
                created_ms=int(doc["createdAtMs"]),
                weir_version=str(doc.get("weirVersion", "")),
                namespace=str(doc["job"]["namespace"]),
                job=str(doc["job"]["name"]),
                worker_index=int(doc["worker"]["index"]),
                workers=int(doc["worker"]["workers"]),
                partitions=partitions,
                files_relative_to=str(doc["filesRelativeTo"]),
                url=url,
            )
        except CorruptCheckpoint:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, CheckpointError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(frozen=True)
class PartitionSnapshot:
    """What the caller hands over for one partition."""

    path: Path
    """A RocksDB checkpoint directory (``PartitionStore.checkpoint``). For a savepoint it may
    also be an SST file from ``state.export_sst``."""
    offset: int
    watermark: int | None = None
    progress: Mapping[str, Any] = field(default_factory=dict)
    """Anything else to record (e.g. upstream watermarks); must be JSON-serialisable."""


@dataclass(frozen=True)
class WriteResult:
    manifest: Manifest
    url: str
    """The checkpoint's directory; for a savepoint the savepoint directory (all workers)."""
    bytes_total: int
    """Sum of the sizes of every file the manifest references."""
    bytes_uploaded: int
    """What this write uploaded (new files, metadata files and the manifest)."""
    files_uploaded: int
    seconds: float
    existing: bool = False
    """True when a savepoint with this id was already complete: nothing was written."""


@dataclass
class Scan:
    """What a listing found: complete manifests (newest first), and what could not be used."""

    manifests: list[Manifest]
    unreadable: list[CorruptCheckpoint]
    incomplete: list[str]
    """Directories without a manifest (in progress, or abandoned by a failed write)."""


# -- reading ----------------------------------------------------------------------------------
class StoreReader:
    """Reads manifests and restores partitions from any store URL (no job needed)."""

    def __init__(self, s3: S3Settings | None = None, backends: Iterable[Backend] = ()) -> None:
        self._s3 = s3
        self._backends: dict[tuple[str, str], Backend] = {(b.scheme, b.bucket): b for b in backends}
        # Manifests never change once written: parsed ones are kept by URL.
        self._manifest_cache: dict[str, Manifest] = {}

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

    def _resolve(self, url: str) -> tuple[Backend, str]:
        scheme, bucket, key = split_url(url)
        backend = self._backends.get((scheme, bucket))
        if backend is None:
            backend = open_backend(scheme, bucket, self._s3)
            self._backends[(scheme, bucket)] = backend
        return backend, key

    # manifests
    def read_manifest(self, dir_url: str) -> Manifest:
        """The manifest in the directory ``dir_url``; ``NotFound`` when it has none."""
        dir_url = dir_url.rstrip("/")
        cached = self._manifest_cache.get(dir_url)
        if cached is not None:
            return cached
        backend, key = self._resolve(dir_url)
        manifest = Manifest.from_json(backend.get_bytes(join_key(key, MANIFEST)), dir_url)
        self._manifest_cache[dir_url] = manifest
        return manifest

    def scan(self, url: str, max_depth: int | None = None) -> Scan:
        """Every manifest below ``url`` (at most ``max_depth`` directories down), newest first."""
        backend, key = self._resolve(url)
        prefix = key + "/" if key else ""
        tops: set[str] = set()
        complete: list[str] = []
        for obj in backend.list(prefix):
            rel = obj.key[len(prefix) :]
            parent = parent_key(rel)
            if parent:
                tops.add(parent.partition("/")[0])
            depth = parent.count("/") + 1 if parent else 0
            if (rel == MANIFEST or rel.endswith("/" + MANIFEST)) and (
                max_depth is None or depth <= max_depth
            ):
                complete.append(parent)
        scheme, bucket, _ = split_url(url)
        manifests: list[Manifest] = []
        unreadable: list[CorruptCheckpoint] = []
        for rel in complete:
            try:
                manifests.append(self.read_manifest(join_url(scheme, bucket, join_key(key, rel))))
            except NotFound:
                continue  # deleted since the listing
            except CorruptCheckpoint as exc:
                unreadable.append(exc)
        # A top-level directory with no manifest anywhere in it: an unfinished write.
        incomplete = sorted(tops - {c.partition("/")[0] for c in complete})
        manifests.sort(key=lambda m: (m.created_ms, m.seq, m.id, m.worker_index), reverse=True)
        return Scan(manifests, unreadable, incomplete)

    def read_savepoint(self, url: str) -> list[Manifest]:
        """The manifests of a savepoint: ``url`` is a savepoint directory (every worker's
        manifest below it) or one worker's directory. Raises ``CorruptCheckpoint`` when one is
        unreadable or none is there, or two claim the same partition."""
        url = url.rstrip("/")
        manifests = self.manifests_at(url)
        if not manifests:
            raise CorruptCheckpoint(f"{url}: no {MANIFEST} in it or in a directory below it")
        owners: dict[str, str] = {}
        for m in manifests:
            for p in m.partitions:
                if p in owners:
                    raise CorruptCheckpoint(f"{url}: partition {p} is in both {owners[p]} and {m.url}")
                owners[p] = m.url
        return manifests

    def manifests_at(self, url: str) -> list[Manifest]:
        """The manifest in directory ``url``, else those one directory below it (a savepoint's
        workers), else none. An unreadable one raises ``CorruptCheckpoint``."""
        url = url.rstrip("/")
        try:
            return [self.read_manifest(url)]
        except NotFound:
            pass
        found = self.scan(url, max_depth=1)
        if found.unreadable:
            raise found.unreadable[0]
        return found.manifests

    # files
    def _entry(self, manifest: Manifest, partition: str) -> PartitionEntry:
        entry = manifest.partitions.get(partition)
        if entry is None:
            raise CheckpointError(
                f"{manifest.url} has no partition {partition!r} "
                f"(it has {', '.join(manifest.partitions) or 'none'})"
            )
        return entry

    def fetch(self, manifest: Manifest, partition: str, dest_dir: Path) -> Path:
        """Download ``partition``'s files into ``dest_dir`` (created; must be empty), checking each
        file's size and sha256. A missing or different file raises ``CorruptCheckpoint``."""
        entry = self._entry(manifest, partition)
        dest_dir.mkdir(parents=True, exist_ok=True)
        if any(dest_dir.iterdir()):
            raise CheckpointError(f"fetch target {dest_dir} is not empty")
        for f in entry.files:
            url = manifest.file_url(f)
            backend, key = self._resolve(url)
            target = dest_dir / f.name
            try:
                backend.get_file(key, target)
            except NotFound as exc:
                raise CorruptCheckpoint(f"{url}: missing (listed in {manifest.url}/{MANIFEST})") from exc
            size = target.stat().st_size
            if size != f.size:
                raise CorruptCheckpoint(f"{url}: size {size} bytes, manifest says {f.size}")
            digest = _sha256_file(target)
            if digest != f.sha256:
                raise CorruptCheckpoint(f"{url}: sha256 {digest}, manifest says {f.sha256}")
        return dest_dir

    def restore(self, manifest: Manifest, partition: str, db_dir: Path) -> Path:
        """Make ``db_dir`` a RocksDB database holding ``partition``'s state from ``manifest``,
        ready for ``PartitionStore(db_dir, ...)``.

        Everything is downloaded and verified next to ``db_dir`` first; only then is an
        existing ``db_dir`` replaced, so a failed restore leaves it as it was.
        """
        entry = self._entry(manifest, partition)
        db_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{db_dir.name}.restore-", dir=db_dir.parent))
        try:
            files = self.fetch(manifest, partition, work / "files")
            if entry.format == FORMAT_CHECKPOINT:
                ready = files
            elif entry.format == FORMAT_EXPORT:
                ready = work / "db"
                ssts = [files / f.name for f in entry.files]
                if len(ssts) > 1:
                    raise CorruptCheckpoint(
                        f"{manifest.url}: partition {partition} has {len(ssts)} export files"
                    )
                state.import_sst(ready, ssts[0] if ssts else None)
            else:
                raise CorruptCheckpoint(
                    f"{manifest.url}: partition {partition} has unknown format {entry.format!r}"
                )
            if db_dir.exists():
                shutil.rmtree(db_dir)
            os.replace(ready, db_dir)
            return db_dir
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def verify(self, manifest: Manifest, partitions: Iterable[str] | None = None) -> list[str]:
        """Check every file's presence, size and sha256 without keeping a copy; returns the
        problems found (empty: intact). Store failures raise ``CheckpointError``."""
        problems: list[str] = []
        names = list(manifest.partitions) if partitions is None else list(partitions)
        for name in names:
            for f in self._entry(manifest, name).files:
                url = manifest.file_url(f)
                backend, key = self._resolve(url)
                h = hashlib.sha256()
                size = 0
                try:
                    for chunk in backend.read_chunks(key):
                        h.update(chunk)
                        size += len(chunk)
                except NotFound:
                    problems.append(f"{url}: missing")
                    continue
                if size != f.size:
                    problems.append(f"{url}: size {size} bytes, manifest says {f.size}")
                elif h.hexdigest() != f.sha256:
                    problems.append(f"{url}: sha256 {h.hexdigest()}, manifest says {f.sha256}")
        return problems


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        self.namespace = _check_name("namespace", namespace)
        self.job = _check_name("job name", job)
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
        self, checkpoint_id: str, worker: tuple[int, int], partitions: Mapping[str, PartitionSnapshot]
    ) -> WriteResult:
        """Upload the partitions' RocksDB checkpoint directories and then the manifest.

        SST/blob files already in the shared area are not uploaded again. Until the manifest is
        written the checkpoint does not exist for readers; a failure leaves only unreferenced
        files, which ``retain`` removes. The local directories are left for the caller.
        """
        t0 = time.monotonic()
        _check_name("checkpoint id", checkpoint_id)
        index, count = self._check_worker(worker)
        uploaded = [0, 0]
        entries: dict[str, PartitionEntry] = {}
        for name, snap in sorted(partitions.items()):
            pdir = partition_dir(name)
            if not snap.path.is_dir():
                raise CheckpointError(f"partition {name}: {snap.path} is not a RocksDB checkpoint directory")
            present = self._present_keys(pdir)
            files: list[FileEntry] = []
            for path in sorted(p for p in snap.path.iterdir() if p.is_file()):
                size, digest = self._digest(path)
                if path.name.endswith(_IMMUTABLE_SUFFIXES):
                    rel = join_key(SHARED, pdir, f"{digest}-{path.name}")
                    if rel not in present:
                        self._put_file(rel, path, size, uploaded)
                        present.add(rel)
                else:
                    rel = join_key(CHECKPOINTS, checkpoint_id, pdir, path.name)
                    self._put_file(rel, path, size, uploaded)
                files.append(FileEntry(path.name, rel, size, digest))
            entries[name] = PartitionEntry(
                snap.offset, snap.watermark, dict(snap.progress), FORMAT_CHECKPOINT, tuple(files)
            )
        self._forget_digests_except(partitions.values())
        manifest = self._manifest(
            "checkpoint", checkpoint_id, index, count, entries, "job", self._url(CHECKPOINTS, checkpoint_id)
        )
        data = _encode(manifest)
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
    ) -> WriteResult:
        """Export each partition to one SST file and upload it with a manifest of kind savepoint
        to ``<path or <job>/savepoints>/<savepoint_id>/w<index>/``.

        Idempotent: when that manifest already exists nothing is written and the existing
        savepoint is returned (``existing=True``).
        """
        t0 = time.monotonic()
        _check_name("savepoint id", savepoint_id)
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
                    sst, n = snap.path, 0  # a partition without state (a repartitioning stage's input)
                elif snap.path.is_dir():
                    sst = Path(tmp) / f"{pdir}.sst"
                    n = state.export_sst(snap.path, sst)
                elif snap.path.is_file():
                    sst, n = snap.path, None
                else:
                    raise CheckpointError(f"partition {name}: {snap.path} does not exist")
                files: tuple[FileEntry, ...] = ()
                if n != 0:
                    size, digest = _sha256_size(sst)
                    rel = f"{pdir}.sst"
                    _put_counted(backend, join_key(dir_key, rel), sst, size, uploaded)
                    files = (FileEntry(rel, rel, size, digest),)
                entries[name] = PartitionEntry(
                    snap.offset, snap.watermark, dict(snap.progress), FORMAT_EXPORT, files, n
                )
        manifest = self._manifest("savepoint", savepoint_id, index, count, entries, "manifest", dir_url)
        data = _encode(manifest)
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
        self,
        kind: str,
        mid: str,
        index: int,
        count: int,
        entries: dict[str, PartitionEntry],
        rel: str,
        url: str,
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
            partitions=entries,
            files_relative_to=rel,
            url=url,
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

    def _digest(self, path: Path) -> tuple[int, str]:
        st = path.stat()
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, path.name)
        digest = self._digests.get(ident)
        if digest is None:
            digest = _sha256_file(path)
            self._digests[ident] = digest
        return st.st_size, digest

    def _forget_digests_except(self, snaps: Iterable[PartitionSnapshot]) -> None:
        live: set[tuple[int, int, int, int, str]] = set()
        for snap in snaps:
            for p in snap.path.iterdir():
                with contextlib.suppress(OSError):
                    st = p.stat()
                    live.add((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, p.name))
        self._digests = {k: v for k, v in self._digests.items() if k in live}

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


def _encode(manifest: Manifest) -> bytes:
    try:
        return manifest.to_json()
    except TypeError as exc:
        raise CheckpointError(
            f"{manifest.url}: a partition's progress is not JSON-serialisable: {exc}"
        ) from exc


def _join_url(url: str, *parts: str) -> str:
    scheme, bucket, key = split_url(url)
    return join_url(scheme, bucket, join_key(key, *parts))


def _sha256_size(path: Path) -> tuple[int, str]:
    return path.stat().st_size, _sha256_file(path)


def _put_counted(backend: Backend, key: str, path: Path, size: int, counter: list[int]) -> None:
    backend.put_file(key, path)
    counter[0] += size
    counter[1] += 1


# -- the `weir checkpoints` command -------------------------------------------------------------
EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2


def add_cli(sub: Any) -> None:
    """Register ``weir checkpoints ls|inspect`` on the ``weir`` command's subparsers."""
    cp = sub.add_parser(
        "checkpoints",
        help="list and inspect checkpoints and savepoints in a store",
        description="List and inspect checkpoints and savepoints in a file:// or s3:// store. S3 "
        "credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL_S3 or WEIR_S3_ENDPOINT).",
    )
    cmds = cp.add_subparsers(dest="checkpoints_command", required=True, metavar="ls|inspect")
    ls = cmds.add_parser(
        "ls",
        help="table of the checkpoints and savepoints under a URL",
        description="List every checkpoint and savepoint manifest under URL (a store root, "
        "<store>/<namespace>/<job>, or anything below), newest first.",
    )
    ls.add_argument("url", help="file:///path or s3://bucket/prefix")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect = cmds.add_parser(
        "inspect",
        help="show one checkpoint or savepoint: partitions, offsets, watermarks, files",
        description="Show the checkpoint or savepoint at URL (its directory; for a savepoint "
        "taken by several workers the savepoint directory shows them all).",
        epilog="exit codes: 0 ok, 1 corrupt (with --verify) or store unreachable, 2 nothing at URL",
    )
    inspect.add_argument("url", help="the checkpoint's or savepoint's directory")
    inspect.add_argument("--json", action="store_true", help="print the manifest(s) as JSON")
    inspect.add_argument(
        "--verify", action="store_true", help="download every file and check its size and sha256"
    )


def run_cli(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``weir checkpoints ...``; S3 settings come from the environment."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with StoreReader(S3Settings.from_env()) as reader:
            if args.checkpoints_command == "ls":
                return cli_ls(reader, args.url, args.json, out, err)
            return cli_inspect(reader, args.url, args.json, args.verify, out, err)
    except CorruptCheckpoint as exc:
        print(f"corrupt: {exc}", file=err)
        return EXIT_CORRUPT
    except CheckpointError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_CORRUPT


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "kind": m.kind,
        "id": m.id,
        "url": m.url,
        "createdAt": m.created_iso,
        "createdAtMs": m.created_ms,
        "job": f"{m.namespace}/{m.job}",
        "worker": m.worker_index,
        "workers": m.workers,
        "partitions": sorted(m.partitions),
        "bytes": m.total_bytes,
        "files": m.total_files,
        "weirVersion": m.weir_version,
    }


def cli_ls(reader: StoreReader, url: str, as_json: bool, out: IO[str], err: IO[str]) -> int:
    found = reader.scan(url.rstrip("/"))
    for problem in found.unreadable:
        print(f"warning: {problem}", file=err)
    if as_json:
        doc = {
            "manifests": [_summary(m) for m in found.manifests],
            "unreadable": [str(p) for p in found.unreadable],
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    if not found.manifests:
        print(f"no checkpoints or savepoints under {url}", file=out)
        return EXIT_OK
    rows = [["KIND", "ID", "CREATED", "JOB", "WORKER", "PARTITIONS", "FILES", "SIZE"]]
    for m in found.manifests:
        rows.append(
            [
                m.kind,
                m.id,
                m.created_iso,
                f"{m.namespace}/{m.job}",
                f"{m.worker_index}/{m.workers}",
                str(len(m.partitions)),
                str(m.total_files),
                _size(m.total_bytes),
            ]
        )
    _table(rows, out)
    return EXIT_OK


def cli_inspect(
    reader: StoreReader, url: str, as_json: bool, verify: bool, out: IO[str], err: IO[str]
) -> int:
    url = url.rstrip("/")
    manifests = reader.manifests_at(url)  # a checkpoint, one worker's savepoint, or all its workers
    if not manifests:
        print(f"error: no {MANIFEST} in {url} or in a directory below it", file=err)
        return EXIT_USAGE
    problems: dict[str, list[str]] = {}
    if verify:
        for m in manifests:
            problems[m.url] = reader.verify(m)
    if as_json:
        docs = []
        for m in manifests:
            doc = orjson.loads(m.to_json())
            doc["url"] = m.url
            if verify:
                doc["verify"] = {"ok": not problems[m.url], "problems": problems[m.url]}
            docs.append(doc)
        out.write(orjson.dumps(docs, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        buf = io.StringIO()
        for m in manifests:
            _print_manifest(m, buf)
            if verify:
                if problems[m.url]:
                    print(f"  verify: {len(problems[m.url])} problem(s)", file=buf)
                    for p in problems[m.url]:
                        print(f"    {p}", file=buf)
                else:
                    print(f"  verify: ok ({m.total_files} files, {_size(m.total_bytes)})", file=buf)
        out.write(buf.getvalue())
    return EXIT_CORRUPT if any(problems.values()) else EXIT_OK


def _print_manifest(m: Manifest, out: IO[str]) -> None:
    print(f"{m.kind} {m.id}  job {m.namespace}/{m.job}  worker {m.worker_index}/{m.workers}", file=out)
    print(f"  url: {m.url}", file=out)
    print(
        f"  created: {m.created_iso}  weir {m.weir_version}  {m.total_files} files, {_size(m.total_bytes)}",
        file=out,
    )
    rows = [["PARTITION", "OFFSET", "WATERMARK", "FILES", "SIZE"]]
    for name, p in sorted(m.partitions.items()):
        wm = "-" if p.watermark is None else f"{p.watermark} ({_iso(p.watermark)})"
        rows.append([name, str(p.offset), wm, str(len(p.files)), _size(p.bytes)])
    buf = io.StringIO()
    _table(rows, buf)
    for line in buf.getvalue().splitlines():
        print("  " + line, file=out)
    for name, p in sorted(m.partitions.items()):
        print(f"  {name} files ({p.format}):", file=out)
        for f in p.files:
            print(f"    {f.key}  {f.size} B  sha256 {f.sha256[:16]}", file=out)
