"""Custom aggregate functions in windows: the ``AggregateFunction`` protocol and their Aggregator.

An aggregate output ``{fn: custom, function: "pkg.mod:Class", field: f}`` names a class that
follows ``AggregateFunction``; weir instantiates it once, without arguments, when it compiles
the pipeline. Per window it keeps one accumulator per custom output, beside the built-in ones:

- ``create()`` makes the accumulator of a new window;
- ``add(acc, value) -> acc`` folds in one record's value: the field's value, or the whole
  record (a dict) when the output names no field. A null or missing field is skipped, as the
  built-in aggregates skip it (a missing one is dead-lettered before, as ``missing_field``);
- ``merge(a, b) -> acc`` combines two windows' accumulators (session windows that meet);
- ``result(acc) -> value`` is the output's value in the window's result (JSON-serialisable).

Accumulators are stored with ``weir.functions.encode_state`` (version 1: JSON), so they must be
JSON values (dicts with string keys, lists, strings, numbers, booleans, null). The functions
always receive a fresh decoded copy (tuples come back as lists, before a restart as after it)
and may modify and return it. So a window keeps each custom accumulator encoded, in memory too
(one decode before and one encode after each call, and nothing the user's code holds is shared
with the state). This is also what makes a record all-or-nothing: a custom
``add`` that raises, or returns something state encoding cannot store, raises
``FunctionError`` (reason ``function_error``) and the record changes none of its windows,
like ``Overflow``: ``check`` runs every window's ``add`` on copies before any is changed.
``merge`` raising raises ``FunctionError`` before anything changes; ``result`` raising puts the
``FunctionError`` in place of the output's value, and ``unrepresentable`` names it: the task core
dead-letters that window's result with reason ``function_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from weir.aggregates import Accumulator, Aggregator, compile_aggregates
from weir.functions import (
    FunctionError,
    FunctionNotFound,
    decode_state,
    encode_state,
    encode_state_list,
)
from weir.functions import load_function as _load
from weir.spec import Aggregate, Pipeline, SpecError

__all__ = ["AggregateFunction", "aggregator_for", "compile_custom_aggregates"]


@runtime_checkable
class AggregateFunction(Protocol):
    """What a custom aggregate class provides (see the module docstring for the contract)."""

    def create(self) -> Any: ...

    def add(self, acc: Any, value: Any) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any: ...

    def result(self, acc: Any) -> Any: ...


_SEPARATOR = b"\n"  # never inside compact JSON: the built-in part's text escapes newlines


def aggregator_for(pipeline: Pipeline) -> Aggregator:
    """The Aggregator of ``pipeline``'s aggregate step, custom functions loaded and instantiated.

    Without custom outputs this is exactly ``compile_aggregates`` of the built-in specs (the
    declarative fast path is untouched). Raises ``SpecError`` with the field path
    (``spec.pipeline.steps[3].aggregate.outputs.p95.function: ...``) for a reference that does not
    resolve or a class that is not an ``AggregateFunction``; ``ValueError`` if there is no aggregate.
    """
    index, aggregate = next(
        ((i, s.aggregate) for i, s in enumerate(pipeline.steps) if s.aggregate is not None), (None, None)
    )
    if index is None or aggregate is None:
        raise ValueError("the pipeline has no aggregate step")
    functions: dict[str, AggregateFunction] = {}
    for name, output in aggregate.outputs.items():
        if output.function is not None:
            path = f"spec.pipeline.steps[{index}].aggregate.outputs.{name}"
            functions[name] = _instantiate(output.function, path)
    return compile_custom_aggregates(aggregate, functions)


def _instantiate(ref: str, path: str) -> AggregateFunction:
    where = f"{path}.function"
    try:
        obj = _load(ref)
    except FunctionNotFound as exc:
        raise SpecError([f"{where}: {exc}"]) from None
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # any failure of user code is a configuration error naming it
            raise SpecError([f"{where}: {ref}() raised {type(exc).__name__}: {exc}"]) from exc
    missing = [m for m in ("create", "add", "merge", "result") if not callable(getattr(obj, m, None))]
    if missing:
        raise SpecError([f"{where}: {ref} is not a weir.AggregateFunction (no {', '.join(missing)})"])
    function: AggregateFunction = obj
    return function


def compile_custom_aggregates(aggregate: Aggregate, functions: Mapping[str, AggregateFunction]) -> Aggregator:
    """An Aggregator for ``aggregate``'s outputs, ``functions`` giving the instance of each custom one.

    The accumulator is the built-in aggregates' slots followed by one slot per custom output,
    which holds the custom accumulator encoded (``encode_state``: bytes).
    Contracts are ``Aggregator``'s, plus ``FunctionError`` as the module docstring says.
    """
    outputs = aggregate.outputs
    builtin_specs = [(n, o.fn, o.field) for n, o in outputs.items() if o.fn != "custom"]
    base = compile_aggregates(builtin_specs)
    if not functions:
        return base
    customs = [(n, o.function or "", o.field, functions[n]) for n, o in outputs.items() if o.fn == "custom"]
    n = len(base.create())
    names = list(outputs)
    base_create, base_add, base_check = base.create, base.add, base.check
    base_merge, base_result, base_dumps, base_loads = base.merge, base.result, base.dumps, base.loads

    def fold(acc: Accumulator, record: dict[str, Any]) -> list[Any]:
        """The new custom slots for ``record``, computed on copies; ``FunctionError`` if one fails."""
        new = []
        for i, (_, ref, field, fn) in enumerate(customs):
            slot = acc[n + i]
            value = record if field is None else record.get(field)
            if value is None:
                new.append(slot)
                continue
            try:
                new.append(encode_state(fn.add(decode_state(slot), value)))
            except Exception as exc:  # the user's add, or a result state encoding refuses
                raise FunctionError(f"{ref} (add)", exc) from exc
        return new

    def create() -> Accumulator:
        acc = base_create()
        for _, ref, _, fn in customs:
            try:
                acc.append(encode_state(fn.create()))
            except Exception as exc:  # any failure of user code
                raise FunctionError(f"{ref} (create)", exc) from exc
        return acc

    def add(acc: Accumulator, record: dict[str, Any], ts: int) -> None:
        new = fold(acc, record)  # may raise FunctionError: nothing changed yet
        part = acc[:n]
        base_add(part, record, ts)  # may raise Overflow: nothing changed yet
        acc[:] = [*part, *new]

    def check(accs: Sequence[Accumulator | None], record: dict[str, Any]) -> None:
        if base_check is not None:
            base_check([None if a is None else a[:n] for a in accs], record)
        for acc in accs:
            if acc is not None:
                fold(acc, record)

    def merge(a: Accumulator, b: Accumulator) -> Accumulator:
        merged = []
        for i, (_, ref, _, fn) in enumerate(customs):
            try:
                merged.append(encode_state(fn.merge(decode_state(a[n + i]), decode_state(b[n + i]))))
            except Exception as exc:  # any failure of user code
                raise FunctionError(f"{ref} (merge)", exc) from exc
        return [*base_merge(a[:n], b[:n]), *merged]

    def result(acc: Accumulator) -> dict[str, Any]:
        values = base_result(acc[:n])
        for i, (name, ref, _, fn) in enumerate(customs):
            try:
                values[name] = fn.result(decode_state(acc[n + i]))
            except Exception as exc:  # noqa: BLE001 - user code; the window's result is dead-lettered
                values[name] = FunctionError(f"{ref} (result)", exc)
        return {name: values[name] for name in names}

    base_unrepresentable = base.unrepresentable
    custom_names = [name for name, _, _, _ in customs]

    def unrepresentable(values: dict[str, Any]) -> str | None:
        for name in custom_names:
            if isinstance(values.get(name), FunctionError):
                return name
        return base_unrepresentable(values)

    def dumps(acc: Accumulator) -> bytes:
        return base_dumps(acc[:n]) + _SEPARATOR + encode_state_list(acc[n:])

    def loads(data: bytes) -> Accumulator:
        head, sep, tail = data.partition(_SEPARATOR)
        if not sep:
            raise ValueError("accumulator has no custom aggregate part: state written for other aggregates?")
        custom = decode_state(tail)
        if type(custom) is not list or len(custom) != len(customs):
            raise ValueError(f"accumulator has the wrong number of custom aggregates (need {len(customs)})")
        return [*base_loads(head), *(encode_state(c) for c in custom)]

    wrapped: Callable[[Accumulator, dict[str, Any], int], None] = add
    return replace(
        base,
        specs=(*base.specs, *((name, "custom", field) for name, _, field, _ in customs)),
        fields=tuple(dict.fromkeys((*base.fields, *(f for _, _, f, _ in customs if f is not None)))),
        create=create,
        add=wrapped,
        check=check,
        merge=merge,
        result=result,
        unrepresentable=unrepresentable,
        dumps=dumps,
        loads=loads,
    )
