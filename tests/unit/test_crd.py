"""The StreamJob CRD: generated from the models, checked in, structural, with subresources, columns, CEL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from weir import spec
from weir_operator import crd, model

ROOT = Path(__file__).resolve().parents[2]


def version() -> dict[str, Any]:
    versions: list[dict[str, Any]] = crd.crd()["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def schema() -> dict[str, Any]:
    root: dict[str, Any] = version()["schema"]["openAPIV3Schema"]
    return root


def nodes(node: Any) -> Iterator[Any]:
    """Every dict and list inside ``node``, ``node`` included."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from nodes(child)


def test_the_checked_in_crd_is_what_the_models_generate() -> None:
    checked_in = (ROOT / crd.CRD_PATH).read_text()

    assert checked_in == crd.crd_yaml(), "crds/ is stale: run `make crds` and commit the result"


def test_the_chart_carries_the_same_crd_as_crds() -> None:
    assert (ROOT / crd.CHART_CRD_PATH).read_text() == (ROOT / crd.CRD_PATH).read_text(), (
        "the chart's CRD differs from crds/: run `make crds`"
    )


def test_the_generator_writes_both_copies_and_check_reports_stale_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert crd.main(["--root", str(tmp_path), "--check"]) == 1
    assert "crds/streamjobs.weir.dev.yaml" in capsys.readouterr().err

    assert crd.main(["--root", str(tmp_path)]) == 0
    assert crd.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / crd.CHART_CRD_PATH).write_text("stale")
    assert crd.main(["--root", str(tmp_path), "--check"]) == 1
    assert "charts/weir-operator/crds/" in capsys.readouterr().err


def test_the_crd_yaml_parses_back_to_the_generated_crd() -> None:
    assert yaml.safe_load(crd.crd_yaml()) == crd.crd()


def test_names_scope_and_version_are_the_fixed_ones() -> None:
    spec_ = crd.crd()["spec"]

    assert crd.crd()["metadata"]["name"] == "streamjobs.weir.dev"
    assert spec_["group"] == "weir.dev"
    assert spec_["scope"] == "Namespaced"
    assert spec_["names"] == {
        "kind": "StreamJob",
        "listKind": "StreamJobList",
        "plural": "streamjobs",
        "singular": "streamjob",
        "shortNames": ["sj"],
        "categories": ["weir"],
    }
    assert (version()["name"], version()["served"], version()["storage"]) == ("v1alpha1", True, True)


def test_status_and_scale_subresources_map_parallelism_and_the_selector() -> None:
    assert version()["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.parallelism",
            "statusReplicasPath": ".status.parallelism",
            "labelSelectorPath": ".status.selector",
        },
    }
    status = schema()["properties"]["status"]["properties"]
    assert status["parallelism"]["type"] == "integer"
    assert status["selector"]["type"] == "string"


def test_printer_columns_show_phase_parallelism_ready_lag_last_checkpoint_age_and_lifecycle() -> None:
    columns = [
        (c["name"], c["jsonPath"]) for c in version()["additionalPrinterColumns"] if "priority" not in c
    ]

    assert columns == [
        ("Phase", ".status.phase"),
        ("Parallelism", ".spec.parallelism"),
        ("Ready", ".status.readyWorkers"),
        ("Lag", ".status.lag.records"),
        ("Last Checkpoint", ".status.lastCheckpoint.completedAt"),
        ("Age", ".metadata.creationTimestamp"),
        ("Lifecycle", ".status.lifecycleState"),
    ]


def test_every_printer_column_points_at_a_field_of_the_schema() -> None:
    for column in version()["additionalPrinterColumns"]:
        node = schema()
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        for part in parts:
            node = node["properties"][part]
        wanted = {"date": "string", "integer": "integer", "string": "string"}[column["type"]]
        assert node["type"] == wanted, column


def test_the_schema_is_structural_without_refs_titles_consts_or_null_types() -> None:
    assert crd.structural_problems(schema()) == []
    for node in nodes(schema()):
        if isinstance(node, dict):
            assert not {"$ref", "$defs", "title", "const", "propertyNames"} & set(node)
            assert node.get("type") != "null"
            assert node.get("additionalProperties") is not False


def test_only_spec_parallelism_and_upgrade_mode_have_defaults() -> None:
    spec_properties = schema()["properties"]["spec"]["properties"]
    defaults = [node for node in nodes(schema()) if isinstance(node, dict) and "default" in node]

    assert defaults == [spec_properties["parallelism"], spec_properties["upgradeMode"]]
    assert spec_properties["parallelism"]["default"] == 1


def test_the_upgrade_mode_column_always_has_a_value_because_the_schema_defaults_it_as_the_models_do() -> None:
    column = next(c for c in version()["additionalPrinterColumns"] if c["name"] == "Upgrade Mode")
    upgrade_mode = schema()["properties"]["spec"]["properties"]["upgradeMode"]

    assert column["jsonPath"] == ".spec.upgradeMode"
    assert upgrade_mode["default"] == spec.JobSpec.model_fields["upgrade_mode"].default == "savepoint"


def test_parallelism_and_the_autoscaler_bounds_have_a_maximum() -> None:
    spec_properties = schema()["properties"]["spec"]["properties"]
    autoscaler = spec_properties["autoscaler"]["properties"]

    for node in (spec_properties["parallelism"], autoscaler["minParallelism"], autoscaler["maxParallelism"]):
        assert (node["minimum"], node["maximum"]) == (1, spec.MAX_PARALLELISM)


def test_descriptions_say_how_rollbacks_work_and_the_autoscaler_no_longer_says_it_only_recommends() -> None:
    spec_properties = schema()["properties"]["spec"]["properties"]
    status_properties = schema()["properties"]["status"]["properties"]
    autoscaler = spec_properties["autoscaler"]

    for node in (autoscaler, *autoscaler["properties"].values(), status_properties["lastScaling"],
                 status_properties["autoscaler"]):
        assert "not acted on" not in node["description"] and "planned" not in node["description"], node
    assert "mode: recommend" in autoscaler["properties"]["enabled"]["description"]
    assert "not implemented" not in status_properties["stableFingerprint"]["description"]
    assert "stability gate" in status_properties["lastStableSpec"]["description"]
    assert status_properties["lastStableSpec"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "Lifecycle" in [c["name"] for c in version()["additionalPrinterColumns"]]
    for node in nodes(schema()):
        if isinstance(node, dict) and "description" in node:
            text = node["description"].lower()
            assert "rollbacks return" not in text and "it only recommends" not in text, text


def test_every_job_spec_field_is_in_the_schema_with_its_yaml_name_and_docstring() -> None:
    properties = schema()["properties"]["spec"]["properties"]

    for name, field in spec.JobSpec.model_fields.items():
        alias = field.alias or name
        assert alias in properties, alias
        assert properties[alias].get("description"), f"spec.{alias} has no description"
    assert set(schema()["properties"]["spec"]["required"]) == {"kafka"}


def test_every_status_field_is_in_the_schema_and_status_keeps_kopfs_bookkeeping() -> None:
    status = schema()["properties"]["status"]

    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert {f.alias or n for n, f in model.StreamJobStatus.model_fields.items()} == set(status["properties"])
    condition = status["properties"]["conditions"]["items"]
    assert set(condition["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert condition["properties"]["type"]["enum"] == ["Ready", "Progressing", "Degraded", "Stalled"]
    assert condition["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert set(status["properties"]["intent"]["properties"]) >= {"action", "id", "generation", "startedAt"}


def test_enums_list_the_allowed_values() -> None:
    properties = schema()["properties"]["spec"]["properties"]

    assert properties["upgradeMode"]["enum"] == ["stateless", "savepoint", "last-state"]
    assert properties["state"]["enum"] == ["running", "suspended"]
    assert properties["deliveryGuarantee"]["enum"] == ["exactly-once", "at-least-once"]
    assert properties["checkpoint"]["properties"]["cleanupPolicy"]["enum"] == ["retain", "delete"]


def test_durations_and_quantities_are_int_or_string_with_their_constraints_hoisted() -> None:
    spec_properties = schema()["properties"]["spec"]["properties"]
    interval = spec_properties["checkpoint"]["properties"]["interval"]
    cpu = spec_properties["resources"]["properties"]["limits"]["additionalProperties"]

    for node in (interval, cpu):
        assert node["x-kubernetes-int-or-string"] is True
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
        assert "pattern" in node
    assert interval["minimum"] == 0


def test_string_patterns_survive_validators_that_improve_the_messages() -> None:
    url = schema()["properties"]["spec"]["properties"]["checkpoint"]["properties"]["url"]

    assert url["pattern"].startswith("^(s3://")


def test_an_exclusive_minimum_becomes_the_openapi_v3_0_form() -> None:
    utilization = schema()["properties"]["spec"]["properties"]["autoscaler"]["properties"][
        "targetUtilization"
    ]

    assert (utilization["minimum"], utilization["exclusiveMinimum"], utilization["maximum"]) == (0, True, 1)


def test_cross_field_rules_are_cel_validations_on_the_objects_they_concern() -> None:
    spec_schema = schema()["properties"]["spec"]

    def rules(node: dict[str, Any]) -> list[str]:
        return [v["rule"] for v in node.get("x-kubernetes-validations", [])]

    assert rules(spec_schema) == ["has(self.pipeline) != has(self.entrypoint)"]
    assert "self.minParallelism" in rules(spec_schema["properties"]["autoscaler"])[0]
    assert "s3://" in rules(spec_schema["properties"]["checkpoint"])[0]
    step = spec_schema["properties"]["pipeline"]["properties"]["steps"]
    assert step["maxItems"] == spec.MAX_STEPS
    assert "exists_one" in rules(step["items"])[0]
    assert "metadata.name" in rules(schema())[0]
    for node in nodes(schema()):
        if isinstance(node, dict):
            for validation in node.get("x-kubernetes-validations", []):
                assert validation["message"], validation


def test_self_referencing_conditions_are_inlined_to_a_fixed_depth_then_kept_as_objects() -> None:
    step = schema()["properties"]["spec"]["properties"]["pipeline"]["properties"]["steps"]["items"]
    condition = step["properties"]["filter"]
    depth = 1
    while "properties" in condition:
        members = {"field", "op", "value", "and", "or", "not", "function", "onError"}
        assert set(condition["properties"]) == members
        condition = condition["properties"]["not"]
        depth += 1

    assert depth == crd.MAX_NESTING + 1
    assert condition["type"] == "object"
    assert condition["x-kubernetes-preserve-unknown-fields"] is True


def test_descriptions_come_from_the_docstrings_with_rst_literals_simplified() -> None:
    upgrade_mode = schema()["properties"]["spec"]["properties"]["upgradeMode"]["description"]

    assert "`savepoint`" in upgrade_mode
    assert "``" not in yaml.safe_dump(schema())


def test_a_keyword_without_a_structural_form_fails_the_generation() -> None:
    class Odd(BaseModel):
        tags: list[str] = []

    raw = Odd.model_json_schema()
    raw["properties"]["tags"]["uniqueItems"] = True

    with pytest.raises(ValueError, match="tags: JSON schema keyword 'uniqueItems'"):
        crd._clean(raw, ())


def test_structural_problems_names_untyped_nodes_and_foreign_anyofs() -> None:
    bad = {
        "type": "object",
        "properties": {
            "loose": {"description": "no type"},
            "either": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]},
        },
    }

    problems = crd.structural_problems(bad)

    assert ".loose: no type" in problems
    assert any(p.startswith(".either: anyOf") for p in problems)
