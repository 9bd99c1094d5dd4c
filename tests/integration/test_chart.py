"""The weir-operator Helm chart: it lints, renders what the values say, and its RBAC on the real
kube-apiserver grants the operator exactly what it needs and nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube as kube_server
from harness.common import Running, wait_until
from harness.helm import Helm
from harness.manifests import MERGE_PATCH, apply, create_namespace, install_crd
from weir import spec
from weir_operator import crd, permissions, render

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "weir-operator"
EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"


def template(
    helm: Helm, *args: str, release: str = "weir", namespace: str = "weir-system"
) -> list[dict[str, Any]]:
    out = helm.run(["template", release, str(CHART), "--namespace", namespace, *args]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objects, kind)
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for o in objects if o["kind"] in ("Role", "ClusterRole") for rule in o["rules"]]


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "rbac.scope=namespace"],
        ["--set", "serviceMonitor.enabled=true", "--set", "replicaCount=1"],
    ],
    ids=["defaults", "namespace-scope", "service-monitor"],
)
def test_helm_lint_passes_strictly(helm: Helm, values: list[str]) -> None:
    done = helm.run(["lint", "--strict", str(CHART), *values])

    assert "0 chart(s) failed" in done.stdout


def test_the_default_install_is_a_two_replica_operator_with_a_restrictive_security_context(
    helm: Helm,
) -> None:
    objects = template(helm)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    assert deployment["spec"]["replicas"] == 2
    assert container["command"] == ["python", "-m", "weir_operator"]
    assert "--all-namespaces" in container["args"]
    assert "--metrics-port=8080" in container["args"]
    assert "--leader-election-lease=weir-system/weir-weir-operator-leader" in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert not find(objects, "ServiceMonitor")


def test_the_worker_image_defaults_to_the_operator_image_and_can_be_set(helm: Helm) -> None:
    def worker_image(*values: str) -> str:
        args = one(template(helm, *values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        return next(a for a in args if a.startswith("--worker-image=")).split("=", 1)[1]

    assert worker_image("--set", "image.tag=1.2.3") == "ghcr.io/weir-dev/weir:1.2.3"
    assert worker_image("--set", "workerImage=registry.example.com/jobs:7") == "registry.example.com/jobs:7"


def test_the_service_monitor_scrapes_the_metrics_service_when_enabled(helm: Helm) -> None:
    objects = template(helm, "--set", "serviceMonitor.enabled=true")
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")

    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_the_chart_ships_the_generated_crd(helm: Helm) -> None:
    objects = template(helm, "--include-crds")

    assert one(objects, "CustomResourceDefinition") == crd.crd()


def test_namespace_scope_grants_roles_only_in_the_watched_namespaces(helm: Helm) -> None:
    objects = template(helm, "--set", "rbac.scope=namespace", "--set", "rbac.namespaces={shop,billing}")
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    roles = find(objects, "Role", "weir-weir-operator")

    assert {r["metadata"]["namespace"] for r in roles} == {"shop", "billing"}
    assert {r["metadata"]["namespace"] for r in find(objects, "RoleBinding", "weir-weir-operator")} == {
        "shop",
        "billing",
    }
    assert find(objects, "ClusterRole") == [] and find(objects, "ClusterRoleBinding") == []
    assert [a for a in container["args"] if a.startswith("--namespace")] == [
        "--namespace=shop",
        "--namespace=billing",
    ]
    assert "--all-namespaces" not in container["args"]


def test_an_unknown_rbac_scope_fails_the_render_naming_the_value(helm: Helm) -> None:
    done = helm.run(["template", "weir", str(CHART), "--set", "rbac.scope=everywhere"], check=False)

    assert done.returncode != 0
    assert 'rbac.scope must be cluster or namespace (got "everywhere")' in done.stderr


def _as_rules(listed: list[permissions.Rule], lease: str | None = None) -> list[dict[str, Any]]:
    """``permissions.RULES`` entries as the chart writes them."""
    out = []
    for rule in listed:
        written: dict[str, Any] = {"apiGroups": [rule.group], "resources": [rule.resource]}
        if rule.named:
            written["resourceNames"] = [lease]
        written["verbs"] = list(rule.verbs)
        out.append(written)
    return out


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_the_chart_grants_exactly_the_permissions_the_operator_lists(helm: Helm, scope: str) -> None:
    objects = template(helm, "--set", f"rbac.scope={scope}", "--set", "rbac.namespaces={shop}")
    by_scope = {s: [r for r in permissions.RULES if r.scope == s] for s in ("namespace", "cluster", "lease")}
    lease_role = find(objects, "Role", "weir-weir-operator-leader-election")[0]

    if scope == "cluster":
        assert [o["rules"] for o in find(objects, "ClusterRole")] == [
            _as_rules(by_scope["cluster"] + by_scope["namespace"])
        ]
        assert find(objects, "Role", "weir-weir-operator") == []
    else:
        assert find(objects, "ClusterRole") == []
        roles = find(objects, "Role", "weir-weir-operator")
        assert [(o["metadata"]["namespace"], o["rules"]) for o in roles] == [
            ("shop", _as_rules(by_scope["namespace"]))
        ]
    assert lease_role["metadata"]["namespace"] == "weir-system"
    assert lease_role["rules"] == _as_rules(by_scope["lease"], lease="weir-weir-operator-leader")


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_no_rule_grants_secrets_pod_writes_or_wildcards(helm: Helm, scope: str) -> None:
    granted = rules(template(helm, "--set", f"rbac.scope={scope}"))

    assert granted
    for rule in granted:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        if "pods" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}


# --------------------------------------------------------------------------- on the API server


@dataclass
class Installed:
    release: str
    namespace: str  # where the operator runs
    watched: str  # a namespace it manages StreamJobs in
    other: str  # a namespace it must not touch (namespace scope)
    sa: Any  # ApiClient acting as the operator's ServiceAccount
    admin: Any
    objects: list[dict[str, Any]]


@pytest.fixture(scope="module")
def admin(kube: Running) -> Iterator[Any]:
    with kube_server.api_client(kube.info["kubeconfig"]) as api:
        install_crd(api, crd.crd())
        yield api


@pytest.fixture(scope="module", params=["cluster", "namespace"])
def installed(request: pytest.FixtureRequest, kube: Running, admin: Any, helm: Helm) -> Iterator[Installed]:
    """The chart rendered with `helm template` and applied (RBAC, ServiceAccount, Deployment, ...)."""
    scope = request.param
    suffix = uuid.uuid4().hex[:8]
    release, namespace = f"weir-{suffix}", create_namespace(admin, f"weir-op-{suffix}")
    watched, other = create_namespace(admin, f"jobs-{suffix}"), create_namespace(admin, f"other-{suffix}")
    values = ["--set", f"rbac.scope={scope}", "--set", f"rbac.namespaces={{{watched}}}"]
    objects = template(helm, *values, release=release, namespace=namespace)
    for obj in objects:
        apply(admin, obj)
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    try:
        with kube_server.api_client(kube_server.service_account_kubeconfig(kube, namespace, account)) as sa:
            # The authorizer reads bindings from an informer cache: wait until every grant shows.
            custom = client.CustomObjectsApi(sa)
            lease = f"{release}-weir-operator-leader"
            grants = [
                lambda: custom.list_namespaced_custom_object(crd.GROUP, crd.VERSION, watched, crd.PLURAL),
                lambda: client.CoordinationV1Api(sa).read_namespaced_lease(lease, namespace),
            ]
            if scope == "cluster":
                grants.append(lambda: client.ApiextensionsV1Api(sa).list_custom_resource_definition(limit=1))
            wait_until(lambda: all(_authorized(grant) for grant in grants), 15, "the chart's RBAC")
            yield Installed(release, namespace, watched, other, sa, admin, objects)
    finally:
        # Cluster-scoped objects outlive the test namespaces; remove them.
        rbac = client.RbacAuthorizationV1Api(admin)
        for obj in objects:
            if obj["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(obj["metadata"]["name"])
            elif obj["kind"] == "ClusterRole":
                rbac.delete_cluster_role(obj["metadata"]["name"])


def _authorized(call: Any) -> bool:
    """Whether the API server lets the call through (a 404 still means it was authorized)."""
    try:
        call()
    except ApiException as exc:
        return exc.status != 403
    return True


def _forbidden(call: Any) -> bool:
    try:
        call()
    except ApiException as exc:
        return exc.status == 403
    return False


@pytest.mark.kube
def test_the_rendered_chart_objects_are_accepted_by_the_api_server(installed: Installed) -> None:
    apps = client.AppsV1Api(installed.admin)
    deployment = apps.read_namespaced_deployment(f"{installed.release}-weir-operator", installed.namespace)

    assert deployment.spec.replicas == 2
    assert deployment.spec.template.spec.containers[0].security_context.read_only_root_filesystem is True
    kinds = {o["kind"] for o in installed.objects}
    assert {"ServiceAccount", "Deployment", "Service"} <= kinds
    assert {"ClusterRole", "ClusterRoleBinding"} <= kinds or {"Role", "RoleBinding"} <= kinds


@pytest.mark.kube
def test_the_operator_account_can_reconcile_a_stream_job_into_its_children(installed: Installed) -> None:
    job_body = yaml.safe_load(EXAMPLE.read_text())
    job_body["metadata"]["namespace"] = installed.watched
    created = client.CustomObjectsApi(installed.admin).create_namespaced_custom_object(
        crd.GROUP, crd.VERSION, installed.watched, crd.PLURAL, job_body
    )
    job = spec.StreamJob.model_validate(created)
    children = render.render(job, render.RenderOptions(default_image="weir:test"))

    # As the operator: create the children, then change them, as a reconcile would.
    for child in children.all():
        apply(installed.sa, child)
    scaled = render.render(job, render.RenderOptions(default_image="weir:test", replicas=2))
    apply(installed.sa, scaled.stateful_set)
    sa_custom = client.CustomObjectsApi(installed.sa)
    sa_custom.patch_namespaced_custom_object_status(
        crd.GROUP,
        crd.VERSION,
        installed.watched,
        crd.PLURAL,
        "revenue",
        {"status": {"phase": "Deploying", "parallelism": 1, "selector": render.selector_string("revenue")}},
        _content_type=MERGE_PATCH,
    )
    sa_custom.patch_namespaced_custom_object(
        crd.GROUP,
        crd.VERSION,
        installed.watched,
        crd.PLURAL,
        "revenue",
        {"metadata": {"finalizers": ["weir.dev/checkpoint-cleanup"]}},
        _content_type=MERGE_PATCH,
    )
    client.CoreV1Api(installed.sa).create_namespaced_event(
        installed.watched,
        client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="revenue-"),
            involved_object=client.V1ObjectReference(
                api_version=spec.API_VERSION, kind="StreamJob", name="revenue", namespace=installed.watched
            ),
            reason="Deploying",
            message="rendered 3 children",
            type="Normal",
        ),
    )

    sts = client.AppsV1Api(installed.admin).read_namespaced_stateful_set("revenue", installed.watched)
    assert sts.spec.replicas == 2
    status = client.CustomObjectsApi(installed.admin).get_namespaced_custom_object(
        crd.GROUP, crd.VERSION, installed.watched, crd.PLURAL, "revenue"
    )["status"]
    assert status["phase"] == "Deploying"
    assert client.CoreV1Api(installed.sa).list_namespaced_pod(installed.watched).items == []


@pytest.mark.kube
def test_the_operator_account_holds_only_its_own_lease(installed: Installed) -> None:
    coordination = client.CoordinationV1Api(installed.sa)
    lease_name = f"{installed.release}-weir-operator-leader"
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name=lease_name),
        spec=client.V1LeaseSpec(holder_identity="operator-0", lease_duration_seconds=15),
    )

    coordination.create_namespaced_lease(installed.namespace, lease)
    renewed = coordination.read_namespaced_lease(lease_name, installed.namespace)
    renewed.spec.holder_identity = "operator-1"
    coordination.replace_namespaced_lease(lease_name, installed.namespace, renewed)

    client.CoordinationV1Api(installed.admin).create_namespaced_lease(
        installed.namespace, client.V1Lease(metadata=client.V1ObjectMeta(name="someone-else"))
    )
    assert _forbidden(lambda: coordination.read_namespaced_lease("someone-else", installed.namespace))
    assert _forbidden(
        lambda: coordination.patch_namespaced_lease(
            "someone-else", installed.namespace, {"spec": {"holderIdentity": "me"}}
        )
    )


@pytest.mark.kube
def test_the_operator_account_cannot_read_secrets_create_pods_or_delete_stream_jobs(
    installed: Installed,
) -> None:
    core, custom = client.CoreV1Api(installed.sa), client.CustomObjectsApi(installed.sa)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="intruder"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )
    job_body = yaml.safe_load(EXAMPLE.read_text())
    job_body["metadata"] = {"name": "by-operator", "namespace": installed.watched}

    assert _forbidden(lambda: core.list_namespaced_secret(installed.watched))
    assert _forbidden(lambda: core.read_namespaced_secret("s3-creds", installed.watched))
    assert _forbidden(lambda: core.list_namespaced_secret(installed.namespace))
    assert _forbidden(lambda: core.create_namespaced_pod(installed.watched, pod))
    assert _forbidden(lambda: core.delete_collection_namespaced_pod(installed.watched))
    assert _forbidden(
        lambda: custom.create_namespaced_custom_object(
            crd.GROUP, crd.VERSION, installed.watched, crd.PLURAL, job_body
        )
    )
    assert _forbidden(
        lambda: custom.delete_namespaced_custom_object(
            crd.GROUP, crd.VERSION, installed.watched, crd.PLURAL, "revenue"
        )
    )
    assert _forbidden(
        lambda: client.RbacAuthorizationV1Api(installed.sa).list_namespaced_role(installed.watched)
    )
    assert _forbidden(
        lambda: client.ApiextensionsV1Api(installed.sa).delete_custom_resource_definition(crd.CRD_NAME)
    )


@pytest.mark.kube
def test_the_operator_account_lists_crds_for_kopfs_resource_scanning_only_cluster_wide(
    installed: Installed,
) -> None:
    extensions = client.ApiextensionsV1Api(installed.sa)

    if find(installed.objects, "ClusterRole"):
        assert crd.CRD_NAME in [c.metadata.name for c in extensions.list_custom_resource_definition().items]
    else:  # namespace scope: kopf's scanning is off, nothing cluster-wide is granted
        assert _forbidden(lambda: extensions.list_custom_resource_definition())
    assert _forbidden(lambda: extensions.read_custom_resource_definition(crd.CRD_NAME))


@pytest.mark.kube
def test_with_namespace_scope_other_namespaces_are_out_of_reach(installed: Installed) -> None:
    apps, custom = client.AppsV1Api(installed.sa), client.CustomObjectsApi(installed.sa)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "probe", "namespace": installed.other},
        "data": {"a": "b"},
    }
    namespace_scope = find(installed.objects, "Role", f"{installed.release}-weir-operator")

    if namespace_scope:
        assert _forbidden(lambda: apps.list_namespaced_stateful_set(installed.other))
        assert _forbidden(
            lambda: custom.list_namespaced_custom_object(crd.GROUP, crd.VERSION, installed.other, crd.PLURAL)
        )
        assert _forbidden(lambda: apply(installed.sa, config_map))
    else:
        assert apps.list_namespaced_stateful_set(installed.other).items == []
        assert apply(installed.sa, config_map)["data"] == {"a": "b"}
    # kopf needs no namespace list in either scope (all namespaces, or exact names).
    assert _forbidden(lambda: client.CoreV1Api(installed.sa).list_namespace())
