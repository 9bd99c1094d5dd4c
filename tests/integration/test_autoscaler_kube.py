"""The autoscaler on the real kube-apiserver, as the chart's ServiceAccount, with lag from the real broker.

No kubelet runs here, so the test plays the workers: it serves their control API (``/status``
with a known processing rate, ``/savepoint``) on 127.0.0.1, creates their pods and marks them
ready. The operator's controller (``handlers.Controller``, the code the operator process runs
for every event and resync) reads the lag of the job's real topic and acts by the path a
``kubectl scale`` takes: intent in status, savepoint with stop, old workers to 0, new ones
restoring from the savepoint.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import generate_latest

from harness import kube as kube_server
from harness.common import Running, wait_until
from harness.helm import Helm
from harness.kafka import KafkaHelper
from harness.manifests import MERGE_PATCH, apply, create_namespace, install_crd
from weir import spec
from weir_operator import crd, decide, handlers, kube, render
from weir_operator.lag import LagReader
from weir_operator.metrics import OperatorMetrics
from weir_operator.testing import FakeWorkerAPI, serve_workers, worker_status

pytestmark = [pytest.mark.kube, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weir-operator"
EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
PARTITIONS = 4
RATE = 50.0
"""Records per second each fake worker says it processes, fully busy."""


def fake_worker(index: int, topic: str) -> FakeWorkerAPI:
    """A worker's control API: a known processing rate, a fresh status, savepoints answered by id."""
    return FakeWorkerAPI(index, "file:///store/jobs/auto/savepoints", lambda: worker_status(
        index, input_partitions={topic: PARTITIONS}, records_per_second=RATE, busy_ratio=1.0,
        published_at=datetime.now(UTC),
    ))


@dataclass
class Cluster:
    admin: Any
    account: Any
    namespace: str


@pytest.fixture
def cluster(kube: Running, helm: Helm, tmp_path: Path) -> Iterator[Cluster]:
    """A watched namespace and the chart's RBAC for it; yields an admin and the chart's account."""
    suffix = uuid.uuid4().hex[:8]
    with kube_server.api_client(kube.info["kubeconfig"]) as admin:
        install_crd(admin, crd.crd())
        namespace = create_namespace(admin, f"weir-as-{suffix}")
        watched = create_namespace(admin, f"jobs-as-{suffix}")
        out = helm.run(["template", f"as-{suffix}", str(CHART), "--namespace", namespace,
                        "--set", "rbac.scope=namespace", "--set", f"rbac.namespaces={{{watched}}}"]).stdout
        objects = [doc for doc in yaml.safe_load_all(out) if doc]
        for obj in objects:
            if obj["kind"] in {"ServiceAccount", "Role", "RoleBinding"}:
                apply(admin, obj)
        account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        kubeconfig = kube_server.service_account_kubeconfig(kube, namespace, account)
        with kube_server.api_client(kubeconfig) as sa:
            wait_until(lambda: client.CustomObjectsApi(sa).list_namespaced_custom_object(
                crd.GROUP, crd.VERSION, watched, crd.PLURAL) is not None, 20, "the chart's RBAC")
            yield Cluster(admin, sa, watched)


def _body(namespace: str, name: str, kafka: KafkaHelper, topic: str) -> dict[str, Any]:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["parallelism"] = 1
    body["spec"]["kafka"] = {"bootstrapServers": kafka.bootstrap}
    body["spec"]["pipeline"]["source"]["topics"] = [topic]
    body["spec"]["autoscaler"] = {
        "enabled": True, "metricsWindow": "2s", "scaleUpStabilizationWindow": "0s",
        "scaleDownStabilizationWindow": "1h", "cooldown": "1s", "catchUpDuration": "10s",
    }
    return body


class Kubelet:
    """Plays the kubelet for one job: a ready pod per replica, the StatefulSet's status to match."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.core, self.apps = client.CoreV1Api(cluster.admin), client.AppsV1Api(cluster.admin)

    def sync(self) -> None:
        namespace = self.cluster.namespace
        sts = self.apps.read_namespaced_stateful_set(self.name, namespace)
        replicas = sts.spec.replicas or 0
        selector = render.selector_string(self.name)
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        present = set()
        for pod in pods:
            index = int(pod.metadata.labels[render.POD_INDEX_LABEL])
            if index >= replicas:
                self.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
            else:
                present.add(index)
        for index in sorted(set(range(replicas)) - present):
            try:
                self.core.create_namespaced_pod(namespace, client.V1Pod(
                    metadata=client.V1ObjectMeta(
                        name=f"{self.name}-{index}",
                        labels={**render.selector(self.name), render.POD_INDEX_LABEL: str(index)}),
                    spec=client.V1PodSpec(containers=[client.V1Container(name="worker", image="weir:test")]),
                ))
            except ApiException as exc:
                if exc.status != 409:  # the old pod of this index is still being deleted
                    raise
                continue
            ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
            self.core.patch_namespaced_pod_status(f"{self.name}-{index}", namespace, ready)
        self.apps.patch_namespaced_stateful_set_status(self.name, namespace, {
            "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                       "currentReplicas": replicas, "updatedReplicas": replicas,
                       "observedGeneration": sts.metadata.generation}}, _content_type=MERGE_PATCH)


@pytest.mark.timeout(240)
def test_the_operator_scales_a_lagging_job_up_by_the_scale_path_and_kubectl_scale_then_sets_it_once(
    cluster: Cluster, kafka: KafkaHelper
) -> None:
    name = "auto-" + uuid.uuid4().hex[:6]
    topic = kafka.unique("src")
    kafka.create_topic(topic, PARTITIONS)
    # 4000 records no one has read: lag 4000 (startFrom earliest, no commit yet).
    kafka.produce(topic, [
        {"value": orjson.dumps({"ts": i}), "key": f"k{i}".encode(), "partition": i % PARTITIONS}
        for i in range(4000)
    ])
    fakes = [fake_worker(i, topic) for i in range(PARTITIONS)]
    metrics = OperatorMetrics()
    with serve_workers(fakes) as urls:
        platform = kube.KubernetesPlatform(
            cluster.account, worker_image="weir:test", savepoint_timeout_s=10,
            worker_url=lambda _name, _ns, index: urls[index], lag_reader=LagReader({}),
        )
        controller = handlers.Controller(
            cluster.account, platform, metrics, policy=decide.Policy(autoscaler_interval=timedelta(0))
        )
        custom = client.CustomObjectsApi(cluster.admin)
        custom.create_namespaced_custom_object(crd.GROUP, crd.VERSION, cluster.namespace, crd.PLURAL,
                                               _body(cluster.namespace, name, kafka, topic))
        kubelet = Kubelet(cluster, name)

        def status() -> dict[str, Any]:
            body = custom.get_namespaced_custom_object(
                crd.GROUP, crd.VERSION, cluster.namespace, crd.PLURAL, name)
            found: dict[str, Any] = body.get("status") or {}
            return found

        def reconcile_until(check: Any, what: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert controller._reconcile(cluster.namespace, name) == "ok"
                kubelet.sync()
                if check():
                    return
                time.sleep(0.3)
            shown = orjson.dumps(status()).decode()[:3000]
            raise AssertionError(f"{what}: not within {timeout}s; status {shown}")

        sts = client.AppsV1Api(cluster.admin)
        reconcile_until(lambda: status().get("phase") == "Running", "phase Running")
        def replicas() -> int:
            return int(sts.read_namespaced_stateful_set(name, cluster.namespace).spec.replicas or 0)

        reconcile_until(lambda: replicas() == 4, "the autoscaler's 4 workers")

        current = status()
        auto = current["autoscaler"]
        decision = auto["history"][0]
        assert (decision["direction"], decision["fromParallelism"], decision["toParallelism"]) == ("up", 1, 4)
        assert decision["applied"] and decision["reason"].startswith("lag 4.0k records")
        assert "1 worker processes 50/s at busy 1.00: 50/s each at full load" in decision["reason"]
        assert auto["inputs"]["lagRecords"] == 4000 and auto["inputs"]["partitions"] == PARTITIONS
        # The path of a scale: a savepoint with stop, then the new workers restore from it.
        container = sts.read_namespaced_stateful_set(name, cluster.namespace).spec.template.spec.containers[0]
        env = {e.name: e.value for e in container.env}
        assert env[render.ENV_WORKERS] == "4"
        assert env[render.ENV_RESTORE_FROM].startswith("file:///store/jobs/auto/savepoints/scale-")
        assert len(fakes[0].taken) == 1  # the one worker that ran took one savepoint
        events = client.CoreV1Api(cluster.admin).list_namespaced_event(cluster.namespace).items
        reasons = [e.reason for e in events if e.involved_object.name == name]
        assert "AutoscalerScaleUp" in reasons and "Scaling" in reasons
        body = custom.get_namespaced_custom_object(
            crd.GROUP, crd.VERSION, cluster.namespace, crd.PLURAL, name)
        assert body["spec"]["parallelism"] == 1  # the autoscaler never writes the spec

        # kubectl scale --replicas=2 while the autoscaler is on: the new running parallelism, once.
        custom.patch_namespaced_custom_object_scale(
            crd.GROUP, crd.VERSION, cluster.namespace, crd.PLURAL, name, {"spec": {"replicas": 2}},
            _content_type=MERGE_PATCH,
        )
        reconcile_until(lambda: status()["autoscaler"]["history"][0]["direction"] == "manual",
                        "a manual decision")
        assert status()["autoscaler"]["parallelism"] == 2
        reconcile_until(lambda: replicas() == 2, "2 workers after kubectl scale")

    text = generate_latest(metrics.registry).decode()
    assert 'weir_operator_autoscaler_decisions_total{applied="true",direction="up"} 1.0' in text
    assert 'weir_operator_autoscaler_decisions_total{applied="true",direction="manual"} 1.0' in text
