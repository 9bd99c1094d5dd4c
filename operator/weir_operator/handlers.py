"""The kopf adapters: watch StreamJobs and their StatefulSets and pods, and reconcile the job concerned.

Handlers are thin: they name the job an event is about and hand it to ``Controller``, which
reads the StreamJob fresh from the API server, runs ``reconciler.reconcile`` in a thread
(the Kubernetes client and the workers' HTTP API block) and serialises reconciles of one
job with a lock. Watch-event handlers (``kopf.on.event``) rather than kopf's create/update
handlers: the reconciler is level-based and keeps its own write-ahead log in the status, so
it needs no kopf progress storage — and no finalizer, which kopf's timers and daemons would
add. Periodic re-observation (worker reports, crash loops) is ``Controller.resync_forever``.

Deletion: the children carry ownerReferences (a cluster's garbage collector removes them),
and on the watch's DELETED event the controller also deletes them itself, so a cluster
without a garbage collector (the test API server) ends in the same state. A job with
``checkpoint.cleanupPolicy: delete`` carries the finalizer ``FINALIZER`` (added and removed
as the policy changes, on no other job): once it is being deleted, ``reconciler.finalize``
stops its workers, waits for them to be gone and removes its store directory, and only then
the finalizer goes. The API errors of one reconcile are logged and counted; the job is
retried at the next event or resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from weir import spec
from weir_operator import decide, kube, model, render
from weir_operator.metrics import OperatorMetrics
from weir_operator.plans import Event
from weir_operator.reconciler import finalize, reconcile

__all__ = ["FINALIZER", "Controller", "build_registry", "connection_info"]

logger = logging.getLogger(__name__)

FINALIZER = "weir.dev/checkpoint-cleanup"
"""Held by jobs with ``checkpoint.cleanupPolicy: delete`` until their store is removed."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Controller:
    """Reconciles StreamJobs on one Kubernetes platform; safe to call from many handlers at once."""

    def __init__(
        self,
        api: Any,
        platform: kube.KubernetesPlatform,
        metrics: OperatorMetrics,
        *,
        policy: decide.Policy = decide.Policy(),  # noqa: B008 - frozen
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.platform = platform
        self.metrics = metrics
        self.policy = policy
        self.now = now
        self.known: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            with self.metrics.reconcile_seconds.time():
                try:
                    result = await asyncio.to_thread(self._reconcile, namespace, name)
                except (ApiException, OSError) as exc:
                    self.metrics.reconciles.labels("error").inc()
                    reason = exc.reason if isinstance(exc, ApiException) else exc
                    logger.warning("%s/%s: reconcile failed, retried at the next resync: %s",
                                   namespace, name, reason)
                    return
            self.metrics.reconciles.labels(result).inc()

    def _reconcile(self, namespace: str, name: str) -> str:
        try:
            body: Any = self.custom.get_namespaced_custom_object(
                kube.GROUP, kube.VERSION, namespace, kube.PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                self.forget(namespace, name)
                return "ok"
            raise
        metadata = body.get("metadata") or {}
        finalizers: list[str] = list(metadata.get("finalizers") or ())
        deleting = bool(metadata.get("deletionTimestamp"))
        if deleting and FINALIZER not in finalizers:
            return "ok"  # nothing of ours holds it; the DELETED event removes the children
        self.known.add((namespace, name))
        generation = int(metadata.get("generation") or 0)
        try:
            status = model.StreamJobStatus.model_validate(body.get("status") or {})
        except ValidationError:
            logger.warning("%s/%s: unreadable status, starting from an empty one", namespace, name)
            status = model.StreamJobStatus()
        try:
            job = spec.StreamJob.model_validate(body)
        except ValidationError as exc:
            why = spec.format_validation_error(exc)
            if deleting:
                # Nothing can be cleaned up for a spec that cannot be read: let it go, say so.
                logger.warning("%s/%s: deleted with an unreadable spec, store left as is: %s",
                               namespace, name, why)
                self._set_finalizer(body, finalizers, present=False)
                return "invalid"
            self._invalid(namespace, name, metadata.get("uid"), generation, status, why)
            return "invalid"
        if deleting:
            if finalize(self.platform, job, generation, status, self.now, policy=self.policy):
                self._set_finalizer(body, finalizers, present=False)
                self.forget(namespace, name)
            else:
                self.metrics.job_phase(f"{namespace}/{name}", "Deleting")
            return "ok"
        wanted = decide.cleanup_url(job) is not None
        if wanted != (FINALIZER in finalizers):
            self._set_finalizer(body, finalizers, present=wanted)
        result = reconcile(self.platform, job, generation, status, self.now, policy=self.policy)
        self.metrics.job_phase(f"{namespace}/{name}", result.phase)
        self.metrics.autoscaler(namespace, name, status.autoscaler, result.autoscaler)
        return "ok"

    def _set_finalizer(self, body: dict[str, Any], finalizers: list[str], *, present: bool) -> None:
        """Add or remove ``FINALIZER``; fails (422, retried) if another controller changed the
        finalizers meanwhile (a JSON patch that tests the list it read, not the whole object:
        the status this operator writes changes the resourceVersion)."""
        metadata = body["metadata"]
        wanted = [f for f in finalizers if f != FINALIZER] + ([FINALIZER] if present else [])
        path = "/metadata/finalizers"
        patch = [{"op": "test", "path": path, "value": finalizers},
                 {"op": "replace", "path": path, "value": wanted}]
        if "finalizers" not in metadata:
            patch = [{"op": "add", "path": path, "value": wanted}]
        self.custom.patch_namespaced_custom_object(
            kube.GROUP, kube.VERSION, metadata["namespace"], kube.PLURAL, metadata["name"], patch,
            _content_type=kube.JSON_PATCH,
        )
        logger.info("%s/%s: finalizer %s %s", metadata["namespace"], metadata["name"], FINALIZER,
                    "added" if present else "removed")

    def _invalid(
        self,
        namespace: str,
        name: str,
        uid: str | None,
        generation: int,
        status: model.StreamJobStatus,
        why: str,
    ) -> None:
        """A StreamJob the CRD accepted but the models refuse: Stalled, with the field named."""
        if status.error == why and status.observed_generation == generation:
            return
        now = self.now()
        conditions = tuple(
            model.StatusCondition(
                type=t, status="True" if t == "Stalled" else "False",
                reason="InvalidSpec" if t in ("Stalled", "Ready") else "AsExpected",
                message=why if t == "Stalled" else "", last_transition_time=now,
            )
            for t in model.CONDITION_TYPES
        )
        new = status.model_copy(
            update={"phase": "Failed", "error": why, "observed_generation": generation,
                    "conditions": conditions}
        )
        stub = spec.ObjectMeta(name=name, namespace=namespace, uid=uid)
        self.platform.write_status(stub, new)
        self.platform.record_event(stub, Event("Warning", "InvalidSpec", why))
        self.metrics.job_phase(f"{namespace}/{name}", "Failed")

    async def deleted(self, namespace: str, name: str) -> None:
        """The StreamJob is gone: remove its children (owner references do it where a GC runs)."""
        self.forget(namespace, name)
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self.platform.delete, namespace, name)
        logger.info("%s/%s: deleted, children removed", namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        self.known.discard((namespace, name))
        self.metrics.job_phase(f"{namespace}/{name}", None)
        self.metrics.autoscaler(namespace, name, None, None)
        self.platform.lag_reader.forget(namespace, name)

    async def resync_forever(self, interval_s: float, stop: asyncio.Event) -> None:
        """Reconcile every known job every ``interval_s`` (worker reports, crash loops, retries)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            if stop.is_set():
                return
            await asyncio.gather(*(self.reconcile(ns, n) for ns, n in sorted(self.known)))


def connection_info(api: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the operator's own ``ApiClient`` (one login for both clients)."""
    configuration = api.configuration
    keys = configuration.api_key or {}
    # kubernetes-client stores the token as "BearerToken" (recent) or "authorization" (older).
    authorization = keys.get("BearerToken") or keys.get("authorization") or ""
    token = authorization.removeprefix("Bearer ").strip()
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def build_registry(controller: Controller, *, clusterwide: bool) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers bound to ``controller``."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The reconciler writes its own events; kopf's would repeat handler logs as events.
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        if not clusterwide:
            # Exact namespaces: nothing to discover, and the chart's namespace-scoped RBAC grants
            # no cluster-wide namespace list (kopf would retry it for a minute before falling back).
            settings.scanning.disabled = True

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(controller.api)

    @kopf.on.event(kube.GROUP, kube.VERSION, kube.PLURAL, registry=registry)
    async def on_stream_job(type: str, namespace: str | None, name: str, **_: Any) -> None:
        if namespace is None:
            return
        if type == "DELETED":
            await controller.deleted(namespace, name)
            return
        await controller.reconcile(namespace, name)

    async def on_child(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
        job_name = labels.get(render.JOB_LABEL)
        if namespace is not None and job_name and (namespace, job_name) in controller.known:
            await controller.reconcile(namespace, job_name)

    present = {render.JOB_LABEL: kopf.PRESENT}
    kopf.on.event("apps", "v1", "statefulsets", labels=present, registry=registry)(on_child)
    kopf.on.event("", "v1", "pods", labels=present, registry=registry)(on_child)
    return registry
