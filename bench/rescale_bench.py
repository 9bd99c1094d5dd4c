"""Rescale benchmark: a savepoint of a keyed-window job at 2 workers, restored at 1 and at 4 workers,
on the test harness's Kafka broker and S3 server (S3Proxy).

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python bench/rescale_bench.py [--quick] [--events N] [--keys K] [--partitions P]
                                            [--to 1,4] [--checkpoint-interval S] [--out FILE]

The job is the benchmark's (``bench/README.md``): 1-minute event-time tumbling windows on
``ts``, count and sum of ``price`` per message key, 5 s out-of-orderness, exactly-once, as
``weir run`` worker subprocesses checkpointing every ``--checkpoint-interval`` s to
``s3://<fresh bucket>/rescale`` on the test S3 server (the bucket is emptied and deleted afterwards).
No ``idleTimeout``: the run pauses between its halves, and an idle partition's watermark
would jump to the wall clock and make the second half late; the end-of-input records close
the last windows instead. The events are ``bench/generate.py``'s, written to a fresh
``P``-partition topic in two halves.

1. The first half of the events goes into the topic and the job runs at 2 workers until its
   consumer group has committed the topic's end offsets. Then a savepoint with stop, as the
   operator takes one (``weir_operator.workers.take_savepoint``: ``POST /savepoint
   {"id", "stop": true}`` to every worker at once). **savepoint s**: request to every
   worker's answer. **size**: the bytes under the savepoint's prefix in the store (manifests
   included); the manifests' own sum of file sizes, files and entries (open windows) are
   recorded too. The job's group must then hold the savepoint's offsets.
2. The second half and one end-of-input record per partition go into the topic.
3. For every M in ``--to``: a restore of the same savepoint into M workers, each M as its own
   job (as ``tests/integration/test_exactly_once.py``'s rescale test does: its own name,
   sink topic and checkpoint prefix, so one restore does not resume from the checkpoints of
   another), started with ``--restore-from <savepoint> --workers M``. Its consumer group is
   first given the committed offsets (and their metadata) of the job that took the
   savepoint: the state an operator's rescale leaves, where the restarted job's group
   carries the savepoint's offsets; the worker takes its offsets from the savepoint either
   way, and the group makes the lag visible from the first second. Figures, from the start
   of the first worker process:
   - **restore s**: until every worker's ``/readyz`` answers 200 (state restored from the
     store, transactions initialised); ``weir_restore_duration_seconds`` of each worker
     (the restore alone) is recorded too;
   - **caught-up s**: until the job's consumer group has committed the topic's end offsets
     (lag 0; with exactly-once, offsets commit with each checkpoint);
   - **catch-up events/s**: the records between the savepoint's offsets and the end offsets
     over the time from ready to caught up.

Correctness first. Each restore's figures count only if the read_committed output of the
2-worker job plus that restore's output equals the reference count and sum of every
(key, minute) window computed from the generator (``measure.verify``), no window was
emitted twice or by both jobs, the dead-letter topics are empty, every partition was
restored from the savepoint (the workers' ``restore exact (restore source ...)`` log line)
and every worker exited 0. A restore that fails a check is recorded as failed with the
reasons, never as a figure, and the command exits 1 (its logs stay in the work directory).

Writes ``bench/results/rescale.json`` (``--quick``: ``rescale-quick.json``) with the
machine, the load average and the exact command; ``bench/report.py`` renders the full run's
file into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import generate  # noqa: E402
import measure  # noqa: E402
import orjson  # noqa: E402
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition  # noqa: E402
from measure import log  # noqa: E402

from harness import kafka as kafka_server  # noqa: E402
from harness import s3 as s3_server  # noqa: E402
from weir.checkpoint import S3Settings, StoreReader  # noqa: E402
from weir_operator.workers import take_savepoint  # noqa: E402

NAMESPACE = "bench"
FROM_WORKERS = 2
SAVEPOINT_ID = "sp-rescale"
WORK = Path(os.environ.get("WEIR_CACHE", Path.home() / ".cache" / "weir")) / "bench-rescale"
QUICK = {"events": 200_000, "keys": 2_000}
FULL = {"events": 1_000_000, "keys": 10_000}
RESTORED = re.compile(r"(\S+): restore exact \(restore source ")


class Workers:
    """The ``weir run`` subprocesses of one job, one per worker index, each with its own port and log."""

    def __init__(
        self, job: Path, count: int, work: Path, bootstrap: str, env: dict[str, str], args: list[str]
    ) -> None:
        self.job, self.count, self.work = job, count, work
        self.bootstrap, self.env, self.args = bootstrap, {**os.environ, **env}, args
        self.ports = [measure.free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0.0

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def log_path(self, i: int) -> Path:
        return self.work / f"{self.job.stem}-w{i}.log"

    def start(self) -> None:
        self.started = time.monotonic()
        for i, port in enumerate(self.ports):
            cmd = [
                sys.executable, "-m", "weir", "run", str(self.job),
                "--worker-index", str(i), "--workers", str(self.count),
                "--bootstrap-servers", self.bootstrap,
                "--state-dir", str(self.work / f"{self.job.stem}-state-w{i}"),
                "--http-host", "127.0.0.1", "--http-port", str(port),
                "--guarantee", "exactly-once", "--log-level", "INFO",
                *self.args,
            ]  # fmt: skip
            with open(self.log_path(i), "wb") as out:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env))

    def check(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise RuntimeError(
                    f"worker {i} of {self.job.stem} exited with {p.returncode}:\n{self.tail(i)}"
                )

    def tail(self, i: int, lines: int = 30) -> str:
        return "\n".join(self.log_path(i).read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> list[float]:
        """Seconds from ``start()`` to each worker's first 200 on ``/readyz``."""
        ready: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(ready) < self.count:
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.job.stem}: workers {sorted(set(range(self.count)) - set(ready))} "
                                   f"not ready after {timeout:.0f} s")  # fmt: skip
            for i, url in enumerate(self.urls):
                if i not in ready and measure.http_json(f"{url}/readyz", 0.5)[0] == 200:
                    ready[i] = time.monotonic() - self.started
            time.sleep(0.02)
        return [ready[i] for i in range(self.count)]

    def metric(self, name: str) -> list[float | None]:
        """One unlabelled-or-labelled sample of ``name`` per worker, from ``/metrics``."""
        out: list[float | None] = []
        for url in self.urls:
            value = None
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp,
            ):
                for line in resp.read().decode().splitlines():
                    if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                        value = float(line.rsplit(" ", 1)[1])
                        break
            out.append(value)
        return out

    def wait_exit(self, timeout: float) -> list[int]:
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def stop(self, timeout: float = 60) -> list[int]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def restored_partitions(self) -> list[str]:
        """The partitions the workers' logs say were restored from the ``--restore-from`` source."""
        found: list[str] = []
        for i in range(self.count):
            found += RESTORED.findall(self.log_path(i).read_text(errors="replace"))
        return found


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, s3: Any, bucket: str) -> None:
        self.args, self.bootstrap, self.s3 = args, bootstrap, s3
        self.run_id = uuid.uuid4().hex[:8]
        self.url = f"s3://{bucket}/rescale"
        self.bucket = bucket
        self.kafka = kafka_server.KafkaHelper(bootstrap)
        self.source = f"weir-bench-rescale-{self.run_id}"
        self.topics: list[str] = [self.source]
        self.groups: list[str] = []
        self.running: list[Workers] = []
        self.problems: list[str] = []

    # -- helpers --------------------------------------------------------------------------
    def topic(self, suffix: str, partitions: int = 1) -> str:
        name = self.kafka.create_topic(f"{self.source}-{suffix}", partitions)
        self.topics.append(name)
        return name

    def job(self, name: str, sink: str, dlq: str) -> Path:
        """The benchmark's job (as ``runners.Weir.manifest``) without ``idleTimeout``, see the docstring."""
        doc = {
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "StreamJob",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "parallelism": FROM_WORKERS,
                "kafka": {"bootstrapServers": self.bootstrap},
                "pipeline": {
                    "source": {
                        "topics": [self.source],
                        "format": "json",
                        "eventTime": {"field": "ts", "format": "epochMillis"},
                        "startFrom": "earliest",
                    },
                    "watermark": {"maxOutOfOrderness": f"{generate.OUT_OF_ORDER_MS}ms"},
                    "steps": [
                        {"keyBy": {"messageKey": True}},
                        {"window": {"type": "tumbling", "size": "1m"}},
                        {
                            "aggregate": {
                                "emit": "final",
                                "outputs": {
                                    "count": {"fn": "count"},
                                    "revenue": {"fn": "sum", "field": "price"},
                                },
                            }
                        },
                    ],
                    "sink": {"topic": sink},
                    "deadLetter": {"topic": dlq},
                },
            },
        }
        path = WORK / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2))
        self.groups.append(f"weir-{NAMESPACE}-{name}")
        return path

    def workers(self, job: Path, count: int, restore_from: str | None = None) -> Workers:
        args = ["--checkpoint-url", self.url, "--checkpoint-interval", f"{self.args.checkpoint_interval:g}"]
        if restore_from:
            args += ["--restore-from", restore_from]
        w = Workers(job, count, WORK, self.bootstrap, self.s3.env(), args)
        self.running.append(w)
        return w

    def committed(self, group: str) -> dict[int, TopicPartition]:
        request = ConsumerGroupTopicPartitions(
            group, [TopicPartition(self.source, p) for p in range(self.args.partitions)]
        )
        result = self.kafka.admin().list_consumer_group_offsets([request])[group].result(timeout=30)
        return {tp.partition: tp for tp in result.topic_partitions}

    def wait_caught_up(self, w: Workers, group: str, ends: dict[int, int], timeout: float) -> float:
        """Seconds from the workers' start until ``group`` has committed ``ends`` (lag 0)."""
        deadline = time.monotonic() + timeout
        while True:
            w.check()
            got = {p: tp.offset for p, tp in self.committed(group).items()}
            if got == ends:
                return time.monotonic() - w.started
            if time.monotonic() > deadline:
                raise RuntimeError(f"{group} committed {got} after {timeout:.0f} s, want {ends}")
            time.sleep(0.05)

    def results(self, sink: str) -> tuple[dict[tuple[str, int], tuple[int, float]], list[str]]:
        """The read_committed results of ``sink``, and problems: windows emitted twice, unreadable ones."""
        out: dict[tuple[str, int], tuple[int, float]] = {}
        problems: list[str] = []
        twice = 0
        for m in self.kafka.read_all(sink, timeout=120):
            try:
                r = orjson.loads(m.value or b"")
                if r["key"] == generate.END_KEY:
                    continue
                k = (str(r["key"]), int(r["windowStartMs"]))
                twice += k in out
                out[k] = (int(r["count"]), float(r["revenue"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                problems.append(f"unreadable result in {sink}: {m.value!r:.200}")
        if twice:
            problems.append(f"{twice} windows emitted twice in {sink}")
        return out, problems

    def dead_letters(self, dlq: str) -> list[str]:
        n = sum(self.kafka.end_offsets(dlq).values())
        return [f"{n} records in the dead-letter topic {dlq}"] if n else []

    def timeout(self, events: int) -> float:
        return 120 + events / 2_000  # generous: the machine is shared

    # -- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a = self.args
        half = a.events // 2
        t = time.monotonic()
        expected = generate.reference(a.events, a.keys)
        log(f"reference: {len(expected):,} windows ({time.monotonic() - t:.1f} s)")
        self.kafka.create_topic(self.source, a.partitions)
        events = generate.events(a.events, a.keys)
        t = time.monotonic()
        generate.produce(self.bootstrap, self.source, islice(events, half))
        log(f"first half: {half:,} events into {self.source} ({time.monotonic() - t:.1f} s)")

        # 1. Two workers take the first half, then a savepoint with stop.
        name0 = f"rescale-{self.run_id}"
        sink0, dlq0 = self.topic("out", a.partitions), self.topic("dlq")
        job0 = self.job(name0, sink0, dlq0)
        group0 = self.groups[-1]
        ends1 = self.kafka.end_offsets(self.source)
        w0 = self.workers(job0, FROM_WORKERS)
        w0.start()
        ready0 = w0.wait_ready(120)
        caught0 = self.wait_caught_up(w0, group0, ends1, self.timeout(half))
        phase1 = {
            "workers": FROM_WORKERS,
            "events": half,
            "ready_seconds": max(ready0),
            "caught_up_seconds": caught0,
            "events_per_s": sum(ends1.values()) / (caught0 - max(ready0)),
        }
        log(f"{FROM_WORKERS} workers caught up with the first half in {caught0:.1f} s; savepoint with stop")
        t0 = time.perf_counter()
        outcome = take_savepoint(w0.urls, SAVEPOINT_ID, True, datetime.now(UTC), timeout=600)
        sp_seconds = time.perf_counter() - t0
        if not outcome.completed or not outcome.url:
            raise RuntimeError(f"savepoint failed: {outcome.error}")
        codes0 = w0.wait_exit(60)
        if codes0 != [0] * FROM_WORKERS:
            self.problems.append(f"the {FROM_WORKERS} workers exited with {codes0} after the savepoint")
        savepoint = self.describe_savepoint(outcome.url, sp_seconds)
        committed0 = self.committed(group0)
        if {p: tp.offset for p, tp in committed0.items()} != savepoint["offsets"]:
            self.problems.append(
                f"{group0} holds { ({p: tp.offset for p, tp in committed0.items()}) }, "
                f"the savepoint {savepoint['offsets']}"
            )
        log(
            f"savepoint {outcome.url}: {sp_seconds:.2f} s, {savepoint['store_bytes'] / 1e6:.2f} MB "
            f"in the store, {savepoint['entries']:,} open windows"
        )
        before, problems0 = self.results(sink0)
        self.problems += problems0 + self.dead_letters(dlq0)
        log(f"{len(before):,} windows committed before the savepoint")

        # 2. The second half, then the end-of-input records.
        t = time.monotonic()
        end = (generate.end_value(a.events), a.partitions)
        generate.produce(self.bootstrap, self.source, events, end=end)
        ends = self.kafka.end_offsets(self.source)
        log(f"second half: {a.events - half:,} events + end records ({time.monotonic() - t:.1f} s)")

        # 3. Restores into M workers.
        restores = [
            self.restore(m, outcome.url, committed0, ends, savepoint["offsets"], before, expected)
            for m in a.to
        ]
        return {
            "parameters": {
                "events": a.events,
                "keys": a.keys,
                "partitions": a.partitions,
                "from_workers": FROM_WORKERS,
                "to_workers": a.to,
                "first_half": half,
                "second_half": a.events - half,
                "windows": len(expected),
                "checkpoint_interval_s": a.checkpoint_interval,
                "guarantee": "exactly-once",
                "topic": self.source,
            },
            "phase1": phase1,
            "savepoint": {**savepoint, "offsets": {str(k): v for k, v in savepoint["offsets"].items()}},
            "windows_before_savepoint": len(before),
            "before_problems": list(self.problems),
            "restores": restores,
        }

    def describe_savepoint(self, url: str, seconds: float) -> dict[str, Any]:
        settings = S3Settings(
            endpoint_url=self.s3.endpoint,
            region=self.s3.region,
            access_key_id=self.s3.access_key,
            secret_access_key=self.s3.secret_key,
        )
        with StoreReader(settings) as reader:
            manifests = reader.read_savepoint(url)
        offsets: dict[int, int] = {}
        for m in manifests:
            for name, entry in m.partitions.items():
                topic, _, p = name.rpartition("/")
                if topic == self.source:
                    offsets[int(p)] = entry.offset
        prefix = url.removeprefix(f"s3://{self.bucket}/").rstrip("/") + "/"
        client = self.s3.client()
        try:
            store_bytes = store_objects = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for o in page.get("Contents", ()):
                    store_bytes += int(o["Size"])
                    store_objects += 1
        finally:
            client.close()
        return {
            "id": SAVEPOINT_ID,
            "seconds": seconds,
            "store_bytes": store_bytes,
            "store_objects": store_objects,
            "manifest_bytes": sum(m.total_bytes for m in manifests),
            "files": sum(m.total_files for m in manifests),
            "entries": sum(e.entries or 0 for m in manifests for e in m.partitions.values()),
            "worker_parts": len(manifests),
            "offsets": dict(sorted(offsets.items())),
        }

    def restore(
        self,
        count: int,
        url: str,
        committed0: dict[int, TopicPartition],
        ends: dict[int, int],
        start: dict[int, int],
        before: dict[tuple[str, int], tuple[int, float]],
        expected: dict[tuple[str, int], tuple[int, float]],
    ) -> dict[str, Any]:
        a = self.args
        name = f"rescale-{self.run_id}-to{count}"
        sink, dlq = self.topic(f"to{count}-out", a.partitions), self.topic(f"to{count}-dlq")
        job = self.job(name, sink, dlq)
        group = self.groups[-1]
        seed = [
            TopicPartition(self.source, p, tp.offset, metadata=tp.metadata) for p, tp in committed0.items()
        ]
        self.kafka.admin().alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, seed)])[
            group
        ].result(timeout=30)
        catchup_events = sum(ends.values()) - sum(start.values())
        load_before = measure.loadavg()
        w = self.workers(job, count, restore_from=url)
        log(f"restoring into {count} worker(s)")
        w.start()
        out: dict[str, Any] = {"workers": count, "loadavg_before": load_before}
        problems: list[str] = []
        try:
            ready = w.wait_ready(300)
            out["ready_seconds"] = ready
            out["restore_seconds"] = max(ready)
            out["restore_metric_seconds"] = w.metric("weir_restore_duration_seconds")
            caught = self.wait_caught_up(w, group, ends, self.timeout(catchup_events))
            out["caught_up_seconds"] = caught
            out["catchup_events"] = catchup_events
            out["catchup_events_per_s"] = catchup_events / (caught - max(ready))
        except RuntimeError as exc:
            problems.append(str(exc)[:2000])
        finally:
            out["loadavg_after"] = measure.loadavg()
            out["exit_codes"] = codes = w.stop()
        if codes != [0] * count:
            problems.append(f"workers exited with {codes}: {[w.tail(i, 10) for i in range(count)]}")
        restored = w.restored_partitions()
        want = sorted(f"{self.source}/{p}" for p in range(a.partitions))
        if sorted(restored) != want:
            problems.append(
                f"restored from the savepoint: {sorted(restored)}, want every partition once {want}"
            )
        after, read_problems = self.results(sink)
        problems += read_problems + self.dead_letters(dlq)
        both = set(before) & set(after)
        if both:
            problems.append(
                f"{len(both)} windows emitted before and after the savepoint, e.g. {sorted(both)[:3]}"
            )
        problems += measure.verify({**before, **after}, expected)
        out["windows_after_savepoint"] = len(after)
        out["problems"] = problems + self.problems
        out["status"] = "ok" if not out["problems"] else "failed"
        if out["status"] == "ok":
            log(
                f"{FROM_WORKERS} -> {count}: restore {out['restore_seconds']:.2f} s, caught up "
                f"{out['caught_up_seconds']:.2f} s, {out['catchup_events_per_s']:,.0f} events/s; "
                f"output {len(before):,} + {len(after):,} windows = the reference"
            )
        else:
            log(f"{FROM_WORKERS} -> {count} FAILED: {'; '.join(out['problems'])[:1000]}")
        return out

    def cleanup(self) -> None:
        for w in self.running:
            with contextlib.suppress(Exception):
                w.stop(30)
        measure.delete_topics(self.bootstrap, self.topics, self.groups, containing=self.run_id)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"{QUICK['events']:,} events over {QUICK['keys']:,} keys, written to rescale-quick.json",
    )  # fmt: skip
    parser.add_argument("--events", type=int, help=f"events in all (default {FULL['events']:,})")
    parser.add_argument("--keys", type=int, help=f"distinct keys (default {FULL['keys']:,})")
    parser.add_argument("--partitions", type=int, default=4, help="input topic partitions (default 4)")
    parser.add_argument("--to", default="1,4", help="worker counts to restore into (default 1,4)")
    parser.add_argument(
        "--checkpoint-interval", type=float, default=1.0, help="the workers' checkpoint interval, s (1)"
    )
    parser.add_argument("--out", type=Path, help="result file (default bench/results/rescale[-quick].json)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    args.events = args.events or sizes["events"]
    args.keys = args.keys or sizes["keys"]
    try:
        args.to = [int(s) for s in args.to.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--to: a comma-separated list of worker counts, got {args.to!r}")
    if not args.to or any(m < 1 or m > args.partitions for m in args.to):
        parser.error(f"--to: every worker count must be between 1 and --partitions ({args.partitions})")
    if args.events < 2 or args.keys < 1 or args.partitions < FROM_WORKERS:
        parser.error(f"--events must be at least 2, --keys 1, --partitions {FROM_WORKERS}")
    out_path = args.out or ROOT / "bench" / "results" / (
        "rescale-quick.json" if args.quick else "rescale.json"
    )

    load_start = measure.loadavg()
    kafka = kafka_server.up()
    store = s3_server.up()
    s3 = s3_server.S3Helper(store)
    bucket = s3.new_bucket("weir-bench")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    bench = Bench(args, str(kafka.info["bootstrap"]), s3, bucket)
    log(f"broker {bench.bootstrap}, store {bench.url}; load average {load_start}")
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    failed = True
    try:
        result = bench.run()
        failed = any(r["status"] != "ok" for r in result["restores"])
    finally:
        bench.cleanup()
        s3.drop_bucket(bucket)
        if failed:
            log(f"worker logs kept in {WORK}")
        else:
            shutil.rmtree(WORK, ignore_errors=True)
    doc = {
        "when": started,
        "commit": measure.git_commit(),
        "command": " ".join([".venv/bin/python", "bench/rescale_bench.py", *sys.argv[1:]]),
        "broker": f"Kafka {kafka.info.get('version')} (single node, KRaft) on 127.0.0.1",
        "store": f"S3Proxy {store.info.get('version')} on 127.0.0.1 (same machine), path-style",
        "machine": {
            **measure.machine(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg": measure.loadavg(),
        },
        **result,
        "status": "failed" if failed else "ok",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out_path}" + ("; A RESTORE FAILED ITS CHECK" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
