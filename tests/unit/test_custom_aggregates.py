"""Custom aggregate functions (weir.AggregateFunction) in windows: results, merges, state and failures."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

import weir
from weir.aggregates import Overflow
from weir.custom_aggregates import aggregator_for
from weir.functions import FunctionError
from weir.spec import Pipeline, SpecError
from weir.testing import InMemoryWindowStore
from weir.window_operator import NO_WATERMARK, WindowOperator

END_OF_TIME = 2**62


def pipeline(window: dict[str, Any], outputs: dict[str, Any]) -> Pipeline:
    return Pipeline.model_validate(
        {
            "source": {"topics": ["t"]},
            "steps": [{"window": window}, {"aggregate": {"outputs": outputs}}],
            "sink": {"topic": "out"},
        }
    )


MEDIAN_AND_SUM = {
    "n": {"fn": "count"},
    "median": {"fn": "custom", "function": "user_functions:Median", "field": "v"},
    "total": {"fn": "sum", "field": "v"},
}


def run(
    window: dict[str, Any], outputs: dict[str, Any], records: list[tuple[int, dict[str, Any]]]
) -> dict[tuple[int, int], dict[str, Any]]:
    """Feed (ts, record) for key "k" through a WindowOperator whose store serialises accumulators."""
    agg = aggregator_for(pipeline(window, outputs))
    kind = window["type"]
    size = int(window.get("size", "0s")[:-1]) * 1000 if "size" in window else None
    slide = int(window["slide"][:-1]) * 1000 if "slide" in window else None
    gap = int(window["gap"][:-1]) * 1000 if "gap" in window else None
    operator = WindowOperator(
        kind, size, slide, gap, 0, agg, "final", InMemoryWindowStore(agg.dumps, agg.loads)
    )
    operator.process_batch([("k", ts, record, NO_WATERMARK) for ts, record in records])
    return {(r.start, r.end): r.values for r in operator.advance(END_OF_TIME)}


def test_a_custom_aggregate_sits_among_the_built_in_outputs_in_output_order() -> None:
    results = run(
        {"type": "tumbling", "size": "10s"}, MEDIAN_AND_SUM, [(1, {"v": 5}), (2, {"v": 1}), (3, {"v": 9})]
    )

    assert results == {(0, 10_000): {"n": 3, "median": 5, "total": 15}}
    assert list(results[(0, 10_000)]) == ["n", "median", "total"]


def test_a_custom_aggregate_across_sliding_windows_sees_each_windows_records() -> None:
    records = [(1_000, {"v": 1}), (6_000, {"v": 7}), (11_000, {"v": 3})]

    results = run({"type": "sliding", "size": "10s", "slide": "5s"}, MEDIAN_AND_SUM, records)

    assert results == {
        (-5_000, 5_000): {"n": 1, "median": 1, "total": 1},
        (0, 10_000): {"n": 2, "median": 7, "total": 8},
        (5_000, 15_000): {"n": 2, "median": 7, "total": 10},
        (10_000, 20_000): {"n": 1, "median": 3, "total": 3},
    }


def test_merged_sessions_merge_their_custom_accumulators() -> None:
    outputs = {"items": {"fn": "custom", "function": "user_functions:ItemsSeen"}, "n": {"fn": "count"}}
    # Two sessions 10 s apart, then a record that bridges them (gap 6 s).
    records = [(0, {"item": "b"}), (10_000, {"item": "a"}), (5_000, {"item": "c"})]

    results = run({"type": "session", "gap": "6s"}, outputs, records)

    assert results == {(0, 16_000): {"items": ["a", "b", "c"], "n": 3}}


def test_an_add_that_raises_changes_none_of_the_records_sliding_windows() -> None:
    outputs = {**MEDIAN_AND_SUM, "total": {"fn": "sum", "field": "w"}}
    agg = aggregator_for(pipeline({"type": "sliding", "size": "10s", "slide": "5s"}, outputs))
    operator = WindowOperator("sliding", 10_000, 5_000, None, 0, agg, "final", InMemoryWindowStore())
    operator.process_batch([("k", 6_000, {"v": 2, "w": 2}, NO_WATERMARK)])

    with pytest.raises(FunctionError) as caught:
        operator.process_batch([("k", 7_000, {"v": "not a number", "w": 5}, NO_WATERMARK)])

    assert caught.value.reason == "function_error"
    assert caught.value.detail == "user_functions:Median (add): TypeError: not a number: 'not a number'"
    results = {(r.start, r.end): r.values for r in operator.advance(END_OF_TIME)}
    assert results == {
        (0, 10_000): {"n": 1, "median": 2, "total": 2},
        (5_000, 15_000): {"n": 1, "median": 2, "total": 2},
    }


def test_an_add_that_raises_leaves_the_accumulator_as_it_was() -> None:
    agg = aggregator_for(pipeline({"type": "tumbling", "size": "1s"}, MEDIAN_AND_SUM))
    acc = agg.create()
    agg.add(acc, {"v": 4}, 0)
    before = agg.dumps(acc)

    with pytest.raises(FunctionError):
        agg.add(acc, {"v": [1]}, 0)

    assert agg.dumps(acc) == before


def test_an_overflowing_sum_leaves_the_custom_accumulator_as_it_was_too() -> None:
    agg = aggregator_for(pipeline({"type": "tumbling", "size": "1s"}, MEDIAN_AND_SUM))
    acc = agg.create()
    agg.add(acc, {"v": 2**63 - 1}, 0)
    before = agg.dumps(acc)

    with pytest.raises(Overflow):
        agg.add(acc, {"v": 1}, 0)

    assert agg.dumps(acc) == before


def test_a_result_that_raises_is_a_function_error_in_place_of_the_value_and_named_unrepresentable() -> None:
    agg = aggregator_for(
        pipeline(
            {"type": "tumbling", "size": "1s"},
            {"x": {"fn": "custom", "function": "user_functions:BrokenResult", "field": "v"}},
        )
    )
    acc = agg.create()
    agg.add(acc, {"v": 1}, 0)

    values = agg.result(acc)

    assert isinstance(values["x"], FunctionError)
    assert values["x"].detail == "user_functions:BrokenResult (result): ZeroDivisionError: no result"
    assert agg.unrepresentable(values) == "x"


def test_custom_accumulators_round_trip_through_dumps_and_loads_in_state_encoding_version_1() -> None:
    agg = aggregator_for(pipeline({"type": "tumbling", "size": "1s"}, MEDIAN_AND_SUM))
    acc = agg.create()
    for v in (3, 1.5, 8):
        agg.add(acc, {"v": v}, 0)

    data = agg.dumps(acc)

    assert data.endswith(b"\n\x01[[3,1.5,8]]")
    assert agg.result(agg.loads(data)) == agg.result(acc) == {"n": 3, "median": 3, "total": 12.5}
    with pytest.raises(ValueError, match="custom aggregate"):
        agg.loads(data.partition(b"\n")[0])


def test_a_null_field_value_is_skipped_like_the_built_in_aggregates_skip_it() -> None:
    results = run({"type": "tumbling", "size": "10s"}, MEDIAN_AND_SUM, [(1, {"v": None}), (2, {"v": 4})])

    assert results == {(0, 10_000): {"n": 2, "median": 4, "total": 4}}


def test_a_pipeline_without_custom_outputs_gets_the_built_in_aggregator_unchanged() -> None:
    agg = aggregator_for(pipeline({"type": "tumbling", "size": "1s"}, {"n": {"fn": "count"}}))

    assert agg.dumps(agg.create()) == b"[0]"


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("user_functions:Nope", "module 'user_functions' has no attribute 'Nope'"),
        (
            "user_functions:Dedup",
            "user_functions:Dedup is not a weir.AggregateFunction (no create, add, merge, result)",
        ),
    ],
)
def test_a_custom_class_that_does_not_load_is_a_spec_error_naming_its_output(ref: str, why: str) -> None:
    with pytest.raises(SpecError) as caught:
        aggregator_for(pipeline({"type": "tumbling", "size": "1s"}, {"p": {"fn": "custom", "function": ref}}))

    assert str(caught.value) == f"spec.pipeline.steps[1].aggregate.outputs.p.function: {why}"


def test_custom_outputs_need_a_function_and_only_custom_takes_one() -> None:
    with pytest.raises(ValidationError, match=r"is required for custom"):
        Pipeline.model_validate_json(
            '{"source":{"topics":["t"]},"steps":[{"window":{"type":"tumbling","size":"1s"}},'
            '{"aggregate":{"outputs":{"p":{"fn":"custom"}}}}],"sink":{"topic":"o"}}'
        )


def test_weir_exports_the_aggregate_function_protocol() -> None:
    from user_functions import Median

    assert isinstance(Median(), weir.AggregateFunction)
