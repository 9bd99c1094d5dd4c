"""The test kube-apiserver behaves like a cluster's: objects, CRDs with subresources, watches and RBAC."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from harness import kube as kube_server
from harness.common import Running, wait_until

pytestmark = pytest.mark.kube

GROUP, VERSION, PLURAL = "smoke.weir.dev", "v1", "widgets"
# The generated client defaults PATCH to JSON Patch, which a dict body is not: say which kind.
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "colour": {"type": "string"},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer"},
                                    "selector": {"type": "string"},
                                    "phase": {"type": "string"},
                                },
                            },
                        },
                    }
                },
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
            }
        ],
    },
}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def admin(kube: Running) -> Iterator[Any]:
    with kube_server.api_client(kube.info["kubeconfig"]) as api:
        yield api


@pytest.fixture
def namespace(admin: Any) -> str:
    """A fresh namespace; it is left behind, since without a namespace controller deletion never finishes."""
    name = _unique("smoke")
    client.CoreV1Api(admin).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


@pytest.fixture(scope="module")
def widgets_crd(admin: Any) -> dict[str, Any]:
    ext = client.ApiextensionsV1Api(admin)
    applied = ext.patch_custom_resource_definition(
        WIDGET_CRD["metadata"]["name"],
        WIDGET_CRD,
        field_manager="weir-smoke",
        force=True,
        _content_type=APPLY_PATCH,
    )

    def established() -> bool:
        crd = ext.read_custom_resource_definition(WIDGET_CRD["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_until(established, 30, "widgets CRD established")
    return dict(applied.to_dict())


def _widgets(admin: Any, namespace: str) -> Any:
    custom = client.CustomObjectsApi(admin)
    # The endpoint can lag the Established condition by a moment.
    wait_until(
        lambda: custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL) is not None,
        10,
        "widgets endpoint",
    )
    return custom


def test_a_configmap_round_trips_through_a_new_namespace(admin: Any) -> None:
    core = client.CoreV1Api(admin)
    ns = _unique("roundtrip")
    created = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    assert created.status.phase == "Active"
    data = {"greeting": "hello", "unicode": "naïve ⏱", "empty": ""}
    core.create_namespaced_config_map(
        ns,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings", labels={"app": "weir"}), data=data),
    )

    assert core.read_namespaced_config_map("settings", ns).data == data
    core.patch_namespaced_config_map("settings", ns, {"data": {"greeting": "bye"}}, _content_type=MERGE_PATCH)
    assert core.read_namespaced_config_map("settings", ns).data["greeting"] == "bye"
    labelled = core.list_namespaced_config_map(ns, label_selector="app=weir").items
    assert [c.metadata.name for c in labelled] == ["settings"]

    core.delete_namespaced_config_map("settings", ns)
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_config_map("settings", ns)
    assert gone.value.status == 404


def test_a_crd_applied_server_side_serves_status_and_scale_subresources(
    admin: Any, widgets_crd: dict[str, Any], namespace: str
) -> None:
    managers = {(m["manager"], m["operation"]) for m in widgets_crd["metadata"]["managed_fields"]}
    assert ("weir-smoke", "Apply") in managers
    # Applying the same manifest again is a no-op, as `kubectl apply --server-side` relies on.
    again = client.ApiextensionsV1Api(admin).patch_custom_resource_definition(
        WIDGET_CRD["metadata"]["name"], WIDGET_CRD, field_manager="weir-smoke", _content_type=APPLY_PATCH
    )
    assert again.metadata.generation == widgets_crd["metadata"]["generation"]

    custom = _widgets(admin, namespace)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"replicas": 1, "colour": "teal"},
        "status": {"phase": "ignored"},
    }
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    # With a status subresource, writes to the main resource cannot set status.
    assert "status" not in created
    assert created["metadata"]["generation"] == 1

    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "w1",
        {"status": {"replicas": 1, "selector": "app=w1", "phase": "Running"}},
        _content_type=MERGE_PATCH,
    )
    widget = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1")
    assert widget["status"] == {"replicas": 1, "selector": "app=w1", "phase": "Running"}
    assert widget["metadata"]["generation"] == 1, "a status write must not bump the generation"

    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "w1")
    assert scale["spec"]["replicas"] == 1
    assert scale["status"] == {"replicas": 1, "selector": "app=w1"}
    custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, "w1", {"spec": {"replicas": 3}}, _content_type=MERGE_PATCH
    )
    widget = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1")
    assert widget["spec"] == {"replicas": 3, "colour": "teal"}
    assert widget["metadata"]["generation"] == 2

    with pytest.raises(ApiException) as invalid:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "w1", {"spec": {"replicas": -1}}, _content_type=MERGE_PATCH
        )
    assert invalid.value.status == 422, "the CRD's OpenAPI schema is enforced"


def test_a_watch_sees_a_custom_resource_created_changed_and_deleted(
    admin: Any, widgets_crd: dict[str, Any], namespace: str
) -> None:
    custom = _widgets(admin, namespace)
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    start = listed["metadata"]["resourceVersion"]
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": "watched"},
        "spec": {"replicas": 1},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "watched",
        {"status": {"phase": "Running"}},
        _content_type=MERGE_PATCH,
    )
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "watched")

    # A watch from the resource version of the list replays every change after it, as an
    # operator's list-then-watch does; the changes happened before the watch opened on purpose,
    # so the test does not race the connection.
    seen: list[tuple[str, str | None]] = []
    w = watch.Watch()
    for event in w.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        resource_version=start,
        timeout_seconds=15,
    ):
        seen.append((event["type"], event["object"].get("status", {}).get("phase")))
        if len(seen) == 3:
            w.stop()
    assert seen == [("ADDED", None), ("MODIFIED", "Running"), ("DELETED", "Running")]


def test_a_service_account_without_permission_is_refused(kube: Running, admin: Any, namespace: str) -> None:
    core = client.CoreV1Api(admin)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )

    with kube_server.api_client(kube_server.service_account_kubeconfig(kube, namespace, "nobody")) as sa:
        review = client.AuthenticationV1Api(sa).create_self_subject_review(client.V1SelfSubjectReview())
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:nobody"
        with pytest.raises(ApiException) as refused:
            client.CoreV1Api(sa).list_namespaced_config_map(namespace)
    assert refused.value.status == 403


def test_a_service_account_gets_exactly_what_its_role_grants(
    kube: Running, admin: Any, namespace: str
) -> None:
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ),
    )

    with kube_server.api_client(kube_server.service_account_kubeconfig(kube, namespace, "reader")) as sa:
        as_reader = client.CoreV1Api(sa)
        # The authorizer reads roles from an informer cache: the grant shows up within moments.
        wait_until(lambda: as_reader.list_namespaced_config_map(namespace) is not None, 10, "role binding")
        for forbidden in (
            lambda: as_reader.list_namespaced_secret(namespace),
            lambda: as_reader.list_namespaced_config_map("default"),
            lambda: as_reader.delete_namespaced_config_map("anything", namespace),
        ):
            with pytest.raises(ApiException) as refused:
                forbidden()
            assert refused.value.status == 403
