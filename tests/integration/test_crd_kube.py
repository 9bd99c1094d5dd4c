"""The generated StreamJob CRD on the real kube-apiserver: it installs, validates, scales, prints, and what
the renderer makes of a StreamJob is accepted as is."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube as kube_server
from harness.common import Running
from harness.manifests import MERGE_PATCH, apply, create_namespace, install_crd
from weir import spec
from weir_operator import crd, render

pytestmark = pytest.mark.kube

GROUP, VERSION, PLURAL = crd.GROUP, crd.VERSION, crd.PLURAL
EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
FULL = Path(__file__).parents[1] / "unit" / "golden" / "streamjob-full.yaml"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def manifest(path: Path, namespace: str, name: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    document["metadata"] = {"name": name or document["metadata"]["name"], "namespace": namespace}
    return document


@pytest.fixture(scope="module")
def admin(kube: Running) -> Iterator[Any]:
    with kube_server.api_client(kube.info["kubeconfig"]) as api:
        yield api


@pytest.fixture(scope="module")
def installed(admin: Any) -> dict[str, Any]:
    """The checked-in CRD, installed as `kubectl apply --server-side -f crds/` would."""
    return install_crd(admin, yaml.safe_load((Path(__file__).parents[2] / crd.CRD_PATH).read_text()))


@pytest.fixture
def namespace(admin: Any) -> str:
    """A fresh namespace (left behind: without a namespace controller deletion never finishes)."""
    return create_namespace(admin, f"crd-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def custom(admin: Any, installed: dict[str, Any]) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(admin)


def test_the_crd_installs_server_side_and_is_established_with_its_names(
    admin: Any, installed: dict[str, Any]
) -> None:
    stored = client.ApiextensionsV1Api(admin).read_custom_resource_definition(crd.CRD_NAME)
    conditions = {c.type: c.status for c in stored.status.conditions}

    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert stored.status.accepted_names.short_names == ["sj"]
    assert stored.status.accepted_names.categories == ["weir"]
    # Applying the same manifest again changes nothing (what `kubectl apply` relies on).
    again = apply(admin, yaml.safe_load((Path(__file__).parents[2] / crd.CRD_PATH).read_text()))
    assert again["metadata"]["generation"] == stored.metadata.generation


@pytest.mark.parametrize("path", [EXAMPLE, FULL], ids=["example", "full"])
def test_a_valid_stream_job_is_accepted_and_reads_back_as_the_same_spec(
    admin: Any, custom: client.CustomObjectsApi, namespace: str, path: Path
) -> None:
    body = manifest(path, namespace)

    stored = apply(admin, body)

    assert spec.StreamJob.model_validate(stored).spec == spec.StreamJob.model_validate(body).spec
    assert stored["spec"]["parallelism"] == body["spec"].get("parallelism", 1)


def test_a_stream_job_with_function_steps_and_a_process_step_is_accepted_as_the_same_spec(
    admin: Any, installed: dict[str, Any], namespace: str
) -> None:
    body = manifest(EXAMPLE, namespace, name="functions")
    _pipeline(body)["steps"] = [
        {"map": {"function": "shop.enrich:add_total"}},
        {"flatMap": {"function": "shop.enrich:explode", "onError": "fail"}},
        {"filter": {"function": "shop.enrich:is_big"}},
        {"keyBy": {"field": "user"}},
        {"process": {"function": "shop.enrich:Dedup"}},
    ]

    stored = apply(admin, body)

    assert spec.StreamJob.model_validate(stored).spec == spec.StreamJob.model_validate(body).spec
    assert stored["spec"]["pipeline"]["steps"][0] == {"map": {"function": "shop.enrich:add_total"}}


def test_a_custom_window_aggregate_is_accepted(admin: Any, installed: dict[str, Any], namespace: str) -> None:
    body = manifest(EXAMPLE, namespace, name="custom")
    outputs = _pipeline(body)["steps"][6]["aggregate"]["outputs"]
    outputs["p95"] = {"fn": "custom", "function": "shop.enrich:P95", "field": "amount"}

    stored = apply(admin, body)

    stored_outputs = stored["spec"]["pipeline"]["steps"][6]["aggregate"]["outputs"]
    assert stored_outputs["p95"] == {"fn": "custom", "function": "shop.enrich:P95", "field": "amount"}


def test_parallelism_defaults_to_one_so_the_scale_subresource_always_answers(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    body = manifest(EXAMPLE, namespace)
    del body["spec"]["parallelism"]

    stored = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "revenue")

    assert stored["spec"]["parallelism"] == 1
    assert scale["spec"]["replicas"] == 1


def test_the_upgrade_mode_column_shows_the_default_when_the_manifest_leaves_it_out(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    body = manifest(EXAMPLE, namespace)
    assert "upgradeMode" not in body["spec"]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    table = custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, _headers={"Accept": TABLE}
    )

    names = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert row["Upgrade Mode"] == "savepoint"


def test_the_largest_parallelism_is_accepted_at_apply(
    admin: Any, installed: dict[str, Any], namespace: str
) -> None:
    body = manifest(EXAMPLE, namespace)
    body["spec"]["parallelism"] = spec.MAX_PARALLELISM

    assert apply(admin, body)["spec"]["parallelism"] == spec.MAX_PARALLELISM


def _pipeline(document: dict[str, Any]) -> dict[str, Any]:
    pipeline: dict[str, Any] = document["spec"]["pipeline"]
    return pipeline


def _set(**members: Any) -> Any:
    def change(document: dict[str, Any]) -> None:
        document["spec"].update(members)

    return change


def _no_source(document: dict[str, Any]) -> None:
    del _pipeline(document)["source"]


def _neither(document: dict[str, Any]) -> None:
    del document["spec"]["pipeline"]


def _both(document: dict[str, Any]) -> None:
    document["spec"]["entrypoint"] = "shop.jobs:orders"


def _two_member_step(document: dict[str, Any]) -> None:
    _pipeline(document)["steps"][0]["select"] = ["price"]


def _sliding_without_slide(document: dict[str, Any]) -> None:
    _pipeline(document)["steps"][5]["window"] = {"type": "sliding", "size": "1m"}


def _map_and_process_in_one_step(document: dict[str, Any]) -> None:
    _pipeline(document)["steps"][0] = {"map": {"function": "m:f"}, "process": {"function": "m:P"}}


def _map_without_colon(document: dict[str, Any]) -> None:
    _pipeline(document)["steps"][0] = {"map": {"function": "shop.enrich.add_total"}}


def _custom_output_with_a_bad_reference(document: dict[str, Any]) -> None:
    _pipeline(document)["steps"][6]["aggregate"]["outputs"]["p95"] = {"fn": "custom", "function": "P95"}


def _long_name(document: dict[str, Any]) -> None:
    document["metadata"]["name"] = "a" * 53


INVALID = {
    "negative parallelism": (_set(parallelism=-1), ["spec.parallelism", "greater than or equal to 1"]),
    "a million workers": (
        _set(parallelism=1_000_000),
        ["spec.parallelism", f"less than or equal to {spec.MAX_PARALLELISM}"],
    ),
    "an autoscaler bound above the maximum": (
        _set(autoscaler={"maxParallelism": 5000}),
        ["spec.autoscaler.maxParallelism", f"less than or equal to {spec.MAX_PARALLELISM}"],
    ),
    "unknown upgradeMode": (_set(upgradeMode="fast"), ["spec.upgradeMode", 'Unsupported value: "fast"']),
    "autoscaler min > max": (
        _set(autoscaler={"minParallelism": 5, "maxParallelism": 2}),
        ["spec.autoscaler.minParallelism", "minParallelism must not exceed maxParallelism"],
    ),
    "pipeline without a source": (_no_source, ["spec.pipeline.source", "Required value"]),
    "neither pipeline nor entrypoint": (_neither, ["spec", "must set exactly one of pipeline, entrypoint"]),
    "both pipeline and entrypoint": (_both, ["spec", "must set exactly one of pipeline, entrypoint"]),
    "a step with two members": (
        _two_member_step,
        ["spec.pipeline.steps[0]", "must set exactly one of filter"],
    ),
    "a sliding window without slide": (
        _sliding_without_slide,
        ["spec.pipeline.steps[5].window", "a sliding window size and slide"],
    ),
    "checkpoint endpoint with a file url": (
        _set(checkpoint={"url": "file:///ckpt", "endpoint": "http://minio:9000"}),
        ["spec.checkpoint", "endpoint, region and credentialsSecret only apply to an s3:// url"],
    ),
    "checkpoint url of another scheme": (_set(checkpoint={"url": "gs://bucket"}), ["spec.checkpoint.url"]),
    "a fractional quantity as a number": (
        _set(resources={"limits": {"cpu": 0.5}}),
        ["spec.resources.limits.cpu", "integer,string"],
    ),
    "mutual TLS without the key": (
        _set(kafka={"bootstrapServers": "k:9093", "tls": {"certSecret": {"name": "c", "key": "tls.crt"}}}),
        ["spec.kafka.tls", "certSecret and keySecret go together"],
    ),
    "env with value and valueFrom": (
        _set(env=[{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]),
        ["spec.env[0]", "set value or valueFrom, not both"],
    ),
    "a map and a process in one step": (
        _map_and_process_in_one_step,
        ["spec.pipeline.steps[0]", "must set exactly one of filter, select, rename, map, flatMap"],
    ),
    "a function reference without a colon": (
        _map_without_colon,
        ["spec.pipeline.steps[0].map.function", "should match"],
    ),
    "a custom aggregate reference without a module": (
        _custom_output_with_a_bad_reference,
        ["spec.pipeline.steps[6].aggregate.outputs.p95.function", "should match"],
    ),
    "a name too long for the pods": (
        _long_name,
        ["metadata.name must be a DNS label of at most 52 characters"],
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_stream_job_is_rejected_at_apply_naming_the_field(
    admin: Any, installed: dict[str, Any], namespace: str, case: str
) -> None:
    change, expected = INVALID[case]
    body = manifest(EXAMPLE, namespace)
    change(body)

    with pytest.raises(ApiException) as rejected:
        apply(admin, body)

    assert rejected.value.status == 422, rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    for text in expected:
        assert text in message


def test_each_rejection_at_apply_is_also_a_spec_error_of_the_models(
    admin: Any, installed: dict[str, Any], namespace: str
) -> None:
    # The CRD is generated from the models: what the API server refuses, `weir validate` refuses too.
    for case, (change, _) in sorted(INVALID.items()):
        body = manifest(EXAMPLE, namespace)
        change(body)
        if case == "a name too long for the pods":
            continue  # a local run (weir run/up) has no StatefulSet to name; rendering rejects it
        with pytest.raises(spec.SpecError):
            spec.parse_manifest(yaml.safe_dump(body))


def test_the_scale_subresource_reads_and_writes_spec_parallelism_and_reports_status(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(FULL, namespace))
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "orders",
        {"status": {"parallelism": 3, "selector": render.selector_string("orders")}},
        _content_type=MERGE_PATCH,
    )

    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "orders")
    assert scale["spec"]["replicas"] == 3
    assert scale["status"] == {"replicas": 3, "selector": "weir.dev/job=orders"}

    custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, "orders", {"spec": {"replicas": 6}}, _content_type=MERGE_PATCH
    )
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders")
    assert job["spec"]["parallelism"] == 6
    assert job["metadata"]["generation"] == 2

    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, PLURAL, "orders", {"spec": {"replicas": 0}}, _content_type=MERGE_PATCH
        )
    assert refused.value.status == 422, "scaling to 0 is suspending, which spec.state says"


def test_status_is_validated_by_the_model_schema_and_keeps_kopfs_bookkeeping(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(EXAMPLE, namespace))
    status = {
        "phase": "Running",
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllWorkersReady",
                "message": "1/1 workers ready",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "observedGeneration": 1,
            }
        ],
        "intent": {"action": "deploy", "id": "i-1", "generation": 1, "startedAt": "2026-01-02T03:04:05Z"},
        "kopf": {"progress": {"weir-reconcile": {"retries": 0}}},
    }
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "revenue", {"status": status}, _content_type=MERGE_PATCH
    )

    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "revenue")["status"]
    assert stored == status
    bad = copy.deepcopy(status)
    bad["conditions"][0]["type"] = "Happy"
    with pytest.raises(ApiException) as rejected:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "revenue", {"status": bad}, _content_type=MERGE_PATCH
        )
    assert rejected.value.status == 422
    assert "status.conditions[0].type" in json.loads(rejected.value.body)["message"]


def test_kubectl_get_sj_columns_show_phase_parallelism_ready_lag_and_last_checkpoint(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(FULL, namespace))
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "orders",
        {
            "status": {
                "phase": "Running",
                "readyWorkers": 2,
                "lag": {"records": 1234, "measuredAt": "2026-01-02T03:04:05Z"},
                "lastCheckpoint": {"id": "c-1", "url": "s3://b/c-1/", "completedAt": "2026-01-02T03:04:05Z"},
            }
        },
        _content_type=MERGE_PATCH,
    )

    table = custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, _headers={"Accept": TABLE}
    )

    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:7] == ["Name", "Phase", "Parallelism", "Ready", "Lag", "Last Checkpoint", "Age"]
    row = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert (row["Name"], row["Phase"], row["Parallelism"], row["Ready"], row["Lag"]) == (
        "orders",
        "Running",
        3,
        2,
        1234,
    )
    assert row["Last Checkpoint"] and row["Age"]


def test_the_rendered_children_of_a_stream_job_are_valid_objects_owned_by_it(
    admin: Any, custom: client.CustomObjectsApi, namespace: str
) -> None:
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest(FULL, namespace)
    )
    job = spec.StreamJob.model_validate(created)
    children = render.render(
        job, render.RenderOptions(default_image="weir:test", restore_from="s3://b/sp/1/")
    )

    stored = [apply(admin, child) for child in children.all()]

    for child, result in zip(children.all(), stored, strict=True):
        assert result["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert result["metadata"]["labels"] == child["metadata"]["labels"]
    sts = client.AppsV1Api(admin).read_namespaced_stateful_set("orders", namespace)
    assert sts.spec.replicas == 3
    assert sts.spec.pod_management_policy == "Parallel"
    container = sts.spec.template.spec.containers[0]
    assert [e.name for e in container.env][:5] == [
        "WEIR_WORKERS",
        "WEIR_WORKER_INDEX",
        "WEIR_STATE_DIR",
        "WEIR_MEMORY_BUDGET",  # from the container's memory limit
        "WEIR_RESTORE_FROM",
    ]
    config = client.CoreV1Api(admin).read_namespaced_config_map("orders-config", namespace)
    assert spec.parse_manifest(config.data["job.yaml"]).spec == job.spec
    service = client.CoreV1Api(admin).read_namespaced_service("orders", namespace)
    assert service.spec.cluster_ip == "None"


def test_a_stream_job_of_the_example_renders_to_children_the_server_accepts_in_a_dry_run(
    admin: Any, custom: client.CustomObjectsApi, namespace: str
) -> None:
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest(EXAMPLE, namespace)
    )
    children = render.render(
        spec.StreamJob.model_validate(created), render.RenderOptions(default_image="weir:test")
    )

    for child in children.all():
        result = apply(admin, child, dry_run=True)
        assert result["kind"] == child["kind"]
    with pytest.raises(ApiException) as absent:
        client.AppsV1Api(admin).read_namespaced_stateful_set("revenue", namespace)
    assert absent.value.status == 404, "a dry run stores nothing"
