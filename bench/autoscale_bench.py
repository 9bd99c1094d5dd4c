"""Autoscaler benchmark: a load step against the autoscaler, a fixed parallelism of 1 and a fixed maximum.

Usage (from the repository root, with the project's virtualenv; the plot needs matplotlib,
``.venv/bin/python -m pip install matplotlib``)::

    .venv/bin/python bench/autoscale_bench.py [--capacity 200] [--partitions 4] [--base 30]
                                             [--step 150] [--after 150] [--runs auto,fixed1,fixedmax]

Each run is ``weir up`` (the local platform: the operator's reconciler with ``weir run`` worker
processes) on the test harness's broker, with every worker limited to ``--capacity`` records per
second (``WEIR_MAX_RECORDS_PER_SECOND``): a known capacity, so "2x one worker" means the same
on any machine. The job: 10 s event-time tumbling windows, count and sum per key, exactly-once,
checkpoints every second, on a ``--partitions``-partition topic.

The load trace, the same for every run: ``--base`` seconds at 0.5x one worker's capacity, then
``--step`` seconds at 2x, then ``--after`` seconds at 0.5x again, then nothing until the job has
caught up and every window is out. Recorded every second: the input rate produced, the job's
lag (``weir_operator.lag.LagReader``, the autoscaler's own reader: read_committed ends, markers
not counted), and the parallelism running (``status.json``).

Figures per run: the time from the step's start until the lag is back under two seconds of input
after its peak (``time to lag 0``; an exactly-once job commits every second, so its lag
saw-tooths up to about a second of input), the largest lag, rescales, worker-seconds (the running
parallelism integrated over the trace, until caught up), the time until caught up after the trace. **Output
checked**: the read_committed output equals the reference windows of every event produced,
each once; a run that differs is reported failed.

KEDA's rule, on the autoscaled run's recorded lag: ``min(partitions, ceil(total lag /
lagThreshold))`` (KEDA's Kafka scaler with ``allowIdleConsumers: false``; with a lag of 0 it
scales to ``minReplicaCount``, taken as 1), for ``lagThreshold`` 10 (its default) and 1000. It is
evaluated on the lag weir's autoscaler produced, so it says what KEDA would have asked for at each
moment, not how the job would have run under it.

Writes ``bench/results/autoscale.json`` and ``bench/results/autoscale.png``; ``bench/report.py``
renders them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402
from measure import log  # noqa: E402

from harness import kafka as kafka_server  # noqa: E402
from weir import spec  # noqa: E402
from weir.testing import reference_windows  # noqa: E402
from weir_operator.lag import LagReader  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
START_MS = 1_704_067_200_000
OUTPUTS = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "price"}}
SPECS = [(name, o["fn"], o.get("field")) for name, o in OUTPUTS.items()]
AUTOSCALER = {
    "enabled": True, "targetUtilization": 0.7, "metricsWindow": "20s",
    "scaleUpStabilizationWindow": "10s", "scaleDownStabilizationWindow": "60s",
    "maxScaleDownFactor": 0.5, "cooldown": "15s", "catchUpDuration": "60s",
}


class Load:
    """Produces the trace's records at a settable rate; keeps every event for the reference."""

    def __init__(self, kafka: kafka_server.KafkaHelper, topic: str, partitions: int) -> None:
        self.topic, self.partitions = topic, partitions
        self.rate = 0.0
        self.produced = 0
        self.events: list[tuple[int, str, int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._producer = kafka.producer()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._producer.flush(60)

    def _run(self) -> None:
        tick, due = 0.02, 0.0
        while not self._stop.is_set():
            due += self.rate * tick
            while due >= 1:
                due -= 1
                n = self.produced
                key = n % 16
                ts = START_MS + n * 10
                record = {"price": n % 7}
                self.events.append((key % self.partitions, f"k{key}", ts, record))
                self._producer.produce(self.topic, orjson.dumps({**record, "ts": ts}), f"k{key}".encode(),
                                       partition=key % self.partitions)
                self.produced += 1
            self._producer.poll(0)
            time.sleep(tick)


def _manifest(path: Path, name: str, bootstrap: str, source: str, sink: str, parallelism: int,
              autoscaler: dict[str, Any] | None) -> Path:
    document: dict[str, Any] = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "parallelism": parallelism,
            "kafka": {"bootstrapServers": bootstrap},
            "checkpoint": {"url": (path.parent / "store").as_uri(), "interval": "1s"},
            "pipeline": {
                "source": {"topics": [source], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": "1s", "idleTimeout": "3s"},
                "steps": [
                    {"window": {"type": "tumbling", "size": "10s"}},
                    {"aggregate": {"emit": "final", "outputs": OUTPUTS}},
                ],
                "sink": {"topic": sink},
                "deadLetter": {"topic": sink + "-dlq"},
            },
        },
    }
    if autoscaler is not None:
        document["spec"]["autoscaler"] = autoscaler
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _status(state: Path, name: str) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = orjson.loads((state / "bench" / name / "status.json").read_bytes())
        return loaded
    except (OSError, orjson.JSONDecodeError):
        return {}


def run_one(
    kind: str, args: argparse.Namespace, kafka: kafka_server.KafkaHelper, work: Path
) -> dict[str, Any]:
    """One configuration through the whole trace; the per-second trace and the figures."""
    name = f"as-{kind}-{os.getpid()}"
    source, sink = kafka.unique("as-src"), kafka.unique("as-out")
    kafka.create_topic(source, args.partitions)
    kafka.create_topic(sink, 1)
    kafka.create_topic(sink + "-dlq", 1)
    parallelism = {"auto": 1, "fixed1": 1, "fixedmax": args.partitions}[kind]
    directory = work / kind
    directory.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(directory / "job.yaml", name, kafka.bootstrap, source, sink, parallelism,
                         AUTOSCALER if kind == "auto" else None)
    state, log_path = directory / "state", directory / "up.log"
    env = {**os.environ, "WEIR_MAX_RECORDS_PER_SECOND": str(args.capacity)}
    reader = LagReader({})
    job = spec.parse_manifest(manifest)
    load = Load(kafka, source, args.partitions)
    trace: list[dict[str, Any]] = []
    low, high = 0.5 * args.capacity, 2.0 * args.capacity
    with log_path.open("wb") as sink_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "weir", "up", str(manifest), "--state-dir", str(state),
             "--bootstrap-servers", kafka.bootstrap, "--interval", "0"],
            stdout=sink_log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 90
        while _status(state, name).get("phase") != "Running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: the job did not start; see {log_path}")
            time.sleep(0.5)
        load.start()
        start = time.monotonic()
        end_of_trace = args.base + args.step + args.after
        caught_up_at = None
        last_produced, last_t = 0, None
        while True:
            t = time.monotonic() - start
            load.rate = (low if t < args.base else high if t < args.base + args.step
                         else low if t < end_of_trace else 0.0)
            reading = reader.read(job)
            status = _status(state, name)
            produced = load.produced
            rate = (produced - last_produced) / (t - last_t) if last_t is not None and t > last_t else 0.0
            last_produced, last_t = produced, t
            trace.append({
                "t": round(t, 2), "target_rate": load.rate, "input_rate": round(rate, 1),
                "lag": reading.records if reading.error is None else None,
                "parallelism": status.get("parallelism"),
                "recommendation": (status.get("autoscaler") or {}).get("recommendation"),
            })
            if t >= end_of_trace and reading.error is None and reading.records == 0 and caught_up_at is None:
                caught_up_at = t
            if caught_up_at is not None and t > caught_up_at + 10:
                break
            if t > end_of_trace + args.drain_limit:
                log(f"{kind}: not caught up {args.drain_limit} s after the trace")
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - start - t)))
        load.stop()
        expected, _late = reference_windows(load.events, "tumbling", 10_000, None, None, 0, 1000, SPECS)
        wait_until = time.monotonic() + 120
        problems: list[str] = []
        results: dict[Any, Any] = {}
        while time.monotonic() < wait_until:
            results, problems = _read_results(kafka, sink)
            if len(results) >= len(expected):
                break
            time.sleep(2)
        time.sleep(3)
        results, problems = _read_results(kafka, sink)
        if results != expected:
            missing = len(set(expected) - set(results))
            wrong = sum(1 for k, v in results.items() if k in expected and expected[k] != v)
            problems.append(f"output differs from the reference: {missing} windows missing, {wrong} wrong, "
                            f"{len(set(results) - set(expected))} unexpected")
        final = _status(state, name)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    history = (final.get("autoscaler") or {}).get("history") or []
    return {
        "kind": kind,
        "events": len(load.events),
        "windows": len(expected),
        "status": "ok" if not problems else "failed",
        "problems": problems,
        "trace": trace,
        "decisions": [{k: d[k] for k in ("at", "direction", "fromParallelism", "toParallelism", "reason")}
                      for d in reversed(history)],
        "figures": figures(trace, args, caught_up_at),
    }


def _read_results(kafka: kafka_server.KafkaHelper, sink: str) -> tuple[dict[Any, Any], list[str]]:
    results: dict[Any, Any] = {}
    problems = []
    for message in kafka.read_all(sink, timeout=30):
        record = orjson.loads(message.value or b"{}")
        key = (record["key"], record["windowStartMs"], record["windowEndMs"])
        if key in results:
            problems.append(f"window {key} emitted twice")
        results[key] = {n: record[n] for n in OUTPUTS}
    return results, problems


def figures(
    trace: list[dict[str, Any]], args: argparse.Namespace, caught_up_at: float | None
) -> dict[str, Any]:
    step_start = args.base
    lags = [(p["t"], p["lag"]) for p in trace if p["lag"] is not None]
    after_step = [(t, lag) for t, lag in lags if t >= step_start]
    peak_t, peak = max(after_step, key=lambda x: x[1]) if after_step else (None, None)
    # Lag 0: under two seconds of the input arriving then (an exactly-once job commits each second,
    # so its lag saw-tooths up to about one second of input).
    if peak_t is not None and peak <= max(1.0, 2 * _target(peak_t, args)):
        settled: float | None = step_start  # never behind by more than that
    else:
        settled = next((t for t, lag in after_step if peak_t is not None and t > peak_t
                        and lag <= max(1.0, 2 * _target(t, args))), None)
    worker_seconds = 0.0
    rescales = 0
    previous = None
    for a, b in itertools.pairwise(trace):
        workers = a["parallelism"] or 0
        worker_seconds += workers * (b["t"] - a["t"])
        if previous is not None and workers and workers != previous:
            rescales += 1
        if workers:
            previous = workers
    return {
        "peak_lag": peak,
        "time_to_lag_zero_s": round(settled - step_start, 1) if settled is not None else None,
        "caught_up_after_trace_s": round(caught_up_at - (args.base + args.step + args.after), 1)
        if caught_up_at is not None else None,
        "rescales": rescales,
        "worker_seconds": round(worker_seconds),
        "duration_s": trace[-1]["t"] if trace else 0,
    }


def _target(t: float, args: argparse.Namespace) -> float:
    low, high = 0.5 * args.capacity, 2.0 * args.capacity
    if t < args.base:
        return low
    if t < args.base + args.step:
        return high
    return low if t < args.base + args.step + args.after else 0.0


def keda(trace: list[dict[str, Any]], partitions: int, threshold: int) -> dict[str, Any]:
    """KEDA's Kafka scaler rule evaluated on a recorded lag trace."""
    chosen = []
    for point in trace:
        lag = point["lag"]
        if lag is None:
            chosen.append(None)
            continue
        chosen.append(max(1, min(partitions, math.ceil(lag / threshold))))
    changes = sum(1 for a, b in itertools.pairwise(chosen) if a and b and a != b)
    seconds = sum((c or 0) * (b["t"] - a["t"])
                  for c, (a, b) in zip(chosen, itertools.pairwise(trace), strict=False))
    return {"threshold": threshold, "parallelism": chosen, "changes": changes,
            "worker_seconds": round(seconds)}


def plot(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["kind"]: r for r in doc["runs"]}
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    most = doc["parameters"]["partitions"]
    labels = {"auto": "autoscaler", "fixed1": "fixed 1", "fixedmax": f"fixed {most}"}
    colors = {"auto": "tab:blue", "fixed1": "tab:red", "fixedmax": "tab:green"}
    styles = {"auto": "-", "fixed1": "--", "fixedmax": "--"}
    for kind, run in runs.items():
        ts = [p["t"] for p in run["trace"]]
        axes[0].step(ts, [p["parallelism"] or 0 for p in run["trace"]], where="post", label=labels[kind],
                     color=colors[kind], linestyle=styles[kind], linewidth=2 if kind == "auto" else 1.2)
        axes[2].plot(ts, [p["lag"] if p["lag"] is not None else float("nan") for p in run["trace"]],
                     label=labels[kind], color=colors[kind])
    auto = runs.get("auto")
    if auto is not None:
        ts = [p["t"] for p in auto["trace"]]
        axes[1].step(ts, [p["parallelism"] or 0 for p in auto["trace"]], where="post", color="tab:blue",
                     linewidth=2, label="autoscaler (ran)")
        for k, color in zip(doc.get("keda", []), ("tab:orange", "tab:purple"), strict=False):
            axes[1].step(ts, [c or 0 for c in k["parallelism"]], where="post", color=color, linestyle=":",
                         label=f"KEDA rule, lagThreshold {k['threshold']}")
        axes[3].plot(ts, [p["input_rate"] for p in auto["trace"]], color="tab:gray", label="input rate")
    axes[3].axhline(doc["parameters"]["capacity"], color="black", linestyle="--", linewidth=0.8,
                    label="one worker's capacity")
    axes[0].set_ylabel("workers running")
    axes[1].set_ylabel("workers asked for\n(on the autoscaler's lag)")
    axes[2].set_ylabel("lag (records)")
    axes[2].set_yscale("symlog", linthresh=100)
    axes[2].set_ylim(bottom=0)
    axes[3].set_ylabel("records/s")
    axes[3].set_xlabel("seconds since the trace began")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("Load step 0.5x → 2x → 0.5x one worker's capacity: parallelism, lag, input")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=float, default=200.0, help="records/s one worker processes")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--base", type=float, default=30.0, help="seconds at 0.5x before the step")
    parser.add_argument("--step", type=float, default=150.0, help="seconds at 2x")
    parser.add_argument("--after", type=float, default=150.0, help="seconds at 0.5x after the step")
    parser.add_argument("--drain-limit", type=float, default=600.0, help="longest wait to catch up after it")
    parser.add_argument("--runs", default="auto,fixed1,fixedmax")
    parser.add_argument("--plot-only", action="store_true",
                        help="recompute the figures and redraw the PNG from autoscale.json")
    args = parser.parse_args()
    out_json, out_png = RESULTS / "autoscale.json", RESULTS / "autoscale.png"
    if args.plot_only:
        doc = json.loads(out_json.read_text())
        for name, value in doc["parameters"].items():
            setattr(args, name, value)
        for run in doc["runs"]:
            trace = run["trace"]
            end = args.base + args.step + args.after
            caught = next((p["t"] for p in trace if p["t"] >= end and p["lag"] == 0), None)
            run["figures"] = figures(trace, args, caught)
        out_json.write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, out_png)
        return 0
    running = kafka_server.up()
    kafka = kafka_server.KafkaHelper(str(running.info["bootstrap"]))
    load_start = measure.loadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="weir-autoscale-") as tmp:
        for kind in args.runs.split(","):
            log(f"autoscale bench: {kind}")
            runs.append(run_one(kind, args, kafka, Path(tmp)))
            log(f"  {runs[-1]['status']} {runs[-1]['figures']} {runs[-1]['problems'][:3]}")
    doc: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": measure.git_commit(),
        "command": " ".join(["bench/autoscale_bench.py", *sys.argv[1:]]),
        "machine": {**measure.machine(), "loadavg_start": load_start, "loadavg": measure.loadavg()},
        "parameters": {k: getattr(args, k) for k in ("capacity", "partitions", "base", "step", "after")},
        "autoscaler": AUTOSCALER,
        "runs": runs,
    }
    auto = next((r for r in runs if r["kind"] == "auto"), None)
    if auto is not None:
        doc["keda"] = [keda(auto["trace"], args.partitions, t) for t in (10, 1000)]
    RESULTS.mkdir(exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out_png)
    log(f"wrote {out_json} and {out_png}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
