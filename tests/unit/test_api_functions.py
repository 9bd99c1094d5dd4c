"""The Python API's function steps: map, flat_map, function filters, process and custom aggregates."""

from __future__ import annotations

import functools
from typing import Any

import pytest

import user_functions
from user_functions import Dedup, ItemsSeen, Median, add_total, explode, is_big
from weir.api import col, function_ref, pipeline
from weir.spec import SpecError


def test_functions_are_stored_as_module_colon_qualname_references() -> None:
    built = (
        pipeline.source("orders", event_time="ts")
        .map(add_total)
        .flat_map(explode, on_error="fail")
        .filter(is_big)
        .filter(col("user").exists())
        .key_by("user")
        .window_tumbling("1m")
        .aggregate(total=("sum", "total"), median=(Median, "total"), items=ItemsSeen, n="count")
        .sink("out")
        .build()
    )

    steps = built.steps
    assert steps[0].map is not None and steps[0].map.function == "user_functions:add_total"
    assert steps[0].map.on_error == "deadLetter"
    assert steps[1].flat_map is not None and steps[1].flat_map.function == "user_functions:explode"
    assert steps[1].flat_map.on_error == "fail"
    assert steps[2].filter is not None and steps[2].filter.function == "user_functions:is_big"
    assert steps[3].filter is not None and steps[3].filter.op == "exists"
    outputs = steps[6].aggregate.outputs if steps[6].aggregate is not None else {}
    assert (outputs["median"].fn, outputs["median"].function, outputs["median"].field) == (
        "custom",
        "user_functions:Median",
        "total",
    )
    assert (outputs["items"].fn, outputs["items"].function, outputs["items"].field) == (
        "custom",
        "user_functions:ItemsSeen",
        None,
    )
    assert built.stages().functions


def test_a_process_step_ends_a_keyed_pipeline() -> None:
    builder = pipeline.source("t").map(add_total).key_by("user").process(Dedup, on_error="fail")
    built = builder.sink("o").build()

    stages = built.stages()
    assert stages.terminal == "process"
    assert stages.process is not None and stages.process.function == "user_functions:Dedup"
    assert stages.process.on_error == "fail"


def test_a_reference_string_is_accepted_as_it_is_and_checked_by_the_spec() -> None:
    assert pipeline.source("t").map("user_functions:rekey").sink("o").build().steps[0].map is not None

    with pytest.raises(SpecError, match=r"steps\[0\]\.map\.function: must match"):
        pipeline.source("t").map("not a reference").sink("o").build()


def test_a_function_filter_takes_on_error_and_a_condition_filter_does_not() -> None:
    built = pipeline.source("t").filter(is_big, on_error="fail").sink("o").build()
    assert built.steps[0].filter is not None and built.steps[0].filter.on_error == "fail"

    with pytest.raises(ValueError, match="on_error only applies to a function filter, not to a condition"):
        pipeline.source("t").filter(col("a") == 1, on_error="fail").sink("o").build()


def test_a_lambda_is_refused_with_advice_to_define_it_at_module_level() -> None:
    with pytest.raises(ValueError, match="a lambda cannot be named in a pipeline; define it at module level"):
        pipeline.source("t").map(lambda r: r)


def test_a_nested_function_is_refused_naming_it() -> None:
    def local(record: dict[str, Any]) -> dict[str, Any]:
        return record

    with pytest.raises(ValueError, match=r"local is defined inside a function; define it at module level"):
        pipeline.source("t").flat_map(local)


def test_a_function_defined_in_main_is_refused() -> None:
    def script_function(record: dict[str, Any]) -> dict[str, Any]:
        return record

    script_function.__module__ = "__main__"
    script_function.__qualname__ = "script_function"

    with pytest.raises(ValueError, match="script_function is defined in __main__, which a worker cannot"):
        function_ref(script_function)


def test_a_wrapper_that_does_not_resolve_to_itself_is_refused() -> None:
    wrapped = functools.partial(add_total)

    with pytest.raises(ValueError, match="no module-level name"):
        function_ref(wrapped)


def test_something_not_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"expected a function, a class or 'package\.module:name', got int"):
        function_ref(3)  # type: ignore[arg-type]


def test_a_module_level_function_gives_its_reference() -> None:
    assert function_ref(user_functions.rekey) == "user_functions:rekey"
    assert function_ref(Median) == "user_functions:Median"
