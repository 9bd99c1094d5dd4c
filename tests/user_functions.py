"""User functions the unit tests name in pipelines as ``user_functions:<name>`` (tests/ is on the path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

CALLS: list[str] = []


def add_total(record: dict[str, Any]) -> dict[str, Any]:
    """A map: the record with ``total = price * qty``."""
    return {**record, "total": record["price"] * record["qty"]}


def triple_price(record: dict[str, Any]) -> dict[str, Any]:
    """A map: ``price`` times 3 (exact for the test events' prices: ints and quarters)."""
    return {**record, "price": record["price"] * 3}


def normalise(record: dict[str, Any]) -> dict[str, Any]:
    """A map: ``user`` is ``u`` trimmed and lower-cased, and the record says it was normalised."""
    return {**record, "user": str(record["u"]).strip().lower(), "normalised": True}


def normalise_unless_marked(record: dict[str, Any]) -> dict[str, Any]:
    """``normalise``, raising ``ValueError`` on a record marked ``"bad": true``."""
    if record.get("bad"):
        raise ValueError(f"marked record {record['seq']}")
    return normalise(record)


def rekey(record: dict[str, Any]) -> dict[str, Any]:
    """A map whose output has a field the source did not: ``user``."""
    return {"user": record["u"], "n": record.get("n", 1)}


def explode(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A flatMap: one record per item of ``items`` (none for an empty list)."""
    for item in record["items"]:
        yield {"user": record["user"], "item": item}


def is_big(record: dict[str, Any]) -> bool:
    """A function filter: true for ``price >= 10``."""
    return bool(record["price"] >= 10)


def returns_list(record: dict[str, Any]) -> list[Any]:
    """A map that breaks its contract (returns a list)."""
    return [record]


def returns_int(record: dict[str, Any]) -> int:
    """A flatMap that breaks its contract (returns a non-iterable)."""
    return 3


def yields_string(record: dict[str, Any]) -> Iterator[Any]:
    """A flatMap that breaks its contract (yields a non-dict)."""
    yield "x"


NOT_CALLABLE = 42


class Percentile:
    """A custom aggregate: the p-th percentile (nearest rank) of the values seen."""

    p = 0.5

    def create(self) -> list[float]:
        return []

    def add(self, acc: list[float], value: Any) -> list[float]:
        if not isinstance(value, int | float):
            raise TypeError(f"not a number: {value!r}")
        return [*acc, value]

    def merge(self, a: list[float], b: list[float]) -> list[float]:
        return a + b

    def result(self, acc: list[float]) -> float | None:
        if not acc:
            return None
        ordered = sorted(acc)
        return ordered[min(len(ordered) - 1, int(self.p * len(ordered)))]


class Median(Percentile):
    p = 0.5


class ItemsSeen:
    """A custom aggregate over whole records: the sorted distinct ``item`` values."""

    def create(self) -> list[str]:
        return []

    def add(self, acc: list[str], value: Any) -> list[str]:
        return sorted({*acc, value["item"]})

    def merge(self, a: list[str], b: list[str]) -> list[str]:
        return sorted({*a, *b})

    def result(self, acc: list[str]) -> list[str]:
        return acc


class BrokenResult(Percentile):
    """A custom aggregate whose ``result`` raises."""

    def result(self, acc: list[float]) -> float | None:
        raise ZeroDivisionError("no result")


class Dedup:
    """Stands in for a keyed process function class (the spec only names it)."""


def fail_on_poison(record: dict[str, Any]) -> dict[str, Any]:
    """A map that passes records on unchanged and raises on one marked ``"poison": true`` (with
    ``onError: fail`` the worker exits 6: a version that crash-loops once that record arrives)."""
    if record.get("poison"):
        raise ValueError("poisoned record")
    return record


_ODD_PRICES: list[Any] = [True, "12", 2**70, float("nan"), float("inf"), None, [1], 2.5, -(2**63), 2**63 - 1]


class _Int(int):
    """An int subclass: the native window segment leaves it to the Python path."""


def reprice(record: dict[str, Any]) -> dict[str, Any]:
    """A map for the native window segment's tests: ``price`` doubled, and by ``qty`` sometimes
    something that is not a plain number (a bool, a str, an int past 64 bits, NaN, an
    infinity, null, a list, an int subclass) or missing."""
    qty = record.get("qty")
    out = {**record}
    if qty == 5 and isinstance(record.get("price"), int | float):
        out["price"] = _ODD_PRICES[int(record["price"]) % len(_ODD_PRICES)]
    elif qty == 4:
        out["price"] = _Int(7)
    elif qty == 3:
        out.pop("price", None)
    elif isinstance(record.get("price"), int | float) and not isinstance(record.get("price"), bool):
        out["price"] = record["price"] * 2
    return out


def split_order(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A flatMap for the native window segment's tests: ``qty`` records (none for 0, at most 5),
    each with ``price`` and ``qty`` 1."""
    for _ in range(min(int(record["qty"]), 5)):
        yield {"price": record["price"], "qty": 1, "ts": record["ts"]}
