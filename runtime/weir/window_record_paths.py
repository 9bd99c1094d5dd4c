"""The per-record paths of the window operator, one per window kind, and its session index.

Each builder returns a closure over locals (store methods, aggregator functions, the operator's
indexes, constants): local/cell loads are the cheapest lookups Python has, and the record path
runs once per input record. The closures share the operator's mutable indexes (passed in), so
``weir.window_operator.WindowOperator`` owns the semantics, documented there; it calls
``build_tumbling``, ``build_sliding`` or ``build_session`` once, when it is constructed.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from weir.aggregates import Aggregator
from weir.window_shapes import WindowKey, WindowShape

if TYPE_CHECKING:  # the operator imports this module; the protocol is only a type here
    from weir.window_operator import WindowStore

__all__ = ["ProcessFn", "Session", "arm", "build_session", "build_sliding", "build_tumbling", "mark_emitted"]

ProcessFn = Callable[[str, int, dict[str, Any], int], bool]
"""``process(key, ts, record, watermark) -> bool``: False when the record is late."""

_end = attrgetter("end")


def build_tumbling(
    shape: WindowShape,
    aggregator: Aggregator,
    store: WindowStore,
    timers: dict[int, list[WindowKey]],
    heap: list[int],
    wm: list[int],
    changed: set[WindowKey] | None,
) -> ProcessFn:
    """The record path of tumbling windows (see ``WindowOperator`` for the semantics and the
    indexes: ``timers``/``heap`` its timer index, ``wm`` its one-slot highest watermark,
    ``changed`` its "updates"-mode set or None)."""
    size = shape.size_ms
    lateness_m1 = shape.allowed_lateness_ms - 1
    get, put = store.get, store.put
    create, add = aggregator.create, aggregator.add
    heappush = heapq.heappush

    def process(key: str, ts: int, record: dict[str, Any], watermark: int) -> bool:
        if watermark > wm[0]:
            wm[0] = watermark
        else:
            watermark = wm[0]
        start = ts - ts % size
        end = start + size
        if end <= watermark - lateness_m1:  # W >= end - 1 + allowed_lateness
            return False
        k = (key, start, end)
        acc = get(k)
        if acc is None:
            acc = create()
            add(acc, record, ts)  # may raise Overflow: before anything is indexed
            bucket = timers.get(end)
            if bucket is None:
                timers[end] = [k]
                heappush(heap, end)
            else:
                bucket.append(k)
        else:
            add(acc, record, ts)
        put(k, acc)
        if changed is not None:
            changed.add(k)
        return True

    return process

def build_sliding(
    shape: WindowShape,
    aggregator: Aggregator,
    store: WindowStore,
    timers: dict[int, list[WindowKey]],
    heap: list[int],
    wm: list[int],
    changed: set[WindowKey] | None,
) -> ProcessFn:
    """The record path of sliding windows (arguments as for ``build_tumbling``)."""
    size, slide = shape.size_ms, shape.slide_ms
    lateness_m1 = shape.allowed_lateness_ms - 1
    get, put = store.get, store.put
    create, add, check = aggregator.create, aggregator.add, aggregator.check
    heappush = heapq.heappush

    def process(key: str, ts: int, record: dict[str, Any], watermark: int) -> bool:
        if watermark > wm[0]:
            wm[0] = watermark
        else:
            watermark = wm[0]
        # Windows containing ts start in (ts - size, ts]; the open ones (end > W - L + 1)
        # start after W - L + 1 - size. Begin at the first multiple of slide past both
        # bounds, so closed windows are skipped without being looked at.
        lo = ts - size + 1
        open_lo = watermark - lateness_m1 - size + 1
        if open_lo > lo:
            lo = open_lo
        first = lo + (-lo) % slide
        if first > ts:
            return False
        if check is None:  # no sum or avg: nothing can overflow
            for start in range(first, ts + 1, slide):
                end = start + size
                k = (key, start, end)
                acc = get(k)
                if acc is None:
                    acc = create()
                    bucket = timers.get(end)
                    if bucket is None:
                        timers[end] = [k]
                        heappush(heap, end)
                    else:
                        bucket.append(k)
                add(acc, record, ts)
                put(k, acc)
                if changed is not None:
                    changed.add(k)
            return True
        # All or none: a record that would overflow one of its windows joins none, so the
        # existing windows are checked before any is changed. (A fresh window holds one
        # value, which the decoder has already bounded.)
        keys = []
        accs = []
        for start in range(first, ts + 1, slide):
            k = (key, start, start + size)
            keys.append(k)
            accs.append(get(k))
        check(accs, record)
        for k, acc in zip(keys, accs):  # noqa: B905 - equal lengths by construction
            if acc is None:
                acc = create()
                end = k[2]
                bucket = timers.get(end)
                if bucket is None:
                    timers[end] = [k]
                    heappush(heap, end)
                else:
                    bucket.append(k)
            add(acc, record, ts)
            put(k, acc)
            if changed is not None:
                changed.add(k)
        return True

    return process

def build_session(
    shape: WindowShape,
    aggregator: Aggregator,
    store: WindowStore,
    timers: dict[int, list[Session]],
    heap: list[int],
    wm: list[int],
    sessions: dict[str, list[Session]],
    changed: set[WindowKey] | None,
    retract: list[WindowKey],
) -> ProcessFn:
    """The record path of session windows: ``timers`` are the session timers, ``sessions`` the
    per-key open sessions sorted by start, ``retract`` the stale emitted bounds the next
    ``advance`` retracts; the rest as for ``build_tumbling``."""
    gap = shape.gap_ms
    lateness_m1 = shape.allowed_lateness_ms - 1
    get, put, delete = store.get, store.put, store.delete
    create, add, merge = aggregator.create, aggregator.add, aggregator.merge

    def process(key: str, ts: int, record: dict[str, Any], watermark: int) -> bool:
        if watermark > wm[0]:
            wm[0] = watermark
        else:
            watermark = wm[0]
        threshold = watermark - lateness_m1  # a window is closed iff end <= threshold
        end = ts + gap
        if end <= threshold:
            return False
        sess = sessions.get(key)
        if sess is None:
            sess = sessions[key] = []
            i = j = 0
        else:
            # Sessions closed at this watermark stay closed (watermarks never go back), never
            # merge again, and wait in the store and timers for advance to fire them: drop
            # them from the mergeable list. They always form a prefix: a record that could
            # start a session at or before a closed one's start would itself be late, so no
            # open session starts at or before a closed one.
            while sess and sess[0].end <= threshold:
                del sess[0]
            # The remaining sessions are open, hence pairwise apart (neither overlapping nor
            # touching), so ends are sorted too and the ones [ts, end) meets are contiguous.
            i = bisect_left(sess, ts, key=_end)
            j = i
            n = len(sess)
            while j < n and sess[j].start <= end:
                j += 1
        if i == j:
            acc = create()
            add(acc, record, ts)  # may raise Overflow: before anything is indexed
            s = Session(key, ts, end)
            sess.insert(i, s)
            arm(timers, heap, end, s)
            k = (key, ts, end)
            put(k, acc)
            if changed is not None:
                changed.add(k)
            return True
        s = sess[i]
        old = (key, s.start, s.end)
        found = get(old)
        if found is None:
            raise RuntimeError(f"session {old} is indexed but not in the store")
        acc = found
        start = s.start if s.start <= ts else ts
        last_end = sess[j - 1].end
        if last_end > end:
            end = last_end
        if j - i == 1 and start == s.start and end == s.end:
            # The record falls inside an existing session.
            add(acc, record, ts)
            put(old, acc)
            if changed is not None:
                changed.add(old)
            return True
        # Merge in start order. Disjoint sessions cannot share an event time, so merge's
        # first/last tie rule never matters here; the new record is added last, as the
        # latest arrival. Merge and add raise Overflow before anything is changed, so
        # they run before the store and the indexes are touched.
        others: list[tuple[Session, WindowKey]] = []
        for m in range(i + 1, j):
            other = sess[m]
            other_key = (key, other.start, other.end)
            other_acc = get(other_key)
            if other_acc is None:
                raise RuntimeError(f"session {other_key} is indexed but not in the store")
            acc = merge(acc, other_acc)
            others.append((other, other_key))
        add(acc, record, ts)
        # The first session survives (keeping its timer, which is at or before its new
        # end); the others die and their timers are skipped.
        delete(old)
        if changed is not None:
            changed.discard(old)
            if s.emitted is not None:
                retract.append(s.emitted)
                s.emitted = None
        for other, other_key in others:
            delete(other_key)
            if changed is not None:
                changed.discard(other_key)
                if other.emitted is not None:
                    retract.append(other.emitted)
            other.live = False
        if j - i > 1:
            del sess[i + 1 : j]
        s.start = start
        s.end = end
        k = (key, start, end)
        put(k, acc)
        if changed is not None:
            changed.add(k)
        return True

    return process


class Session:
    """One session of one key; mutated in place as it grows so no index needs updating."""

    __slots__ = ("emitted", "end", "key", "live", "start")

    def __init__(self, key: str, start: int, end: int) -> None:
        self.key = key
        self.start = start
        self.end = end
        self.live = True  # False once merged into another session or fired
        # "updates" mode: the bounds of this session's last emitted update while they are still
        # its bounds; a change of bounds hands them to the operator's retraction list.
        self.emitted: WindowKey | None = None


def mark_emitted(sessions: dict[str, list[Session]], k: WindowKey) -> None:
    """Record that session ``k`` was emitted as an update (a closed one is gone: it fires now)."""
    for s in sessions.get(k[0], ()):
        if s.start == k[1]:
            s.emitted = k
            return


def arm(timers: dict[int, list[Session]], heap: list[int], at: int, s: Session) -> None:
    """Set a timer at ``at`` for session ``s``."""
    bucket = timers.get(at)
    if bucket is None:
        timers[at] = [s]
        heapq.heappush(heap, at)
    else:
        bucket.append(s)
