"""Applying plain-dict manifests (rendered children, chart output, the CRD) to the test kube-apiserver.

Server-side apply through the typed clients, so a test sees exactly what ``kubectl apply
--server-side`` would: the API server's validation, defaulting and admission, as the
identity of the ``ApiClient`` given.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client

from harness.common import wait_until

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "weir-tests"

# (apiVersion, kind) -> (API class, method noun, namespaced)
_KINDS: dict[tuple[str, str], tuple[Any, str, bool]] = {
    ("v1", "Namespace"): (client.CoreV1Api, "namespace", False),
    ("v1", "ConfigMap"): (client.CoreV1Api, "config_map", True),
    ("v1", "Service"): (client.CoreV1Api, "service", True),
    ("v1", "ServiceAccount"): (client.CoreV1Api, "service_account", True),
    ("apps/v1", "StatefulSet"): (client.AppsV1Api, "stateful_set", True),
    ("apps/v1", "Deployment"): (client.AppsV1Api, "deployment", True),
    ("policy/v1", "PodDisruptionBudget"): (client.PolicyV1Api, "pod_disruption_budget", True),
    ("rbac.authorization.k8s.io/v1", "Role"): (client.RbacAuthorizationV1Api, "role", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (client.RbacAuthorizationV1Api, "role_binding", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): (client.RbacAuthorizationV1Api, "cluster_role", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): (
        client.RbacAuthorizationV1Api,
        "cluster_role_binding",
        False,
    ),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): (
        client.ApiextensionsV1Api,
        "custom_resource_definition",
        False,
    ),
}


def apply(
    api: Any, obj: dict[str, Any], *, namespace: str | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Server-side apply ``obj`` (forcing conflicts) and return the object the server stored.

    ``namespace`` is used when the manifest names none (as ``kubectl apply -n`` does).
    Custom resources of any group are applied through ``CustomObjectsApi``.
    """
    api_version, kind = obj["apiVersion"], obj["kind"]
    name = obj["metadata"]["name"]
    # An apply that creates the object answers 201, which the generated client does not
    # deserialize for PATCH (it returns None): read the raw body instead.
    options: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,
        "_content_type": APPLY_PATCH,
        "_preload_content": False,
    }
    if dry_run:
        options["dry_run"] = "All"
    known = _KINDS.get((api_version, kind))
    if known is None:
        group, version = api_version.split("/")
        plural = kind.lower() + "s"
        ns = obj["metadata"].get("namespace") or namespace
        response = client.CustomObjectsApi(api).patch_namespaced_custom_object(
            group, version, ns, plural, name, obj, **options
        )
    else:
        api_class, noun, namespaced = known
        target = api_class(api)
        if namespaced:
            ns = obj["metadata"].get("namespace") or namespace
            if ns is None:
                raise ValueError(f"{kind} {name}: no namespace in the manifest and none given")
            response = getattr(target, f"patch_namespaced_{noun}")(name, ns, obj, **options)
        else:
            response = getattr(target, f"patch_{noun}")(name, obj, **options)
    try:
        stored: dict[str, Any] = json.loads(response.data)
    finally:
        response.release_conn()
    return stored


def install_crd(api: Any, crd: dict[str, Any]) -> dict[str, Any]:
    """Apply a CRD and wait until it is Established and its endpoint serves."""
    stored = apply(api, crd)
    ext = client.ApiextensionsV1Api(api)
    name = crd["metadata"]["name"]

    def established() -> bool:
        conditions = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_until(established, 30, f"CRD {name} established")
    spec = crd["spec"]
    version = next(v["name"] for v in spec["versions"] if v.get("storage"))
    custom = client.CustomObjectsApi(api)
    # The endpoint can lag the Established condition by a moment.
    wait_until(
        lambda: (
            custom.list_cluster_custom_object(spec["group"], version, spec["names"]["plural"]) is not None
        ),
        15,
        f"{name} endpoint",
    )
    return stored


def create_namespace(api: Any, name: str) -> str:
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name
