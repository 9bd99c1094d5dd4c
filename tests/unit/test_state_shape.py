"""Tests of weir.state_shape: the shape of a job's keyed state, its JSON form and how two shapes compare."""

from __future__ import annotations

from typing import Any

import pytest

from weir.spec import Pipeline
from weir.state_shape import Output, StateShape, Verdict, compare, shape_of

COUNT_AND_SUM = {"n": {"fn": "count"}, "s": {"fn": "sum", "field": "amount"}}


def pipeline(
    *before: dict[str, Any],
    window: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    process: str | None = None,
    source_key: str | None = None,
) -> Pipeline:
    """A pipeline: ``before`` steps, then a window + aggregate (default tumbling 1m, count and sum),
    or a process step, or nothing when ``window`` is ``{}``."""
    steps: list[dict[str, Any]] = list(before)
    if process is not None:
        steps.append({"process": {"function": process}})
    elif window != {}:
        steps.append({"window": window or {"type": "tumbling", "size": "1m"}})
        steps.append({"aggregate": {"outputs": outputs or COUNT_AND_SUM}})
    source: dict[str, Any] = {"topics": ["events"]}
    if source_key is not None:
        source["key"] = {"field": source_key}
    return Pipeline.model_validate({"source": source, "steps": steps, "sink": {"topic": "out"}})


def shape(p: Pipeline, name: str = "job", namespace: str = "ns") -> StateShape:
    return shape_of(p.stages(), namespace, name)


# --------------------------------------------------------------------------- shape_of


def test_a_message_keyed_window_job_has_its_window_and_outputs_in_spec_order() -> None:
    assert shape(pipeline()) == StateShape(
        "window",
        "messageKey",
        (("type", "tumbling"), ("size", 60_000)),
        (Output("n", "count", None), Output("s", "sum", "amount")),
    )


def test_a_key_by_field_job_is_keyed_by_the_field_and_its_repartition_topic() -> None:
    got = shape(
        pipeline({"filter": {"field": "ok", "op": "eq", "value": True}}, {"keyBy": {"field": "user"}})
    )
    assert got.key == "keyBy:user@weir-ns-job-1-repartition"


def test_a_key_by_message_key_job_is_keyed_by_the_message_key() -> None:
    assert shape(pipeline({"keyBy": {"messageKey": True}})).key == "messageKey"


def test_a_source_key_job_is_keyed_by_the_source_field_and_its_repartition_topic() -> None:
    assert shape(pipeline(source_key="user")).key == "sourceField:user@weir-ns-job-0-repartition"


def test_the_repartition_topic_in_the_key_is_the_one_the_job_reads() -> None:
    from weir.spec import Job, JobSpec

    p = pipeline({"keyBy": {"field": "user"}})
    job = Job(
        "job", "ns", JobSpec.model_validate({"kafka": {"bootstrapServers": "k:9092"}, "pipeline": p}), p
    )
    assert shape(p).key == f"keyBy:user@{job.repartition_topic}"


def test_sliding_and_session_windows_keep_exactly_their_members() -> None:
    sliding = shape(
        pipeline(window={"type": "sliding", "size": "1m", "slide": "10s", "allowedLateness": "5s"})
    )
    session = shape(pipeline(window={"type": "session", "gap": "30s"}))
    assert sliding.window == (("type", "sliding"), ("size", 60_000), ("slide", 10_000))
    assert session.window == (("type", "session"), ("gap", 30_000))


def test_a_custom_aggregate_is_named_by_its_class_reference_without_importing_it() -> None:
    got = shape(pipeline(outputs={"t": {"fn": "custom", "function": "nowhere.at_all:Top", "field": "x"}}))
    assert got.outputs == (Output("t", "custom:nowhere.at_all:Top", "x"),)


def test_a_process_job_has_its_function_reference_and_key() -> None:
    got = shape(pipeline({"keyBy": {"field": "user"}}, process="nowhere.at_all:Fn"))
    assert got == StateShape("process", "keyBy:user@weir-ns-job-0-repartition", process="nowhere.at_all:Fn")


def test_a_stateless_job_has_no_keyed_state() -> None:
    assert shape(pipeline({"filter": {"field": "ok", "op": "exists"}}, window={})) == StateShape(
        "none", "none"
    )


def test_a_renamed_key_by_job_has_another_shape_and_is_incompatible() -> None:
    p = pipeline({"keyBy": {"field": "user"}})
    verdict = compare(shape(p, name="orders"), shape(p, name="orders-v2"))
    assert verdict.kind == "incompatible"
    assert verdict.changes == (
        "pipeline.keyBy: repartition topic weir-ns-orders-0-repartition -> weir-ns-orders-v2-0-repartition "
        "(the job was renamed, or a step was added or removed before the shuffle; stage-2 state lives under "
        "the topic)",
    )


def test_a_renamed_message_keyed_job_has_the_same_shape() -> None:
    assert compare(shape(pipeline(), name="a"), shape(pipeline(), name="b")) == Verdict("same")


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    "p",
    [
        pipeline(),
        pipeline({"keyBy": {"field": "user"}}, window={"type": "sliding", "size": "1m", "slide": "10s"}),
        pipeline(outputs={"t": {"fn": "custom", "function": "m.n:Top"}}),
        pipeline(process="m.n:Fn", source_key="user"),
        pipeline(window={}),
    ],
    ids=["window", "sliding-keyBy", "custom", "process", "stateless"],
)
def test_to_json_and_from_json_round_trip(p: Pipeline) -> None:
    import orjson

    original = shape(p)
    written = orjson.loads(orjson.dumps(original.to_json()))  # what a manifest holds
    assert StateShape.from_json(written) == original


def test_a_shape_with_aggregate_params_round_trips() -> None:
    original = StateShape(
        "window",
        "messageKey",
        (("type", "tumbling"), ("size", 1000)),
        (Output("p", "percentile", "x", (("q", 0.99),)),),
    )
    assert StateShape.from_json(original.to_json()) == original


def test_to_json_is_primitives_with_sorted_keys() -> None:
    written = shape(pipeline()).to_json()
    assert written == {
        "key": "messageKey",
        "outputs": [
            {"field": None, "fn": "count", "name": "n", "params": {}},
            {"field": "amount", "fn": "sum", "name": "s", "params": {}},
        ],
        "process": None,
        "stage": "window",
        "window": {"size": 60_000, "type": "tumbling"},
    }
    assert list(written) == sorted(written)


def test_from_json_ignores_keys_a_newer_writer_added() -> None:
    written = shape(pipeline()).to_json()
    written["version"] = 7
    written["window"]["timezone"] = "UTC"
    written["outputs"][0]["precision"] = 14
    assert StateShape.from_json(written) == shape(pipeline())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "joined"}, "stateShape.stage: must be one of window, process, none (got 'joined')"),
        ({"key": None}, "stateShape.key: must be a non-empty string (got None)"),
        (
            {"window": {"type": "tumbling", "size": "1m"}},
            "stateShape.window.size: must be an integer of milliseconds (got '1m')",
        ),
        ({"outputs": {"n": "count"}}, "stateShape.outputs: must be a list (got {'n': 'count'})"),
        ({"outputs": [{"name": "n"}]}, "stateShape.outputs[0].fn: must be a non-empty string (got None)"),
        (
            {"outputs": [{"name": "n", "fn": "count", "params": {"q": [1]}}]},
            "stateShape.outputs[0].params: must be an object of JSON scalars (got {'q': [1]})",
        ),
        ({"process": 3}, "stateShape.process: must be a string or null (got 3)"),
    ],
)
def test_from_json_rejects_a_malformed_key_naming_it(change: dict[str, Any], message: str) -> None:
    written = {**shape(pipeline()).to_json(), **change}
    with pytest.raises(ValueError) as caught:
        StateShape.from_json(written)
    assert str(caught.value) == message


def test_from_json_rejects_something_that_is_not_an_object() -> None:
    with pytest.raises(ValueError, match=r"^stateShape: must be an object \(got \[\]\)$"):
        StateShape.from_json([])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- describe


def test_describe_says_the_window_key_and_outputs_in_one_line() -> None:
    p = pipeline({"keyBy": {"field": "user"}})
    assert shape(p).describe() == "window tumbling 1m by keyBy:user; outputs n=count, s=sum(amount)"


def test_describe_names_slide_gap_process_and_stateless() -> None:
    sliding = shape(
        pipeline(window={"type": "sliding", "size": "1m", "slide": "1500ms"}, outputs={"n": {"fn": "count"}})
    )
    session = shape(pipeline(window={"type": "session", "gap": "2h"}, outputs={"n": {"fn": "count"}}))
    assert sliding.describe() == "window sliding 1m slide 1500ms by messageKey; outputs n=count"
    assert session.describe() == "window session gap 2h by messageKey; outputs n=count"
    assert shape(pipeline(process="m.n:Fn")).describe() == "process m.n:Fn by messageKey"
    assert shape(pipeline(window={})).describe() == "stateless (no keyed state)"


# --------------------------------------------------------------------------- compare


def test_identical_shapes_are_the_same() -> None:
    assert compare(shape(pipeline()), shape(pipeline())) == Verdict("same")
    assert compare(shape(pipeline()), shape(pipeline())).compatible


def test_an_added_output_migrates_and_says_it_starts_empty() -> None:
    verdict = compare(
        shape(pipeline()), shape(pipeline(outputs={**COUNT_AND_SUM, "mx": {"fn": "max", "field": "a"}}))
    )
    assert verdict == Verdict(
        "migrate", ("pipeline.aggregate.mx: added (starts empty in windows open at the upgrade)",)
    )
    assert verdict.compatible


def test_a_removed_output_migrates_and_says_its_state_is_dropped() -> None:
    verdict = compare(shape(pipeline()), shape(pipeline(outputs={"n": {"fn": "count"}})))
    assert verdict == Verdict("migrate", ("pipeline.aggregate.s: removed (its state is dropped)",))


def test_reordered_outputs_migrate_because_slots_are_matched_by_name() -> None:
    reordered = {"s": COUNT_AND_SUM["s"], "n": COUNT_AND_SUM["n"]}
    verdict = compare(shape(pipeline()), shape(pipeline(outputs=reordered)))
    assert verdict == Verdict(
        "migrate", ("pipeline.aggregate: outputs reordered (slots are matched by name)",)
    )


def test_an_output_renamed_is_one_removed_and_one_added() -> None:
    renamed = {"n": COUNT_AND_SUM["n"], "total": COUNT_AND_SUM["s"]}
    verdict = compare(shape(pipeline()), shape(pipeline(outputs=renamed)))
    assert verdict.kind == "migrate"
    assert verdict.changes == (
        "pipeline.aggregate.total: added (starts empty in windows open at the upgrade)",
        "pipeline.aggregate.s: removed (its state is dropped)",
    )


@pytest.mark.parametrize(
    ("new", "line"),
    [
        (pipeline(window={"type": "tumbling", "size": "5m"}), "pipeline.window.size: 1m -> 5m"),
        (
            pipeline(outputs={**COUNT_AND_SUM, "s": {"fn": "max", "field": "amount"}}),
            "pipeline.aggregate.s.fn: sum -> max",
        ),
        (
            pipeline(outputs={**COUNT_AND_SUM, "s": {"fn": "sum", "field": "price"}}),
            "pipeline.aggregate.s.field: amount -> price",
        ),
        (pipeline({"keyBy": {"field": "user"}}), "pipeline.keyBy: message key -> user"),
        (pipeline(source_key="user"), "pipeline.source.key: message key -> source key user"),
        (pipeline(process="m.n:Fn"), "stage: window -> process"),
        (pipeline(window={}), "stage: window -> none"),
    ],
    ids=["size", "fn", "field", "keyBy", "source-key", "to-process", "to-stateless"],
)
def test_changes_to_what_state_means_are_incompatible_naming_the_field(new: Pipeline, line: str) -> None:
    verdict = compare(shape(pipeline()), shape(new))
    assert verdict == Verdict("incompatible", (line,))
    assert not verdict.compatible


def test_a_window_type_change_names_every_member_that_differs() -> None:
    old = shape(pipeline(window={"type": "tumbling", "size": "1m"}))
    new = shape(pipeline(window={"type": "sliding", "size": "1m", "slide": "30s"}))
    assert compare(old, new).changes == (
        "pipeline.window.type: tumbling -> sliding",
        "pipeline.window.slide: (none) -> 30s",
    )
    session = shape(pipeline(window={"type": "session", "gap": "1m"}))
    assert compare(old, session).changes == (
        "pipeline.window.type: tumbling -> session",
        "pipeline.window.size: 1m -> (none)",
        "pipeline.window.gap: (none) -> 1m",
    )


def test_a_key_by_field_change_names_both_fields() -> None:
    old = shape(pipeline({"keyBy": {"field": "user"}}))
    new = shape(pipeline({"keyBy": {"field": "country"}}))
    assert compare(old, new) == Verdict("incompatible", ("pipeline.keyBy: user -> country",))


def test_a_process_function_change_is_incompatible() -> None:
    assert compare(shape(pipeline(process="m.n:A")), shape(pipeline(process="m.n:B"))) == Verdict(
        "incompatible", ("pipeline.process.function: m.n:A -> m.n:B",)
    )


def test_a_custom_aggregate_class_change_is_incompatible_naming_the_function() -> None:
    old = shape(pipeline(outputs={"t": {"fn": "custom", "function": "m.n:A"}}))
    new = shape(pipeline(outputs={"t": {"fn": "custom", "function": "m.n:B"}}))
    assert compare(old, new) == Verdict("incompatible", ("pipeline.aggregate.t.function: m.n:A -> m.n:B",))


def test_an_incompatible_change_lists_only_what_makes_it_incompatible() -> None:
    new = shape(pipeline(window={"type": "tumbling", "size": "5m"}, outputs={"n": {"fn": "count"}}))
    assert compare(shape(pipeline()), new) == Verdict("incompatible", ("pipeline.window.size: 1m -> 5m",))


def test_state_appearing_where_a_job_had_none_is_incompatible() -> None:
    assert compare(shape(pipeline(window={})), shape(pipeline())) == Verdict(
        "incompatible", ("stage: none -> window",)
    )


def test_two_stateless_shapes_are_the_same_whatever_else_changed() -> None:
    before = shape(pipeline({"filter": {"field": "ok", "op": "exists"}}, window={}))
    after = shape(pipeline({"select": ["a"]}, {"keyBy": {"field": "a"}}, window={}), name="other")
    assert compare(before, after) == Verdict("same")


def test_a_changed_aggregate_param_is_incompatible() -> None:
    base = StateShape(
        "window",
        "messageKey",
        (("type", "tumbling"), ("size", 1000)),
        (Output("p", "percentile", "x", (("q", 0.5),)),),
    )
    other = StateShape(base.stage, base.key, base.window, (Output("p", "percentile", "x", (("q", 0.99),)),))
    assert compare(base, other) == Verdict("incompatible", ("pipeline.aggregate.p.q: 0.5 -> 0.99",))
