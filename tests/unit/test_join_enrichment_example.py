"""The enrichment example's pieces without a broker: its reference looks tables up as of event
time, its generator puts every table change ahead of the purchases it applies to, and its
manifest's two jobs load and chain. (Its run against the broker: tests/integration/test_enrichment.py.)"""

from __future__ import annotations

import itertools

import orjson
import yaml

from weir.examples import Record, example
from weir.examples import enrichment as ex
from weir.graph import compile_job
from weir.spec import load_job

T0 = 1_704_067_200_000


def catalog(key: str, at: int, price: int | None) -> Record:
    value = None if price is None else {"category": "games", "price": price, "margin": price // 10}
    return ex.Record(ex.CATALOG, key, value, timestamp=T0 + at)


def segment(user: str, at: int, name: str | None) -> Record:
    return ex.Record(ex.SEGMENTS, user, None if name is None else {"segment": name}, timestamp=T0 + at)


def purchase(order: str, user: str, product: str, at: int, quantity: int = 1) -> Record:
    value = {"order": order, "user": user, "product": product, "quantity": quantity, "ts": T0 + at}
    return Record(ex.PURCHASES, user, value)


def test_the_reference_joins_each_purchase_with_the_tables_as_of_its_event_time_not_its_arrival() -> None:
    records = [
        catalog("p", 0, 100),
        segment("u", 0, "new"),
        purchase("late-for-the-change", "u", "p", 2_000),  # produced before the change, after it in time
        catalog("p", 1_500, 50),
        purchase("before-the-change", "u", "p", 1_000, quantity=2),  # produced after it, before it in time
        segment("u", 3_000, None),  # tombstone: from 3000 the user has no segment
        purchase("deleted-segment", "u", "p", 3_000),
        purchase("unlisted", "u", "nope", 3_000),  # inner join: no result
    ]
    out = ex.reference(records)
    assert [(r["key"], r["revenue"], r["margin"], r["orders"]) for r in out] == [
        ("games|new", 50 + 2 * 100, 5 + 2 * 10, 2),
        ("games|unsegmented", 50, 5, 1),
    ]
    assert out[0]["windowStart"] == "2024-01-01T00:00:00.000Z" and out[0]["windowEndMs"] == T0 + 60_000


def test_the_generator_produces_every_table_change_ahead_of_the_purchases_it_applies_to() -> None:
    step = 2_000  # 1300 records: 43 minutes, every change
    records = list(itertools.islice(ex.generate(3, T0, step), 1_300))
    assert records == list(itertools.islice(ex.generate(3, T0, step), 1_300)), "deterministic per seed"
    tables = [i for i, r in enumerate(records) if r.topic != ex.PURCHASES]
    first = len(ex.PRODUCTS) + ex.USERS
    assert tables[:first] == list(range(first)), "the tables come before the first purchase"
    assert {r.topic for r in records[first:]} >= {ex.PURCHASES, ex.CATALOG, ex.SEGMENTS}
    for i in tables:
        r = records[i]
        assert r.timestamp is not None and r.key is not None
        produced_before = [p.value["ts"] for p in records[:i] if p.topic == ex.PURCHASES and p.value]
        assert all(ts < r.timestamp for ts in produced_before), f"{r} comes after a purchase it applies to"
    assert sum(1 for r in records if r.topic != ex.PURCHASES and r.value is None) == 1, "one tombstone"
    times = [r.value["ts"] for r in records if r.topic == ex.PURCHASES and r.value]
    assert max(max(times[:i], default=0) - t for i, t in enumerate(times)) <= 3 * step


def test_the_price_change_and_the_segment_changes_show_in_the_reference() -> None:
    records = list(itertools.islice(ex.generate(5, T0, 2_000), 1_300))
    opening = [r for r in records if r.topic == ex.PURCHASES or r.timestamp == T0 - 60_000]
    changed, unchanged = ex.reference(records), ex.reference(opening)

    def total(out: list[dict[str, object]], field: str, where: str) -> int:
        return sum(int(r[field]) for r in out if where in str(r["key"]))  # type: ignore[call-overload]

    assert total(changed, "revenue", "games|") < total(unchanged, "revenue", "games|"), (
        "the sale lowers games revenue"
    )
    assert total(changed, "orders", "|vip") > total(unchanged, "orders", "|vip"), "four users become vip"
    assert total(changed, "orders", "|unsegmented") > 0 == total(unchanged, "orders", "|unsegmented")
    assert total(changed, "orders", "") == total(unchanged, "orders", ""), (
        "every purchase counts once either way"
    )


def test_the_manifest_chains_a_join_job_into_a_per_category_and_segment_window_job() -> None:
    e = example("enrichment")
    docs = list(yaml.safe_load_all(e.manifest_path().read_text()))
    join, revenue = (compile_job(load_job(orjson.dumps(d).decode())) for d in docs)
    assert join.table_topics == e.table_topics == (ex.CATALOG, ex.SEGMENTS)
    assert join.sink_topic == ex.ENRICHED and revenue.source_topics == (ex.ENRICHED,)
    assert revenue.sink_topic == ex.SINK and revenue.window is not None and revenue.window.size_ms == 60_000
    enriched = {
        "order": "o-1",
        "user": "u",
        "product": "p-3",
        "quantity": 3,
        "ts": T0,
        "category": "games",
        "price": 3_999,
        "margin": 200,
        "segment": None,
    }
    assert ex.by_category_and_segment(enriched) == {
        "group": "games|unsegmented",
        "revenue": 11_997,
        "margin": 600,
        "ts": T0,
    }
    shown = e.show(
        ex.reference([catalog("p", 0, 1_999), segment("u", 0, "vip"), purchase("o", "u", "p", 61_000)])[0]
    )
    assert shown.split() == ["00:01", "games", "vip", "1", "19.99", "1.99"] and len(e.header) == len(shown)
