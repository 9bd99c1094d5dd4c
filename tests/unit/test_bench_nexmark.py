"""The pure parts of the Nexmark-style benchmark (``bench/nexmark.py``): the bid generator is
deterministic and keeps its promises, the end records land where the chained jobs need them, each
query's reference on hand-written bids gives the answer worked out by hand, the custom aggregates
of the weir jobs agree with it, the weir jobs are valid StreamJobs and results parse back."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import nexmark  # noqa: E402
import nexmark_functions as fns  # noqa: E402
from nexmark import Bid  # noqa: E402

from weir.spec import StreamJob  # noqa: E402

T = 1_735_689_600_000  # a multiple of 10 s: window starts below are T + a multiple of 2 s


def test_bids_are_a_pure_function_of_count_and_seed() -> None:
    first = list(nexmark.bids(2_000, seed=7))
    assert first == list(nexmark.bids(2_000, seed=7))
    assert first[:500] == list(nexmark.bids(500, seed=7))
    assert [v for _, v in first] != [v for _, v in nexmark.bids(2_000, seed=8)]


def test_each_bid_value_holds_its_fields_within_the_promised_ranges() -> None:
    for i, (bid, value) in enumerate(nexmark.bids(5_000)):
        record = orjson.loads(value)
        assert set(record) == {"auction", "bidder", "price", "channel", "url", "dateTime", "extra"}
        assert (record["auction"], record["bidder"], record["price"], record["dateTime"]) == tuple(bid)
        nominal = nexmark.BASE_TS + i * 1000 // nexmark.EVENTS_PER_S
        assert nominal - nexmark.DISORDER_MS < bid.ts <= nominal
        assert nexmark.FIRST_ID <= bid.auction < nexmark.FIRST_ID + nexmark.AUCTIONS
        assert nexmark.FIRST_ID <= bid.bidder < nexmark.FIRST_ID + nexmark.BIDDERS
        assert nexmark.horizon(5_000) >= nominal


@pytest.mark.parametrize("partitions", [1, 3, 4, 8])
def test_end_records_cover_every_partition_in_two_rounds_after_the_last_bid(partitions: int) -> None:
    ids = nexmark.end_ids(partitions)
    assert [zlib.crc32(str(i).encode()) % partitions for i in ids] == list(range(partitions))
    assert all(i < 0 for i in ids)
    first, second = nexmark.end_records(1_000, partitions)
    for r, records in ((1, first), (2, second)):
        assert len(records) == partitions * partitions
        for p, key, value in records:
            record = orjson.loads(value)
            assert key == str(ids[p]).encode() and record["auction"] == ids[p]
            assert record["dateTime"] == nexmark.horizon(1_000) + r * nexmark.END_GAP_MS
        assert {orjson.loads(v)["bidder"] for _, _, v in records} == set(ids)


# Hand-made bids: (auction, bidder, price, ts).
Q5_BIDS = [
    Bid(1, 10, 100, T + 1_000),
    Bid(1, 11, 100, T + 3_000),
    Bid(2, 12, 100, T + 3_500),
    Bid(3, 13, 100, T + 9_500),
    Bid(2, 14, 100, T + 11_000),
]


def test_q5_reference_gives_per_sliding_window_the_auctions_with_the_most_bids() -> None:
    # A bid at t is in the five 10 s windows starting at multiples of 2 s in (t - 10 s, t].
    assert nexmark.q5_reference(Q5_BIDS) == {
        T - 8_000: (1, (1,)),  # 1@1000
        T - 6_000: (2, (1,)),  # 1@1000, 1@3000, 2@3500
        T - 4_000: (2, (1,)),
        T - 2_000: (2, (1,)),
        T: (2, (1,)),  # 1 x2, 2 x1, 3 x1
        T + 2_000: (2, (2,)),  # 1@3000, 2@3500, 3@9500, 2@11000
        T + 4_000: (1, (2, 3)),  # 3@9500, 2@11000: a tie, both listed
        T + 6_000: (1, (2, 3)),
        T + 8_000: (1, (2, 3)),
        T + 10_000: (1, (2,)),
    }


def test_q7_reference_gives_the_highest_bid_per_tumbling_window_with_deterministic_ties() -> None:
    bids = [
        Bid(5, 9, 100, T + 1),
        Bid(3, 8, 100, T + 2),  # same price: the lower auction wins
        Bid(7, 1, 50, T + 9_999),
        Bid(2, 4, 70, T + 10_000),
        Bid(2, 3, 70, T + 12_000),  # same price and auction: the lower bidder wins
        Bid(9, 9, 10, T - 1),  # the window before
    ]
    assert nexmark.q7_reference(bids) == {
        T - 10_000: (10, 9, 9, T - 1),
        T: (100, 3, 8, T + 2),
        T + 10_000: (70, 2, 3, T + 12_000),
    }


def test_q11_reference_splits_each_bidders_bids_at_pauses_longer_than_the_gap() -> None:
    bids = [
        Bid(1, 1, 5, T),
        Bid(1, 2, 5, T + 7_000),
        Bid(1, 2, 5, T + 5_000),  # out of order: still the same session
        Bid(1, 1, 5, T + 10_000),  # exactly the gap after: joins
        Bid(1, 1, 5, T + 20_001),  # 10,001 ms after: a new session
    ]
    assert nexmark.q11_reference(bids) == {
        (1, T): (T + 20_000, 2),
        (1, T + 20_001): (T + 30_001, 1),
        (2, T + 5_000): (T + 17_000, 2),
    }


def _fold(fn: Any, values: list[Any]) -> Any:
    acc = fn.create()
    for v in values:
        acc = fn.add(acc, v)
    return fn.result(acc)


def test_the_weir_jobs_custom_aggregates_agree_with_the_references() -> None:
    bids = [Bid(5, 9, 100, T + 1), Bid(3, 8, 100, T + 2), Bid(7, 1, 50, T + 3)]
    records = [{"auction": b.auction, "bidder": b.bidder, "price": b.price, "dateTime": b.ts} for b in bids]
    best = _fold(fns.HighestBid(), records)
    assert tuple(best) == nexmark.q7_reference(bids)[T]
    assert _fold(fns.HighestOf(), [[50, 7, 1, T + 3], best]) == best
    halves = fns.HighestBid().merge(
        _fold(fns.HighestBid(), records[:1]), _fold(fns.HighestBid(), records[1:])
    )
    assert halves == best

    stage1 = [{"key": "1", "count": 2}, {"key": "3", "count": 1}, {"key": "2", "count": 2}]
    assert _fold(fns.HotItems(), stage1) == {"count": 2, "auctions": [1, 2]}
    hot = fns.HotItems()
    merged = hot.merge(hot.add(hot.create(), stage1[0]), hot.add(hot.add(hot.create(), stage1[1]), stage1[2]))
    assert hot.result(merged) == {"count": 2, "auctions": [1, 2]}


@pytest.mark.parametrize("query", sorted(nexmark.QUERIES))
def test_the_weir_jobs_are_valid_stream_jobs(query: str) -> None:
    jobs = nexmark.weir_jobs(query, "bids", "between", "out", "127.0.0.1:9092", "t1")
    assert len(jobs) == (1 if query == "q11" else 2)
    for job in jobs:
        StreamJob.model_validate(job)
    if len(jobs) == 2:
        assert jobs[0]["spec"]["pipeline"]["sink"]["topic"] == "between"
        assert jobs[1]["spec"]["pipeline"]["source"]["topics"] == ["between"]


def test_results_parse_back_and_the_end_records_windows_are_skipped() -> None:
    last = T + 50_000
    q5 = {
        "key": str(T),
        "windowStartMs": T,
        "windowEndMs": T + 2_000,
        "hot": {"count": 3, "auctions": [7, 9]},
    }
    assert nexmark.parse_result("q5", q5, last) == (T, (3, (7, 9)))
    q7 = {"key": str(T), "windowStartMs": T, "windowEndMs": T + 10_000, "best": [100, 3, 8, T + 2]}
    assert nexmark.parse_result("q7", q7, last) == (T, (100, 3, 8, T + 2))
    q11 = {"key": "2", "windowStartMs": T + 5_000, "windowEndMs": T + 17_000, "count": 2}
    assert nexmark.parse_result("q11", q11, last) == ((2, T + 5_000), (T + 17_000, 2))
    assert nexmark.parse_result("q5", {**q5, "key": str(last + 2_000)}, last) is None
    assert nexmark.parse_result("q11", {**q11, "key": "-3"}, last) is None
