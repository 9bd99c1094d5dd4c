"""Revenue anomalies per product: a sliding 5-minute revenue compared with the product's own history.

The job (``anomalies.yaml``) keeps purchases, keys them by product and runs ``RevenueAnomalies``:

- Revenue is summed per product and event-time minute (integer cents, so the sums do not
  depend on the order records arrive in) in map state; a purchase in minute ``m`` registers
  a timer at the last millisecond of each sliding window that contains ``m`` (5-minute
  windows every minute: ends ``m+1m`` … ``m+5m``).
- When the watermark reaches a window's end, the timer sums the window's minutes and compares
  the sum with the product's exponentially weighted mean and deviation (value state, updated
  once per window, in window-end order): after ``WARMUP`` windows, a window whose revenue is
  above ``mean + K·deviation`` gives one alert record::

      {"product_id": "p-3", "windowStart": "2024-01-01T00:30:00.000Z",
       "windowEnd": "2024-01-01T00:35:00.000Z", "windowStartMs": ..., "windowEndMs": ...,
       "revenue": 2890.4, "orders": 52, "mean": 610.02, "deviation": 45.1, "threshold": 745.32}

  Every window then updates the history, alerting or not (``mean += ALPHA * d``,
  ``var = (1 - ALPHA) * (var + d * ALPHA * d)`` with ``d = revenue - mean``; the first window
  sets the mean).
  As with a declarative sliding window, a window exists only when it holds a purchase: a
  product without purchases for five minutes skips windows rather than seeing zeros.

Why a process function and not ``window`` + ``aggregate`` + a process step: a pipeline has a
window or a process step, not both (``weir.spec_pipeline``), so the function keeps the
per-minute buckets itself and its timers play the window's part.

A purchase whose minute has already closed (the watermark passed the minute's end, so a window
holding it has been judged) would change history already used: the function raises
``LateRecord`` and the purchase goes to the dead-letter topic as ``function_error``. Records
out of order by less than ``maxOutOfOrderness`` are never late, and then the output depends on
event time only, not on arrival order or batching.

``generate`` makes the shop's event stream with a spike (``SPIKE_PRODUCT``'s purchases x10 from
``SPIKE_AFTER_MS`` after the start, for ``SPIKE_FOR_MS``); ``reference`` computes the alerts
independently (brute-force window sums over the list).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from weir.examples import Example, Record
from weir.process import Context, KeyedState, ProcessFunction
from weir.results import iso

__all__ = ["EXAMPLE", "LateRecord", "RevenueAnomalies", "generate", "reference"]

MINUTE = 60_000


class LateRecord(ValueError):
    """A purchase for a minute whose windows have started to be judged."""


class RevenueAnomalies(ProcessFunction):
    """Alert when a product's revenue over ``WINDOW_MS`` (sliding by ``SLIDE_MS``) is above its
    exponentially weighted mean + ``K`` deviations, after ``WARMUP`` windows.

    Subclass to change the constants; ``WINDOW_MS`` must be a multiple of ``SLIDE_MS``.
    Input records need a numeric ``price``; ``ctx.key`` is the product.
    """

    WINDOW_MS = 5 * MINUTE
    SLIDE_MS = MINUTE
    ALPHA = 0.1
    K = 3.0
    WARMUP = 10

    def open(self, state: KeyedState) -> None:
        self.buckets = state.map("buckets")  # slide start -> [cents, orders]
        self.history = state.value("history")  # [windows seen, mean cents, variance cents²]

    def process(self, record: dict[str, Any], ctx: Context) -> None:
        price = record["price"]
        if not isinstance(price, int | float) or isinstance(price, bool):
            raise TypeError(f"price must be a number, got {price!r}")
        start = ctx.timestamp - ctx.timestamp % self.SLIDE_MS
        if ctx.watermark >= start + self.SLIDE_MS - 1:
            raise LateRecord(
                f"event time {ctx.timestamp} is in a minute the watermark ({ctx.watermark}) has closed"
            )
        cents, orders = self.buckets.get(start, [0, 0])
        self.buckets.put(start, [cents + round(price * 100), orders + 1])
        for end in range(start + self.SLIDE_MS, start + self.WINDOW_MS + 1, self.SLIDE_MS):
            ctx.timers.register(end - 1)

    def on_timer(self, timestamp: int, ctx: Context) -> Iterator[dict[str, Any]]:
        end = timestamp + 1
        start = end - self.WINDOW_MS
        cents = orders = 0
        for bucket, (c, n) in self.buckets.items():
            if bucket < start + self.SLIDE_MS:
                self.buckets.remove(bucket)  # no later window holds it
            if start <= bucket < end:
                cents += c
                orders += n
        if orders == 0:
            return
        seen, mean, var = self.history.get() or [0, 0.0, 0.0]
        deviation = math.sqrt(var)
        threshold = mean + self.K * deviation
        if seen >= self.WARMUP and cents > threshold:
            yield _alert(ctx.key, start, end, cents, orders, mean, deviation, threshold)
        if seen == 0:
            mean, var = float(cents), 0.0
        else:
            diff = cents - mean
            step = self.ALPHA * diff
            mean, var = mean + step, (1 - self.ALPHA) * (var + diff * step)
        self.history.set([seen + 1, mean, var])


def _alert(
    product: str,
    start: int,
    end: int,
    cents: int,
    orders: int,
    mean: float,
    deviation: float,
    threshold: float,
) -> dict[str, Any]:
    return {
        "product_id": product,
        "windowStart": iso(start),
        "windowEnd": iso(end),
        "windowStartMs": start,
        "windowEndMs": end,
        "revenue": cents / 100,
        "orders": orders,
        "mean": round(mean / 100, 2),
        "deviation": round(deviation / 100, 2),
        "threshold": round(threshold / 100, 2),
    }


# --------------------------------------------------------------------------- the data

TOPIC = "events"
PRODUCTS = ("p-1", "p-2", "p-3", "p-4", "p-5", "p-6", "p-7", "p-8")
POPULARITY = (24, 18, 15, 12, 10, 8, 7, 6)
PRICES = {p: round(random.Random(f"anomalies {p}").uniform(5, 120), 2) for p in PRODUCTS}
KINDS = ("page_view", "add_to_cart", "purchase")
KIND_WEIGHTS = (55, 20, 25)
SPIKE_PRODUCT = "p-3"
SPIKE_AFTER_MS = 30 * MINUTE
SPIKE_FOR_MS = 4 * MINUTE
SPIKE_FACTOR = 10
DISORDER_MS = 3_000
"""Records are at most this far behind the newest one (the manifest allows 5 s)."""
MALFORMED_EVERY = 2_000
MALFORMED = b'{"type": "purchase", "product_id": "p-1", "price": '


def generate(
    seed: int,
    start_ms: int,
    step_ms: int,
    spike_after_ms: int = SPIKE_AFTER_MS,
    spike_for_ms: int = SPIKE_FOR_MS,
) -> Iterator[Record]:
    """The shop's events keyed by user: page views, carts and purchases of ``PRODUCTS`` (each at
    its fixed price, some products more popular), one every ``step_ms`` of event time, a fifth
    of them up to ``DISORDER_MS`` late. From ``start_ms + spike_after_ms`` for ``spike_for_ms``
    every purchase of ``SPIKE_PRODUCT`` comes with ``SPIKE_FACTOR - 1`` more (other users, same
    time). Every ``MALFORMED_EVERY``-th record is malformed JSON (dead-lettered)."""
    rng = random.Random(seed)
    spike_start, spike_end = start_ms + spike_after_ms, start_ms + spike_after_ms + spike_for_ms
    sent = 0
    t = start_ms
    while True:
        ts = t - rng.randrange(DISORDER_MS) if sent and rng.random() < 0.2 else t
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        product = rng.choices(PRODUCTS, POPULARITY)[0]
        copies = (
            SPIKE_FACTOR
            if kind == "purchase" and product == SPIKE_PRODUCT and spike_start <= ts < spike_end
            else 1
        )
        for _ in range(copies):
            user = f"u-{rng.randint(1, 500)}"
            event: dict[str, Any] = {"type": kind, "product_id": product, "user_id": user, "ts": ts}
            if kind == "purchase":
                event["price"] = PRICES[product]
            sent += 1
            if sent % MALFORMED_EVERY == 0:
                yield Record(TOPIC, user, None, raw=MALFORMED)
            yield Record(TOPIC, user, event)
        t += step_ms


# --------------------------------------------------------------------------- the reference


def reference(
    records: Sequence[Record],
    window_ms: int = RevenueAnomalies.WINDOW_MS,
    slide_ms: int = RevenueAnomalies.SLIDE_MS,
    alpha: float = RevenueAnomalies.ALPHA,
    k: float = RevenueAnomalies.K,
    warmup: int = RevenueAnomalies.WARMUP,
) -> list[dict[str, Any]]:
    """The alerts the job writes for ``records`` once the watermark has passed them all.

    Brute force: a product's windows end at every multiple of ``slide_ms`` within ``window_ms``
    after one of its purchases; each window's revenue is summed over the purchases in it, then
    the windows are judged in end order against the history before them. Purchases are what the
    manifest's filters keep: ``type`` purchase and a numeric ``price`` above 0. Exact when no
    record is late (out of order by less than the job's maxOutOfOrderness).
    """
    purchases: dict[str, list[tuple[int, int]]] = {}
    for r in records:
        v = r.value
        if r.raw is not None or v is None or v.get("type") != "purchase":
            continue
        price = v.get("price")
        if isinstance(price, bool) or not isinstance(price, int | float) or price <= 0:
            continue
        purchases.setdefault(v["product_id"], []).append((v["ts"], round(price * 100)))
    out = []
    for product, items in sorted(purchases.items()):
        items.sort()
        times = [ts for ts, _c in items]
        ends = sorted(
            {ts - ts % slide_ms + n * slide_ms for ts in times for n in range(1, window_ms // slide_ms + 1)}
        )
        seen, mean, var = 0, 0.0, 0.0
        for end in ends:
            inside = items[bisect.bisect_left(times, end - window_ms) : bisect.bisect_left(times, end)]
            if not inside:
                continue
            cents = sum(c for _ts, c in inside)
            deviation = math.sqrt(var)
            threshold = mean + k * deviation
            if seen >= warmup and cents > threshold:
                out.append(
                    _alert(product, end - window_ms, end, cents, len(inside), mean, deviation, threshold)
                )
            if seen == 0:
                mean = float(cents)
            else:
                diff = cents - mean
                mean, var = mean + alpha * diff, (1 - alpha) * (var + diff * (alpha * diff))
            seen += 1
    return out


# --------------------------------------------------------------------------- the demo

HEADER = f"{'window':<13} {'product':<8} {'revenue':>10} {'mean':>10} {'threshold':>10} {'orders':>6}"


def show(r: dict[str, Any]) -> str:
    window = r["windowStart"][11:16] + "-" + r["windowEnd"][11:16]
    return (
        f"{window:<13} {r['product_id']:<8} {r['revenue']:>10.2f} {r['mean']:>10.2f} "
        f"{r['threshold']:>10.2f} {r['orders']:>6}"
    )


EXAMPLE = Example(
    name="anomalies",
    summary="revenue anomalies: a product's 5-minute revenue far above its history (process function)",
    manifest="anomalies.yaml",
    generate=generate,
    reference=reference,
    header=HEADER,
    show=show,
    notes=(
        f"Only alerts are printed: a product's revenue over 5 minutes (every minute) above its mean + "
        f"{RevenueAnomalies.K:g} deviations, after {RevenueAnomalies.WARMUP} windows of warm-up.",
        f"{SPIKE_PRODUCT}'s purchases are multiplied by {SPIKE_FACTOR} from shop time "
        f"+{SPIKE_AFTER_MS // MINUTE} to +{(SPIKE_AFTER_MS + SPIKE_FOR_MS) // MINUTE} minutes "
        "(about half a minute into the demo at 60x): its alerts appear then.",
    ),
)
