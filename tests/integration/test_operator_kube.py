"""The operator process (`python -m weir_operator`) on the real kube-apiserver, as the chart's account.

The test API server runs no controller-manager: no pods appear, nothing garbage-collects.
Tests set the StatefulSet's status (and create pods) themselves, as envtest users do; the
operator deletes a deleted job's children itself (they also carry ownerReferences for real
clusters' garbage collector).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube as kube_server
from harness.common import Running, ServerError, wait_until
from harness.helm import Helm
from harness.manifests import MERGE_PATCH, apply, create_namespace, install_crd
from harness.s3 import S3Helper
from weir import spec
from weir_operator import crd, render
from weir_operator.handlers import FINALIZER

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weir-operator"
EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
SECRET_VALUE = "s3cr3t-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Operator:
    namespace: str  # where the operator's ServiceAccount and Lease live
    watched: str  # where its StreamJobs are
    admin: Any
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    health_port: int
    lease: str

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-80:])

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30) -> None:
        try:
            wait_until(check, timeout, what)
        except ServerError as exc:
            raise AssertionError(f"{exc}\n--- operator log ---\n{self.tail()}") from None


@pytest.fixture(scope="module")
def operator(
    kube: Running, helm: Helm, s3_running: Running, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    suffix = uuid.uuid4().hex[:8]
    release = f"op-{suffix}"
    with kube_server.api_client(kube.info["kubeconfig"]) as admin:
        install_crd(admin, crd.crd())
        namespace = create_namespace(admin, f"weir-op-{suffix}")
        watched = create_namespace(admin, f"jobs-{suffix}")
        out = helm.run(
            ["template", release, str(CHART), "--namespace", namespace,
             "--set", "rbac.scope=namespace", "--set", f"rbac.namespaces={{{watched}}}"]
        ).stdout
        objects = [doc for doc in yaml.safe_load_all(out) if doc]
        rbac_kinds = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
        for obj in objects:
            if obj["kind"] in rbac_kinds:
                apply(admin, obj)
        account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        chart_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        lease = f"{release}-weir-operator-leader"
        kubeconfig = kube_server.service_account_kubeconfig(kube, namespace, account)
        with kube_server.api_client(kubeconfig) as sa:
            # RBAC reaches the authorizer through an informer: wait for the grants.
            wait_until(
                lambda: client.CustomObjectsApi(sa).list_namespaced_custom_object(
                    crd.GROUP, crd.VERSION, watched, crd.PLURAL
                ) is not None,
                20,
                "the chart's RBAC",
            )
        metrics_port, health_port = _free_port(), _free_port()
        # The chart's own arguments, with the ports and the identity this test needs.
        ours = ("--metrics-port", "--health-port", "--worker-image")
        args = [a for a in chart_args if not a.startswith(ours)]
        assert f"--namespace={watched}" in args and f"--leader-election-lease={namespace}/{lease}" in args
        log = tmp_path_factory.mktemp("operator") / "operator.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "weir_operator", *args, f"--metrics-port={metrics_port}",
                 f"--health-port={health_port}", "--worker-image=weir:test", f"--kubeconfig={kubeconfig}",
                 "--resync-interval=1", "--savepoint-timeout=3", "--log-level=DEBUG"],
                stdout=sink, stderr=subprocess.STDOUT,
                # The operator's own S3 credentials (the chart's extraEnv), for cleanupPolicy: delete.
                env={**os.environ, "POD_NAME": f"weir-operator-{suffix}-0", "POD_NAMESPACE": namespace,
                     "AWS_ACCESS_KEY_ID": s3_running.info["access_key"],
                     "AWS_SECRET_ACCESS_KEY": s3_running.info["secret_key"]},
            )
        handle = Operator(namespace, watched, admin, process, log, metrics_port, health_port, lease)
        try:
            handle.wait(lambda: _get(f"http://127.0.0.1:{health_port}/readyz") is not None, "operator ready")
            yield handle
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            rbac = client.RbacAuthorizationV1Api(admin)
            for obj in objects:
                if obj["kind"] == "ClusterRoleBinding":
                    rbac.delete_cluster_role_binding(obj["metadata"]["name"])
                elif obj["kind"] == "ClusterRole":
                    rbac.delete_cluster_role(obj["metadata"]["name"])


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: bytes = response.read()
            return body
    except OSError:
        return None


# --------------------------------------------------------------------------- helpers


def _job_body(op: Operator, name: str, **spec_changes: Any) -> dict[str, Any]:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"name": name, "namespace": op.watched}
    body["spec"].update(spec_changes)
    return body


def _create(op: Operator, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi(op.admin).create_namespaced_custom_object(
        crd.GROUP, crd.VERSION, op.watched, crd.PLURAL, body
    )
    return created


def _job(op: Operator, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(op.admin).get_namespaced_custom_object(
        crd.GROUP, crd.VERSION, op.watched, crd.PLURAL, name
    )
    return found


def _status(op: Operator, name: str) -> dict[str, Any]:
    return _job(op, name).get("status") or {}


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", ()) if c["type"] == type_), {})


def _stateful_set(op: Operator, name: str) -> Any:
    try:
        return client.AppsV1Api(op.admin).read_namespaced_stateful_set(name, op.watched)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _set_ready(op: Operator, name: str, ready: int) -> None:
    sts = _stateful_set(op, name)
    client.AppsV1Api(op.admin).patch_namespaced_stateful_set_status(
        name,
        op.watched,
        {"status": {"replicas": sts.spec.replicas, "readyReplicas": ready, "availableReplicas": ready,
                    "currentReplicas": sts.spec.replicas, "updatedReplicas": sts.spec.replicas,
                    "observedGeneration": sts.metadata.generation}},
        _content_type=MERGE_PATCH,
    )


def _events(op: Operator, name: str) -> list[Any]:
    return [
        e for e in client.CoreV1Api(op.admin).list_namespaced_event(op.watched).items
        if e.involved_object.name == name and e.involved_object.kind == "StreamJob"
    ]


def _wait_events(op: Operator, name: str, found: Callable[[list[Any]], bool], what: str) -> list[Any]:
    """The job's events once ``found`` holds for them. The operator records a round's events
    after that round's status patch, so a test that has just seen the status may be one API
    call ahead of them."""
    seen: list[Any] = []

    def holds() -> bool:
        seen[:] = _events(op, name)
        return found(seen)

    op.wait(holds, what, timeout=10)
    return seen


def _create_pod(op: Operator, name: str, index: int) -> Any:
    """A worker pod of job ``name`` (no kubelet runs here: it only exists, until deleted)."""
    return client.CoreV1Api(op.admin).create_namespaced_pod(op.watched, client.V1Pod(
        metadata=client.V1ObjectMeta(name=f"{name}-{index}",
                                     labels={**render.selector(name), render.POD_INDEX_LABEL: str(index)}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="worker", image="weir:test")]),
    ))


def _delete(op: Operator, name: str) -> None:
    client.CustomObjectsApi(op.admin).delete_namespaced_custom_object(
        crd.GROUP, crd.VERSION, op.watched, crd.PLURAL, name
    )


# --------------------------------------------------------------------------- tests


def test_the_operator_holds_its_lease_and_serves_metrics_and_health(operator: Operator) -> None:
    leases = client.CoordinationV1Api(operator.admin)

    def held() -> bool:
        # Readiness can come before the first election round has written the Lease.
        try:
            lease = leases.read_namespaced_lease(operator.lease, operator.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return bool(lease.spec.holder_identity)

    operator.wait(held, "the Lease")
    lease = leases.read_namespaced_lease(operator.lease, operator.namespace)
    assert lease.spec.holder_identity.startswith("weir-operator-")
    assert _get(f"http://127.0.0.1:{operator.health_port}/healthz") is not None
    metrics = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    operator.wait(lambda: b"weir_operator_leader 1.0" in (_get(metrics) or b""), "leader metric")


def test_an_applied_stream_job_is_reconciled_into_valid_children_and_a_status(operator: Operator) -> None:
    name = "revenue-" + uuid.uuid4().hex[:6]
    created = _create(operator, _job_body(operator, name, parallelism=2))

    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    sts = _stateful_set(operator, name)
    config_map = client.CoreV1Api(operator.admin).read_namespaced_config_map(
        render.config_map_name(name), operator.watched
    )
    service = client.CoreV1Api(operator.admin).read_namespaced_service(name, operator.watched)
    for child in (sts, config_map, service):
        owner = child.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.uid, owner.controller) == (
            "StreamJob", name, created["metadata"]["uid"], True,
        )
    assert sts.spec.replicas == 2
    assert sts.spec.template.spec.containers[0].image == "weir:test"
    assert service.spec.cluster_ip == "None"
    assert yaml.safe_load(config_map.data["job.yaml"])["metadata"]["name"] == name
    # The intent (reason Deploying) is written before the children; the next round sees them.
    operator.wait(
        lambda: _status(operator, name).get("phase") == "Deploying"
        and _condition(_status(operator, name), "Progressing").get("reason") == "WorkersStarting",
        "phase Deploying with the workers starting",
    )
    status = _status(operator, name)
    assert status["observedGeneration"] == created["metadata"]["generation"]
    assert status["selector"] == f"weir.dev/job={name}"
    assert _condition(status, "Ready")["status"] == "False"
    assert _condition(status, "Progressing")["reason"] == "WorkersStarting"
    assert "intent" not in status

    _set_ready(operator, name, 2)

    operator.wait(lambda: _status(operator, name).get("phase") == "Running", "phase Running")
    status = _status(operator, name)
    assert _condition(status, "Ready") | {"lastTransitionTime": None} == {
        "type": "Ready", "status": "True", "reason": "WorkersReady", "message": "2/2 workers ready",
        "lastTransitionTime": None,
    }
    assert status["readyWorkers"] == 2 and status["parallelism"] == 2
    # "Deployed" waits for the stability gate (upgrade.stabilityWindow); applied is "Stabilizing".
    expected = {"Deploying", "Stabilizing", "PhaseRunning", "WorkersReady"}
    _wait_events(operator, name, lambda events: expected <= {e.reason for e in events}, "the deploy events")


def test_writing_the_scale_subresource_changes_the_stateful_sets_replicas(operator: Operator) -> None:
    name = "scaled-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, parallelism=1, upgradeMode="stateless"))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    _set_ready(operator, name, 1)
    operator.wait(lambda: _status(operator, name).get("phase") == "Running", "phase Running")

    client.CustomObjectsApi(operator.admin).patch_namespaced_custom_object_scale(
        crd.GROUP, crd.VERSION, operator.watched, crd.PLURAL, name, {"spec": {"replicas": 3}},
        _content_type=MERGE_PATCH,
    )

    operator.wait(lambda: _stateful_set(operator, name).spec.replicas == 3, "3 replicas")
    env = {e.name: e.value for e in _stateful_set(operator, name).spec.template.spec.containers[0].env}
    assert env[render.ENV_WORKERS] == "3"
    operator.wait(lambda: _status(operator, name).get("parallelism") == 3, "status.parallelism 3")
    scale = client.CustomObjectsApi(operator.admin).get_namespaced_custom_object_scale(
        crd.GROUP, crd.VERSION, operator.watched, crd.PLURAL, name
    )
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == f"weir.dev/job={name}"


def test_a_rescale_starts_no_new_worker_while_a_pod_of_the_old_parallelism_is_still_there(
    operator: Operator,
) -> None:
    name = "drained-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, parallelism=2, upgradeMode="stateless"))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    core = client.CoreV1Api(operator.admin)
    for index in range(2):
        _create_pod(operator, name, index)

    client.CustomObjectsApi(operator.admin).patch_namespaced_custom_object_scale(
        crd.GROUP, crd.VERSION, operator.watched, crd.PLURAL, name, {"spec": {"replicas": 3}},
        _content_type=MERGE_PATCH,
    )

    operator.wait(lambda: _stateful_set(operator, name).spec.replicas == 0, "the old workers scaled to 0")
    time.sleep(2)  # resyncs every 1 s: the new workers must wait for the old pods
    assert _stateful_set(operator, name).spec.replicas == 0
    assert _condition(_status(operator, name), "Progressing").get("status") == "True"

    for index in range(2):
        core.delete_namespaced_pod(f"{name}-{index}", operator.watched)

    operator.wait(lambda: _stateful_set(operator, name).spec.replicas == 3, "3 new workers")
    env = {e.name: e.value for e in _stateful_set(operator, name).spec.template.spec.containers[0].env}
    assert env[render.ENV_WORKERS] == "3"


def test_a_scale_whose_savepoint_fails_keeps_the_old_workers_and_reports_degraded(operator: Operator) -> None:
    name = "keyed-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, parallelism=1))  # upgradeMode: savepoint (default)
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    _set_ready(operator, name, 1)
    operator.wait(lambda: _status(operator, name).get("phase") == "Running", "phase Running")

    client.CustomObjectsApi(operator.admin).patch_namespaced_custom_object(
        crd.GROUP, crd.VERSION, operator.watched, crd.PLURAL, name, {"spec": {"parallelism": 2}},
        _content_type=MERGE_PATCH,
    )

    # No worker answers on this API server (no pods): the savepoint fails, nothing is replaced.
    operator.wait(
        lambda: _condition(_status(operator, name), "Degraded").get("reason") == "SavepointFailed",
        "Degraded SavepointFailed",
    )
    status = _status(operator, name)
    assert _stateful_set(operator, name).spec.replicas == 1
    assert status["lastSavepoint"]["trigger"] == "upgrade" and status["lastSavepoint"]["error"]
    assert "intent" not in status
    _wait_events(operator, name, lambda events: any(
        e.reason == "SavepointFailed" and e.type == "Warning" for e in events), "a SavepointFailed Warning")


def test_crash_looping_worker_pods_make_the_job_degraded_with_restart_counts(operator: Operator) -> None:
    name = "crashy-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, parallelism=1))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    core = client.CoreV1Api(operator.admin)
    pod = _create_pod(operator, name, 0)
    core.patch_namespaced_pod_status(
        pod.metadata.name,
        operator.watched,
        {"status": {"phase": "Running", "containerStatuses": [{
            "name": "worker", "image": "weir:test", "imageID": "", "ready": False, "restartCount": 6,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}},
            "lastState": {}}]}},
        _content_type=MERGE_PATCH,
    )

    operator.wait(
        lambda: _condition(_status(operator, name), "Degraded").get("reason") == "WorkersCrashLooping",
        "Degraded WorkersCrashLooping",
    )
    status = _status(operator, name)
    assert status["workerRestarts"] == 6
    assert "worker 0: CrashLoopBackOff (6 restarts)" in _condition(status, "Degraded")["message"]
    _wait_events(operator, name, lambda events: any(
        e.reason == "WorkersCrashLooping" and e.type == "Warning" for e in events),
        "a WorkersCrashLooping Warning event")


def test_secret_values_never_reach_the_status_events_or_config_map(operator: Operator) -> None:
    name = "secretive-" + uuid.uuid4().hex[:6]
    core = client.CoreV1Api(operator.admin)
    core.create_namespaced_secret(
        operator.watched,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"{name}-creds"),
            string_data={"AWS_ACCESS_KEY_ID": SECRET_VALUE, "AWS_SECRET_ACCESS_KEY": SECRET_VALUE,
                         "username": SECRET_VALUE, "password": SECRET_VALUE},
        ),
    )
    body = _job_body(
        operator, name,
        kafka={"bootstrapServers": "kafka:9093", "sasl": {
            "mechanism": "SCRAM-SHA-512",
            "usernameSecret": {"name": f"{name}-creds", "key": "username"},
            "passwordSecret": {"name": f"{name}-creds", "key": "password"}}},
        checkpoint={"url": "s3://weir-checkpoints/jobs", "credentialsSecret": {"name": f"{name}-creds"}},
    )
    _create(operator, body)
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    _set_ready(operator, name, 1)
    operator.wait(lambda: _status(operator, name).get("phase") == "Running", "phase Running")

    config_map = core.read_namespaced_config_map(render.config_map_name(name), operator.watched)
    env = _stateful_set(operator, name).spec.template.spec.containers[0].env
    assert SECRET_VALUE not in json.dumps(config_map.data)
    assert SECRET_VALUE not in json.dumps(_status(operator, name))
    assert all(SECRET_VALUE not in (e.message or "") for e in _events(operator, name))
    assert SECRET_VALUE not in operator.log.read_text(errors="replace")
    by_name = {e.name: e for e in env}
    assert by_name["AWS_SECRET_ACCESS_KEY"].value is None
    assert by_name["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == f"{name}-creds"


def test_a_pod_template_the_api_server_refuses_stalls_the_job_with_its_message_until_the_spec_is_fixed(
    operator: Operator,
) -> None:
    name = "refused-" + uuid.uuid4().hex[:6]
    # The models accept any Affinity object; the API server cannot convert this one (HTTP 500).
    _create(operator, _job_body(operator, name, podTemplate={"affinity": {"nodeAffinity": "yes"}}))

    operator.wait(lambda: _condition(_status(operator, name), "Stalled").get("status") == "True",
                  "Stalled", timeout=30)
    status = _status(operator, name)
    stalled = _condition(status, "Stalled")
    assert stalled["reason"] == "ApplyFailed"
    assert f"StatefulSet {operator.watched}/{name}: HTTP 500" in stalled["message"]
    assert "nodeAffinity" in stalled["message"]  # the server's own words
    assert status["phase"] == "Failed" and status["error"] in stalled["message"]
    assert status["applyFailure"]["attempts"] >= 1
    assert _stateful_set(operator, name) is None
    events = _wait_events(operator, name, lambda events: any(e.reason == "ApplyFailed" for e in events),
                          "an ApplyFailed event")
    warnings = [e for e in events if e.type == "Warning" and e.reason == "ApplyFailed"]
    assert len(warnings) == 1 and "nodeAffinity" in warnings[0].message
    time.sleep(3)  # resyncs every 1 s: retried with a back-off (10 s first), not in a loop
    assert _status(operator, name)["applyFailure"]["attempts"] <= 2
    assert len([e for e in _events(operator, name) if e.reason == "ApplyFailed"]) == 1

    client.CustomObjectsApi(operator.admin).patch_namespaced_custom_object(
        crd.GROUP, crd.VERSION, operator.watched, crd.PLURAL, name,
        [{"op": "remove", "path": "/spec/podTemplate"}], _content_type="application/json-patch+json",
    )

    # A new generation is applied at once, not after the back-off.
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet of the fixed spec",
                  timeout=8)
    operator.wait(lambda: _condition(_status(operator, name), "Stalled").get("status") == "False",
                  "Stalled cleared")
    status = _status(operator, name)
    assert "applyFailure" not in status and "error" not in status
    _wait_events(operator, name, lambda events: any(e.reason == "StalledCleared" for e in events),
                 "a StalledCleared event")


def test_a_parallelism_above_the_input_partition_count_is_capped_with_a_condition_naming_both(
    operator: Operator,
) -> None:
    name = "capped-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, parallelism=12, upgradeMode="stateless"))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    assert _stateful_set(operator, name).spec.replicas == 12  # nothing is known about the topic yet

    # What a reconcile learns from the workers' /status (no worker runs on this API server). The
    # operator writes the whole status: repeat the patch if one of its writes raced it.
    def reported() -> bool:
        if (_status(operator, name).get("inputPartitions") or {}).get("events") != 8:
            client.CustomObjectsApi(operator.admin).patch_namespaced_custom_object_status(
                crd.GROUP, crd.VERSION, operator.watched, crd.PLURAL, name,
                {"status": {"inputPartitions": {"events": 8}}}, _content_type=MERGE_PATCH,
            )
        return _condition(_status(operator, name), "Degraded").get("reason") == "ParallelismCapped"

    operator.wait(reported, "Degraded ParallelismCapped")
    operator.wait(lambda: _stateful_set(operator, name).spec.replicas == 8, "8 workers")
    env = {e.name: e.value for e in _stateful_set(operator, name).spec.template.spec.containers[0].env}
    assert env[render.ENV_WORKERS] == "8"
    message = "parallelism 12 exceeds the 8 partitions of events; running 8 workers"
    assert _condition(_status(operator, name), "Degraded")["message"] == message
    assert _job(operator, name)["spec"]["parallelism"] == 12  # the user's spec is left as written
    _wait_events(operator, name, lambda events: any(
        e.type == "Warning" and e.reason == "ParallelismCapped" and message in e.message for e in events),
        "a ParallelismCapped Warning")


def test_deleting_the_stream_job_removes_its_children(operator: Operator) -> None:
    name = "doomed-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")

    _delete(operator, name)

    core = client.CoreV1Api(operator.admin)

    def gone() -> bool:
        names = {c.metadata.name for c in core.list_namespaced_config_map(operator.watched).items}
        services = {s.metadata.name for s in core.list_namespaced_service(operator.watched).items}
        return (
            _stateful_set(operator, name) is None
            and render.config_map_name(name) not in names
            and name not in services
        )

    operator.wait(gone, "children deleted")


def _env_of(op: Operator, name: str) -> dict[str, str]:
    return {e.name: e.value for e in _stateful_set(op, name).spec.template.spec.containers[0].env or ()}


def _patch_spec(op: Operator, name: str, changes: dict[str, Any]) -> None:
    client.CustomObjectsApi(op.admin).patch_namespaced_custom_object(
        crd.GROUP, crd.VERSION, op.watched, crd.PLURAL, name, {"spec": changes}, _content_type=MERGE_PATCH,
    )


def test_the_lifecycle_states_and_events_follow_the_stateful_sets_status_through_an_upgrade(
    operator: Operator,
) -> None:
    name = "lifecycle-" + uuid.uuid4().hex[:6]
    upgrade = {"stabilityWindow": "2s", "readinessTimeout": "5m"}
    # last-state: an upgrade at the same parallelism takes no savepoint (none could answer here).
    _create(operator, _job_body(operator, name, upgradeMode="last-state", upgrade=upgrade,
                                env=[{"name": "GREETING", "value": "one"}]))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    operator.wait(lambda: _status(operator, name).get("lifecycleState") == "Stabilizing", "Stabilizing")
    _set_ready(operator, name, 1)
    operator.wait(lambda: _status(operator, name).get("lifecycleState") == "Stable", "Stable")
    first = _status(operator, name)
    assert first["stable"]["generation"] == 1
    assert first["lastStableSpec"]["env"] == [{"name": "GREETING", "value": "one"}]

    _patch_spec(operator, name, {"env": [{"name": "GREETING", "value": "two"}]})

    operator.wait(lambda: _env_of(operator, name).get("GREETING") == "two", "the new template applied")
    # The StatefulSet's status still describes the old pods (observedGeneration behind): the new
    # version is not ready, so the job is not stable and nothing is recorded as stable.
    time.sleep(4)
    status = _status(operator, name)
    assert status["lifecycleState"] == "Stabilizing", status
    assert status["stable"]["generation"] == 1 and status["readyWorkers"] == 0
    assert status["lastStableSpec"]["env"] == [{"name": "GREETING", "value": "one"}]
    assert not any(e.reason == "Upgraded" for e in _events(operator, name))

    _set_ready(operator, name, 1)

    operator.wait(lambda: (_status(operator, name).get("stable") or {}).get("generation") == 2,
                  "generation 2 stable")
    status = _status(operator, name)
    assert status["lifecycleState"] == "Stable"
    assert status["lastStableSpec"]["env"] == [{"name": "GREETING", "value": "two"}]
    lifecycle = {"Deploying", "Stable", "Deployed", "Upgrading", "Upgraded"}
    _wait_events(operator, name, lambda events: lifecycle <= {e.reason for e in events}, "lifecycle events")


def test_an_upgrade_that_never_becomes_ready_is_rolled_back_to_the_last_stable_stateful_set(
    operator: Operator,
) -> None:
    name = "rollback-" + uuid.uuid4().hex[:6]
    upgrade = {"stabilityWindow": "1s", "readinessTimeout": "6s"}
    _create(operator, _job_body(operator, name, upgradeMode="last-state", upgrade=upgrade,
                                env=[{"name": "GREETING", "value": "stable"}]))
    operator.wait(lambda: _stateful_set(operator, name) is not None, "the StatefulSet")
    _set_ready(operator, name, 1)
    operator.wait(lambda: _status(operator, name).get("lifecycleState") == "Stable", "Stable")
    stable_template = _stateful_set(operator, name).spec.template.spec.containers[0]

    _patch_spec(operator, name, {"env": [{"name": "GREETING", "value": "broken"}]})

    operator.wait(lambda: _env_of(operator, name).get("GREETING") == "broken", "the new template applied")
    # Nobody marks the new pods ready: after readinessTimeout the last stable spec is applied again.
    operator.wait(lambda: _env_of(operator, name).get("GREETING") == "stable",
                  "the stable template re-applied", timeout=40)
    rolled = _stateful_set(operator, name).spec.template.spec.containers[0]
    assert rolled.env == stable_template.env and rolled.image == stable_template.image
    assert _status(operator, name)["lifecycleState"] == "RollingBack"
    assert _job(operator, name)["spec"]["env"] == [{"name": "GREETING", "value": "broken"}]  # left as written

    _set_ready(operator, name, 1)

    operator.wait(lambda: _status(operator, name).get("lifecycleState") == "RolledBack", "RolledBack")
    status = _status(operator, name)
    degraded = _condition(status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "RolledBack", degraded
    assert "generation 2" in degraded["message"], degraded
    assert status["rollback"]["fromGeneration"] == 2 and status["stable"]["generation"] == 1
    time.sleep(3)  # it stays rolled back: the failed spec is not applied again
    assert _env_of(operator, name).get("GREETING") == "stable"
    _wait_events(operator, name, lambda events: {"RollingBack", "RolledBack"} <= {e.reason for e in events},
                 "the rollback events")


def _put_store(s3: S3Helper, prefix: str) -> set[str]:
    """A job's store directory as its workers leave it: checkpoints, shared files, a savepoint."""
    keys = {
        f"{prefix}/checkpoints/0000000003-w0/manifest.json",
        f"{prefix}/checkpoints/0000000003-w0/orders-0/CURRENT",
        f"{prefix}/shared/orders-0/{uuid.uuid4().hex}-000012.sst",
        f"{prefix}/savepoints/sp-1/w0/manifest.json",
        f"{prefix}/savepoints/sp-1/w0/orders-0.sst",
    }
    s3_client = s3.client()
    for key in keys:
        s3_client.put_object(Bucket=s3.bucket, Key=key, Body=os.urandom(64))
    return keys


def _keys(s3: S3Helper, prefix: str) -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", ())}


def _gone(op: Operator, name: str) -> bool:
    try:
        _job(op, name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _store_spec(s3: S3Helper, policy: str) -> dict[str, Any]:
    return {"url": f"s3://{s3.bucket}/weir", "endpoint": s3.endpoint, "region": s3.region,
            "cleanupPolicy": policy}


def test_cleanup_policy_delete_removes_the_jobs_store_on_deletion_and_retain_keeps_it(
    operator: Operator, s3: S3Helper
) -> None:
    doomed, kept = "cleaned-" + uuid.uuid4().hex[:6], "kept-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, doomed, checkpoint=_store_spec(s3, "delete")))
    _create(operator, _job_body(operator, kept, checkpoint=_store_spec(s3, "retain")))
    operator.wait(lambda: FINALIZER in (_job(operator, doomed)["metadata"].get("finalizers") or ()),
                  "the finalizer on the delete-policy job")
    operator.wait(lambda: _stateful_set(operator, kept) is not None, "the retain-policy job's StatefulSet")
    assert FINALIZER not in (_job(operator, kept)["metadata"].get("finalizers") or ())
    ns = operator.watched
    doomed_keys = _put_store(s3, f"weir/{ns}/{doomed}")
    kept_keys = _put_store(s3, f"weir/{ns}/{kept}")
    neighbour_keys = _put_store(s3, f"weir/{ns}/{doomed}-2")  # shares the name as a prefix

    _delete(operator, doomed)
    _delete(operator, kept)

    operator.wait(lambda: _gone(operator, doomed) and _gone(operator, kept), "both jobs deleted")
    assert _keys(s3, f"weir/{ns}/{doomed}/") == set()
    assert _keys(s3, f"weir/{ns}/{kept}/") == kept_keys
    assert _keys(s3, f"weir/{ns}/{doomed}-2/") == neighbour_keys
    assert _stateful_set(operator, doomed) is None
    events = {e.reason: e.message for e in _events(operator, doomed)}
    removed = f"removed {len(doomed_keys)} objects under s3://{s3.bucket}/weir/{ns}/{doomed}"
    assert removed in events["CleanedUp"]
    assert "CleanupFailed" not in events


def test_the_store_is_removed_only_after_the_last_worker_pod_is_gone(
    operator: Operator, s3: S3Helper
) -> None:
    name = "lingers-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, parallelism=1, checkpoint=_store_spec(s3, "delete")))
    operator.wait(lambda: FINALIZER in (_job(operator, name)["metadata"].get("finalizers") or ()),
                  "the finalizer")
    keys = _put_store(s3, f"weir/{operator.watched}/{name}")
    core = client.CoreV1Api(operator.admin)
    # A worker pod that outlives its StatefulSet (terminating: it may still write a checkpoint).
    _create_pod(operator, name, 0)

    _delete(operator, name)

    waiting = "waiting for 1 workers to stop before removing the store"
    operator.wait(lambda: _condition(_status(operator, name), "Progressing").get("message") == waiting,
                  "waiting for the pod")
    assert _stateful_set(operator, name) is None
    assert _keys(s3, f"weir/{operator.watched}/{name}/") == keys
    time.sleep(2)  # resyncs come and go (every 1 s here): still held while the pod is there
    assert not _gone(operator, name) and _keys(s3, f"weir/{operator.watched}/{name}/") == keys

    core.delete_namespaced_pod(f"{name}-0", operator.watched)

    operator.wait(lambda: _gone(operator, name), "deleted once the pod is gone")
    assert _keys(s3, f"weir/{operator.watched}/{name}/") == set()


def test_a_store_unreachable_at_deletion_stalls_it_and_the_cleanup_finishes_when_the_store_returns(
    operator: Operator, s3: S3Helper
) -> None:
    name = "outage-" + uuid.uuid4().hex[:6]
    _create(operator, _job_body(operator, name, checkpoint=_store_spec(s3, "delete")))
    operator.wait(lambda: FINALIZER in (_job(operator, name)["metadata"].get("finalizers") or ()),
                  "the finalizer")
    prefix = f"weir/{operator.watched}/{name}/"
    _put_store(s3, prefix.rstrip("/"))

    s3.stop()
    try:
        _delete(operator, name)
        operator.wait(lambda: _condition(_status(operator, name), "Stalled").get("reason") == "CleanupFailed",
                      "Stalled: CleanupFailed", timeout=60)
        status = _status(operator, name)
        assert status["phase"] == "Deleting"
        assert f"s3://{s3.bucket}/weir/{operator.watched}/{name}" in _condition(status, "Stalled")["message"]
        assert not _gone(operator, name)  # held by the finalizer while the store is away
    finally:
        s3.start()

    operator.wait(lambda: _gone(operator, name), "the deletion finished after the store returned", timeout=90)
    assert _keys(s3, prefix) == set()
    reasons = [e.reason for e in _events(operator, name)]
    assert "CleanupFailed" in reasons and "CleanedUp" in reasons


def test_a_second_operator_replica_stands_by_while_the_first_holds_the_lease(
    operator: Operator, kube: Running, tmp_path: Path
) -> None:
    coordination = client.CoordinationV1Api(operator.admin)
    holder = coordination.read_namespaced_lease(operator.lease, operator.namespace).spec.holder_identity
    standby_log = tmp_path / "standby.log"
    health_port, metrics_port = _free_port(), _free_port()
    with standby_log.open("wb") as sink:
        # Admin credentials: what is under test is the Lease, not RBAC.
        standby = subprocess.Popen(
            [sys.executable, "-m", "weir_operator", f"--namespace={operator.watched}",
             f"--metrics-port={metrics_port}", f"--health-port={health_port}", "--worker-image=weir:test",
             f"--leader-election-lease={operator.namespace}/{operator.lease}",
             f"--kubeconfig={kube.info['kubeconfig']}"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "POD_NAME": "standby"},
        )
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{health_port}/readyz") is not None, 20, "standby ready")
        time.sleep(4)  # two retry periods
        metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics") or b""
        assert b"weir_operator_leader 0.0" in metrics
        assert b'weir_operator_reconciles_total{result="ok"}' not in metrics
        lease = coordination.read_namespaced_lease(operator.lease, operator.namespace)
        assert lease.spec.holder_identity == holder
    finally:
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(timeout=20) == 0, standby_log.read_text()
