"""The join step against the real broker and S3 server: purchases joined with a compacted catalog
topic as of their event time, a price changed mid-stream, workers SIGKILLed mid-run (half the
time without their local state), and the read_committed output equal to the brute-force as-of
reference: a purchase missing, joined twice or joined with the wrong price fails it."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from harness.kafka import KafkaHelper, Message
from harness.s3 import S3Helper

from .test_exactly_once import WorkerProcs

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

T0 = 1_704_067_200_000
PRODUCTS = 20
CATALOG_PARTITIONS = 2
CHANGED = "p3"
END = "~end"


def job_manifest(tmp_path: Path, name: str, kafka: KafkaHelper, topics: dict[str, str]) -> Path:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": kafka.bootstrap},
            "pipeline": {
                "source": {"topics": [topics["purchases"]], "eventTime": {"field": "ts"}},
                "steps": [
                    {
                        "join": {
                            "topic": topics["catalog"],
                            "key": "product",
                            "fields": ["price", "category"],
                            "prefix": "p_",
                            "idleTimeout": "0s",  # exact whatever the timing: the ticks move the table
                        }
                    }
                ],
                "sink": {"topic": topics["out"]},
                "deadLetter": {"topic": topics["dlq"]},
            },
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def workload(seed: int, n: int) -> tuple[list[dict[str, Any]], list[tuple[int, dict[str, Any]]]]:
    """Purchases (in production order, with their partition) and catalog records with the
    position in the purchase stream before which each is produced. The catalog: every product
    at ``T0``, ``CHANGED``'s price changed at the middle of the stream's event time, a tick per
    catalog partition every 500 purchases (the table's time follows the stream's, so held
    purchases are released as the run goes), and a far-future record per partition at the end."""
    rng = random.Random(seed)
    purchases = []
    clock = T0
    for i in range(n):
        clock += rng.randrange(0, 20)
        product = f"p{rng.randrange(PRODUCTS)}" if rng.random() > 0.01 else "p99"  # p99: never listed
        user = f"u{rng.randrange(50)}"
        purchases.append(
            {
                "partition": rng.randrange(2),
                "key": user,
                "ts": clock,
                "record": {"id": i, "ts": clock, "product": product},
            }
        )
    middle = purchases[n // 2]["ts"]
    catalog: list[tuple[int, dict[str, Any]]] = []
    for j in range(PRODUCTS):
        value = {"price": 10 + j, "category": "toys" if j % 2 else "books"}
        catalog.append((0, {"key": f"p{j}", "value": value, "timestamp": T0}))
    catalog.append(
        (n // 3, {"key": CHANGED, "value": {"price": 999, "category": "books"}, "timestamp": middle})
    )
    for i in range(500, n, 500):
        for q in range(CATALOG_PARTITIONS):
            catalog.append(
                (i, {"key": f"~tick{q}", "partition": q, "value": {}, "timestamp": purchases[i]["ts"]})
            )
    for q in range(CATALOG_PARTITIONS):
        catalog.append(
            (n, {"key": f"{END}{q}", "partition": q, "value": {}, "timestamp": clock + 86_400_000})
        )
    catalog.sort(key=lambda c: c[0])  # production order (stable: a product's updates keep theirs)
    return purchases, catalog


def as_of(table: list[Message], purchases: list[dict[str, Any]]) -> tuple[Counter[tuple[bytes, bytes]], int]:
    """The joined output ``(key, value)`` and the number of misses, brute force over the catalog
    topic as the broker holds it. Every product's update is on time for its partition (only
    ticks, never looked up, fall behind), so the newest update at or before a purchase's time
    is the answer."""
    versions: dict[str, list[tuple[int, int, int, dict[str, Any] | None]]] = {}
    for m in table:
        value = None if m.value is None else orjson.loads(m.value)
        versions.setdefault((m.key or b"").decode(), []).append((m.timestamp, m.partition, m.offset, value))
    out: Counter[tuple[bytes, bytes]] = Counter()
    misses = 0
    for p in purchases:
        r = p["record"]
        seen = [v for v in versions.get(r["product"], []) if v[0] <= r["ts"]]
        value = max(seen, key=lambda v: (v[0], v[2]))[3] if seen else None
        if value is None:
            misses += 1
            continue
        joined = {**r, "p_price": value.get("price"), "p_category": value.get("category")}
        out[(p["key"].encode(), orjson.dumps(joined))] += 1
    return out, misses


class Producing:
    """Produces the purchases and the catalog in order from a thread, over ``seconds``."""

    def __init__(
        self,
        kafka: KafkaHelper,
        topics: dict[str, str],
        purchases: list[Any],
        catalog: list[Any],
        seconds: float,
    ):
        self.kafka, self.topics, self.purchases, self.catalog, self.seconds = (
            kafka,
            topics,
            purchases,
            catalog,
            seconds,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _table(self, upto: int, sent: list[int]) -> None:
        due = [rec for at, rec in self.catalog[sent[0] :] if at <= upto]
        if due:
            self.kafka.produce(
                self.topics["catalog"],
                [{**rec, "key": rec["key"].encode(), "value": orjson.dumps(rec["value"])} for rec in due],
            )
            sent[0] += len(due)

    def _run(self) -> None:
        sent = [0]
        chunks = 40
        size = -(-len(self.purchases) // chunks)
        for i in range(0, len(self.purchases), size):
            self._table(i, sent)
            chunk = self.purchases[i : i + size]
            self.kafka.produce(
                self.topics["purchases"],
                [
                    {
                        "key": p["key"].encode(),
                        "partition": p["partition"],
                        "value": orjson.dumps(p["record"]),
                    }
                    for p in chunk
                ],
            )
            time.sleep(self.seconds / chunks)
        self._table(len(self.purchases), sent)

    def __enter__(self) -> Producing:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)


def _restores(root: Path, worker: int) -> int:
    """How many restores worker ``worker``'s log shows (its log is appended across restarts)."""
    log = root / f"w{worker}.log"
    return log.read_text(errors="replace").count("restored in") if log.exists() else 0


def _more_restores(root: Path, worker: int, before: int) -> Callable[[], bool]:
    return lambda: _restores(root, worker) > before


def _wait(done: Callable[[], bool], seconds: float, what: str, procs: WorkerProcs) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        procs.check()
        assert time.monotonic() < deadline, f"no {what} within {seconds:g}s"
        time.sleep(0.5)


def test_purchases_join_the_catalog_as_of_their_event_time_through_sigkills(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    seed, n, kills = 20261202, 20_000, 6
    rng = random.Random(seed)
    purchases, catalog = workload(seed, n)
    topics = {
        "purchases": kafka.create_topic(partitions=2),
        "catalog": kafka.create_topic(partitions=CATALOG_PARTITIONS, config={"cleanup.policy": "compact"}),
        "out": kafka.create_topic(),
        "dlq": kafka.create_topic(),
    }
    name = f"join-{topics['purchases'][-6:]}"
    job = job_manifest(tmp_path, name, kafka, topics)
    procs = WorkerProcs(job, 2, tmp_path, s3.env(), f"s3://{s3.new_bucket()}/checkpoints")
    for i in range(2):
        procs.start(i)
    wiped = 0
    try:
        with Producing(kafka, topics, purchases, catalog, seconds=20):
            # The first kill comes after a checkpoint committed (output is readable) and wipes the
            # victim's local state, and the next waits until it restored: at least one restart
            # restores from the store however slow the machine is. The others fall anywhere.
            group = f"weir-test-{name}"
            _wait(
                lambda: any(o > 0 for o in kafka.committed(group, topics["purchases"]).values()),
                90,
                "a first checkpoint",
                procs,
            )
            for k in range(kills):
                time.sleep(rng.uniform(0.5, 3.0))
                procs.check()
                victim = rng.randrange(2)
                restores = _restores(tmp_path, victim)
                procs.kill(victim)
                if k == 0 or rng.random() < 0.5:  # as if the pod moved: restore from S3
                    shutil.rmtree(procs.state_dir(victim), ignore_errors=True)
                    wiped += 1
                procs.start(victim)
                if k == 0:
                    _wait(_more_restores(tmp_path, victim, restores), 90, "the restore from S3", procs)
        want, misses = as_of(kafka.read_all(topics["catalog"]), purchases)
        deadline = time.monotonic() + 120
        while True:
            procs.check()
            got = kafka.read_all(topics["out"], timeout=30)
            dead = kafka.read_all(topics["dlq"], timeout=30)
            if len(got) + len(dead) >= n or time.monotonic() > deadline:
                break
            time.sleep(1)
        time.sleep(2.5)  # anything emitted twice after the last expected record shows up
        got = kafka.read_all(topics["out"], timeout=30)
        dead = kafka.read_all(topics["dlq"], timeout=30)
    finally:
        codes = procs.stop_all()
    output = Counter((m.key or b"", m.value or b"") for m in got)
    missing, extra = want - output, output - want
    assert not missing and not extra, f"missing {list(missing)[:3]}, extra {list(extra)[:3]}"
    assert Counter(dict(m.headers).get("weir.reason") for m in dead) == Counter({b"join_miss": misses})
    changed = [orjson.loads(v) for _k, v in output if orjson.loads(v)["product"] == CHANGED]
    assert {r["p_price"] for r in changed} == {13, 999}  # the price change is visible, as of its time
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "restore exact" in logs or wiped == 0, "no restart restored a checkpoint from the store"
    assert procs.starts == 2 + kills
