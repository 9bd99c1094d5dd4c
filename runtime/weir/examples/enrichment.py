"""Revenue and margin per product category and customer segment per minute: purchases enriched
with a product catalog and a user-segment table as of their event time, then re-keyed.

Two jobs in ``enrichment.yaml``, chained through the topic ``enriched-purchases`` (``weir up``
runs both):

1. ``enrichment-join`` reads ``purchases`` (keyed by user) and joins each with the
   ``catalog`` (by ``product``: category, unit price and margin in cents, inner: a purchase of
   an unlisted product is dead-lettered ``join_miss``) and ``user-segments`` (by ``user``:
   segment, left: a user without one counts as ``unsegmented``), both as of the purchase's
   event time, and writes the enriched purchases.
2. ``enrichment-revenue`` keys them by ``category|segment`` (``by_category_and_segment``
   below) and sums revenue and margin per tumbling minute.

Why two jobs: a join runs in the keyed stage, after the keyBy, and this question needs a key
(category and segment) that exists only after the joins (Kafka Streams: ``join`` then
``groupBy``; Flink SQL: a temporal join then ``GROUP BY``). Chaining two exactly-once jobs
through a read_committed topic gives the same result, at the cost of one more topic and of
a second watermark, which needs two things. ``enriched-purchases`` has as many partitions as
``purchases`` (both written by librdkafka's default partitioner, keyed by user), so each of
its partitions carries one first-job task's output, in that task's event-time order: were
tasks interleaved in one partition, one running minutes behind the other (a restart, a
backlog) would have its purchases dropped as late. And the second job's ``idleTimeout``
(30 s) outlasts a restart of a first-job worker (the join then holds purchases until the
tables are read and quiet for 2 s): an enriched partition idle meanwhile would have its
watermark follow the wall clock, and the purchases still to come be late.

The generator (``generate``) produces the tables first (valid from one minute before the
shop opens), then purchases about ``step_ms`` apart, and, ``LEAD_MS`` of shop time ahead of
the purchases they affect (so the join never meets them late), at fixed shop times after the
first purchase:

- at 10 minutes: ``PRICE_CHANGE`` (a games title on sale: lower price, lower margin);
- at 20 minutes: users ``SEGMENT_CHANGED`` move to ``vip``;
- at 30 minutes: ``SEGMENT_DELETED``'s segment is deleted (a tombstone).

Table records carry the Kafka ``timestamp`` the producer must give them (a table update's
event time is its Kafka timestamp). ``reference`` computes the output from the records with
plain as-of lookups, independently of the runtime.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Final

from weir.examples import Example, Record, iso_ms

__all__ = ["EXAMPLE", "by_category_and_segment", "generate", "reference"]

PURCHASES: Final = "purchases"
CATALOG: Final = "catalog"
SEGMENTS: Final = "user-segments"
ENRICHED: Final = "enriched-purchases"
"""The first job's sink, the second job's source."""
SINK: Final = "revenue-by-segment"

MINUTE: Final = 60_000
PRODUCTS: Final = {
    # product: (category, unit price in cents, unit margin in cents)
    "p-1": ("books", 1_499, 450),
    "p-2": ("books", 2_999, 900),
    "p-3": ("games", 5_999, 1_500),
    "p-4": ("games", 1_999, 700),
    "p-5": ("garden", 3_499, 1_200),
    "p-6": ("garden", 899, 250),
    "p-7": ("kitchen", 4_999, 1_800),
    "p-8": ("kitchen", 1_299, 300),
}
USERS: Final = 40
SEGMENTS_OF: Final = ("new", "regular", "vip")
LEAD_MS: Final = 30_000
"""How much shop time before it takes effect a table change is produced."""
PRICE_CHANGE_MS: Final = 10 * MINUTE
"""Shop time (after the first purchase) from which ``PRICE_CHANGE`` applies."""
PRICE_CHANGE: Final = ("p-3", "games", 3_999, 200)
SEGMENT_CHANGE_MS: Final = 20 * MINUTE
SEGMENT_CHANGED: Final = ("u-1", "u-2", "u-3", "u-4")
SEGMENT_DELETE_MS: Final = 30 * MINUTE
SEGMENT_DELETED: Final = "u-5"
UNSEGMENTED: Final = "unsegmented"


def _user(i: int) -> str:
    return f"u-{i}"


def _segment(i: int) -> str:
    return SEGMENTS_OF[i % len(SEGMENTS_OF)]


def generate(seed: int, start_ms: int, step_ms: int) -> Iterator[Record]:
    """The endless input (see the module docstring). Purchase ``i`` is at ``start_ms + i *
    step_ms`` less up to ``3 * step_ms`` (out of order; never late for the second job's
    ``maxOutOfOrderness`` of two minutes while ``step_ms`` is at most 40 s)."""
    rng = random.Random(seed)
    opened = start_ms - MINUTE
    for product, (category, price, margin) in PRODUCTS.items():
        yield Record(
            CATALOG, product, {"category": category, "price": price, "margin": margin}, timestamp=opened
        )
    for u in range(USERS):
        yield Record(SEGMENTS, _user(u), {"segment": _segment(u)}, timestamp=opened)
    product, category, price, margin = PRICE_CHANGE
    changes: list[tuple[int, list[tuple[str, str, dict[str, Any] | None]]]] = [
        # (shop time, its table records), produced LEAD_MS of shop time ahead
        (
            start_ms + PRICE_CHANGE_MS,
            [(CATALOG, product, {"category": category, "price": price, "margin": margin})],
        ),
        (start_ms + SEGMENT_CHANGE_MS, [(SEGMENTS, user, {"segment": "vip"}) for user in SEGMENT_CHANGED]),
        (start_ms + SEGMENT_DELETE_MS, [(SEGMENTS, SEGMENT_DELETED, None)]),
    ]
    at = start_ms
    products = list(PRODUCTS)
    i = 0
    while True:
        while changes and changes[0][0] - LEAD_MS <= at:
            valid_from, updates = changes.pop(0)
            for topic, key, value in updates:
                yield Record(topic, key, value, timestamp=valid_from)
        user = _user(rng.randrange(USERS))
        ts = max(at - rng.randrange(0, 3 * step_ms + 1), start_ms)
        value = {
            "order": f"o-{i}",
            "user": user,
            "product": rng.choice(products),
            "quantity": rng.choice((1, 1, 1, 2, 3)),
            "ts": ts,
        }
        yield Record(PURCHASES, user, value)
        at += step_ms
        i += 1


def by_category_and_segment(record: dict[str, Any]) -> dict[str, Any]:
    """The second job's ``map``: an enriched purchase as ``group`` (``category|segment``) with
    its revenue and margin in cents (unit amounts times quantity) and its event time."""
    quantity = record["quantity"]
    segment = record.get("segment") or UNSEGMENTED
    return {
        "group": f"{record['category']}|{segment}",
        "revenue": record["price"] * quantity,
        "margin": record["margin"] * quantity,
        "ts": record["ts"],
    }



def _as_of(versions: list[tuple[int, int, dict[str, Any] | None]], ts: int) -> dict[str, Any] | None:
    """The value of the newest version at or before ``ts`` (of two at one time, the later produced)."""
    seen = [v for v in versions if v[0] <= ts]
    return max(seen, key=lambda v: (v[0], v[1]))[2] if seen else None


def reference(records: Sequence[Record]) -> list[dict[str, Any]]:
    """The second job's sink records for ``records``: one per ``category|segment`` and minute
    with purchases, ``revenue``, ``margin`` (cents) and ``orders`` (purchases, not units)."""
    tables: dict[str, dict[str, list[tuple[int, int, dict[str, Any] | None]]]] = {CATALOG: {}, SEGMENTS: {}}
    purchases = []
    for n, r in enumerate(records):
        if r.raw is not None:
            continue
        if r.topic in tables:
            ts = r.timestamp
            assert ts is not None and r.key is not None, "a table record needs a key and a timestamp"
            tables[r.topic].setdefault(r.key, []).append((ts, n, r.value))
        elif r.topic == PURCHASES and r.value is not None:
            purchases.append(r.value)
    windows: dict[tuple[str, int], list[int]] = {}
    for p in purchases:
        product = _as_of(tables[CATALOG].get(p["product"], []), p["ts"])
        if product is None:
            continue  # inner join: dead-lettered as join_miss
        segment = _as_of(tables[SEGMENTS].get(p["user"], []), p["ts"])
        group = f"{product['category']}|{(segment or {}).get('segment') or UNSEGMENTED}"
        sums = windows.setdefault((group, p["ts"] - p["ts"] % MINUTE), [0, 0, 0])
        sums[0] += product["price"] * p["quantity"]
        sums[1] += product["margin"] * p["quantity"]
        sums[2] += 1
    return [
        {
            "key": group,
            "windowStart": iso_ms(start),
            "windowEnd": iso_ms(start + MINUTE),
            "windowStartMs": start,
            "windowEndMs": start + MINUTE,
            "revenue": revenue,
            "margin": margin,
            "orders": orders,
        }
        for (group, start), (revenue, margin, orders) in sorted(
            windows.items(), key=lambda w: (w[0][1], w[0][0])
        )
    ]


def _show(r: dict[str, Any]) -> str:
    category, _, segment = r["key"].partition("|")
    return (
        f"{r['windowStart'][11:16]}  {category:<8} {segment:<12} {r['orders']:>6} "
        f"{r['revenue'] / 100:>12.2f} {r['margin'] / 100:>10.2f}"
    )


EXAMPLE = Example(
    name="enrichment",
    summary="purchases + catalog + user segments joined as of event time: revenue per category and segment",
    manifest="enrichment.yaml",
    generate=generate,
    reference=reference,
    header=f"{'min':<5}  {'category':<8} {'segment':<12} {'orders':>6} {'revenue':>12} {'margin':>10}",
    show=_show,
    table_topics=(CATALOG, SEGMENTS),
    notes=(
        "two jobs: enrichment-join (purchases + catalog + user-segments -> enriched-purchases), "
        "then enrichment-revenue (per category|segment per minute)",
        f"at 10 minutes the price of {PRICE_CHANGE[0]} drops to {PRICE_CHANGE[2] / 100:.2f} (margin "
        f"{PRICE_CHANGE[3] / 100:.2f}): games margin falls from that minute on, as of each purchase's "
        "event time (a purchase made before it keeps the old price even if it arrives later)",
        f"at 20 minutes users {', '.join(SEGMENT_CHANGED)} become vip; at 30 minutes "
        f"{SEGMENT_DELETED}'s segment is deleted (a tombstone: counted as {UNSEGMENTED} from then on)",
    ),
)
