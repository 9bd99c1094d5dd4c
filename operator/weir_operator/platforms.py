"""The one interface the reconciler drives workers through; Kubernetes and local processes implement it.

A platform observes (never acts while observing), applies the rendered job, asks workers for
savepoints, and stores the status and events of a job. Its methods are synchronous and may
block (HTTP to workers, the Kubernetes API); async callers run them in a thread.

Errors: ``ApplyRejected`` when the platform refuses the job as given (invalid for it,
forbidden, an internal error answering it): the job is ``Stalled`` with the reason and the
apply is retried with a back-off, at once when the spec changes. Any other exception is
transient: the reconcile is retried at the next resync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Protocol

from weir import spec
from weir.checkpoint import CheckpointError, CheckpointStore, S3Settings
from weir.checkpoint_manifest import MANIFEST, SAVEPOINTS, CorruptCheckpoint
from weir.objectstores import job_url, join_key, join_url, open_backend, parent_key, split_url
from weir_operator import model
from weir_operator.plans import Apply, Event, Observed, SavepointOutcome

__all__ = [
    "ApplyRejected",
    "Platform",
    "completed_in_store",
    "dispose_job_savepoint",
    "find_savepoint",
    "remove_job_store",
    "store_s3",
]

logger = logging.getLogger(__name__)


class ApplyRejected(Exception):
    """The platform refused the job's children; the message says why and names no secret."""


class Platform(Protocol):
    """Where a job's workers run."""

    def observe(self, job: spec.StreamJob) -> Observed:
        """What runs for ``job`` now: its children, its workers, their reports."""
        ...

    def apply(self, job: spec.StreamJob, action: Apply) -> None:
        """Create or update the children so ``action.replicas`` workers run the current spec."""
        ...

    def savepoint(self, job: spec.StreamJob, savepoint_id: str, stop: bool) -> SavepointOutcome:
        """Ask every worker for savepoint ``savepoint_id`` and wait for all answers (idempotent by id)."""
        ...

    def write_status(self, job: spec.ObjectMeta, status: model.StreamJobStatus) -> None:
        """Store the whole status (fields that are None are removed)."""
        ...

    def record_event(self, job: spec.ObjectMeta, event: Event) -> None:
        """Publish an event about the job."""
        ...

    def delete(self, namespace: str, name: str) -> None:
        """Remove the children of job ``namespace/name`` and stop its workers (the job itself is gone)."""
        ...

    def dispose_savepoint(self, job: spec.StreamJob, url: str) -> None:
        """Delete the savepoint at ``url`` (``<store>/<namespace>/<job>/savepoints/<id>``) with the
        platform's own credentials; deleting one already gone succeeds. Raises ``CheckpointError``."""
        ...

    def remove_checkpoints(self, job: spec.StreamJob) -> int:
        """Delete ``<checkpoint.url>/<namespace>/<job>/`` with the platform's own credentials;
        returns the number of objects deleted. Raises ``CheckpointError`` or ``OSError``."""
        ...


def remove_job_store(job: spec.StreamJob, env: Mapping[str, str] | None = None) -> int:
    """Delete ``<checkpoint.url>/<namespace>/<job>/``: the spec's endpoint and region, the
    credentials of ``env`` (default: this process's environment, i.e. the operator's own; the
    job's ``credentialsSecret`` is the workers', never read by the operator)."""
    checkpoint = job.spec.checkpoint
    if checkpoint is None:
        raise CheckpointError("the job has no checkpoint store")
    s3 = None
    if checkpoint.url.startswith("s3://"):
        s3 = S3Settings.from_env(env, endpoint_url=checkpoint.endpoint, region=checkpoint.region)
    with CheckpointStore.open(checkpoint.url, job.metadata.namespace, job.metadata.name, s3) as store:
        return store.remove_all()


def store_s3(store_url: str, job: spec.StreamJob, env: Mapping[str, str] | None = None) -> S3Settings | None:
    """The S3 settings to reach ``store_url`` as the platform (the spec's endpoint and region, the
    credentials of ``env``); None for a ``file://`` store."""
    if not store_url.startswith("s3://"):
        return None
    checkpoint = job.spec.checkpoint
    endpoint = checkpoint.endpoint if checkpoint is not None else None
    region = checkpoint.region if checkpoint is not None else None
    return S3Settings.from_env(env, endpoint_url=endpoint, region=region)


def find_savepoint(
    store_url: str, namespace: str, name: str, savepoint_id: str, s3: S3Settings | None
) -> str | None:
    """The job-level URL of savepoint ``savepoint_id`` when it is complete in the store, else None.

    Complete means what ``weir savepoints`` shows as one savepoint: a manifest (written last by
    each worker, so its presence means that part is whole) for every worker index ``0..N-1``,
    all saying the same worker count ``N``. A part missing, unreadable, or two parts claiming a
    partition: None (the savepoint is not usable, so it was not taken). A store that cannot be
    read raises ``CheckpointError``.
    """
    scheme, bucket, key = split_url(job_url(store_url, namespace, name))
    url = join_url(scheme, bucket, join_key(key, SAVEPOINTS, savepoint_id))
    with CheckpointStore.open(store_url, namespace, name, s3) as store:
        try:
            if not store.manifests_at(url):
                return None
            manifests = store.read_savepoint(url)
        except CorruptCheckpoint as exc:
            logger.warning("savepoint %s is not usable: %s", url, exc)
            return None
    counts = {m.workers for m in manifests}
    if len(counts) != 1 or any(m.kind != "savepoint" or m.id != savepoint_id for m in manifests):
        return None
    indices = sorted(m.worker_index for m in manifests)
    return url if indices == list(range(counts.pop())) else None


def completed_in_store(
    outcome: SavepointOutcome,
    find: Callable[[], str | None],
    now: datetime,
    *,
    asked_all: bool,
) -> SavepointOutcome:
    """``outcome`` of a savepoint request, checked against the store where the workers' answers
    do not settle it.

    A platform restarted in the middle of an upgrade asks again under the same id, and the
    workers that took it may have stopped since (a stop-savepoint ends them): nobody answers,
    yet the savepoint is complete in the store. So when not every worker answered for itself
    (``asked_all`` False: some were not running) or the request failed, ``find`` looks for the
    complete savepoint: found, it is the outcome (completed); not found, a request that
    "completed" with only some workers' parts is not complete, and a failed one keeps its
    error. A store that cannot be read leaves the workers' answer as it is.
    """
    if outcome.completed and asked_all:
        return outcome
    try:
        url = find()
    except CheckpointError as exc:
        logger.warning("savepoint %s: the store could not be checked: %s", outcome.id, exc)
        return outcome if not outcome.completed else SavepointOutcome(
            outcome.id, completed=False, error=f"not every worker answered, and the store could not be "
            f"checked: {exc}")
    if url is not None:
        return SavepointOutcome(outcome.id, completed=True, url=url, completed_at=outcome.completed_at or now)
    if outcome.completed:
        return SavepointOutcome(outcome.id, completed=False,
                                error="not every worker's part of the savepoint is in the store")
    return outcome


def dispose_job_savepoint(job: spec.StreamJob, url: str, s3: S3Settings | None) -> int:
    """Delete savepoint ``url`` of ``job``: its manifests first, so a half-deleted savepoint never
    looks complete, then its files. Returns the objects deleted (0: already gone).

    ``url`` must be ``<store>/<namespace>/<job>/savepoints/<id>`` for this job's namespace and
    name (any store: the savepoint may have been taken before ``checkpoint.url`` changed);
    anything else is refused with ``CheckpointError``, so a disposal never reaches beyond one
    savepoint of its own job. Every failure is a ``CheckpointError``."""
    scheme, bucket, key = split_url(url)
    where = join_key(job.metadata.namespace, job.metadata.name, SAVEPOINTS)
    parent = parent_key(key)
    if not key or parent == key or not (parent == where or parent.endswith("/" + where)):
        raise CheckpointError(
            f"{url} is not a savepoint of {job.metadata.namespace}/{job.metadata.name} "
            f"(<store>/{where}/<id>): not deleted"
        )
    backend = open_backend(scheme, bucket, s3)
    try:
        keys = [obj.key for obj in backend.list(key + "/")]
        backend.delete([k for k in keys if k.endswith("/" + MANIFEST)])
        backend.delete([k for k in keys if not k.endswith("/" + MANIFEST)])
    except OSError as exc:
        raise CheckpointError(f"deleting {url} failed: {exc}") from exc
    finally:
        backend.close()
    return len(keys)
