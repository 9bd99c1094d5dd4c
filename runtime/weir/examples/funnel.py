"""The funnel example: page views, add-to-carts, purchases and conversion rates per minute.

``funnel.yaml`` keys the click stream (``weir.examples.clickstream``) by shop and counts each
minute with the custom aggregates below, all fed the record's ``type``:

- ``CountOf`` subclasses (``Views``, ``Carts``, ``Purchases``): records of one type;
- ``Rate`` subclasses (``ViewToCart``, ``ViewToPurchase``): records of one type per page view,
  rounded to ``DECIMALS`` decimals, 0.0 when the minute has no page view.

``reference`` computes the job's output from the generated records in plain Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weir.examples import Example, Record, iso_ms
from weir.examples.clickstream import generate

__all__ = [
    "EXAMPLE",
    "Carts",
    "CountOf",
    "Purchases",
    "Rate",
    "ViewToCart",
    "ViewToPurchase",
    "Views",
    "rate",
    "reference",
]

MINUTE_MS = 60_000
DECIMALS = 4
STEPS = ("page_view", "add_to_cart", "purchase")


def rate(part: int, views: int) -> float:
    """``part / views`` rounded to ``DECIMALS``; 0.0 without views (nothing converted)."""
    return round(part / views, DECIMALS) if views else 0.0


class CountOf:
    """A ``weir.AggregateFunction`` counting the values equal to ``TYPE``."""

    TYPE = "page_view"

    def create(self) -> int:
        return 0

    def add(self, acc: int, value: Any) -> int:
        return acc + 1 if value == self.TYPE else acc

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, acc: int) -> int:
        return acc


class Views(CountOf):
    TYPE = "page_view"


class Carts(CountOf):
    TYPE = "add_to_cart"


class Purchases(CountOf):
    TYPE = "purchase"


class Rate:
    """A ``weir.AggregateFunction``: values equal to ``TYPE`` per ``page_view`` (see ``rate``).
    The accumulator is ``[page views, TYPE records]``."""

    TYPE = "add_to_cart"

    def create(self) -> list[int]:
        return [0, 0]

    def add(self, acc: list[int], value: Any) -> list[int]:
        return [acc[0] + int(value == "page_view"), acc[1] + int(value == self.TYPE)]

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, acc: list[int]) -> float:
        return rate(acc[1], acc[0])


class ViewToCart(Rate):
    TYPE = "add_to_cart"


class ViewToPurchase(Rate):
    TYPE = "purchase"


def reference(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One result per shop and minute with records, as the job writes it (see ``funnel.yaml``)."""
    counts: dict[tuple[str, int], dict[str, int]] = {}
    for r in records:
        if r.value is None or r.raw is not None or r.value.get("type") not in STEPS:
            continue
        start = r.value["ts"] - r.value["ts"] % MINUTE_MS
        c = counts.setdefault((r.value["shop"], start), dict.fromkeys(STEPS, 0))
        c[r.value["type"]] += 1
    return [
        {
            "key": shop,
            "windowStart": iso_ms(start),
            "windowEnd": iso_ms(start + MINUTE_MS),
            "windowStartMs": start,
            "windowEndMs": start + MINUTE_MS,
            "views": c["page_view"],
            "carts": c["add_to_cart"],
            "purchases": c["purchase"],
            "viewToCart": rate(c["add_to_cart"], c["page_view"]),
            "viewToPurchase": rate(c["purchase"], c["page_view"]),
        }
        for (shop, start), c in sorted(counts.items())
    ]



def _show(r: dict[str, Any]) -> str:
    minute = r["windowStart"][11:16] + "-" + r["windowEnd"][11:16]
    return (
        f"{minute:<12} {r['views']:>6} {r['carts']:>6} {r['purchases']:>10}"
        f" {r['viewToCart'] * 100:>10.1f} % {r['viewToPurchase'] * 100:>12.1f} %"
    )


EXAMPLE = Example(
    name="funnel",
    summary="conversion funnel per minute: page views, add-to-carts, purchases and their rates",
    manifest="funnel.yaml",
    generate=generate,
    reference=reference,
    header=(
        f"{'minute':<12} {'views':>6} {'carts':>6} {'purchases':>10} {'view→cart':>12} {'view→purchase':>14}"
    ),
    show=_show,
    notes=(
        "One line per shop minute once the minute is complete (the watermark passed it).",
        "Rates are carts and purchases per page view in that minute; a minute without views shows 0.",
    ),
)
