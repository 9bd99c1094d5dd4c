"""The Kubernetes platform: a job's workers are a StatefulSet, applied server-side, observed with its pods.

Only this module (and ``weir_operator.leases``) talks to the Kubernetes API. Children are
written by server-side apply as field manager ``weir-operator`` (forcing conflicts: the
operator owns them), the status through the ``status`` subresource as a JSON merge patch of
the whole status (absent fields become nulls, which removes them), events as ``v1`` Events.

Readiness, restarts and crash loops come from the pods (``CrashLoopBackOff``), and whether
each runs the latest revision from its ``controller-revision-hash`` (``_worker_states``).
Worker reports and savepoints go to each worker's control API through the headless Service
(``render.worker_url``); a savepoint nobody answers for is looked up in the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import orjson
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from weir import spec
from weir.objectstores import CheckpointError
from weir_operator import model, render, workers
from weir_operator.lag import LagReader, autoscaled, reported_inputs
from weir_operator.plans import Apply, Deployed, Event, Observed, SavepointOutcome, WorkerReport, WorkerState
from weir_operator.platforms import (
    ApplyRejected,
    completed_in_store,
    dispose_job_savepoint,
    find_savepoint,
    remove_job_store,
    store_s3,
)

__all__ = ["FIELD_MANAGER", "GROUP", "PLURAL", "VERSION", "KubernetesPlatform", "status_patch"]

logger = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "weir.dev", "v1alpha1", "streamjobs"
FIELD_MANAGER = "weir-operator"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


_TRANSIENT = frozenset({None, 0, 429, 502, 503, 504})
"""Answers to an apply that say "not now" (throttled, unavailable, no answer): the reconcile
is retried as is. Any other error refuses the children, 500 included: the API server answers
500 to a server-side apply whose pod template does not convert to its types (``affinity:
{nodeAffinity: "yes"}``), which no retry fixes; the job shows ``Stalled`` with the server's
message and is retried with a back-off (``decide.Policy.apply_retry_after``)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def status_patch(status: model.StreamJobStatus) -> dict[str, Any]:
    """The merge patch that makes ``status`` the object's status (kopf's ``status.kopf`` stays)."""
    return {"status": status.model_dump(mode="json", by_alias=True)}


def _message(exc: ApiException) -> str:
    try:
        return str(orjson.loads(exc.body or b"{}").get("message") or exc.reason)
    except (orjson.JSONDecodeError, AttributeError):
        return str(exc.reason)


class KubernetesPlatform:
    """Runs jobs as StatefulSets through one ``kubernetes.client.ApiClient``."""

    def __init__(
        self,
        api: Any,
        *,
        worker_image: str,
        savepoint_timeout_s: float = 600.0,
        now: Callable[[], datetime] = _utcnow,
        worker_url: Callable[[str, str, int], str] = render.worker_url,
        lag_reader: LagReader | None = None,
    ) -> None:
        self.api = api
        self.worker_image = worker_image
        self.savepoint_timeout_s = savepoint_timeout_s
        self.now = now
        self.worker_url = worker_url
        # The operator's own Kafka credentials come from its environment (never from Secrets).
        self.lag_reader = lag_reader if lag_reader is not None else LagReader(min_interval_s=2.0, now=now)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    # ------------------------------------------------------------------ observing

    def observe(self, job: spec.StreamJob) -> Observed:
        name, namespace = job.metadata.name, job.metadata.namespace
        stateful_set = _read(lambda: self.apps.read_namespaced_stateful_set(name, namespace))
        if stateful_set is None:
            # Pods of a deleted StatefulSet terminate (and may checkpoint) after it is gone.
            pods = self.core.list_namespaced_pod(namespace, label_selector=render.selector_string(name)).items
            return Observed(lingering=len(pods))
        cm_name = render.config_map_name(name)
        config_map = _read(lambda: self.core.read_namespaced_config_map(cm_name, namespace))
        service = _read(lambda: self.core.read_namespaced_service(name, namespace))
        children = (("ConfigMap", config_map), ("Service", service))
        missing = tuple(kind for kind, obj in children if obj is None)
        env = {e.name: e.value for e in stateful_set.spec.template.spec.containers[0].env or () if e.value}
        replicas = stateful_set.spec.replicas or 0
        deployed = Deployed(
            fingerprint=(stateful_set.metadata.annotations or {}).get(render.FINGERPRINT_ANNOTATION),
            workers=int(env.get(render.ENV_WORKERS, replicas) or 0),
            replicas=replicas,
            restore_from=env.get(render.ENV_RESTORE_FROM),
            spec=_deployed_spec(config_map),
            missing=missing,
        )
        pods = self.core.list_namespaced_pod(namespace, label_selector=render.selector_string(name)).items
        worker_states = _worker_states(pods, stateful_set)
        reports = self._reports(name, namespace, [w.index for w in worker_states if w.ready], bool(pods))
        lingering = sum(1 for pod in pods if (_pod_index(pod) or 0) >= replicas)
        lag = None
        if autoscaled(job) and replicas > 0:
            lag = self.lag_reader.read(job, reported=reported_inputs(reports))
        return Observed(deployed=deployed, workers=worker_states, reports=reports, lingering=lingering,
                        lag=lag)

    def _reports(
        self, name: str, namespace: str, ready: list[int], have_pods: bool
    ) -> tuple[WorkerReport, ...]:
        # Without pods (the StatefulSet's status set by hand, as in tests) nobody can answer.
        if not ready or not have_pods:
            return ()
        with ThreadPoolExecutor(max_workers=min(8, len(ready))) as pool:
            found = pool.map(lambda i: workers.fetch_report(i, self.worker_url(name, namespace, i)), ready)
            return tuple(r for r in found if r is not None)

    # ------------------------------------------------------------------ acting

    def apply(self, job: spec.StreamJob, action: Apply) -> None:
        # A rollback applies the last stable spec (action.spec) under the job's own name and owner.
        job_spec = action.spec if action.spec is not None else job.spec
        sized = job.model_copy(update={"spec": job_spec.model_copy(update={"parallelism": action.workers})})
        options = render.RenderOptions(
            default_image=self.worker_image, restore_from=action.restore_from, replicas=action.replicas
        )
        try:
            children = render.render(sized, options)
        except render.RenderError as exc:
            raise ApplyRejected(str(exc)) from None
        for child in children.all():
            self._apply(child)

    def _apply(self, obj: dict[str, Any]) -> None:
        name, namespace, kind = obj["metadata"]["name"], obj["metadata"]["namespace"], obj["kind"]
        call = {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "StatefulSet": self.apps.patch_namespaced_stateful_set,
        }[kind]
        try:
            # _preload_content=False: an apply that creates answers 201, which the generated
            # client does not deserialize for PATCH.
            response = call(
                name,
                namespace,
                obj,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_PATCH,
                _preload_content=False,
            )
            # Read the body before the connection goes back to the pool: an unread one is taken
            # for the next response's status line there (urllib3 logs BadStatusLine, retries).
            response.drain_conn()  # type: ignore[attr-defined]
            response.release_conn()  # type: ignore[attr-defined]
        except ApiException as exc:
            if exc.status in _TRANSIENT:
                raise
            raise ApplyRejected(f"{kind} {namespace}/{name}: HTTP {exc.status}: {_message(exc)}") from None

    def savepoint(self, job: spec.StreamJob, savepoint_id: str, stop: bool) -> SavepointOutcome:
        name, namespace = job.metadata.name, job.metadata.namespace
        stateful_set = _read(lambda: self.apps.read_namespaced_stateful_set(name, namespace))
        replicas = (stateful_set.spec.replicas or 0) if stateful_set is not None else 0
        urls = [self.worker_url(name, namespace, i) for i in range(replicas)]
        outcome = workers.take_savepoint(urls, savepoint_id, stop, self.now(), self.savepoint_timeout_s)
        checkpoint = job.spec.checkpoint
        if checkpoint is None:
            return outcome  # the workers' default store is inside their pods: nothing to look in
        # After an operator restart the workers that took it may be gone (a stop-savepoint
        # ends them; replicas may be 0 already): a complete savepoint in the store is the answer.
        url = checkpoint.url
        return completed_in_store(
            outcome,
            lambda: find_savepoint(url, namespace, name, savepoint_id, store_s3(url, job)),
            self.now(),
            asked_all=bool(urls),
        )

    def write_status(self, job: spec.ObjectMeta, status: model.StreamJobStatus) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            job.namespace,
            PLURAL,
            job.name,
            status_patch(status),
            _content_type=MERGE_PATCH,
        )

    def record_event(self, job: spec.ObjectMeta, event: Event) -> None:
        now = self.now()
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{job.name}."),
            involved_object=client.V1ObjectReference(
                api_version=spec.API_VERSION,
                kind=spec.KIND,
                name=job.name,
                namespace=job.namespace,
                uid=job.uid,
            ),
            reason=event.reason,
            message=event.message[:1024],
            type=event.type,
            source=client.V1EventSource(component=FIELD_MANAGER),
            reporting_component=FIELD_MANAGER,
            reporting_instance=FIELD_MANAGER,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.core.create_namespaced_event(job.namespace, body)
        except ApiException as exc:
            # An event is information, never a reason to fail a reconcile.
            logger.warning("event %s on %s/%s not recorded: %s", event.reason, job.namespace,
                           job.name, _message(exc))

    def delete(self, namespace: str, name: str) -> None:
        options = client.V1DeleteOptions(propagation_policy="Background")
        for call, object_name in (
            (self.apps.delete_namespaced_stateful_set, name),
            (self.core.delete_namespaced_service, name),
            (self.core.delete_namespaced_config_map, render.config_map_name(name)),
        ):
            try:
                call(object_name, namespace, body=options)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def remove_checkpoints(self, job: spec.StreamJob) -> int:
        return remove_job_store(job)

    def dispose_savepoint(self, job: spec.StreamJob, url: str) -> None:
        checkpoint = job.spec.checkpoint
        if checkpoint is None:
            raise CheckpointError("the job has no checkpoint store the operator can reach")
        deleted = dispose_job_savepoint(job, url, store_s3(url, job))
        logger.info("%s/%s: savepoint %s disposed (%d objects)", job.metadata.namespace, job.metadata.name,
                    url, deleted)


def _read(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _deployed_spec(config_map: Any) -> spec.JobSpec | None:
    if config_map is None:
        return None
    try:
        document = yaml.safe_load((config_map.data or {}).get(render.CONFIG_KEY, ""))
        return spec.JobSpec.model_validate(document["spec"])
    except Exception:  # noqa: BLE001 - an unreadable manifest only means "unknown": compare fingerprints
        return None


def _pod_index(pod: Any) -> int | None:
    """A worker pod's ordinal (its pod-index label, else its name's suffix)."""
    labels = pod.metadata.labels or {}
    index = labels.get(render.POD_INDEX_LABEL) or pod.metadata.name.rsplit("-", 1)[-1]
    return int(index) if str(index).isdigit() else None


REVISION_LABEL = "controller-revision-hash"
"""The label the StatefulSet controller puts on each pod: the revision of the template it runs."""


def _worker_states(pods: list[Any], stateful_set: Any) -> tuple[WorkerState, ...]:
    """Each ordinal's worker: readiness, restarts and crash loops from its pod, and whether it
    runs the StatefulSet's latest revision (``WorkerState.current``).

    Readiness comes from the pod's ``Ready`` condition, never from ``status.readyReplicas``:
    right after an apply that count still describes the previous revision's pods. A pod is
    current when the controller has seen the latest spec (``status.observedGeneration`` >=
    ``metadata.generation``) and the pod's ``controller-revision-hash`` is
    ``status.updateRevision``; a terminating pod never is. Without an ``updateRevision`` (no
    controller has written one: the test API server) a pod of an observed spec counts as current.

    Without any pod object (no controller-manager creates them, as in the tests that set the
    StatefulSet's status by hand) the counts of an observed status stand in: ordinal ``i`` is
    ready when ``i < readyReplicas`` and current when ``i < updatedReplicas``.
    """
    replicas = stateful_set.spec.replicas or 0
    status = stateful_set.status
    generation = stateful_set.metadata.generation
    observed = status.observed_generation if status is not None else None
    seen = status is not None and (generation is None or (observed is not None and observed >= generation))
    update_revision = status.update_revision if seen else None
    by_index: dict[int, Any] = {}
    for pod in pods:
        index = _pod_index(pod)
        if index is not None:
            by_index[index] = pod
    states = []
    for i in range(replicas):
        pod = by_index.get(i)
        if pod is None:
            if by_index or not seen:
                states.append(WorkerState(i, ready=False, current=False, reason="no pod"))
                continue
            ready = i < (status.ready_replicas or 0)
            updated = status.updated_replicas
            current = i < (updated if updated is not None else replicas)
            states.append(WorkerState(i, ready=ready, current=current))
            continue
        statuses = (pod.status.container_statuses or ()) if pod.status is not None else ()
        restarts = sum(s.restart_count or 0 for s in statuses)
        waiting = [
            s.state.waiting.reason for s in statuses if s.state and s.state.waiting and s.state.waiting.reason
        ]
        conditions = (pod.status.conditions or ()) if pod.status is not None else ()
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        revision = (pod.metadata.labels or {}).get(REVISION_LABEL)
        terminating = pod.metadata.deletion_timestamp is not None
        current = seen and not terminating and (update_revision is None or revision == update_revision)
        states.append(
            WorkerState(
                i,
                ready=ready,
                restarts=restarts,
                crash_looping="CrashLoopBackOff" in waiting,
                reason=waiting[0] if waiting else ("terminating" if terminating else ""),
                current=current,
            )
        )
    return tuple(states)
