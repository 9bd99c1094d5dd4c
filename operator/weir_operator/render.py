"""Renders a StreamJob into the objects that run it: a ConfigMap, a headless Service and a StatefulSet.

Pure functions over the models, returning plain dicts in the Kubernetes JSON shape: no
Kubernetes client and no kopf here (an import-linter contract keeps it so), so rendering is
unit-tested against golden files and the platforms decide how to apply the result.

The contract with the worker image (``weir run``, read by ``weir.config``):

- the container ``worker`` runs ``weir run /etc/weir/job.yaml --http-port 9249``; the file
  is key ``job.yaml`` of ConfigMap ``<job>-config``: the StreamJob's apiVersion, kind,
  metadata (name, namespace) and spec, never a secret value;
- ``WEIR_WORKERS`` is the job's parallelism and ``WEIR_WORKER_INDEX`` the pod's ordinal
  (the StatefulSet controller's ``apps.kubernetes.io/pod-index`` label);
- ``WEIR_STATE_DIR`` is an emptyDir for RocksDB, ``/tmp`` another (the root filesystem is
  read-only); ``WEIR_RESTORE_FROM`` is the checkpoint or savepoint URL to restore from,
  when the operator gives one;
- ``WEIR_MEMORY_BUDGET`` is ``MEMORY_BUDGET_FRACTION`` of the container's memory limit (of its
  memory request when it has no limit), in bytes, when ``spec.resources`` gives either;
- secrets arrive as ``secretKeyRef`` variables: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (``checkpoint.credentialsSecret``),
  ``WEIR_KAFKA_SASL_USERNAME`` / ``WEIR_KAFKA_SASL_PASSWORD`` (``kafka.sasl``),
  ``WEIR_KAFKA_SSL_KEY_PASSWORD``; TLS files are mounted under ``/etc/weir/kafka-tls`` and
  their paths given in ``WEIR_KAFKA_SSL_CA_LOCATION``, ``WEIR_KAFKA_SSL_CERTIFICATE_LOCATION``
  and ``WEIR_KAFKA_SSL_KEY_LOCATION``;
- the pods answer ``/healthz`` (liveness) and ``/readyz`` (readiness) on port ``http`` (9249),
  which the headless Service ``<job>`` publishes, ready or not, so the operator can reach
  each worker's control API at ``<job>-<i>.<job>.<namespace>.svc:9249``.

Every object carries the common labels and an ownerReference (controller) to the StreamJob,
so deleting the job deletes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import yaml

from weir import spec, spec_diff
from weir.memory import parse_size

__all__ = [
    "CONFIG_DIR",
    "CONFIG_KEY",
    "CONTAINER",
    "ENV_AWS_ACCESS_KEY_ID",
    "ENV_AWS_SECRET_ACCESS_KEY",
    "ENV_KAFKA_SASL_PASSWORD",
    "ENV_KAFKA_SASL_USERNAME",
    "ENV_KAFKA_SSL_CA_LOCATION",
    "ENV_KAFKA_SSL_CERTIFICATE_LOCATION",
    "ENV_KAFKA_SSL_KEY_LOCATION",
    "ENV_KAFKA_SSL_KEY_PASSWORD",
    "ENV_MEMORY_BUDGET",
    "ENV_RESTORE_FROM",
    "ENV_STATE_DIR",
    "ENV_WORKERS",
    "ENV_WORKER_INDEX",
    "FINGERPRINT_ANNOTATION",
    "HTTP_PORT",
    "JOB_LABEL",
    "KAFKA_TLS_DIR",
    "MAX_NAME_LENGTH",
    "MEMORY_BUDGET_FRACTION",
    "POD_INDEX_LABEL",
    "RUN_AS_USER",
    "STATE_DIR",
    "Children",
    "RenderError",
    "RenderOptions",
    "common_labels",
    "config_map_name",
    "fingerprint",
    "job_document",
    "owner_reference",
    "render",
    "selector",
    "selector_string",
    "worker_url",
]

HTTP_PORT: Final = 9249
"""Port of each worker's metrics and control API (named ``http``)."""
CONTAINER: Final = "worker"
CONFIG_DIR: Final = "/etc/weir"
CONFIG_KEY: Final = "job.yaml"
STATE_DIR: Final = "/var/lib/weir/state"
KAFKA_TLS_DIR: Final = "/etc/weir/kafka-tls"
RUN_AS_USER: Final = 10001
"""The image's non-root user and group (see the Dockerfile)."""

JOB_LABEL: Final = "weir.dev/job"
"""Label naming the job on every child and pod; the StatefulSet selects on it alone."""
POD_INDEX_LABEL: Final = "apps.kubernetes.io/pod-index"
"""Label the StatefulSet controller puts on each pod (Kubernetes >= 1.28): its ordinal."""
FINGERPRINT_ANNOTATION: Final = "weir.dev/fingerprint"
"""Pod-template annotation holding ``fingerprint(spec)`` of the spec the pods run."""

ENV_WORKERS: Final = "WEIR_WORKERS"
ENV_WORKER_INDEX: Final = "WEIR_WORKER_INDEX"
ENV_STATE_DIR: Final = "WEIR_STATE_DIR"
ENV_RESTORE_FROM: Final = "WEIR_RESTORE_FROM"
ENV_MEMORY_BUDGET: Final = "WEIR_MEMORY_BUDGET"
MEMORY_BUDGET_FRACTION: Final = 0.75
"""The worker's memory budget as a share of its container's memory limit. The budget covers the
whole process (``weir.memory``), but its parts are estimates and allocations come in spikes
(the 10M-key benchmark peaked ~13 % above its budget): the rest of the limit is the margin
that keeps the container clear of the OOM killer. Flink's managed memory plays the same role
with its own fraction of the process size."""
ENV_KAFKA_SASL_USERNAME: Final = "WEIR_KAFKA_SASL_USERNAME"
ENV_KAFKA_SASL_PASSWORD: Final = "WEIR_KAFKA_SASL_PASSWORD"
ENV_KAFKA_SSL_CA_LOCATION: Final = "WEIR_KAFKA_SSL_CA_LOCATION"
ENV_KAFKA_SSL_CERTIFICATE_LOCATION: Final = "WEIR_KAFKA_SSL_CERTIFICATE_LOCATION"
ENV_KAFKA_SSL_KEY_LOCATION: Final = "WEIR_KAFKA_SSL_KEY_LOCATION"
ENV_KAFKA_SSL_KEY_PASSWORD: Final = "WEIR_KAFKA_SSL_KEY_PASSWORD"
ENV_AWS_ACCESS_KEY_ID: Final = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY: Final = "AWS_SECRET_ACCESS_KEY"

MAX_NAME_LENGTH: Final = 52
"""Longest job name: the StatefulSet controller labels pods ``<name>-<10-char hash>`` (<= 63)."""
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class RenderError(ValueError):
    """The StreamJob cannot be rendered; the message names the field."""


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What the operator adds to the spec when rendering."""

    default_image: str
    """Worker image for jobs without ``spec.image`` (the operator's own image by default)."""
    restore_from: str | None = None
    """Checkpoint or savepoint URL the workers restore from (``WEIR_RESTORE_FROM``)."""
    replicas: int | None = None
    """StatefulSet replicas; None means ``spec.parallelism``, or 0 when ``spec.state`` is
    ``suspended``. ``WEIR_WORKERS`` stays ``spec.parallelism`` either way."""


@dataclass(frozen=True, slots=True)
class Children:
    """The objects of one job, in the order they should be applied."""

    config_map: dict[str, Any]
    service: dict[str, Any]
    stateful_set: dict[str, Any]

    def all(self) -> tuple[dict[str, Any], ...]:
        """ConfigMap, Service, StatefulSet: the pods' dependencies first."""
        return (self.config_map, self.service, self.stateful_set)


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def selector(job_name: str) -> dict[str, str]:
    """The StatefulSet's (immutable) pod selector."""
    return {JOB_LABEL: job_name}


def selector_string(job_name: str) -> str:
    """``status.selector`` for the scale subresource (``kubectl scale``, autoscalers)."""
    return ",".join(f"{k}={v}" for k, v in selector(job_name).items())


def common_labels(job_name: str) -> dict[str, str]:
    """Labels on every child of a job and on its pods."""
    return {
        "app.kubernetes.io/name": "weir",
        "app.kubernetes.io/instance": job_name,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "weir-operator",
        JOB_LABEL: job_name,
    }


def worker_url(job_name: str, namespace: str, index: int) -> str:
    """Base URL of worker ``index``'s control API through the headless Service."""
    return f"http://{job_name}-{index}.{job_name}.{namespace}.svc:{HTTP_PORT}"


def fingerprint(job_spec: spec.JobSpec) -> str:
    """A stable hash of the spec fields that decide what the worker pods run: those whose kind
    in ``weir.spec_diff.TABLE`` is pods, state or redeploy (``weir.spec_diff.fingerprint``).

    Equal for specs that differ only in ``parallelism``, ``state``, ``upgradeMode``,
    ``savepointTriggerNonce``, ``autoscaler`` or ``checkpoint.cleanupPolicy``, and in how
    values are written (``10s`` or ``10000``, key order, defaults spelled out or not); any
    other change, ``restartNonce`` included, gives a new one. 16 hex digits of SHA-256.
    """
    return spec_diff.fingerprint(job_spec)


def job_document(job: spec.StreamJob) -> dict[str, Any]:
    """The worker's manifest (ConfigMap key ``job.yaml``): identity and spec.

    The spec has the members the user set (durations in milliseconds) and holds only
    references to Secrets, never their values.
    """
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
    }


def owner_reference(job: spec.StreamJob) -> dict[str, Any]:
    """An ownerReference making the StreamJob the controller of a child."""
    uid = job.metadata.uid
    if not uid:
        raise RenderError(
            "metadata.uid: required to own the children (read the StreamJob from the API server)"
        )
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def render(job: spec.StreamJob, options: RenderOptions) -> Children:
    """The ConfigMap, headless Service and StatefulSet that run ``job``.

    Raises ``RenderError`` naming the field when the job cannot run on Kubernetes (a name
    too long for its pods, no uid).
    """
    name, namespace = job.metadata.name, job.metadata.namespace
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise RenderError(
            f"metadata.name: must be a DNS label of at most {MAX_NAME_LENGTH} characters starting "
            f"with a letter, since it names the job's StatefulSet, pods and Service (got {name!r})"
        )
    if options.replicas is not None and options.replicas < 0:
        raise RenderError(f"replicas: must be >= 0 (got {options.replicas})")

    def meta(object_name: str) -> dict[str, Any]:
        return {
            "name": object_name,
            "namespace": namespace,
            "labels": common_labels(name),
            "ownerReferences": [owner_reference(job)],
        }

    document = yaml.safe_dump(job_document(job), sort_keys=False, allow_unicode=True)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(config_map_name(name))}
    config_map["data"] = {CONFIG_KEY: document}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name),
        "spec": {
            "clusterIP": "None",
            # The operator asks workers for status and savepoints while they restore.
            "publishNotReadyAddresses": True,
            "selector": selector(name),
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    fp = fingerprint(job.spec)
    stateful_set_meta = meta(name)
    stateful_set_meta["annotations"] = {FINGERPRINT_ANNOTATION: fp}
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": stateful_set_meta,
        "spec": {
            "serviceName": name,
            "replicas": _replicas(job.spec, options),
            # All workers start and stop together: ordinals are partition assignments, not a
            # start-up order.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(name)},
            "updateStrategy": {"type": "RollingUpdate"},
            "revisionHistoryLimit": 3,
            "template": _pod_template(job, options, fp),
        },
    }
    return Children(config_map, service, stateful_set)


def _replicas(job_spec: spec.JobSpec, options: RenderOptions) -> int:
    if options.replicas is not None:
        return options.replicas
    return job_spec.parallelism if job_spec.state == "running" else 0


def _pod_template(job: spec.StreamJob, options: RenderOptions, fp: str) -> dict[str, Any]:
    name, job_spec = job.metadata.name, job.spec
    overrides = job_spec.pod_template or spec.PodTemplate()
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job_spec.image or options.default_image,
    }
    if job_spec.image_pull_policy is not None:
        container["imagePullPolicy"] = job_spec.image_pull_policy
    container["command"] = ["weir", "run", f"{CONFIG_DIR}/{CONFIG_KEY}", "--http-port", str(HTTP_PORT)]
    container["env"] = _env(job_spec, options)
    container["ports"] = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    # Alive while restoring state (which can take minutes); ready once consuming.
    container["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "initialDelaySeconds": 10,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 6,
    }
    container["readinessProbe"] = {
        "httpGet": {"path": "/readyz", "port": "http"},
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    if job_spec.resources is not None:
        resources = job_spec.resources.model_dump(mode="json", by_alias=True)
        container["resources"] = {k: v for k, v in resources.items() if v}
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {"name": config_map_name(name), "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
        },
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    tls_sources = _kafka_tls_sources(job_spec.kafka.tls)
    if tls_sources:
        mounts.append({"name": "kafka-tls", "mountPath": KAFKA_TLS_DIR, "readOnly": True})
        # 0440: readable by the worker's group (fsGroup) only.
        volumes.append({"name": "kafka-tls", "projected": {"sources": tls_sources, "defaultMode": 0o440}})
    container["volumeMounts"] = mounts

    pod_spec: dict[str, Any] = {}
    if overrides.service_account_name is not None:
        pod_spec["serviceAccountName"] = overrides.service_account_name
    pod_spec.update(
        {
            # Workers never call the Kubernetes API.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            # SIGTERM: finish the batch, flush output, write state, commit offsets.
            "terminationGracePeriodSeconds": 60,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS_USER,
                "runAsGroup": RUN_AS_USER,
                "fsGroup": RUN_AS_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
        }
    )
    if overrides.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in overrides.image_pull_secrets]
    if overrides.node_selector:
        pod_spec["nodeSelector"] = dict(overrides.node_selector)
    if overrides.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in overrides.tolerations
        ]
    if overrides.affinity:
        pod_spec["affinity"] = overrides.affinity
    return {
        "metadata": {
            "labels": {**overrides.labels, **common_labels(name)},
            "annotations": {**overrides.annotations, FINGERPRINT_ANNOTATION: fp},
        },
        "spec": pod_spec,
    }


def _secret_env(
    variable: str, ref: spec.SecretKeyRef | None, name: str = "", key: str = ""
) -> dict[str, Any]:
    secret = {"name": ref.name, "key": ref.key} if ref is not None else {"name": name, "key": key}
    return {"name": variable, "valueFrom": {"secretKeyRef": secret}}


def _env(job_spec: spec.JobSpec, options: RenderOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": ENV_WORKERS, "value": str(job_spec.parallelism)},
        {
            "name": ENV_WORKER_INDEX,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}},
        },
        {"name": ENV_STATE_DIR, "value": STATE_DIR},
    ]
    budget = memory_budget(job_spec)
    if budget is not None:
        env.append({"name": ENV_MEMORY_BUDGET, "value": str(budget)})
    if options.restore_from is not None:
        env.append({"name": ENV_RESTORE_FROM, "value": options.restore_from})
    credentials = job_spec.checkpoint.credentials_secret if job_spec.checkpoint is not None else None
    if credentials is not None:
        env.append(_secret_env(ENV_AWS_ACCESS_KEY_ID, None, credentials.name, credentials.access_key_id_key))
        env.append(
            _secret_env(ENV_AWS_SECRET_ACCESS_KEY, None, credentials.name, credentials.secret_access_key_key)
        )
    sasl = job_spec.kafka.sasl
    if sasl is not None:
        env.append(_secret_env(ENV_KAFKA_SASL_USERNAME, sasl.username_secret))
        env.append(_secret_env(ENV_KAFKA_SASL_PASSWORD, sasl.password_secret))
    tls = job_spec.kafka.tls
    if tls is not None:
        for variable, ref, file in (
            (ENV_KAFKA_SSL_CA_LOCATION, tls.ca_secret, "ca.crt"),
            (ENV_KAFKA_SSL_CERTIFICATE_LOCATION, tls.cert_secret, "tls.crt"),
            (ENV_KAFKA_SSL_KEY_LOCATION, tls.key_secret, "tls.key"),
        ):
            if ref is not None:
                env.append({"name": variable, "value": f"{KAFKA_TLS_DIR}/{file}"})
        if tls.key_password_secret is not None:
            env.append(_secret_env(ENV_KAFKA_SSL_KEY_PASSWORD, tls.key_password_secret))
    for var in job_spec.env:
        env.append(var.model_dump(mode="json", by_alias=True, exclude_none=True))
    return env


def memory_budget(job_spec: spec.JobSpec) -> int | None:
    """The worker's memory budget in bytes: ``MEMORY_BUDGET_FRACTION`` of the memory limit (else
    the memory request); None without either."""
    resources = job_spec.resources
    if resources is None:
        return None
    quantity = resources.limits.get("memory") or resources.requests.get("memory")
    if quantity is None:
        return None
    try:
        return int(parse_size(str(quantity)) * MEMORY_BUDGET_FRACTION)
    except ValueError as exc:
        raise RenderError(f"spec.resources: memory {quantity!r}: {exc}") from exc


def _kafka_tls_sources(tls: spec.KafkaTls | None) -> list[dict[str, Any]]:
    """Projected-volume sources putting each TLS secret key at its fixed file name."""
    if tls is None:
        return []
    sources = []
    for ref, file in ((tls.ca_secret, "ca.crt"), (tls.cert_secret, "tls.crt"), (tls.key_secret, "tls.key")):
        if ref is not None:
            sources.append({"secret": {"name": ref.name, "items": [{"key": ref.key, "path": file}]}})
    return sources
