"""The runners of the benchmark: how each system is started on the same job, and how it says it began.

Every runner executes the same job as its own process: read the input topic from the
beginning, 1-minute event-time tumbling windows keyed by the message key, count and sum
of ``price``, 5 s of allowed out-of-orderness, one JSON result per closed window
(``{"key", "windowStartMs", "windowEndMs", "count", "revenue"}``) to a result topic.
The raw consume ceiling is not here: it runs in-process in ``run.py``.

A runner tells the benchmark when it consumed its first record: the peers print
``WEIR_BENCH_FIRST_RECORD_MS=<epoch ms>`` from inside their first deserialisation; weir is
asked through its ``/status`` endpoint (``recordsIn > 0``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import install
import measure

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MARKER = re.compile(rb"WEIR_BENCH_FIRST_RECORD_MS=(\d+)")

# The same librdkafka tuning the weir worker ships with (weir.kafka.consumer_config), given
# to the two peers that also consume through librdkafka: without it librdkafka stalls a
# partition's fetches for up to a second whenever its local queue is full.
LIBRDKAFKA_CONSUMER_TUNING: dict[str, Any] = {"fetch.queue.backoff.ms": 10}

# Java 17 flags Flink's own distribution sets in conf/config.yaml (env.java.opts.all).
FLINK_JAVA_OPTS = [
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.api=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.parser=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.tree=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.util=ALL-UNNAMED",
    "--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.text=ALL-UNNAMED",
    "--add-opens=java.base/java.time=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED",
]


@dataclass
class Context:
    """One run of one runner: where it reads and writes, and whether the input is live."""

    bootstrap: str
    source: str
    sink: str
    work: Path
    run_id: str
    live: bool
    consumer: dict[str, Any] = field(default_factory=dict)  # extra librdkafka properties for weir

    @property
    def group(self) -> str:
        return f"weir-bench-{self.run_id}"


class Runner:
    key = ""
    label = ""
    notes = ""

    def unavailable(self) -> str | None:
        """Why this runner cannot run here, or None."""
        return None

    def command(self, ctx: Context) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def prepare(self, ctx: Context) -> None:
        """Creates what the runner needs before it starts (beyond the result topic)."""

    def ready(self, ctx: Context) -> bool:
        """True once the runner is up; the latency run starts producing after that."""
        return True

    def first_record(self, ctx: Context, log_path: Path) -> float | None:
        """Wall time (epoch s) of the first record consumed, once known."""
        try:
            with log_path.open("rb") as f:
                m = MARKER.search(f.read())
        except OSError:
            return None
        return int(m.group(1)) / 1000 if m else None

    def cleanup(self, ctx: Context) -> None:
        measure.delete_topics(ctx.bootstrap, [ctx.sink], [ctx.group], containing=ctx.group)

    def versions(self) -> dict[str, str]:
        return {}


def _pip_versions(python: Path, names: list[str]) -> dict[str, str]:
    code = (
        "import json, sys\nfrom importlib.metadata import version\n"
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))"
    )
    try:
        done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, timeout=60)
        return dict(json.loads(done.stdout))
    except Exception:  # noqa: BLE001
        return {}


# --------------------------------------------------------------------------- weir


@functools.cache
def weir_run_flags() -> frozenset[str]:
    """The long options `weir run --help` lists on this checkout."""
    done = subprocess.run(
        [sys.executable, "-m", "weir", "run", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    return frozenset(re.findall(r"--[a-z][a-z0-9-]+", done.stdout))


EOS_FLAGS = ("--guarantee", "--checkpoint-url", "--checkpoint-interval")


class Weir(Runner):
    """`python -m weir run` with one worker; at-least-once or exactly-once."""

    def __init__(
        self,
        guarantee: str,
        checkpoint_interval_s: float,
        workers: int = 1,
        native: bool = True,
        key_field: str | None = None,
    ) -> None:
        self.guarantee = guarantee
        self.checkpoint_interval_s = checkpoint_interval_s
        self.workers = workers
        self.native = native
        self.key_field = key_field
        """Key by this record field (the job repartitions) instead of by the message key."""
        self.ports: list[int] = []
        self.latency_run = workers == 1 and native and key_field is None
        if key_field is not None:
            path = "" if native else ", Python path"
            self.key = "weir_kf" if native else "weir_kf_py"
            self.label = f"({'b4' if native else 'b5'}) weir, 1 worker, keyed by a record field{path}"
            self.notes = (
                f"`keyBy: {{field: {key_field}, partitions: 4}}` (the same key as the message key): "
                "stage 1 forwards each record to the job's repartition topic, stage 2 reads it back "
                "and folds the windows"
                + (
                    " (natively; stage 1 runs the Python path)."
                    if native
                    else " (`WEIR_NATIVE=0`: both stages on the Python path)."
                )
            )
        elif workers > 1:
            self.key, self.label = f"weir_{workers}w", f"(b3) weir, {workers} workers, at-least-once"
            self.notes = (
                f"{workers} `weir run` processes (`--worker-index i --workers {workers}`), each owning "
                f"every {workers}th partition, started together: the scaling figure."
            )
        elif not native:
            self.key, self.label = "weir_py", "(b1) weir, 1 worker, at-least-once, Python path"
            self.notes = (
                "`weir run` with `WEIR_NATIVE=0`: every record through the Python path (the "
                "generated prepare function and the window operator), as before the native hot path."
            )
        elif guarantee == "exactly-once":
            self.key, self.label = "weir_eos", "(b2) weir, 1 worker, exactly-once"
            self.notes = (
                f"`--guarantee exactly-once --checkpoint-url file://… --checkpoint-interval "
                f"{checkpoint_interval_s:g}`: results, offsets and state commit together once per "
                "checkpoint, so results become readable at checkpoints."
            )
        else:
            self.key, self.label = "weir", "(b) weir, 1 worker, at-least-once"
            self.notes = "`weir run`, commit interval 5 s, RocksDB state on local disk."

    def unavailable(self) -> str | None:
        flags = weir_run_flags()
        if self.guarantee == "exactly-once":
            missing = [f for f in EOS_FLAGS if f not in flags]
            if missing:
                return (
                    f"`weir run` on this commit has no {', '.join(missing)} "
                    "(the exactly-once mode is not merged yet)"
                )
        return None

    def manifest(self, ctx: Context) -> dict[str, Any]:
        kafka: dict[str, Any] = {"bootstrapServers": ctx.bootstrap}
        if ctx.consumer:
            kafka["consumer"] = ctx.consumer
        return {
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "StreamJob",
            "metadata": {"name": f"bench-{ctx.run_id}", "namespace": "bench"},
            "spec": {
                "parallelism": 1,
                "kafka": kafka,
                "pipeline": {
                    "source": {
                        "topics": [ctx.source],
                        "format": "json",
                        "eventTime": {"field": "ts", "format": "epochMillis"},
                        "startFrom": "earliest",
                    },
                    "watermark": {"maxOutOfOrderness": "5s", "idleTimeout": "2s"},
                    "steps": [
                        {"keyBy": self.key_by()},
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
                    "sink": {"topic": ctx.sink},
                    "deadLetter": {"topic": self.dlq(ctx)},
                },
            },
        }

    def key_by(self) -> dict[str, Any]:
        if self.key_field is None:
            return {"messageKey": True}
        return {"field": self.key_field, "partitions": 4}

    @staticmethod
    def dlq(ctx: Context) -> str:
        return f"{ctx.sink}-dlq"

    def prepare(self, ctx: Context) -> None:
        import generate
        from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

        generate.create_topic(AdminClient({"bootstrap.servers": ctx.bootstrap}), self.dlq(ctx), 1)

    def command(self, ctx: Context) -> tuple[list[str], dict[str, str]]:
        env = {} if self.native else {"WEIR_NATIVE": "0"}
        self.ports = [measure.free_port() for _ in range(self.workers)]
        if self.workers == 1:
            return self._worker(ctx, 0), env
        workers = [self._worker(ctx, i) for i in range(self.workers)]
        return [sys.executable, "-c", _LAUNCH, json.dumps(workers)], env

    def _worker(self, ctx: Context, index: int) -> list[str]:
        job = ctx.work / "job.json"
        job.write_text(json.dumps(self.manifest(ctx), indent=2))
        cmd = [
            sys.executable, "-m", "weir", "run", str(job),
            "--bootstrap-servers", ctx.bootstrap,
            "--state-dir", str(ctx.work / f"state-{index}"),
            "--http-host", "127.0.0.1",
            "--http-port", str(self.ports[index]),
            "--log-level", "WARNING",
        ]  # fmt: skip
        if self.workers > 1:
            cmd += ["--worker-index", str(index), "--workers", str(self.workers)]
        flags = weir_run_flags()
        if self.guarantee == "exactly-once":
            cmd += [
                "--guarantee", "exactly-once",
                "--checkpoint-url", (ctx.work / "checkpoints").as_uri(),
                "--checkpoint-interval", f"{self.checkpoint_interval_s:g}",
            ]  # fmt: skip
        elif "--guarantee" in flags:
            # Once exactly-once exists it is the default; this row stays at-least-once.
            cmd += ["--guarantee", "at-least-once"]
        return cmd

    def ready(self, ctx: Context) -> bool:
        return all(measure.http_json(f"http://127.0.0.1:{p}/readyz", 0.5)[0] == 200 for p in self.ports)

    def first_record(self, ctx: Context, log_path: Path) -> float | None:
        return measure.weir_first_record(self.ports)

    def dead_letters(self, ctx: Context) -> int:
        return measure.topic_records(ctx.bootstrap, self.dlq(ctx))

    def cleanup(self, ctx: Context) -> None:
        measure.delete_topics(
            ctx.bootstrap,
            [ctx.sink, self.dlq(ctx)],
            [f"weir-bench-bench-{ctx.run_id}"],
            containing=ctx.run_id,
        )


# --------------------------------------------------------------------------- Quix Streams


class Quix(Runner):
    key, label = "quix", "(c) Quix Streams, 1 process, at-least-once"
    notes = (
        '`tumbling_window(60 s, grace 5 s).agg(Count, Sum).final(closing_strategy="partition")`; '
        "Quix's defaults otherwise: RocksDB state with changelog topics, commit every 5 s."
    )

    def unavailable(self) -> str | None:
        if not install.venv_python("venv-quix").exists():
            return "no ~/.cache/weir/bench/venv-quix: run `make bench-setup`"
        return None

    def command(self, ctx: Context) -> tuple[list[str], dict[str, str]]:
        return [
            str(install.venv_python("venv-quix")),
            str(BENCH / "jobs" / "quix_job.py"),
            ctx.bootstrap,
            ctx.source,
            ctx.sink,
            ctx.group,
            str(ctx.work / "state"),
            json.dumps(LIBRDKAFKA_CONSUMER_TUNING),
        ], {"PYTHONWARNINGS": "ignore"}

    def versions(self) -> dict[str, str]:
        return _pip_versions(install.venv_python("venv-quix"), ["quixstreams", "confluent-kafka"])


# --------------------------------------------------------------------------- Bytewax


class Bytewax(Runner):
    key, label = "bytewax", "(d) Bytewax, 1 worker"
    notes = (
        "`fold_window` with `EventClock(wait 5 s)` and a 1-minute `TumblingWindower`; no recovery "
        "store (Bytewax's default); the throughput run stops at the end of the topic (`tail=False`)."
    )

    def unavailable(self) -> str | None:
        if not install.venv_python("venv-bytewax").exists():
            return "no ~/.cache/weir/bench/venv-bytewax: run `make bench-setup`"
        return None

    def command(self, ctx: Context) -> tuple[list[str], dict[str, str]]:
        env = {
            "WEIR_BENCH_BOOTSTRAP": ctx.bootstrap,
            "WEIR_BENCH_INPUT": ctx.source,
            "WEIR_BENCH_OUTPUT": ctx.sink,
            "WEIR_BENCH_TAIL": "1" if ctx.live else "0",
            "WEIR_BENCH_CONSUMER_EXTRA": json.dumps(LIBRDKAFKA_CONSUMER_TUNING),
            "PYTHONPATH": str(BENCH / "jobs"),
        }
        cmd = [str(install.venv_python("venv-bytewax")), "-m", "bytewax.run", "bytewax_job:flow", "-w", "1"]
        return cmd, env

    def versions(self) -> dict[str, str]:
        return _pip_versions(install.venv_python("venv-bytewax"), ["bytewax", "confluent-kafka"])


# --------------------------------------------------------------------------- Apache Flink


class Flink(Runner):
    key, label = "flink", "(e) Apache Flink, MiniCluster, parallelism 1"
    notes = (
        "DataStream job (`bench/flink`): `KafkaSource` with `forBoundedOutOfOrderness(5 s)`, "
        "`keyBy` → `TumblingEventTimeWindows(1 min)` → `aggregate`, `KafkaSink` at-least-once; "
        "checkpoints every 5 s (offsets committed on checkpoints), heap state backend (Flink's default); "
        "JVM defaults."
    )

    def unavailable(self) -> str | None:
        if not (install.FLINK_DIR / ".weir-bench-stamp").exists():
            return "the Flink job is not built: run `make bench-setup`"
        if not _which("java"):
            return "no `java` on PATH"
        return None

    def command(self, ctx: Context) -> tuple[list[str], dict[str, str]]:
        cmd = [
            "java",
            *FLINK_JAVA_OPTS,
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=error",
            "-cp",
            install.flink_classpath(),
            "dev.weir.bench.WindowJob",
            "--bootstrap", ctx.bootstrap,
            "--input", ctx.source,
            "--output", ctx.sink,
            "--group", ctx.group,
            "--checkpoint-dir", str(ctx.work / "checkpoints"),
            "--checkpoint-interval-ms", "5000",
        ]  # fmt: skip
        return cmd, {}

    def versions(self) -> dict[str, str]:
        pom = (BENCH / "flink" / "pom.xml").read_text()
        out = {}
        for name in ("flink.version", "flink.kafka.version"):
            m = re.search(rf"<{re.escape(name)}>([^<]+)<", pom)
            if m:
                out[name.replace(".version", "").replace(".", "-")] = m.group(1)
        try:
            done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
            out["java"] = done.stderr.splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            pass
        return out


def _which(name: str) -> bool:
    return any(
        os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep) if d
    )


_LAUNCH = """
import json, signal, subprocess, sys
procs = [subprocess.Popen(cmd) for cmd in json.loads(sys.argv[1])]
signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
sys.exit(max(p.wait() for p in procs))
"""
"""Starts several workers as one runner process and passes SIGTERM on to each."""


def all_runners(eos_checkpoint_interval_s: float) -> list[Runner]:
    return [
        Weir("at-least-once", 5.0),
        # Right after the at-least-once run: the exactly-once ratio is taken per repeat, and the
        # closer in time the two runs, the less of the machine's drift gets into it.
        Weir("exactly-once", eos_checkpoint_interval_s),
        Weir("at-least-once", 5.0, native=False),
        Weir("at-least-once", 5.0, workers=2),
        Weir("at-least-once", 5.0, key_field="product_id"),
        Weir("at-least-once", 5.0, native=False, key_field="product_id"),
        Quix(),
        Bytewax(),
        Flink(),
    ]
