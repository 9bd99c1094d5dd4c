"""Where weir's time per record goes: stage timings on in-memory records, and cProfile of a real worker.

Runs in the project's virtualenv (it imports weir's internals: the generated ``prepare``,
``WindowOperator``, ``Worker._process``), on the first ``PROFILE_EVENTS`` events of the
benchmark's data (the generator is deterministic, so they are the same events).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import generate
import measure
import orjson
import runners

RUN_TIMEOUT_S = 900.0

PROFILE_EVENTS = 200_000


class _FakeProducer:
    """Stands in for the worker's producer in the in-memory stage timing: counts, sends nothing."""

    def __init__(self) -> None:
        self.produced = 0

    def produce(
        self, topic: str, value: Any = None, key: Any = None, partition: int = -1, headers: Any = None
    ) -> None:
        self.produced += 1



class _ConsumeTimes:
    """Splits the worker's time in ``consume`` (``KafkaEdges.consume``: the native reader's batch
    consume, or confluent-kafka's) into reading records and waiting."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.busy_calls = 0
        self.empty_s = 0.0
        self.empty_calls = 0
        self.records = 0

    def wrap(self, consume: Any) -> Any:
        def timed(edges: Any, max_records: int, timeout_s: float) -> Any:
            t0 = time.perf_counter()
            msgs = consume(edges, max_records, timeout_s)
            dt = time.perf_counter() - t0
            if msgs:
                self.busy_s += dt
                self.busy_calls += 1
                self.records += len(msgs)
            else:
                self.empty_s += dt
                self.empty_calls += 1
            return msgs

        return timed


def _fetch_all(bootstrap: str, topic: str, events: int) -> list[Any]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from weir import kafka as kio

    consumer = Consumer(
        kio.consumer_config(
            kio.KafkaSettings(bootstrap, {}, {}), f"weir-bench-prof-{os.getpid()}", "earliest"
        )
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    msgs: list[Any] = []
    while len(msgs) < events:
        msgs.extend(m for m in consumer.consume(10000, 1.0) if m.error() is None)
    consumer.close()
    return msgs


def _best(fn: Any, repeat: int) -> float:
    """Lowest CPU time (this process) of ``fn()`` over ``repeat`` calls: the least disturbed by other load."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def profile_run(bootstrap: str, keys: int, partitions: int, say: Any) -> dict[str, Any]:
    """Time weir's per-record stages on in-memory records, then cProfile a real in-process Worker."""
    import cProfile
    import pstats

    from weir import kafka as kio
    from weir.core import TaskCore
    from weir.graph import compile_job
    from weir.kafka_io import KafkaEdges
    from weir.metrics import WorkerMetrics
    from weir.spec import load_job
    from weir.state import PartitionStore
    from weir.window_operator import NO_WATERMARK, WindowOperator
    from weir.worker import Worker, WorkerSettings

    events = PROFILE_EVENTS
    topic = generate.ensure_input(bootstrap, events, keys, partitions, log=say)
    expected = generate.reference(events, keys)
    work = Path(tempfile.mkdtemp(prefix="weir-bench-prof-"))
    stamp = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}"
    sink, dlq = f"weir-bench-prof-out-{stamp}", f"weir-bench-prof-dlq-{stamp}"
    ctx = runners.Context(bootstrap, topic, sink, work, f"prof-{stamp}", live=False)
    weir_runner = runners.Weir("at-least-once", 5.0)
    dlq = weir_runner.dlq(ctx)
    doc = weir_runner.manifest(ctx)
    job = load_job(json.dumps(doc))
    plan = compile_job(job)
    repeat = 3

    # -- stages, on records fetched into memory first (no Kafka, no profiler) ------------------
    say(f"profile: fetching {events:,} records into memory")
    msgs = _fetch_all(bootstrap, topic, events + partitions)  # the events and the end records
    n = len(msgs)
    triples = [(m.value(), m.key(), m.timestamp()[1]) for m in msgs]
    values = [t[0] for t in triples]
    prepare = plan.prepare
    stage = plan.window
    assert prepare is not None and stage is not None
    prepared = [(m.partition(), *prepare(v, k, ts)) for m, (v, k, ts) in zip(msgs, triples, strict=True)]
    loads = orjson.loads
    ooo = plan.max_out_of_orderness_ms

    def accessors() -> None:
        for m in msgs:
            m.value()
            m.key()
            m.timestamp()
            m.partition()

    def decode() -> None:
        for v in values:
            loads(v)

    def prep() -> None:
        for v, k, ts in triples:
            prepare(v, k, ts)

    def window() -> None:
        ops: dict[int, Any] = {}
        wms: dict[int, int] = {}
        stores = []
        for p in range(partitions):
            store = PartitionStore(
                work / f"stage-{time.monotonic_ns()}-{p}", stage.aggregator.dumps, stage.aggregator.loads
            )
            stores.append(store)
            ops[p] = WindowOperator(
                stage.kind,
                stage.size_ms,
                stage.slide_ms,
                stage.gap_ms,
                stage.allowed_lateness_ms,
                stage.aggregator,
                stage.emit,
                store,  # type: ignore[arg-type]
            ).process
            wms[p] = NO_WATERMARK
        for p, key, ts, record in prepared:
            wm = wms[p]
            ops[p](key, ts, record, wm)
            if ts - ooo > wm:
                wms[p] = ts - ooo
        for store in stores:
            store.close()

    batches = [msgs[i : i + 5000] for i in range(0, n, 5000)]

    python_plan = compile_job(job, native=False)

    def worker_path(graph: Any = plan) -> None:
        core = TaskCore(graph)
        producer = _FakeProducer()
        core.send = producer.produce
        core.build({topic: partitions}, 0, 1, time.monotonic())
        state = work / f"w-{time.monotonic_ns()}"
        for task in core.tasks.values():
            core.open_state(task, state / task.label)
        for batch in batches:
            core.process(batch, time.monotonic())
        for task in core.tasks.values():
            task.wm = 1 << 62
            core.fire(task)
        # The final fire also closes the end records' own windows, one per partition.
        if producer.produced != len(expected) + partitions:
            raise RuntimeError(
                f"in-memory task core emitted {producer.produced} results, want {len(expected) + partitions}"
            )
        core.close()

    stages = {
        "Message accessors: value(), key(), timestamp(), partition()": accessors,
        "orjson.loads of the value": decode,
        "prepare(): decode + checks + key + event time (includes the loads above)": prep,
        "WindowOperator.process(): tumbling window, count + sum into the store": window,
        "TaskCore.process() per 5,000 records + final fire, Python path (WEIR_NATIVE=0)": (
            lambda: worker_path(python_plan)
        ),
        "TaskCore.process() per 5,000 records + final fire, native hot path (the whole path after consume)": (
            worker_path
        ),
    }
    if plan.native is None:
        raise RuntimeError("the benchmark's job does not run the native hot path: is weir_native built?")
    us: dict[str, float] = {}
    for name, fn in stages.items():
        us[name] = _best(fn, repeat) / n * 1e6
        say(f"profile: {us[name]:6.2f} µs/record  {name}")
    for big in (prepared, triples, values, batches, msgs):
        big.clear()

    # -- cProfile of a real worker against Kafka -----------------------------------------------
    admin_topics = [sink, dlq]
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    generate.create_topic(admin, sink, partitions)
    generate.create_topic(admin, dlq, 1)
    got: list[int] = [0]
    consumer = _ConsumeTimes()
    original = KafkaEdges.consume

    worker: Worker

    def on_result(record: dict[str, Any]) -> None:
        if record.get("key") == generate.END_KEY:
            return
        got[0] += 1
        if got[0] >= len(expected):
            worker.stop()

    metrics = WorkerMetrics(job.consumer_group, 0)
    worker = Worker(
        plan,
        kio.KafkaSettings(bootstrap, {}, {}),
        WorkerSettings(0, 1, work / "cprofile", http_port=0),
        metrics,
        on_result=on_result,
    )
    import threading

    def watchdog() -> None:
        if not finished.wait(RUN_TIMEOUT_S):
            worker.stop()

    finished = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    KafkaEdges.consume = consumer.wrap(original)  # type: ignore[method-assign]
    profiler = cProfile.Profile()
    say(f"profile: running an in-process Worker under cProfile over {events:,} events")
    t0 = time.perf_counter()
    try:
        profiler.enable()
        worker.run()
        profiler.disable()
    finally:
        finished.set()
        KafkaEdges.consume = original  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    if got[0] != len(expected) or worker.core.dead_lettered:
        raise RuntimeError(
            f"profiled worker emitted {got[0]} of {len(expected)} windows, dead letters "
            f"{worker.core.dead_lettered}"
        )
    records = events + partitions  # the events and one end record per partition (the worker's tasks are gone)
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = "~" if filename == "~" else f"{Path(filename).name}:{line}"
        func = re.sub(r" at 0x[0-9a-f]+", "", func)
        rows.append(
            {
                "function": func if where == "~" else f"{func} ({where})",
                "calls": calls,
                "tottime_us": tottime / records * 1e6,
                "cumtime_us": cumtime / records * 1e6,
            }
        )
    rows.sort(key=lambda r: -r["tottime_us"])
    measure.delete_topics(bootstrap, admin_topics, [job.consumer_group])
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return {
        "events": events,
        "topic": topic,
        "stages": {"repeat": repeat, "clock": "process CPU time, best of repeat", "us_per_record": us},
        "cprofile": {
            "wall_s": wall,
            "records": records,
            "windows": got[0],
            "consume_with_records_us_per_record": consumer.busy_s / records * 1e6,
            "consume_with_records_calls": consumer.busy_calls,
            "consume_waiting_s": consumer.empty_s,
            "consume_waiting_calls": consumer.empty_calls,
            "top": rows[:18],
        },
    }


# --------------------------------------------------------------------------- report
