"""Benchmark data: deterministic e-commerce events, the topic that holds them, and the expected answer.

The events are a pure function of ``(events, keys, seed)`` and ``GENERATOR_VERSION``, so
the reference result (count and sum of price per key and minute) is recomputed from the
generator instead of being read back from Kafka, and a topic written once is reused by
every later run with the same parameters (its name carries them all).

Event time. Event ``i`` is nominally at ``BASE_TS + i`` ms (1,000 events per second of
event time, so 1M events span ~17 minutes) and actually at ``nominal - jitter`` with
``jitter`` uniform in ``[0, OUT_OF_ORDER_MS)``. Whatever partition an event lands in, every
event before it in that partition has nominal time at most its own, so its event time is
above ``max seen - 5 s``: with ``maxOutOfOrderness: 5s`` no event is ever late, and any
dead letter or missing window in a run is a bug, not an artefact of the data.

Event times are in the past (January 2025) on purpose: after the last event, the worker's
``idleTimeout`` moves each partition's watermark to ``wall clock - 5 s``, which closes the
last windows, the way a replay of historical data ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from weir import kafka as kio

GENERATOR_VERSION = 1
BASE_TS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
OUT_OF_ORDER_MS = 5_000
WINDOW_MS = 60_000
SEED = 42

_TYPES = ("page_view", "add_to_cart", "purchase")
_TYPE_WEIGHTS = (70, 20, 10)


def topic_name(events: int, keys: int, partitions: int, seed: int = SEED) -> str:
    """The input topic for these parameters; a different generator version gets a new topic."""
    return f"weir-bench-events-v{GENERATOR_VERSION}-n{events}-k{keys}-p{partitions}-s{seed}"


def events(n: int, keys: int, seed: int = SEED) -> Iterator[tuple[str, int, float, bytes]]:
    """Yield ``(product_id, ts, price, json_value)`` for each of the ``n`` events, in production order."""
    rng = random.Random(seed)
    randrange, random_ = rng.randrange, rng.random
    dumps = orjson.dumps
    # Cumulative weights of the event types, for one random() per event instead of choices().
    total = sum(_TYPE_WEIGHTS)
    bounds = []
    acc = 0
    for w in _TYPE_WEIGHTS:
        acc += w
        bounds.append(acc / total)
    products = [f"p-{i}" for i in range(keys)]
    for i in range(n):
        product = products[randrange(keys)]
        ts = BASE_TS + i - randrange(OUT_OF_ORDER_MS)
        price = randrange(100, 20_000) / 100
        u = random_()
        kind = _TYPES[0] if u < bounds[0] else _TYPES[1] if u < bounds[1] else _TYPES[2]
        value = dumps(
            {
                "type": kind,
                "product_id": product,
                "price": price,
                "qty": 1 + randrange(3),
                "currency": "EUR",
                "user_id": f"u-{randrange(100_000)}",
                "ts": ts,
            }
        )
        yield product, ts, price, value


def reference(n: int, keys: int, seed: int = SEED) -> dict[tuple[str, int], tuple[int, float]]:
    """The expected result: ``(key, window start ms) -> (count, sum of price)``.

    Prices are summed in production order, which is also each key's order inside its
    partition (a key lives in one partition), so a correct run's float sums match exactly;
    the check still allows a relative error of 1e-9.
    """
    out: dict[tuple[str, int], list[Any]] = {}
    for product, ts, price, _ in events(n, keys, seed):
        k = (product, ts - ts % WINDOW_MS)
        acc = out.get(k)
        if acc is None:
            out[k] = [1, price]
        else:
            acc[0] += 1
            acc[1] += price
    return {k: (c, s) for k, (c, s) in out.items()}


def topic_size(admin: AdminClient, bootstrap: str, topic: str) -> tuple[int, int] | None:
    """``(partitions, records)`` of ``topic`` (records = sum of high - low offsets), or None if absent."""
    from confluent_kafka import Consumer, TopicPartition

    md = admin.list_topics(timeout=10).topics.get(topic)
    if md is None or md.error is not None:
        return None
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "weir-bench-probe", "enable.auto.commit": False}
    )
    try:
        records = 0
        for p in md.partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            records += hi - lo
        return len(md.partitions), records
    finally:
        consumer.close()


def create_topic(admin: AdminClient, topic: str, partitions: int) -> None:
    """Create ``topic`` empty, deleting a previous one of that name first."""
    kio.recreate_topics(admin, {topic: partitions})


def ensure_input(
    bootstrap: str, n: int, keys: int, partitions: int, seed: int = SEED, log: Any = print
) -> str:
    """Make sure the input topic holds exactly the ``n`` generated events; write them if not.

    Returns the topic name. A topic with the right name but the wrong partition or record
    count (an interrupted earlier write) is deleted and written again.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = topic_name(n, keys, partitions, seed)
    size = topic_size(admin, bootstrap, topic)
    if size == (partitions, n):
        log(f"reusing input topic {topic} ({n:,} events)")
        return topic
    if size is not None:
        log(
            f"input topic {topic} has {size[1]:,} records in {size[0]} partitions, want {n:,} in "
            f"{partitions}: rewriting"
        )
    create_topic(admin, topic, partitions)
    log(f"writing {n:,} events over {keys:,} keys to {topic} ...")
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.num.messages": 10_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
            "enable.idempotence": True,
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )
    started = time.monotonic()
    nbytes = 0
    for product, _ts, _price, value in events(n, keys, seed):
        nbytes += len(value)
        key = product.encode()
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(120)
    if remaining or failures:
        raise RuntimeError(f"writing {topic} failed: {remaining} undelivered; {failures[:3]}")
    size = topic_size(admin, bootstrap, topic)
    if size != (partitions, n):
        raise RuntimeError(f"{topic} holds {size} after writing, want ({partitions}, {n})")
    log(f"wrote {n:,} events ({nbytes / n:.0f} bytes each on average) in {time.monotonic() - started:.1f} s")
    return topic
