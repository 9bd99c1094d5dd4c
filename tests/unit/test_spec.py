"""Tests of the StreamJob spec models: loading, validation messages, derived names and the JSON schema."""

from __future__ import annotations

import copy
import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import weir.spec
from weir import spec
from weir.spec import (
    Condition,
    FieldScope,
    Job,
    Pipeline,
    SpecError,
    Window,
    format_validation_error,
    load_job,
    parse_duration,
    parse_manifest,
)

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"


def example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def minimal_pipeline(**overrides: Any) -> dict[str, Any]:
    pipeline: dict[str, Any] = {
        "source": {"topics": ["events"]},
        "steps": [
            {"window": {"type": "tumbling", "size": "1m"}},
            {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
        ],
        "sink": {"topic": "out"},
    }
    pipeline.update(overrides)
    return pipeline


def manifest(pipeline: dict[str, Any] | None = None, **spec_overrides: Any) -> dict[str, Any]:
    job_spec: dict[str, Any] = {"kafka": {"bootstrapServers": "127.0.0.1:9092"}}
    if pipeline is not None:
        job_spec["pipeline"] = pipeline
    job_spec.update(spec_overrides)
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "revenue", "namespace": "shop"},
        "spec": job_spec,
    }


def errors_of(document: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        load_job(yaml.safe_dump(document))
    return str(caught.value)


def mutated(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    document = example()
    change(document)
    return document


def steps_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = document["spec"]["pipeline"]["steps"]
    return steps


# --------------------------------------------------------------------------- loading


def test_the_example_manifest_loads_with_durations_in_milliseconds_and_snake_case_attributes() -> None:
    job = load_job(EXAMPLE)

    assert (job.name, job.namespace) == ("revenue", "default")
    assert job.spec.parallelism == 1
    assert job.spec.kafka.bootstrap_servers == "127.0.0.1:9092"
    pipeline = job.pipeline
    assert pipeline.source.topics == ("events",)
    assert pipeline.source.event_time is not None
    assert pipeline.source.event_time.field == "ts"
    assert pipeline.watermark.max_out_of_orderness == 5_000
    assert pipeline.watermark.idle_timeout == 30_000
    assert [step.kind for step in pipeline.steps] == [
        "filter",
        "filter",
        "select",
        "rename",
        "keyBy",
        "window",
        "aggregate",
    ]
    window = pipeline.steps[5].window
    assert window == Window(type="tumbling", size=60_000, allowed_lateness=0)
    assert pipeline.sink.topic == "revenue-per-minute"


def test_a_manifest_loads_from_yaml_text_json_text_a_path_string_and_a_path(tmp_path: Path) -> None:
    document = manifest(minimal_pipeline())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))

    loaded = [
        load_job(yaml.safe_dump(document)),
        load_job(orjson.dumps(document).decode()),
        load_job(str(path)),
        load_job(path),
    ]

    assert all(job == loaded[0] for job in loaded)
    assert (loaded[0].name, loaded[0].namespace) == ("revenue", "shop")


def test_the_namespace_defaults_to_default_and_status_and_extra_metadata_are_ignored() -> None:
    document = manifest(minimal_pipeline())
    document["metadata"] = {"name": "revenue", "labels": {"app": "x"}, "uid": "1234"}
    document["status"] = {"phase": "Running"}

    job = load_job(yaml.safe_dump(document))

    assert job.namespace == "default"


def test_parse_manifest_validates_without_importing_the_entrypoint() -> None:
    document = manifest(entrypoint="no_such_module_anywhere:build")

    parsed = parse_manifest(yaml.safe_dump(document))

    assert parsed.spec.entrypoint == "no_such_module_anywhere:build"
    assert parsed.spec.pipeline is None


def test_models_are_frozen() -> None:
    job = load_job(EXAMPLE)

    with pytest.raises(ValidationError):
        job.pipeline.sink.topic = "elsewhere"  # type: ignore[misc]


def test_a_dumped_pipeline_validates_back_to_an_equal_pipeline() -> None:
    pipeline = load_job(EXAMPLE).pipeline

    dumped = pipeline.model_dump(by_alias=True, exclude_none=True)

    assert "maxOutOfOrderness" in dumped["watermark"]
    assert Pipeline.model_validate(orjson.loads(orjson.dumps(dumped))) == pipeline


# --------------------------------------------------------------------------- derived names


def test_a_job_derives_its_consumer_group_repartition_topic_and_dead_letter_topic() -> None:
    job = load_job(EXAMPLE)

    assert job.consumer_group == "weir-default-revenue"
    assert job.repartition_topic == "weir-default-revenue-4-repartition"
    assert job.dead_letter_topic == "revenue-dlq"


def test_the_dead_letter_topic_defaults_to_one_named_after_the_job() -> None:
    job = load_job(yaml.safe_dump(manifest(minimal_pipeline())))

    assert job.dead_letter_topic == "weir-shop-revenue-dlq"
    assert job.repartition_topic is None


def plan_of(source: dict[str, Any], *before_window: dict[str, Any]) -> spec.Stages:
    steps = [*before_window, *minimal_pipeline()["steps"]]
    return Pipeline.model_validate(minimal_pipeline(source=source, steps=steps)).stages()


def test_keying_by_a_field_needs_a_repartition_named_after_the_key_by_step() -> None:
    plan = plan_of(
        {"topics": ["events"]}, {"filter": {"field": "a", "op": "exists"}}, {"keyBy": {"field": "a"}}
    )

    assert plan.key_from == "keyByField"
    assert plan.key_field == "a"
    assert plan.repartition == spec.Repartition(step_index=1, partitions=None)
    assert plan.keyed_index == 2
    assert plan.terminal == "window"


def test_a_source_key_field_needs_a_repartition_named_after_the_window_step() -> None:
    plan = plan_of({"topics": ["events"], "key": {"field": "user"}})

    assert plan.key_from == "sourceField"
    assert plan.repartition == spec.Repartition(step_index=0, partitions=None)


def test_the_message_key_needs_no_repartition_even_when_key_by_overrides_a_source_key() -> None:
    default = plan_of({"topics": ["events"]})
    overridden = plan_of({"topics": ["events"], "key": {"field": "user"}}, {"keyBy": {"messageKey": True}})

    assert (default.key_from, default.repartition) == ("messageKey", None)
    assert (overridden.key_from, overridden.repartition) == ("messageKey", None)


def test_key_by_partitions_set_the_repartition_topic_partition_count() -> None:
    plan = plan_of({"topics": ["events"]}, {"keyBy": {"field": "a", "partitions": 12}})

    assert plan.repartition == spec.Repartition(step_index=0, partitions=12)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("written", "millis"),
    [
        ("250ms", 250),
        ("5s", 5_000),
        ("1m", 60_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("0s", 0),
        (1500, 1500),
    ],
)
def test_durations_are_parsed_to_milliseconds(written: str | int, millis: int) -> None:
    assert parse_duration(written) == millis


@pytest.mark.parametrize("written", ["5 sec", "1w", "", "-1s", "1.5s", -5, 1.5, True, None, "5"])
def test_malformed_durations_are_rejected_with_the_accepted_forms(written: object) -> None:
    with pytest.raises(ValueError, match=r"must (be a duration like 250ms|not be negative)"):
        parse_duration(written)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_a_duration_string_is_its_number_times_the_unit(number: int, unit: str) -> None:
    factor = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[unit]

    assert parse_duration(f"{number}{unit}") == number * factor


def test_a_bad_duration_names_its_path_and_value() -> None:
    document = mutated(lambda d: steps_of(d)[5]["window"].update(size="5 sec"))

    assert errors_of(document) == (
        "spec.pipeline.steps[5].window.size: must be a duration like 250ms, 5s, 1m, 2h, 1d "
        "or an integer of milliseconds (got '5 sec')"
    )


def test_a_window_size_of_zero_is_rejected() -> None:
    document = mutated(lambda d: steps_of(d)[5]["window"].update(size="0s"))

    assert errors_of(document) == "spec.pipeline.steps[5].window.size: must be a positive duration (got '0s')"


# --------------------------------------------------------------------------- error messages


def test_an_unknown_field_is_named_with_a_suggestion() -> None:
    document = mutated(lambda d: d["spec"]["pipeline"]["source"].update(topiks=["x"]))

    assert errors_of(document) == "spec.pipeline.source.topiks: unknown field (did you mean topics?)"


def test_an_unknown_field_deep_in_a_condition_is_named_with_a_suggestion() -> None:
    document = mutated(lambda d: steps_of(d)[1]["filter"]["and"][1]["not"].update(feild="x"))

    assert (
        errors_of(document)
        == "spec.pipeline.steps[1].filter.and[1].not.feild: unknown field (did you mean field?)"
    )


def test_a_bad_enum_lists_the_allowed_values() -> None:
    document = mutated(lambda d: steps_of(d)[5]["window"].update(type="tumbled"))

    assert errors_of(document) == (
        "spec.pipeline.steps[5].window.type: must be one of tumbling, sliding, session (got 'tumbled')"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["spec"]["pipeline"]["source"].update(format="avro"),
            "spec.pipeline.source.format: must be one of json, raw (got 'avro')",
        ),
        (
            lambda d: d["spec"]["pipeline"]["source"]["eventTime"].update(format="unix"),
            "spec.pipeline.source.eventTime.format: must be one of epochMillis, epochSeconds, iso8601 "
            "(got 'unix')",
        ),
        (
            lambda d: steps_of(d)[0]["filter"].update(op="equals"),
            "spec.pipeline.steps[0].filter.op: must be one of eq, ne, lt, le, gt, ge, in, notIn, exists "
            "(got 'equals')",
        ),
        (
            lambda d: steps_of(d)[6]["aggregate"].update(emit="always"),
            "spec.pipeline.steps[6].aggregate.emit: must be one of final, updates (got 'always')",
        ),
        (
            lambda d: steps_of(d)[6]["aggregate"]["outputs"]["orders"].update(fn="median"),
            "spec.pipeline.steps[6].aggregate.outputs.orders.fn: must be one of count, sum, min, max, avg, "
            "count_distinct, first, last, custom (got 'median')",
        ),
        (
            lambda d: d.update(kind="Deployment"),
            "kind: must be one of StreamJob (got 'Deployment')",
        ),
    ],
)
def test_every_enum_error_lists_the_allowed_values(
    change: Callable[[dict[str, Any]], object], expected: str
) -> None:
    assert errors_of(mutated(change)) == expected


def test_a_negative_parallelism_is_rejected() -> None:
    document = mutated(lambda d: d["spec"].update(parallelism=-1))

    assert errors_of(document) == "spec.parallelism: must be >= 1 (got -1)"


@pytest.mark.parametrize("parallelism", [True, "4", 2.0])
def test_parallelism_must_be_a_real_integer(parallelism: object) -> None:
    document = mutated(lambda d: d["spec"].update(parallelism=parallelism))

    assert errors_of(document) == f"spec.parallelism: must be an integer (got {parallelism!r})"


def test_both_pipeline_and_entrypoint_are_rejected() -> None:
    document = mutated(lambda d: d["spec"].update(entrypoint="shop.jobs:revenue"))

    assert errors_of(document) == "spec: must set exactly one of pipeline, entrypoint (got both)"


def test_neither_pipeline_nor_entrypoint_is_rejected() -> None:
    document = mutated(lambda d: d["spec"].pop("pipeline"))

    assert errors_of(document) == "spec: must set exactly one of pipeline, entrypoint (got neither)"


def test_a_malformed_entrypoint_names_the_expected_form() -> None:
    document = manifest(entrypoint="shop.jobs.revenue")

    assert errors_of(document).startswith("spec.entrypoint: must match ")


def test_several_errors_are_reported_one_per_line() -> None:
    def change(d: dict[str, Any]) -> None:
        d["spec"]["parallelism"] = 0
        d["spec"]["kafka"]["bootstrapServer"] = "x"

    lines = errors_of(mutated(change)).splitlines()

    assert lines == [
        "spec.parallelism: must be >= 1 (got 0)",
        "spec.kafka.bootstrapServer: unknown field (did you mean bootstrapServers?)",
    ]


def test_missing_required_fields_are_named() -> None:
    document = manifest(minimal_pipeline())
    del document["spec"]["pipeline"]["sink"]
    del document["metadata"]["name"]

    assert errors_of(document).splitlines() == [
        "metadata.name: required field is missing",
        "spec.pipeline.sink: required field is missing",
    ]


def test_a_step_with_two_members_or_none_is_rejected() -> None:
    two = mutated(lambda d: steps_of(d)[2].update(rename={"a": "b"}))
    none = mutated(lambda d: steps_of(d).insert(0, {}))

    assert errors_of(two) == (
        "spec.pipeline.steps[2]: must set exactly one of filter, select, rename, map, flatMap, keyBy, "
        "join, window, aggregate, process (got select, rename)"
    )
    assert errors_of(none).endswith("(got none)")


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            [{"window": {"type": "tumbling", "size": "1m"}}],
            "spec.pipeline.steps: an aggregate step is required right after the window (steps[0])",
        ),
        (
            [{"aggregate": {"outputs": {"n": {"fn": "count"}}}}],
            "spec.pipeline.steps[0].aggregate: aggregate must immediately follow the window step",
        ),
        (
            [{"process": {"function": "m:P"}}, {"window": {"type": "tumbling", "size": "1m"}}],
            "spec.pipeline.steps[1].window: a pipeline has a window or a process step, not both "
            "(steps[0] is one)",
        ),
        (
            [{"process": {"function": "m:P"}}, {"map": {"function": "m:f"}}],
            "spec.pipeline.steps[1].map: map must come before keyBy, window and process "
            "(steps[0] is a process)",
        ),
        (
            [{"keyBy": {"field": "a", "partitions": 3}}],
            "spec.pipeline.steps[0].keyBy.partitions: only applies before a join, window or process step "
            "(a stateless pipeline never repartitions)",
        ),
        (
            [
                {"window": {"type": "tumbling", "size": "1m"}},
                {"filter": {"field": "a", "op": "exists"}},
                {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
            ],
            "spec.pipeline.steps[1].filter: filter must come before keyBy, window and process "
            "(steps[0] is a window)",
        ),
        (
            [
                {"keyBy": {"field": "a"}},
                {"select": ["a"]},
                {"window": {"type": "tumbling", "size": "1m"}},
                {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
            ],
            "spec.pipeline.steps[1].select: select must come before keyBy, window and process "
            "(steps[0] is a keyBy)",
        ),
        (
            [
                {"keyBy": {"field": "a"}},
                {"keyBy": {"messageKey": True}},
                {"window": {"type": "tumbling", "size": "1m"}},
                {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
            ],
            "spec.pipeline.steps[1].keyBy: only one keyBy step is allowed (steps[0] is one)",
        ),
        (
            [
                {"window": {"type": "tumbling", "size": "1m"}},
                {"keyBy": {"field": "a"}},
                {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
            ],
            "spec.pipeline.steps[1].keyBy: keyBy must come before the window or process step",
        ),
        (
            [
                {"window": {"type": "tumbling", "size": "1m"}},
                {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
                {"window": {"type": "tumbling", "size": "1m"}},
            ],
            "spec.pipeline.steps[2].window: only one window step is allowed (steps[0] is one)",
        ),
    ],
)
def test_step_order_violations_name_the_offending_step(steps: list[dict[str, Any]], expected: str) -> None:
    assert errors_of(manifest(minimal_pipeline(steps=steps))) == expected


TRANSFORM = {"filter": {"field": "k", "op": "exists"}}
SELECT = {"select": ["k"]}
KEY_BY = {"keyBy": {"field": "k"}}
WINDOW = {"window": {"type": "tumbling", "size": "1m"}}
AGGREGATE = {"aggregate": {"outputs": {"n": {"fn": "count"}}}}
MAP = {"map": {"function": "m:f"}}
FLAT_MAP = {"flatMap": {"function": "m:f"}}
PROCESS = {"process": {"function": "m:P"}}
KINDS = {
    "T": TRANSFORM, "S": SELECT, "M": MAP, "F": FLAT_MAP,
    "K": KEY_BY, "W": WINDOW, "A": AGGREGATE, "P": PROCESS,
}


def is_valid_order(kinds: str) -> bool:
    """The documented grammar: (filter|select|rename|map|flatMap)* keyBy? (window aggregate | process)?."""
    import re

    return re.fullmatch(r"[TSMF]*K?(WA|P)?", kinds) is not None


@given(st.text(alphabet="TSMFKWAP", max_size=7))
def test_a_step_sequence_validates_exactly_when_it_follows_the_order_rules(kinds: str) -> None:
    document = minimal_pipeline(steps=[KINDS[kind] for kind in kinds])

    try:
        Pipeline.model_validate(document)
        valid = True
    except ValidationError:
        valid = False

    assert valid == is_valid_order(kinds)


def test_a_field_dropped_by_select_cannot_be_read_later() -> None:
    document = mutated(lambda d: steps_of(d)[4]["keyBy"].update(field="user_id"))

    assert errors_of(document) == (
        "spec.pipeline.steps[4].keyBy.field: field 'user_id' does not exist here: "
        "steps[2].select keeps only product_id, price"
    )


def test_a_field_renamed_away_cannot_be_read_later() -> None:
    document = mutated(lambda d: steps_of(d)[6]["aggregate"]["outputs"]["revenue"].update(field="price"))

    assert errors_of(document) == (
        "spec.pipeline.steps[6].aggregate.outputs.revenue.field: "
        "field 'price' was renamed to 'amount' by steps[3]"
    )


def test_a_filter_reading_a_renamed_field_is_named_down_to_the_nested_condition() -> None:
    steps = [
        {"rename": {"a": "b"}},
        {"filter": {"or": [{"field": "b", "op": "exists"}, {"not": {"field": "a", "op": "exists"}}]}},
        WINDOW,
        AGGREGATE,
    ]

    assert errors_of(manifest(minimal_pipeline(steps=steps))) == (
        "spec.pipeline.steps[1].filter.or[1].not.field: field 'a' was renamed to 'b' by steps[0]"
    )


def test_a_raw_source_has_only_the_value_field() -> None:
    steps = [{"filter": {"field": "type", "op": "eq", "value": "x"}}, WINDOW, AGGREGATE]
    document = manifest(minimal_pipeline(source={"topics": ["t"], "format": "raw"}, steps=steps))

    assert errors_of(document) == (
        "spec.pipeline.steps[0].filter.field: "
        "field 'type' does not exist here: a raw record has only the field 'value'"
    )


def test_renaming_back_and_forth_and_swapping_keep_fields_readable() -> None:
    steps = [
        {"rename": {"a": "b", "b": "a"}},
        {"rename": {"a": "c"}},
        {"filter": {"and": [{"field": "c", "op": "exists"}, {"field": "b", "op": "exists"}]}},
        WINDOW,
        {"aggregate": {"outputs": {"s": {"fn": "sum", "field": "b"}}}},
    ]

    Pipeline.model_validate(minimal_pipeline(steps=steps))


def test_field_scope_maps_current_names_to_source_fields() -> None:
    scope = FieldScope(raw=False)
    scope.rename(0, {"a": "b", "b": "a"})
    scope.rename(1, {"a": "c"})

    assert (scope.source_of("b"), scope.source_of("c"), scope.source_of("other")) == ("a", "b", "other")
    with pytest.raises(ValueError, match="'a' was renamed to 'c' by steps\\[1\\]"):
        scope.source_of("a")


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({"type": "sliding", "size": "1m"}, "steps[0].window.slide: is required for a sliding window"),
        (
            {"type": "tumbling", "size": "1m", "gap": "5s"},
            "steps[0].window.gap: does not apply to a tumbling window (it takes size)",
        ),
        (
            {"type": "session", "size": "1m"},
            "steps[0].window.size: does not apply to a session window (it takes gap)",
        ),
        (
            {"type": "sliding", "size": "1m", "slide": "2m"},
            "steps[0].window.slide: must not exceed size (120000 ms > 60000 ms)",
        ),
        (  # 86.4 million windows per record would stall the worker on its first record
            {"type": "sliding", "size": "1d", "slide": "1ms"},
            "steps[0].window.slide: puts each record in 86400000 windows (size 86400000 ms / slide 1 ms); "
            "at most 10000: use a larger slide",
        ),
        (
            {"type": "sliding", "size": "10001ms", "slide": "1ms"},
            "steps[0].window.slide: puts each record in 10001 windows (size 10001 ms / slide 1 ms); "
            "at most 10000: use a larger slide",
        ),
    ],
)
def test_window_members_must_match_the_window_type(window: dict[str, Any], expected: str) -> None:
    document = manifest(minimal_pipeline(steps=[{"window": window}, AGGREGATE]))

    assert errors_of(document) == f"spec.pipeline.{expected}"


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"field": "a", "op": "in", "value": "x"}, "filter.value: must be a list for in (got 'x')"),
        (
            {"field": "a", "op": "eq", "value": [1]},
            "filter.value: must be a single value for eq (got a list)",
        ),
        ({"field": "a", "op": "exists", "value": 1}, "filter.value: must be omitted for exists"),
        (
            {"field": "a", "op": "lt", "value": True},
            "filter.value: must be a number or a string for lt (got True)",
        ),
        ({"field": "a", "op": "gt"}, "filter.value: must be a number or a string for gt (got None)"),
        (
            {"field": "a", "op": "eq", "value": {"x": 1}},
            "filter.value: must be a string, number, boolean or null",
        ),
        ({"field": "a"}, "filter.op: required field is missing"),
        ({"op": "eq"}, "filter.field: required field is missing"),
        ({}, "filter: must be exactly one of a comparison (field/op), and, or, not, function (got none)"),
        (
            {"field": "a", "op": "exists", "not": {"field": "a", "op": "exists"}},
            "filter: must be exactly one of a comparison (field/op), and, or, not, function "
            "(got field/op, not)",
        ),
        ({"and": []}, "filter.and: must not be empty (got [])"),
        ({"not": {"field": "a", "op": "exists"}, "value": 3}, "filter.value: only applies to a comparison"),
    ],
)
def test_malformed_conditions_are_named(condition: dict[str, Any], expected: str) -> None:
    document = manifest(minimal_pipeline(steps=[{"filter": condition}, WINDOW, AGGREGATE]))

    assert errors_of(document).startswith(f"spec.pipeline.steps[0].{expected}")


def test_an_infinite_filter_value_is_rejected() -> None:
    condition = {"field": "a", "op": "lt", "value": float("inf")}

    with pytest.raises(ValidationError) as caught:
        Condition.model_validate(condition)

    assert format_validation_error(caught.value) == "value: must be a finite number (got inf)"


@pytest.mark.parametrize(
    ("key_by", "expected"),
    [
        ({}, "keyBy: must set exactly one of field, messageKey: true"),
        ({"field": "a", "messageKey": True}, "keyBy: must set exactly one of field, messageKey: true"),
        ({"messageKey": True, "partitions": 3}, "keyBy.partitions: only applies to keyBy field"),
        ({"field": "a", "partitions": 0}, "keyBy.partitions: must be >= 1 (got 0)"),
    ],
)
def test_malformed_key_by_steps_are_named(key_by: dict[str, Any], expected: str) -> None:
    document = manifest(minimal_pipeline(steps=[{"keyBy": key_by}, WINDOW, AGGREGATE]))

    assert errors_of(document).startswith(f"spec.pipeline.steps[0].{expected}")


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        (
            {"n": {"fn": "count", "field": "a"}},
            "outputs.n.field: does not apply to count (it counts records)",
        ),
        ({"s": {"fn": "sum"}}, "outputs.s.field: is required for sum"),
        ({}, "outputs: must not be empty (got {})"),
    ],
)
def test_malformed_aggregate_outputs_are_named(outputs: dict[str, Any], expected: str) -> None:
    document = manifest(minimal_pipeline(steps=[WINDOW, {"aggregate": {"outputs": outputs}}]))

    assert errors_of(document) == f"spec.pipeline.steps[1].aggregate.{expected}"


@pytest.mark.parametrize(
    ("rename", "expected"),
    [
        ({"a": "c", "b": "c"}, "rename: renames two fields to the same name"),
        ({"a": "a"}, "rename.a: renames a field to itself"),
    ],
)
def test_malformed_renames_are_named(rename: dict[str, str], expected: str) -> None:
    document = manifest(minimal_pipeline(steps=[{"rename": rename}, WINDOW, AGGREGATE]))

    assert errors_of(document) == f"spec.pipeline.steps[0].{expected}"


def test_a_select_listing_a_field_twice_is_rejected() -> None:
    document = manifest(minimal_pipeline(steps=[{"select": ["a", "a"]}, WINDOW, AGGREGATE]))

    assert errors_of(document) == "spec.pipeline.steps[0].select: lists a field twice"


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        (
            {"group.id": "mine"},
            "spec.kafka.consumer['group.id']: is set by the weir runtime and must not be given here",
        ),
        ({"sasl.password": "hunter2"}, "spec.kafka.consumer['sasl.password']: is a secret"),
        (
            {"fetch.wait.max.ms": 1.5},
            "spec.kafka.consumer['fetch.wait.max.ms']: must be a string, integer or boolean",
        ),
    ],
)
def test_kafka_properties_owned_by_the_runtime_secret_or_mistyped_are_rejected(
    properties: dict[str, Any], expected: str
) -> None:
    document = manifest(minimal_pipeline())
    document["spec"]["kafka"]["consumer"] = properties

    assert errors_of(document).startswith(expected)


def test_extra_kafka_properties_of_the_allowed_types_are_kept() -> None:
    document = manifest(minimal_pipeline())
    document["spec"]["kafka"]["producer"] = {
        "linger.ms": 5,
        "compression.type": "lz4",
        "socket.nagle.disable": True,
    }

    job = load_job(yaml.safe_dump(document))

    assert job.spec.kafka.producer == {
        "linger.ms": 5,
        "compression.type": "lz4",
        "socket.nagle.disable": True,
    }


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"topics": []}, "spec.pipeline.source.topics: must not be empty (got [])"),
        ({"topics": "events"}, "spec.pipeline.source.topics: must be a list (got 'events')"),
        ({"topics": ["bad topic"]}, "spec.pipeline.source.topics[0]: must match"),
        ({"topics": ["t"], "maxValueBytes": 0}, "spec.pipeline.source.maxValueBytes: must be >= 1 (got 0)"),
        (
            {"topics": ["t"], "eventTime": {"format": "iso8601"}},
            "spec.pipeline.source.eventTime.format: only applies with field",
        ),
        (
            {"topics": ["t"], "format": "raw", "eventTime": {"field": "value"}},
            "spec.pipeline.source.eventTime.format: a raw value is text: only iso8601 applies",
        ),
        (
            {"topics": ["t"], "format": "raw", "key": {"field": "user"}},
            "spec.pipeline.source.key.field: a raw record has only the field 'value'",
        ),
    ],
)
def test_malformed_sources_are_named(source: dict[str, Any], expected: str) -> None:
    assert errors_of(manifest(minimal_pipeline(source=source))).startswith(expected)


def test_a_manifest_that_is_not_an_object_or_not_yaml_or_unreadable_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^\(top level\): must be an object \(got \[\]\)$"):
        load_job("[]\n")
    with pytest.raises(SpecError, match=r"^manifest: not valid YAML or JSON"):
        load_job("spec: [\n")
    with pytest.raises(SpecError, match="cannot read"):
        load_job(tmp_path / "missing.yaml")


def test_a_bad_metadata_name_is_named() -> None:
    document = manifest(minimal_pipeline())
    document["metadata"]["name"] = "Revenue_Job"

    assert errors_of(document).startswith("metadata.name: must match")


def test_spec_error_is_a_value_error_holding_one_line_per_problem() -> None:
    document = manifest(minimal_pipeline(), parallelism=0)
    document["spec"]["kafka"]["oops"] = 1

    with pytest.raises(ValueError) as caught:
        load_job(yaml.safe_dump(document))

    assert isinstance(caught.value, SpecError)
    assert len(caught.value.lines) == 2


def test_format_validation_error_works_on_any_spec_model_with_an_optional_prefix() -> None:
    with pytest.raises(ValidationError) as caught:
        Pipeline.model_validate(minimal_pipeline(sink={"topic": "out", "partitions": 3}))

    assert format_validation_error(caught.value) == "sink.partitions: unknown field"
    assert format_validation_error(caught.value, prefix="spec.pipeline") == (
        "spec.pipeline.sink.partitions: unknown field"
    )


# --------------------------------------------------------------------------- entrypoints


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module on a temporary sys.path entry; returns its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []
    counter = itertools.count()

    def write(body: str) -> str:
        name = f"weir_test_entrypoint_{tmp_path.name.replace('-', '_')}_{next(counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


PIPELINE_JSON = orjson.dumps(minimal_pipeline()).decode()


def test_an_entrypoint_returning_a_pipeline_is_resolved(user_module: Callable[[str], str]) -> None:
    module = user_module(
        f"""
        import json
        from weir.spec import Pipeline

        def build():
            return Pipeline.model_validate(json.loads({PIPELINE_JSON!r}))
        """
    )

    job = load_job(yaml.safe_dump(manifest(entrypoint=f"{module}:build")))

    assert isinstance(job, Job)
    assert job.spec.entrypoint == f"{module}:build"
    assert job.pipeline == Pipeline.model_validate(minimal_pipeline())


def test_an_entrypoint_returning_a_builder_is_built(user_module: Callable[[str], str]) -> None:
    module = user_module(
        """
        from weir.api import pipeline

        def revenue():
            return pipeline.source("events").window_tumbling("1m").aggregate(n="count").sink("out")
        """
    )

    job = load_job(yaml.safe_dump(manifest(entrypoint=f"{module}:revenue")))

    assert job.pipeline == Pipeline.model_validate(minimal_pipeline())


@pytest.mark.parametrize(
    ("body", "function", "expected"),
    [
        (
            "def build():\n    return 42\n",
            "build",
            "must return a weir Pipeline or pipeline builder, not int",
        ),
        (
            "def build():\n    raise RuntimeError('no config')\n",
            "build",
            "build() raised RuntimeError: no config",
        ),
        ("x = 1\n", "build", "has no attribute 'build'"),
        ("build = 1\n", "build", "is not callable"),
        ("def build(:\n", "build", "cannot import module"),
        ("raise ImportError('needs pandas')\n", "build", "(ImportError: needs pandas)"),
        (
            "from weir.api import pipeline\n"
            "def build():\n"
            "    return pipeline.source('t').window_tumbling('soon').aggregate(n='count').sink('o')\n",
            "build",
            "build() built an invalid pipeline\nsteps[0].window.size: must be a duration",
        ),
    ],
)
def test_a_broken_entrypoint_is_a_spec_error_naming_it(
    user_module: Callable[[str], str], body: str, function: str, expected: str
) -> None:
    module = user_module(body)

    message = errors_of(manifest(entrypoint=f"{module}:{function}"))

    assert message.startswith("spec.entrypoint: ")
    assert expected in message


def test_an_entrypoint_in_a_missing_module_is_a_spec_error() -> None:
    message = errors_of(manifest(entrypoint="weir_no_such_module_here:build"))

    assert message.startswith("spec.entrypoint: cannot import module 'weir_no_such_module_here'")


# --------------------------------------------------------------------------- JSON schema


def walk_schemas(node: object) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_schemas(value)


@pytest.mark.parametrize("model", [Pipeline, spec.JobSpec, spec.StreamJob])
def test_the_json_schema_uses_camel_case_names_and_every_model_forbids_extra_fields(
    model: type[BaseModel],
) -> None:
    schema = model.model_json_schema(by_alias=True)

    models = [s for s in walk_schemas(schema) if "properties" in s]
    names = {name for s in models for name in s["properties"]}
    assert models
    assert not {name for name in names if "_" in name}
    assert {s.get("title") for s in models if s.get("additionalProperties") is not False} <= {"ObjectMeta"}


def test_the_pipeline_json_schema_names_camel_case_fields_and_durations_as_int_or_string() -> None:
    schema = Pipeline.model_json_schema(by_alias=True)
    defs = schema["$defs"]

    assert {"eventTime", "startFrom", "maxValueBytes"} <= set(defs["Source"]["properties"])
    assert {"keyBy", "window", "aggregate"} <= set(defs["Step"]["properties"])
    assert set(defs["Condition"]["properties"]) == {
        "field", "op", "value", "and", "or", "not", "function", "onError"
    }
    size = defs["Window"]["properties"]["size"]
    duration = next(option for option in size["anyOf"] if "x-kubernetes-int-or-string" in option)
    assert {tuple(sorted(o)) for o in duration["anyOf"]} == {("minimum", "type"), ("pattern", "type")}


def test_every_public_name_of_the_spec_module_is_exported() -> None:
    public = {
        name
        for name, value in vars(weir.spec).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == "weir.spec"
    }

    assert public <= set(weir.spec.__all__)


def test_copying_the_example_does_not_change_it() -> None:
    # Guards the helpers above: mutated() must work on a fresh copy every time.
    first = example()
    second = copy.deepcopy(first)
    steps_of(second).clear()

    assert steps_of(first)


def test_max_future_skew_defaults_to_one_day_reads_durations_and_zero_is_allowed() -> None:
    def skew(watermark: dict[str, Any] | None) -> int:
        document = minimal_pipeline() | ({"watermark": watermark} if watermark is not None else {})
        return Pipeline.model_validate(document).watermark.max_future_skew

    assert skew(None) == 86_400_000
    assert skew({"maxFutureSkew": "2h"}) == 7_200_000
    assert skew({"maxFutureSkew": 0}) == 0
    with pytest.raises(ValidationError, match="maxFutureSkew"):
        skew({"maxFutureSkew": "soon"})
