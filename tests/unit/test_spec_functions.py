"""Function steps in the pipeline spec: map, flatMap, function filters, process, and the Stages they give."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from weir.functions import FUNCTION_REF
from weir.spec import Pipeline, SpecError, load_job
from weir_operator import crd


def pipeline(*steps: dict[str, Any], source: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"source": source or {"topics": ["events"]}, "steps": list(steps), "sink": {"topic": "out"}}


def manifest(pipe: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "StreamJob",
            "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"kafka": {"bootstrapServers": "127.0.0.1:9092"}, "pipeline": pipe},
        }
    )


def errors_of(pipe: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        load_job(manifest(pipe))
    return str(caught.value)


WINDOW = [{"window": {"type": "tumbling", "size": "1m"}}, {"aggregate": {"outputs": {"n": {"fn": "count"}}}}]


def test_map_and_flat_map_steps_default_to_dead_lettering_function_errors() -> None:
    built = Pipeline.model_validate(
        pipeline(
            {"map": {"function": "m:f"}}, {"flatMap": {"function": "m.sub:g", "onError": "fail"}}, *WINDOW
        )
    )

    assert built.steps[0].kind == "map"
    assert built.steps[0].map is not None and built.steps[0].map.on_error == "deadLetter"
    assert built.steps[1].kind == "flatMap"
    assert built.steps[1].flat_map is not None and built.steps[1].flat_map.on_error == "fail"


def test_a_pipeline_with_a_map_before_its_window_has_function_stages() -> None:
    stages = Pipeline.model_validate(pipeline({"map": {"function": "m:f"}}, *WINDOW)).stages()

    assert stages.terminal == "window"
    assert stages.functions is True
    assert stages.keyed_index == 1
    assert stages.window is not None and stages.aggregate is not None and stages.process is None


def test_a_declarative_window_pipeline_has_no_function_stages() -> None:
    stages = Pipeline.model_validate(pipeline({"filter": {"field": "a", "op": "exists"}}, *WINDOW)).stages()

    assert (stages.terminal, stages.functions, stages.keyed_index) == ("window", False, 1)


def test_a_function_filter_counts_as_a_function_step() -> None:
    stages = Pipeline.model_validate(pipeline({"filter": {"function": "m:keep"}}, *WINDOW)).stages()

    assert stages.functions is True


def test_a_process_pipeline_keyed_by_a_field_repartitions_before_the_process_step() -> None:
    stages = Pipeline.model_validate(
        pipeline(
            {"map": {"function": "m:f"}}, {"keyBy": {"field": "user"}}, {"process": {"function": "m:Dedup"}}
        )
    ).stages()

    assert stages.terminal == "process"
    assert stages.process is not None and stages.process.function == "m:Dedup"
    assert stages.window is None and stages.aggregate is None
    assert (stages.key_from, stages.key_field) == ("keyByField", "user")
    assert stages.repartition is not None and stages.repartition.step_index == 1
    assert stages.keyed_index == 2


def test_a_process_pipeline_keyed_by_the_source_key_field_repartitions_at_the_process_step() -> None:
    stages = Pipeline.model_validate(
        pipeline({"process": {"function": "m:P"}}, source={"topics": ["t"], "key": {"field": "u"}})
    ).stages()

    assert stages.key_from == "sourceField"
    assert stages.repartition is not None and stages.repartition.step_index == 0


@pytest.mark.parametrize(
    "source", [{"topics": ["t"]}, {"topics": ["t"], "key": {"field": "u"}}], ids=["message key", "source key"]
)
def test_a_stateless_pipeline_never_repartitions(source: dict[str, Any]) -> None:
    with_key_by = Pipeline.model_validate(
        pipeline({"map": {"function": "m:f"}}, {"keyBy": {"field": "user"}})
    )
    plain = Pipeline.model_validate(pipeline({"select": ["u"]}, source=source))

    for stages in (with_key_by.stages(), plain.stages()):
        assert stages.terminal == "none"
        assert stages.repartition is None
        assert stages.window is None and stages.process is None
    assert with_key_by.stages().key_from == "keyByField"
    assert with_key_by.stages().keyed_index == 2
    assert plain.stages().functions is False


def test_a_pipeline_without_steps_is_stateless() -> None:
    stages = Pipeline.model_validate(pipeline()).stages()

    assert (stages.terminal, stages.functions, stages.keyed_index) == ("none", False, 0)


def test_windowed_gives_the_window_of_a_window_pipeline_and_refuses_others() -> None:
    windowed = Pipeline.model_validate(pipeline({"keyBy": {"field": "k"}}, *WINDOW)).stages().windowed()
    assert windowed.window_index == 1 and windowed.window.type == "tumbling"
    assert windowed.repartition is not None

    with pytest.raises(SpecError, match="a 'process' pipeline has no window"):
        Pipeline.model_validate(pipeline({"process": {"function": "m:P"}})).stages().windowed()


def test_after_a_map_later_steps_may_read_fields_the_source_record_may_lack() -> None:
    pipe = pipeline(
        {"select": ["u"]},
        {"map": {"function": "m:f"}},
        {"filter": {"field": "made_by_map", "op": "exists"}},
        {"keyBy": {"field": "user"}},
        {"window": {"type": "tumbling", "size": "1m"}},
        {"aggregate": {"outputs": {"total": {"fn": "sum", "field": "total"}}}},
    )

    assert load_job(manifest(pipe)).pipeline.stages().functions


def test_before_a_map_a_field_a_select_dropped_is_still_refused() -> None:
    pipe = pipeline(
        {"select": ["u"]}, {"filter": {"field": "price", "op": "exists"}}, {"map": {"function": "m:f"}}
    )

    assert errors_of(pipe) == (
        "spec.pipeline.steps[1].filter.field: field 'price' does not exist here: steps[0].select keeps only u"
    )


def test_a_function_filter_keeps_field_checks_for_the_steps_after_it() -> None:
    pipe = pipeline(
        {"select": ["u"]}, {"filter": {"function": "m:keep"}}, {"keyBy": {"field": "price"}}, *WINDOW
    )

    assert errors_of(pipe).startswith("spec.pipeline.steps[2].keyBy.field: field 'price' does not exist here")


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            {"map": {"function": "no_colon"}},
            "spec.pipeline.steps[0].map.function: must match " + FUNCTION_REF + " (got 'no_colon')",
        ),
        ({"map": {}}, "spec.pipeline.steps[0].map.function: required field is missing"),
        (
            {"flatMap": {"function": "m:f", "onError": "ignore"}},
            "spec.pipeline.steps[0].flatMap.onError: must be one of deadLetter, fail (got 'ignore')",
        ),
        (
            {"process": {"function": "m:P", "extra": 1}},
            "spec.pipeline.steps[0].process.extra: unknown field",
        ),
        (
            {"filter": {"field": "a", "op": "exists", "onError": "fail"}},
            "spec.pipeline.steps[0].filter.onError: only applies to a function filter",
        ),
        (
            {"filter": {"not": {"function": "m:keep"}}},
            "spec.pipeline.steps[0].filter.not.function: a function filter must be the whole filter, "
            "not inside and/or/not",
        ),
        (
            {"filter": {"or": [{"field": "a", "op": "exists"}, {"function": "m:keep"}]}},
            "spec.pipeline.steps[0].filter.or[1].function: a function filter must be the whole filter, "
            "not inside and/or/not",
        ),
        (
            {"filter": {"function": "m:keep", "field": "a", "op": "exists"}},
            "spec.pipeline.steps[0].filter: must be exactly one of a comparison (field/op), and, or, not, "
            "function (got field/op, function)",
        ),
    ],
)
def test_bad_function_steps_are_named_with_their_field_path(step: dict[str, Any], expected: str) -> None:
    assert errors_of(pipeline(step)) == expected


def test_nothing_may_follow_a_process_step() -> None:
    pipe = pipeline({"process": {"function": "m:P"}}, {"filter": {"field": "a", "op": "exists"}})

    assert errors_of(pipe) == (
        "spec.pipeline.steps[1].filter: filter must come before keyBy, window and process "
        "(steps[0] is a process)"
    )


def test_only_one_process_step_is_allowed() -> None:
    pipe = pipeline({"process": {"function": "m:P"}}, {"process": {"function": "m:Q"}})

    assert (
        errors_of(pipe)
        == "spec.pipeline.steps[1].process: only one process step is allowed (steps[0] is one)"
    )


def test_the_crd_carries_the_function_reference_pattern_on_every_function_member() -> None:
    step = crd.streamjob_schema()["properties"]["spec"]["properties"]["pipeline"]["properties"]["steps"][
        "items"
    ]
    members = step["properties"]

    for name in ("map", "flatMap", "process"):
        assert members[name]["properties"]["function"]["pattern"] == FUNCTION_REF
        assert members[name]["required"] == ["function"]
        assert members[name]["properties"]["onError"]["enum"] == ["deadLetter", "fail"]
    assert members["filter"]["properties"]["function"]["pattern"] == FUNCTION_REF
    output = members["aggregate"]["properties"]["outputs"]["additionalProperties"]
    assert output["properties"]["function"]["pattern"] == FUNCTION_REF
    assert "custom" in output["properties"]["fn"]["enum"]
    rule = step["x-kubernetes-validations"][0]["rule"]
    for name in ("filter", "select", "rename", "map", "flatMap", "keyBy", "window", "aggregate", "process"):
        assert f"has(self.{name})" in rule


@pytest.mark.parametrize(
    ("ref", "valid"),
    [
        ("pkg.mod:name", True),
        ("m:Class.method", True),
        ("m", False),
        ("m:", False),
        ("1m:f", False),
        ("m:f()", False),
    ],
)
def test_the_function_reference_pattern_accepts_module_colon_name_only(ref: str, valid: bool) -> None:
    assert (re.fullmatch(FUNCTION_REF, ref) is not None) == valid


def test_function_members_survive_a_dump_and_are_left_out_while_unset() -> None:
    built = Pipeline.model_validate(
        pipeline(
            {"filter": {"function": "m:keep", "onError": "fail"}},
            {"map": {"function": "m:f"}},
            {"window": {"type": "tumbling", "size": "1m"}},
            {"aggregate": {"outputs": {"p": {"fn": "custom", "function": "m:P"}, "n": {"fn": "count"}}}},
        )
    )

    dumped = built.model_dump(mode="json", by_alias=True)

    assert Pipeline.model_validate(dumped) == built
    assert dumped["steps"][1]["map"] == {"function": "m:f", "onError": "deadLetter"}
    assert "map" not in dumped["steps"][0] and "process" not in dumped["steps"][2]
    assert "function" not in dumped["steps"][3]["aggregate"]["outputs"]["n"]
