"""Tests of weir.spec_diff: the table covers every spec field; the diff and the fingerprint follow it."""

from __future__ import annotations

import hashlib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import BaseModel

from weir import spec_diff
from weir.spec import JobSpec, StreamJob
from weir.spec_common import SpecModel
from weir.spec_diff import TABLE, Change, FieldChange, SpecDiff, diff, fingerprint, kind_of
from weir.state_shape import Verdict

FULL = Path(__file__).parent / "golden" / "streamjob-full.yaml"

# --------------------------------------------------------------------------- coverage of the models


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The models an annotation holds: itself, or inside Annotated, unions, tuples, lists, dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is None:
        return
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        args = args[:1]
    elif origin not in (typing.Union, types.UnionType, tuple, list, dict):
        return
    for arg in args:
        yield from _models_in(arg)


def spec_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = (), seen: tuple[type, ...] = ()
) -> Iterator[tuple[str, bool]]:
    """Every field path below ``model`` (camelCase, list items and dict values without a segment),
    with whether it is a leaf: no model below it, or a model already being walked (``Condition``
    nests itself)."""
    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        models = [m for m in dict.fromkeys(_models_in(info.annotation)) if m not in seen]
        yield ".".join(path), not models
        for child in models:
            yield from spec_paths(child, path, (*seen, model, child))


def uncovered_and_stale(model: type[BaseModel]) -> tuple[list[str], list[str]]:
    paths = dict(spec_paths(model))
    entries = set(TABLE)
    uncovered = [
        path
        for path, leaf in paths.items()
        if leaf and not any(path == e or path.startswith(e + ".") for e in entries)
    ]
    stale = sorted(entries - set(paths))
    return uncovered, stale


def test_every_spec_field_is_in_the_table_and_every_entry_names_a_field() -> None:
    uncovered, stale = uncovered_and_stale(JobSpec)
    assert uncovered == [], f"spec fields missing from weir.spec_diff.TABLE: {uncovered}"
    assert stale == [], f"weir.spec_diff.TABLE entries naming no JobSpec field: {stale}"


def test_the_coverage_check_names_a_new_field_nobody_classified() -> None:
    class Canary(SpecModel):
        traffic_weight: int = 0

    class Newer(JobSpec):
        canary: Canary | None = None
        future_flag: bool = False

    uncovered, _ = uncovered_and_stale(Newer)
    assert uncovered == ["canary.trafficWeight", "futureFlag"]


def test_the_coverage_check_walks_steps_conditions_and_aggregate_outputs() -> None:
    paths = dict(spec_paths(JobSpec))
    assert paths["pipeline.steps.window.size"] is True
    assert paths["pipeline.steps.filter.and"] is True  # Condition inside Condition: not walked again
    assert paths["pipeline.steps.aggregate.outputs.fn"] is True
    assert paths["kafka.sasl.usernameSecret.name"] is True
    assert paths["pipeline.steps"] is False


def test_kind_of_takes_the_longest_entry_and_a_parent_takes_the_largest_kind() -> None:
    assert kind_of("checkpoint.cleanupPolicy") == "ignore"
    assert kind_of("checkpoint.interval") == "pods"
    assert kind_of("pipeline.steps.window.size") == "state"
    assert kind_of("pipeline.steps.window") == "state"
    assert kind_of("kafka.consumer") == "pods"
    with pytest.raises(KeyError, match=r"nowhere: not in weir\.spec_diff\.TABLE"):
        kind_of("nowhere")


# --------------------------------------------------------------------------- the diff

KAFKA = {"bootstrapServers": "k:9092"}


def steps(
    *before: dict[str, Any], window: dict[str, Any] | None = None, outputs: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return [
        *before,
        {"window": window or {"type": "tumbling", "size": "1m"}},
        {
            "aggregate": {
                "outputs": outputs or {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "amount"}}
            }
        },
    ]


def job_spec(pipeline_steps: list[dict[str, Any]] | None = None, **fields: Any) -> JobSpec:
    document: dict[str, Any] = {
        "kafka": KAFKA,
        "pipeline": {
            "source": {"topics": ["orders"]},
            "steps": pipeline_steps or steps(),
            "sink": {"topic": "out"},
        },
        **fields,
    }
    return JobSpec.model_validate(document)


def changed(old: JobSpec, new: JobSpec) -> SpecDiff:
    return diff(old, new, namespace="shop", name="orders")


def test_equal_specs_written_differently_make_no_change() -> None:
    old = job_spec(checkpoint={"url": "file:///tmp/ck", "interval": "10s"})
    new = job_spec(checkpoint={"url": "file:///tmp/ck", "interval": 10_000, "retain": 3}, parallelism=1)
    assert changed(old, new) == SpecDiff(Change.IGNORE, Verdict("same"), ())


def test_adding_an_output_is_an_upgrade_that_migrates_state() -> None:
    outputs = {
        "n": {"fn": "count"},
        "total": {"fn": "sum", "field": "amount"},
        "mx": {"fn": "max", "field": "amount"},
    }
    got = changed(job_spec(), job_spec(steps(outputs=outputs)))
    assert got.change == Change.UPGRADE
    assert got.state == Verdict(
        "migrate", ("pipeline.aggregate.mx: added (starts empty in windows open at the upgrade)",)
    )
    assert got.fields == (
        FieldChange("pipeline.steps[1].aggregate.outputs.mx", "state", 'added {"fn":"max","field":"amount"}'),
    )
    assert got.incompatible_fields() == ()


def test_removing_an_output_is_an_upgrade_that_migrates_state() -> None:
    got = changed(job_spec(), job_spec(steps(outputs={"n": {"fn": "count"}})))
    assert got.change == Change.UPGRADE
    assert got.state == Verdict("migrate", ("pipeline.aggregate.total: removed (its state is dropped)",))
    assert [(f.path, f.kind) for f in got.fields] == [("pipeline.steps[1].aggregate.outputs.total", "state")]


@pytest.mark.parametrize(
    ("new_steps", "field_path", "line"),
    [
        (
            steps(window={"type": "tumbling", "size": "5m"}),
            "pipeline.steps[0].window.size",
            "pipeline.window.size: 1m -> 5m",
        ),
        (
            steps(window={"type": "sliding", "size": "1m", "slide": "1m"}),
            "pipeline.steps[0].window.type",
            "pipeline.window.type: tumbling -> sliding",
        ),
        (
            steps(window={"type": "session", "gap": "1m"}),
            "pipeline.steps[0].window.gap",
            "pipeline.window.gap: (none) -> 1m",
        ),
        (
            steps(outputs={"n": {"fn": "count"}, "total": {"fn": "max", "field": "amount"}}),
            "pipeline.steps[1].aggregate.outputs.total.fn",
            "pipeline.aggregate.total.fn: sum -> max",
        ),
    ],
    ids=["window-size", "window-type", "window-gap", "aggregate-fn"],
)
def test_window_and_aggregate_function_changes_are_incompatible_naming_the_field(
    new_steps: list[dict[str, Any]], field_path: str, line: str
) -> None:
    got = changed(job_spec(), job_spec(new_steps))
    assert got.change == Change.UPGRADE
    assert got.state is not None and got.state.kind == "incompatible"
    assert line in got.incompatible_fields()
    assert field_path in [f.path for f in got.fields if f.kind == "state"]


def test_a_sliding_window_slide_change_is_incompatible() -> None:
    old = job_spec(steps(window={"type": "sliding", "size": "1m", "slide": "10s"}))
    new = job_spec(steps(window={"type": "sliding", "size": "1m", "slide": "20s"}))
    got = changed(old, new)
    assert got.incompatible_fields() == ("pipeline.window.slide: 10s -> 20s",)
    assert got.fields == (FieldChange("pipeline.steps[0].window.slide", "state", "10000 -> 20000"),)


def test_a_key_by_field_change_is_incompatible_naming_the_field() -> None:
    got = changed(
        job_spec(steps({"keyBy": {"field": "user"}})), job_spec(steps({"keyBy": {"field": "country"}}))
    )
    assert got.incompatible_fields() == ("pipeline.keyBy: user -> country",)
    assert got.fields == (FieldChange("pipeline.steps[0].keyBy.field", "state", '"user" -> "country"'),)


def test_a_filter_change_before_key_by_restarts_the_pods_and_keeps_the_state() -> None:
    keyed = {"keyBy": {"field": "user"}}
    old = job_spec(steps({"filter": {"field": "amount", "op": "gt", "value": 10}}, keyed))
    new = job_spec(steps({"filter": {"field": "amount", "op": "gt", "value": 20}}, keyed))
    got = changed(old, new)
    assert got == SpecDiff(
        Change.UPGRADE, Verdict("same"), (FieldChange("pipeline.steps[0].filter.value", "pods", "10 -> 20"),)
    )


def test_a_filter_comparing_with_true_instead_of_1_is_a_change_as_the_fingerprint_sees_it() -> None:
    old = job_spec(steps({"filter": {"field": "flag", "op": "eq", "value": 1}}))
    new = job_spec(steps({"filter": {"field": "flag", "op": "eq", "value": True}}))
    assert changed(old, new).fields == (FieldChange("pipeline.steps[0].filter.value", "pods", "1 -> true"),)
    assert fingerprint(old) != fingerprint(new)


def test_a_step_added_before_a_message_key_key_by_restarts_the_pods_and_keeps_the_state() -> None:
    keyed = {"keyBy": {"messageKey": True}}
    new = job_spec(steps({"select": ["amount", "user"]}, keyed))
    got = changed(job_spec(steps(keyed)), new)
    assert got == SpecDiff(
        Change.UPGRADE,
        Verdict("same"),
        (FieldChange("pipeline.steps[0]", "pods", 'added {"select":["amount","user"]}'),),
    )


def test_a_step_added_before_a_key_by_field_moves_the_repartition_topic_and_is_incompatible() -> None:
    # The repartition topic is named by the keyBy step's index and stage 2 keeps its state per
    # partition of that topic: restoring into the moved topic would silently start empty.
    keyed = {"keyBy": {"field": "user"}}
    got = changed(
        job_spec(steps(keyed)), job_spec(steps({"filter": {"field": "user", "op": "exists"}}, keyed))
    )
    assert [(f.path, f.kind) for f in got.fields] == [("pipeline.steps[0]", "pods")]
    assert got.incompatible_fields() == (
        "pipeline.keyBy: repartition topic weir-shop-orders-0-repartition -> weir-shop-orders-1-repartition "
        "(the job was renamed, or a step was added or removed before the shuffle; stage-2 state lives under "
        "the topic)",
    )


def test_a_sink_topic_change_restarts_the_pods() -> None:
    old = job_spec()
    new = JobSpec.model_validate(
        {
            **old.model_dump(mode="json", by_alias=True, exclude_unset=True),
            "pipeline": {**old.model_dump(mode="json", by_alias=True)["pipeline"], "sink": {"topic": "out2"}},
        }
    )
    assert changed(old, new) == SpecDiff(
        Change.UPGRADE, Verdict("same"), (FieldChange("pipeline.sink.topic", "pods", '"out" -> "out2"'),)
    )


def test_an_image_change_of_an_entrypoint_job_restarts_the_pods_and_its_state_is_unknown() -> None:
    old = JobSpec.model_validate({"kafka": KAFKA, "entrypoint": "shop.jobs:orders", "image": "shop:1"})
    new = JobSpec.model_validate({"kafka": KAFKA, "entrypoint": "shop.jobs:orders", "image": "shop:2"})
    assert changed(old, new) == SpecDiff(
        Change.UPGRADE, None, (FieldChange("image", "pods", '"shop:1" -> "shop:2"'),)
    )
    assert changed(old, new).incompatible_fields() == ()


def test_a_declarative_job_turned_entrypoint_has_an_unknown_state() -> None:
    new = JobSpec.model_validate({"kafka": KAFKA, "entrypoint": "shop.jobs:orders"})
    got = changed(job_spec(), new)
    assert got.state is None
    assert [(f.path, f.kind) for f in got.fields] == [("pipeline", "state"), ("entrypoint", "pods")]
    assert got.change == Change.UPGRADE


def test_a_parallelism_change_is_a_scale() -> None:
    assert changed(job_spec(), job_spec(parallelism=4)) == SpecDiff(
        Change.SCALE, Verdict("same"), (FieldChange("parallelism", "scale", "1 -> 4"),)
    )


def test_a_restart_nonce_change_is_a_redeploy_and_wins_over_everything_else() -> None:
    assert changed(job_spec(), job_spec(restartNonce=1)).change == Change.REDEPLOY
    assert (
        changed(job_spec(), job_spec(restartNonce=1, image="weir:2", parallelism=4)).change == Change.REDEPLOY
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"upgradeMode": "stateless"},
        {"state": "suspended"},
        {"savepointTriggerNonce": 7},
        {"autoscaler": {"enabled": True, "maxParallelism": 4}},
        {"checkpoint": {"url": "file:///ck", "cleanupPolicy": "delete"}},
    ],
)
def test_operator_policy_changes_are_ignored(fields: dict[str, Any]) -> None:
    base = {"checkpoint": {"url": "file:///ck"}} if "checkpoint" in fields else {}
    got = changed(job_spec(**base), job_spec(**fields))
    assert got.change == Change.IGNORE
    assert got.fields and all(f.kind == "ignore" for f in got.fields)


def test_pods_changes_name_the_field_as_written() -> None:
    old = job_spec(kafka={**KAFKA, "consumer": {"fetch.min.bytes": 1}}, checkpoint={"url": "file:///ck"})
    new = job_spec(
        kafka={**KAFKA, "consumer": {"fetch.min.bytes": 2}},
        checkpoint={"url": "file:///ck", "interval": "5s"},
    )
    got = changed(old, new)
    assert got.fields == (
        FieldChange("kafka.consumer['fetch.min.bytes']", "pods", "1 -> 2"),
        FieldChange("checkpoint.interval", "pods", "10000 -> 5000"),
    )
    assert got.change == Change.UPGRADE


def test_an_env_value_never_appears_in_a_change() -> None:
    old = job_spec(env=[{"name": "TOKEN", "value": "s3cr3t-old"}])
    new = job_spec(env=[{"name": "TOKEN", "value": "s3cr3t-new"}, {"name": "MORE", "value": "s3cr3t-more"}])
    got = changed(old, new)
    assert got.fields == (
        FieldChange("env[0].value", "pods", "(hidden) -> (hidden)"),
        FieldChange("env[1]", "pods", 'added {"name":"MORE","value":"(hidden)"}'),
    )
    assert "s3cr3t" not in repr(got)


def test_a_long_detail_is_cut_to_120_characters() -> None:
    new = job_spec(steps({"select": ["amount", *(f"field_number_{i}" for i in range(40))]}))
    (field,) = changed(job_spec(), new).fields
    assert len(field.detail) == 120
    assert field.detail.endswith("...")


# --------------------------------------------------------------------------- the fingerprint


def full() -> JobSpec:
    return StreamJob.model_validate(yaml.safe_load(FULL.read_text())).spec


def _fingerprint_before_the_table(job: JobSpec) -> str:
    """render.fingerprint as it was before the table: the spec's JSON without these members (and
    without the fields JobSpec gained since, which that version did not have)."""
    before_the_table = {
        "image",
        "image_pull_policy",
        "resources",
        "env",
        "pod_template",
        "kafka",
        "pipeline",
        "entrypoint",
        "checkpoint",
        "delivery_guarantee",
        "restart_nonce",
    }
    excluded: dict[str, Any] = {
        "parallelism": True,
        "state": True,
        "upgrade_mode": True,
        "savepoint_trigger_nonce": True,
        "autoscaler": True,
        "checkpoint": {"cleanup_policy"},
    }
    relevant = job.model_dump(mode="json", by_alias=True, include=before_the_table, exclude=excluded)
    return hashlib.sha256(orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


@pytest.mark.parametrize(
    "make",
    [full, job_spec, lambda: job_spec(checkpoint={"url": "file:///ck"})],
    ids=["full", "pipeline", "pipeline-checkpoint"],
)
def test_the_fingerprint_is_the_digest_it_was_before_the_table(make: Any) -> None:
    assert fingerprint(make()) == _fingerprint_before_the_table(make())


def test_the_fingerprint_covers_exactly_the_pods_state_and_redeploy_fields() -> None:
    base = job_spec(checkpoint={"url": "file:///ck"})
    for fields in (
        {"parallelism": 2},
        {"upgradeMode": "last-state"},
        {"autoscaler": {"enabled": True}},
        {"checkpoint": {"url": "file:///ck", "cleanupPolicy": "delete"}},
    ):
        assert (
            changed(base, job_spec(**{"checkpoint": {"url": "file:///ck"}, **fields})).change <= Change.SCALE
        )
        assert fingerprint(job_spec(**{"checkpoint": {"url": "file:///ck"}, **fields})) == fingerprint(base)
    for fields in (
        {"restartNonce": 1},
        {"image": "weir:2"},
        {"checkpoint": {"url": "file:///ck", "retain": 9}},
    ):
        assert (
            changed(base, job_spec(**{"checkpoint": {"url": "file:///ck"}, **fields})).change
            >= Change.UPGRADE
        )
        assert fingerprint(job_spec(**{"checkpoint": {"url": "file:///ck"}, **fields})) != fingerprint(base)
    assert fingerprint(job_spec(steps(window={"type": "tumbling", "size": "5m"}))) != fingerprint(job_spec())


def test_the_fingerprint_follows_the_table() -> None:
    spec = job_spec(checkpoint={"url": "file:///ck"})
    other = job_spec(checkpoint={"url": "file:///ck"}, deliveryGuarantee="at-least-once")
    assert fingerprint(spec) != fingerprint(other)
    table = {**TABLE, "deliveryGuarantee": "ignore"}
    entries = {tuple(path.split(".")): kind for path, kind in table.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spec_diff, "_ENTRIES", entries)
        assert fingerprint(spec) == fingerprint(other)


def variants() -> list[JobSpec]:
    ck = {"url": "file:///ck"}
    keyed = {"keyBy": {"field": "user"}}
    return [
        job_spec(),
        job_spec(parallelism=3),
        job_spec(restartNonce=1),
        job_spec(upgradeMode="stateless", savepointTriggerNonce=2),
        job_spec(checkpoint=ck),
        job_spec(checkpoint={**ck, "cleanupPolicy": "delete"}),
        job_spec(checkpoint={**ck, "interval": "1s"}),
        job_spec(checkpoint=ck, autoscaler={"enabled": True}, parallelism=2),
        job_spec(image="weir:2"),
        job_spec(env=[{"name": "A", "value": "1"}]),
        job_spec(steps(keyed)),
        job_spec(steps({"filter": {"field": "user", "op": "exists"}}, keyed)),
        job_spec(steps(window={"type": "tumbling", "size": "5m"})),
        job_spec(steps(window={"type": "tumbling", "size": "1m", "allowedLateness": "5s"})),
        job_spec(steps(outputs={"n": {"fn": "count"}})),
        JobSpec.model_validate({"kafka": KAFKA, "entrypoint": "shop.jobs:orders"}),
    ]


def test_two_specs_share_a_fingerprint_exactly_when_their_diff_is_at_most_a_scale() -> None:
    specs = variants()
    for old in specs:
        for new in specs:
            got = changed(old, new)
            assert (fingerprint(old) == fingerprint(new)) == (got.change <= Change.SCALE), (old, new, got)
