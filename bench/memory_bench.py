"""Memory benchmark: one worker, N distinct keys open in one 1-hour window, with and without a budget.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python bench/memory_bench.py [--events N] [--partitions P] [--budget 256Mi]
                                           [--runs budget,unlimited] [--out FILE] [--bootstrap HOST:PORT]

The job: 1-hour event-time tumbling windows, count and sum of ``price`` per message key,
at-least-once, one ``weir run`` worker on a ``P``-partition topic (default 4). The data:
``N`` events with ``N`` distinct keys (``k-<i>``), event times spread over the first 50
minutes of one hour, in order, so all ``N`` windows are open until the end: one end-of-input
record per partition (key ``~end``, an event time 2 minutes past the hour) closes them all at
once. The topic is written once and reused while its partition and record counts match.

Runs (in the order given, default ``budget,unlimited``): ``budget`` passes
``--memory-budget`` (default 256Mi); ``unlimited`` passes neither a budget nor a cache limit
(everything in memory: ``--max-cached-windows`` above ``N``). For each run:

- **peak RSS**: the worker process's ``VmHWM`` (``/proc/<pid>/status``), sampled every 0.5 s
  while it runs and once more right before it is stopped: the whole run, start-up and the
  closing of all ``N`` windows included;
- **events/s**: ``N`` over the time from the first record consumed (``firstRecordAt`` in
  ``/status``) to the last of the ``N`` results read from the sink topic (**all results
  s**), as in the main benchmark: the closing of all ``N`` windows included; **consumed s**:
  first record to every input record consumed (as last seen in ``/status``);
- **output checked**: every one of the ``N`` windows exactly once, with count 1 and the
  event's price (a run that differs is marked failed and the command exits 1);
- the worker's ``/status`` ``memory`` section at the end (each part's bytes), and the load
  average (the machine is shared).

Writes ``bench/results/memory.json`` (``--out``); ``bench/report.py`` renders it into the
"Memory budget" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import generate  # noqa: E402
import measure  # noqa: E402
import orjson  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402
from measure import log  # noqa: E402

WORK = Path(os.environ.get("WEIR_CACHE", Path.home() / ".cache" / "weir")) / "bench-memory"
HOUR_MS = 3_600_000
SPREAD_MS = 3_000_000  # events over the first 50 minutes of the hour
END_KEY = generate.END_KEY
VERSION = 1


def topic_name(n: int, partitions: int) -> str:
    return f"weir-bench-memory-v{VERSION}-n{n}-p{partitions}"


def price(i: int) -> float:
    return (i % 10_000) / 100


def event_ts(i: int, n: int) -> int:
    return generate.BASE_TS + i * SPREAD_MS // n


def ensure_input(bootstrap: str, n: int, partitions: int) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = topic_name(n, partitions)
    if generate.topic_size(admin, bootstrap, topic) == (partitions, n + partitions):
        log(f"reusing input topic {topic}")
        return topic
    generate.create_topic(admin, topic, partitions)
    log(f"writing {n:,} events with {n:,} distinct keys to {topic} ...")
    started = time.monotonic()
    dumps = orjson.dumps
    items = (
        (f"k-{i}", 0, 0.0, dumps({"id": f"k-{i}", "price": price(i), "ts": event_ts(i, n)})) for i in range(n)
    )
    end = dumps({"id": END_KEY, "price": 0.0, "ts": generate.BASE_TS + HOUR_MS + 120_000})
    generate.produce(bootstrap, topic, items, end=(end, partitions))
    log(f"wrote {n:,} events in {time.monotonic() - started:.0f} s")
    return topic


def manifest(name: str, source: str, sink: str, bootstrap: str) -> dict[str, Any]:
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "parallelism": 1,
            "kafka": {"bootstrapServers": bootstrap},
            "pipeline": {
                "source": {
                    "topics": [source],
                    "format": "json",
                    "eventTime": {"field": "ts", "format": "epochMillis"},
                    "startFrom": "earliest",
                },
                "watermark": {"maxOutOfOrderness": "5s"},
                "steps": [
                    {"keyBy": {"messageKey": True}},
                    {"window": {"type": "tumbling", "size": "1h"}},
                    {
                        "aggregate": {
                            "emit": "final",
                            "outputs": {"count": {"fn": "count"}, "revenue": {"fn": "sum", "field": "price"}},
                        }
                    },
                ],
                "sink": {"topic": sink},
                "deadLetter": {"topic": f"{sink}-dlq"},
            },
        },
    }


class Results:
    """Reads the sink topic and checks every window once with its count and sum."""

    def __init__(self, bootstrap: str, topic: str, n: int) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"weir-bench-memory-sink-{os.getpid()}",
                "enable.auto.commit": False,
                "fetch.queue.backoff.ms": 10,
            }
        )
        self.consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self.n = n
        self.seen = bytearray(n)
        self.count = 0
        self.duplicates = 0
        self.wrong: list[str] = []

    def poll(self, timeout: float) -> None:
        for m in self.consumer.consume(10_000, timeout):
            if m.error() is not None:
                continue
            r = orjson.loads(m.value())
            if r["key"] == END_KEY:
                continue
            i = int(r["key"][2:])
            if self.seen[i]:
                self.duplicates += 1
                continue
            self.seen[i] = 1
            self.count += 1
            exact = r["count"] == 1 and abs(r["revenue"] - price(i)) <= 1e-9
            if (not exact or r["windowStartMs"] != generate.BASE_TS) and len(self.wrong) < 3:
                self.wrong.append(str(r))

    def problems(self) -> list[str]:
        out = []
        if self.count != self.n:
            out.append(f"{self.n - self.count:,} windows missing")
        if self.duplicates:
            out.append(f"{self.duplicates:,} windows emitted twice")
        if self.wrong:
            out.append(f"wrong results, e.g. {self.wrong}")
        return out


def run_once(kind: str, args: argparse.Namespace, bootstrap: str, source: str) -> dict[str, Any]:
    run_id = f"{kind}-{int(time.time())}"
    work = WORK / run_id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sink = f"weir-bench-memory-out-{run_id}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    generate.create_topic(admin, sink, 1)
    generate.create_topic(admin, f"{sink}-dlq", 1)
    job = work / "job.json"
    job.write_text(json.dumps(manifest(f"memory-{run_id}", source, sink, bootstrap)))
    port = measure.free_port()
    if kind == "budget":
        flags = ["--memory-budget", args.budget]
    else:
        flags = ["--max-cached-windows", str(args.events * 2)]
    cmd = [
        sys.executable, "-m", "weir", "run", str(job),
        "--bootstrap-servers", bootstrap, "--state-dir", str(work / "state"),
        "--http-host", "127.0.0.1", "--http-port", str(port),
        "--guarantee", "at-least-once", "--log-level", "INFO", *flags,
    ]  # fmt: skip
    total = args.events + args.partitions
    results = Results(bootstrap, sink, args.events)
    log_path = work / "worker.log"
    load_start = measure.loadavg()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    peak = {"peak_rss_mib": 0.0, "rss_mib": 0.0}
    first = consumed = done = None
    status: Any = None
    deadline = time.monotonic() + args.timeout
    next_trace = 0.0
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise RuntimeError(f"the worker exited with {proc.returncode}: {tail}")
            with contextlib.suppress(OSError):
                peak = measure.proc_mem_mib(proc.pid)
            code, status = measure.http_json(f"http://127.0.0.1:{port}/status", 1.0)
            now = time.time()
            if code == 200 and isinstance(status, dict):
                if args.trace and status.get("memory") and time.monotonic() >= next_trace:
                    next_trace = time.monotonic() + 5
                    mem = status["memory"]
                    log(
                        f"{kind}: in {status.get('recordsIn', 0):,} rss {peak['rss_mib']:.0f} MiB "
                        f"(peak {peak['peak_rss_mib']:.0f}) used "
                        + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem["usedBytes"].items())
                    )
                if first is None and status.get("recordsIn", 0) > 0:
                    at = status.get("firstRecordAt")
                    first = at / 1000 if isinstance(at, int) else now
                if consumed is None and status.get("recordsIn", 0) >= total:
                    consumed = now
            results.poll(0.5)
            if results.count >= args.events:
                done = time.time()
                break
        with contextlib.suppress(OSError):
            peak = measure.proc_mem_mib(proc.pid)
        code, status = measure.http_json(f"http://127.0.0.1:{port}/status", 2.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
    for _ in range(5):
        results.poll(0.5)
    results.consumer.close()
    measure.delete_topics(bootstrap, [sink, f"{sink}-dlq"], [f"weir-bench-memory-{run_id}"])
    problems = results.problems()
    if exit_code != 0:
        problems.append(f"worker exit code {exit_code}")
    if first is None or done is None:
        problems.append("did not finish within the timeout")
    ok = not problems
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    row = {
        "kind": kind,
        "flags": flags,
        "status": "ok" if ok else "failed",
        "problems": problems,
        "peak_rss_mib": peak["peak_rss_mib"],
        "events_per_s": round(args.events / (done - first)) if first and done and done > first else None,
        "consume_s": round(consumed - first, 1) if first and consumed else None,
        "all_results_s": round(done - first, 1) if first and done else None,
        "memory_status": (status or {}).get("memory") if isinstance(status, dict) else None,
        "loadavg_start": load_start,
        "loadavg_end": measure.loadavg(),
        "log": None if ok else str(log_path),
    }
    log(f"{kind}: {row}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--budget", default="256Mi")
    parser.add_argument("--runs", default="budget,unlimited")
    parser.add_argument("--trace", action="store_true", help="log the worker's memory every 5 s")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    parser.add_argument("--bootstrap", help="use this broker instead of starting the test harness's")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()
    if args.bootstrap:
        bootstrap = args.bootstrap
    else:
        import run as bench_run

        bootstrap, _version = bench_run.kafka_up()
    source = ensure_input(bootstrap, args.events, args.partitions)
    rows = [run_once(kind, args, bootstrap, source) for kind in args.runs.split(",")]
    command = " ".join(["bench/memory_bench.py", *sys.argv[1:]])
    doc: dict[str, Any] = {"runs": rows}
    if args.out.exists():
        with contextlib.suppress(ValueError):
            doc = json.loads(args.out.read_text())
    # One entry per event count, so a 2M and a 10M run sit side by side in the table.
    doc.setdefault("by_events", {})[str(args.events)] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": measure.git_commit(),
        "command": f".venv/bin/python {command}",
        "events": args.events,
        "partitions": args.partitions,
        "budget": args.budget,
        "machine": measure.machine(),
        "runs": rows,
    }
    doc.pop("runs", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
