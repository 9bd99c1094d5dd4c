"""The e-commerce click stream of the funnel, active-users and sessions examples: a generator.

A population of users visits the shop. A visit is a burst of 1-8 page views 5-60 s apart; a
viewed product goes into the cart with probability 1/4, and at the end of the visit each
carted product is bought with probability 2/5. Between visits a user pauses: 35 % of pauses
are short (3-28 min, so a 30-minute session gap joins the two visits into one session), the
rest long (32 min to 3 h, so they split). Each record is a JSON object::

    {"type": "add_to_cart", "user_id": "u-17", "product_id": "p-3", "price": 19.99,
     "shop": "demo-shop", "ts": 1704067201234}

``price`` only on add_to_cart and purchase records; ``shop`` is the same for every record
(one shop: the funnel and active-users jobs count the whole shop under that key). Records
are keyed by ``user_id``. One record in ten is sent up to 3 s after its event time (a slow
mobile client), so records are out of order by less than the manifests' 5 s bound; one in
every ``MALFORMED_EVERY`` is malformed JSON on purpose (it must reach the dead-letter topic).

The population is sized from ``step_ms`` so that the whole stream produces about one record
per ``step_ms`` of event time (a user makes about ``EVENTS_PER_VISIT`` records per
``CYCLE_MS``); each user starts at a random point of its cycle, drawn as at equilibrium, and
the stream begins in the middle of the visits under way, so the rate is steady from the first
record.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from typing import Any

from weir.examples import Record

__all__ = ["GAP_MS", "SHOP", "TOPIC", "events", "generate"]

TOPIC = "events"
SHOP = "demo-shop"
PRODUCTS = [f"p-{i}" for i in range(1, 21)]
PRICES = {p: round(random.Random(p).uniform(5, 120), 2) for p in PRODUCTS}
MALFORMED_EVERY = 5_000
GAP_MS = 30 * 60_000
"""The sessions example's gap; the pauses below are drawn on both sides of it."""

_MINUTE = 60_000
_SHORT_PAUSE = (3 * _MINUTE, 28 * _MINUTE)
_LONG_PAUSE = (32 * _MINUTE, 180 * _MINUTE)
_SHORT_SHARE = 0.35
_WARM_UP_MS = 15 * _MINUTE
"""Longer than any visit (at most 8 views 60 s apart, 16 carts and purchases 20 s apart)."""
EVENTS_PER_VISIT = 4.5 * (1 + 0.25 + 0.25 * 0.4)
"""Mean page views (uniform 1-8) times (1 + carts per view + purchases per view)."""
CYCLE_MS = int(
    2.5 * _MINUTE  # a visit: about 3.5 gaps of ~32 s between views, plus carts and purchases
    + _SHORT_SHARE * sum(_SHORT_PAUSE) / 2
    + (1 - _SHORT_SHARE) * sum(_LONG_PAUSE) / 2
)
"""Mean time from one visit's start to the next one's."""


def generate(seed: int, start_ms: int, step_ms: int) -> Iterator[Record]:
    """The endless stream for ``seed`` (the ``weir.examples.Generator`` contract), ``TOPIC`` only."""
    for n, event in enumerate(events(seed, start_ms, step_ms), start=1):
        if n % MALFORMED_EVERY == 0:
            yield Record(TOPIC, event["user_id"], None, raw=b'{"type": "page_view", "user_id": ')
        else:
            yield Record(TOPIC, event["user_id"], event)


def events(seed: int, start_ms: int, step_ms: int) -> Iterator[dict[str, Any]]:
    """The events ``generate`` sends, in sending order (ts may lag its place by up to 3 s)."""
    rng = random.Random(seed)
    users = max(10, round(CYCLE_MS / (EVENTS_PER_VISIT * max(step_ms, 1))))
    # (send time, user index, that user's remaining events of the current visit)
    heap: list[tuple[int, int, list[dict[str, Any]]]] = []
    # Users start _WARM_UP_MS early and what they do before start_ms is dropped: at start_ms
    # some are in the middle of a visit, as at any other time, so the first minutes are not
    # emptier than the later ones.
    for i in range(users):
        first = start_ms - _WARM_UP_MS + _time_to_next_visit(rng)
        heap.append((first, i, _visit(rng, f"u-{i}", first)))
    heapq.heapify(heap)
    while True:
        sent, i, visit = heap[0]
        event = visit.pop()  # the visit is built in reverse: pop() takes the earliest
        if sent >= start_ms and rng.random() < 0.1:
            event = {**event, "ts": max(start_ms, event["ts"] - rng.randrange(3_000))}
        if visit:
            heapq.heapreplace(heap, (visit[-1]["ts"], i, visit))
        else:
            low, high = _SHORT_PAUSE if rng.random() < _SHORT_SHARE else _LONG_PAUSE
            start = sent + rng.randrange(low, high)
            heapq.heapreplace(heap, (start, i, _visit(rng, event["user_id"], start)))
        if sent >= start_ms:
            yield event


def _time_to_next_visit(rng: random.Random) -> int:
    """How long a user seen at a random instant waits for its next visit (visits themselves are
    short enough to ignore): the rest of a pause drawn in proportion to its length, as in a
    renewal process at equilibrium, so the stream starts at its steady rate."""
    short = _SHORT_SHARE * sum(_SHORT_PAUSE)
    long = (1 - _SHORT_SHARE) * sum(_LONG_PAUSE)
    low, high = _SHORT_PAUSE if rng.random() * (short + long) < short else _LONG_PAUSE
    length = math.sqrt(low * low + rng.random() * (high * high - low * low))  # density in proportion to x
    return int(rng.random() * length)


def _visit(rng: random.Random, user: str, start: int) -> list[dict[str, Any]]:
    """One visit's events from ``start``, latest first."""
    out: list[dict[str, Any]] = []
    ts = start
    cart: list[str] = []
    for view in range(rng.randint(1, 8)):
        if view:
            ts += rng.randrange(5_000, 60_000)
        product = rng.choice(PRODUCTS)
        out.append(_event("page_view", user, product, ts))
        if rng.random() < 0.25:
            ts += rng.randrange(2_000, 20_000)
            out.append(_event("add_to_cart", user, product, ts))
            cart.append(product)
    for product in cart:
        if rng.random() < 0.4:
            ts += rng.randrange(2_000, 20_000)
            out.append(_event("purchase", user, product, ts))
    out.reverse()
    return out


def _event(kind: str, user: str, product: str, ts: int) -> dict[str, Any]:
    event: dict[str, Any] = {"type": kind, "user_id": user, "product_id": product}
    if kind != "page_view":
        event["price"] = PRICES[product]
    event["shop"] = SHOP
    event["ts"] = ts
    return event
