"""Checkpoint and savepoint manifests: the store layout, ``manifest.json`` and checkpoint ids.

Layout (``<store>`` is the store URL, e.g. ``s3://bucket/prefix`` or ``file:///var/weir``)::

    <store>/<namespace>/<job>/checkpoints/<id>/manifest.json         written last: presence = complete
    <store>/<namespace>/<job>/checkpoints/<id>/<topic>-<p>/CURRENT    small mutable RocksDB files
    <store>/<namespace>/<job>/shared/<topic>-<p>/<sha256>-000123.sst  immutable files, shared by checkpoints
    <store>/<namespace>/<job>/savepoints/<id>/w<index>/manifest.json  one manifest per worker
    <store>/<namespace>/<job>/savepoints/<id>/w<index>/<topic>-<p>.sst

``manifest.json`` (``"format": 1``)::

    {"format": 1, "kind": "checkpoint" | "savepoint", "id": "...",
     "createdAt": "2026-01-01T00:00:00.000Z", "createdAtMs": 1767225600000,
     "weirVersion": "0.1.0", "job": {"namespace": "...", "name": "..."},
     "worker": {"index": 0, "workers": 2}, "filesRelativeTo": "job" | "manifest",
     "partitions": {"orders/0": {"offset": 42, "watermark": 1700000000000, "progress": {...},
                                 "format": "rocksdb-checkpoint" | "sst-export", "entries": null | 7,
                                 "files": [{"name": "000012.sst", "key": "shared/orders-0/<sha>-000012.sst",
                                            "size": 1234, "sha256": "..."}]}},
     "totals": {"bytes": 1234, "files": 1},
     "stateShape": {...}}

``stateShape`` is ``weir.state_shape.StateShape.to_json()`` of the pipeline that wrote the
snapshot: a restore compares it with its own pipeline's before loading the state
(``weir.commit``). Manifests written before weir recorded it have none and are taken as
matching.

A file's ``key`` is relative to the job directory (checkpoints) or to the manifest's own
directory (savepoints, so the directory can be copied anywhere).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from weir import __version__
from weir.objectstores import CheckpointError, join_key, join_url, norm_key, parent_key, split_url

FORMAT = 1
"""The manifest format this weir writes and the newest it reads."""

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
SAVEPOINTS = "savepoints"
SHARED = "shared"
FORMAT_CHECKPOINT = "rocksdb-checkpoint"
FORMAT_EXPORT = "sst-export"

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


def check_name(what: str, value: str) -> str:
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
    state_shape: Mapping[str, Any] | None = None
    """``stateShape``: the writing pipeline's ``StateShape.to_json()``, None in older manifests."""

    @property
    def seq(self) -> int:
        parsed = parse_checkpoint_id(self.id)
        return parsed[0] if parsed else -1

    @property
    def created_iso(self) -> str:
        return iso_ms(self.created_ms)

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
        if self.state_shape is not None:
            doc["stateShape"] = dict(self.state_shape)
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
                state_shape=_state_shape(doc.get("stateShape")),
            )
        except CorruptCheckpoint:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, CheckpointError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _state_shape(value: Any) -> Mapping[str, Any] | None:
    # Parsed into a StateShape by the reader that compares it: a manifest stays readable (its
    # files listable and deletable) even when its shape is from a newer, unknown weir.
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"stateShape is {type(value).__name__}, not an object")
    return value


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(frozen=True)
class PartitionSnapshot:
    """What the caller hands over for one partition."""

    path: Path
    """A RocksDB checkpoint directory (``PartitionStore.checkpoint``). For a savepoint it may
    also be an SST file from ``state_sst.export_sst``."""
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


def encode_manifest(manifest: Manifest) -> bytes:
    try:
        return manifest.to_json()
    except TypeError as exc:
        raise CheckpointError(
            f"{manifest.url}: a partition's progress is not JSON-serialisable: {exc}"
        ) from exc

