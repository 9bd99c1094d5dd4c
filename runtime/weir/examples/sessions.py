"""The sessions example: each user's sessions by a 30-minute gap, with duration, pages, converted.

``sessions.yaml`` windows the click stream (``weir.examples.clickstream``, keyed by user) into
event-time session windows with a ``GAP_MS`` gap and computes, with the custom aggregates
below: ``duration`` (last minus first event time, ms), ``pages`` (page views) and
``converted`` (a purchase in the session).

``reference`` computes the job's output from the generated records in plain Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weir.examples import Example, Record, iso_ms
from weir.examples.clickstream import GAP_MS, generate
from weir.examples.funnel import CountOf

__all__ = ["EXAMPLE", "Converted", "Duration", "PageViews", "reference", "sessions"]


class PageViews(CountOf):
    """The number of page views."""

    TYPE = "page_view"


class Converted:
    """A ``weir.AggregateFunction``: whether any value is ``purchase``."""

    def create(self) -> bool:
        return False

    def add(self, acc: bool, value: Any) -> bool:
        return acc or value == "purchase"

    def merge(self, a: bool, b: bool) -> bool:
        return a or b

    def result(self, acc: bool) -> bool:
        return acc


class Duration:
    """A ``weir.AggregateFunction``: the largest minus the smallest value (event times, ms);
    the accumulator is ``[smallest, largest]`` (``None`` before the first value)."""

    def create(self) -> list[int] | None:
        return None

    def add(self, acc: list[int] | None, value: int) -> list[int]:
        return [value, value] if acc is None else [min(acc[0], value), max(acc[1], value)]

    def merge(self, a: list[int] | None, b: list[int] | None) -> list[int] | None:
        if a is None or b is None:
            return a if b is None else b
        return [min(a[0], b[0]), max(a[1], b[1])]

    def result(self, acc: list[int] | None) -> int:
        return 0 if acc is None else acc[1] - acc[0]


def sessions(times: Sequence[int], gap_ms: int = GAP_MS) -> list[list[int]]:
    """``times`` (any order) split into sessions: sorted, a new session where the pause
    exceeds ``gap_ms`` (a pause of exactly ``gap_ms`` joins: the windows touch)."""
    out: list[list[int]] = []
    for t in sorted(times):
        if out and t - out[-1][-1] <= gap_ms:
            out[-1].append(t)
        else:
            out.append([t])
    return out


def reference(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One result per user and session, as the job writes it (see ``sessions.yaml``)."""
    events: dict[str, list[tuple[int, str]]] = {}
    for r in records:
        if r.value is None or r.raw is not None or r.key is None:
            continue
        events.setdefault(r.key, []).append((r.value["ts"], r.value["type"]))
    out = []
    for user, user_events in sorted(events.items()):
        for session in sessions([ts for ts, _ in user_events]):
            first, last = session[0], session[-1]
            kinds = [kind for ts, kind in user_events if first <= ts <= last]
            out.append(
                {
                    "key": user,
                    "windowStart": iso_ms(first),
                    "windowEnd": iso_ms(last + GAP_MS),
                    "windowStartMs": first,
                    "windowEndMs": last + GAP_MS,
                    "duration": last - first,
                    "pages": kinds.count("page_view"),
                    "converted": "purchase" in kinds,
                }
            )
    return out



def _show(r: dict[str, Any]) -> str:
    minutes, ms = divmod(r["duration"], 60_000)
    last = iso_ms(r["windowEndMs"] - GAP_MS)
    return (
        f"{r['key']:<8} {r['windowStart'][11:19]:>8} {last[11:19]:>10} {minutes:>5}:{ms // 1000:02d}"
        f" {r['pages']:>6}  {'yes' if r['converted'] else 'no':<9}"
    )


EXAMPLE = Example(
    name="sessions",
    summary="user sessions by a 30-minute gap, with duration, page views and whether they converted",
    manifest="sessions.yaml",
    generate=generate,
    reference=reference,
    header=f"{'user':<8} {'start':>8} {'last event':>10} {'duration':>8} {'pages':>6}  converted",
    show=_show,
    notes=(
        "A session is a user's activity with no pause over 30 minutes of event time; it is",
        "written 30 shop minutes (30 s) after its last event. Users return after short and",
        "long pauses, so some visits join into one session and others start a new one.",
        "The first sessions began before the stream did: they show only their end.",
        "Every session is a line: `weir demo sessions --rate 100 --duration 120` reads better.",
    ),
)
