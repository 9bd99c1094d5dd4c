"""`weir demo`: simulated e-commerce events through the revenue-per-minute example job.

The job runs the way a user runs it on a laptop: through `weir up`, the local platform
(the operator's reconciler with worker subprocesses and a file:// checkpoint store). The
demo produces the events and prints the results as they become readable (read_committed:
with exactly-once they appear at each checkpoint).

The demo owns its topics on the broker it is pointed at: each run deletes and recreates
them (and the job's consumer group), so every run starts from nothing. Event time runs at
60x: one wall-clock second is one minute of shop time, so a one-minute window closes
about every second.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from weir import kafka as kio
from weir.config import Environment, KafkaSecurityInputs
from weir.graph import compile_job
from weir.spec import load_job

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


def _generate(
    kafka: kio.KafkaSettings, topic: str, rate: int, stop: threading.Event, counts: dict[str, int]
) -> None:
    rng = random.Random(7)
    producer: Producer = kio.new_producer({**kio.client_config(kafka), "linger.ms": 20})
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


def main(bootstrap: str, duration: float, rate: int, security: KafkaSecurityInputs | None = None) -> int:
    """Run the demo against ``bootstrap``; ``security`` (``weir demo``'s flags) overrides the
    environment's Kafka security settings, for the demo's own clients and its worker alike."""
    job = load_job(example_manifest())
    plan = compile_job(job)
    flags = security or KafkaSecurityInputs()
    kafka = kio.KafkaSettings(
        bootstrap_servers=bootstrap,
        consumer={},
        producer={},
        connect_timeout_s=20,
        security=kio.security(job.spec.kafka, flags, Environment.read().kafka_security),
    )
    try:
        admin = kio.admin(kafka)
        kio.wait_for_broker(admin, kafka)
    except kio.KafkaUnavailable as exc:
        print(f"{exc}\nStart the dev broker with `make services-up`, or use `make demo`.")
        return 3
    except kio.KafkaAuthFailed as exc:
        print(exc)
        return 4
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
        target=_generate, args=(kafka, plan.source_topics[0], rate, stop, counts), daemon=True
    )
    done = threading.Event()
    follower = threading.Thread(
        target=_follow, args=(kafka, plan.sink_topic, show, done, counts), daemon=True
    )
    with tempfile.TemporaryDirectory(prefix="weir-demo-") as state:
        command = [
            sys.executable, "-m", "weir", "up", str(example_manifest()),
            "--bootstrap-servers", bootstrap, "--state-dir", state,
            "--duration", f"{duration:g}", "--interval", "15", "--log-level", "WARNING",
        ]
        generator.start()
        follower.start()
        # The worker (a `weir run` under `weir up`) reads the same settings from its environment.
        up = subprocess.Popen(command, env={**os.environ, **flags.environment()})
        try:
            code = up.wait()
        except KeyboardInterrupt:  # the child has the same Ctrl-C: it savepoints and stops
            code = up.wait()
        finally:
            stop.set()
            generator.join(15)
            time.sleep(1.0)  # the last results were committed by the stop-savepoint
            done.set()
            follower.join(15)
    dead = _count(kafka, plan.dead_letter_topic) if plan.dead_letter_topic else 0
    print(
        f"\n{counts.get('events', 0)} events produced, {counts.get('results', 0)} window results read; "
        f"{dead} records dead-lettered (in '{plan.dead_letter_topic}', each with its reason in the headers)."
    )
    return code


def _consumer(kafka: kio.KafkaSettings) -> Consumer:
    return kio.new_consumer(
        {
            **kio.client_config(kafka),
            "group.id": f"weir-demo-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )


def _follow(
    kafka: kio.KafkaSettings, topic: str, show: Any, done: threading.Event, counts: dict[str, int]
) -> None:
    """Print each result as soon as it is committed."""
    consumer = _consumer(kafka)
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        while not done.is_set():
            for m in consumer.consume(500, timeout=0.2):
                value = m.value()
                if m.error() is None and value is not None:
                    show(orjson.loads(value))
                    counts["results"] = counts.get("results", 0) + 1
    finally:
        consumer.close()


def _count(kafka: kio.KafkaSettings, topic: str) -> int:
    consumer = _consumer(kafka)
    try:
        lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        return max(0, hi - lo)
    except KafkaException:
        return 0
    finally:
        consumer.close()
