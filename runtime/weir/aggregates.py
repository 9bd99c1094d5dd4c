"""Window aggregates: compiles a list of aggregate specs into one specialised accumulator implementation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

__all__ = [
    "AGG_FUNCTIONS",
    "INT_MAX",
    "INT_MIN",
    "NUMERIC_FUNCTIONS",
    "Accumulator",
    "AggFunction",
    "AggSpec",
    "Aggregator",
    "Overflow",
    "compile_aggregates",
    "slot_count",
]

AggFunction = Literal["count", "sum", "min", "max", "avg", "count_distinct", "first", "last"]
AGG_FUNCTIONS: frozenset[str] = frozenset(get_args(AggFunction))
NUMERIC_FUNCTIONS: frozenset[str] = frozenset({"sum", "min", "max", "avg"})
"""Functions whose field must hold numbers (int or float, never bool); the caller validates that."""

AggSpec = tuple[str, str, str | None]
"""``(output name, function, field)``; ``field`` is None for ``count`` and required otherwise."""

Accumulator = list[Any]

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
"""Integer aggregates stay within signed 64 bits: Flink's BIGINT, Java's and Kafka Streams'
``long``, and what every JSON library that reads integers into a machine word accepts."""

_FLOAT_MAX = 1.7976931348623157e308
# A float bound every representable int sum satisfies, so the per-record test is one chained
# comparison; only values beyond it take the exact (slower) look in _check.
_FAST_BOUND = float(2**62)


class Overflow(ValueError):
    """A record's contribution would make an aggregate unrepresentable.

    Raised by ``Aggregator.add``/``check``/``merge`` before anything is modified, so the
    accumulator keeps the exact value it had; the caller dead-letters the record with
    ``reason`` (``"overflow"``) and ``detail`` (which output and field, and the value).
    """

    reason = "overflow"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def representable(value: Any) -> bool:
    """Whether a sum is a signed 64-bit int or a finite float (the rule ``Overflow`` enforces)."""
    if value.__class__ is int:
        return INT_MIN <= value <= INT_MAX
    return value.__class__ is float and -_FLOAT_MAX <= value <= _FLOAT_MAX


def _check(value: Any, name: str, field: str | None) -> None:
    """Slow path of the generated bound test: raise ``Overflow`` unless ``value`` is representable."""
    if representable(value):
        return
    if value.__class__ is float and math.isnan(value):
        what = "is not a number (NaN: the window's restored state had lost its value)"
    elif value.__class__ is float:
        what = "would overflow a 64-bit float"
    else:
        what = f"would be {value}, beyond signed 64-bit integers"
    source = f" of field {field!r}" if field is not None else ""
    raise Overflow(f"aggregate {name!r}{source} {what}; the record is not applied")


@dataclass(frozen=True, slots=True, eq=False)
class Aggregator:
    """The accumulator operations for one exact list of aggregate specs.

    An accumulator is a plain list of slots (numbers, None, JSON values) except that a
    ``count_distinct`` slot holds a set. Contracts:

    - ``create()`` returns a fresh, empty accumulator.
    - ``add(acc, record, ts)`` folds one record with event time ``ts`` into ``acc`` in place. A field
      that is missing or null is ignored by the aggregates reading it (``count`` counts records).
      When the record would take a ``sum`` or an ``avg``'s running sum beyond signed 64-bit
      integers (``INT_MIN..INT_MAX``) or to a non-finite float, it raises ``Overflow`` and leaves
      ``acc`` untouched.
    - ``check(accs, record)`` raises ``Overflow`` exactly when ``add`` would for one of ``accs``
      (None entries are skipped), changing nothing: a record going into several windows has
      all of them checked before any is changed. None when no aggregate can overflow (no sum
      or avg).
    - ``merge(a, b)`` returns a new accumulator equal to having added ``a``'s records and then
      ``b``'s; neither input is modified. Ties in ``first``/``last`` resolve as if ``b``'s records
      arrived later. Associative. Raises ``Overflow`` when the merged sums are unrepresentable.
    - ``result(acc)`` returns ``{output name: value}`` in spec order: ``count``/``count_distinct``
      ints, ``sum`` an int when every value was an int (0 when there were none) else a float,
      ``avg`` a float or None, ``min``/``max``/``first``/``last`` None when there were no values.
    - ``dumps(acc)``/``loads(data)`` serialise compactly and deterministically (sets sorted);
      ``loads`` rejects data whose slot count does not match these specs. A count or sum slot
      stored as null (an infinite or NaN sum written by a weir before the overflow rule) loads
      as NaN: further records for that window are dead-lettered as ``overflow`` and its result
      as ``unserializable_result``, instead of a crash or a silent null.
    - ``unrepresentable(values)`` names the first ``sum``/``avg`` output of a ``result`` that JSON
      output cannot carry (NaN, infinite, an int beyond 64 bits), else None.
    """

    specs: tuple[AggSpec, ...]
    fields: tuple[str, ...]
    """Every record field the aggregates read, in first-use order."""
    numeric_fields: tuple[str, ...]
    """The fields that must hold numbers (read by sum/min/max/avg)."""
    create: Callable[[], Accumulator]
    add: Callable[[Accumulator, dict[str, Any], int], None]
    check: Callable[[Sequence[Accumulator | None], dict[str, Any]], None] | None
    merge: Callable[[Accumulator, Accumulator], Accumulator]
    result: Callable[[Accumulator], dict[str, Any]]
    dumps: Callable[[Accumulator], bytes]
    loads: Callable[[bytes], Accumulator]
    unrepresentable: Callable[[dict[str, Any]], str | None]
    source: str
    """The generated Python source of create/add/merge/result, kept for debugging."""


# Slots each function occupies in the accumulator, with their initial values as source text.
_SLOTS: dict[str, tuple[str, ...]] = {
    "count": ("0",),
    "sum": ("0",),
    "min": ("None",),
    "max": ("None",),
    "avg": ("0", "0"),  # sum, number of values
    "count_distinct": ("set()",),
    "first": ("None", "None"),  # event time, value
    "last": ("None", "None"),
}


def slot_count(fn: str) -> int:
    """Accumulator slots one output of function ``fn`` occupies (``custom``: one, after the built-in ones)."""
    return len(_SLOTS[fn]) if fn in _SLOTS else 1


def _canonical(value: Any) -> bytes:
    """Distinct-value identity of a non-string JSON value: its canonical JSON text.

    Canonical JSON keeps bool, int and float apart (``true``, ``1`` and ``1.0`` are three values)
    and makes dicts with equal items equal regardless of key order.
    """
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _distinct_key(member: str | bytes) -> tuple[int, str | bytes]:
    return (0, member) if type(member) is str else (1, member)


def _dump_distinct(members: set[str | bytes]) -> list[Any]:
    # Strings are kept as themselves (the common case, and cheap); other values as canonical
    # bytes. On disk both become the original JSON values, in a fixed order.
    return [m if type(m) is str else orjson.loads(m) for m in sorted(members, key=_distinct_key)]


def _load_distinct(values: list[Any]) -> set[str | bytes]:
    return {v if type(v) is str else _canonical(v) for v in values}


def compile_aggregates(specs: Iterable[AggSpec]) -> Aggregator:
    """Validate ``specs`` and generate one specialised create/add/merge/result for exactly them.

    ``add`` is generated as straight-line Python (one ``dict.get`` per distinct field, no
    per-aggregate dispatch) because it runs once per record per window. Raises ValueError on an
    unknown function, a missing/unexpected field or a duplicate output name.
    """
    spec_list = tuple(_validate(specs))
    layout: list[int] = []  # first slot index of each spec
    initial: list[str] = []
    for _, fn, _ in spec_list:
        layout.append(len(initial))
        initial.extend(_SLOTS[fn])
    n_slots = len(initial)

    fields: list[str] = []
    numeric: list[str] = []
    for _, fn, field in spec_list:
        if field is not None and field not in fields:
            fields.append(field)
        if fn in NUMERIC_FUNCTIONS and field is not None and field not in numeric:
            numeric.append(field)

    src: list[str] = []
    _emit_create(src, initial)
    _emit_add(src, spec_list, layout, fields)
    has_check = _emit_check(src, spec_list, layout, fields)
    _emit_merge(src, spec_list, layout)
    _emit_result(src, spec_list, layout)
    source = "\n".join(src) + "\n"
    namespace: dict[str, Any] = {
        "_canonical": _canonical,
        "_check": _check,
        "_representable": representable,
    }
    exec(compile(source, f"<weir.aggregates {len(spec_list)} specs>", "exec"), namespace)

    set_slots = tuple(layout[i] for i, (_, fn, _) in enumerate(spec_list) if fn == "count_distinct")
    sum_slots = tuple(layout[i] for i, (_, fn, _) in enumerate(spec_list) if fn in ("sum", "avg"))
    dumps, loads = _codec(n_slots, set_slots, sum_slots)
    return Aggregator(
        specs=spec_list,
        fields=tuple(fields),
        numeric_fields=tuple(numeric),
        create=namespace["create"],
        add=namespace["add"],
        check=namespace["check"] if has_check else None,
        merge=namespace["merge"],
        result=namespace["result"],
        dumps=dumps,
        loads=loads,
        unrepresentable=namespace["unrepresentable"],
        source=source,
    )


def _validate(specs: Iterable[AggSpec]) -> Iterable[AggSpec]:
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, tuple | list) or len(spec) != 3:
            raise ValueError(f"an aggregate spec is (output name, function, field), got {spec!r}")
        name, fn, field = spec
        if not isinstance(name, str) or not name:
            raise ValueError(f"aggregate output name must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"duplicate aggregate output name {name!r}")
        seen.add(name)
        if fn not in AGG_FUNCTIONS:
            raise ValueError(
                f"unknown aggregate function {fn!r} for {name!r}; expected one of {sorted(AGG_FUNCTIONS)}"
            )
        if fn == "count":
            if field is not None:
                raise ValueError(f"count takes no field ({name!r} names {field!r})")
        elif not isinstance(field, str) or not field:
            raise ValueError(f"{fn} needs a field name ({name!r})")
        yield (name, fn, field)


def _emit_create(src: list[str], initial: Sequence[str]) -> None:
    src.append("def create():")
    src.append(f"    return [{', '.join(initial)}]")


def _emit_add(src: list[str], specs: Sequence[AggSpec], layout: Sequence[int], fields: Sequence[str]) -> None:
    src.append("def add(acc, record, ts):")
    body: list[str] = []
    # Aggregates over the same field share one lookup and one presence test.
    for f_index, field in enumerate(fields):
        body.append(f"v{f_index} = record.get({field!r})")
    # Every new running sum is bound-checked before anything is written, so a record that would
    # overflow one aggregate changes none (the window keeps exact values). With sums over one
    # field (the common case) that field's block comes first and holds checks and writes;
    # with several, all checks come first.
    sum_fields = [f for f in fields if any(sf == f and fn in ("sum", "avg") for _, fn, sf in specs)]
    order = sorted(range(len(fields)), key=lambda f_index: fields[f_index] not in sum_fields)
    # Counts after the checks too: a record refused for overflow is not counted either.
    counts = [f"acc[{i}] += 1" for (_, fn, _), i in zip(specs, layout, strict=True) if fn == "count"]
    if len(sum_fields) > 1:
        body.extend(_sum_checks(specs, layout, fields, "acc"))
    if len(sum_fields) != 1:
        body.extend(counts)
    for f_index in order:
        field = fields[f_index]
        v = f"v{f_index}"
        block = _sum_checks(specs, layout, [field], "acc", f_index)[1:] if len(sum_fields) == 1 else []
        for (_, fn, spec_field), i in zip(specs, layout, strict=True):
            if spec_field != field:
                continue
            if fn == "sum":
                block.append(f"    acc[{i}] = n{i}")
            elif fn in ("min", "max"):
                op = "<" if fn == "min" else ">"
                # Strict comparison keeps the earliest-arrived of equal values.
                block.append(f"    m = acc[{i}]")
                block.append(f"    if m is None or {v} {op} m:")
                block.append(f"        acc[{i}] = {v}")
            elif fn == "avg":
                block.append(f"    acc[{i}] = n{i}")
                block.append(f"    acc[{i + 1}] += 1")
            elif fn == "count_distinct":
                block.append(f"    acc[{i}].add({v} if {v}.__class__ is str else _canonical({v}))")
            elif fn in ("first", "last"):
                # first: strictly earlier replaces (ties keep the earliest-arrived);
                # last: later-or-equal replaces (ties keep the latest-arrived).
                op = "<" if fn == "first" else ">="
                block.append(f"    t = acc[{i}]")
                block.append(f"    if t is None or ts {op} t:")
                block.append(f"        acc[{i}] = ts")
                block.append(f"        acc[{i + 1}] = {v}")
        body.append(f"if {v} is not None:")
        body.extend(block)
        if len(sum_fields) == 1 and field == sum_fields[0]:
            body.extend(counts)
    if not body:
        body.append("pass")
    src.extend("    " + line for line in body)


def _sum_checks(
    specs: Sequence[AggSpec],
    layout: Sequence[int],
    fields: Sequence[str],
    acc: str,
    first_index: int | None = None,
) -> list[str]:
    """Lines computing ``n<slot> = acc[slot] + v<field>`` for every sum and avg, each followed by
    the cheap bound test whose failure takes ``_check``'s exact look (which raises Overflow).

    The bound is a literal: a constant load, where a global would be a dictionary lookup."""
    lines: list[str] = []
    for position, field in enumerate(fields):
        v = f"v{position if first_index is None else first_index}"
        block: list[str] = []
        for (name, fn, spec_field), i in zip(specs, layout, strict=True):
            if spec_field == field and fn in ("sum", "avg"):
                block.append(f"    n{i} = {acc}[{i}] + {v}")
                block.append(f"    if not {-_FAST_BOUND!r} <= n{i} <= {_FAST_BOUND!r}:")
                block.append(f"        _check(n{i}, {name!r}, {field!r})")
        if block:
            lines.append(f"if {v} is not None:")
            lines.extend(block)
    return lines


def _emit_check(
    src: list[str], specs: Sequence[AggSpec], layout: Sequence[int], fields: Sequence[str]
) -> bool:
    checks = _sum_checks(specs, layout, fields, "acc")
    if not checks:
        return False
    # One call for all of a record's windows (a sliding record is in size/slide of them).
    src.append("def check(accs, record):")
    body = [f"v{f_index} = record.get({field!r})" for f_index, field in enumerate(fields)]
    body.append("for acc in accs:")
    body.append("    if acc is None:")
    body.append("        continue")
    body.extend("    " + line for line in checks)
    src.extend("    " + line for line in body)
    return True


def _emit_merge(src: list[str], specs: Sequence[AggSpec], layout: Sequence[int]) -> None:
    src.append("def merge(a, b):")
    body = ["r = a.copy()"]
    for (name, fn, field), i in zip(specs, layout, strict=True):
        if fn == "count":
            body.append(f"r[{i}] = a[{i}] + b[{i}]")
        elif fn in ("sum", "avg"):
            body.append(f"r[{i}] = x = a[{i}] + b[{i}]")
            body.append(f"if not {-_FAST_BOUND!r} <= x <= {_FAST_BOUND!r}:")
            body.append(f"    _check(x, {name!r}, {field!r})")
            if fn == "avg":
                body.append(f"r[{i + 1}] = a[{i + 1}] + b[{i + 1}]")
        elif fn in ("min", "max"):
            op = "<" if fn == "min" else ">"
            body.append(f"x = b[{i}]")
            body.append(f"if x is not None and (a[{i}] is None or x {op} a[{i}]):")
            body.append(f"    r[{i}] = x")
        elif fn == "count_distinct":
            body.append(f"r[{i}] = a[{i}] | b[{i}]")
        elif fn in ("first", "last"):
            op = "<" if fn == "first" else ">="
            body.append(f"x = b[{i}]")
            body.append(f"if x is not None and (a[{i}] is None or x {op} a[{i}]):")
            body.append(f"    r[{i}] = x")
            body.append(f"    r[{i + 1}] = b[{i + 1}]")
    body.append("return r")
    src.extend("    " + line for line in body)


def _emit_result(src: list[str], specs: Sequence[AggSpec], layout: Sequence[int]) -> None:
    items: list[str] = []
    for (name, fn, _), i in zip(specs, layout, strict=True):
        if fn in ("count", "sum", "min", "max"):
            expr = f"a[{i}]"
        elif fn == "avg":
            expr = f"(a[{i}] / a[{i + 1}] if a[{i + 1}] else None)"
        elif fn == "count_distinct":
            expr = f"len(a[{i}])"
        else:  # first, last: the value slot
            expr = f"a[{i + 1}]"
        items.append(f"{name!r}: {expr}")
    src.append("def result(a):")
    src.append(f"    return {{{', '.join(items)}}}")
    src.append("def unrepresentable(v):")
    for name, fn, _ in specs:
        if fn in ("sum", "avg"):
            src.append(f"    x = v[{name!r}]")
            fast = f"{-_FAST_BOUND!r} <= x <= {_FAST_BOUND!r}"
            src.append(f"    if x is not None and not {fast} and not _representable(x):")
            src.append(f"        return {name!r}")
    src.append("    return None")


def _codec(
    n_slots: int, set_slots: tuple[int, ...], sum_slots: tuple[int, ...]
) -> tuple[Callable[[Accumulator], bytes], Callable[[bytes], Accumulator]]:
    def to_json_list(acc: Accumulator) -> list[Any]:
        if not set_slots:
            return acc
        out = acc.copy()
        for i in set_slots:
            out[i] = _dump_distinct(acc[i])
        return out

    def dumps(acc: Accumulator) -> bytes:
        doc = to_json_list(acc)
        try:
            return orjson.dumps(doc)
        except orjson.JSONEncodeError:
            # orjson refuses integers beyond 64 bits, which a long-running int sum can reach.
            # The standard library writes them exactly; the leading space (valid JSON
            # whitespace) tells loads to parse with it too, since orjson would read such an
            # integer back as a float.
            return b" " + json.dumps(doc, separators=(",", ":")).encode()

    def loads(data: bytes) -> Accumulator:
        acc = json.loads(data) if data[:1] == b" " else orjson.loads(data)
        if type(acc) is not list or len(acc) != n_slots:
            raise ValueError(
                f"accumulator has {len(acc) if type(acc) is list else 'no'} slots, these aggregates need "
                f"{n_slots}: state written for a different aggregate list?"
            )
        for i in set_slots:
            acc[i] = _load_distinct(acc[i])
        for i in sum_slots:
            if acc[i] is None:
                # JSON has no inf/NaN: an older weir wrote such a sum as null. Its value is
                # lost; NaN keeps that visible (see the class docstring) where None would crash.
                acc[i] = math.nan
        return acc

    return dumps, loads
