"""`weir demo`: simulated e-commerce events through the revenue-per-minute example job.

The demo owns its topics on the broker it is pointed at: each run deletes and recreates
them (and the job's consumer group), so every run starts from nothing. Event time runs at
60x: one wall-clock second is one minute of shop time, so a one-minute window closes
about every second.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from weir import kafka as kio
from weir.spec import load_job
from weir.worker import Worker, WorkerSettings, plan_for

SPEED = 60
PRODUCTS = [f"p-{i}" for i in range(1, 21)]
PRICES = {p: round(random.Random(p).uniform(5, 120), 2) for p in PRODUCTS}


def example_manifest() -> Path:
    return Path(str(resources.files("weir") / "examples" / "revenue.yaml"))


def _recreate(admin: AdminClient, topics: dict[str, int], group: str) -> None:
    """Start from nothing: the demo's topics empty and its consumer group gone."""
    try:
        for f in admin.delete_consumer_groups([group], request_timeout=10).values():
            f.result(timeout=10)
    except Exception:  # noqa: BLE001 - the group does not exist on a first run
        pass
    kio.recreate_topics(admin, topics)


def _generate(bootstrap: str, topic: str, rate: int, stop: threading.Event, counts: dict[str, int]) -> None:
    rng = random.Random(7)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    # Shop time starts two hours ago (aligned to a minute) and runs at SPEED x wall time.
    origin_wall = time.time()
    origin_shop = (int(origin_wall * 1000) - 2 * 3_600_000) // 60_000 * 60_000
    sent = 0
    while not stop.is_set():
        due = int((time.time() - origin_wall) * rate)
        while sent < due:
            now_shop = origin_shop + int((time.time() - origin_wall) * SPEED * 1000)
            ts = now_shop - rng.randint(0, 3000)  # up to 3 s out of order
            user = f"u-{rng.randint(1, 500)}"
            kind = rng.choices(["page_view", "add_to_cart", "purchase"], [70, 20, 10])[0]
            product = rng.choice(PRODUCTS)
            event: dict[str, Any] = {"type": kind, "product_id": product, "user_id": user, "ts": ts}
            if kind == "purchase":
                event["price"] = PRICES[product]
            value = orjson.dumps(event)
            if sent % 5000 == 4999:
                value = b'{"type": "purchase", "product_id": "p-1", "price": "free"'  # malformed, on purpose
            producer.produce(topic, value, user.encode())
            sent += 1
            if sent % 1000 == 0:
                producer.poll(0)
        time.sleep(0.01)
    producer.flush(10)
    counts["events"] = sent


def main(bootstrap: str, duration: float, rate: int) -> int:
    job = load_job(example_manifest())
    plan = plan_for(job)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    kafka = kio.KafkaSettings(bootstrap_servers=bootstrap, consumer={}, producer={}, connect_timeout_s=20)
    try:
        kio.wait_for_broker(admin, kafka)
    except kio.KafkaUnavailable as exc:
        print(f"{exc}\nStart the dev broker with `make services-up`, or use `make demo`.")
        return 3
    topics = {t: 4 for t in plan.source_topics}
    topics[plan.sink_topic] = 1
    if plan.dead_letter_topic:
        topics[plan.dead_letter_topic] = 1
    if plan.repartition_topic:
        topics[plan.repartition_topic] = plan.repartition_partitions or 4
    _recreate(admin, topics, plan.group_id)
    print(
        f"weir demo: {rate} events/s into '{plan.source_topics[0]}' at {SPEED}x shop time; "
        f"revenue per product per minute from '{plan.sink_topic}'. Ctrl-C stops.\n"
    )
    print(f"{'minute':<13} {'product':<8} {'orders':>6} {'revenue':>10} {'avg order':>10}")

    def show(r: dict[str, Any]) -> None:
        minute = r["windowStart"][11:16] + "-" + r["windowEnd"][11:16]
        print(
            f"{minute:<13} {r['key']:<8} {r['orders']:>6} {r['revenue']:>10.2f} {r['averageOrder']:>10.2f}",
            flush=True,
        )

    stop = threading.Event()
    counts: dict[str, int] = {}
    generator = threading.Thread(
        target=_generate, args=(bootstrap, plan.source_topics[0], rate, stop, counts), daemon=True
    )
    with tempfile.TemporaryDirectory(prefix="weir-demo-") as state:
        worker = Worker(
            plan,
            kafka,
            WorkerSettings(index=0, count=1, state_dir=Path(state), checkpoint_interval_s=2),
            on_result=show,
        )
        worker.install_signal_handlers()
        timer = threading.Timer(duration, worker.stop)
        timer.daemon = True
        generator.start()
        timer.start()
        try:
            code = worker.run()
        finally:
            timer.cancel()
            stop.set()
            generator.join(15)
    status = worker.status()
    print(
        f"\n{counts.get('events', 0)} events produced, {status.get('recordsIn', 0)} records processed "
        f"(both stages), {status.get('recordsOut', 0)} window results; dead-lettered: "
        f"{status.get('deadLettered') or 'none'} (in '{plan.dead_letter_topic}', with the reason)."
    )
    return code
