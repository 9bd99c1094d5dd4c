"""Python functions and keyed process functions against the real broker and S3 server.

Every test compares the read_committed output with a reference computed here: the example
process function's ``weir.examples.dedup.reference`` over what the map produced, or the custom
aggregate applied to each window's records. Outputs are compared as multisets, so a record
missing or written twice fails the test.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

import user_functions
from harness.kafka import KafkaHelper
from harness.s3 import S3Helper
from weir.examples.dedup import reference
from weir.testing import random_events, reference_windows

from .test_exactly_once import Job, Trickle, WorkerProcs, as_records, events_for, s3_env  # noqa: F401 - fixture
from .test_pipelines import LATENESS_MS, OOO_MS, OUTPUTS, START_MS, WINDOWS, Running, manifest, produce_events

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

Event = tuple[int, str, int, dict[str, Any]]  # (partition, message key, event time, record)

NORMALISE = {"map": {"function": "user_functions:normalise"}}
KEY_BY_USER = {"keyBy": {"field": "user", "partitions": 4}}
DEDUP = {"process": {"function": "weir.examples.dedup:Dedup"}}
TESTS_DIR = str(Path(user_functions.__file__).parent)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a ``weir run`` child needs besides this process's environment: tests/ on its path,
    so it imports ``user_functions`` as pytest does."""
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    return {**(extra or {}), "PYTHONPATH": path}


def dedup_events(
    seed: int, n: int, partitions: int = 4, users: int = 16, bad: Iterable[int] = ()
) -> list[Event]:
    """Events for the dedup pipeline that meet ``reference``'s exactness conditions.

    One clock over all partitions, and every user in one partition: each key's records reach
    the process function in event-time order, none is late. About a third of the records repeat
    one of the user's last ten ids, seconds after it (far inside the 1 h TTL). The raw user
    (``u``) is mixed-case and sometimes padded: the map normalises it into the keyBy field.
    Records whose ``seq`` is in ``bad`` are marked ``"bad": true``.
    """
    rng = random.Random(seed)
    marked = set(bad)
    t = START_MS
    ids: dict[int, list[str]] = {}
    events: list[Event] = []
    for seq in range(n):
        t += rng.randint(1, 60)
        u = rng.randrange(users)
        seen = ids.setdefault(u, [])
        if seen and rng.random() < 0.35:
            event_id = rng.choice(seen[-10:])
        else:
            event_id = f"e{seq}"
            seen.append(event_id)
        raw = f" U-{u} " if u % 3 == 0 else f"U-{u}"
        record: dict[str, Any] = {"u": raw, "eventId": event_id, "seq": seq}
        if seq in marked:
            record["bad"] = True
        events.append((u % partitions, f"U-{u}", t, record))
    return events


def source_records(events: list[Event]) -> list[dict[str, Any]]:
    """The records as the source topic holds them (``as_records`` adds ``ts`` and ``k``)."""
    return [{**record, "ts": ts, "k": key} for _p, key, ts, record in events]


def dedup_reference(events: list[Event]) -> Counter[tuple[str, bytes]]:
    mapped = [user_functions.normalise(r) for r in source_records(events) if not r.get("bad")]
    return multiset(reference((m["user"], m["ts"], m) for m in mapped))


def multiset(pairs: Iterable[tuple[str, dict[str, Any]]]) -> Counter[tuple[str, bytes]]:
    return Counter((key, orjson.dumps(record, option=orjson.OPT_SORT_KEYS)) for key, record in pairs)


def output_of(kafka: KafkaHelper, topic: str) -> Counter[tuple[str, bytes]]:
    pairs = []
    for m in kafka.read_all(topic, timeout=30):
        assert m.key is not None and m.value is not None, m
        pairs.append((m.key.decode(), orjson.loads(m.value)))
    return multiset(pairs)


def wait_for_count(kafka: KafkaHelper, topic: str, n: int, timeout: float, check: Any = None) -> None:
    """Until ``topic`` has ``n`` committed records; then a little longer, so that anything
    written twice after the last expected record is there too."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        got = len(kafka.read_all(topic, timeout=30))
        if got >= n:
            time.sleep(2.5)
            return
        assert time.monotonic() < deadline, f"{got} of {n} records in {topic} after {timeout:.0f}s"
        time.sleep(0.5)


def assert_same(got: Counter[tuple[str, bytes]], expected: Counter[tuple[str, bytes]]) -> None:
    missing, extra = expected - got, got - expected
    assert not missing and not extra, (
        f"{sum(missing.values())} missing, e.g. {list(missing)[:3]}; "
        f"{sum(extra.values())} extra (or twice), e.g. {list(extra)[:3]}"
    )


def dedup_job(
    tmp_path: Path, name: str, kafka: KafkaHelper, source: str, sink: str, dlq: str, **kw: Any
) -> Path:
    steps = [kw.pop("map", NORMALISE), KEY_BY_USER, DEDUP]
    return manifest(tmp_path, name, kafka, source, sink, dlq, {}, steps=steps, **kw)


# --- 1. map + keyBy + process ----------------------------------------------------------------


def test_a_map_then_the_dedup_process_function_gives_the_reference_output(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    events = dedup_events(1, 4000)
    expected = dedup_reference(events)
    assert any(orjson.loads(r).get("duplicates", 0) > 0 for _k, r in expected), "the stream needs repeats"
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    kafka.produce(source, as_records(events))
    job = dedup_job(tmp_path, f"dedup-{source[-6:]}", kafka, source, sink, dlq)
    with Running(job, kafka, 2, tmp_path / "state"):
        wait_for_count(kafka, sink, sum(expected.values()), timeout=90)
    assert_same(output_of(kafka, sink), expected)
    assert kafka.read_all(dlq) == []


# --- 2. the kill test ---------------------------------------------------------------------------


def test_the_dedup_pipeline_killed_at_random_instants_gives_exactly_the_reference_output(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    rng = random.Random(14)
    events = dedup_events(2, 8000)
    expected = dedup_reference(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    job = dedup_job(tmp_path, f"dkill-{source[-6:]}", kafka, source, sink, dlq)
    url = f"s3://{s3.new_bucket()}/checkpoints"
    procs = WorkerProcs(job, 2, tmp_path, subprocess_env(s3.env()), url)
    for i in range(2):
        procs.start(i)
    kills = 10
    group = f"weir-test-dkill-{source[-6:]}"
    try:
        with Trickle(kafka, source, events, seconds=40) as trickle:
            procs.kill_schedule(
                rng, kills, (0.3, 2.0), lambda: any(o > 0 for o in kafka.committed(group, source).values())
            )
            mid_stream = not trickle.done.is_set()
        wait_for_count(kafka, sink, sum(expected.values()), timeout=120, check=procs.check)
    finally:
        codes = procs.stop_all()
    assert_same(output_of(kafka, sink), expected)
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    assert procs.starts == 2 + kills
    assert mid_stream, "the last kill came after the input had all been produced"
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "restore exact" in logs, "no restart restored a checkpoint from the store"
    assert kafka.read_all(dlq) == []


# --- 3. savepoint and rescale -------------------------------------------------------------------


@pytest.mark.usefixtures("s3_env")  # the in-process workers read the S3 settings from the environment
@pytest.mark.parametrize("workers", [1, 3])
def test_a_dedup_savepoint_at_two_workers_restored_at_another_parallelism_gives_the_uninterrupted_output(
    workers: int, kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    # One job per parallelism: the restored job keeps its name, as the operator's rescale does,
    # because the repartition topic (and with it the keyed state's partitions) is named after
    # the job: a renamed job would not find the process function's state in the savepoint.
    events = dedup_events(3, 4000)
    expected = dedup_reference(events)
    records = as_records(events)
    source = kafka.create_topic(partitions=4)
    url = f"s3://{s3.new_bucket()}/ck"
    kafka.produce(source, records[: len(records) // 2])
    sink0, sink, dlq = kafka.create_topic(), kafka.create_topic(), kafka.create_topic()
    name = f"dsp{workers}-{source[-6:]}"
    # A long idleTimeout before the savepoint: an idle source would move the watermark to the
    # wall clock, summarise the half-filled minutes and forget every id (TTL) - a different
    # job from the uninterrupted one.
    job0 = dedup_job(tmp_path, name, kafka, source, sink0, dlq, idle="1h")
    with Job(job0, kafka, 2, tmp_path / "s0", url) as running:
        running.wait_ready()
        running.wait_read(kafka, source)
        # Some output before the savepoint, so that the output is split across it (what stage 2
        # has not read yet is in the repartition topic, after the savepoint's offsets).
        wait_for_count(kafka, sink0, 1, timeout=60, check=running.check)
        answers = running.savepoint("sp-dedup", stop=True)
    assert all(a["status"] == "completed" for a in answers), answers
    before = output_of(kafka, sink0)
    assert before, "nothing was emitted before the savepoint"
    kafka.produce(source, records[len(records) // 2 :])

    job = dedup_job(tmp_path, name, kafka, source, sink, dlq)
    with Job(job, kafka, workers, tmp_path / "s1", url, restore_from=answers[0]["path"]) as running:
        wait_for_count(kafka, sink, sum((expected - before).values()), 90, running.check)
    after = output_of(kafka, sink)
    assert not set(before) & set(after), "a record emitted before the savepoint was emitted again"
    assert_same(before + after, expected)
    assert kafka.read_all(dlq) == []


# --- 4. a raising function ----------------------------------------------------------------------


def test_records_a_map_raises_on_are_dead_lettered_as_function_error_and_every_other_result_is_exact(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    bad = {5, 77, 901, 1500, 2999}
    events = dedup_events(4, 3000, bad=bad)
    expected = dedup_reference(events)
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    kafka.produce(source, as_records(events))
    step = {"map": {"function": "user_functions:normalise_unless_marked"}}
    job = dedup_job(tmp_path, f"derr-{source[-6:]}", kafka, source, sink, dlq, map=step)
    with Running(job, kafka, 1, tmp_path / "state"):
        wait_for_count(kafka, sink, sum(expected.values()), timeout=90)
        wait_for_count(kafka, dlq, len(bad), timeout=30)
    assert_same(output_of(kafka, sink), expected)
    dead = kafka.read_all(dlq)
    assert sorted(orjson.loads(m.value or b"")["seq"] for m in dead) == sorted(bad)
    for m in dead:
        headers = dict(m.headers)
        seq = orjson.loads(m.value or b"")["seq"]
        assert headers["weir.reason"] == b"function_error"
        detail = headers["weir.detail"].decode()
        assert detail == f"user_functions:normalise_unless_marked: ValueError: marked record {seq}", detail
        assert headers["weir.source.topic"] == source.encode()


def test_a_raising_map_with_on_error_fail_stops_weir_run_with_exit_code_6_and_the_cause(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    events = dedup_events(5, 300, bad={120})
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    kafka.produce(source, as_records(events))
    step = {"map": {"function": "user_functions:normalise_unless_marked", "onError": "fail"}}
    job = dedup_job(tmp_path, f"dfail-{source[-6:]}", kafka, source, sink, dlq, map=step)
    run = subprocess.run(
        [
            sys.executable, "-m", "weir", "run", str(job), "--state-dir", str(tmp_path / "s"),
            "--http-port", "0", "--connect-timeout", "30",
        ],
        capture_output=True, text=True, timeout=90, env={**os.environ, **subprocess_env()}, check=False,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 6, log
    cause = [line for line in log.splitlines() if "ValueError: marked record 120" in line]
    assert cause and "user_functions:normalise_unless_marked" in cause[0] and "onError: fail" in cause[0], log
    assert kafka.read_all(dlq) == []


# --- 5. a custom aggregate ----------------------------------------------------------------------


def test_a_custom_percentile_aggregate_in_a_tumbling_window_gives_the_reference_values(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    window, (size, _, _) = WINDOWS["tumbling"]
    events = random_events(
        6, 3000, partitions=2, keys=12, start_ms=START_MS, mean_step_ms=40,
        max_out_of_orderness_ms=OOO_MS, too_late_fraction=0.0,
    )  # fmt: skip
    count = [("n", "count", None)]
    windows, late = reference_windows(events, "tumbling", size, None, None, LATENESS_MS, OOO_MS, count)
    assert not late
    prices: dict[tuple[str, int], list[float]] = {}
    for _p, key, ts, record in events:
        prices.setdefault((key, ts - ts % size), []).append(record["price"])
    expected = {k: (len(v), user_functions.Percentile().result(v)) for k, v in prices.items()}
    assert set(expected) == {(k, s) for k, s, _e in windows}
    source, sink, dlq = kafka.create_topic(partitions=2), kafka.create_topic(), kafka.create_topic()
    produce_events(kafka, source, events)
    p50 = {"fn": "custom", "function": "user_functions:Percentile", "field": "price"}
    outputs = {"n": {"fn": "count"}, "p50": p50}
    steps = [
        {"window": {**window, "allowedLateness": f"{LATENESS_MS}ms"}},
        {"aggregate": {"emit": "final", "outputs": outputs}},
    ]
    job = manifest(tmp_path, f"pct-{source[-6:]}", kafka, source, sink, dlq, window, steps=steps)
    with Running(job, kafka, 1, tmp_path / "state") as running:
        running.wait_caught_up({source: kafka.end_offsets(source)})
    got: dict[tuple[str, int], tuple[int, float]] = {}
    for m in kafka.read_all(sink):
        r = orjson.loads(m.value or b"")
        k = (r["key"], r["windowStartMs"])
        assert k not in got, f"window {k} emitted twice"
        got[k] = (r["n"], r["p50"])
    assert got == expected
    assert kafka.read_all(dlq) == []


# --- 6. a map before a natively folded window ---------------------------------------------------

NATIVE_OUTPUTS = {name: OUTPUTS[name] for name in ("n", "total", "lo", "hi", "mean")}


@pytest.mark.parametrize(
    "key_by",
    [{"messageKey": True}, {"field": "k", "partitions": 3}],
    ids=["window-segment", "repartitioned"],
)
def test_a_map_before_a_natively_folded_window_killed_at_random_gives_the_reference_windows(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path, key_by: dict[str, Any]
) -> None:
    """The map runs per record in Python; the windows after it fold in the native extension:
    ``Windows.accept`` after the map, or (keyed by a field) stage 2 reading the repartition
    topic. 2 exactly-once workers SIGKILLed 6 times (state wiped now and then) write every
    window of the mapped records once, with the reference's values."""
    rng = random.Random(20261205)
    events = events_for(20261205, 30_000)
    mapped = [(p, key, ts, user_functions.triple_price(r)) for p, key, ts, r in events]
    window, (size, _, _) = WINDOWS["tumbling"]
    specs = [(name, o["fn"], o.get("field")) for name, o in NATIVE_OUTPUTS.items()]
    expected, late = reference_windows(mapped, "tumbling", size, None, None, LATENESS_MS, OOO_MS, specs)
    assert not late
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    steps = [
        {"map": {"function": "user_functions:triple_price"}},
        {"keyBy": key_by},
        {"window": {**window, "allowedLateness": f"{LATENESS_MS}ms"}},
        {"aggregate": {"emit": "final", "outputs": NATIVE_OUTPUTS}},
    ]
    name = f"natfn-{source[-6:]}"
    job = manifest(tmp_path, name, kafka, source, sink, dlq, window, steps=steps)
    procs = WorkerProcs(job, 2, tmp_path, subprocess_env(s3.env()), f"s3://{s3.new_bucket()}/checkpoints")
    for i in range(2):
        procs.start(i)
    group = f"weir-test-{name}"
    try:
        with Trickle(kafka, source, events, seconds=15):
            procs.kill_schedule(
                rng, 6, (0.5, 2.0), lambda: any(o > 0 for o in kafka.committed(group, source).values())
            )
        wait_for_count(kafka, sink, len(expected), timeout=90, check=procs.check)
    finally:
        codes = procs.stop_all()
    got: dict[tuple[str, int, int], dict[str, Any]] = {}
    for m in kafka.read_all(sink, timeout=30):
        r = orjson.loads(m.value or b"")
        k = (r["key"], r["windowStartMs"], r["windowEndMs"])
        assert k not in got, f"window {k} emitted twice"
        got[k] = {n: r[n] for n in NATIVE_OUTPUTS}
    assert set(got) == set(expected)
    for k, want in expected.items():
        assert got[k]["mean"] == pytest.approx(want["mean"]), k
        got[k]["mean"] = want["mean"]
        assert got[k] == want, k
    assert kafka.read_all(dlq) == []
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "the Python path runs this pipeline" not in logs, "the window segment must run natively"


# --- 7. a stateless pipeline --------------------------------------------------------------------


def test_a_stateless_map_pipeline_killed_twice_writes_exactly_one_output_per_input(
    kafka: KafkaHelper, s3: S3Helper, tmp_path: Path
) -> None:
    events = dedup_events(7, 4000)
    expected = multiset((key, user_functions.normalise(r)) for key, r in
                        ((r["k"], r) for r in source_records(events)))  # fmt: skip
    source, sink, dlq = kafka.create_topic(partitions=4), kafka.create_topic(), kafka.create_topic()
    job = manifest(tmp_path, f"map-{source[-6:]}", kafka, source, sink, dlq, {}, steps=[NORMALISE])
    url = f"s3://{s3.new_bucket()}/checkpoints"
    procs = WorkerProcs(job, 2, tmp_path, subprocess_env(s3.env()), url)
    for i in range(2):
        procs.start(i)
    try:
        with Trickle(kafka, source, events, seconds=10):
            for victim in (0, 1):
                time.sleep(3)
                procs.check()
                procs.kill(victim)
                procs.start(victim)
        wait_for_count(kafka, sink, len(events), timeout=90, check=procs.check)
    finally:
        codes = procs.stop_all()
    assert_same(output_of(kafka, sink), expected)
    assert codes == [0, 0], [procs.log_tail(i) for i in range(2)]
    assert kafka.read_all(dlq) == []
