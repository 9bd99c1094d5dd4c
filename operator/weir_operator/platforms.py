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

from collections.abc import Mapping
from typing import Protocol

from weir import spec
from weir.checkpoint import CheckpointError, CheckpointStore, S3Settings
from weir_operator import model
from weir_operator.plans import Apply, Event, Observed, SavepointOutcome

__all__ = ["ApplyRejected", "Platform", "remove_job_store"]


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
