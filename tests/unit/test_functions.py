"""Function references, the one-line causes of user failures, and state encoding version 1."""

from __future__ import annotations

import pytest

from weir.functions import (
    FunctionError,
    FunctionFailed,
    FunctionNotFound,
    StateEncodingError,
    cause,
    decode_state,
    encode_state,
    encode_state_list,
    load_function,
)


def test_a_reference_resolves_to_the_named_callable() -> None:
    import json

    assert load_function("json:dumps") is json.dumps
    assert load_function("json:JSONDecoder.decode") is json.JSONDecoder.decode


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("json.dumps", "not of the form"),
        ("json:", "not of the form"),
        ("json:no_such_thing", "has no attribute 'no_such_thing'"),
        ("no_such_module_weir:f", "cannot import module 'no_such_module_weir'"),
        ("json:__doc__", "not a function or class"),
    ],
)
def test_a_reference_that_does_not_resolve_says_why(ref: str, says: str) -> None:
    with pytest.raises(FunctionNotFound, match=says):
        load_function(ref)


def test_a_function_error_is_a_dead_letter_with_a_one_line_cause() -> None:
    err = FunctionError("m:f", ValueError("bad\nvalue " + "x" * 500))
    assert err.reason == "function_error"
    assert "\n" not in err.detail
    assert err.detail.startswith("m:f: ValueError: bad value")
    assert len(err.detail) < 320
    assert "onError: fail" in str(FunctionFailed("m:f", KeyError("k")))
    assert cause(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize(
    "value", [None, 0, -(2**63), 2**63 - 1, 1.5, "é", [1, [2]], {"a": {"b": [None, True]}}]
)
def test_state_values_round_trip_through_version_1(value: object) -> None:
    data = encode_state(value)
    assert data[:1] == b"\x01"
    assert decode_state(data) == value


def test_a_list_of_encoded_values_encodes_as_the_list_of_the_values() -> None:
    """Custom aggregates keep their accumulators encoded and store the list of them: the bytes
    must be those of the list itself (what a checkpoint written before holds)."""
    values = [None, 0, -(2**63), 1.5, "é\n\"", [1, [2]], {"a": {"b": [None, True]}}, [], {}]
    for k in range(len(values) + 1):
        part = values[:k]
        assert encode_state_list([encode_state(v) for v in part]) == encode_state(part)


@pytest.mark.parametrize(
    "value", [float("nan"), [1, float("inf")], {"a": -float("inf")}, 2**64, object(), {1: 2}]
)
def test_values_version_1_cannot_store_are_refused_not_altered(value: object) -> None:
    with pytest.raises(StateEncodingError):
        encode_state(value)


def test_an_unknown_encoding_version_is_refused_with_the_version() -> None:
    with pytest.raises(StateEncodingError, match="version 9"):
        decode_state(b"\x09{}")
