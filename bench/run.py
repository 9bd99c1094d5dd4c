"""weir benchmark: one worker's windowed aggregation rate against the raw consume-and-decode ceiling.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python bench/run.py [--events N] [--keys K] [--partitions P] [--quick]
                                  [--repeat R] [--profile | --profile-only]
                                  [--consumer-property KEY=VALUE ...] [--bootstrap HOST:PORT]

See bench/README.md for what is measured and how; BENCHMARKS.md is rewritten by each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import generate
import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RUN_TIMEOUT_S = 900.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment


def kafka_up() -> tuple[str, str]:
    """Start (or reuse) the test harness's Kafka broker; returns (bootstrap, version)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "up", "kafka"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"starting Kafka with the test harness failed:\n{done.stdout}\n{done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith("Kafka ") and "bootstrap.servers=" in line:
            return line.split("bootstrap.servers=", 1)[1].strip(), line.split()[1]
    raise SystemExit(f"cannot read the broker address from the harness output:\n{done.stdout}")


def broker_version(bootstrap: str) -> str:
    """The harness's broker version when it is the harness's broker, else unknown."""
    info = Path.home() / ".cache" / "weir" / "run" / "kafka" / "info.json"
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(info.read_text())
        if data.get("bootstrap") == bootstrap:
            return str(data.get("version"))
    return "unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


def versions(kafka_version: str) -> dict[str, str]:
    from importlib.metadata import version

    import confluent_kafka
    import rocksdict  # noqa: F401 - only its version is read

    import weir

    def v(name: str) -> str:
        try:
            return version(name)
        except Exception:  # noqa: BLE001
            return "unknown"

    return {
        "python": platform.python_version(),
        "weir": weir.__version__,
        "confluent_kafka": v("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "orjson": v("orjson"),
        "rocksdict": v("rocksdict"),
        "kafka_broker": kafka_version,
    }


def git_commit() -> str:
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "runtime"], cwd=ROOT, capture_output=True, text=True
        )
        return head.stdout.strip() + ("+dirty runtime/" if dirty.stdout.strip() else "")
    return "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- /proc helpers


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_mem_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"peak_rss_mib": round(out.get("VmHWM", 0.0), 1), "rss_mib": round(out.get("VmRSS", 0.0), 1)}


# --------------------------------------------------------------------------- runner (a): the ceiling

CEILING_TUNING: dict[str, Any] = {"fetch.queue.backoff.ms": 10}
"""What the ceiling adds to the worker's consumer configuration.

librdkafka postpones a partition's next fetch by ``fetch.queue.backoff.ms`` (default
1000 ms) whenever its local queue holds more than ``queued.min.messages`` (default
100,000). Reading a backlog as fast as it can, a consumer hits that threshold every few
fetches and then stalls for most of a second with an empty queue: with the default, the
raw consume-and-decode loop of this benchmark runs ~4x slower on the same CPU time. A
ceiling must not be held back by that, so it backs off 10 ms instead. Row (a') of the
table keeps the worker's configuration unchanged, to separate client configuration from
per-record work.
"""


def ceiling_child(bootstrap: str, topic: str, events: int, batch: int, extra: dict[str, Any]) -> None:
    """Runs in a child process: raw confluent-kafka batch consume + orjson.loads of every value.

    Starts from the worker's own consumer configuration (``weir.kafka.consumer_config``)
    plus ``extra``, so the runners differ only in what happens to each record (and in
    ``extra``). Prints one JSON line.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from weir import kafka as kio

    config = kio.consumer_config(
        kio.KafkaSettings(bootstrap, extra, {}), f"weir-bench-ceiling-{os.getpid()}", "earliest"
    )
    consumer = Consumer(config)
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    loads = orjson.loads
    n = nbytes = 0
    t_first = None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_assign = time.perf_counter()
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while n < events:
        msgs = consumer.consume(num_messages=batch, timeout=1.0)
        if not msgs:
            if time.monotonic() > deadline:
                raise SystemExit(f"ceiling: timed out after {n} of {events} records")
            continue
        if t_first is None:
            t_first = time.perf_counter()
        for m in msgs:
            if m.error() is not None:
                continue
            value = m.value()
            loads(value)
            nbytes += len(value)
            n += 1
    t_last = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    consumer.close()
    assert t_first is not None
    print(
        json.dumps(
            {
                "records": n,
                "bytes": nbytes,
                "seconds": t_last - t_assign,
                "first_to_last_s": t_last - t_first,
                "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                "peak_rss_mib": round(ru1.ru_maxrss / 1024, 1),
            }
        )
    )


def run_ceiling(bootstrap: str, topic: str, events: int, extra: dict[str, Any]) -> dict[str, Any]:
    load_before = loadavg()
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "_ceiling",
            bootstrap,
            topic,
            str(events),
            "10000",
            json.dumps(extra),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ceiling runner failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["records"] != events:
        raise RuntimeError(f"ceiling read {r['records']} records, want {events}")
    r["consumer_overrides"] = extra
    r["events_per_s"] = events / r["seconds"]
    r["events_per_s_first_to_last"] = events / r["first_to_last_s"]
    r["cpu_us_per_event"] = r["cpu_s"] / events * 1e6
    r["loadavg_before"] = load_before
    r["loadavg_after"] = loadavg()
    return r


# --------------------------------------------------------------------------- runner (b): weir


def manifest(
    name: str, bootstrap: str, source: str, sink: str, dlq: str, consumer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The benchmark job: tumbling 1-minute count + sum(price) per message key, no repartition."""
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "parallelism": 1,
            "kafka": {"bootstrapServers": bootstrap, **({"consumer": consumer} if consumer else {})},
            "pipeline": {
                "source": {
                    "topics": [source],
                    "format": "json",
                    "eventTime": {"field": "ts", "format": "epochMillis"},
                    "startFrom": "earliest",
                },
                "watermark": {"maxOutOfOrderness": "5s", "idleTimeout": "2s"},
                "steps": [
                    {"keyBy": {"messageKey": True}},
                    {"window": {"type": "tumbling", "size": "1m"}},
                    {
                        "aggregate": {
                            "emit": "final",
                            "outputs": {"count": {"fn": "count"}, "revenue": {"fn": "sum", "field": "price"}},
                        }
                    },
                ],
                "sink": {"topic": sink},
                "deadLetter": {"topic": dlq},
            },
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, timeout: float = 1.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


class SinkReader:
    """Reads the sink topic as results arrive; ``results`` maps (key, window start) to (count, sum)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"weir-bench-sink-{os.getpid()}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.results: dict[tuple[str, int], tuple[int, float]] = {}
        self.duplicates = 0
        self.malformed: list[str] = []

    def poll(self, timeout: float) -> int:
        got = 0
        for m in self.consumer.consume(num_messages=10000, timeout=timeout):
            if m.error() is not None:
                continue
            got += 1
            try:
                r = orjson.loads(m.value())
                k = (r["key"], r["windowStartMs"])
                if r["windowEndMs"] - r["windowStartMs"] != generate.WINDOW_MS:
                    self.malformed.append(m.value().decode()[:200])
                if k in self.results:
                    self.duplicates += 1
                self.results[k] = (r["count"], r["revenue"])
            except Exception:  # noqa: BLE001 - any unreadable result is reported, not raised
                self.malformed.append(repr(m.value())[:200])
        return got

    def close(self) -> None:
        self.consumer.close()


def verify(
    results: dict[tuple[str, int], tuple[int, float]], expected: dict[tuple[str, int], tuple[int, float]]
) -> list[str]:
    """Differences between a run's results and the reference; empty means correct."""
    problems = []
    missing = expected.keys() - results.keys()
    extra = results.keys() - expected.keys()
    if missing:
        problems.append(f"{len(missing)} windows missing, e.g. {sorted(missing)[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected windows, e.g. {sorted(extra)[:3]}")
    wrong = 0
    examples = []
    for k, (count, total) in expected.items():
        got = results.get(k)
        if got is None:
            continue
        if got[0] != count or not math.isclose(got[1], total, rel_tol=1e-9, abs_tol=1e-9):
            wrong += 1
            if len(examples) < 3:
                examples.append(f"{k}: got {got}, want {(count, total)}")
    if wrong:
        problems.append(f"{wrong} windows with a wrong count or sum, e.g. {examples}")
    return problems


def topic_records(bootstrap: str, topic: str) -> int:
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    size = generate.topic_size(AdminClient({"bootstrap.servers": bootstrap}), bootstrap, topic)
    return size[1] if size else -1


def delete_topics(bootstrap: str, topics: list[str], groups: list[str] | None = None) -> None:
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the futures resolve
    with contextlib.suppress(Exception):
        for f in admin.delete_topics(topics, operation_timeout=30).values():
            f.result(timeout=30)
    if groups:
        with contextlib.suppress(Exception):
            for f in admin.delete_consumer_groups(groups, request_timeout=10).values():
                f.result(timeout=10)


def run_weir(
    bootstrap: str,
    source: str,
    events: int,
    partitions: int,
    expected: dict[tuple[str, int], tuple[int, float]],
    consumer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs `weir run` as a subprocess until every expected window is in the sink topic."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    run_id = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}-{time.monotonic_ns() % 100000}"
    name = f"bench-{run_id}"
    sink, dlq = f"weir-bench-out-{run_id}", f"weir-bench-dlq-{run_id}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    generate.create_topic(admin, sink, partitions)
    generate.create_topic(admin, dlq, 1)
    reader = SinkReader(bootstrap, sink)
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    job = work / "job.json"
    job.write_text(json.dumps(manifest(name, bootstrap, source, sink, dlq, consumer), indent=2))
    port = free_port()
    worker_log = work / "worker.log"
    cmd = [
        sys.executable,
        "-m",
        "weir",
        "run",
        str(job),
        "--bootstrap-servers",
        bootstrap,
        "--state-dir",
        str(work / "state"),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    load_before = loadavg()
    base = f"http://127.0.0.1:{port}"
    with worker_log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        t_ready = cpu_ready = None
        deadline = time.monotonic() + 120
        while t_ready is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not become ready:\n{worker_log.read_text()[-3000:]}")
            if http_json(f"{base}/readyz", 0.5)[0] == 200:
                t_ready = time.perf_counter()
                cpu_ready = proc_cpu_s(proc.pid)
            else:
                time.sleep(0.01)
        t_drained = t_done = None
        next_status = 0.0
        status: Any = None
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while t_done is None:
            reader.poll(0.05)
            now = time.perf_counter()
            if len(reader.results) >= len(expected):
                t_done = now
                break
            if t_drained is None and now >= next_status:
                code, status = http_json(f"{base}/status")
                if (
                    code == 200
                    and status
                    and sum(max(0, p["offset"]) for p in status["partitions"]) >= events
                ):
                    t_drained = time.perf_counter()
                next_status = now + 0.1
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker_log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out with {len(reader.results)} of {len(expected)} windows; status {status}"
                )
        cpu_done = proc_cpu_s(proc.pid)
        mem = proc_mem_mib(proc.pid)
        _, status = http_json(f"{base}/status")
        # Let a straggling duplicate or extra window show up before judging the output.
        reader.poll(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, wstatus, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wstatus)
        except ChildProcessError:
            usage = None
        reader.close()
    problems = verify(reader.results, expected)
    if reader.duplicates:
        problems.append(f"{reader.duplicates} duplicate window results")
    if reader.malformed:
        problems.append(f"{len(reader.malformed)} malformed results, e.g. {reader.malformed[:2]}")
    dead = topic_records(bootstrap, dlq)
    if dead:
        reasons = status.get("deadLettered") if isinstance(status, dict) else None
        problems.append(f"{dead} records in the dead-letter topic (reasons: {reasons})")
    if proc.returncode != 0:
        problems.append(f"worker exited with {proc.returncode} after SIGTERM")
    if problems:
        raise RuntimeError(
            f"weir produced a wrong answer (kept {sink}, {dlq}, {work}):\n  " + "\n  ".join(problems)
        )
    delete_topics(bootstrap, [sink, dlq], [f"weir-bench-{name}"])
    subprocess.run(["rm", "-rf", str(work)], check=False)
    assert t_ready is not None and t_done is not None and cpu_ready is not None
    seconds = t_done - t_ready
    r: dict[str, Any] = {
        "records": events,
        "windows": len(expected),
        "consumer_overrides": consumer or {},
        "seconds": seconds,
        "events_per_s": events / seconds,
        "cpu_s": cpu_done - cpu_ready,
        "cpu_us_per_event": (cpu_done - cpu_ready) / events * 1e6,
        "cpu_s_process_total": (usage.ru_utime + usage.ru_stime) if usage else None,
        **mem,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "status": {
            k: status.get(k) for k in ("recordsIn", "recordsOut", "deadLettered", "busyRatioSinceStart")
        }
        if isinstance(status, dict)
        else None,
    }
    if t_drained is not None:
        r["drain_seconds"] = t_drained - t_ready
        r["drain_events_per_s"] = events / (t_drained - t_ready)
        r["tail_seconds"] = t_done - t_drained
    return r


# --------------------------------------------------------------------------- profile (--profile)

PROFILE_EVENTS = 200_000


class _FakeProducer:
    """Stands in for the worker's producer in the in-memory stage timing: counts, sends nothing."""

    def __init__(self) -> None:
        self.produced = 0

    def produce(
        self, topic: str, value: Any = None, key: Any = None, partition: int = -1, headers: Any = None
    ) -> None:
        self.produced += 1

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


class _TimedConsumer:
    """Wraps the worker's consumer to split time in ``consume`` into fetching records and waiting."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.busy_s = 0.0
        self.busy_calls = 0
        self.empty_s = 0.0
        self.empty_calls = 0
        self.records = 0

    def consume(self, num_messages: int = 1, timeout: float = -1) -> Any:
        t0 = time.perf_counter()
        msgs = self._inner.consume(num_messages, timeout)
        dt = time.perf_counter() - t0
        if msgs:
            self.busy_s += dt
            self.busy_calls += 1
            self.records += len(msgs)
        else:
            self.empty_s += dt
            self.empty_calls += 1
        return msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


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
    from weir.metrics import WorkerMetrics
    from weir.spec import load_job
    from weir.state import PartitionStore
    from weir.windowing import NO_WATERMARK, WindowOperator
    from weir.worker import Worker, WorkerSettings, plan_for

    events = PROFILE_EVENTS
    topic = generate.ensure_input(bootstrap, events, keys, partitions, log=say)
    expected = generate.reference(events, keys)
    work = Path(tempfile.mkdtemp(prefix="weir-bench-prof-"))
    stamp = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}"
    sink, dlq = f"weir-bench-prof-out-{stamp}", f"weir-bench-prof-dlq-{stamp}"
    doc = manifest(f"prof-{stamp}", bootstrap, topic, sink, dlq)
    job = load_job(json.dumps(doc))
    plan = plan_for(job)
    repeat = 3

    # -- stages, on records fetched into memory first (no Kafka, no profiler) ------------------
    say(f"profile: fetching {events:,} records into memory")
    msgs = _fetch_all(bootstrap, topic, events)
    n = len(msgs)
    triples = [(m.value(), m.key(), m.timestamp()[1]) for m in msgs]
    values = [t[0] for t in triples]
    prepare = plan.prepare
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
                work / f"stage-{time.monotonic_ns()}-{p}", plan.aggregator.dumps, plan.aggregator.loads
            )
            stores.append(store)
            ops[p] = WindowOperator(
                plan.window_kind,
                plan.size_ms,
                plan.slide_ms,
                plan.gap_ms,
                plan.allowed_lateness_ms,
                plan.aggregator,
                plan.emit,
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

    def worker_path() -> None:
        w = Worker(
            plan,
            kio.KafkaSettings(bootstrap, {}, {}),
            WorkerSettings(0, 1, work / f"w-{time.monotonic_ns()}"),
        )
        w.producer = _FakeProducer()  # type: ignore[assignment]
        for p in range(partitions):
            w._add_task(topic, p, window=True)
        for batch in batches:
            w._process(batch, 0)
        for task in w.tasks.values():
            task.wm = 1 << 62
            w._fire(task)
        if w.producer.produced != len(expected):  # type: ignore[attr-defined]
            raise RuntimeError(
                f"in-memory worker path emitted {w.producer.produced} results, want {len(expected)}"
            )  # type: ignore[attr-defined]
        for task in w.tasks.values():
            assert task.store is not None
            task.store.close()

    stages = {
        "Message accessors: value(), key(), timestamp(), partition()": accessors,
        "orjson.loads of the value": decode,
        "prepare(): decode + checks + key + event time (includes the loads above)": prep,
        "WindowOperator.process(): tumbling window, count + sum into the store": window,
        "Worker._process() per 5,000 records + final _fire (the whole path after consume)": worker_path,
    }
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
    timed: list[_TimedConsumer] = []
    original = kio.new_consumer

    def new_consumer(config: dict[str, Any]) -> Any:
        c = _TimedConsumer(original(config))
        timed.append(c)
        return c

    worker: Worker

    def on_result(_record: dict[str, Any]) -> None:
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
    kio.new_consumer = new_consumer  # type: ignore[assignment]
    profiler = cProfile.Profile()
    say(f"profile: running an in-process Worker under cProfile over {events:,} events")
    t0 = time.perf_counter()
    try:
        profiler.enable()
        worker.run()
        profiler.disable()
    finally:
        finished.set()
        kio.new_consumer = original  # type: ignore[assignment]
    wall = time.perf_counter() - t0
    if got[0] != len(expected) or worker.dead_lettered:
        raise RuntimeError(
            f"profiled worker emitted {got[0]} of {len(expected)} windows, dead letters "
            f"{worker.dead_lettered}"
        )
    records = sum(t.records for t in worker.tasks.values())
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
    consumer = timed[0] if timed else None
    delete_topics(bootstrap, admin_topics, [job.consumer_group])
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return {
        "events": events,
        "stages": {"repeat": repeat, "clock": "process CPU time, best of repeat", "us_per_record": us},
        "cprofile": {
            "wall_s": wall,
            "records": records,
            "windows": got[0],
            "consume_with_records_us_per_record": consumer.busy_s / records * 1e6 if consumer else None,
            "consume_with_records_calls": consumer.busy_calls if consumer else None,
            "consume_waiting_s": consumer.empty_s if consumer else None,
            "consume_waiting_calls": consumer.empty_calls if consumer else None,
            "top": rows[:18],
        },
    }


# --------------------------------------------------------------------------- report

RUNNERS = ("ceiling", "ceiling_worker_config", "weir")


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def stat(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": median(values), "min": min(values), "max": max(values)}


def spread(values: list[float]) -> float:
    """(max - min) / median, in percent: the run-to-run instability of one figure."""
    return 100.0 * (max(values) - min(values)) / median(values) if values else 0.0


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "events_per_s",
        "seconds",
        "drain_events_per_s",
        "drain_seconds",
        "tail_seconds",
        "cpu_s",
        "cpu_us_per_event",
        "peak_rss_mib",
    )
    out: dict[str, Any] = {
        name: {k: stat([r[name][k] for r in runs if r[name].get(k) is not None]) for k in keys}
        for name in RUNNERS
    }

    def ratios(num: str, num_key: str, den: str, den_key: str) -> dict[str, float] | None:
        return stat(
            [r[num][num_key] / r[den][den_key] for r in runs if r[num].get(num_key) and r[den].get(den_key)]
        )

    out["ratios"] = {
        # weir / (a): the headline
        "weir_over_ceiling": ratios("weir", "events_per_s", "ceiling", "events_per_s"),
        "weir_drain_over_ceiling": ratios("weir", "drain_events_per_s", "ceiling", "events_per_s"),
        "weir_over_ceiling_worker_config": ratios(
            "weir", "events_per_s", "ceiling_worker_config", "events_per_s"
        ),
        "weir_drain_over_ceiling_worker_config": ratios(
            "weir", "drain_events_per_s", "ceiling_worker_config", "events_per_s"
        ),
        # events per CPU-second, weir over (a): cpu_us(a) / cpu_us(weir)
        "cpu_efficiency_weir_over_ceiling": ratios("ceiling", "cpu_us_per_event", "weir", "cpu_us_per_event"),
    }
    out["spread_pct"] = {name: spread([r[name]["events_per_s"] for r in runs]) for name in RUNNERS}
    return out


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def rng(st: dict[str, float] | None, fmt: str = "rate") -> str:
    if not st:
        return ""
    if fmt == "rate":
        return f"{fmt_rate(st['median'])} ({fmt_rate(st['min'])}-{fmt_rate(st['max'])})"
    return f"**{st['median']:.3f}** ({st['min']:.3f}-{st['max']:.3f})"


def write_markdown(doc: dict[str, Any], profile: dict[str, Any] | None) -> str:
    s, p, m, v = doc["summary"], doc["parameters"], doc["machine"], doc["versions"]
    c, cw, w, r = s["ceiling"], s["ceiling_worker_config"], s["weir"], s["ratios"]
    tuning = ", ".join(f"`{k}={val}`" for k, val in doc["ceiling_tuning"].items())
    overrides = doc.get("weir_consumer_overrides") or {}

    def row(label: str, st: dict[str, Any], ratio: str) -> str:
        return (
            f"| {label} | {rng(st['events_per_s'])} | {ratio} | {st['cpu_s']['median']:.2f} | "
            f"{st['cpu_us_per_event']['median']:.2f} | {st['peak_rss_mib']['median']:.0f} |"
        )

    weir_label = "(b) weir: `weir run`, one worker" + (
        " with " + ", ".join(f"`{k}={val}`" for k, val in overrides.items()) if overrides else ""
    )
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. What is measured and how: "
        "[bench/README.md](bench/README.md). Raw figures: `bench/results/latest.json`.",
        "",
        f"Run {doc['started']} on commit `{doc['git']}`:",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "## One worker: tumbling 1-minute count + sum per key",
        "",
        f"{p['events']:,} JSON events ({p['avg_event_bytes']:.0f} bytes on average, lz4) over "
        f"{p['keys']:,} keys "
        f"in a {p['partitions']}-partition topic; message key = group key (no repartition); event "
        "time from the "
        f"`ts` field with up to 5 s of disorder; {p['windows']:,} (key, minute) windows expected. "
        f"Median of {p['repeat']} interleaved runs, min-max in brackets. Every weir run's output matched the "
        "reference computed from the generated data.",
        "",
        "| runner | events/s | weir ÷ this | CPU s | CPU µs/event | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
        row(
            f"(a) ceiling: raw `consume(10000)` + `orjson.loads`, worker's consumer config + {tuning}",
            c,
            rng(r["weir_over_ceiling"], "ratio"),
        ),
        row(
            "(a') the same, worker's consumer config unchanged",
            cw,
            rng(r["weir_over_ceiling_worker_config"], "ratio"),
        ),
        row(weir_label, w, ""),
        "",
        f"**weir ÷ ceiling = {r['weir_over_ceiling']['median']:.3f}** in events/s "
        f"(weir {fmt_rate(w['events_per_s']['median'])}, ceiling {fmt_rate(c['events_per_s']['median'])}); "
        f"in events per CPU-second {r['cpu_efficiency_weir_over_ceiling']['median']:.3f}.",
        "",
        "- (a) and (a') are timed from `assign` to the last record decoded. (b) is timed from the worker's "
        "`/readyz` turning ready (partitions assigned, nothing consumed yet) to the benchmark "
        "reading the last "
        "expected window back from the sink topic. That includes the job's 2 s `idleTimeout`, which is what "
        "closes the last minute's windows: all input was consumed after "
        f"{w['drain_seconds']['median']:.1f} s "
        f"({fmt_rate(w['drain_events_per_s']['median'])} events/s, "
        f"{r['weir_drain_over_ceiling']['median']:.3f} "
        f"of (a)), the last window arrived {w['tail_seconds']['median']:.1f} s later."
        if w.get("drain_seconds") and w.get("tail_seconds") and r.get("weir_drain_over_ceiling")
        else "",
        "- (a) vs (a'): the ceiling adds only " + tuning + " to the worker's consumer configuration; see "
        "`CEILING_TUNING` in `bench/run.py` for why.",
        "- CPU is user + system time of the runner process (all threads, librdkafka's included) "
        "over the timed "
        "interval; peak RSS is the process's high-water mark (`ru_maxrss` / `VmHWM`). On a loaded "
        "machine the "
        "CPU figures are steadier than the wall-clock rates, which also measure how much CPU other "
        "processes left.",
        f"- Run-to-run spread (max - min) / median: (a) {s['spread_pct']['ceiling']:.0f} %, (a') "
        f"{s['spread_pct']['ceiling_worker_config']:.0f} %, (b) {s['spread_pct']['weir']:.0f} %. "
        "Load average "
        f"(1, 5, 15 min) at the start: {doc['loadavg_start']}, at the end: {doc['loadavg_end']}, on "
        f"{m['nproc']} CPUs shared with the broker and with other work.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu_model']}, {m['nproc']} CPUs (`nproc`); RAM {m['ram_gib']} GiB; Linux {m['kernel']}",
        f"- Python {v['python']}, weir {v['weir']}, confluent-kafka {v['confluent_kafka']}, librdkafka "
        f"{v['librdkafka']}, orjson {v['orjson']}, rocksdict {v['rocksdict']}",
        f"- Kafka broker {v['kafka_broker']} (single node, KRaft, the test harness's) on the same machine",
        "",
    ]
    if profile:
        lines += profile_markdown(profile)
    return "\n".join(lines) + "\n"


def profile_markdown(profile: dict[str, Any]) -> list[str]:
    lines = [
        "## Where a record's time goes (weir, in-process)",
        "",
        f"From `bench/run.py --profile` at {profile['started']} (commit `{profile['git']}`), "
        f"{profile['events']:,} events. The CPU is shared with other work: read the shares, not the "
        "absolute µs.",
        "",
        "Stages timed separately on records already fetched into memory (CPU time, no profiler, best of "
        f"{profile['stages']['repeat']}):",
        "",
        "| stage | µs/record |",
        "|---|---:|",
    ]
    for name, us in profile["stages"]["us_per_record"].items():
        lines.append(f"| {name} | {us:.2f} |")
    cp = profile["cprofile"]
    lines += [
        "",
        f"cProfile of `Worker.run()` against Kafka ({cp['wall_s']:.1f} s under the profiler): own "
        "and cumulative "
        "time per function divided by the number of records. The profiler inflates small functions "
        "several times.",
        "",
        "| function | calls | own µs/record | cumulative µs/record |",
        "|---|---:|---:|---:|",
    ]
    for row in cp["top"]:
        lines.append(
            f"| `{row['function']}` | {row['calls']:,} | {row['tottime_us']:.2f} | {row['cumtime_us']:.2f} |"
        )
    if cp.get("consume_with_records_us_per_record") is not None:
        lines += [
            "",
            f"`consume` includes waiting: the {cp['consume_with_records_calls']} calls that "
            "returned records took "
            f"{cp['consume_with_records_us_per_record']:.2f} µs/record; "
            f"{cp['consume_waiting_calls']} calls returned "
            f"nothing and waited {cp['consume_waiting_s']:.2f} s in all (mostly the 2 s idleTimeout "
            "before the last "
            "windows close).",
        ]
    lines.append("")
    return lines


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_profile(bootstrap: str, keys: int, partitions: int, started: str) -> dict[str, Any]:
    profile = profile_run(bootstrap, keys, partitions, log)
    profile["started"] = started
    profile["git"] = git_commit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "profile-latest.json", json.dumps(profile, indent=2) + "\n")
    return profile


# --------------------------------------------------------------------------- main


def parse_properties(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--consumer-property wants KEY=VALUE, got {item!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ceiling":
        ceiling_child(argv[1], argv[2], int(argv[3]), int(argv[4]), json.loads(argv[5]))
        return 0
    parser = argparse.ArgumentParser(prog="bench/run.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--events", type=int, help="events in the input topic (default 1,000,000; --quick 200,000)"
    )
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys (default 1000)")
    parser.add_argument("--partitions", type=int, default=4, help="input topic partitions (default 4)")
    parser.add_argument("--quick", action="store_true", help="200,000 events, 2 repeats")
    parser.add_argument("--repeat", type=int, help="interleaved runs of each runner (default 5; --quick 2)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile weir's hot path in-process (200,000 events)"
    )
    parser.add_argument(
        "--profile-only", action="store_true", help="only profile; BENCHMARKS.md keeps the last table"
    )
    parser.add_argument(
        "--consumer-property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka consumer property for the worker and both ceilings; repeatable",
    )
    parser.add_argument("--bootstrap", help="use this broker instead of starting the test harness's")
    args = parser.parse_args(argv)
    events = args.events or (200_000 if args.quick else 1_000_000)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    if repeat < 1 or events < 1:
        parser.error("--repeat and --events must be at least 1")
    weir_overrides = parse_properties(args.consumer_property)
    command = ".venv/bin/python bench/run.py" + ("" if not argv else " " + " ".join(argv))

    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_start = loadavg()
    if args.bootstrap:
        bootstrap, kafka_version = args.bootstrap, broker_version(args.bootstrap)
    else:
        bootstrap, kafka_version = kafka_up()
    log(f"broker {bootstrap} (Kafka {kafka_version}); load average {load_start}")
    if args.profile_only:
        profile = save_profile(bootstrap, args.keys, args.partitions, started)
        with contextlib.suppress(OSError, ValueError, KeyError):
            write_atomic(
                ROOT / "BENCHMARKS.md",
                write_markdown(json.loads((RESULTS / "latest.json").read_text()), profile),
            )
        log("wrote bench/results/profile-latest.json and the profile section of BENCHMARKS.md")
        return 0
    topic = generate.ensure_input(bootstrap, events, args.keys, args.partitions, log=log)
    t = time.monotonic()
    expected = generate.reference(events, args.keys)
    sample = min(events, 20_000)
    avg_bytes = sum(len(v) for *_, v in generate.events(sample, args.keys)) / sample
    log(f"reference: {len(expected):,} windows ({time.monotonic() - t:.1f} s)")

    runs = []
    for i in range(repeat):
        run: dict[str, Any] = {}
        run["ceiling"] = c = run_ceiling(bootstrap, topic, events, {**weir_overrides, **CEILING_TUNING})
        log(
            f"run {i + 1}/{repeat} (a)  ceiling:  {c['events_per_s']:>9,.0f} events/s, "
            f"{c['cpu_s']:.2f} CPU s, load {c['loadavg_after']}"
        )
        run["ceiling_worker_config"] = cw = run_ceiling(bootstrap, topic, events, weir_overrides)
        log(
            f"run {i + 1}/{repeat} (a') ceiling:  {cw['events_per_s']:>9,.0f} events/s, "
            f"{cw['cpu_s']:.2f} CPU s, load {cw['loadavg_after']}"
        )
        run["weir"] = w = run_weir(bootstrap, topic, events, args.partitions, expected, weir_overrides)
        log(
            f"run {i + 1}/{repeat} (b)  weir:     {w['events_per_s']:>9,.0f} events/s "
            f"(all input consumed at {w.get('drain_events_per_s', 0):,.0f}/s), {w['cpu_s']:.2f} CPU s, "
            f"{w['peak_rss_mib']:.0f} MiB, weir/(a) {w['events_per_s'] / c['events_per_s']:.3f}, "
            f"load {w['loadavg_after']}; output verified"
        )
        runs.append(run)

    profile = None
    if args.profile:
        profile = save_profile(bootstrap, args.keys, args.partitions, started)
    else:
        with contextlib.suppress(OSError, ValueError):
            profile = json.loads((RESULTS / "profile-latest.json").read_text())

    doc = {
        "started": started,
        "command": command,
        "git": git_commit(),
        "parameters": {
            "events": events,
            "keys": args.keys,
            "partitions": args.partitions,
            "repeat": repeat,
            "topic": topic,
            "windows": len(expected),
            "avg_event_bytes": avg_bytes,
            "seed": generate.SEED,
            "generator_version": generate.GENERATOR_VERSION,
        },
        "ceiling_tuning": CEILING_TUNING,
        "weir_consumer_overrides": weir_overrides,
        "machine": machine(),
        "versions": versions(kafka_version),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "runs": runs,
        "summary": summarise(runs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2) + "\n"
    write_atomic(RESULTS / f"{stamp}.json", text)
    write_atomic(RESULTS / "latest.json", text)
    write_atomic(ROOT / "BENCHMARKS.md", write_markdown(doc, profile))
    s = doc["summary"]
    log(
        f"ceiling {s['ceiling']['events_per_s']['median']:,.0f} events/s, weir "
        f"{s['weir']['events_per_s']['median']:,.0f} "
        f"events/s, weir/ceiling {s['ratios']['weir_over_ceiling']['median']:.3f}; "
        f"wrote BENCHMARKS.md and bench/results/{stamp}.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
