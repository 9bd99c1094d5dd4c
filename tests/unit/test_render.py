"""Rendering a StreamJob into its ConfigMap, headless Service and StatefulSet; golden files guard the output.

Regenerate the golden files after an intended change with
``WEIR_UPDATE_GOLDEN=1 pytest tests/unit/test_render.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from weir import spec
from weir.config import Environment
from weir.memory import parse_size
from weir_operator import render
from weir_operator.render import RenderError, RenderOptions

GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
UID = "6f1c1d2e-0000-4000-8000-000000000001"
IMAGE = "ghcr.io/weir-dev/weir:0.1.0"

FULL_MANIFEST = GOLDEN / "streamjob-full.yaml"
FULL = FULL_MANIFEST.read_text()


def revenue() -> spec.StreamJob:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["uid"] = UID
    return spec.StreamJob.model_validate(document)


def full() -> spec.StreamJob:
    return spec.StreamJob.model_validate(yaml.safe_load(FULL))


def with_spec(job: spec.StreamJob, **changes: Any) -> spec.StreamJob:
    document = job.model_dump(mode="json", by_alias=True, exclude_unset=True)
    document["spec"].update(changes)
    return spec.StreamJob.model_validate(document)


class _GoldenDumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's job.yaml) as literal blocks, so diffs read well."""


_GoldenDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def as_yaml(children: render.Children) -> str:
    return yaml.dump_all(children.all(), Dumper=_GoldenDumper, sort_keys=False, allow_unicode=True, width=100)


def env_of(children: render.Children) -> dict[str, dict[str, Any]]:
    container = children.stateful_set["spec"]["template"]["spec"]["containers"][0]
    return {var["name"]: var for var in container["env"]}


CASES = {
    "revenue": lambda: render.render(revenue(), RenderOptions(default_image=IMAGE)),
    "full": lambda: render.render(
        full(),
        RenderOptions(
            default_image=IMAGE, restore_from="s3://shop-checkpoints/weir/shop/orders/savepoints/sp-7/"
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_children_match_the_golden_file(case: str) -> None:
    golden = GOLDEN / f"render-{case}.yaml"
    rendered = as_yaml(CASES[case]())
    if os.environ.get("WEIR_UPDATE_GOLDEN") == "1":
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} is missing: run with WEIR_UPDATE_GOLDEN=1 to create it"
    assert rendered == golden.read_text(), (
        f"rendering drifted from {golden.name}; if intended, rerun with WEIR_UPDATE_GOLDEN=1"
    )


def test_the_children_are_a_config_map_a_headless_service_and_a_parallel_stateful_set_named_as_the_job() -> (
    None
):
    children = render.render(revenue(), RenderOptions(default_image=IMAGE))

    assert [(o["kind"], o["metadata"]["name"]) for o in children.all()] == [
        ("ConfigMap", "revenue-config"),
        ("Service", "revenue"),
        ("StatefulSet", "revenue"),
    ]
    sts = children.stateful_set["spec"]
    assert sts["serviceName"] == "revenue"
    assert sts["podManagementPolicy"] == "Parallel"
    assert sts["replicas"] == 1
    assert children.service["spec"]["clusterIP"] == "None"
    assert children.service["spec"]["ports"] == [
        {"name": "http", "port": 9249, "targetPort": "http", "protocol": "TCP"}
    ]


def test_every_child_is_controlled_by_the_stream_job_and_carries_the_common_labels() -> None:
    job = full()
    for child in render.render(job, RenderOptions(default_image=IMAGE)).all():
        assert child["metadata"]["namespace"] == "shop"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "weir.dev/v1alpha1",
                "kind": "StreamJob",
                "name": "orders",
                "uid": job.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["labels"]["weir.dev/job"] == "orders"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "weir-operator"


def test_the_selector_picks_the_pods_and_is_what_status_selector_reports() -> None:
    children = render.render(full(), RenderOptions(default_image=IMAGE))
    sts = children.stateful_set["spec"]
    pod_labels = sts["template"]["metadata"]["labels"]

    assert sts["selector"]["matchLabels"].items() <= pod_labels.items()
    assert children.service["spec"]["selector"] == sts["selector"]["matchLabels"]
    assert render.selector_string("orders") == "weir.dev/job=orders"
    assert pod_labels["team"] == "checkout", "pod template labels are applied"


def test_the_config_map_holds_the_manifest_the_worker_reads_and_it_loads_back_to_the_same_spec() -> None:
    job = full()
    children = render.render(job, RenderOptions(default_image=IMAGE))
    container = children.stateful_set["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(
        v for v in children.stateful_set["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )

    assert container["command"] == ["weir", "run", "/etc/weir/job.yaml", "--http-port", "9249"]
    assert volume["configMap"]["name"] == children.config_map["metadata"]["name"]
    assert f"{mount['mountPath']}/{volume['configMap']['items'][0]['path']}" == container["command"][2]
    document = yaml.safe_load(children.config_map["data"][volume["configMap"]["items"][0]["key"]])
    assert set(document) == {"apiVersion", "kind", "metadata", "spec"}
    assert document["metadata"] == {"name": "orders", "namespace": "shop"}
    assert spec.parse_manifest(yaml.safe_dump(document)).spec == job.spec


def test_secrets_reach_the_worker_only_as_secret_key_refs_and_never_the_config_map() -> None:
    children = render.render(full(), RenderOptions(default_image=IMAGE))
    env = env_of(children)

    expected = {
        "AWS_ACCESS_KEY_ID": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"},
        "WEIR_KAFKA_SASL_USERNAME": {"name": "kafka-user", "key": "username"},
        "WEIR_KAFKA_SASL_PASSWORD": {"name": "kafka-user", "key": "password"},
        "WEIR_KAFKA_SSL_KEY_PASSWORD": {"name": "kafka-client", "key": "key-password"},
    }
    for name, ref in expected.items():
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": ref}}
    config = children.config_map["data"]["job.yaml"]
    assert "secretKeyRef" not in config
    for child in children.all():
        assert child["kind"] != "Secret"


def test_kafka_tls_files_are_mounted_from_their_secrets_and_their_paths_given_in_the_environment() -> None:
    children = render.render(full(), RenderOptions(default_image=IMAGE))
    pod = children.stateful_set["spec"]["template"]["spec"]
    env = env_of(children)
    volume = next(v for v in pod["volumes"] if v["name"] == "kafka-tls")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-tls")

    files = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert files == {
        "ca.crt": ("kafka-ca", "ca.crt"),
        "tls.crt": ("kafka-client", "tls.crt"),
        "tls.key": ("kafka-client", "tls.key"),
    }
    assert mount["readOnly"] is True
    assert env["WEIR_KAFKA_SSL_CA_LOCATION"]["value"] == f"{mount['mountPath']}/ca.crt"
    assert env["WEIR_KAFKA_SSL_CERTIFICATE_LOCATION"]["value"] == f"{mount['mountPath']}/tls.crt"
    assert env["WEIR_KAFKA_SSL_KEY_LOCATION"]["value"] == f"{mount['mountPath']}/tls.key"


def test_a_job_without_tls_or_secrets_gets_no_secret_variables_or_tls_volume() -> None:
    children = render.render(revenue(), RenderOptions(default_image=IMAGE))

    assert set(env_of(children)) == {"WEIR_WORKERS", "WEIR_WORKER_INDEX", "WEIR_STATE_DIR"}
    assert [v["name"] for v in children.stateful_set["spec"]["template"]["spec"]["volumes"]] == [
        "config",
        "state",
        "tmp",
    ]


def test_the_worker_environment_is_what_the_runtime_reads_for_its_identity_and_state_dir() -> None:
    children = render.render(full(), RenderOptions(default_image=IMAGE))
    pod_labels = {"apps.kubernetes.io/pod-index": "2"}

    # Resolve the variables as the kubelet would for the pod with ordinal 2.
    resolved: dict[str, str] = {}
    for var in env_of(children).values():
        if "value" in var:
            resolved[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert path == "metadata.labels['apps.kubernetes.io/pod-index']"
            resolved[var["name"]] = pod_labels["apps.kubernetes.io/pod-index"]
    environment = Environment.read(resolved)

    assert environment.workers == 3
    assert environment.worker_index == 2
    assert str(environment.state_dir) == render.STATE_DIR
    # 3/4 of the 2Gi limit, as bytes the worker parses.
    assert environment.memory_budget is not None
    assert parse_size(environment.memory_budget) == 3 * 2**30 // 2
    mounts = children.stateful_set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "state", "mountPath": render.STATE_DIR} in mounts


@pytest.mark.parametrize(
    ("resources", "budget"),
    [
        ({"limits": {"memory": "1Gi"}, "requests": {"memory": "512Mi"}}, str(768 * 2**20)),
        ({"requests": {"memory": "1G", "cpu": "1"}}, str(750_000_000)),
        ({"limits": {"cpu": "2"}}, None),
        (None, None),
    ],
)
def test_the_memory_budget_is_three_quarters_of_the_memory_limit_else_of_the_request(
    resources: dict[str, Any] | None, budget: str | None
) -> None:
    job = with_spec(revenue(), resources=resources)
    env = env_of(render.render(job, RenderOptions(default_image=IMAGE)))
    assert env.get("WEIR_MEMORY_BUDGET", {}).get("value") == budget


def test_a_restore_source_is_passed_only_when_given() -> None:
    without = env_of(render.render(revenue(), RenderOptions(default_image=IMAGE)))
    given = env_of(render.render(revenue(), RenderOptions(default_image=IMAGE, restore_from="file:///sp/1/")))

    assert "WEIR_RESTORE_FROM" not in without
    assert given["WEIR_RESTORE_FROM"] == {"name": "WEIR_RESTORE_FROM", "value": "file:///sp/1/"}


def test_the_spec_image_wins_over_the_operator_default() -> None:
    def image(job: spec.StreamJob) -> str:
        children = render.render(job, RenderOptions(default_image=IMAGE))
        return str(children.stateful_set["spec"]["template"]["spec"]["containers"][0]["image"])

    assert image(revenue()) == IMAGE
    assert image(full()) == "registry.example.com/shop/orders-job:1.4.2"


def test_pods_run_as_non_root_with_a_read_only_root_filesystem_and_no_capabilities() -> None:
    pod = render.render(revenue(), RenderOptions(default_image=IMAGE)).stateful_set["spec"]["template"][
        "spec"
    ]
    container = pod["containers"][0]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", render.STATE_DIR}


def test_a_suspended_job_renders_no_replicas_but_keeps_its_worker_count() -> None:
    suspended = render.render(with_spec(full(), state="suspended"), RenderOptions(default_image=IMAGE))
    overridden = render.render(full(), RenderOptions(default_image=IMAGE, replicas=0))

    for children in (suspended, overridden):
        assert children.stateful_set["spec"]["replicas"] == 0
        assert env_of(children)["WEIR_WORKERS"]["value"] == "3"


@pytest.mark.parametrize(
    ("name", "uid", "expected"),
    [
        ("a" * 53, UID, "metadata.name: must be a DNS label of at most 52 characters"),
        ("revenue.v2", UID, "metadata.name: must be a DNS label"),
        ("2fast", UID, "metadata.name: must be a DNS label"),
        ("revenue", None, "metadata.uid: required to own the children"),
    ],
)
def test_a_job_that_cannot_be_rendered_is_an_error_naming_the_field(
    name: str, uid: str | None, expected: str
) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"] = {"name": name, "namespace": "default", "uid": uid}
    job = spec.StreamJob.model_validate(document)

    with pytest.raises(RenderError, match=expected.replace(".", r"\.")):
        render.render(job, RenderOptions(default_image=IMAGE))


# --------------------------------------------------------------------------- fingerprint


def test_the_fingerprint_ignores_how_the_spec_is_written() -> None:
    job = full()
    document = yaml.safe_load(FULL)
    document["spec"]["checkpoint"]["interval"] = 30_000
    document["spec"]["deliveryGuarantee"] = "exactly-once"
    document["spec"]["kafka"] = dict(reversed(list(document["spec"]["kafka"].items())))
    rewritten = spec.StreamJob.model_validate(document)

    assert render.fingerprint(rewritten.spec) == render.fingerprint(job.spec)
    assert len(render.fingerprint(job.spec)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"parallelism": 5},
        {"state": "suspended"},
        {"upgradeMode": "savepoint"},
        {"savepointTriggerNonce": 8},
        {"autoscaler": {"enabled": False}},
    ],
)
def test_scaling_life_cycle_and_operator_settings_keep_the_fingerprint(change: dict[str, Any]) -> None:
    assert render.fingerprint(with_spec(full(), **change).spec) == render.fingerprint(full().spec)


@pytest.mark.parametrize(
    "change",
    [
        {"image": "registry.example.com/shop/orders-job:1.4.3"},
        {"restartNonce": 3},
        {"env": [{"name": "LOG_FORMAT", "value": "text"}]},
        {"deliveryGuarantee": "at-least-once"},
        {"resources": {"requests": {"cpu": "1"}}},
        {"kafka": {"bootstrapServers": "elsewhere:9092"}},
    ],
)
def test_changes_to_what_the_pods_run_change_the_fingerprint(change: dict[str, Any]) -> None:
    assert render.fingerprint(with_spec(full(), **change).spec) != render.fingerprint(full().spec)


def test_the_cleanup_policy_does_not_change_the_fingerprint_but_the_checkpoint_interval_does() -> None:
    base = full()
    checkpoint = base.spec.checkpoint
    assert checkpoint is not None
    dumped = checkpoint.model_dump(mode="json", by_alias=True, exclude_unset=True)

    retain = with_spec(base, checkpoint={**dumped, "cleanupPolicy": "retain"})
    faster = with_spec(base, checkpoint={**dumped, "interval": "5s"})

    assert render.fingerprint(retain.spec) == render.fingerprint(base.spec)
    assert render.fingerprint(faster.spec) != render.fingerprint(base.spec)


def test_the_pod_template_carries_the_fingerprint_so_a_new_version_rolls_the_pods() -> None:
    children = render.render(full(), RenderOptions(default_image=IMAGE))
    fingerprint = render.fingerprint(full().spec)

    assert (
        children.stateful_set["spec"]["template"]["metadata"]["annotations"]["weir.dev/fingerprint"]
        == fingerprint
    )
    assert children.stateful_set["metadata"]["annotations"]["weir.dev/fingerprint"] == fingerprint


def test_worker_urls_go_through_the_headless_service() -> None:
    assert render.worker_url("orders", "shop", 2) == "http://orders-2.orders.shop.svc:9249"
