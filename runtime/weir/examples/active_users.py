"""The active-users example: distinct users per minute and over the last 5 minutes.

``active_users.yaml`` keys the click stream (``weir.examples.clickstream``) by shop and runs
``ActiveUsers``, a keyed process function: it keeps, per key, each minute's distinct users (a
map entry per minute and user) and, when the watermark passes the end of a minute, writes one
record for it::

    {"key": "demo-shop", "windowStart": "2024-01-01T00:05:00.000Z",
     "windowEnd": "2024-01-01T00:06:00.000Z", "windowStartMs": 1704067500000,
     "windowEndMs": 1704067560000, "activeUsers1m": 37, "activeUsers5m": 112}

``activeUsers1m``: users with a record in ``[windowStart, windowEnd)``; ``activeUsers5m``:
in ``[windowEnd - SPAN, windowEnd)``. A key gets a record for every minute from its first
record's minute until ``SPAN`` after its last one (``activeUsers1m`` 0 in minutes without
records), as sliding windows of ``SPAN`` by one minute would. A record whose minute has been
written already (later than the watermark allows) raises ``LateRecord``: the runtime
dead-letters it (``function_error``) instead of changing a number already written.

``reference`` computes the job's output from the generated records in plain Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weir.examples import Example, Record, iso_ms
from weir.examples.clickstream import generate
from weir.process import Context, KeyedState, ProcessFunction
from weir.results import iso

__all__ = ["EXAMPLE", "ActiveUsers", "LateRecord", "reference"]

MINUTE_MS = 60_000
SPAN_MINUTES = 5


class LateRecord(ValueError):
    """A record for a minute whose line was already written."""


class ActiveUsers(ProcessFunction):
    """Distinct ``USER_FIELD`` values per minute and per ``SPAN_MINUTES`` (see the module docstring)."""

    USER_FIELD = "user_id"

    def open(self, state: KeyedState) -> None:
        # [minute start, user] -> True for each user seen in that minute, kept until the last
        # line that counts it (SPAN_MINUTES - 1 minutes later) is written. One entry per pair
        # rather than a list per minute: a record costs a point lookup, not a rewrite of the
        # minute's list, however many users a minute has.
        self.seen = state.map("seen")

    def process(self, record: dict[str, Any], ctx: Context) -> None:
        minute = ctx.timestamp - ctx.timestamp % MINUTE_MS
        if ctx.watermark >= minute + MINUTE_MS - 1:
            written = iso(ctx.watermark)
            raise LateRecord(f"late for minute {iso(minute)}: its line was written at watermark {written}")
        pair = [minute, record[self.USER_FIELD]]
        if self.seen.get(pair) is None:
            self.seen.put(pair, True)
            # this minute's line and the next ones whose span includes it (a timer registered
            # again is registered once: each (key, time) fires once)
            for later in range(SPAN_MINUTES):
                ctx.timers.register(minute + (later + 1) * MINUTE_MS - 1)

    def on_timer(self, timestamp: int, ctx: Context) -> dict[str, Any]:
        minute = timestamp + 1 - MINUTE_MS
        first = minute - (SPAN_MINUTES - 1) * MINUTE_MS
        recent: set[Any] = set()
        this = 0
        for (m, user), _ in self.seen.items():  # this span's pairs and the next minute's first ones
            if first <= m <= minute:
                recent.add(user)
                if m == minute:
                    this += 1
            if m == first:  # no later line counts it
                self.seen.remove([m, user])
        return _line(ctx.key, minute, iso(minute), iso(minute + MINUTE_MS), this, len(recent))


def _line(key: str, minute: int, start: str, end: str, one: int, span: int) -> dict[str, Any]:
    return {
        "key": key,
        "windowStart": start,
        "windowEnd": end,
        "windowStartMs": minute,
        "windowEndMs": minute + MINUTE_MS,
        "activeUsers1m": one,
        "activeUsers5m": span,
    }


def reference(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One line per shop and minute from the first record's minute to ``SPAN_MINUTES - 1``
    after the last one's (every minute whose span holds a record), as the job writes it."""
    users: dict[tuple[str, int], set[str]] = {}
    for r in records:
        if r.value is None or r.raw is not None:
            continue
        ts = r.value["ts"]
        users.setdefault((r.value["shop"], ts - ts % MINUTE_MS), set()).add(r.value["user_id"])
    minutes = {
        (shop, start + later * MINUTE_MS) for shop, start in users for later in range(SPAN_MINUTES)
    }
    out = []
    for shop, minute in sorted(minutes):
        span: set[str] = set()
        for earlier in range(SPAN_MINUTES):
            span |= users.get((shop, minute - earlier * MINUTE_MS), set())
        one = len(users.get((shop, minute), ()))
        out.append(_line(shop, minute, iso_ms(minute), iso_ms(minute + MINUTE_MS), one, len(span)))
    return out



def _show(r: dict[str, Any]) -> str:
    minute = r["windowStart"][11:16] + "-" + r["windowEnd"][11:16]
    return f"{minute:<12} {r['activeUsers1m']:>16} {r['activeUsers5m']:>20}"


EXAMPLE = Example(
    name="active-users",
    summary="distinct active users per minute and over the last 5 minutes (a keyed process function)",
    manifest="active_users.yaml",
    generate=generate,
    reference=reference,
    header=f"{'minute':<12} {'active in minute':>16} {'active in last 5 min':>20}",
    show=_show,
    notes=(
        "One line per shop minute once the minute is complete: users with an event in that",
        "minute, and in the 5 minutes ending with it (a user counts once however many events).",
        "The 5-minute count fills up over the first 5 minutes of the stream.",
    ),
)
