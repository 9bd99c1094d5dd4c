"""What the benchmark measures with: process CPU and memory, the sink reader, the output check, topics."""

from __future__ import annotations

import bisect
import collections
import contextlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import generate
import orjson

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


_GROUPS: dict[int, tuple[float, list[int]]] = {}
GROUP_RESCAN_S = 0.5


def _group(pid: int) -> list[int]:
    """``pid`` and every live process in its process group (a runner starts its own session, so
    a runner of several processes, like weir with 2 workers, is measured whole).

    Finding them means reading every process's stat in /proc; the driving loop samples every
    50 ms, and rescanning each time cost the benchmark's own process a quarter of a core, taken
    from the runner it measures on a 2-core machine. The members are rescanned every 0.5 s
    instead (a runner's processes start seconds before its first record).
    """
    now = time.monotonic()
    cached = _GROUPS.get(pid)
    if cached is not None and now - cached[0] < GROUP_RESCAN_S:
        return cached[1]
    members = [pid]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(_stat(f"/proc/{entry.name}/stat")[1][2]) == pid:  # pgrp
                members.append(int(entry.name))
    _GROUPS[pid] = (now, members)
    return members


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process and the rest of its process group, all their
    threads included (and children they have reaped)."""
    total = 0.0
    for member in _group(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += own_cpu_s(member)
    return total


def own_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, and children it has reaped),
    without looking for the rest of its group; OSError when it is gone."""
    fields = _stat(f"/proc/{pid}/stat")[1]
    return sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime


def _stat(path: str) -> tuple[bytes, list[bytes]]:
    """A /proc ``stat`` file: the command name and the fields after it (``fields[0]`` is the
    state); the name may hold spaces and parentheses, so it is cut at the last ``)``."""
    with open(path, "rb") as stat:
        raw = stat.read()
    head, _, rest = raw.rpartition(b")")
    return head[head.index(b"(") + 1 :], rest.split()


def proc_mem_mib(pid: int) -> dict[str, float]:
    """High-water mark and current RSS, summed over the process group (see ``proc_cpu_s``)."""
    out = {"VmHWM": 0.0, "VmRSS": 0.0}
    for member in _group(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] += int(line.split()[1]) / 1024
    return {"peak_rss_mib": round(out["VmHWM"], 1), "rss_mib": round(out["VmRSS"], 1)}


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of every thread of ``pid``'s process group so far, summed by kind: ``python``
    (the interpreter's threads: weir's loop, its HTTP server, the checkpoint uploader),
    ``librdkafka`` (its ``rdk:`` threads: fetching, parsing, producing), ``rocksdb`` and ``other``
    (a JVM's threads, for one). Read twice, it tells which threads a run's CPU went to; a thread
    that ended in between is missing from the second reading (weir's live as long as the worker)."""
    out = {"python": 0.0, "librdkafka": 0.0, "rocksdb": 0.0, "other": 0.0}
    for member in _group(pid):
        with contextlib.suppress(OSError), os.scandir(f"/proc/{member}/task") as tasks:
            for task in tasks:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    name, fields = _stat(f"{task.path}/stat")
                    kind = (
                        "librdkafka" if name.startswith(b"rdk:")
                        else "rocksdb" if name.startswith(b"rocksdb:")
                        else "python" if name.startswith(b"python")
                        else "other"
                    )  # fmt: skip
                    out[kind] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (the broker the benchmark runs
    against), or None when it is not found or not readable."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    with os.scandir("/proc") as processes:
        for entry in processes:
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError), os.scandir(f"/proc/{entry.name}/fd") as fds:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) in inodes:
                            return int(entry.name)
    return None


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot, all CPUs together (``/proc/stat``:
    user, nice, system, irq and softirq; idle, I/O wait and time stolen by a hypervisor are not)."""
    with open("/proc/stat", "rb") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


class CpuSamples:
    """(wall time, CPU seconds) as ``read()`` gives them (``proc_cpu_s`` of a process,
    ``machine_busy_s``), sampled by the driving loop; interpolated between samples.

    /proc counts CPU in clock ticks (10 ms), so a figure is good to about 10 ms of CPU plus
    the sampling interval around its two ends.
    """

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.t: list[float] = []
        self.cpu: list[float] = []

    def sample(self) -> None:
        with contextlib.suppress(OSError, IndexError, ValueError):
            cpu = self.read()
            self.t.append(time.time())
            self.cpu.append(cpu)

    def at(self, when: float) -> float:
        if not self.t:
            return math.nan
        i = bisect.bisect_left(self.t, when)
        if i <= 0:
            return self.cpu[0]
        if i >= len(self.t):
            return self.cpu[-1]
        t0, t1, c0, c1 = self.t[i - 1], self.t[i], self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1


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


def weir_first_record(ports: list[int]) -> float | None:
    """When weir's workers on ``ports`` consumed their first record (epoch s), once every one
    of them shows ``recordsIn > 0`` in ``/status``: the earliest ``firstRecordAt`` (the worker
    stamps it when the record came; the status, published at once then, only tells it)."""
    firsts = []
    for port in ports:
        code, status = http_json(f"http://127.0.0.1:{port}/status", 0.5)
        if code != 200 or not isinstance(status, dict) or status.get("recordsIn", 0) <= 0:
            return None
        at = status.get("firstRecordAt")
        firsts.append(at / 1000 if isinstance(at, int) else time.time())  # an older weir
    return min(firsts) if firsts else None


def window_result(r: dict[str, Any]) -> tuple[Any, Any] | None:
    """The main benchmark's result record as ((key, window start ms), (count, sum)); None for the
    end-of-input records' own windows. A window of the wrong size is malformed (raises)."""
    if r["key"] == generate.END_KEY:
        return None
    if r["windowEndMs"] - r["windowStartMs"] != generate.WINDOW_MS:
        raise ValueError(f"window of {r['windowEndMs'] - r['windowStartMs']} ms")
    return (r["key"], int(r["windowStartMs"])), (int(r["count"]), float(r["revenue"]))


class SinkReader:
    """Reads a runner's result topic as results arrive, as a read_committed consumer.

    ``parse`` turns a decoded result record into (key, answer), or None to skip it (default
    ``window_result``). ``results`` maps a key to its answer; ``arrived`` to the wall time
    (``time.time()``) it was first read; a record ``parse`` refuses is ``malformed``.
    ``awaiting`` holds the ``expected`` keys not read yet, kept as results arrive so that the
    driving loop's "is every window here?" costs nothing (comparing all keys every 50 ms took
    a tenth of a core from the runner being measured).

    The records are read and stamped on a thread of their own, and parsed by ``poll``. Stamping
    them where they are parsed timed a burst late when it became readable while the reader was
    still parsing the one before: exactly-once output is readable a checkpoint at a time, and
    parsing the first checkpoint's 35,000 results (75-90 ms) made the last checkpoint's few look
    60-100 ms later than they were, a tenth of a 1 s run, against at-least-once output that
    arrives as a trickle. On its own thread, a record waits at most for the interpreter to
    switch threads (5 ms) to be stamped.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        parse: Callable[[dict[str, Any]], tuple[Any, Any] | None] = window_result,
        expected: Iterable[Any] = (),
        consumer: Any = None,
    ) -> None:
        self.parse = parse
        if consumer is None:
            from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

            consumer = Consumer(
                {
                    "bootstrap.servers": bootstrap,
                    "group.id": f"weir-bench-sink-{os.getpid()}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "fetch.wait.max.ms": 10,
                    "fetch.queue.backoff.ms": 10,
                }
            )
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.consumer = consumer
        self.results: dict[Any, Any] = {}
        self.arrived: dict[Any, float] = {}
        self.duplicates = 0
        self.malformed: list[str] = []
        self.awaiting: set[Any] = set(expected)
        self._read: collections.deque[tuple[float, list[Any]]] = collections.deque()
        self._new = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="bench-sink-reader", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        """On the reader's thread: every record readable now is stamped now. (``consume(n, t)``
        alone would wait for ``n`` records or the whole timeout, and stamp that late.)"""
        consume = self.consumer.consume
        try:
            while not self._stop.is_set():
                msgs = consume(10000, timeout=0) or consume(1, timeout=0.02)
                if not msgs:
                    continue
                now = time.time()
                while len(msgs) < 200_000:
                    more = consume(10000, timeout=0)
                    if not more:
                        break
                    msgs += more
                with self._new:
                    self._read.append((now, msgs))
                    self._new.notify()
        except BaseException as exc:  # noqa: BLE001 - raised by the next poll
            self._error = exc
            with self._new:
                self._new.notify()

    def poll(self, timeout: float) -> int:
        """Parse what has been read (waiting up to ``timeout`` for the first record); returns the
        records parsed. Each keeps the time it was read at."""
        with self._new:
            if not self._read and self._error is None:
                self._new.wait(timeout)
            batches = list(self._read)
            self._read.clear()
        if self._error is not None:
            raise RuntimeError(f"reading the results failed: {self._error!r}") from self._error
        got = 0
        for now, msgs in batches:
            for m in msgs:
                if m.error() is not None:
                    continue
                got += 1
                try:
                    parsed = self.parse(orjson.loads(m.value()))
                except Exception:  # noqa: BLE001 - any unreadable result is reported, not raised
                    self.malformed.append(repr(m.value())[:200])
                    continue
                if parsed is None:
                    continue
                k, v = parsed
                if k in self.results:
                    self.duplicates += 1
                else:
                    self.arrived[k] = now
                    self.awaiting.discard(k)
                self.results[k] = v
        return got

    def settle(self, seconds: float) -> None:
        """Read for ``seconds`` whatever else comes (a straggling duplicate or extra window)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.poll(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
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


def delete_topics(
    bootstrap: str, topics: list[str], groups: list[str] | None = None, containing: str | None = None
) -> None:
    """Deletes topics (and those whose name contains ``containing``) and consumer groups; errors ignored."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the futures resolve
    names = list(topics)
    if containing:
        with contextlib.suppress(Exception):
            names += [t for t in admin.list_topics(timeout=10).topics if containing in t and t not in names]
    if names:
        with contextlib.suppress(Exception):
            for f in admin.delete_topics(names, operation_timeout=30).values():
                f.result(timeout=30)
    if groups:
        with contextlib.suppress(Exception):
            for f in admin.delete_consumer_groups(groups, request_timeout=10).values():
                f.result(timeout=10)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stat(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return {"median": float(statistics.median(values)), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------- environment


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
