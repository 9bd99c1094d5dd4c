"""Reading checkpoints and savepoints from any store URL: listing, verifying and restoring.

``StoreReader`` needs no job: ``weir checkpoints`` and restores from a savepoint URL use it
directly; ``weir.checkpoint.CheckpointStore`` (one job's writer) extends it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from weir import state_sst
from weir.checkpoint_manifest import (
    FORMAT_CHECKPOINT,
    FORMAT_EXPORT,
    MANIFEST,
    CorruptCheckpoint,
    Manifest,
    PartitionEntry,
)
from weir.objectstores import (
    CHUNK,
    Backend,
    CheckpointError,
    NotFound,
    S3Settings,
    join_key,
    join_url,
    open_backend,
    parent_key,
    split_url,
)


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
            digest = sha256_file(target)
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
                try:
                    state_sst.import_parts(ready, [files / f.name for f in entry.files])
                except ValueError as exc:
                    raise CorruptCheckpoint(f"{manifest.url}: partition {partition}: {exc}") from None
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()

