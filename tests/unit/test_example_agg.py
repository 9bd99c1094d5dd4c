"""The funnel, active-users and sessions examples in process: each shipped manifest, run by the
real worker loop on the in-memory broker over a slice of its generator, writes exactly what its
plain-Python reference computes; and the cases the generator makes rarely, written by hand: a
minute with views but no purchases, records out of order within the bound, sessions that touch
or are joined by an out-of-order event, a record later than the bound."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from weir.examples import Example, Record, active_users, clickstream, funnel, sessions
from weir.graph import compile_job
from weir.spec import load_job
from weir.tasks import Consumed
from weir.testing.broker import MemoryBroker, memory_worker

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MIN = 60_000
PARTITIONS = 3
END = "~end"
EXAMPLES = [funnel.EXAMPLE, active_users.EXAMPLE, sessions.EXAMPLE]


def run(
    example: Example, records: list[Record], state: Path, batch_size: int = 97
) -> tuple[list[dict[str, Any]], list[Consumed]]:
    """The example's manifest run to the end of ``records`` (then one record per partition a day
    later, which closes every window and fires every timer before it): the sink's decoded
    values and the dead letters."""
    job = load_job(example.manifest_path().read_text())
    end = max((r.value["ts"] for r in records if r.value is not None), default=T0) + 86_400_000
    graph = compile_job(job, wall_ms=lambda: end)
    broker = MemoryBroker()
    for topic in graph.source_topics:
        broker.create(topic, PARTITIONS)
    broker.create(graph.sink_topic, 1)
    for r in records:
        key = None if r.key is None else r.key.encode()
        value = r.raw if r.raw is not None else None if r.value is None else orjson.dumps(r.value)
        broker.append(r.topic, value, key, -1 if r.partition is None else r.partition)
    for p in range(PARTITIONS):
        user = f"{END}{p}"
        marker = {"type": "page_view", "user_id": user, "shop": clickstream.SHOP, "ts": end}
        broker.append(clickstream.TOPIC, orjson.dumps(marker), user.encode(), p)

    idle = [0]

    def on_consume(n: int) -> None:
        # Stop once nothing came three times running: what stage 1 wrote to the repartition
        # topic becomes readable only when its transaction commits, after an empty read.
        idle[0] = idle[0] + 1 if n == 0 else 0
        if idle[0] == 3:
            worker.stop()

    worker = memory_worker(graph, broker, state, on_consume=on_consume, batch_size=batch_size)
    assert worker.run() == 0
    out = [orjson.loads(m.value() or b"") for m in broker.records(graph.sink_topic)]
    assert graph.dead_letter_topic is not None
    return out, broker.records(graph.dead_letter_topic)


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Equal as multisets of records (floats exactly: job and reference round alike)."""
    return Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in got) == Counter(
        orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in want
    )


def event(kind: str, user: str, ts: int, product: str = "p-1", partition: int | None = None) -> Record:
    value: dict[str, Any] = {"type": kind, "user_id": user, "product_id": product}
    if kind != "page_view":
        value["price"] = clickstream.PRICES[product]
    return Record(clickstream.TOPIC, user, {**value, "shop": clickstream.SHOP, "ts": ts}, partition=partition)


# --------------------------------------------------------------------------- the generated slice

SLICE = list(itertools.islice(clickstream.generate(3, T0, 2_500), 5_200))  # ~3.6 h, ~300 users


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_the_example_job_writes_exactly_its_reference_for_a_slice_of_its_generator(
    example: Example, tmp_path: Path
) -> None:
    got, dead = run(example, SLICE, tmp_path, batch_size=1_000)
    want = example.reference(SLICE)

    assert len(want) > 50
    assert same(got, want)
    raw = [r for r in SLICE if r.raw is not None]
    assert len(raw) == 1 and [m.value() for m in dead] == [raw[0].raw]
    assert [m.headers().get("weir.reason") for m in dead] == [b"decode_error"]
    for record in got:  # the demo can print every line
        assert isinstance(example.show(record), str)


def test_the_generated_slice_has_sessions_that_join_visits_and_users_with_several_sessions() -> None:
    results = sessions.reference(SLICE)
    per_user = Counter(r["key"] for r in results)
    long = [r for r in results if r["duration"] > 30 * MIN]  # longer than any one visit
    assert sum(1 for n in per_user.values() if n > 1) > 20
    assert len(long) > 20
    assert 0.1 < sum(r["converted"] for r in results) / len(results) < 0.9


def test_the_generator_is_deterministic_per_seed_and_about_one_record_per_step() -> None:
    def first(seed: int, step: int) -> list[Record]:
        return list(itertools.islice(clickstream.generate(seed, T0, step), 3_000))

    assert first(1, 1_000) == first(1, 1_000) != first(2, 1_000)
    times = [r.value["ts"] for r in first(1, 1_000) if r.value is not None]
    assert min(times) >= T0
    assert 0.7 < (max(times) - T0) / 3_000 / 1_000 < 1.3
    assert all(t > u - 3_000 for t, u in zip(times[1:], itertools.accumulate(times, max), strict=False))


# --------------------------------------------------------------------------- funnel


def test_a_minute_with_views_but_no_purchase_has_a_purchase_rate_of_zero_and_one_without_views_zero_rates(
    tmp_path: Path,
) -> None:
    records = [
        event("page_view", "u-1", T0 + 1_000),
        event("page_view", "u-2", T0 + 2_000),
        event("page_view", "u-3", T0 + 3_000),
        event("add_to_cart", "u-1", T0 + 4_000),
        event("purchase", "u-1", T0 + MIN + 1_000),  # a minute with a purchase and no view
    ]
    want = funnel.reference(records)
    assert [(r["views"], r["carts"], r["purchases"], r["viewToCart"], r["viewToPurchase"]) for r in want] == [
        (3, 1, 0, 0.3333, 0.0),
        (0, 0, 1, 0.0, 0.0),
    ]
    got, dead = run(funnel.EXAMPLE, records, tmp_path)
    assert same(got, want) and dead == []


def test_funnel_counts_a_record_out_of_order_within_the_bound_in_its_own_minute(tmp_path: Path) -> None:
    records = [
        event("page_view", "u-1", T0 + 10_000),
        event("page_view", "u-2", T0 + MIN + 4_000),  # the watermark is now just before MIN - 1
        event("purchase", "u-1", T0 + MIN - 1),  # 4 s late: still within 5 s
        event("add_to_cart", "u-2", T0 + MIN + 5_000),
    ]
    got, dead = run(funnel.EXAMPLE, records, tmp_path)
    assert dead == []
    assert same(got, funnel.reference(records))
    assert {r["windowStartMs"]: r["purchases"] for r in got} == {T0: 1, T0 + MIN: 0}


# --------------------------------------------------------------------------- active users


def test_active_users_counts_each_user_once_per_minute_and_per_five_minutes_and_goes_on_after_a_pause(
    tmp_path: Path,
) -> None:
    records = [
        event("page_view", "u-1", T0 + 1_000),
        event("add_to_cart", "u-1", T0 + 2_000),  # the same user again: still one
        event("page_view", "u-2", T0 + 30_000),
        event("page_view", "u-3", T0 + 2 * MIN + 1_000),  # minute 1 has no event
        event("page_view", "u-1", T0 + 20 * MIN),  # minutes 7-19 have no line
    ]
    want = active_users.reference(records)
    lines = {(r["windowStartMs"] - T0) // MIN: (r["activeUsers1m"], r["activeUsers5m"]) for r in want}
    assert lines == {
        0: (2, 2), 1: (0, 2), 2: (1, 3), 3: (0, 3), 4: (0, 3), 5: (0, 1), 6: (0, 1),
        20: (1, 1), 21: (0, 1), 22: (0, 1), 23: (0, 1), 24: (0, 1),
    }  # fmt: skip
    got, dead = run(active_users.EXAMPLE, records, tmp_path)
    assert same(got, want) and dead == []


def test_active_users_counts_a_record_out_of_order_within_the_bound_in_its_own_minute(tmp_path: Path) -> None:
    records = [
        event("page_view", "u-1", T0 + 10_000),
        event("page_view", "u-2", T0 + MIN + 4_000),
        event("page_view", "u-3", T0 + MIN - 1),  # 4 s late: within the 5 s bound
    ]
    got, dead = run(active_users.EXAMPLE, records, tmp_path)
    assert dead == []
    assert same(got, active_users.reference(records))
    assert {r["windowStartMs"]: r["activeUsers1m"] for r in got if r["windowStartMs"] < T0 + 2 * MIN} == {
        T0: 2,
        T0 + MIN: 1,
    }


def test_a_record_for_a_minute_already_written_is_dead_lettered_and_changes_no_line(tmp_path: Path) -> None:
    # Behind the keyBy the watermark is the smallest of the source partitions': every one of
    # them moves past minute 0's end (+ 5 s) before the late record comes.
    on_time = [event("page_view", "u-1", T0 + 10_000, partition=0)]
    on_time += [event("page_view", f"u-{p + 2}", T0 + MIN + 10_000, partition=p) for p in range(PARTITIONS)]
    on_time += [event("page_view", "u-1", T0 + MIN + 20_000 + i, partition=0) for i in range(5)]
    late = event("page_view", "u-9", T0 + 50_000, partition=0)
    got, dead = run(active_users.EXAMPLE, [*on_time, late], tmp_path, batch_size=1)
    assert same(got, active_users.reference(on_time))
    # dead-lettered behind the keyBy: the repartition topic's record, [event time, selected fields]
    assert [orjson.loads(m.value() or b"") for m in dead] == [
        [T0 + 50_000, {"user_id": "u-9", "shop": clickstream.SHOP, "ts": T0 + 50_000}]
    ]
    assert dead[0].headers().get("weir.reason") == b"function_error"
    assert b"late for minute 2024-01-01T00:00:00.000Z" in (dead[0].headers().get("weir.detail") or b"")


# --------------------------------------------------------------------------- sessions


def test_the_session_reference_joins_pauses_up_to_the_gap_and_splits_longer_ones() -> None:
    gap = clickstream.GAP_MS
    assert sessions.sessions([0, gap, 2 * gap + 1, 2 * gap + 2]) == [[0, gap], [2 * gap + 1, 2 * gap + 2]]
    assert sessions.sessions([5, 0, 3]) == [[0, 3, 5]]
    assert sessions.sessions([]) == []


def test_two_bursts_twenty_minutes_apart_are_one_session_and_forty_minutes_apart_two(tmp_path: Path) -> None:
    burst = [("page_view", 0), ("add_to_cart", 20_000), ("page_view", 50_000)]
    records = [event(kind, "u-1", T0 + t) for kind, t in burst]
    records += [event(kind, "u-1", T0 + 20 * MIN + t) for kind, t in burst]
    records += [event("purchase", "u-1", T0 + 20 * MIN + 60_000)]
    records += [event(kind, "u-1", T0 + 61 * MIN + t) for kind, t in burst]  # 40 min after the last
    want = sessions.reference(records)
    assert [(r["duration"], r["pages"], r["converted"]) for r in want] == [
        (21 * MIN, 4, True),
        (50_000, 2, False),
    ]
    got, dead = run(sessions.EXAMPLE, records, tmp_path)
    assert same(got, want) and dead == []


def test_an_out_of_order_event_in_the_pause_joins_two_sessions_into_one(tmp_path: Path) -> None:
    gap = clickstream.GAP_MS
    records = [
        event("page_view", "u-1", T0),
        event("page_view", "u-1", T0 + gap + 3_000),  # a new session: 30 min 3 s after the first
        event("purchase", "u-1", T0 + gap),  # 3 s late; exactly the gap after the first: joins both
    ]
    want = sessions.reference(records)
    shown = [(r["windowStartMs"], r["windowEndMs"], r["duration"], r["pages"], r["converted"]) for r in want]
    assert shown == [(T0, T0 + 2 * gap + 3_000, gap + 3_000, 2, True)]
    got, dead = run(sessions.EXAMPLE, records, tmp_path)
    assert same(got, want) and dead == []
    without = sessions.reference(records[:2])
    assert len(without) == 2  # without the late event they stay apart
