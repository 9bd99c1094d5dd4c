"""weir_operator.permissions against the code: every listed verb is used, every API call is listed.

The Kubernetes client methods the operator names (``read_namespaced_stateful_set``,
``patch_namespaced_custom_object_status``, ...) are read from its source, the resources its
kopf handlers watch from the registry it builds; the chart is compared with the list in
tests/integration/test_chart.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from weir_operator import handlers, kube, permissions
from weir_operator.metrics import OperatorMetrics

PACKAGE = Path(handlers.__file__).parent

_METHOD = re.compile(r"^(read|get|list|create|patch|replace|delete)_namespaced_([a-z_]+?)(_status|_scale)?$")
_VERBS = {"read": "get", "get": "get", "replace": "update"}
_RESOURCES = {
    "stateful_set": ("apps", "statefulsets"),
    "service": ("", "services"),
    "config_map": ("", "configmaps"),
    "pod": ("", "pods"),
    "event": ("", "events"),
    "lease": ("coordination.k8s.io", "leases"),
    "custom_object": (kube.GROUP, kube.PLURAL),  # the operator's only custom resource
}

# Needed by the API server or kopf rather than by a named client call.
_NOT_CALLS = {
    # blockOwnerDeletion in the children's ownerReferences (OwnerReferencesPermissionEnforcement).
    ("weir.dev", "streamjobs/finalizers", "update"),
    # kopf's resource observer watches CRDs when scanning is on (cluster-wide operators).
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def _calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every Kubernetes client method the operator's modules name."""
    used = set()
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            names = [n.attr for n in ast.walk(function) if isinstance(n, ast.Attribute)]
            names += [n.id for n in ast.walk(function) if isinstance(n, ast.Name)]
            server_side_apply = "APPLY_PATCH" in names
            for name in names:
                match = _METHOD.match(name)
                if match is None:
                    continue
                verb, kind, sub = match.groups()
                group, resource = _RESOURCES[kind]
                resource += "/" + sub.lstrip("_") if sub else ""
                used.add((group, resource, _VERBS.get(verb, verb)))
                if verb == "patch" and server_side_apply:
                    used.add((group, resource, "create"))  # an apply that creates is authorized as create
    return used


def _watched() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of what kopf lists and watches for the registered handlers."""
    controller = handlers.Controller(
        None, kube.KubernetesPlatform(None, worker_image="weir:test"), OperatorMetrics()
    )
    registry = handlers.build_registry(controller, clusterwide=True)
    watched = set()
    for handler in registry._watching.get_all_handlers():
        selector = handler.selector
        assert selector is not None
        plural = selector.plural or selector.any_name  # kopf.on.event(group, version, name)
        assert plural is not None
        group = selector.group or ""
        watched |= {(group, plural, "list"), (group, plural, "watch")}
    return watched


def _granted() -> set[tuple[str, str, str]]:
    return {(r.group, r.resource, verb) for r in permissions.RULES for verb in r.verbs}


def test_every_permission_the_operator_lists_is_used_by_a_call_kopf_or_the_api_server() -> None:
    unused = _granted() - _calls() - _watched() - _NOT_CALLS

    assert unused == set()


def test_every_kubernetes_call_the_operator_makes_has_a_permission() -> None:
    missing = (_calls() | _watched()) - _granted()

    assert missing == set()


def test_the_calls_found_include_the_reconcilers_own() -> None:
    # The scan itself must see the calls (a renamed client attribute would hide them).
    calls = _calls()

    assert ("apps", "statefulsets", "create") in calls and ("apps", "statefulsets", "delete") in calls
    assert ("weir.dev", "streamjobs/status", "patch") in calls
    assert ("", "events", "create") in calls
    assert ("coordination.k8s.io", "leases", "update") in calls
    assert ("", "pods", "watch") in _watched()


def test_no_rule_grants_secrets_or_wildcards_or_writes_to_pods() -> None:
    for rule in permissions.RULES:
        assert "*" not in rule.verbs and rule.resource not in ("*", "secrets")
        if rule.resource == "pods":
            assert set(rule.verbs) <= {"get", "list", "watch"}
