"""Tests of the join step's spec: validation with field paths, stages, the Python API, the state
shape and the spec-diff kinds of its fields (weir.spec_join, weir.spec_pipeline, weir.state_shape)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from weir.api import pipeline as api
from weir.graph import compile_job
from weir.join import JoinSpec
from weir.join_feed import TableFeed
from weir.records import DeadLetter
from weir.spec import JobSpec, SpecError, load_job
from weir.spec_diff import Change, diff, kind_of
from weir.state_shape import JoinShape, StateShape, compare, shape_of
from weir.tasks import Task

CATALOG = {"join": {"topic": "catalog", "key": "product", "fields": ["category", "price"], "prefix": "p_"}}
WINDOW = [
    {"window": {"type": "tumbling", "size": "1m"}},
    {"aggregate": {"outputs": {"revenue": {"fn": "sum", "field": "p_price"}}}},
]


def manifest(steps: list[dict[str, Any]], **source: Any) -> dict[str, Any]:
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "enrich", "namespace": "shop"},
        "spec": {
            "kafka": {"bootstrapServers": "127.0.0.1:9092"},
            "pipeline": {
                "source": {"topics": ["purchases"], **source},
                "steps": steps,
                "sink": {"topic": "out"},
            },
        },
    }


def errors_of(steps: list[dict[str, Any]], **source: Any) -> str:
    with pytest.raises(SpecError) as caught:
        load_job(yaml.safe_dump(manifest(steps, **source)))
    return str(caught.value)


def join(**members: Any) -> dict[str, Any]:
    return {"join": {"topic": "catalog", "fields": ["category"], **members}}


# --------------------------------------------------------------------------- validation


def test_a_join_loads_with_global_inner_no_grace_and_a_day_of_retention_by_default() -> None:
    job = load_job(yaml.safe_dump(manifest([{"keyBy": {"field": "user"}}, join(), *WINDOW[:1], WINDOW[1]])))
    step = job.pipeline.steps[1].join

    assert step is not None
    assert (step.topic, step.key, step.mode, step.kind) == ("catalog", None, "global", "inner")
    assert (step.fields, step.prefix, step.grace, step.retention, step.format) == (
        ("category",),
        "",
        0,
        86_400_000,
        "json",
    )


def test_grace_and_retention_are_durations() -> None:
    job = load_job(yaml.safe_dump(manifest([join(grace="5s", retention="2h")])))
    step = job.pipeline.steps[0].join

    assert step is not None
    assert (step.grace, step.retention) == (5_000, 7_200_000)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (join(fields=[]), "spec.pipeline.steps[0].join.fields: must not be empty (got [])"),
        (join(fields=["a", "a"]), "spec.pipeline.steps[0].join.fields: lists a field twice"),
        (
            join(mode="copartitioned", key="product"),
            "spec.pipeline.steps[0].join.key: only applies to mode global: a copartitioned join looks up "
            "the stream's key (key the stream with keyBy instead)",
        ),
        (
            join(mode="local"),
            "spec.pipeline.steps[0].join.mode: must be one of global, copartitioned (got 'local')",
        ),
        (join(kind="outer"), "spec.pipeline.steps[0].join.kind: must be one of inner, left (got 'outer')"),
        (join(format="avro"), "spec.pipeline.steps[0].join.format: must be one of json (got 'avro')"),
        (join(grace="soon"), "spec.pipeline.steps[0].join.grace: must be a duration"),
        (join(topic="bad topic!"), "spec.pipeline.steps[0].join.topic:"),
        (join(tabel="x"), "spec.pipeline.steps[0].join.tabel: unknown field"),
    ],
)
def test_a_bad_join_member_is_named_by_its_path(step: dict[str, Any], expected: str) -> None:
    assert errors_of([step]).startswith(expected)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            [join(), {"keyBy": {"field": "user"}}, *WINDOW],
            "spec.pipeline.steps[1].keyBy: keyBy must come before the join steps (steps[0] is a join: it "
            "joins keyed records)",
        ),
        (
            [join(), {"filter": {"field": "a", "op": "exists"}}],
            "spec.pipeline.steps[1].filter: filter must come before the join steps (steps[0] is a join)",
        ),
        (
            [join(), {"map": {"function": "m:f"}}],
            "spec.pipeline.steps[1].map: map must come before the join steps (steps[0] is a join)",
        ),
        (
            [*WINDOW, join()],
            "spec.pipeline.steps[2].join: join must come before the window step (steps[0])",
        ),
        (
            [{"process": {"function": "m:P"}}, join()],
            "spec.pipeline.steps[1].join: join must come before the process step (steps[0])",
        ),
        (
            [WINDOW[0], join(), WINDOW[1]],
            "spec.pipeline.steps[1].join: join must come before the window step (steps[0])",
        ),
    ],
)
def test_a_join_out_of_place_names_the_offending_step(steps: list[dict[str, Any]], expected: str) -> None:
    assert errors_of(steps) == expected


def test_a_join_key_field_removed_by_a_select_is_refused_with_its_path() -> None:
    assert errors_of([{"select": ["user"]}, join(key="product")]) == (
        "spec.pipeline.steps[1].join.key: field 'product' does not exist here: "
        "steps[0].select keeps only user"
    )


def test_later_steps_may_read_the_fields_a_join_adds_even_after_a_select() -> None:
    steps = [{"select": ["user", "product"]}, {"keyBy": {"field": "user"}}, CATALOG, *WINDOW]
    load_job(yaml.safe_dump(manifest(steps)))  # the aggregate reads p_price, which the join adds

    with_wrong_prefix = [
        *steps[:3],
        WINDOW[0],
        {"aggregate": {"outputs": {"r": {"fn": "sum", "field": "price"}}}},
    ]
    assert errors_of(with_wrong_prefix) == (
        "spec.pipeline.steps[4].aggregate.outputs.r.field: field 'price' does not exist here: "
        "steps[0].select keeps only user, product"
    )


def test_a_second_join_may_look_up_a_field_the_first_added() -> None:
    second = {"join": {"topic": "brands", "key": "p_brand", "fields": ["country"]}}
    first = {"join": {"topic": "catalog", "key": "product", "fields": ["brand"], "prefix": "p_"}}
    load_job(yaml.safe_dump(manifest([{"select": ["product"]}, first, second])))

    assert errors_of([{"select": ["product"]}, second, first]).startswith("spec.pipeline.steps[1].join.key:")


# --------------------------------------------------------------------------- stages


def test_a_join_pipeline_without_a_window_still_shuffles_by_its_key_by_field() -> None:
    job = load_job(yaml.safe_dump(manifest([{"keyBy": {"field": "user", "partitions": 6}}, join()])))
    stages = job.pipeline.stages()

    assert stages.terminal == "none"
    assert stages.stateful
    assert [i for i, _ in stages.joins] == [1]
    assert stages.repartition is not None and stages.repartition.partitions == 6
    assert job.repartition_topic == "weir-shop-enrich-0-repartition"


def test_a_source_key_join_pipeline_repartitions_at_the_first_join() -> None:
    job = load_job(
        yaml.safe_dump(
            manifest([{"select": ["user"]}, join(), join(topic="segments")], key={"field": "user"})
        )
    )

    assert job.repartition_topic == "weir-shop-enrich-1-repartition"
    assert [j.topic for _, j in job.pipeline.stages().joins] == ["catalog", "segments"]


def test_the_python_api_builds_the_same_pipeline_as_the_manifest() -> None:
    built = (
        api.source("purchases")
        .key_by("user")
        .join("catalog", ["category", "price"], key="product", prefix="p_")
        .window_tumbling("1m")
        .aggregate(revenue=("sum", "p_price"))
        .sink("out")
        .build()
    )
    loaded = load_job(yaml.safe_dump(manifest([{"keyBy": {"field": "user"}}, CATALOG, *WINDOW]))).pipeline

    assert built.steps == loaded.steps


def test_the_python_api_reports_a_bad_join_with_its_path() -> None:
    with pytest.raises(SpecError) as caught:
        api.source("purchases").join("catalog", [], mode="copartitioned").sink("out").build()

    assert str(caught.value).startswith("steps[0].join.fields:")


def test_the_job_graph_carries_each_join_with_its_idle_timeout_and_checks_joined_aggregate_fields() -> None:
    steps = [{"keyBy": {"field": "user"}}, CATALOG, join(topic="segments", idleTimeout="5s"), *WINDOW]
    document = manifest(steps)
    document["spec"]["pipeline"]["watermark"] = {"idleTimeout": "30s"}
    graph = compile_job(load_job(yaml.safe_dump(document)))

    assert [(j.index, j.topic, j.key_field, j.mode, j.idle_timeout_ms) for j in graph.joins] == [
        (1, "catalog", "product", "global", 30_000),
        (2, "segments", None, "global", 5_000),
    ]
    assert graph.joins[0].spec == JoinSpec(("category", "price"), "inner", "p_", 0, 86_400_000)
    assert graph.table_topics == ("catalog", "segments")
    assert graph.join_check is not None
    with pytest.raises(DeadLetter, match="aggregate field 'p_price' is missing"):
        graph.join_check({"user": "u"})


def test_a_copartitioned_table_with_another_partition_count_is_refused_with_its_path() -> None:
    graph = compile_job(load_job(yaml.safe_dump(manifest([join(mode="copartitioned")]))))
    keyed = [Task("purchases", p, f"purchases-{p}") for p in range(2)]

    with pytest.raises(SpecError) as caught:
        TableFeed(graph, {"purchases": 2, "catalog": 3}, keyed, 0.0)

    assert str(caught.value) == (
        "spec.pipeline.steps[0].join.topic: a copartitioned table needs as many partitions as the "
        "stream it joins ('catalog' has 3, the stream 2)"
    )


def test_a_global_join_reads_every_table_partition_and_a_copartitioned_one_its_own() -> None:
    steps = [join(), join(topic="orders", mode="copartitioned")]
    graph = compile_job(load_job(yaml.safe_dump(manifest(steps))))
    keyed = [Task("purchases", 1, "purchases-1")]

    feed = TableFeed(graph, {"purchases": 2, "catalog": 3, "orders": 2}, keyed, 0.0)

    assert sorted(feed.tasks) == [("catalog", 0), ("catalog", 1), ("catalog", 2), ("orders", 1)]


# --------------------------------------------------------------------------- state shape


def shape(steps: list[dict[str, Any]]) -> StateShape:
    job = load_job(yaml.safe_dump(manifest(steps)))
    return shape_of(job.pipeline.stages(), job.namespace, job.name)


def test_the_shape_lists_each_joins_topic_lookup_key_and_mode_in_order() -> None:
    s = shape([{"keyBy": {"field": "user"}}, CATALOG, join(topic="segments", kind="left"), *WINDOW])

    assert s.joins == (
        JoinShape("catalog", "field:product", "global"),
        JoinShape("segments", "key", "global"),
    )
    assert s.describe() == (
        "join catalog (global, field:product) then join segments (global, key) then "
        "window tumbling 1m by keyBy:user; outputs revenue=sum(p_price)"
    )
    assert StateShape.from_json(s.to_json()) == s


def test_a_join_only_pipeline_is_stateful_and_keyed() -> None:
    s = shape([join(mode="copartitioned")])

    assert (s.stage, s.key, s.stateful) == ("none", "messageKey", True)
    assert s.describe() == "join catalog (copartitioned, key) by messageKey"


def test_a_shape_without_joins_writes_no_joins_key() -> None:
    assert "joins" not in shape(WINDOW).to_json()


def test_from_json_names_a_malformed_join() -> None:
    data = shape([join()]).to_json()
    data["joins"][0]["topic"] = 3

    with pytest.raises(ValueError, match=r"^stateShape\.joins\[0\]\.topic: must be a non-empty string"):
        StateShape.from_json(data)


@pytest.mark.parametrize(
    ("after", "line"),
    [
        (join(topic="catalog-v2"), "pipeline.steps.join (join 1).topic: catalog -> catalog-v2"),
        (join(key="sku"), "pipeline.steps.join (join 1).key: key -> field:sku"),
        (join(mode="copartitioned"), "pipeline.steps.join (join 1).mode: global -> copartitioned"),
    ],
)
def test_a_changed_table_topic_lookup_key_or_mode_is_incompatible(after: dict[str, Any], line: str) -> None:
    verdict = compare(shape([join(), *WINDOW]), shape([after, *WINDOW]))

    assert (verdict.kind, verdict.changes) == ("incompatible", (line,))


def test_changed_fields_prefix_kind_grace_and_retention_keep_the_shape() -> None:
    changed = join(fields=["category", "margin"], prefix="c_", kind="left", grace="1s", retention="1h")

    assert compare(shape([join(), *WINDOW]), shape([changed, *WINDOW])).kind == "same"


def test_a_join_added_or_removed_is_incompatible() -> None:
    added = compare(shape(WINDOW), shape([join(), *WINDOW]))
    removed = compare(shape([join()]), shape([]))

    assert (added.kind, added.changes) == (
        "incompatible",
        (
            "pipeline.steps.join: 0 -> 1 join steps (a join's table and held records belong to its place "
            "among the joins)",
        ),
    )
    assert (removed.kind, removed.changes) == ("incompatible", ("stage: join -> none",))


# --------------------------------------------------------------------------- spec diff


def spec(steps: list[dict[str, Any]]) -> JobSpec:
    return load_job(yaml.safe_dump(manifest(steps))).spec


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("pipeline.steps.join.topic", "state"),
        ("pipeline.steps.join.key", "state"),
        ("pipeline.steps.join.mode", "state"),
        ("pipeline.steps.join.kind", "pods"),
        ("pipeline.steps.join.fields", "pods"),
        ("pipeline.steps.join.prefix", "pods"),
        ("pipeline.steps.join.grace", "pods"),
        ("pipeline.steps.join.retention", "pods"),
        ("pipeline.steps.join.format", "pods"),
    ],
)
def test_each_join_member_has_its_change_kind(path: str, kind: str) -> None:
    assert kind_of(path) == kind


def test_changing_a_join_topic_is_an_upgrade_the_state_check_refuses() -> None:
    d = diff(spec([join(), *WINDOW]), spec([join(topic="items"), *WINDOW]), namespace="shop", name="enrich")

    assert d.change is Change.UPGRADE
    assert [(f.path, f.kind) for f in d.fields] == [("pipeline.steps[0].join.topic", "state")]
    assert d.incompatible_fields() == ("pipeline.steps.join (join 1).topic: catalog -> items",)


def test_changing_a_join_prefix_restarts_the_pods_and_keeps_the_state() -> None:
    d = diff(spec([join(), *WINDOW]), spec([join(prefix="c_"), *WINDOW]), namespace="shop", name="enrich")

    assert [(f.path, f.kind) for f in d.fields] == [("pipeline.steps[0].join.prefix", "pods")]
    assert d.state is not None and d.state.kind == "same"
