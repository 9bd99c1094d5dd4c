"""Benchmark data: deterministic e-commerce events, the topic that holds them, and the expected answer.

The events are a pure function of ``(events, keys, seed)`` and ``GENERATOR_VERSION``, so
the reference result (count and sum of price per key and minute) is recomputed from the
generator instead of being read back from Kafka, and a topic written once is reused by
every later run with the same parameters (its name carries them all).

Event time. Event ``i`` is nominally at ``BASE_TS + i`` ms (1,000 events per second of
event time, so 2M events span ~33 minutes) and actually at ``nominal - jitter`` with
``jitter`` uniform in ``[0, DISORDER_MS)``, 4 s. Whatever partition an event lands in, every
event before it in that partition has nominal time at most its own, so its event time is
above ``max seen - 4 s``. The job allows 5 s of out-of-orderness (``OUT_OF_ORDER_MS``),
so no event is ever late, and any dropped or dead-lettered event is a bug of the runner.

Why 1 s of slack between the data's disorder and the job's bound: Bytewax's ``EventClock``
keeps one watermark per key that also advances with the system clock between that key's
events (``max seen - 5 s + system time since``). With disorder right up to the bound, a
key whose next event comes a few milliseconds of processing later would see it dropped as
late; the slack keeps every runner's answer exact on the same data.

End of input. After the ``n`` events, one more record per partition (key ``END_KEY``, an
event time ``END_GAP_MS`` past the last event) moves every partition's event time past
the last real window's end plus the bound. A runner closes the last windows from the data
alone, the way a live stream would, instead of through idle timeouts or end-of-input
handling that differ between runners. Results for ``END_KEY`` are ignored.

Event times are in the past (January 2025) on purpose: when weir's ``idleTimeout`` moves a
quiet partition's watermark to ``wall clock - 5 s``, nothing real is still open.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from weir import kafka as kio

GENERATOR_VERSION = 2
BASE_TS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
OUT_OF_ORDER_MS = 5_000  # the job's bound (every runner's watermark / grace)
DISORDER_MS = 4_000  # the data's actual disorder: 1 s below the bound, see the module docstring
WINDOW_MS = 60_000
SEED = 42
END_KEY = "~end"
END_GAP_MS = 2 * WINDOW_MS
DEFAULT_EVENTS = 2_000_000

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
        ts = BASE_TS + i - randrange(DISORDER_MS)
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


def end_value(n: int) -> bytes:
    """The end-of-input record written to every partition after ``n`` events."""
    return orjson.dumps(
        {
            "type": "end",
            "product_id": END_KEY,
            "price": 0.0,
            "qty": 0,
            "currency": "EUR",
            "user_id": "-",
            "ts": BASE_TS + n + END_GAP_MS,
        }
    )


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


def produce(
    bootstrap: str,
    topic: str,
    items: Iterable[tuple[str, int, float, bytes]],
    end: tuple[bytes, int] | None = None,
) -> tuple[int, int]:
    """Write ``items`` (from ``events``: key, event time, price, value) to ``topic`` keyed by
    their key; returns ``(count, value bytes)``.

    With ``end=(value, partitions)``, one end-of-input record (``value``, key ``END_KEY``)
    follows in every partition, written only after every event was delivered (so it comes
    after them all).
    The default partitioner puts a key in the same partition whichever call writes it, so
    events written in several calls keep each key's order.
    """
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
    count = nbytes = 0
    for product, _ts, _price, value in items:
        count += 1
        nbytes += len(value)
        key = product.encode()
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    # Flush first: every partition's end record must come after all of its events.
    remaining = producer.flush(120)
    if end is not None:
        last, partitions = end
        for p in range(partitions):
            producer.produce(topic, last, END_KEY.encode(), partition=p)
        remaining += producer.flush(120)
    if remaining or failures:
        raise RuntimeError(f"writing {topic} failed: {remaining} undelivered; {failures[:3]}")
    return count, nbytes


def ensure_input(
    bootstrap: str, n: int, keys: int, partitions: int, seed: int = SEED, log: Any = print
) -> str:
    """Make sure the input topic holds exactly the ``n`` generated events; write them if not.

    Returns the topic name. The topic holds ``n + partitions`` records: the events and one
    end-of-input record per partition. A topic with the right name but the wrong partition
    or record count (an interrupted earlier write) is deleted and written again.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = topic_name(n, keys, partitions, seed)
    size = topic_size(admin, bootstrap, topic)
    if size == (partitions, n + partitions):
        log(f"reusing input topic {topic} ({n:,} events)")
        return topic
    if size is not None:
        log(
            f"input topic {topic} has {size[1]:,} records in {size[0]} partitions, want "
            f"{n + partitions:,} in {partitions}: rewriting"
        )
    create_topic(admin, topic, partitions)
    log(f"writing {n:,} events over {keys:,} keys to {topic} ...")
    started = time.monotonic()
    _, nbytes = produce(bootstrap, topic, events(n, keys, seed), end=(end_value(n), partitions))
    size = topic_size(admin, bootstrap, topic)
    if size != (partitions, n + partitions):
        raise RuntimeError(f"{topic} holds {size} after writing, want ({partitions}, {n + partitions})")
    log(f"wrote {n:,} events ({nbytes / n:.0f} bytes each on average) in {time.monotonic() - started:.1f} s")
    return topic


class LiveProducer:
    """Writes events at a fixed rate for the latency run, with event time running ``speedup`` x wall time.

    Event time is ``base_ts + (now - start) * speedup`` minus the same ``[0, DISORDER_MS)``
    jitter as the recorded data, so a 1-minute window passes every ``60 / speedup`` seconds
    and the latency run sees many windows close in a short run. Each event goes to the
    partition ``crc32(key) % partitions``, chosen here so the benchmark knows, per partition,
    when its event time passed a window's end (the ideal close time).

    ``log`` holds one ``(wall time of produce(), partition, key, ts, price)`` per event, in
    production order. Runs in its own thread: ``start()``, ``stop()``.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int,
        keys: int,
        rate: float,
        speedup: float,
        base_ts: int,
        seed: int = SEED,
    ) -> None:
        import threading
        import zlib

        self.topic, self.rate, self.speedup, self.base_ts = topic, rate, speedup, base_ts
        self.products = [f"p-{i}" for i in range(keys)]
        self.encoded = [p.encode() for p in self.products]
        self.partition_of = [zlib.crc32(k) % partitions for k in self.encoded]
        self.rng = random.Random(seed)
        self.log: list[tuple[float, int, str, int, float]] = []
        self.failures: list[str] = []
        self.t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-producer", daemon=True)

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                self.failures.append(str(err))

        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 5,
                "compression.type": "lz4",
                "enable.idempotence": True,
                "delivery.report.only.error": True,
                "on_delivery": on_delivery,
            }
        )

    def event_time(self, wall: float) -> int:
        """The nominal event time (before jitter) at wall-clock time ``wall``."""
        return self.base_ts + int((wall - self.t0) * self.speedup * 1000)

    def start(self) -> None:
        self.t0 = time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        remaining = self.producer.flush(30)
        if remaining or self.failures:
            raise RuntimeError(f"live producer: {remaining} undelivered; {self.failures[:3]}")

    def _run(self) -> None:
        randrange, produce, poll = self.rng.randrange, self.producer.produce, self.producer.poll
        log, keys = self.log, len(self.products)
        topic, dumps = self.topic, orjson.dumps
        sent = 0
        while not self._stop.is_set():
            now = time.time()
            due = int((now - self.t0) * self.rate) - sent
            nominal = self.event_time(now)
            for _ in range(due):
                k = randrange(keys)
                ts = nominal - randrange(DISORDER_MS)
                price = randrange(100, 20_000) / 100
                value = dumps(
                    {
                        "type": "purchase",
                        "product_id": self.products[k],
                        "price": price,
                        "qty": 1,
                        "currency": "EUR",
                        "user_id": f"u-{randrange(100_000)}",
                        "ts": ts,
                    }
                )
                p = self.partition_of[k]
                while True:
                    try:
                        produce(topic, value, self.encoded[k], partition=p)
                        break
                    except BufferError:
                        poll(0.01)
                log.append((now, p, self.products[k], ts, price))
            sent += max(due, 0)
            poll(0)
            time.sleep(0.004)
