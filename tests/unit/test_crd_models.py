"""The operator-facing spec members and the status models: defaults and errors that name the field."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from weir import spec
from weir.spec import SpecError, parse_manifest
from weir_operator import model

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"


def example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def with_spec(**members: Any) -> dict[str, Any]:
    document = example()
    document["spec"].update(copy.deepcopy(members))
    return document


def error_of(document: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as raised:
        parse_manifest(yaml.safe_dump(document))
    return str(raised.value)


def test_the_example_gets_the_documented_defaults_for_the_operator_members() -> None:
    job_spec = parse_manifest(EXAMPLE).spec

    assert job_spec.image is None
    assert job_spec.upgrade_mode == "savepoint"
    assert job_spec.state == "running"
    assert job_spec.delivery_guarantee == "exactly-once"
    assert job_spec.checkpoint is None
    assert job_spec.autoscaler is None
    assert job_spec.env == ()
    assert job_spec.kafka.security_protocol == "PLAINTEXT"


def test_a_checkpoint_section_fills_in_interval_retain_and_cleanup_policy() -> None:
    job_spec = parse_manifest(yaml.safe_dump(with_spec(checkpoint={"url": "s3://bucket/prefix"}))).spec

    assert job_spec.checkpoint == spec.CheckpointSpec(url="s3://bucket/prefix")
    assert job_spec.checkpoint is not None
    assert (job_spec.checkpoint.interval, job_spec.checkpoint.retain) == (10_000, 3)
    assert job_spec.checkpoint.cleanup_policy == "retain"


def test_checkpoint_credentials_default_to_the_aws_key_names() -> None:
    checkpoint = spec.CheckpointSpec.model_validate(
        {"url": "s3://bkt", "credentialsSecret": {"name": "s3-creds"}, "interval": "1m"}
    )

    assert checkpoint.credentials_secret == spec.CheckpointCredentials(
        name="s3-creds", access_key_id_key="AWS_ACCESS_KEY_ID", secret_access_key_key="AWS_SECRET_ACCESS_KEY"
    )
    assert checkpoint.interval == 60_000


@pytest.mark.parametrize(
    ("sasl", "tls", "protocol"),
    [
        (False, False, "PLAINTEXT"),
        (False, True, "SSL"),
        (True, False, "SASL_PLAINTEXT"),
        (True, True, "SASL_SSL"),
    ],
)
def test_the_security_protocol_follows_sasl_and_tls(sasl: bool, tls: bool, protocol: str) -> None:
    kafka: dict[str, Any] = {"bootstrapServers": "k:9093"}
    if sasl:
        kafka["sasl"] = {
            "mechanism": "PLAIN",
            "usernameSecret": {"name": "kafka", "key": "user"},
            "passwordSecret": {"name": "kafka", "key": "password"},
        }
    if tls:
        kafka["tls"] = {}

    assert spec.KafkaSpec.model_validate(kafka).security_protocol == protocol


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (
            {"autoscaler": {"minParallelism": 5, "maxParallelism": 2}},
            "spec.autoscaler.minParallelism: must not exceed maxParallelism (5 > 2)",
        ),
        (
            {"autoscaler": {"targetUtilization": 0}},
            "spec.autoscaler.targetUtilization: input should be greater than 0",
        ),
        (
            {"upgradeMode": "fast"},
            "spec.upgradeMode: must be one of stateless, savepoint, last-state (got 'fast')",
        ),
        ({"state": "paused"}, "spec.state: must be one of running, suspended (got 'paused')"),
        (
            {"deliveryGuarantee": "exactly-twice"},
            "spec.deliveryGuarantee: must be one of exactly-once, at-least-once",
        ),
        (
            {"checkpoint": {"url": "http://bucket/x"}},
            "spec.checkpoint.url: must be s3://bucket[/prefix] (a valid S3 bucket name) or file:///absolute/path",
        ),
        ({"checkpoint": {"url": "s3://b"}}, "spec.checkpoint.url: must be s3://bucket[/prefix]"),
        ({"checkpoint": {"url": "s3://bkt", "retain": 0}}, "spec.checkpoint.retain: must be >= 1 (got 0)"),
        (
            {"checkpoint": {"url": "s3://bkt", "interval": "0s"}},
            "spec.checkpoint.interval: must be a positive",
        ),
        ({"checkpoint": {"interval": "5s"}}, "spec.checkpoint.url: required field is missing"),
        (
            {"checkpoint": {"url": "file:///ckpt", "endpoint": "http://minio:9000"}},
            "spec.checkpoint.endpoint: only applies to an s3:// url",
        ),
        (
            {"checkpoint": {"url": "s3://bkt", "cleanupPolicy": "shred"}},
            "spec.checkpoint.cleanupPolicy: must be one of retain, delete",
        ),
        (
            {"checkpoint": {"url": "s3://bkt", "credentialSecret": {"name": "x"}}},
            "spec.checkpoint.credentialSecret: unknown field (did you mean credentialsSecret?)",
        ),
        (
            {"env": [{"name": "WEIR_WORKERS", "value": "9"}]},
            "spec.env[0].name: variables starting with WEIR_",
        ),
        (
            {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
            "spec.env[1].name: A is set twice",
        ),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]},
            "spec.env[0].valueFrom: set value or valueFrom, not both",
        ),
        (
            {
                "checkpoint": {"url": "s3://bkt", "credentialsSecret": {"name": "c"}},
                "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}],
            },
            "spec.env[0].name: is set from checkpoint.credentialsSecret",
        ),
        (
            {"resources": {"limits": {"cpu": 0.5}}},
            "spec.resources.limits.cpu: write a fractional quantity as a string, e.g. '0.5'",
        ),
        (
            {"resources": {"requests": {"memory": "2 GB"}}},
            "spec.resources.requests.memory: must be a quantity",
        ),
        (
            {"podTemplate": {"labels": {"weir.dev/job": "other"}}},
            "spec.podTemplate.labels['weir.dev/job']: keys under weir.dev/ are set by weir",
        ),
        (
            {"podTemplate": {"tolerations": [{"operator": "Maybe"}]}},
            "spec.podTemplate.tolerations[0].operator: must be one of Exists, Equal",
        ),
        (
            {"podTemplate": {"serviceAccountName": "Bad_Name"}},
            "spec.podTemplate.serviceAccountName: must match",
        ),
        (
            {"imagePullPolicy": "Sometimes"},
            "spec.imagePullPolicy: must be one of Always, IfNotPresent, Never",
        ),
        ({"restartNonce": "1"}, "spec.restartNonce: must be an integer (got '1')"),
        ({"image": ""}, "spec.image: must not be empty"),
    ],
)
def test_bad_operator_members_are_named_with_what_is_wrong(members: dict[str, Any], expected: str) -> None:
    assert expected in error_of(with_spec(**members))


@pytest.mark.parametrize(
    ("kafka", "expected"),
    [
        (
            {
                "sasl": {
                    "mechanism": "GSSAPI",
                    "usernameSecret": {"name": "k", "key": "u"},
                    "passwordSecret": {"name": "k", "key": "p"},
                }
            },
            "spec.kafka.sasl.mechanism: must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            {"sasl": {"mechanism": "PLAIN", "usernameSecret": {"name": "k", "key": "u"}}},
            "spec.kafka.sasl.passwordSecret: required field is missing",
        ),
        (
            {
                "sasl": {
                    "mechanism": "PLAIN",
                    "usernameSecret": {"name": "k"},
                    "passwordSecret": {"name": "k", "key": "p"},
                }
            },
            "spec.kafka.sasl.usernameSecret.key: required field is missing",
        ),
        (
            {"tls": {"certSecret": {"name": "c", "key": "tls.crt"}}},
            "spec.kafka.tls.keySecret: is required with certSecret",
        ),
        (
            {"tls": {"keySecret": {"name": "c", "key": "tls.key"}}},
            "spec.kafka.tls.certSecret: is required with keySecret",
        ),
        (
            {"tls": {"keyPasswordSecret": {"name": "c", "key": "pw"}}},
            "spec.kafka.tls.keyPasswordSecret: only applies with keySecret",
        ),
        (
            {"tls": {}, "consumer": {"security.protocol": "PLAINTEXT"}},
            "spec.kafka.consumer['security.protocol']: is decided by kafka.sasl / kafka.tls",
        ),
        (
            {"tls": {}, "producer": {"ssl.ca.location": "/x"}},
            "spec.kafka.producer['ssl.ca.location']: is decided by kafka.sasl / kafka.tls",
        ),
    ],
)
def test_bad_kafka_security_settings_are_named(kafka: dict[str, Any], expected: str) -> None:
    document = example()
    document["spec"]["kafka"].update(kafka)

    assert expected in error_of(document)


def test_a_pipeline_has_at_most_max_steps_steps() -> None:
    document = example()
    steps = document["spec"]["pipeline"]["steps"]
    filters = [{"filter": {"field": "type", "op": "exists"}}] * (spec.MAX_STEPS - len(steps) + 1)
    document["spec"]["pipeline"]["steps"] = filters + steps

    assert (
        f"spec.pipeline.steps: must have at most {spec.MAX_STEPS} items (got {spec.MAX_STEPS + 1})"
        in error_of(document)
    )


def test_the_metadata_uid_is_read_when_present_and_optional_otherwise() -> None:
    document = example()
    assert parse_manifest(yaml.safe_dump(document)).metadata.uid is None
    document["metadata"]["uid"] = "1234"
    assert parse_manifest(yaml.safe_dump(document)).metadata.uid == "1234"


# --------------------------------------------------------------------------- status


def test_a_status_round_trips_through_its_yaml_names_and_ignores_kopfs_keys() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    written = {
        "phase": "Running",
        "observedGeneration": 4,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllWorkersReady",
                "lastTransitionTime": now.isoformat(),
            }
        ],
        "parallelism": 3,
        "selector": "weir.dev/job=orders",
        "readyWorkers": 3,
        "lag": {"records": 12, "measuredAt": now.isoformat()},
        "lastCheckpoint": {
            "id": "c-9",
            "url": "s3://b/ns/orders/checkpoints/c-9/",
            "completedAt": now.isoformat(),
        },
        "savepointHistory": [{"id": "sp-1", "trigger": "nonce", "triggerNonce": 7}],
        "reconciledFingerprint": "4c7902c9a5a4ca15",
        "intent": {"action": "savepoint", "id": "i-1", "generation": 4, "startedAt": now.isoformat()},
        "kopf": {"progress": {"reconcile": {"retries": 1}}},
    }

    status = model.StreamJobStatus.model_validate(written)
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)

    assert status.conditions[0].last_transition_time == now
    assert status.intent is not None and status.intent.action == "savepoint"
    assert "kopf" not in dumped
    assert dumped["lastCheckpoint"]["completedAt"] == "2026-01-02T03:04:05Z"
    assert dumped["savepointHistory"] == [{"id": "sp-1", "trigger": "nonce", "triggerNonce": 7}]


@pytest.mark.parametrize(
    ("status", "field"),
    [
        ({"phase": "Sleeping"}, "phase"),
        (
            {
                "conditions": [
                    {
                        "type": "Happy",
                        "status": "True",
                        "reason": "X",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ]
            },
            "conditions.0.type",
        ),
        (
            {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "X",
                        "lastTransitionTime": "2026-01-01T00:00:00",
                    }
                ]
            },
            "conditions.0.lastTransitionTime",
        ),
        (
            {"intent": {"action": "dance", "id": "i", "generation": 1, "startedAt": "2026-01-01T00:00:00Z"}},
            "intent.action",
        ),
    ],
)
def test_a_malformed_status_is_rejected_naming_the_field(status: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        model.StreamJobStatus.model_validate(status)
    assert field in {".".join(str(p) for p in e["loc"]) for e in raised.value.errors()}


def test_condition_types_cover_the_four_conditions() -> None:
    assert model.CONDITION_TYPES == ("Ready", "Progressing", "Degraded", "Stalled")


@pytest.mark.parametrize(
    ("members", "where"),
    [
        ({"parallelism": 1_000_000}, "spec.parallelism"),
        ({"autoscaler": {"maxParallelism": 5000}}, "spec.autoscaler.maxParallelism"),
    ],
)
def test_an_absurd_parallelism_is_refused_naming_the_field_and_the_maximum(
    members: dict[str, Any], where: str
) -> None:
    message = error_of(with_spec(**members))

    assert where in message and str(spec.MAX_PARALLELISM) in message


def test_the_largest_parallelism_is_accepted() -> None:
    job_spec = parse_manifest(yaml.safe_dump(with_spec(parallelism=spec.MAX_PARALLELISM))).spec

    assert job_spec.parallelism == spec.MAX_PARALLELISM
