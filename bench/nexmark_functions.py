"""The custom aggregates of the Nexmark-style weir jobs (``bench/nexmark.py``), as a user writes them.

Each class follows ``weir.AggregateFunction`` (create, add, merge, result; accumulators are JSON
values). The worker imports them by reference (``nexmark_functions:HighestBid``) with ``bench/``
on its ``PYTHONPATH``. ``bench/nexmark.py`` computes its reference answers with the same
ordering rules (``bid_rank``), written independently of these classes.
"""

from __future__ import annotations

from typing import Any


def bid_rank(bid: list[Any]) -> tuple[int, int, int, int]:
    """How bids ``[price, auction, bidder, dateTime]`` compare: the highest price wins; on a tie
    the lowest auction, then the lowest bidder, then the earliest dateTime (deterministic
    whatever order the bids arrive in)."""
    price, auction, bidder, ts = bid
    return (int(price), -int(auction), -int(bidder), -int(ts))


def _higher(a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if bid_rank(a) >= bid_rank(b) else b


class HighestBid:
    """q7 stage 1: the highest bid of a window, fed whole bid records:
    ``[price, auction, bidder, dateTime]``."""

    def create(self) -> list[Any] | None:
        return None

    def add(self, acc: list[Any] | None, bid: dict[str, Any]) -> list[Any] | None:
        return _higher(acc, [bid["price"], bid["auction"], bid["bidder"], bid["dateTime"]])

    def merge(self, a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
        return _higher(a, b)

    def result(self, acc: list[Any] | None) -> list[Any] | None:
        return acc


class HighestOf(HighestBid):
    """q7 stage 2: the highest of the per-auction highest bids (field ``best``, already a list)."""

    def add(self, acc: list[Any] | None, best: list[Any]) -> list[Any] | None:
        return _higher(acc, best)


class HotItems:
    """q5 stage 2: fed stage 1's results (``{"key": auction, "count": n, ...}``) of one sliding
    window, keeps the largest count and every auction with it: ``{"count": n, "auctions": [...]}``
    (auctions as integers, ascending)."""

    def create(self) -> list[Any]:
        return [0, []]

    def add(self, acc: list[Any], result: dict[str, Any]) -> list[Any]:
        count, auction = int(result["count"]), int(result["key"])
        if count > acc[0]:
            return [count, [auction]]
        if count == acc[0]:
            acc[1].append(auction)
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        if a[0] != b[0]:
            return a if a[0] > b[0] else b
        return [a[0], a[1] + b[1]]

    def result(self, acc: list[Any]) -> dict[str, Any]:
        return {"count": acc[0], "auctions": sorted(acc[1])}
