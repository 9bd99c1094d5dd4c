"""Tests of the Python builder API: it produces the same Pipeline models a manifest does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import weir.api
from weir import spec
from weir.api import Expr, PipelineBuilder, col, pipeline, source
from weir.records import compile_prepare
from weir.spec import Condition, Output, Pipeline, SpecError, as_pipeline

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"


def from_yaml(text: str) -> Pipeline:
    return Pipeline.model_validate(yaml.safe_load(text))


def test_the_builder_produces_the_pipeline_of_the_example_manifest() -> None:
    built = (
        pipeline.source("events", event_time="ts", time_format="epochMillis")
        .watermark("5s", idle_timeout="30s")
        .filter(col("type") == "purchase")
        .filter((col("price") > 0) & ~(col("user_id") == "bot"))
        .select("product_id", "price")
        .rename(price="amount")
        .key_by("product_id", partitions=4)
        .window_tumbling("1m", allowed_lateness="0s")
        .aggregate(revenue=("sum", "amount"), orders="count", averageOrder=("avg", "amount"))
        .sink("revenue-per-minute", dead_letter="revenue-dlq")
        .build()
    )

    assert built == spec.load_job(EXAMPLE).pipeline


def test_the_builder_example_from_the_docs_equals_its_yaml() -> None:
    built = (
        pipeline.source("events", event_time="ts", time_format="epochMillis")
        .filter(col("type") == "purchase")
        .key_by("product_id")
        .window_tumbling("1m")
        .aggregate(revenue=("sum", "price"), orders="count")
        .sink("revenue-per-minute", dead_letter="revenue-dlq")
    )

    assert as_pipeline(built) == from_yaml(
        """
        source: {topics: [events], eventTime: {field: ts, format: epochMillis}}
        steps:
          - filter: {field: type, op: eq, value: purchase}
          - keyBy: {field: product_id}
          - window: {type: tumbling, size: 1m}
          - aggregate: {outputs: {revenue: {fn: sum, field: price}, orders: {fn: count}}}
        sink: {topic: revenue-per-minute}
        deadLetter: {topic: revenue-dlq}
        """
    )


def test_sliding_and_session_windows_message_keys_and_source_options_match_their_yaml() -> None:
    sliding = (
        source("a", "b", key="user", format="json", start_from="latest", max_value_bytes=4096)
        .key_by_message_key()
        .window_sliding("10m", "1m", allowed_lateness=5000)
        .aggregate({"max price": ("max", "price")}, emit="updates")
        .sink("out")
    )
    session = (
        source("clicks", event_time="at", time_format="iso8601")
        .window_session("30m")
        .aggregate(first=("first", "page"), last=("last", "page"))
        .sink("sessions")
    )

    assert sliding.build() == from_yaml(
        """
        source: {topics: [a, b], key: {field: user}, startFrom: latest, maxValueBytes: 4096}
        steps:
          - keyBy: {messageKey: true}
          - window: {type: sliding, size: 10m, slide: 1m, allowedLateness: 5s}
          - aggregate: {emit: updates, outputs: {max price: {fn: max, field: price}}}
        sink: {topic: out}
        """
    )
    assert session.build() == from_yaml(
        """
        source: {topics: [clicks], eventTime: {field: at, format: iso8601}}
        steps:
          - window: {type: session, gap: 30m}
          - aggregate: {outputs: {first: {fn: first, field: page}, last: {fn: last, field: page}}}
        sink: {topic: sessions}
        """
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (col("a") == "x", {"field": "a", "op": "eq", "value": "x"}),
        (col("a") == None, {"field": "a", "op": "eq", "value": None}),  # noqa: E711 - builds a condition
        (col("a") != 1, {"field": "a", "op": "ne", "value": 1}),
        (col("a") < 1.5, {"field": "a", "op": "lt", "value": 1.5}),
        (col("a") <= 2, {"field": "a", "op": "le", "value": 2}),
        (col("a") > "m", {"field": "a", "op": "gt", "value": "m"}),
        (col("a") >= 0, {"field": "a", "op": "ge", "value": 0}),
        (col("a").isin(["x", 1, True]), {"field": "a", "op": "in", "value": ["x", 1, True]}),
        (col("a").not_in(("x",)), {"field": "a", "op": "notIn", "value": ["x"]}),
        (col("a").exists(), {"field": "a", "op": "exists"}),
    ],
)
def test_column_comparisons_build_the_matching_condition(expr: Expr, expected: dict[str, Any]) -> None:
    assert expr.condition == Condition.model_validate(expected)


def test_and_or_flatten_and_double_negation_cancels() -> None:
    a, b, c = col("a").exists(), col("b").exists(), col("c").exists()

    assert ((a & b) & c).condition == Condition(and_=(a.condition, b.condition, c.condition))
    assert (a | (b | c)).condition == Condition(or_=(a.condition, b.condition, c.condition))
    assert ((a & b) | c).condition == Condition(or_=(Condition(and_=(a.condition, b.condition)), c.condition))
    assert (~a).condition == Condition(not_=a.condition)
    assert (~~a).condition == a.condition


def test_using_a_condition_as_a_truth_value_is_an_error() -> None:
    with pytest.raises(TypeError, match=re.escape("use & | ~")):
        bool(col("a") == 1)
    with pytest.raises(TypeError):
        _ = (col("a") == 1) and (col("b") == 2)


def test_a_column_comparison_with_an_invalid_value_is_a_spec_error() -> None:
    with pytest.raises(
        SpecError, match=r"^col\('a'\)\.value: must be a number or a string for lt \(got None\)$"
    ):
        _ = col("a") < None  # type: ignore[operator]


def test_builders_are_immutable_so_a_prefix_can_be_shared() -> None:
    base = source("events").filter(col("type") == "purchase")
    one = base.window_tumbling("1m").aggregate(n="count").sink("one")
    two = base.window_tumbling("5m").aggregate(n="count").sink("two")

    assert len(base._steps) == 1
    assert one.build().sink.topic == "one"
    assert two.build().steps[1].window == spec.Window(type="tumbling", size=300_000)


def test_rename_accepts_a_mapping_and_keywords_and_filter_accepts_a_condition() -> None:
    built = (
        source("t")
        .rename({"the price": "price"}, user="user_id")
        .filter(Condition(field="price", op="exists"))
        .window_tumbling(60_000)
        .aggregate(n=Output(fn="count"))
        .sink("o")
        .build()
    )

    assert built.steps[0].rename == {"the price": "price", "user": "user_id"}
    assert built.steps[1].filter == Condition(field="price", op="exists")


def test_an_invalid_builder_pipeline_names_the_step_path() -> None:
    builder = (
        source("events").select("a").key_by("b").window_tumbling("1 minute").aggregate(n="count").sink("o")
    )

    with pytest.raises(SpecError) as caught:
        builder.build()

    assert str(caught.value).splitlines() == [
        "steps[2].window.size: must be a duration like 250ms, 5s, 1m, 2h, 1d or an integer of milliseconds "
        "(got '1 minute')"
    ]


def test_a_field_reference_error_is_reported_for_a_builder_too() -> None:
    builder = source("events").select("a").key_by("b").window_tumbling("1m").aggregate(n="count").sink("o")

    with pytest.raises(SpecError, match=r"^steps\[1\]\.keyBy\.field: field 'b' does not exist here"):
        builder.build()


def test_a_builder_without_a_sink_says_so() -> None:
    with pytest.raises(SpecError, match=r"^sink: required field is missing$"):
        source("events").window_tumbling("1m").aggregate(n="count").build()


def test_an_output_that_is_not_count_a_pair_or_an_output_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="output 'n'"):
        source("events").aggregate(n="sum")  # type: ignore[arg-type]


def test_anything_that_takes_a_pipeline_takes_a_builder() -> None:
    builder = source("events").window_tumbling("1m").aggregate(n="count").sink("o")

    prepare = compile_prepare(builder)

    assert prepare(b"{}", b"k", 5) == ("k", 5, {})


def test_as_pipeline_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="expected a weir Pipeline or pipeline builder, got str"):
        as_pipeline("events")  # type: ignore[arg-type]


def test_every_public_name_of_the_api_module_is_exported() -> None:
    public = {
        name
        for name, value in vars(weir.api).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == "weir.api"
    }

    assert public <= set(weir.api.__all__)
    assert isinstance(pipeline.source("t"), PipelineBuilder)


def test_the_builder_sets_max_future_skew_and_leaves_the_default_when_not_given() -> None:
    base = pipeline.source("events", event_time="ts").window_tumbling("1m").aggregate(n="count").sink("out")

    assert base.watermark("5s").build().watermark.max_future_skew == 86_400_000
    assert base.watermark("5s", max_future_skew="1h").build().watermark.max_future_skew == 3_600_000
    assert base.watermark(max_future_skew=0).build().watermark.max_future_skew == 0
