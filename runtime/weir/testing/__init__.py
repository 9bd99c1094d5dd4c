"""Test doubles for the runtime's seams and a brute-force windowing reference, shared by tests and users."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from weir.aggregates import Accumulator
from weir.window_shapes import WindowKey

__all__ = [
    "Event",
    "FakeClock",
    "InMemoryWindowStore",
    "random_events",
    "reference_aggregate",
    "reference_windows",
]

Event = tuple[int, str, int, dict[str, Any]]
"""``(partition, key, event time ms, record)``."""


class InMemoryWindowStore:
    """A dict-backed window store (see ``weir.window_operator.WindowStore``).

    By default it holds the very accumulator objects it is given, like a cache. With ``dumps``
    and ``loads`` (an aggregator's codec) it keeps only serialised bytes and hands out a fresh
    copy on every ``get``, like a disk-backed store: an operator that mutates an accumulator
    without ``put``-ting it back loses the change here too, so tests catch it.
    """

    def __init__(
        self,
        dumps: Callable[[Accumulator], bytes] | None = None,
        loads: Callable[[bytes], Accumulator] | None = None,
        evict_every: int | None = None,
    ) -> None:
        if (dumps is None) != (loads is None):
            raise ValueError("give both dumps and loads, or neither")
        self._dumps = dumps
        self._loads = loads
        self._data: dict[WindowKey, Any] = {}
        self.puts = 0
        """How many times ``put`` was called (a cheap observable for tests)."""
        self.evictions = 0
        """Bumped by ``evict`` (and every ``evict_every`` puts): the operator must then find
        windows through ``pop_windows_at``, as after a real store spilled them to disk."""
        self._evict_every = evict_every
        self.spills = 0

    def evict(self) -> None:
        """Pretend every window went to disk (nothing moves: the dict is the "disk")."""
        self.evictions += 1

    def get(self, k: WindowKey, /) -> Accumulator | None:
        value = self._data.get(k)
        if value is None or self._loads is None:
            return value
        return self._loads(value)

    def put(self, k: WindowKey, acc: Accumulator, /) -> None:
        self.puts += 1
        self._data[k] = acc if self._dumps is None else self._dumps(acc)
        if self._evict_every is not None and self.puts % self._evict_every == 0:
            self.evict()

    def spill(self) -> None:
        self.spills += 1

    def pop_windows_at(
        self, start: int, end: int, after: str | None, limit: int, /
    ) -> list[tuple[WindowKey, Accumulator]]:
        keys = sorted(
            k for k in self._data if k[1] == start and k[2] == end and (after is None or k[0] > after)
        )
        out = []
        for k in keys[:limit]:
            acc = self.get(k)
            assert acc is not None
            out.append((k, acc))
            self.delete(k)
        return out

    def window_ends(self) -> list[int]:
        return sorted({k[2] for k in self._data})

    def delete(self, k: WindowKey, /) -> None:
        del self._data[k]

    def items(self) -> Iterator[tuple[WindowKey, Accumulator]]:
        """A snapshot of the contents, sorted by key (safe to mutate the store while iterating)."""
        for k in sorted(self._data):
            acc = self.get(k)
            assert acc is not None
            yield k, acc

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, k: object) -> bool:
        return k in self._data


class FakeClock:
    """An injectable wall clock in epoch milliseconds that moves only when told to."""

    def __init__(self, now_ms: int = 0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        """The current time in epoch milliseconds."""
        return self.now_ms

    def advance(self, ms: int) -> int:
        """Move the clock forward by ``ms`` (>= 0) and return the new time."""
        if ms < 0:
            raise ValueError(f"a clock does not go backwards (advance by {ms})")
        self.now_ms += ms
        return self.now_ms


# -- brute-force reference ------------------------------------------------------------------
#
# Deliberately slow and shares no code with weir.aggregates or the weir.window_* modules:
# it restates the semantics in the most direct Python, so that tests compare two independent
# readings of the same rules.

_VERY_EARLY = -(10**30)


def reference_aggregate(
    specs: Sequence[tuple[str, str, str | None]], records: Sequence[tuple[int, dict[str, Any]]]
) -> dict[str, Any]:
    """Aggregate ``(event time, record)`` pairs given in arrival order, one spec at a time."""
    out: dict[str, Any] = {}
    for name, fn, field in specs:
        if fn == "count":
            out[name] = len(records)
            continue
        assert field is not None
        present = [(ts, rec[field]) for ts, rec in records if rec.get(field) is not None]
        values = [v for _, v in present]
        if fn == "sum":
            total: Any = 0
            for v in values:
                total = total + v
            out[name] = total
        elif fn == "avg":
            total = 0
            for v in values:
                total = total + v
            out[name] = total / len(values) if values else None
        elif fn == "min":
            best: Any = None
            for v in values:
                if best is None or v < best:
                    best = v
            out[name] = best
        elif fn == "max":
            best = None
            for v in values:
                if best is None or v > best:
                    best = v
            out[name] = best
        elif fn == "count_distinct":
            out[name] = len({json.dumps(v, sort_keys=True, separators=(",", ":")) for v in values})
        elif fn == "first":
            chosen: tuple[int, Any] | None = None
            for ts, v in present:
                if chosen is None or ts < chosen[0]:
                    chosen = (ts, v)
            out[name] = None if chosen is None else chosen[1]
        elif fn == "last":
            chosen = None
            for ts, v in present:
                if chosen is None or ts >= chosen[0]:
                    chosen = (ts, v)
            out[name] = None if chosen is None else chosen[1]
        else:
            raise ValueError(f"unknown aggregate function {fn!r}")
    return out


def _closed(end: int, watermark: int, allowed_lateness: int) -> bool:
    return watermark >= end - 1 + allowed_lateness


def reference_windows(
    events: Sequence[Event],
    kind: str,
    size: int | None,
    slide: int | None,
    gap: int | None,
    allowed_lateness: int,
    max_out_of_orderness: int,
    specs: Sequence[tuple[str, str, str | None]],
) -> tuple[dict[tuple[str, int, int], dict[str, Any]], list[Event]]:
    """Every window's final result and the late events, computed the slow, obvious way.

    ``events`` are ``(partition, key, ts, record)`` in arrival order (only the order within each
    partition matters). A record's watermark is the maximum event time of the records before it
    in its partition minus ``max_out_of_orderness`` (very early before the first). A key must
    live in one partition. All windows are eventually closed, so every window appears.
    """
    max_ts: dict[int, int] = {}
    partition_of: dict[str, int] = {}
    # window -> [(arrival seq, ts, record)]
    contents: dict[tuple[str, int, int], list[tuple[int, int, dict[str, Any]]]] = {}
    sessions: dict[str, list[tuple[int, int]]] = {}
    late: list[Event] = []
    for seq, event in enumerate(events):
        partition, key, ts, record = event
        if partition_of.setdefault(key, partition) != partition:
            raise ValueError(f"key {key!r} appears in partitions {partition_of[key]} and {partition}")
        watermark = max_ts[partition] - max_out_of_orderness if partition in max_ts else _VERY_EARLY
        max_ts[partition] = max(max_ts.get(partition, ts), ts)

        if kind in ("tumbling", "sliding"):
            if kind == "tumbling":
                assert size is not None
                candidates = [((ts // size) * size, (ts // size) * size + size)]
            else:
                assert size is not None and slide is not None
                candidates = [
                    (s, s + size)
                    for s in range((ts - size) // slide * slide, ts + 1, slide)
                    if s % slide == 0 and s <= ts < s + size
                ]
            open_windows = [(s, e) for s, e in candidates if not _closed(e, watermark, allowed_lateness)]
            if not open_windows:
                late.append(event)
            for s, e in open_windows:
                contents.setdefault((key, s, e), []).append((seq, ts, record))
        elif kind == "session":
            assert gap is not None
            if _closed(ts + gap, watermark, allowed_lateness):
                late.append(event)
                continue
            start, end = ts, ts + gap
            members = [(seq, ts, record)]
            key_sessions = sessions.setdefault(key, [])
            merged_any = True
            while merged_any:
                merged_any = False
                for s, e in key_sessions:
                    if _closed(e, watermark, allowed_lateness):
                        continue  # closed sessions were already emitted; never merge into them
                    if s <= end and start <= e:  # overlapping or touching, as in Flink
                        key_sessions.remove((s, e))
                        members = contents.pop((key, s, e)) + members
                        start, end = min(start, s), max(end, e)
                        merged_any = True
                        break
            key_sessions.append((start, end))
            contents[(key, start, end)] = members
        else:
            raise ValueError(f"unknown window kind {kind!r}")

    results = {}
    for window, members in contents.items():
        ordered = sorted(members, key=lambda m: m[0])
        results[window] = reference_aggregate(specs, [(ts, rec) for _, ts, rec in ordered])
    return results, late


def random_events(
    seed: int,
    n: int = 200,
    *,
    partitions: int = 2,
    keys: int = 4,
    start_ms: int = 0,
    mean_step_ms: int = 5,
    max_out_of_orderness_ms: int = 20,
    too_late_fraction: float = 0.05,
    too_late_by_ms: int = 200,
) -> list[Event]:
    """A seeded, reproducible stream of ``(partition, key, ts, record)`` in arrival order.

    Each partition's time advances by ``0..2*mean_step_ms`` per record; each record is displaced
    back by up to ``max_out_of_orderness_ms`` (bounded disorder) or, with probability
    ``too_late_fraction``, by up to ``too_late_by_ms`` more (records a pipeline should find late).
    Key ``k<i>`` always lives in partition ``i % partitions``. Records carry ``price`` (int or a
    non-integral float that is a multiple of 1/4, so sums are exact in any order), optional
    ``qty`` (sometimes missing or null), and ``user`` (a string, an int, a bool, null, a dict or a
    list).
    """
    rng = random.Random(seed)
    clock = {p: start_ms for p in range(partitions)}
    events: list[Event] = []
    users: list[Any] = ["ann", "bob", "cy", 1, 2, True, None, {"id": 1, "t": "x"}, {"t": "x", "id": 1}]
    users.append([1, 2])
    for _ in range(n):
        k = rng.randrange(keys)
        partition = k % partitions
        clock[partition] += rng.randint(0, 2 * mean_step_ms)
        ts = clock[partition] - rng.randint(0, max_out_of_orderness_ms)
        if rng.random() < too_late_fraction:
            ts -= rng.randint(1, too_late_by_ms)
        record: dict[str, Any] = {"price": _random_price(rng), "user": rng.choice(users)}
        roll = rng.random()
        if roll < 0.7:
            record["qty"] = rng.randint(-5, 50)
        elif roll < 0.8:
            record["qty"] = None
        events.append((partition, f"k{k}", ts, record))
    return events


def _random_price(rng: random.Random) -> int | float:
    if rng.random() < 0.5:
        return rng.randint(-100, 1000)
    # Non-integral quarters: exact in binary, and never equal to an int, so min/max ties
    # between 3 and 3.0 (whose pick would depend on merge order) cannot occur.
    return rng.randint(-400, 4000) + rng.choice((0.25, 0.5, 0.75))
