"""The enrichment example (``weir.examples.enrichment``: purchases joined with a catalog and user
segments as of their event time, then revenue per category|segment per minute, two chained
jobs) against the real broker and S3 server: through SIGKILLs of any worker of either job, and
through a savepoint of the join restored at another parallelism, the read_committed output
equals the example's plain-Python reference exactly; and a table update that arrives after a
stream record it precedes in event time still applies to it."""

from __future__ import annotations

import itertools
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from harness.kafka import KafkaHelper
from harness.s3 import S3Helper
from weir.examples import Record, example
from weir.examples import enrichment as ex

from .test_exactly_once import Job, WorkerProcs

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

T0 = 1_704_067_200_000
STEP_MS = 800
"""Event time per purchase: 3000 purchases span 40 minutes, past every table change."""
EXAMPLE = example("enrichment")


def prefix(seed: int, purchases: int) -> list[Record]:
    """The generator's records up to (and with) its ``purchases``-th purchase."""
    out: list[Record] = []
    seen = 0
    for r in EXAMPLE.generate(seed, T0, STEP_MS):
        out.append(r)
        if r.topic == ex.PURCHASES:
            seen += 1
            if seen == purchases:
                return out
    raise AssertionError("unreachable: the generator is endless")


def create_topics(kafka: KafkaHelper) -> dict[str, str]:
    """The example's topics, under unique names (tables compacted, as ``weir demo`` makes them)."""
    compact = {"cleanup.policy": "compact"}
    return {
        ex.PURCHASES: kafka.create_topic(partitions=2),
        ex.CATALOG: kafka.create_topic(partitions=2, config=compact),
        ex.SEGMENTS: kafka.create_topic(partitions=2, config=compact),
        ex.ENRICHED: kafka.create_topic(partitions=2),
        ex.SINK: kafka.create_topic(),
        "enrichment-dlq": kafka.create_topic(),
    }


def manifests(tmp_path: Path, kafka: KafkaHelper, topics: dict[str, str]) -> tuple[Path, Path]:
    """The example's two jobs (``enrichment.yaml`` as shipped), one file each, with the
    test's topics, broker and unique names."""
    docs = list(yaml.safe_load_all(EXAMPLE.manifest_path().read_text()))
    assert [d["metadata"]["name"] for d in docs] == ["enrichment-join", "enrichment-revenue"]
    paths = []
    for doc in docs:
        doc["metadata"] = {
            "name": f"{doc['metadata']['name']}-{topics[ex.PURCHASES][-6:]}",
            "namespace": "test",
        }
        spec = doc["spec"]
        spec["kafka"]["bootstrapServers"] = kafka.bootstrap
        pipeline = spec["pipeline"]
        pipeline["source"]["topics"] = [topics[t] for t in pipeline["source"]["topics"]]
        for step in pipeline["steps"]:
            if "join" in step:
                step["join"]["topic"] = topics[step["join"]["topic"]]
        pipeline["sink"]["topic"] = topics[pipeline["sink"]["topic"]]
        pipeline["deadLetter"]["topic"] = topics[pipeline["deadLetter"]["topic"]]
        path = tmp_path / f"{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        paths.append(path)
    return paths[0], paths[1]


def produce(kafka: KafkaHelper, topics: dict[str, str], records: list[Record]) -> None:
    """``records`` in order, each run of one topic in one batch (a table record with the
    Kafka timestamp the example gives it)."""
    for topic, run in itertools.groupby(records, key=lambda r: r.topic):
        batch = []
        for r in run:
            rec: dict[str, Any] = {"value": None if r.value is None else orjson.dumps(r.value)}
            if r.key is not None:
                rec["key"] = r.key.encode()
            stamp = getattr(r, "timestamp", None)
            if stamp is not None:
                rec["timestamp"] = stamp
            batch.append(rec)
        kafka.produce(topics[topic], batch)


class Producing:
    """Produces ``records`` in order from a thread, in ``chunks`` over ``seconds``."""

    def __init__(self, kafka: KafkaHelper, topics: dict[str, str], records: list[Record], seconds: float):
        self.kafka, self.topics, self.records, self.seconds = kafka, topics, records, seconds
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        chunks = 30
        size = -(-len(self.records) // chunks)
        for i in range(0, len(self.records), size):
            produce(self.kafka, self.topics, self.records[i : i + size])
            time.sleep(self.seconds / chunks)

    def __enter__(self) -> Producing:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)


def canonical(records: list[dict[str, Any]]) -> Counter[bytes]:
    return Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records)


def wait_for_reference(
    kafka: KafkaHelper, sink: str, want: Counter[bytes], check: Any, timeout: float = 120
) -> Counter[bytes]:
    """The sink's read_committed records once there are as many as ``want`` (plus a pause in
    which anything written twice would show up)."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        got = kafka.read_all(sink, timeout=30)
        if len(got) >= sum(want.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    time.sleep(3)
    return canonical([orjson.loads(m.value or b"null") for m in kafka.read_all(sink, timeout=30)])


def assert_same(got: Counter[bytes], want: Counter[bytes]) -> None:
    missing, extra = want - got, got - want
    assert not missing and not extra, f"missing {list(missing)[:3]}, extra {list(extra)[:3]}"


def wait_assigned(procs: WorkerProcs, i: int, times: int, check: Any, timeout: float = 60) -> None:
    """Until worker ``i`` has been assigned its partitions ``times`` times (this start's): a
    worker killed while it starts tests nothing."""
    deadline = time.monotonic() + timeout
    while (procs.root / f"w{i}.log").read_text(errors="replace").count(" assigned ") < times:
        assert time.monotonic() < deadline, f"worker {i} did not start:\n{procs.log_tail(i)}"
        check()
        time.sleep(0.2)


@pytest.mark.timeout(240)
def test_the_enrichment_example_through_sigkills_of_either_job_equals_its_reference(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    seed, n, kills = 20261202, 3_000, 6
    rng = random.Random(seed)
    records = prefix(seed, n)
    want = canonical(EXAMPLE.reference(records))
    topics = create_topics(kafka)
    join_job, revenue_job = manifests(tmp_path, kafka, topics)
    url = f"s3://{s3.new_bucket()}/checkpoints"
    jobs = {
        "join": WorkerProcs(join_job, 2, tmp_path / "join", s3.env(), url),
        "revenue": WorkerProcs(revenue_job, 2, tmp_path / "revenue", s3.env(), url),
    }
    for procs in jobs.values():
        procs.root.mkdir()
        for i in range(2):
            procs.start(i)
    wiped = 0
    started = Counter({(name, i): 1 for name in jobs for i in range(2)})  # starts per worker

    def check() -> None:
        for procs in jobs.values():
            procs.check()

    try:
        with Producing(kafka, topics, records, seconds=25):
            for _ in range(kills):
                name, victim = rng.choice(sorted(jobs)), rng.randrange(2)
                procs = jobs[name]
                wait_assigned(procs, victim, started[(name, victim)], check)
                time.sleep(rng.uniform(0.5, 2.5))  # running: a few checkpoints (every 0.5 s)
                procs.kill(victim)
                if rng.random() < 0.5:  # as if the pod moved: restore from S3
                    shutil.rmtree(procs.state_dir(victim), ignore_errors=True)
                    wiped += 1
                procs.start(victim)
                started[(name, victim)] += 1
        got = wait_for_reference(kafka, topics[ex.SINK], want, check)
        dead = kafka.read_all(topics["enrichment-dlq"], timeout=30)
    finally:
        codes = {name: procs.stop_all() for name, procs in jobs.items()}
    assert_same(got, want)
    assert not dead, [(dict(m.headers), m.value) for m in dead[:3]]
    assert codes == {"join": [0, 0], "revenue": [0, 0]}, codes
    logs = "".join(p.read_text() for procs in jobs.values() for p in procs.root.glob("w*.log"))
    assert "restore exact" in logs or wiped == 0, "no restart restored a checkpoint from the store"
    assert sum(procs.starts for procs in jobs.values()) == 4 + kills


@pytest.fixture
def s3_env(s3: S3Helper, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Helper]:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    yield s3


def test_a_savepoint_of_the_join_at_two_workers_restored_at_one_keeps_the_output_exact(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    records = prefix(7, 2_400)

    def upto(order: int) -> int:
        return next(
            i for i, r in enumerate(records) if r.value is not None and r.value.get("order") == f"o-{order}"
        )

    # Phase 1: the tables and 700 purchases (9 minutes), all joined. Phase 2, up to purchase
    # 1000: the price change (valid from 10 minutes) moves its catalog partition's time, so the
    # purchases after it are held (until the 2 s idle timeout) when the savepoint is taken right
    # after they are read: it carries them and the tables into the one worker. Phase 3: the
    # rest (the segment changes at 20 and 30 minutes), read by the one worker.
    first, second = upto(700) + 1, upto(1000) + 1
    want = canonical(EXAMPLE.reference(records))
    topics = create_topics(kafka)
    join_job, revenue_job = manifests(tmp_path, kafka, topics)
    url = f"s3://{s3_env.new_bucket()}/checkpoints"
    produce(kafka, topics, records[:first])
    with Job(revenue_job, kafka, 1, tmp_path / "revenue", url) as revenue:
        with Job(join_job, kafka, 2, tmp_path / "join2", url) as joining:
            joining.wait_ready()
            deadline = time.monotonic() + 60
            while len(kafka.read_all(topics[ex.ENRICHED], timeout=30)) < 700:
                assert time.monotonic() < deadline, "the join did not write the first 700 purchases"
                joining.check()
                time.sleep(0.5)
            produce(kafka, topics, records[first:second])
            joining.wait_read(kafka, topics[ex.PURCHASES])
            answers = joining.savepoint("sp-enrich", stop=True)
        savepoint_url = answers[0]["path"]
        assert savepoint_url.endswith("/savepoints/sp-enrich") and answers[1]["path"] == savepoint_url
        written = len(kafka.read_all(topics[ex.ENRICHED], timeout=30))
        assert 700 <= written <= 1_000, written
        with Job(join_job, kafka, 1, tmp_path / "join1", url, restore_from=savepoint_url) as joining:
            produce(kafka, topics, records[second:])
            got = wait_for_reference(kafka, topics[ex.SINK], want, lambda: (joining.check(), revenue.check()))
    assert_same(got, want)
    enriched = [orjson.loads(m.value or b"null") for m in kafka.read_all(topics[ex.ENRICHED], timeout=30)]
    orders = Counter(r["order"] for r in enriched)
    assert len(orders) == 2_400 and set(orders.values()) == {1}, "each purchase enriched exactly once"
    assert not kafka.read_all(topics["enrichment-dlq"], timeout=10)


def race_manifest(
    tmp_path: Path, kafka: KafkaHelper, purchases: str, catalog: str, out: str, dlq: str
) -> Path:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": f"race-{purchases[-6:]}", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": kafka.bootstrap},
            "pipeline": {
                "source": {"topics": [purchases], "eventTime": {"field": "ts"}},
                "steps": [
                    {
                        "join": {
                            "topic": catalog,
                            "key": "product",
                            "fields": ["price"],
                            "grace": "500ms",
                            "idleTimeout": "0s",  # only the table's own records move its time
                        }
                    }
                ],
                "sink": {"topic": out},
                "deadLetter": {"topic": dlq},
            },
        },
    }
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_table_update_arriving_after_a_purchase_it_precedes_in_event_time_applies_to_it(
    kafka: KafkaHelper, s3_env: S3Helper, tmp_path: Path
) -> None:
    purchases, catalog, out, dlq = (kafka.create_topic() for _ in range(4))
    job = race_manifest(tmp_path, kafka, purchases, catalog, out, dlq)

    def table(key: str, at: int, value: dict[str, Any]) -> None:
        kafka.produce(catalog, [{"key": key.encode(), "value": orjson.dumps(value), "timestamp": T0 + at}])

    def purchase(order: str, at: int) -> None:
        value = {"order": order, "product": "p", "ts": T0 + at}
        kafka.produce(purchases, [{"key": b"u", "value": orjson.dumps(value)}])

    table("p", 0, {"price": 100})
    table("~clock", 1_200, {})  # the table's time: 1200 - grace = 700
    url = f"s3://{s3_env.new_bucket()}/checkpoints"
    with Job(job, kafka, 1, tmp_path / "state", url) as running:
        running.wait_ready()
        purchase("at-1000", 1_000)
        purchase("at-800", 800)
        running.wait_read(kafka, purchases)  # both read, both held (after the table's time)
        assert not kafka.read_all(out, timeout=5), "a purchase was joined before the table's time reached it"
        table("p", 900, {"price": 90})  # valid from 900, arriving after both (within the grace)
        table("~clock", 10_000, {})  # the table's time passes both purchases
        deadline = time.monotonic() + 30
        while len(got := kafka.read_all(out, timeout=10)) < 2 and time.monotonic() < deadline:
            running.check()
            time.sleep(0.5)
    prices = {
        orjson.loads(m.value or b"null")["order"]: orjson.loads(m.value or b"null")["price"] for m in got
    }
    assert prices == {"at-1000": 90, "at-800": 100}, prices
    assert len(got) == 2
