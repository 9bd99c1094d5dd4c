"""Generated aggregates against the brute-force reference: add, merge, result and serialisation."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weir.aggregates import Aggregator, AggSpec, Overflow, compile_aggregates
from weir.testing import reference_aggregate

SETTINGS = settings(deadline=None, max_examples=100)

ALL_SPECS: list[AggSpec] = [
    ("n", "count", None),
    ("total", "sum", "x"),
    ("lo", "min", "x"),
    ("hi", "max", "x"),
    ("mean", "avg", "x"),
    ("distinct", "count_distinct", "v"),
    ("first_v", "first", "v"),
    ("last_v", "last", "v"),
    ("first_x", "first", "x"),
    ("users", "count_distinct", "x"),
]

# Ints and multiples of 1/4 of moderate size: every sum is exact in any association order, so
# merge results can be compared exactly. Integral floats (2.0) are included on purpose: with
# arrival-ordered merges they must still pick the same representation as the reference.
numbers = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=-(10**6), max_value=10**6).map(lambda i: i / 4),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=6,
)
records = st.lists(
    st.tuples(
        st.integers(min_value=-20, max_value=20),  # few distinct times, so first/last ties happen
        st.fixed_dictionaries({}, optional={"x": numbers | st.none(), "v": json_values}),
    ),
    max_size=30,
)


def typed(values: dict[str, Any]) -> str:
    """A comparison form that tells 1, 1.0 and True apart (== does not)."""
    return json.dumps(values, sort_keys=True)


def fold(agg: Aggregator, recs: list[tuple[int, dict[str, Any]]]) -> list[Any]:
    acc = agg.create()
    for ts, rec in recs:
        agg.add(acc, rec, ts)
    return acc


@SETTINGS
@given(records)
def test_every_aggregate_matches_the_reference(recs: list[tuple[int, dict[str, Any]]]) -> None:
    agg = compile_aggregates(ALL_SPECS)
    assert typed(agg.result(fold(agg, recs))) == typed(reference_aggregate(ALL_SPECS, recs))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s[1] + "-" + (s[2] or "") for s in ALL_SPECS])
@SETTINGS
@given(recs=records)
def test_each_aggregate_alone_matches_the_reference(
    spec: AggSpec, recs: list[tuple[int, dict[str, Any]]]
) -> None:
    agg = compile_aggregates([spec])
    assert typed(agg.result(fold(agg, recs))) == typed(reference_aggregate([spec], recs))


@SETTINGS
@given(records, st.data())
def test_merging_consecutive_chunks_equals_adding_everything(
    recs: list[tuple[int, dict[str, Any]]], data: st.DataObject
) -> None:
    agg = compile_aggregates(ALL_SPECS)
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(recs)), max_size=4)))
    bounds = [0, *cuts, len(recs)]
    chunks = [fold(agg, recs[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = agg.merge(merged, chunk)
    assert typed(agg.result(merged)) == typed(reference_aggregate(ALL_SPECS, recs))


@SETTINGS
@given(records, records, records)
def test_merge_is_associative_and_leaves_its_inputs_alone(
    ra: list[tuple[int, dict[str, Any]]],
    rb: list[tuple[int, dict[str, Any]]],
    rc: list[tuple[int, dict[str, Any]]],
) -> None:
    agg = compile_aggregates(ALL_SPECS)
    a, b, c = fold(agg, ra), fold(agg, rb), fold(agg, rc)
    snapshot = [agg.dumps(x) for x in (a, b, c)]
    left = agg.merge(agg.merge(a, b), c)
    right = agg.merge(a, agg.merge(b, c))
    assert agg.dumps(left) == agg.dumps(right)
    assert [agg.dumps(x) for x in (a, b, c)] == snapshot
    assert typed(agg.result(left)) == typed(reference_aggregate(ALL_SPECS, ra + rb + rc))


@SETTINGS
@given(records)
def test_accumulators_survive_a_dumps_loads_round_trip(recs: list[tuple[int, dict[str, Any]]]) -> None:
    agg = compile_aggregates(ALL_SPECS)
    acc = fold(agg, recs)
    data = agg.dumps(acc)
    again = agg.loads(data)
    assert agg.dumps(again) == data
    assert typed(agg.result(again)) == typed(agg.result(acc))
    # A restored accumulator keeps accumulating like the original.
    agg.add(acc, {"x": 1, "v": "late"}, 99)
    agg.add(again, {"x": 1, "v": "late"}, 99)
    assert agg.dumps(again) == agg.dumps(acc)


@SETTINGS
@given(st.lists(json_values, max_size=12), st.randoms(use_true_random=False))
def test_serialised_distinct_sets_do_not_depend_on_insertion_order(values: list[Any], rnd: Any) -> None:
    agg = compile_aggregates([("d", "count_distinct", "v")])
    shuffled = list(values)
    rnd.shuffle(shuffled)
    one = fold(agg, [(0, {"v": v}) for v in values])
    two = fold(agg, [(0, {"v": v}) for v in shuffled])
    assert agg.dumps(one) == agg.dumps(two)


def test_count_distinct_tells_json_types_apart_and_ignores_dict_key_order() -> None:
    agg = compile_aggregates([("d", "count_distinct", "v")])
    values = [1, 1.0, True, "1", {"a": 1, "b": 2}, {"b": 2, "a": 1}, [1], None]
    acc = fold(agg, [(0, {"v": v}) for v in values])
    assert agg.result(acc) == {"d": 6}  # 1, 1.0, true, "1", the dict, [1]; null is ignored


def test_sums_are_ints_until_a_float_arrives_and_empty_aggregates_are_null() -> None:
    agg = compile_aggregates(
        [("s", "sum", "x"), ("a", "avg", "x"), ("lo", "min", "x"), ("f", "first", "x"), ("n", "count", None)]
    )
    acc = fold(agg, [(0, {}), (1, {"x": None})])
    assert agg.result(acc) == {"s": 0, "a": None, "lo": None, "f": None, "n": 2}
    agg.add(acc, {"x": 2}, 5)
    agg.add(acc, {"x": 3}, 4)
    assert typed(agg.result(acc)) == typed({"s": 5, "a": 2.5, "lo": 2, "f": 3, "n": 4})
    agg.add(acc, {"x": 0.5}, 6)
    assert typed(agg.result(acc)) == typed({"s": 5.5, "a": 5.5 / 3, "lo": 0.5, "f": 3, "n": 5})


def test_first_and_last_break_event_time_ties_by_arrival() -> None:
    agg = compile_aggregates([("f", "first", "v"), ("l", "last", "v")])
    acc = fold(agg, [(7, {"v": "a"}), (7, {"v": "b"}), (9, {"v": "c"}), (9, {"v": "d"}), (8, {"v": "e"})])
    assert agg.result(acc) == {"f": "a", "l": "d"}
    early, late = fold(agg, [(7, {"v": "a"})]), fold(agg, [(7, {"v": "b"})])
    assert agg.result(agg.merge(early, late)) == {"f": "a", "l": "b"}


def test_int_sums_beyond_64_bits_in_older_state_round_trip_exactly() -> None:
    # Such a sum can no longer arise (Overflow), but state written by an older weir may hold one.
    agg = compile_aggregates([("s", "sum", "x"), ("d", "count_distinct", "v")])
    acc = fold(agg, [(0, {"v": {"k": 1}}), (0, {"v": "z"})])
    acc[0] = 2**64 - 2
    again = agg.loads(agg.dumps(acc))
    assert agg.result(again) == {"s": 2**64 - 2, "d": 2}
    assert agg.dumps(again) == agg.dumps(acc)


OVERFLOW_SPECS: list[AggSpec] = [
    ("n", "count", None),
    ("total", "sum", "x"),
    ("mean", "avg", "x"),
    ("hi", "max", "x"),
    ("last_x", "last", "x"),
    ("users", "count_distinct", "x"),
]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([2**63 - 1, 1], "'total' of field 'x' would be 9223372036854775808, beyond signed 64-bit"),
        ([-(2**63), -1], "would be -9223372036854775809, beyond signed 64-bit"),
        ([1.7e308, 1.7e308], "'total' of field 'x' would overflow a 64-bit float"),
        ([-1.7e308, -1.0e308], "would overflow a 64-bit float"),
    ],
)
def test_a_record_that_would_overflow_a_sum_raises_overflow_and_changes_nothing(
    values: list[float], message: str
) -> None:
    agg = compile_aggregates(OVERFLOW_SPECS)
    acc = fold(agg, [(0, {"x": values[0]})])
    before = agg.dumps(acc)
    assert agg.check is not None
    with pytest.raises(Overflow, match=message) as raised:
        agg.check([None, acc], {"x": values[1]})
    assert raised.value.reason == "overflow"
    with pytest.raises(Overflow, match=message):
        agg.add(acc, {"x": values[1]}, 1)
    assert agg.dumps(acc) == before, "neither the sum nor any other aggregate took the record"
    assert agg.unrepresentable(agg.result(acc)) is None


def test_the_largest_representable_sums_are_kept_exactly() -> None:
    agg = compile_aggregates(OVERFLOW_SPECS)
    edge = fold(agg, [(0, {"x": 2**62}), (1, {"x": 2**62 - 1})])
    assert agg.result(edge)["total"] == 2**63 - 1
    low = fold(agg, [(0, {"x": -(2**62)}), (1, {"x": -(2**62)})])
    assert agg.result(low)["total"] == -(2**63)
    floats = fold(agg, [(0, {"x": 1e308}), (1, {"x": 7.9e307})])
    assert agg.result(floats)["total"] == 1e308 + 7.9e307


def test_merging_into_an_unrepresentable_sum_raises_overflow_and_leaves_the_inputs_alone() -> None:
    agg = compile_aggregates(OVERFLOW_SPECS)
    a, b = fold(agg, [(0, {"x": 2**62})]), fold(agg, [(1, {"x": 2**62})])
    with pytest.raises(Overflow, match="'total'"):
        agg.merge(a, b)
    assert agg.result(a)["total"] == agg.result(b)["total"] == 2**62


def test_a_sum_stored_as_null_by_an_older_weir_loads_as_nan_and_is_reported_not_crashed() -> None:
    agg = compile_aggregates(OVERFLOW_SPECS)
    acc = fold(agg, [(0, {"x": 1.5})])
    acc[1] = math.inf  # what an older weir accumulated, and wrote as null
    restored = agg.loads(agg.dumps(acc))
    assert math.isnan(restored[1])
    with pytest.raises(Overflow, match="not a number"):
        agg.add(restored, {"x": 1.0}, 1)
    assert agg.unrepresentable(agg.result(restored)) == "total"


def test_aggregates_without_a_sum_or_avg_need_no_check() -> None:
    assert compile_aggregates([("n", "count", None), ("hi", "max", "x")]).check is None


def test_loading_state_written_for_other_aggregates_fails_loudly() -> None:
    two = compile_aggregates([("n", "count", None), ("s", "sum", "x")])
    one = compile_aggregates([("n", "count", None)])
    with pytest.raises(ValueError, match="different aggregate list"):
        one.loads(two.dumps(two.create()))


def test_field_and_output_names_are_data_not_code() -> None:
    field = 'it\'s "quoted"\n\\ and {braced}'
    agg = compile_aggregates([("out'}\n", "sum", field), ('n"', "count", None)])
    acc = fold(agg, [(0, {field: 2}), (0, {field: 3}), (0, {"other": 1})])
    assert agg.result(acc) == {"out'}\n": 5, 'n"': 3}
    assert agg.fields == (field,)


def test_fields_lists_what_the_aggregates_read_and_which_must_be_numeric() -> None:
    agg = compile_aggregates(ALL_SPECS)
    assert agg.fields == ("x", "v")
    assert agg.numeric_fields == ("x",)
    assert compile_aggregates([("n", "count", None)]).fields == ()


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([("n", "count", "x")], "count takes no field"),
        ([("s", "sum", None)], "needs a field"),
        ([("s", "median", "x")], "unknown aggregate function"),
        ([("s", "sum", "x"), ("s", "max", "x")], "duplicate aggregate output name"),
        ([("", "sum", "x")], "non-empty string"),
    ],
)
def test_invalid_specs_are_rejected(specs: list[AggSpec], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_aggregates(specs)
