"""weir benchmark: one weir worker beside the raw consume ceiling, Quix Streams, Bytewax and Apache Flink.

Usage (from the repository root, with the project's virtualenv; ``make bench-setup`` first)::

    .venv/bin/python bench/run.py [--events N] [--keys K] [--partitions P] [--quick]
                                  [--repeat R] [--runners a,b,...] [--no-latency]
                                  [--latency-rate R] [--latency-seconds S] [--latency-speedup X]
                                  [--eos-checkpoint-interval S] [--profile | --no-profile]
                                  [--bootstrap HOST:PORT]

See bench/README.md for what is measured and how; BENCHMARKS.md and
bench/results/latest.json are rewritten by each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import generate
import hotpath
import measure
import orjson
import report
import runners
from measure import log

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
RUN_TIMEOUT_S = 900.0
BROKER_PID: int | None = None
"""The broker's process when it runs on this machine (found by its port), for its CPU figure."""
START_TIMEOUT_S = 180.0


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


def versions(kafka_version: str, all_runners: list[runners.Runner]) -> dict[str, Any]:
    from importlib.metadata import version

    import confluent_kafka

    import weir

    def v(name: str) -> str:
        try:
            return version(name)
        except Exception:  # noqa: BLE001
            return "unknown"

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "weir": weir.__version__,
        "confluent_kafka": v("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "orjson": v("orjson"),
        "rocksdict": v("rocksdict"),
        "kafka_broker": kafka_version,
    }
    for r in all_runners:
        if not r.key.startswith("weir") and r.unavailable() is None:
            out[r.key] = r.versions()
    return out


# --------------------------------------------------------------------------- (a) the ceiling


def ceiling_child(bootstrap: str, topic: str, records: int, batch: int) -> None:
    """Runs in a child process: raw confluent-kafka batch consume + orjson.loads of every value.

    Uses the weir worker's own consumer configuration (``weir.kafka.consumer_config``), so
    the ceiling and weir differ only in what happens to each record. Prints one JSON line.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from weir import kafka as kio

    config = kio.consumer_config(
        kio.KafkaSettings(bootstrap, {}, {}), f"weir-bench-ceiling-{os.getpid()}", "earliest"
    )
    consumer = Consumer(config)
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    loads = orjson.loads
    n = nbytes = 0
    t_first = None
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while n < records:
        # consume() returns when it has `batch` records or the timeout passed: a short timeout
        # keeps the last, partial batch from adding a wait to the ceiling's time.
        msgs = consumer.consume(num_messages=batch, timeout=0.02)
        if not msgs:
            if time.monotonic() > deadline:
                raise SystemExit(f"ceiling: timed out after {n} of {records} records")
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
                "seconds": t_last - t_first,
                "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                # VmHWM, not ru_maxrss: the latter includes the forking parent's high-water mark.
                "peak_rss_mib": measure.proc_mem_mib(os.getpid())["peak_rss_mib"],
            }
        )
    )


def run_ceiling(bootstrap: str, topic: str, events: int, partitions: int) -> dict[str, Any]:
    load_before = measure.loadavg()
    records = events + partitions
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_ceiling", bootstrap, topic, str(records), "10000"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ceiling runner failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["records"] != records:
        raise RuntimeError(f"ceiling read {r['records']} records, want {records}")
    r["events_per_s"] = events / r["seconds"]
    r["cpu_us_per_event"] = r["cpu_s"] / events * 1e6
    r["loadavg_before"] = load_before
    r["loadavg_after"] = measure.loadavg()
    return r


# --------------------------------------------------------------------------- driving a runner process


class Process:
    """A runner's process: started in its own session, sampled, stopped with SIGTERM (SIGKILL after 30 s)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env},
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.proc.pid
        self.cpu = measure.CpuSamples(lambda: measure.proc_cpu_s(self.pid))
        self.machine = measure.CpuSamples(measure.machine_busy_s)
        """The whole machine's busy CPU (the broker's, the reader's, everything's)."""
        self.broker = measure.CpuSamples(lambda: measure.own_cpu_s(BROKER_PID or -1))
        """The broker's CPU, when it runs on this machine (``BROKER_PID``)."""
        self.reader = measure.CpuSamples(lambda: sum(os.times()[:2]))
        """The benchmark's own CPU: reading and checking results, sampling."""
        self.threads: list[tuple[float, dict[str, float]]] = []  # (epoch s, CPU s by kind)
        """``measure.thread_cpu_s`` at the runner's first record and at its last result."""
        self.exit_code: int | None = None
        self.rusage: Any = None
        self.mem: dict[str, float] = {}
        self._sampled = -math.inf

    def alive(self) -> bool:
        """Reaps the process when it has exited (keeping its rusage); True while it runs."""
        if self.exit_code is not None:
            return False
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.exit_code
        self.rusage = usage
        # ru_maxrss is no use here: Linux carries the forking parent's high-water mark (this
        # benchmark's, with the reference in memory) into the child across exec. VmHWM, sampled
        # while the process lived, is the child's own.
        return False

    def snapshot(self, every: float = 0.02) -> None:
        """Samples CPU and memory now (while the process lives), unless the last sample is less
        than ``every`` seconds old: a driving loop that wakes per result read stays cheap."""
        now = time.monotonic()
        if now - self._sampled < every:
            return
        self._sampled = now
        self.cpu.sample()
        self.machine.sample()
        if BROKER_PID is not None:
            self.broker.sample()
        self.reader.sample()
        if self.alive():
            with contextlib.suppress(OSError):
                mem = measure.proc_mem_mib(self.pid)
                # A process that has exited but is not reaped yet (a zombie) shows no Vm* lines.
                if mem["peak_rss_mib"] >= self.mem.get("peak_rss_mib", 0.0):
                    self.mem = mem

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                while self.alive():
                    time.sleep(0.05)
        else:
            # A runner that stopped by itself (Bytewax at the end of the topic) may leave children.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def thread_cores(snapshots: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """The runner's CPU by kind of thread over the run (``python_cores``, ``librdkafka_cores``, ...)
    from the two timed ``measure.thread_cpu_s`` snapshots, per second between them; read from
    /proc once the first record was known (a ``/status`` round trip after it, for weir) and when
    the last result was seen, so good to a clock tick and a loop turn (~50 ms) at each end."""
    if len(snapshots) < 2:
        return {}
    (t0, first), (t1, last) = snapshots[0], snapshots[-1]
    seconds = max(t1 - t0, 1e-9)
    return {f"{kind}_cores": max(0.0, last[kind] - first[kind]) / seconds for kind in first}


def new_context(bootstrap: str, source: str, live: bool, consumer: dict[str, Any]) -> runners.Context:
    run_id = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}-{time.monotonic_ns() % 100000}"
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    return runners.Context(bootstrap, source, f"weir-bench-out-{run_id}", work, run_id, live, consumer)


def check_output(
    runner: runners.Runner, ctx: runners.Context, reader: measure.SinkReader, expected: dict[Any, Any],
    proc: Process,
) -> list[str]:  # fmt: skip
    results = {k: v for k, v in reader.results.items() if k in expected}
    problems = measure.verify(results, expected)
    if reader.duplicates:
        problems.append(f"{reader.duplicates} duplicate window results")
    if reader.malformed:
        problems.append(f"{len(reader.malformed)} malformed results, e.g. {reader.malformed[:2]}")
    if isinstance(runner, runners.Weir):
        dead = runner.dead_letters(ctx)
        if dead:
            problems.append(f"{dead} records in the dead-letter topic")
        if proc.exit_code not in (0, None):
            problems.append(f"worker exited with {proc.exit_code} after SIGTERM")
    return problems


def run_throughput(
    runner: runners.Runner,
    bootstrap: str,
    source: str,
    events: int,
    partitions: int,
    expected: dict[tuple[str, int], tuple[int, float]],
    consumer: dict[str, Any],
) -> dict[str, Any]:
    """Runs one runner over the recorded topic until every expected window is readable; checks them."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    ctx = new_context(bootstrap, source, False, consumer)
    generate.create_topic(AdminClient({"bootstrap.servers": bootstrap}), ctx.sink, partitions)
    runner.prepare(ctx)
    reader = measure.SinkReader(bootstrap, ctx.sink, expected=expected)
    cmd, env = runner.command(ctx)
    load_before = measure.loadavg()
    proc = Process(cmd, env, ctx.work / "runner.log")
    t_first: float | None = None
    t_done: float | None = None
    failure = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        exited_at = None
        while True:
            proc.snapshot()
            if t_first is None:
                t_first = runner.first_record(ctx, proc.log_path)
                if t_first is not None:
                    proc.threads.append((time.time(), measure.thread_cpu_s(proc.pid)))
            reader.poll(0.02 if t_first is None else 0.05)
            if not reader.awaiting and t_first is not None:
                t_done = max(reader.arrived[k] for k in expected)
                proc.threads.append((time.time(), measure.thread_cpu_s(proc.pid)))
                break
            if not proc.alive():
                # Bytewax stops at the end of the topic: read what it wrote, then judge.
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 5:
                    failure = f"exited with {proc.exit_code} before writing every window"
                    break
            if time.monotonic() > deadline:
                failure = f"timed out after {RUN_TIMEOUT_S:.0f} s"
                break
        proc.snapshot(every=0)
        if failure is None:
            reader.settle(0.5)  # a straggling duplicate or extra window shows up before judging
    finally:
        proc.stop()
        reader.close()
    got = len(reader.results.keys() & expected.keys())
    problems = [failure] if failure else []
    problems += check_output(runner, ctx, reader, expected, proc)
    if problems:
        return {
            "status": "failed",
            "problems": problems,
            "windows_read": got,
            "kept": str(ctx.work),
            "log_tail": proc.tail(),
        }
    runner.cleanup(ctx)
    subprocess.run(["rm", "-rf", str(ctx.work)], check=False)
    assert t_first is not None and t_done is not None
    seconds = t_done - t_first
    cpu_s = proc.cpu.at(t_done) - proc.cpu.at(t_first)
    machine_s = proc.machine.at(t_done) - proc.machine.at(t_first)
    broker_s = proc.broker.at(t_done) - proc.broker.at(t_first)
    return {
        "status": "ok",
        "records": events,
        "windows": len(expected),
        "seconds": seconds,
        "events_per_s": events / seconds,
        "cpu_s": cpu_s,
        "cpu_us_per_event": cpu_s / events * 1e6,
        "cpu_s_process_total": proc.cpu.cpu[-1] if proc.cpu.cpu else None,
        "machine_busy_cores": machine_s / seconds,
        "broker_cores": broker_s / seconds if proc.broker.t else None,
        "reader_cores": (proc.reader.at(t_done) - proc.reader.at(t_first)) / seconds,
        **thread_cores(proc.threads),
        **proc.mem,
        "loadavg_before": load_before,
        "loadavg_after": measure.loadavg(),
    }


# --------------------------------------------------------------------------- latency run


def ideal_close_times(
    log_rows: list[tuple[float, int, str, int, float]], partitions: int
) -> list[tuple[list[int], list[float]]]:
    """Per partition: running maximum event time and the wall time it was produced, for bisecting."""
    per: list[tuple[list[int], list[float]]] = [([], []) for _ in range(partitions)]
    highest = [-(1 << 62)] * partitions
    for t, p, _key, ts, _price in log_rows:
        if ts > highest[p]:
            highest[p] = ts
            per[p][0].append(ts)
            per[p][1].append(t)
    return per


def run_latency(
    runner: runners.Runner,
    bootstrap: str,
    partitions: int,
    keys: int,
    rate: float,
    seconds: float,
    speedup: float,
    consumer: dict[str, Any],
) -> dict[str, Any]:
    """Produces live events at ``rate`` and times each event until its window's result is readable."""
    import bisect

    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    run_source = (
        f"weir-bench-live-{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}-{time.monotonic_ns() % 100000}"
    )
    generate.create_topic(admin, run_source, partitions)
    ctx = new_context(bootstrap, run_source, True, consumer)
    generate.create_topic(admin, ctx.sink, partitions)
    runner.prepare(ctx)
    reader = measure.SinkReader(bootstrap, ctx.sink)
    cmd, env = runner.command(ctx)
    load_before = measure.loadavg()
    proc = Process(cmd, env, ctx.work / "runner.log")
    # Event time starts a whole minute in the past (so weir's idle timeout, which follows the
    # wall clock, never moves a watermark past data still to come) and runs `speedup` x faster.
    span_ms = int((seconds + 3 * START_TIMEOUT_S) * speedup * 1000)
    base_ts = (int(time.time() * 1000) - span_ms) // generate.WINDOW_MS * generate.WINDOW_MS
    producer = generate.LiveProducer(bootstrap, run_source, partitions, keys, rate, speedup, base_ts)
    tail_s = max(2.0, 3 * generate.WINDOW_MS / 1000 / speedup)
    failure = None
    t_measure = t_cut = 0.0
    produced_measured = 0
    expected: dict[tuple[str, int], tuple[int, float]] = {}
    counted: set[tuple[str, int]] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not runner.ready(ctx):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{runner.key} did not start:\n{proc.tail()}")
            time.sleep(0.05)
        producer.start()
        # Warm-up: until the runner has emitted a first window (JVM start, topic metadata, ...).
        deadline = time.monotonic() + START_TIMEOUT_S
        while not reader.results:
            proc.snapshot()
            reader.poll(0.05)
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{runner.key} produced no result while warming up:\n{proc.tail()}")
        t_measure = time.time()
        ts_measure = producer.event_time(t_measure)
        n_measure = len(producer.log)
        while time.time() < t_measure + seconds:
            proc.snapshot()
            reader.poll(0.05)
        t_cut = time.time()
        ts_cut = producer.event_time(t_cut)
        produced_measured = len(producer.log) - n_measure
        proc.snapshot(every=0)
        # Keep producing a little so every counted window is closed by data in every runner.
        while time.time() < t_cut + tail_s:
            proc.snapshot()
            reader.poll(0.05)
        producer.stop()
        # Windows checked: all that end (plus the bound and the disorder) before the cut.
        cut_end = ts_cut - generate.OUT_OF_ORDER_MS - generate.DISORDER_MS
        sums: dict[tuple[str, int], list[Any]] = {}
        for _t, _p, key, ts, price in producer.log:
            start = ts - ts % generate.WINDOW_MS
            if start + generate.WINDOW_MS <= cut_end:
                acc = sums.setdefault((key, start), [0, 0.0])
                acc[0] += 1
                acc[1] += price
        expected = {k: (c, s) for k, (c, s) in sums.items()}
        counted = {k for k in expected if k[1] >= ts_measure}
        deadline = time.monotonic() + 60
        while len(reader.results.keys() & expected.keys()) < len(expected) and time.monotonic() < deadline:
            proc.snapshot()
            reader.poll(0.05)
            if not proc.alive():
                break
        proc.snapshot(every=0)
        reader.settle(0.3)
    except RuntimeError as exc:
        failure = str(exc)
    finally:
        with contextlib.suppress(Exception):
            if producer._thread.is_alive():
                producer.stop()
        proc.stop()
        reader.close()
    problems = [failure] if failure else []
    if not failure:
        problems += check_output(runner, ctx, reader, expected, proc)
    if not failure and not counted:
        problems.append("no window fell inside the measured interval")
    if problems:
        return {"status": "failed", "problems": problems, "kept": str(ctx.work), "log_tail": proc.tail()}
    per_partition = ideal_close_times(producer.log, partitions)
    close_ideal: dict[tuple[str, int], float] = {}
    partition_of = dict(zip(producer.products, producer.partition_of, strict=True))
    for k in counted:
        highs, times = per_partition[partition_of[k[0]]]
        # weir's rule, which Flink and Quix match within a millisecond: the window closes when
        # the partition's event time reaches end + bound - 1.
        i = bisect.bisect_left(highs, k[1] + generate.WINDOW_MS + generate.OUT_OF_ORDER_MS - 1)
        close_ideal[k] = times[min(i, len(times) - 1)]
    latencies, ideal = [], []
    for t, _p, key, ts, _price in producer.log:
        k = (key, ts - ts % generate.WINDOW_MS)
        if k in counted:
            latencies.append(reader.arrived[k] - t)
            ideal.append(close_ideal[k] - t)
    delays = [reader.arrived[k] - close_ideal[k] for k in counted]
    cpu_s = proc.cpu.at(t_cut) - proc.cpu.at(t_measure)
    runner.cleanup(ctx)
    measure.delete_topics(bootstrap, [run_source])
    subprocess.run(["rm", "-rf", str(ctx.work)], check=False)
    pct = measure.percentile
    return {
        "status": "ok",
        "rate": rate,
        "achieved_rate": produced_measured / (t_cut - t_measure),
        "speedup": speedup,
        "measured_s": t_cut - t_measure,
        "windows_checked": len(expected),
        "windows_counted": len(counted),
        "events_counted": len(latencies),
        "latency_p50_s": pct(latencies, 50),
        "latency_p99_s": pct(latencies, 99),
        "ideal_p50_s": pct(ideal, 50),
        "ideal_p99_s": pct(ideal, 99),
        "close_delay_p50_s": pct(delays, 50),
        "close_delay_p99_s": pct(delays, 99),
        "cpu_cores": cpu_s / (t_cut - t_measure),
        **proc.mem,
        "loadavg_before": load_before,
        "loadavg_after": measure.loadavg(),
    }


# --------------------------------------------------------------------------- main


def no_nan(o: Any) -> Any:
    """NaN (an empty percentile) as null: JSON has no NaN."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: no_nan(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [no_nan(v) for v in o]
    return o


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def parse_properties(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--consumer-property wants KEY=VALUE, got {item!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def summary_line(key: str, r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{key}: {r.get('status')}: {'; '.join(r.get('problems', []))[:300]}"
    return (
        f"{key}: {r['events_per_s']:>9,.0f} events/s, {r['cpu_s']:.2f} CPU s, "
        f"{r.get('peak_rss_mib', 0):.0f} MiB, load {r['loadavg_after']}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ceiling":
        ceiling_child(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(prog="bench/run.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--events", type=int, help="events in the input topic (default 2,000,000; --quick 200,000)"
    )
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys (default 1000)")
    parser.add_argument("--partitions", type=int, default=4, help="input topic partitions (default 4)")
    parser.add_argument("--quick", action="store_true", help="200,000 events, 2 repeats, a 10 s latency run")
    parser.add_argument(
        "--repeat", type=int, help="interleaved throughput runs of each runner (default 5; --quick 2)"
    )
    parser.add_argument(
        "--runners",
        help=(
            "comma-separated subset of ceiling,weir,weir_py,weir_eos,weir_2w,weir_kf,weir_kf_py,"
            "quix,bytewax,flink (default: all)"
        ),
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the rate-limited latency runs")
    parser.add_argument("--latency-rate", type=float, default=5000, help="events/s in the latency run (5000)")
    parser.add_argument(
        "--latency-seconds", type=float, help="measured seconds of the latency run (default 60; --quick 10)"
    )
    parser.add_argument(
        "--latency-speedup", type=float, default=60,
        help="event time runs this many times faster than the wall clock in the latency run (60)",
    )  # fmt: skip
    parser.add_argument(
        "--eos-checkpoint-interval", type=float, default=1.0,
        help="--checkpoint-interval of the exactly-once weir run, seconds (1)",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile weir's hot path (the default; kept for old command lines)",
    )
    parser.add_argument("--no-profile", action="store_true", help="keep the last profile")
    parser.add_argument(
        "--consumer-property", action="append", default=[], metavar="KEY=VALUE",
        help="extra librdkafka consumer property for the weir runs (spec.kafka.consumer); repeatable",
    )  # fmt: skip
    parser.add_argument("--bootstrap", help="use this broker instead of starting the test harness's")
    args = parser.parse_args(argv)
    events = args.events or (200_000 if args.quick else generate.DEFAULT_EVENTS)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    latency_s = args.latency_seconds or (10.0 if args.quick else 60.0)
    if repeat < 1 or events < 1:
        parser.error("--repeat and --events must be at least 1")
    do_profile = not args.no_profile
    consumer = parse_properties(args.consumer_property)
    command = ".venv/bin/python bench/run.py" + ("" if not argv else " " + " ".join(argv))

    all_runners = runners.all_runners(args.eos_checkpoint_interval)
    known = ["ceiling", *(r.key for r in all_runners)]
    chosen = known if not args.runners else [s.strip() for s in args.runners.split(",") if s.strip()]
    unknown = [k for k in chosen if k not in known]
    if unknown:
        parser.error(f"--runners: unknown {unknown}; choose from {known}")
    selected = [r for r in all_runners if r.key in chosen]
    status: dict[str, str] = {"ceiling": "ok" if "ceiling" in chosen else "not run"}
    for r in all_runners:
        reason = r.unavailable() if r in selected else "not run"
        status[r.key] = (
            "ok" if reason is None else (reason if reason == "not run" else f"unavailable: {reason}")
        )
    active = [r for r in selected if status[r.key] == "ok"]

    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_start = measure.loadavg()
    if args.bootstrap:
        bootstrap, kafka_version = args.bootstrap, broker_version(args.bootstrap)
    else:
        bootstrap, kafka_version = kafka_up()
    global BROKER_PID
    host, _, port = bootstrap.rpartition(":")
    if host in ("127.0.0.1", "localhost", "::1", "[::1]") and port.isdigit():
        BROKER_PID = measure.listener_pid(int(port))
    log(f"broker {bootstrap} (Kafka {kafka_version}, pid {BROKER_PID}); load average {load_start}")
    for key, st in status.items():
        if st != "ok":
            log(f"{key}: {st}")
    topic = generate.ensure_input(bootstrap, events, args.keys, args.partitions, log=log)
    t = time.monotonic()
    expected = generate.reference(events, args.keys)
    sample = min(events, 20_000)
    avg_bytes = sum(len(v) for *_, v in generate.events(sample, args.keys)) / sample
    log(f"reference: {len(expected):,} windows ({time.monotonic() - t:.1f} s)")

    failed = False
    runs: list[dict[str, Any]] = []
    for i in range(repeat):
        run: dict[str, Any] = {}
        if status["ceiling"] == "ok":
            run["ceiling"] = run_ceiling(bootstrap, topic, events, args.partitions)
            log(f"run {i + 1}/{repeat} {summary_line('ceiling', {'status': 'ok', **run['ceiling']})}")
        for r in active:
            run[r.key] = res = run_throughput(
                r, bootstrap, topic, events, args.partitions, expected, consumer
            )
            failed |= res["status"] != "ok"
            log(f"run {i + 1}/{repeat} {summary_line(r.key, res)}")
        runs.append(run)

    latency: dict[str, Any] = {}
    if not args.no_latency:
        for r in active:
            if not getattr(r, "latency_run", True):
                continue  # the Python-path and 2-worker rows are throughput figures
            log(
                f"latency: {r.key} at {args.latency_rate:,.0f} events/s for {latency_s:.0f} s "
                f"(event time x{args.latency_speedup:g})"
            )
            latency[r.key] = res = run_latency(
                r, bootstrap, args.partitions, args.keys, args.latency_rate, latency_s,
                args.latency_speedup, consumer,
            )  # fmt: skip
            failed |= res["status"] != "ok"
            if res["status"] == "ok":
                log(
                    f"latency: {r.key} p50 {res['latency_p50_s']:.3f} s, p99 {res['latency_p99_s']:.3f} s "
                    f"(ideal {res['ideal_p50_s']:.3f} / {res['ideal_p99_s']:.3f}), "
                    f"{res['windows_counted']:,} windows, load {res['loadavg_after']}"
                )
            else:
                log(f"latency: {r.key} failed: {'; '.join(res['problems'])[:500]}")

    profile = None
    if do_profile:
        try:
            profile = hotpath.profile_run(bootstrap, args.keys, args.partitions, log)
            profile["started"] = started
            profile["git"] = measure.git_commit()
            RESULTS.mkdir(parents=True, exist_ok=True)
            write_atomic(RESULTS / "profile-latest.json", json.dumps(profile, indent=2) + "\n")
        except Exception as exc:  # noqa: BLE001 - the runtime's internals move; say so, keep the figures
            log(f"profile failed: {exc!r}")
            profile = {"error": repr(exc), "started": started, "git": measure.git_commit()}
    else:
        with contextlib.suppress(OSError, ValueError):
            profile = json.loads((RESULTS / "profile-latest.json").read_text())

    doc: dict[str, Any] = {
        "started": started,
        "command": command,
        "git": measure.git_commit(),
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
            "out_of_orderness_ms": generate.OUT_OF_ORDER_MS,
            "disorder_ms": generate.DISORDER_MS,
            "eos_checkpoint_interval_s": args.eos_checkpoint_interval,
            "latency": None
            if args.no_latency
            else {"rate": args.latency_rate, "seconds": latency_s, "speedup": args.latency_speedup},
        },
        "weir_consumer_overrides": consumer,
        "runners": {
            "ceiling": {
                "label": report.CEILING_LABEL,
                "status": status["ceiling"],
                "notes": report.CEILING_NOTES,
            },
            **{r.key: {"label": r.label, "status": status[r.key], "notes": r.notes} for r in all_runners},
        },
        "machine": measure.machine(),
        "versions": versions(kafka_version, all_runners),
        "loadavg_start": load_start,
        "loadavg_end": measure.loadavg(),
        "runs": runs,
        "latency": latency,
    }
    doc["summary"] = report.summarise(doc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(no_nan(doc), indent=2)
    write_atomic(RESULTS / f"{stamp}.json", text + "\n")
    write_atomic(RESULTS / "latest.json", text + "\n")
    write_atomic(ROOT / "BENCHMARKS.md", report.markdown(doc, profile))
    log(f"wrote BENCHMARKS.md and bench/results/{stamp}.json" + ("; SOME RUNS FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
