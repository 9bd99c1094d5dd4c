"""The join step in the real worker loop on the in-memory broker and store: purchases joined
with a catalog topic as of their event time, against a brute-force as-of reference, through
crash schedules like ``test_commit_recovery`` (aborts at every step of the commit protocol,
restarts with and without local state, savepoints on the way)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

import weir
from weir.controlapi import SavepointRequest
from weir.graph import JobGraph, compile_job
from weir.spec import Job, load_job
from weir.testing import reference_windows
from weir.testing.broker import STEPS, Faults, FaultyStore, MemoryBroker, memory_worker, run_through
from weir.worker import Worker

T0 = 1_704_067_200_000
PARTITIONS = 2
TABLE_PARTITIONS = 2
GRACE = 1_000
END = "~end"
JOIN = {"topic": "catalog", "key": "product", "fields": ["price", "category"], "prefix": "p_", "grace": GRACE}
WINDOW_STEPS = [
    {"window": {"type": "tumbling", "size": "10s"}},
    {"aggregate": {"outputs": {"n": {"fn": "count"}, "revenue": {"fn": "sum", "field": "p_price"}}}},
]


def job(steps: list[dict[str, Any]], ooo: str = "2s") -> Job:
    doc = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "enrich", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": {"topics": ["purchases"], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": ooo},
                "steps": steps,
                "sink": {"topic": "out"},
                "deadLetter": {"topic": "dlq"},
            },
        },
    }
    return load_job(orjson.dumps(doc).decode())


Purchase = tuple[int, str, int, dict[str, Any]]
Update = tuple[str, int, dict[str, Any] | None]


def data(seed: int, count: int = 50) -> tuple[list[Purchase], list[Update]]:
    """Purchases ``(partition, user, ts, record)`` and catalog updates ``(product, ts, value or
    None)`` in write order: prices change mid-stream, some updates are out of order (late for
    the grace), one product is deleted, one is never listed, some purchases come before their
    product's first price."""
    rng = random.Random(seed)
    updates: list[Update] = []
    for product in ("a", "b", "c", "d"):
        ts = T0 + rng.randrange(0, 20_000)
        for _ in range(rng.randrange(1, 5)):
            value = {"price": rng.randrange(1, 50), "category": rng.choice(["toys", "books"])}
            updates.append((product, ts, value))
            ts += rng.randrange(1_000, 30_000)
    updates.append(("d", T0 + 60_000, None))  # deleted: later purchases of d miss
    updates.sort(key=lambda u: u[1])
    for _ in range(3):  # a few written out of order: some within the grace, some late for it
        i = rng.randrange(len(updates) - 1)
        updates[i], updates[i + 1] = updates[i + 1], updates[i]
    purchases: list[Purchase] = []
    clock = [T0, T0]
    for _ in range(count):
        p = rng.randrange(PARTITIONS)
        clock[p] += rng.randrange(0, 5_000)
        ts = clock[p] - (rng.randrange(0, 3_000) if rng.random() < 0.2 else 0)
        product = rng.choice(["a", "b", "c", "d", "e"])
        purchases.append((p, f"u{p}-{rng.randrange(3)}", ts, {"ts": ts, "product": product, "amount": 1}))
    end = max(clock) + 3_600_000
    for p in range(PARTITIONS):  # moves every window past its end
        purchases.append((p, f"{END}{p}", end, {"ts": end, "product": "a", "amount": 0}))
    return purchases, updates


def catalog_partition(product: str) -> int:
    return sum(product.encode()) % TABLE_PARTITIONS


def broker_with(purchases: list[Purchase], updates: list[Update]) -> MemoryBroker:
    broker = MemoryBroker()
    broker.create("purchases", PARTITIONS)
    broker.create("catalog", TABLE_PARTITIONS)
    broker.create("out", PARTITIONS)
    for p, user, _ts, record in purchases:
        broker.append("purchases", orjson.dumps(record), user.encode(), p)
    for product, ts, value in updates:
        data = None if value is None else orjson.dumps(value)
        broker.append("catalog", data, product.encode(), catalog_partition(product), ts)
    far = T0 + 10 * 86_400_000  # the table's time passes every purchase: all of them join
    for q in range(TABLE_PARTITIONS):
        broker.append("catalog", orjson.dumps({"price": 0}), f"{END}{q}".encode(), q, far)
    # Segments, keyed by user and partitioned like the purchases (user u<p>-i is in partition p):
    # a co-partitioned table. Each user's segment changes once; u<p>-2 has none until late.
    broker.create("segments", PARTITIONS)
    for p in range(PARTITIONS):
        for i, (first, second) in enumerate([(0, 40_000), (10_000, 70_000), (90_000, 100_000)]):
            user = f"u{p}-{i}".encode()
            broker.append("segments", orjson.dumps({"segment": "new"}), user, p, T0 + first)
            broker.append("segments", orjson.dumps({"segment": "loyal"}), user, p, T0 + second)
        broker.append("segments", orjson.dumps({"segment": "-"}), f"{END}{p}".encode(), p, far)
    return broker


# --------------------------------------------------------------------------- the reference


def as_of_reference(
    broker: MemoryBroker, purchases: list[Purchase]
) -> list[tuple[str, int, dict[str, Any] | None]]:
    """Each purchase ``(user, ts, joined record or None for a miss)``, brute force: a table
    update read from partition ``q`` behind that partition's newest time minus the grace is
    seen by lookups after that point only (``weir.join``); a lookup at ``t`` takes the newest
    update (by time, then visibility, then offset) with time and visibility at or before ``t``."""
    versions = table_versions(broker, "catalog", GRACE)
    out = []
    for _p, user, ts, record in purchases:
        value = lookup(versions, record["product"], ts)
        joined = (
            None
            if value is None
            else {**record, "p_price": value.get("price"), "p_category": value.get("category")}
        )
        out.append((user, ts, joined))
    return out


Versions = dict[str, list[tuple[int, int, int, dict[str, Any] | None]]]


def table_versions(broker: MemoryBroker, topic: str, grace: int) -> Versions:
    """Every key's versions ``(time, visible from, offset, value)`` as ``weir.join`` stores them."""
    versions: Versions = {}
    for log in broker.topics[topic]:
        newest: int | None = None
        for m in log:
            u = m.timestamp()[1]
            frontier = None if newest is None else newest - grace
            visible = u if frontier is None or u > frontier else frontier + 1
            value = None if m.value() is None else orjson.loads(m.value() or b"")
            versions.setdefault((m.key() or b"").decode(), []).append((u, visible, m.offset(), value))
            newest = u if newest is None else max(newest, u)
    return versions


def lookup(versions: Versions, key: str, ts: int) -> dict[str, Any] | None:
    seen = [v for v in versions.get(key, []) if v[0] <= ts and v[1] <= ts]
    return max(seen, key=lambda v: v[:3])[3] if seen else None


def chained_reference(broker: MemoryBroker, purchases: list[Purchase]) -> tuple[Counter[Any], int]:
    """The two-join pipeline's output: a left join with the catalog, then an inner join with the
    segments by the record's key; returns the sink records and the number of misses."""
    catalog, segments = table_versions(broker, "catalog", GRACE), table_versions(broker, "segments", 0)
    out: Counter[Any] = Counter()
    misses = 0
    for _p, user, ts, record in purchases:
        product = lookup(catalog, record["product"], ts) or {}
        segment = lookup(segments, user, ts)
        if segment is None:
            misses += 1
            continue
        joined = {**record, "p_price": product.get("price"), "p_category": product.get("category")}
        joined["segment"] = segment.get("segment")
        out[("out", user.encode(), orjson.dumps(joined))] += 1
    return out, misses


# --------------------------------------------------------------------------- running


def run(
    broker: MemoryBroker,
    root: Path,
    graph: JobGraph,
    schedule: list[tuple[str, int]],
    seed: int,
    savepoint_every: int = 0,
    wipe: float = 0.5,
) -> int:
    """Run the job to the end of its input through every abort of ``schedule``; returns the
    number of restarts."""
    return run_through(graph, broker, root, schedule, seed, savepoint_every=savepoint_every, wipe=wipe)


def output(broker: MemoryBroker) -> Counter[tuple[str, bytes | None, bytes | None]]:
    return Counter((m.topic(), m.key(), m.value()) for t in ("out", "dlq") for m in broker.records(t))


def reasons(broker: MemoryBroker) -> Counter[bytes | None]:
    return Counter(m.headers().get("weir.reason") for m in broker.records("dlq"))


SINK_GRAPH = compile_job(job([{"join": JOIN}]), wall_ms=lambda: T0 + 86_400_000)
WINDOW_GRAPH = compile_job(job([{"join": JOIN}, *WINDOW_STEPS]), wall_ms=lambda: T0 + 86_400_000)
SEGMENTS = {"topic": "segments", "mode": "copartitioned", "fields": ["segment"]}
CHAINED_GRAPH = compile_job(
    job([{"join": {**JOIN, "kind": "left"}}, {"join": SEGMENTS}]), wall_ms=lambda: T0 + 86_400_000
)
SHUFFLED_GRAPH = compile_job(
    job([{"keyBy": {"field": "product"}}, {"join": {k: v for k, v in JOIN.items() if k != "key"}}]),
    wall_ms=lambda: T0 + 86_400_000,
)


class PerMinute(weir.ProcessFunction):
    """Counts each user's joined purchases and revenue per minute (order does not matter)."""

    def open(self, state: weir.KeyedState) -> None:
        self.minutes = state.map("minutes")

    def process(self, record: dict[str, Any], ctx: weir.Context) -> None:
        minute = ctx.timestamp - ctx.timestamp % 60_000
        n, revenue = self.minutes.get(str(minute), [0, 0])
        self.minutes.put(str(minute), [n + 1, revenue + record["p_price"]])
        ctx.timers.register(minute + 59_999)

    def on_timer(self, timestamp: int, ctx: weir.Context) -> dict[str, Any]:
        minute = timestamp - 59_999
        n, revenue = self.minutes.get(str(minute), [0, 0])
        self.minutes.remove(str(minute))
        return {"user": ctx.key, "minute": minute, "n": n, "revenue": revenue}


PROCESS_GRAPH = compile_job(
    job([{"join": JOIN}, {"process": {"function": "tests.unit.test_join_pipeline:PerMinute"}}], ooo="5s"),
    wall_ms=lambda: T0 + 86_400_000,
)
GRAPHS = {
    "sink": SINK_GRAPH,
    "window": WINDOW_GRAPH,
    "chained": CHAINED_GRAPH,
    "shuffled": SHUFFLED_GRAPH,
    "process": PROCESS_GRAPH,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Counter[Any]]:
    """Committed output of crash-free runs, per pipeline and input seed."""
    out = {}
    for name, graph in GRAPHS.items():
        for input_seed in range(3):
            broker = broker_with(*data(input_seed))
            assert run(broker, tmp_path_factory.mktemp(f"{name}{input_seed}"), graph, [], input_seed) == 0
            out[(name, input_seed)] = output(broker)
    return out


def test_each_purchase_joins_the_catalog_value_valid_at_its_event_time(
    reference: dict[tuple[str, int], Counter[Any]],
) -> None:
    for input_seed in range(3):
        purchases, updates = data(input_seed)
        broker = broker_with(purchases, updates)
        want = as_of_reference(broker, purchases)
        got = reference[("sink", input_seed)]
        hits = Counter(("out", user.encode(), orjson.dumps(r)) for user, _ts, r in want if r is not None)
        misses = sum(1 for _u, _t, r in want if r is None)
        assert Counter({k: n for k, n in got.items() if k[0] == "out"}) == hits
        assert sum(n for k, n in got.items() if k[0] == "dlq") == misses
        assert misses > 0 and len(hits) > 0  # both kinds happen in the data


def test_records_keyed_by_a_field_are_joined_by_it_after_the_repartition(
    reference: dict[tuple[str, int], Counter[Any]],
) -> None:
    for input_seed in range(3):
        purchases, updates = data(input_seed)
        want = as_of_reference(broker_with(purchases, updates), purchases)
        hits = Counter(("out", r["product"].encode(), orjson.dumps(r)) for _u, _t, r in want if r is not None)
        got = reference[("shuffled", input_seed)]
        assert Counter({k: n for k, n in got.items() if k[0] == "out"}) == hits
        assert sum(n for k, n in got.items() if k[0] == "dlq") == sum(1 for *_x, r in want if r is None)


def test_a_process_function_behind_the_join_sees_every_joined_record_once(
    reference: dict[tuple[str, int], Counter[Any]],
) -> None:
    for input_seed in range(3):
        purchases, updates = data(input_seed)
        want: Counter[tuple[str, int]] = Counter()
        revenue: Counter[tuple[str, int]] = Counter()
        for user, ts, r in as_of_reference(broker_with(purchases, updates), purchases):
            if r is not None and not user.startswith(END):  # the last minute never closes
                want[(user, ts - ts % 60_000)] += 1
                revenue[(user, ts - ts % 60_000)] += r["p_price"]
        got = [
            orjson.loads(k[2] or b"")
            for k, n in reference[("process", input_seed)].items()
            for _ in range(n)
            if k[0] == "out"
        ]
        assert Counter({(r["user"], r["minute"]): r["n"] for r in got}) == +want
        assert len(got) == len(+want)  # one summary per user and minute: no record came after its timer
        assert {(r["user"], r["minute"]): r["revenue"] for r in got} == dict(
            +revenue + Counter({k: 0 for k in want})
        )


def test_inner_misses_are_dead_lettered_as_join_miss_with_the_purchase(tmp_path: Path) -> None:
    purchases, updates = data(0)
    broker = broker_with(purchases, updates)
    run(broker, tmp_path, SINK_GRAPH, [], 0)
    want = as_of_reference(broker, purchases)
    dead = broker.records("dlq")

    assert reasons(broker) == Counter({b"join_miss": sum(1 for *_x, r in want if r is None)})
    assert all(orjson.loads(m.value() or b"")["product"] in "abcde" for m in dead)


def test_joined_records_flow_into_the_window_as_the_brute_force_windows_say(
    reference: dict[tuple[str, int], Counter[Any]],
) -> None:
    for input_seed in range(3):
        purchases, updates = data(input_seed)
        broker = broker_with(purchases, updates)
        joined = as_of_reference(broker, purchases)
        # A miss never reaches the window, but it moved its partition's watermark: the
        # reference sees every purchase, and windows only the joined ones' values.
        events = [
            (p, user, ts, r if r is not None else {**rec, "p_price": None, "miss": True})
            for (p, user, ts, rec), (_u, _t, r) in zip(purchases, joined, strict=True)
        ]
        specs = [("n", "count", None), ("revenue", "sum", "p_price")]
        hits = [e for e in events if not e[3].get("miss")]
        _windows, late = reference_windows(events, "tumbling", 10_000, None, None, 0, 2_000, specs)
        late_ids = {id(e[3]) for e in late}
        kept = [e for e in hits if id(e[3]) not in late_ids]
        expected: dict[tuple[str, int, int], dict[str, Any]] = {}
        for _p, user, ts, r in kept:
            start = ts - ts % 10_000
            w = expected.setdefault((user, start, start + 10_000), {"n": 0, "revenue": 0})
            w["n"] += 1
            w["revenue"] += r["p_price"]
        got = {}
        for topic, _key, value in reference[("window", input_seed)].elements():
            if topic == "out":
                r = orjson.loads(value or b"")
                got[(r["key"], r["windowStartMs"], r["windowEndMs"])] = {"n": r["n"], "revenue": r["revenue"]}
        assert {w: v for w, v in got.items() if not w[0].startswith(END)} == {
            w: v for w, v in expected.items() if not w[0].startswith(END)
        }


def test_a_left_catalog_join_then_a_copartitioned_segment_join_chain_as_of_each_records_time(
    reference: dict[tuple[str, int], Counter[Any]],
) -> None:
    for input_seed in range(3):
        purchases, updates = data(input_seed)
        want, misses = chained_reference(broker_with(purchases, updates), purchases)
        got = reference[("chained", input_seed)]
        assert Counter({k: n for k, n in got.items() if k[0] == "out"}) == want
        assert sum(n for k, n in got.items() if k[0] == "dlq") == misses
        assert misses > 0 and any(b'"p_price":null' in k[2] for k in want)


@pytest.mark.parametrize("seed", range(45))
def test_every_abort_schedule_joins_exactly_as_the_uninterrupted_run(
    seed: int, reference: dict[tuple[str, int], Counter[Any]], tmp_path: Path
) -> None:
    input_seed = seed % 3
    name = list(GRAPHS)[seed % 5]
    graph = GRAPHS[name]
    broker = broker_with(*data(input_seed))
    rng = random.Random(seed)
    schedule = [(rng.choice(STEPS), rng.randrange(1, 6)) for _ in range(rng.randrange(1, 4))]
    restarts = run(broker, tmp_path, graph, schedule, seed, savepoint_every=13 if seed % 3 == 0 else 0)
    assert output(broker) == reference[(name, input_seed)], f"schedule {schedule} ({restarts} restarts)"


@pytest.mark.parametrize("name", ["sink", "window", "chained"])
def test_a_savepoint_restored_at_another_parallelism_joins_as_the_uninterrupted_run(
    name: str, reference: dict[tuple[str, int], Counter[Any]], tmp_path: Path
) -> None:
    graph, input_seed = GRAPHS[name], 1
    broker = broker_with(*data(input_seed))
    backend = FaultyStore(Faults())
    seen = [0]

    def on_consume(n: int) -> None:  # a savepoint and stop once some records are read
        seen[0] += n
        if seen[0] >= 40 and not asked:
            asked.append(True)
            first.savepoints.ask(SavepointRequest(id="rescale", stop=True))
        elif n == 0:
            first.stop()

    asked: list[bool] = []
    first = settings_worker(graph, broker, backend, tmp_path / "one", 0, 1, on_consume)
    assert first.run() == 0
    answer = first.savepoints.last
    assert answer is not None and answer.status == "completed" and answer.path is not None
    url = answer.path
    assert len(broker.records("out")) < sum(
        n for k, n in reference[(name, input_seed)].items() if k[0] == "out"
    )

    workers: dict[int, Worker] = {}
    for index in range(2):  # two workers restore the one worker's savepoint, one after the other

        def stop_when_read(n: int, index: int = index) -> None:
            if n == 0:
                workers[index].stop()

        workers[index] = settings_worker(
            graph, broker, backend, tmp_path / f"two{index}", index, 2, stop_when_read, url
        )
        assert workers[index].run() == 0

    assert output(broker) == reference[(name, input_seed)]


def settings_worker(
    graph: JobGraph,
    broker: MemoryBroker,
    backend: FaultyStore,
    state: Path,
    index: int,
    count: int,
    on_consume: Any,
    restore_from: str | None = None,
) -> Worker:
    return memory_worker(
        graph, broker, state, on_consume=on_consume, backend=backend, index=index, workers=count,
        restore_from=restore_from,
    )


@pytest.mark.parametrize("schedule", [[], [("after-commit", 2)], [("records", 3), ("mid-upload", 1)]])
def test_a_bad_table_record_is_dead_lettered_once_and_skipped(
    schedule: list[tuple[str, int]], reference: dict[tuple[str, int], Counter[Any]], tmp_path: Path
) -> None:
    purchases, updates = data(0)
    broker = broker_with(purchases, [])
    q = catalog_partition("zz")
    broker.append("catalog", b"[1]", b"zz", q, T0)  # not an object
    broker.append("catalog", b'{"price": 1}', None, q, T0)  # no key
    broker.append("catalog", b"{oops", b"zz", q, T0)
    for product, ts, value in updates:  # then the catalog as usual, before its end records
        broker.append(
            "catalog",
            None if value is None else orjson.dumps(value),
            product.encode(),
            catalog_partition(product),
            ts,
        )

    run(broker, tmp_path, SINK_GRAPH, schedule, 0, wipe=1.0)

    table_reasons = {b"not_an_object": 1, b"bad_key": 1, b"decode_error": 1}
    assert {r: n for r, n in reasons(broker).items() if r != b"join_miss"} == table_reasons
    assert all(
        m.headers().get("weir.source.topic") == b"catalog"
        for m in broker.records("dlq")
        if m.headers().get("weir.reason") != b"join_miss"
    )
