"""Every Kubernetes permission the operator uses, and which code uses it: the chart's RBAC is this list.

The chart (``charts/weir-operator/templates``) grants exactly these rules; a test renders it
and compares, and another derives the API calls from the operator's source (the Kubernetes
client methods it names, the resources its kopf handlers watch) and compares them with this
list, so neither a grant nobody uses nor a call without a grant goes unnoticed.

Scopes: ``namespace`` rules are granted in each watched namespace (a Role, or the
ClusterRole with ``rbac.scope: cluster``); ``cluster`` rules only with ``rbac.scope:
cluster``; ``lease`` rules in the operator's own namespace, for leader election, where
``named`` rules are limited to the one Lease (``resourceNames``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RULES", "Rule"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One RBAC rule: verbs on one resource of one API group, and who needs them."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    scope: Literal["namespace", "cluster", "lease"]
    why: str
    named: bool = False
    """Only the operator's own Lease (``resourceNames``)."""


RULES: tuple[Rule, ...] = (
    Rule("weir.dev", "streamjobs", ("get", "list", "watch", "patch"), "namespace",
         "kopf watches StreamJobs (list, watch); Controller reads one fresh (get) and adds or "
         "removes its finalizer with a JSON patch (patch)"),
    Rule("weir.dev", "streamjobs/status", ("patch",), "namespace",
         "KubernetesPlatform.write_status: a merge patch of the status subresource"),
    Rule("weir.dev", "streamjobs/finalizers", ("update",), "namespace",
         "the children's ownerReferences set blockOwnerDeletion, which clusters running the "
         "OwnerReferencesPermissionEnforcement admission plugin allow only with this"),
    Rule("apps", "statefulsets", ("get", "list", "watch", "create", "patch", "delete"), "namespace",
         "kopf watches worker StatefulSets (list, watch); observe reads one (get); server-side "
         "apply (patch, and create for a new one); deleting a job removes it (delete)"),
    Rule("", "services", ("get", "create", "patch", "delete"), "namespace",
         "observe reads the headless Service (get); server-side apply (patch, create); delete"),
    Rule("", "configmaps", ("get", "create", "patch", "delete"), "namespace",
         "observe reads the job's ConfigMap (get); server-side apply (patch, create); delete"),
    Rule("", "pods", ("list", "watch"), "namespace",
         "kopf watches worker pods (list, watch); observe lists them for readiness and crash loops"),
    Rule("", "events", ("create",), "namespace",
         "KubernetesPlatform.record_event (kopf's own event posting is disabled)"),
    Rule("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), "cluster",
         "kopf watches CRDs to notice the StreamJob resource change (only cluster-wide: with "
         "exact namespaces the operator disables kopf's scanning)"),
    Rule("coordination.k8s.io", "leases", ("create",), "lease",
         "LeaderElector creates the Lease the first time (a name cannot restrict create)"),
    Rule("coordination.k8s.io", "leases", ("get", "update"), "lease",
         "LeaderElector reads, renews and releases its Lease (read, replace)", named=True),
)
"""The operator's permissions, in the order the chart lists them."""
