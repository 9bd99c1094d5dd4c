"""Where checkpoints are kept: objects under string keys in a file system, S3 or memory.

One small interface (``Backend``) with three implementations: ``FileBackend`` (atomic writes
through a temporary file, fsync and rename), ``weir.s3_backend.S3Backend`` (one boto3 client,
path-style addressing, the transfer manager for large files, short timeouts and few retries)
and ``MemoryBackend`` (for tests). Store URLs are ``file:///path``, ``s3://bucket/prefix`` and
``memory://bucket/prefix``; ``split_url`` turns one into (scheme, bucket, key).

The errors live here because backends raise them; ``weir.checkpoint`` exports them too::

    CheckpointError        a store is unreachable, a write failed, a URL is unusable
    ├── NotFound           no object under the key (a read)
    └── StoreRefused       the store answered and refuses: wrong credentials, no such bucket,
                           wrong region. Retrying does not help; a starting worker exits with it.

Every other ``CheckpointError`` of a backend is worth retrying (the store is unreachable or
failed a request), which is what a worker does during an outage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = [
    "Backend",
    "CheckpointError",
    "FileBackend",
    "MemoryBackend",
    "NotFound",
    "ObjectInfo",
    "S3Settings",
    "StoreRefused",
    "job_url",
    "join_key",
    "join_url",
    "norm_key",
    "open_backend",
    "parent_key",
    "split_url",
]

CHUNK = 1 << 20
"""Read and hash in 1 MiB pieces."""


class CheckpointError(Exception):
    """A store is unreachable, a write failed, or a URL or argument is unusable."""


class NotFound(CheckpointError):
    """A backend has no object under the key (raised by ``Backend.get_*`` and ``read_chunks``)."""


class StoreRefused(CheckpointError):
    """The store answered and refused the request for a reason the user must fix (credentials,
    bucket, region, permissions): not an outage, so not retried at start-up."""


# -- settings -----------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store. Unset fields fall back to boto3's own resolution."""

    endpoint_url: str | None = None
    """e.g. ``http://minio:9000``; None: AWS (or boto3's ``AWS_ENDPOINT_URL*`` handling)."""
    region: str | None = None
    """Signing region; None: boto3's default chain, else ``us-east-1``."""
    access_key_id: str | None = field(default=None, repr=False)
    """With ``secret_access_key``; None: boto3's credential chain (env, profile, IRSA, ...)."""
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    path_style: bool = True
    """Path-style addressing (``http://host/bucket/key``), what S3-compatible servers expect."""
    connect_timeout_s: float = 3.0
    """Short, so an unreachable store fails a checkpoint quickly; the worker retries the whole
    checkpoint, which is cheaper than blocking on a dead connection."""
    read_timeout_s: float = 30.0
    """Per socket read; a part upload or download that stalls this long fails."""
    max_attempts: int = 2
    """Attempts per request (botocore's standard retry mode), including the first."""
    multipart_threshold_bytes: int = 64 << 20
    """Files at least this big go up and down in parts through boto3's transfer manager."""
    multipart_chunk_bytes: int = 16 << 20
    """Part size (S3's minimum is 5 MiB)."""
    max_concurrency: int = 4
    """Parallel part transfers per file."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
        """Read ``WEIR_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``
        (``AWS_DEFAULT_REGION``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
        ``AWS_SESSION_TOKEN``; keyword arguments win over the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "endpoint_url": env.get("WEIR_S3_ENDPOINT")
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            "access_key_id": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY") or None,
            "session_token": env.get("AWS_SESSION_TOKEN") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# -- URLs -----------------------------------------------------------------------------------
def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of a store URL; a file URL's "bucket" is empty, its key the path
    without the leading slash. A bare absolute path means ``file://``."""
    if url.startswith("/"):
        url = "file://" + url
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise CheckpointError(f"store URL {url!r} must start with file:/// or s3://")
    if scheme == "file":
        if not rest.startswith("/"):
            raise CheckpointError(f"file URL {url!r} must hold an absolute path: file:///path/to/store")
        return "file", "", norm_key(rest)
    if scheme in ("s3", "memory"):
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise CheckpointError(f"store URL {url!r} names no bucket: {scheme}://bucket/prefix")
        return scheme, bucket, norm_key(key)
    raise CheckpointError(f"store URL {url!r} must start with file:/// or s3://")


def join_url(scheme: str, bucket: str, key: str) -> str:
    if scheme == "file":
        return f"file:///{key}"
    return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"


def job_url(url: str, namespace: str, job: str) -> str:
    """A job's directory in the store at ``url``: ``<url>/<namespace>/<job>``, normalised."""
    scheme, bucket, key = split_url(url)
    return join_url(scheme, bucket, join_key(key, namespace, job))


def norm_key(key: str) -> str:
    parts = [p for p in key.split("/") if p and p != "."]
    if ".." in parts:
        raise CheckpointError(f"store path {key!r} may not contain '..'")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def parent_key(key: str, levels: int = 1) -> str:
    for _ in range(levels):
        key = key.rpartition("/")[0]
    return key


# -- backends -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Backend(Protocol):
    """Objects under string keys ('/'-separated) in one bucket or file system.

    Writes are atomic (an object is either absent or complete). Failures raise
    ``CheckpointError`` naming the key; a missing object on read raises ``NotFound``.
    """

    scheme: str
    bucket: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def read_chunks(self, key: str) -> Iterator[bytes]: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursively)."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete the objects; absent ones are not an error."""
        ...

    def close(self) -> None: ...


_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES})
"""Why a hard link can fail where a copy would not: another file system, or one without links."""


def _sync_dir(path: Path) -> None:
    """Make the names created in (or renamed into) directory ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileBackend:
    """A local (or mounted) file system: keys are paths below ``/``; writes go to a temporary
    file in the target directory, are fsynced and renamed into place."""

    scheme = "file"
    bucket = ""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def _atomic(self, key: str) -> Iterator[IO[bytes]]:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as fh:
                try:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                except BaseException:
                    fh.close()
                    tmp.unlink(missing_ok=True)
                    raise
            os.replace(tmp, target)
            _sync_dir(target.parent)  # the rename itself is durable only once its directory is
        except OSError as exc:
            raise CheckpointError(f"writing {target} failed: {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key) as fh:
            fh.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with self._atomic(key) as fh, open(path, "rb") as src:
            shutil.copyfileobj(src, fh, CHUNK)

    def put_synced_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """Store files whose contents are already synced and never change again (a RocksDB
        checkpoint's: its SST files are synced when RocksDB writes them, its metadata files
        when the checkpoint copies them). Each is hard-linked into place when it is on the
        same file system (no bytes moved), else copied and synced; every directory written
        into is synced once at the end, so all are durable when this returns."""
        dirs: dict[Path, None] = {}
        for key, path in items:
            target = self._path(key)
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                if target.parent not in dirs:
                    target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, tmp)
                except OSError as exc:
                    if exc.errno not in _NO_LINK:
                        raise
                    with open(tmp, "wb") as fh, open(path, "rb") as src:
                        shutil.copyfileobj(src, fh, CHUNK)
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise CheckpointError(f"writing {target} failed: {exc}") from exc
            dirs[target.parent] = None
        for d in dirs:
            try:
                _sync_dir(d)
            except OSError as exc:
                raise CheckpointError(f"syncing {d} failed: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"{self._path(key)} does not exist") from exc
        except OSError as exc:
            raise CheckpointError(f"reading {self._path(key)} failed: {exc}") from exc

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError as exc:
            if not self._path(key).exists():
                raise NotFound(f"{self._path(key)} does not exist") from exc
            raise CheckpointError(f"copying {self._path(key)} to {path} failed: {exc}") from exc
        except OSError as exc:
            raise CheckpointError(f"copying {self._path(key)} to {path} failed: {exc}") from exc

    def read_chunks(self, key: str) -> Iterator[bytes]:
        try:
            fh = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator below
        except FileNotFoundError as exc:
            raise NotFound(f"{self._path(key)} does not exist") from exc
        except OSError as exc:
            raise CheckpointError(f"reading {self._path(key)} failed: {exc}") from exc
        return _file_chunks(fh)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # A prefix names a directory (ends with "/") or a path prefix inside one.
        base = self._path(prefix) if prefix.endswith("/") or not prefix else self._path(parent_key(prefix))
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    size = full.stat().st_size
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, size)

    def delete(self, keys: Sequence[str]) -> None:
        parents: set[Path] = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise CheckpointError(f"deleting {path} failed: {exc}") from exc
            parents.add(path.parent)
        # Empty directories left behind (a checkpoint's and its partitions') are removed so
        # the store stays tidy; two levels up at most, never the store's own directories.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            for d in (parent, parent.parent):
                try:
                    d.rmdir()
                except OSError:
                    break

    def close(self) -> None:
        pass


def _file_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk


class MemoryBackend:
    """Objects in a dict (``memory://<bucket>/...``): for tests of code that writes checkpoints."""

    scheme = "memory"

    def __init__(self, bucket: str = "mem") -> None:
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._lock:
            self.objects[key] = bytes(data)

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, path.read_bytes())

    def get_bytes(self, key: str) -> bytes:
        with self._lock:
            if key not in self.objects:
                raise NotFound(f"memory://{self.bucket}/{key} does not exist")
            return self.objects[key]

    def get_file(self, key: str, path: Path) -> None:
        path.write_bytes(self.get_bytes(key))

    def read_chunks(self, key: str) -> Iterator[bytes]:
        return iter([self.get_bytes(key)])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            found = [ObjectInfo(k, len(v)) for k, v in self.objects.items() if k.startswith(prefix)]
        return iter(sorted(found, key=lambda o: o.key))

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self.objects.pop(key, None)

    def close(self) -> None:
        pass


def open_backend(scheme: str, bucket: str, s3: S3Settings | None = None) -> Backend:
    """A backend for ``file://`` or ``s3://<bucket>`` (memory backends are made directly)."""
    if scheme == "file":
        return FileBackend()
    if scheme == "s3":
        # Imported here: weir.s3_backend imports this module (its errors and types).
        from weir.s3_backend import S3Backend

        return S3Backend(bucket, s3)
    raise CheckpointError(f"no backend for {scheme}://{bucket} (use file:/// or s3://)")
