"""End to end on kind: the chart's operator runs the packaged example StreamJob against in-cluster Kafka.

Needs docker (with a running engine), kind, kubectl and helm, plus the repo's Dockerfile and
chart; without any of them the whole module skips with one line naming what is missing.
``run-kind-e2e.sh up`` (called by the ``cluster`` fixture) creates or reuses the cluster, builds
and loads the image, starts Kafka and S3 in the cluster and installs the chart.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SCRIPT = HERE / "run-kind-e2e.sh"
EXAMPLE = ROOT / "runtime" / "weir" / "examples" / "revenue.yaml"


def _missing() -> str | None:
    done = subprocess.run(
        ["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode == 0:
        return None
    return (
        done.stdout.strip() or done.stderr.strip() or f"`{SCRIPT.name} check` exit {done.returncode}"
    ).splitlines()[0]


_reason = _missing()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

# Creating the cluster and building the image take minutes on a first run.
pytestmark = pytest.mark.timeout(1800)


@dataclass(frozen=True)
class Cluster:
    """The kind cluster as the script set it up: where to reach it and what runs in it."""

    kubeconfig: str
    namespace: str
    image: str
    bucket: str

    @property
    def kafka_bootstrap(self) -> str:
        return f"kafka.{self.namespace}.svc.cluster.local:9092"

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(
            ["kubectl", "-n", self.namespace, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "KUBECONFIG": self.kubeconfig},
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def kafka(self, tool: str, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """Run one of the broker image's Kafka CLI tools inside the broker pod."""
        return self.kubectl(
            "exec",
            "-i",
            "kafka-0",
            "--",
            f"/opt/kafka/bin/{tool}",
            "--bootstrap-server",
            "localhost:9092",
            *args,
            stdin=stdin,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    subprocess.run(["bash", str(SCRIPT), "up"], check=True, timeout=1500)
    env = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    values = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    return Cluster(values["KUBECONFIG"], values["NAMESPACE"], values["IMAGE"], values["BUCKET"])


def _diagnostics(cluster: Cluster, job: str) -> str:
    parts = []
    for args in (
        ("get", "streamjobs", job, "-o", "yaml"),
        ("get", "pods,statefulsets,events"),
        ("logs", "-l", "app.kubernetes.io/name=weir-operator", "--tail=80", "--all-containers"),
    ):
        parts.append(f"$ kubectl {' '.join(args)}\n{cluster.kubectl(*args, check=False)}")
    return "\n".join(parts)


def test_the_chart_installs_the_crd_and_a_running_operator(cluster: Cluster) -> None:
    cluster.kubectl("wait", "--for=condition=Established", "crd/streamjobs.weir.dev", "--timeout=60s")
    ready = cluster.kubectl(
        "get",
        "deployments",
        "-l",
        "app.kubernetes.io/name=weir-operator",
        "-o",
        "jsonpath={.items[*].status.readyReplicas}",
    )
    assert ready.split() and all(int(n) >= 1 for n in ready.split()), _diagnostics(cluster, "-")


def _purchase(product: str, price: float, user: str, ts: int) -> dict[str, Any]:
    return {"type": "purchase", "product_id": product, "price": price, "user_id": user, "ts": ts}


def test_the_revenue_example_writes_each_complete_minute_once(cluster: Cluster) -> None:
    suffix = uuid.uuid4().hex[:6]
    job, source, sink, dlq = (f"revenue-{suffix}", f"events-{suffix}", f"revenue-{suffix}", f"dlq-{suffix}")
    for topic, partitions in ((source, 2), (sink, 1), (dlq, 1)):
        cluster.kafka("kafka-topics.sh", "--create", "--topic", topic, "--partitions", str(partitions))

    minute = 1_700_000_040_000  # a minute boundary, so every event below falls in one window
    events = [
        _purchase("p-1", 10.0, "u-1", minute + 1_000),
        _purchase("p-2", 5.5, "u-2", minute + 2_000),
        {"type": "page_view", "product_id": "p-1", "user_id": "u-3", "ts": minute + 3_000},
        _purchase("p-1", 20.0, "u-4", minute + 4_000),
        _purchase("p-2", 0.0, "u-5", minute + 5_000),  # filtered out: price must be > 0
        _purchase("p-2", 99.0, "bot", minute + 6_000),  # filtered out: bots do not count
        # Ten minutes later: moves the watermark past the first minute so its window closes.
        _purchase("p-3", 1.0, "u-6", minute + 600_000),
    ]
    lines = "".join(f"{e['user_id']}\t{json.dumps(e)}\n" for e in events)
    cluster.kafka(
        "kafka-console-producer.sh",
        "--topic",
        source,
        "--property",
        "parse.key=true",
        "--property",
        "key.separator=\t",
        stdin=lines,
    )

    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"].update(name=job, namespace=cluster.namespace)
    spec = manifest["spec"]
    spec["kafka"]["bootstrapServers"] = cluster.kafka_bootstrap
    spec["pipeline"]["source"]["topics"] = [source]
    spec["pipeline"]["sink"]["topic"] = sink
    spec["pipeline"].setdefault("deadLetter", {})["topic"] = dlq
    # Checkpoints: when StreamJob gains a store setting, point it at s3://<bucket>/ on the
    # in-cluster S3 (`http://s3.<namespace>.svc:9000`, keys in Secret `s3-credentials`).
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    expected = {
        "p-1": {"revenue": 30.0, "orders": 2, "averageOrder": 15.0},
        "p-2": {"revenue": 5.5, "orders": 1, "averageOrder": 5.5},
    }
    deadline = time.monotonic() + 300
    first_minute: list[dict[str, Any]] = []
    try:
        while time.monotonic() < deadline:
            out = cluster.kafka(
                "kafka-console-consumer.sh",
                "--topic",
                sink,
                "--from-beginning",
                "--isolation-level",
                "read_committed",
                "--timeout-ms",
                "10000",
            )
            results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            first_minute = [r for r in results if r.get("windowStartMs") == minute]
            if {r["key"] for r in first_minute} >= set(expected):
                break
            time.sleep(5)
        got = {r["key"]: {k: r.get(k) for k in ("revenue", "orders", "averageOrder")} for r in first_minute}
        assert got == expected, _diagnostics(cluster, job)
        # Exactly once: each complete window is written one time, however the workers ran.
        assert Counter(r["key"] for r in first_minute) == Counter(expected), _diagnostics(cluster, job)
    finally:
        cluster.kubectl("delete", "streamjob", job, "--wait=false", check=False)
