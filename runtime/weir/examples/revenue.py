"""The revenue example: revenue, orders and average order per product per minute (``revenue.yaml``).

The generator simulates a shop's event stream: page views, add-to-carts and purchases by
users (the Kafka key), each product at its own fixed price, up to 3 s out of order (the job
allows 5 s), a few purchases by a ``bot`` user or of a free item (price 0), which the job
filters out, and every 5000th record malformed on purpose (it must reach the dead-letter
topic). ``reference`` computes the job's output from the records in plain Python.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from weir.examples import Example, Record, iso_ms

__all__ = ["EXAMPLE", "PRICES", "PRODUCTS", "generate", "reference", "show"]

TOPIC = "events"
"""The manifest's source topic."""
PRODUCTS = [f"p-{i}" for i in range(1, 21)]
PRICES = {p: round(random.Random(p).uniform(5, 120), 2) for p in PRODUCTS}
"""Each product's price (a string seed hashes the same in every process)."""
KINDS = ("page_view", "add_to_cart", "purchase")
KIND_WEIGHTS = (70, 20, 10)
USERS = 500
BOT_EVERY = 150
"""About one event in this many is by the user ``bot`` (filtered out by the job)."""
FREE_EVERY = 40
"""About one purchase in this many is a free item (price 0, filtered out by the job)."""
MAX_DISORDER_MS = 3_000
"""How far behind the generator's clock an event may be: under the manifest's 5 s
``maxOutOfOrderness``, so no record is late."""
MALFORMED_EVERY = 5_000
MALFORMED = b'{"type": "purchase", "product_id": "p-1", "price": "free"'
WINDOW_MS = 60_000


def generate(seed: int, start_ms: int, step_ms: int) -> Iterator[Record]:
    """Events keyed by user; the clock starts at ``start_ms`` and moves ``step_ms`` per record,
    each event's ``ts`` up to 3 s behind it (but not before ``start_ms``). Record ``n`` with
    ``n % 5000 == 4999`` is a truncated JSON object (``raw``)."""
    rng = random.Random(seed)
    n = 0
    while True:
        # Never before start_ms: the demo's first minute would show a few stragglers of the one before.
        ts = max(start_ms, start_ms + n * step_ms - rng.randint(0, MAX_DISORDER_MS))
        user = "bot" if rng.randrange(BOT_EVERY) == 0 else f"u-{rng.randint(1, USERS)}"
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        product = rng.choice(PRODUCTS)
        event: dict[str, Any] = {"type": kind, "product_id": product, "user_id": user, "ts": ts}
        if kind == "purchase":
            event["price"] = 0 if rng.randrange(FREE_EVERY) == 0 else PRICES[product]
        if n % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            yield Record(TOPIC, user, None, raw=MALFORMED)
        else:
            yield Record(TOPIC, user, event)
        n += 1


def reference(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One result per product and minute with a counted purchase: purchases with a price
    above 0 by any user but ``bot``, in tumbling one-minute windows of ``ts``."""
    prices: dict[tuple[str, int], list[float]] = {}
    for record in records:
        event = record.value
        if record.topic != TOPIC or record.raw is not None or event is None:
            continue
        if event["type"] != "purchase" or not event["price"] > 0 or event["user_id"] == "bot":
            continue
        start = event["ts"] - event["ts"] % WINDOW_MS
        prices.setdefault((event["product_id"], start), []).append(event["price"])
    out = []
    for (product, start), paid in prices.items():
        revenue = sum(paid)
        out.append({
            "key": product,
            "windowStart": iso_ms(start),
            "windowEnd": iso_ms(start + WINDOW_MS),
            "windowStartMs": start,
            "windowEndMs": start + WINDOW_MS,
            "revenue": revenue,
            "orders": len(paid),
            "averageOrder": revenue / len(paid),
        })
    return out



HEADER = f"{'minute':<13} {'product':<8} {'orders':>6} {'revenue':>10} {'avg order':>10}"


def show(r: dict[str, Any]) -> str:
    minute = r["windowStart"][11:16] + "-" + r["windowEnd"][11:16]
    return f"{minute:<13} {r['key']:<8} {r['orders']:>6} {r['revenue']:>10.2f} {r['averageOrder']:>10.2f}"


EXAMPLE = Example(
    name="revenue",
    summary="revenue, orders and average order per product per minute (filter, keyBy, tumbling window)",
    manifest="revenue.yaml",
    generate=generate,
    reference=reference,
    header=HEADER,
    show=show,
    notes=(
        "Only purchases count; purchases by the user 'bot' and free items (price 0) are filtered out.",
        "Each product has one price, so a product's avg order is its price.",
        f"Every {MALFORMED_EVERY}th event is malformed on purpose: it goes to the dead-letter topic "
        "with the reason in its headers.",
    ),
)
