"""The benchmark job on Bytewax; runs in its own virtualenv (~/.cache/weir/bench/venv-bytewax).

1-minute tumbling windows (aligned to the epoch minute) on the ``ts`` field, count and sum
of ``price`` per message key, ``EventClock`` waiting 5 s, JSON results to the output topic.
One worker (``python -m bytewax.run bytewax_job:flow``), no recovery store (Bytewax's
default). Configured through environment variables because ``bytewax.run`` imports the
flow by name:

    WEIR_BENCH_BOOTSTRAP, WEIR_BENCH_INPUT, WEIR_BENCH_OUTPUT,
    WEIR_BENCH_TAIL (1: keep reading at the end of the topic; 0: stop there, which closes
    the remaining windows), WEIR_BENCH_CONSUMER_EXTRA (JSON librdkafka properties)

Bytewax keeps one clock per key: a key's windows close when that key's own event time (or
the system clock since its last event) passes their end + 5 s, or at the end of input.
Prints ``WEIR_BENCH_FIRST_RECORD_MS=<epoch ms>`` when the first record is decoded.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from bytewax import operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.operators import windowing as win
from confluent_kafka import OFFSET_BEGINNING

ALIGN = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW = timedelta(minutes=1)
WINDOW_MS = 60_000

_first = [True]


def parse(msg: Any) -> tuple[str, tuple[int, float]]:
    if _first[0]:
        _first[0] = False
        print(f"WEIR_BENCH_FIRST_RECORD_MS={int(time.time() * 1000)}", flush=True)
    v = orjson.loads(msg.value)
    return msg.key.decode(), (v["ts"], v["price"])


def event_time(v: tuple[int, float]) -> datetime:
    return ALIGN + timedelta(milliseconds=v[0])


def fold(acc: list[Any], v: tuple[int, float]) -> list[Any]:
    acc[0] += 1
    acc[1] += v[1]
    return acc


def merge(a: list[Any], b: list[Any]) -> list[Any]:
    return [a[0] + b[0], a[1] + b[1]]


def to_message(item: tuple[str, tuple[int, list[Any]]]) -> KafkaSinkMessage[bytes, bytes]:
    key, (window_id, (count, revenue)) = item
    start = window_id * WINDOW_MS
    value = orjson.dumps(
        {
            "key": key,
            "windowStartMs": start,
            "windowEndMs": start + WINDOW_MS,
            "count": count,
            "revenue": revenue,
        }
    )
    return KafkaSinkMessage(key.encode(), value)


def build() -> Dataflow:
    env = os.environ
    bootstrap = [env["WEIR_BENCH_BOOTSTRAP"]]
    flow = Dataflow("weir-bench")
    source = KafkaSource(
        bootstrap,
        [env["WEIR_BENCH_INPUT"]],
        tail=env.get("WEIR_BENCH_TAIL", "1") == "1",
        starting_offset=OFFSET_BEGINNING,
        add_config=json.loads(env.get("WEIR_BENCH_CONSUMER_EXTRA", "{}")),
    )
    records = op.map("parse", op.input("events", flow, source), parse)
    clock = win.EventClock(event_time, wait_for_system_duration=timedelta(seconds=5))
    windower = win.TumblingWindower(length=WINDOW, align_to=ALIGN)
    windows = win.fold_window("window", records, clock, windower, lambda: [0, 0.0], fold, merge)
    op.output(
        "results", op.map("format", windows.down, to_message), KafkaSink(bootstrap, env["WEIR_BENCH_OUTPUT"])
    )
    return flow


flow = build()
