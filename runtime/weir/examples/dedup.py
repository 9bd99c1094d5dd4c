"""Per-user de-duplication by event id, with a per-minute summary: a keyed process function example.

Records are keyed by user (``keyBy: {field: user}``) and carry an ``eventId``. The first record
of each ``(user, eventId)`` passes through unchanged; a repeat within ``TTL`` of event time of
the first is dropped as a duplicate (the id is forgotten once the watermark passes first + TTL,
so a later repeat counts as new). For every user and event-time minute with records, a timer at
the minute's last millisecond emits one summary once the watermark reaches it::

    {"kind": "summary", "user": "u-1", "minuteStart": 1704067260000,
     "minuteEnd": 1704067320000, "unique": 3, "duplicates": 1}

A record whose minute was already summarised (it came later than the watermark allowed) is
de-duplicated as usual and counted in a further summary of that minute.

Use it as ``process: {function: "weir.examples.dedup:Dedup"}``; subclass it to change
``ID_FIELD``, ``TTL`` or ``PERIOD_MS``. ``reference`` computes its expected output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from weir.process import Context, KeyedState, ProcessFunction
from weir.spec import parse_duration

__all__ = ["Dedup", "reference"]


class Dedup(ProcessFunction):
    """Drop repeated event ids per key within ``TTL``; summarise each ``PERIOD_MS`` per key."""

    ID_FIELD = "eventId"
    TTL = "1h"
    PERIOD_MS = 60_000

    def open(self, state: KeyedState) -> None:
        self.seen = state.map("seen", ttl=self.TTL)  # event id -> event time of its first record
        self.counts = state.map("counts")  # period start -> [unique, duplicates]

    def process(self, record: dict[str, Any], ctx: Context) -> Iterator[dict[str, Any]]:
        event_id = record[self.ID_FIELD]
        start = ctx.timestamp - ctx.timestamp % self.PERIOD_MS
        unique, duplicates = self.counts.get(start, [0, 0])
        if self.seen.get(event_id) is None:
            self.seen.put(event_id, ctx.timestamp)
            unique += 1
            yield record
        else:
            duplicates += 1
        self.counts.put(start, [unique, duplicates])
        ctx.timers.register(start + self.PERIOD_MS - 1)

    def on_timer(self, timestamp: int, ctx: Context) -> Iterator[dict[str, Any]]:
        start = timestamp + 1 - self.PERIOD_MS
        counts = self.counts.get(start)
        if counts is not None:
            self.counts.remove(start)
            yield _summary(ctx.key, start, start + self.PERIOD_MS, counts[0], counts[1])


def _summary(user: str, start: int, end: int, unique: int, duplicates: int) -> dict[str, Any]:
    return {"kind": "summary", "user": user, "minuteStart": start, "minuteEnd": end,
            "unique": unique, "duplicates": duplicates}


def reference(
    events: Iterable[tuple[str, int, dict[str, Any]]],
    id_field: str = Dedup.ID_FIELD,
    ttl: str | int = Dedup.TTL,
    period_ms: int = Dedup.PERIOD_MS,
) -> list[tuple[str, dict[str, Any]]]:
    """The ``(key, record)`` outputs ``Dedup`` gives for ``(key, event time, record)`` events:
    the unique records in input order, then every summary ordered by (period, key).

    Exact when the input is in event-time order per key (as the worker sees each partition) and
    every repeat of an id comes either less than ``ttl`` minus the job's maxOutOfOrderness after
    the first record, or at least ``ttl`` after it plus the watermark's lag (so whether the id
    was forgotten does not depend on how records are batched), and nothing is late.
    Compare as multisets: records of different partitions interleave in any order.
    """
    ttl_ms = parse_duration(ttl)
    first: dict[tuple[str, Any], int] = {}
    counts: dict[tuple[int, str], list[int]] = {}
    out: list[tuple[str, dict[str, Any]]] = []
    for key, ts, record in events:
        start = ts - ts % period_ms
        c = counts.setdefault((start, key), [0, 0])
        seen = first.get((key, record[id_field]))
        if seen is None or ts >= seen + ttl_ms:
            first[(key, record[id_field])] = ts
            c[0] += 1
            out.append((key, record))
        else:
            c[1] += 1
    for (start, key), (unique, duplicates) in sorted(counts.items()):
        out.append((key, _summary(key, start, start + period_ms, unique, duplicates)))
    return out
