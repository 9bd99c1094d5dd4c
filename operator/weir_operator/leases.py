"""Leader election through a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

One operator replica holds the Lease and reconciles; the others retry every
``retry_period_s`` and take over once the holder has not renewed for
``lease_duration_s``. A leader that cannot renew within ``renew_deadline_s`` stops (the
pod restarts and stands by), so two leaders never act at once for longer than that. Writes
use the Lease's resourceVersion: of two replicas racing for it, one gets 409 and stays a
follower. The chart's RBAC allows exactly this: create Leases, and get/update the one
named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

__all__ = ["LeaderElector", "LeaseSettings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    namespace: str
    name: str
    identity: str
    """This replica's name in ``spec.holderIdentity`` (the pod name)."""
    lease_duration_s: int = 15
    """How long a Lease not renewed still belongs to its holder."""
    renew_deadline_s: float = 10.0
    """How long the leader keeps trying to renew before it gives up leading."""
    retry_period_s: float = 2.0
    """How often followers try to acquire and the leader renews."""


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquire, renew and release one Lease; all calls block (run them in a thread)."""

    def __init__(self, api: Any, settings: LeaseSettings, now: Callable[[], datetime] | None = None) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.settings = settings
        self.now = now or (lambda: datetime.now(UTC))

    def try_acquire_or_renew(self) -> bool:
        """Whether this replica holds the Lease after the call."""
        s = self.settings
        now = self.now()
        try:
            lease = self.coordination.read_namespaced_lease(s.name, s.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create(now)
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        renewed = spec.renew_time
        duration = timedelta(seconds=spec.lease_duration_seconds or s.lease_duration_s)
        expired = renewed is None or renewed + duration < now
        if holder and holder != s.identity and not expired:
            return False
        transitions = spec.lease_transitions or 0
        acquired = spec.acquire_time
        if holder != s.identity:
            transitions += 1
            acquired = now
            logger.info("taking the lease %s/%s over from %r", s.namespace, s.name, holder or None)
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace,
                         "resourceVersion": _version(lease)},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": s.lease_duration_s,
                "acquireTime": _micro_time(acquired or now),
                "renewTime": _micro_time(now),
                "leaseTransitions": transitions,
            },
        }
        try:
            self.coordination.replace_namespaced_lease(s.name, s.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _create(self, now: datetime) -> bool:
        s = self.settings
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": s.lease_duration_s,
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": 0,
            },
        }
        try:
            self.coordination.create_namespaced_lease(s.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        logger.info("created the lease %s/%s", s.namespace, s.name)
        return True

    def release(self) -> None:
        """Give the Lease up (holder cleared) so a standby takes over at once; only if we hold it."""
        s = self.settings
        try:
            lease = self.coordination.read_namespaced_lease(s.name, s.namespace)
            spec = lease.spec
            if spec is None or spec.holder_identity != s.identity:
                return
            body: Any = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": s.name, "namespace": s.namespace,
                             "resourceVersion": _version(lease)},
                "spec": {"leaseDurationSeconds": 1, "leaseTransitions": spec.lease_transitions or 0},
            }
            self.coordination.replace_namespaced_lease(s.name, s.namespace, body)
            logger.info("released the lease %s/%s", s.namespace, s.name)
        except ApiException as exc:
            logger.warning("could not release the lease %s/%s: %s", s.namespace, s.name, exc.reason)


def _version(lease: Any) -> str | None:
    return lease.metadata.resource_version if lease.metadata is not None else None
