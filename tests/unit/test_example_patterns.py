"""The anomalies and alerts examples: their manifests run in process (the real worker loop on the
in-memory broker and store, as in ``test_commit_recovery``) on a slice of their generators and
give exactly their references — in generator order, in event-time order, shuffled within the
watermark's bound, and through abort schedules with restores — plus the references' edge cases.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from weir.examples import Example, Record, alerts, anomalies
from weir.functions import FunctionError
from weir.graph import JobGraph, compile_job
from weir.process import NO_WATERMARK, ProcessFunction, ProcessOperator
from weir.process_store import ProcessStore
from weir.spec import load_job
from weir.testing.broker import STEPS, MemoryBroker, run_through

T0 = 1_704_067_200_000
MINUTE = 60_000
PARTITIONS = 2
OOO = 5_000  # both manifests' maxOutOfOrderness
END = "~end"

# A slice covers anomalies' warm-up and spike (at +30 min) and a few dozen payment bursts.
SLICES = {"anomalies": (1_000, 2_400), "alerts": (1_000, 2_400)}


def sentinel(name: str, ts: int) -> dict[str, Any]:
    """A record that passes the example's filters, moves the watermark to ``ts`` and writes
    nothing itself (a product in warm-up, a successful payment)."""
    if name == "anomalies":
        return {"type": "purchase", "product_id": END, "user_id": END, "price": 1, "ts": ts}
    return {"payment_id": END, "user_id": END, "status": "ok", "amount": 1, "ts": ts}


def data(example: Example, seed: int) -> list[Record]:
    step, count = SLICES[example.name]
    return list(itertools.islice(example.generate(seed, T0, step), count))


def event_time(records: Sequence[Record]) -> list[int]:
    """Each record's event time; a malformed record takes the one before it."""
    out, last = [], T0
    for r in records:
        last = r.value["ts"] if r.value is not None else last
        out.append(last)
    return out


def reordered(records: Sequence[Record], bound: int, seed: int) -> list[Record]:
    """``records`` in event-time order, each then moved back by less than ``bound`` (sorted by
    event time + a random delay below ``bound``): no record ends up ``bound`` or more behind
    one before it, so none is late for a watermark with that maxOutOfOrderness."""
    rng = random.Random(seed)
    times = event_time(records)
    delays = [rng.randrange(bound) if bound else 0 for _ in records]
    order = sorted(range(len(records)), key=lambda i: (times[i] + delays[i], i))
    return [records[i] for i in order]


def max_disorder(records: Sequence[Record]) -> int:
    newest, worst = T0, 0
    for ts in event_time(records):
        worst, newest = max(worst, newest - ts), max(newest, ts)
    return worst


# --------------------------------------------------------------------------- running the job


def graph_of(example: Example) -> JobGraph:
    return compile_job(load_job(example.manifest_path()), wall_ms=lambda: T0 + 86_400_000)


def broker_with(example: Example, graph: JobGraph, records: Sequence[Record]) -> MemoryBroker:
    broker = MemoryBroker()
    for topic in graph.source_topics:
        broker.create(topic, PARTITIONS)
    broker.create(graph.sink_topic, PARTITIONS)
    for r in records:
        value = r.raw if r.raw is not None else orjson.dumps(r.value)
        key = None if r.key is None else r.key.encode()
        broker.append(r.topic, value, key, -1 if r.partition is None else r.partition)
    end = max(event_time(records)) + 3_600_000
    for topic in graph.source_topics:
        for p in range(PARTITIONS):  # every partition's watermark passes every timer
            broker.append(topic, orjson.dumps(sentinel(example.name, end)), END.encode(), p)
    return broker


def run(
    graph: JobGraph,
    broker: MemoryBroker,
    root: Path,
    schedule: Sequence[tuple[str, int]],
    seed: int,
    wipe: float = 0.5,
) -> int:
    """Run the job to the end of its input through every abort of ``schedule`` (a savepoint
    asked now and then; the local state wiped after an abort with probability ``wipe``);
    returns the number of restarts."""
    return run_through(
        graph, broker, root, schedule, seed, savepoint_every=700, wipe=wipe, batch=(100, 400), max_restarts=30
    )


def canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def sink(graph: JobGraph, broker: MemoryBroker, key_field: str) -> Counter[bytes]:
    """The sink's records (canonical JSON), after checking each is keyed by ``key_field``."""
    out: Counter[bytes] = Counter()
    for m in broker.records(graph.sink_topic):
        record = orjson.loads(m.value() or b"")
        assert m.key() == record[key_field].encode()
        out[canonical(record)] += 1
    return out


def dead_letters(graph: JobGraph, broker: MemoryBroker) -> Counter[bytes | None]:
    assert graph.dead_letter_topic is not None
    return Counter(m.headers().get("weir.reason") for m in broker.records(graph.dead_letter_topic))


EXAMPLES = {"anomalies": (anomalies.EXAMPLE, "product_id"), "alerts": (alerts.EXAMPLE, "user_id")}
GRAPHS = {name: graph_of(example) for name, (example, _key) in EXAMPLES.items()}


def expected(example: Example, records: Sequence[Record]) -> Counter[bytes]:
    return Counter(canonical(r) for r in example.reference(records))


@pytest.fixture(scope="module")
def crash_free(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], MemoryBroker]:
    """The broker after a crash-free run of example ``name`` on input seed ``seed`` (generator
    order), run once per module on first use."""
    done: dict[tuple[str, int], MemoryBroker] = {}

    def get(name: str, seed: int) -> MemoryBroker:
        if (name, seed) not in done:
            example, _key = EXAMPLES[name]
            broker = broker_with(example, GRAPHS[name], data(example, seed))
            assert run(GRAPHS[name], broker, tmp_path_factory.mktemp(f"{name}{seed}"), [], seed) == 0
            done[(name, seed)] = broker
        return done[(name, seed)]

    return get


# --------------------------------------------------------------------------- the job = the reference


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_manifest_run_in_process_writes_exactly_the_references_records(
    name: str, crash_free: Callable[[str, int], MemoryBroker]
) -> None:
    example, key_field = EXAMPLES[name]
    for seed in range(2):
        want = expected(example, data(example, seed))
        assert sink(GRAPHS[name], crash_free(name, seed), key_field) == want
        assert sum(want.values()) >= 3  # the slice does make alerts


def test_the_slices_hold_the_injected_spike_and_bursts_that_alert() -> None:
    spike_start = T0 + anomalies.SPIKE_AFTER_MS
    spike_ends = range(spike_start + MINUTE, spike_start + anomalies.SPIKE_FOR_MS + 5 * MINUTE + 1)
    for seed in range(2):
        got = anomalies.reference(data(anomalies.EXAMPLE, seed))
        assert any(r["product_id"] == anomalies.SPIKE_PRODUCT and r["windowEndMs"] in spike_ends for r in got)
        assert all(
            r["failures"] == 3 and r["spanMs"] < MINUTE for r in alerts.reference(data(alerts.EXAMPLE, seed))
        )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_malformed_record_is_dead_lettered_and_no_record_is_late(
    name: str, crash_free: Callable[[str, int], MemoryBroker]
) -> None:
    example, _key = EXAMPLES[name]
    raw = sum(1 for r in data(example, 0) if r.raw is not None)
    assert raw > 0
    assert dead_letters(GRAPHS[name], crash_free(name, 0)) == Counter({b"decode_error": raw})


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("order", ["event-time", "shuffled-1", "shuffled-2"])
def test_records_out_of_order_within_max_out_of_orderness_give_the_same_output_as_in_order(
    name: str, order: str, crash_free: Callable[[str, int], MemoryBroker], tmp_path: Path
) -> None:
    example, key_field = EXAMPLES[name]
    if order == "event-time":
        moved = reordered(data(example, 1), 0, 0)
        assert max_disorder(moved) == 0
    else:
        moved = reordered(data(example, 1), OOO, int(order[-1]))
        assert OOO // 2 < max_disorder(moved) < OOO
    broker = broker_with(example, GRAPHS[name], moved)
    run(GRAPHS[name], broker, tmp_path, [], 1)
    assert sink(GRAPHS[name], broker, key_field) == sink(GRAPHS[name], crash_free(name, 1), key_field)


SCHEDULES = [
    [("after-commit", 4), ("restore", 1)],  # restoring from the store: the local state is wiped
    [("mid-upload", 3), ("after-upload", 2)],
    [("before-commit", 4), ("records", 2)],
    [("mid-savepoint", 1), ("after-snapshot", 3)],
]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("schedule", range(len(SCHEDULES)))
def test_aborts_and_restores_commit_the_same_alerts_exactly_once(
    name: str, schedule: int, crash_free: Callable[[str, int], MemoryBroker], tmp_path: Path
) -> None:
    example, key_field = EXAMPLES[name]
    broker = broker_with(example, GRAPHS[name], data(example, schedule % 2))
    wipe = 1.0 if schedule == 0 else 0.5
    restarts = run(GRAPHS[name], broker, tmp_path, SCHEDULES[schedule], 100 + schedule, wipe)
    assert restarts == len(SCHEDULES[schedule]), "an abort did not happen"
    assert sink(GRAPHS[name], broker, key_field) == sink(
        GRAPHS[name], crash_free(name, schedule % 2), key_field
    )


def test_the_abort_schedules_cover_every_step_of_the_commit_protocol() -> None:
    assert {step for schedule in SCHEDULES for step, _n in schedule} == set(STEPS)


# --------------------------------------------------------------------------- edge cases
#
# Each case runs the reference and the function itself (through ``ProcessOperator``, the
# watermark following the records as the core's does), and both must give the stated alerts.


def drive(
    function: type[ProcessFunction], events: Sequence[tuple[str, int, dict[str, Any]]], path: Path
) -> list[Any]:
    """``function``'s outputs for ``(key, event time, record)`` in arrival order, the watermark
    ``OOO`` behind the newest event time, then moved past everything; a dead-lettered record
    gives its ``FunctionError``."""
    store = ProcessStore(path)
    try:
        op = ProcessOperator(function, function.__qualname__, "deadLetter", store)
        out: list[Any] = []
        wm = NO_WATERMARK
        for key, ts, record in events:
            try:
                op.process(key, ts, record, wm)
            except FunctionError as exc:
                out.append(exc)
            out.extend(o.record for o in op.take())
            wm = max(wm, ts - OOO)
        out.extend(o.record for o in op.advance(wm + 10 * 3_600_000, 1 << 30))
        return out
    finally:
        store.close()


def payments(*events: tuple[float, str]) -> list[Record]:
    """User ``u``'s payments ``(seconds after T0, "ok" or "failed")``, ids in that order."""
    return [
        Record(
            alerts.TOPIC,
            "u",
            {
                "payment_id": f"pay-{i}",
                "user_id": "u",
                "status": status,
                "amount": 10.0 + i,
                "ts": T0 + round(seconds * 1000),
            },
        )
        for i, (seconds, status) in enumerate(events)
    ]


def alert_ids(records: Sequence[Record], path: Path) -> list[list[str]]:
    """The payment ids of each alert, from the reference, after checking the function agrees."""
    want = alerts.reference(records)
    events = [(r.key or "", r.value["ts"], r.value) for r in records if r.value is not None]
    assert drive(alerts.FailedPayments, events, path) == want
    return [r["paymentIds"] for r in want]


F, OK = "failed", "ok"


@pytest.mark.parametrize(
    ("events", "want"),
    [
        ([(0, F), (30, F), (59.999, F)], [["pay-0", "pay-1", "pay-2"]]),
        ([(0, F), (30, F), (60, F)], []),  # exactly a minute apart: not within a minute
        ([(0, F), (30, F), (61, F)], []),
        ([(0, F), (50, F), (70, F), (80, F)], [["pay-1", "pay-2", "pay-3"]]),  # the run slides
        ([(0, F), (10, F), (15, OK), (20, F), (30, F)], []),  # a success ends the run
        ([(0, F), (10, F), (15, OK), (20, F), (30, F), (40, F)], [["pay-3", "pay-4", "pay-5"]]),
        ([(0, F), (1, F), (2, F), (3, F)], [["pay-0", "pay-1", "pay-2"]]),  # the 4th starts a new run
        (
            [(0, F), (1, F), (2, F), (3, F), (4, F), (5, F)],
            [["pay-0", "pay-1", "pay-2"], ["pay-3", "pay-4", "pay-5"]],
        ),
        ([(0, F), (1, F), (2, F), (2, OK)], [["pay-0", "pay-1", "pay-2"]]),  # same millisecond: by payment id
        ([(0, F), (1, F), (2, OK), (2, F)], []),  # pay-2 clears the run before pay-3 fails
    ],
)
def test_the_failed_payment_rule(
    events: list[tuple[float, str]], want: list[list[str]], tmp_path: Path
) -> None:
    assert alert_ids(payments(*events), tmp_path) == want


def test_an_alert_comes_whatever_order_the_payments_arrive_in_within_the_bound(tmp_path: Path) -> None:
    records = payments((0, F), (1, F), (2, F), (3, OK), (4, F))
    for i, order in enumerate(itertools.permutations(records)):
        assert alert_ids(order, tmp_path / str(i)) == [["pay-0", "pay-1", "pay-2"]]


def test_a_users_run_leaves_no_state_once_it_expires(tmp_path: Path) -> None:
    store = ProcessStore(tmp_path)
    try:
        op = ProcessOperator(alerts.FailedPayments, "FailedPayments", "deadLetter", store)
        op.process("u", T0, {"payment_id": "p", "status": F, "amount": 1.0}, NO_WATERMARK)
        op.advance(T0, 100)
        assert op.open_windows == 1 and op.timer_entries == 1  # the run, and its expiry
        op.advance(T0 + alerts.WITHIN_MS, 100)
        assert op.open_windows == 0 and op.timer_entries == 0
    finally:
        store.close()


def purchases(
    product: str, minutes: Sequence[int], extra: int | None = None, price: float = 10.0
) -> list[Record]:
    """``product``'s purchases, one in each of ``minutes`` (after T0) and ten in minute ``extra``."""
    return [
        Record(
            anomalies.TOPIC,
            "u",
            {
                "type": "purchase",
                "product_id": product,
                "user_id": "u",
                "price": price,
                "ts": T0 + m * MINUTE + 1_000 * i,
            },
        )
        for m in minutes
        for i in range(10 if m == extra else 1)
    ]


def anomaly_ends(records: Sequence[Record], path: Path) -> list[int]:
    """The window ends (minutes after T0) of the reference's alerts, after checking the function agrees."""
    want = anomalies.reference(records)
    events = sorted(
        (
            (
                r.value["product_id"],
                r.value["ts"],
                {"product_id": r.value["product_id"], "price": r.value["price"]},
            )
            for r in records
            if r.value is not None
        ),
        key=lambda e: e[1],
    )
    assert drive(anomalies.RevenueAnomalies, events, path) == want
    return [(r["windowEndMs"] - T0) // MINUTE for r in want]


def test_a_spike_after_the_warm_up_alerts_from_the_first_window_holding_it(tmp_path: Path) -> None:
    # Later windows holding the spike alert only while they stay above the history, which the
    # spike's first window has already raised.
    ends = anomaly_ends(purchases("p", range(40), extra=20), tmp_path)
    assert ends and ends[0] == 21 and all(21 <= end <= 25 for end in ends)


def test_a_spike_during_the_warm_up_builds_history_and_does_not_alert(tmp_path: Path) -> None:
    assert anomalies.RevenueAnomalies.WARMUP == 10
    assert anomaly_ends(purchases("p", range(40), extra=4), tmp_path) == []  # windows 5..9: warm-up


def test_revenue_equal_to_mean_plus_k_deviations_does_not_alert(tmp_path: Path) -> None:
    # One purchase every five minutes: every window holds exactly one, so the history has no
    # deviation and each window's revenue equals the threshold.
    assert anomaly_ends(purchases("p", range(0, 100, 5)), tmp_path) == []
    assert anomaly_ends(purchases("p", range(0, 100, 5), extra=60), tmp_path / "spike")[0] == 61


def test_a_product_is_judged_against_its_own_history_only(tmp_path: Path) -> None:
    records = purchases("big", range(40), price=100.0) + purchases("small", range(40), extra=25)
    ends = anomaly_ends(records, tmp_path)
    assert {r["product_id"] for r in anomalies.reference(records)} == {"small"}
    assert ends[0] == 26


def test_windows_without_purchases_do_not_count_as_history(tmp_path: Path) -> None:
    # Silent from minute 20 to 39: windows 25..40 do not exist, so the history is the steady
    # windows before the gap, and the spike at minute 50 is judged against it.
    minutes = [*range(20), *range(40, 70)]
    ends = anomaly_ends(purchases("p", minutes, extra=50), tmp_path)
    assert ends and ends[0] == 51


def test_a_purchase_in_a_minute_the_watermark_has_closed_is_dead_lettered_as_late(tmp_path: Path) -> None:
    events = [
        ("p", T0 + 70_000, {"product_id": "p", "price": 1.0}),
        ("p", T0 + 59_000, {"product_id": "p", "price": 1.0}),
    ]
    out = drive(anomalies.RevenueAnomalies, events, tmp_path / "a")
    assert [type(o) for o in out] == [FunctionError]
    assert out[0].reason == "function_error" and "LateRecord" in out[0].detail
    late_payment = [
        ("u", T0 + 10_000, {"payment_id": "a", "status": F, "amount": 1.0}),
        ("u", T0 + 5_000, {"payment_id": "b", "status": F, "amount": 1.0}),
    ]
    out = drive(alerts.FailedPayments, late_payment, tmp_path / "b")
    assert [type(o) for o in out] == [FunctionError] and "LateRecord" in out[0].detail


def test_a_payment_without_a_numeric_amount_is_dead_lettered_and_left_out_of_the_run(tmp_path: Path) -> None:
    records = payments((0, F), (1, F), (2, F), (3, F))
    assert records[1].value is not None
    records[1].value["amount"] = "12.50"
    events = [(r.key or "", r.value["ts"], r.value) for r in records if r.value is not None]
    out = drive(alerts.FailedPayments, events, tmp_path)
    assert isinstance(out[0], FunctionError) and "amount must be a number" in out[0].detail
    assert out[1:] == alerts.reference(records)
    assert [r["paymentIds"] for r in out[1:]] == [["pay-0", "pay-2", "pay-3"]]


def test_a_payment_id_repeated_in_one_millisecond_is_ordered_by_status_not_arrival(tmp_path: Path) -> None:
    records = payments((0, F), (1, F), (2, OK), (2, F))
    for r in records[2:]:
        assert r.value is not None
        r.value["payment_id"] = "pay-x"  # the same id, failed and ok: ok (False) sorts first
    assert alert_ids(records, tmp_path / "a") == []
    assert alert_ids([*records[:2], records[3], records[2]], tmp_path / "b") == []
