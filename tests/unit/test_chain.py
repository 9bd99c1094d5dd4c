"""compile_prepare_many: user functions and declarative steps per record, and how they fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from weir import spec
from weir.chain import compile_prepare_many, resolve_functions
from weir.functions import FunctionError, FunctionFailed
from weir.records import DeadLetter, compile_prepare
from weir.spec import Pipeline, SpecError, load_job

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
T0 = 1_704_067_200_000


def build(*steps: dict[str, Any], source: dict[str, Any] | None = None, skew: str = "1d") -> Pipeline:
    return Pipeline.model_validate(
        {
            "source": source or {"topics": ["events"], "eventTime": {"field": "ts"}},
            "watermark": {"maxFutureSkew": skew},
            "steps": list(steps),
            "sink": {"topic": "out"},
        }
    )


def value(**fields: Any) -> bytes:
    return orjson.dumps(fields)


SUM_TOTAL = [
    {"window": {"type": "tumbling", "size": "1m"}},
    {"aggregate": {"outputs": {"total": {"fn": "sum", "field": "total"}}}},
]


def test_a_map_result_feeds_the_key_and_the_aggregate_fields_and_keeps_the_source_event_time() -> None:
    prepare = compile_prepare_many(
        build({"map": {"function": "user_functions:add_total"}}, {"keyBy": {"field": "user"}}, *SUM_TOTAL)
    )

    got = prepare(value(user="u1", price=2.5, qty=4, ts=T0 + 5), None, 0)

    assert got == [("u1", T0 + 5, {"user": "u1", "price": 2.5, "qty": 4, "ts": T0 + 5, "total": 10.0})]


def test_a_flat_map_gives_one_prepared_record_per_output_in_order_and_none_for_an_empty_result() -> None:
    prepare = compile_prepare_many(
        build({"flatMap": {"function": "user_functions:explode"}}, {"keyBy": {"field": "item"}})
    )

    many = prepare(value(user="u", items=["a", "b"], ts=T0), b"k", 0)
    none = prepare(value(user="u", items=[], ts="not a time"), b"k", 0)

    assert many == [("a", T0, {"user": "u", "item": "a"}), ("b", T0, {"user": "u", "item": "b"})]
    assert none == []


def test_a_function_filter_keeps_records_its_function_finds_truthy() -> None:
    prepare = compile_prepare_many(build({"filter": {"function": "user_functions:is_big"}}))

    assert prepare(value(price=12, ts=T0), b"k", 0) == [("k", T0, {"price": 12, "ts": T0})]
    assert prepare(value(price=3, ts=T0), b"k", 0) == []


def test_a_record_the_steps_drop_is_never_dead_lettered_for_its_timestamp() -> None:
    prepare = compile_prepare_many(build({"filter": {"function": "user_functions:is_big"}}))

    assert prepare(value(price=3, ts="yesterday"), b"k", 0) == []
    with pytest.raises(DeadLetter) as caught:
        prepare(value(price=30, ts="yesterday"), b"k", 0)
    assert caught.value.reason == "wrong_type"


def test_a_function_that_raises_dead_letters_the_record_with_function_error_and_the_cause() -> None:
    prepare = compile_prepare_many(build({"map": {"function": "user_functions:add_total"}}))

    with pytest.raises(FunctionError) as caught:
        prepare(value(price=1, ts=T0), b"k", 0)

    assert caught.value.reason == "function_error"
    assert caught.value.detail == "user_functions:add_total: KeyError: 'qty'"


def test_on_error_fail_stops_with_the_cause_instead() -> None:
    prepare = compile_prepare_many(
        build({"map": {"function": "user_functions:add_total", "onError": "fail"}})
    )

    with pytest.raises(
        FunctionFailed, match=r"user_functions:add_total raised on a record .*KeyError: 'qty'"
    ):
        prepare(value(price=1, ts=T0), b"k", 0)


def test_on_error_fail_applies_to_function_filters_too() -> None:
    prepare = compile_prepare_many(
        build({"filter": {"function": "user_functions:is_big", "onError": "fail"}})
    )

    with pytest.raises(FunctionFailed):
        prepare(value(ts=T0), b"k", 0)


@pytest.mark.parametrize(
    ("step", "detail"),
    [
        (
            {"map": {"function": "user_functions:returns_list"}},
            "TypeError: a map must return a dict, not list",
        ),
        (
            {"flatMap": {"function": "user_functions:returns_int"}},
            "TypeError: a flatMap must return an iterable of dicts, not int",
        ),
        (
            {"flatMap": {"function": "user_functions:add_total"}},
            "TypeError: a flatMap must return an iterable of dicts, not dict",
        ),
        (
            {"flatMap": {"function": "user_functions:yields_string"}},
            "TypeError: a flatMap must yield dicts, not str",
        ),
    ],
)
def test_a_function_breaking_its_return_contract_is_a_function_error_saying_so(
    step: dict[str, Any], detail: str
) -> None:
    prepare = compile_prepare_many(build(step))

    with pytest.raises(FunctionError) as caught:
        prepare(value(price=1, qty=2, ts=T0), b"k", 0)

    assert caught.value.detail.endswith(detail)


def test_a_field_a_map_did_not_produce_is_missing_per_record() -> None:
    prepare = compile_prepare_many(
        build({"map": {"function": "user_functions:rekey"}}, {"keyBy": {"field": "user"}}, *SUM_TOTAL)
    )

    with pytest.raises(DeadLetter) as caught:
        prepare(value(u="x", ts=T0), None, 0)
    assert (caught.value.reason, caught.value.detail) == (
        "missing_field",
        "aggregate field 'total' is missing",
    )

    keyless = compile_prepare_many(
        build({"map": {"function": "user_functions:rekey"}}, {"keyBy": {"field": "nope"}})
    )
    with pytest.raises(DeadLetter) as caught:
        keyless(value(u="x", ts=T0), None, 0)
    assert (caught.value.reason, caught.value.detail) == ("missing_field", "key field 'nope' is missing")


def test_an_aggregate_field_beyond_64_bits_after_a_map_is_an_overflow() -> None:
    prepare = compile_prepare_many(build({"map": {"function": "user_functions:add_total"}}, *SUM_TOTAL))

    with pytest.raises(DeadLetter) as caught:
        prepare(value(price=2**62, qty=4, ts=T0), b"k", 0)
    assert caught.value.reason == "overflow"


def test_the_message_key_and_the_source_key_field_key_every_output() -> None:
    by_source = compile_prepare_many(
        build(
            {"flatMap": {"function": "user_functions:explode"}},
            source={"topics": ["t"], "key": {"field": "user"}},
        )
    )

    assert [k for k, _, _ in by_source(value(user=7, items=["a", "b"]), None, T0)] == ["7", "7"]
    with pytest.raises(DeadLetter) as caught:
        compile_prepare_many(build({"map": {"function": "user_functions:rekey"}}))(
            value(u="x", ts=T0), None, 0
        )
    assert caught.value.reason == "bad_key"


def test_an_event_time_too_far_ahead_of_the_clock_is_a_bad_timestamp() -> None:
    prepare = compile_prepare_many(
        build({"map": {"function": "user_functions:rekey"}}, skew="1m"), lambda: T0
    )

    assert prepare(value(u="x", ts=T0 + 60_000), b"k", 0)[0][1] == T0 + 60_000
    with pytest.raises(DeadLetter) as caught:
        prepare(value(u="x", ts=T0 + 60_001), b"k", 0)
    assert caught.value.reason == "bad_timestamp"


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("nope_module_xyz:f", "cannot import module 'nope_module_xyz': ModuleNotFoundError"),
        ("user_functions:absent", "module 'user_functions' has no attribute 'absent'"),
        ("user_functions:NOT_CALLABLE", "user_functions:NOT_CALLABLE is a int, not a function or class"),
    ],
)
def test_a_reference_that_does_not_resolve_is_a_spec_error_naming_its_field_path(ref: str, why: str) -> None:
    pipeline = build(
        {"select": ["u", "ts"]}, {"filter": {"field": "u", "op": "exists"}}, {"map": {"function": ref}}
    )

    with pytest.raises(SpecError) as caught:
        compile_prepare_many(pipeline)

    assert str(caught.value).startswith(f"spec.pipeline.steps[2].map.function: {why}")


def test_resolve_functions_names_every_unresolved_reference_including_process_and_aggregates() -> None:
    pipeline = build(
        {"map": {"function": "user_functions:rekey"}},
        {"filter": {"function": "user_functions:gone"}},
        {"window": {"type": "tumbling", "size": "1m"}},
        {"aggregate": {"outputs": {"m": {"fn": "custom", "function": "user_functions:Nope", "field": "n"}}}},
    )

    with pytest.raises(SpecError) as caught:
        resolve_functions(pipeline)

    assert caught.value.lines == (
        "spec.pipeline.steps[1].filter.function: module 'user_functions' has no attribute 'gone'",
        "spec.pipeline.steps[3].aggregate.outputs.m.function: "
        "module 'user_functions' has no attribute 'Nope'",
    )
    process = build({"process": {"function": "user_functions:Dedup"}})
    assert list(resolve_functions(process)) == ["spec.pipeline.steps[0].process.function"]


def test_declarative_steps_in_the_chain_give_what_the_generated_prepare_gives() -> None:
    pipeline = load_job(EXAMPLE).pipeline
    generated = compile_prepare(pipeline, lambda: T0)
    chained = compile_prepare_many(pipeline, lambda: T0)
    samples = [
        value(type="purchase", product_id="p1", price=3.5, ts=T0 + 1, user_id="u"),
        value(type="purchase", product_id="p1", price=3.5, ts=T0 + 1, user_id="bot"),
        value(type="view", product_id="p1", ts="not checked: filtered out"),
        value(type="purchase", product_id=17, price=1, ts=T0 + 2.5, extra=True),
    ]

    for sample in samples:
        expected = generated(sample, b"k", T0)
        assert chained(sample, b"k", T0) == ([] if expected is None else [expected])
    bad_records = [
        b"[1]",
        b"{",
        value(type="purchase", product_id="p", price=2, ts="2024-01-01T00:00:01Z"),
        value(type="purchase", product_id=[1], price=2, ts=T0),
        value(type="purchase", price=2, ts=T0),
    ]
    for bad in bad_records:
        with pytest.raises(DeadLetter) as want:
            generated(bad, b"k", T0)
        with pytest.raises(DeadLetter) as got:
            chained(bad, b"k", T0)
        assert (got.value.reason, got.value.detail) == (want.value.reason, want.value.detail)


def test_rename_and_select_in_the_chain_act_on_the_current_record() -> None:
    prepare = compile_prepare_many(
        build(
            {"map": {"function": "user_functions:rekey"}},
            {"rename": {"user": "who", "n": "user"}},
            {"select": ["who", "user", "absent"]},
        )
    )

    assert prepare(value(u="x", n=2, ts=T0), b"k", 0) == [("k", T0, {"who": "x", "user": 2})]


def test_compile_prepare_refuses_a_pipeline_with_function_steps() -> None:
    with pytest.raises(ValueError, match="compile_prepare_many"):
        compile_prepare(build({"map": {"function": "user_functions:rekey"}}))


def test_weir_run_exits_2_naming_the_field_of_a_reference_that_does_not_import_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from weir import cli

    document = EXAMPLE.read_text().replace(
        "      - select: [product_id, price]",
        '      - map: {function: "no_such_module_xyz:f"}\n      - select: [product_id, price]',
    )
    assert "no_such_module_xyz" in document
    job = tmp_path / "job.yaml"
    job.write_text(document)

    code = cli.main(["run", str(job), "--state-dir", str(tmp_path), "--bootstrap-servers", "127.0.0.1:1"])

    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_SPEC == 2
    assert "spec.pipeline.steps[2].map.function: cannot import module 'no_such_module_xyz'" in err
