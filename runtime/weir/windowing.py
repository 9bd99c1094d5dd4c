"""The keyed event-time window operator of one partition task: assign, aggregate, close and emit."""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import Any, Literal, NamedTuple, Protocol

from weir.aggregates import Accumulator, Aggregator
from weir.windows import WindowShape

__all__ = ["NO_WATERMARK", "EmitMode", "WindowKey", "WindowOperator", "WindowResult", "WindowStore"]

EmitMode = Literal["final", "updates"]

WindowKey = tuple[str, int, int]
"""``(key, start, end)`` of one window of one key; sessions use their current bounds."""

NO_WATERMARK = -(2**63)
"""The watermark before a partition has seen any record: nothing is complete yet."""

_end = itemgetter(1)


class WindowStore(Protocol):
    """Where the operator keeps accumulators, keyed by window.

    ``get`` may return the very object an earlier ``put`` stored (an in-memory cache) or a fresh
    copy (read from disk); the operator always ``put``s after mutating, so both are correct.
    """

    def get(self, k: WindowKey, /) -> Accumulator | None: ...
    def put(self, k: WindowKey, acc: Accumulator, /) -> None: ...
    def delete(self, k: WindowKey, /) -> None: ...
    def items(self) -> Iterator[tuple[WindowKey, Accumulator]]: ...
    def __len__(self) -> int: ...


class WindowResult(NamedTuple):
    """One emitted window: ``final`` is True exactly once per window, when it closes."""

    key: str
    start: int
    end: int
    values: dict[str, Any]
    final: bool


ProcessFn = Callable[[str, int, dict[str, Any], int], bool]


class WindowOperator:
    """Keyed tumbling, sliding or session windows over one partition's records.

    Semantics: times are epoch milliseconds; windows are ``[start, end)``; watermark ``W`` means
    events with ``ts <= W`` are complete; a window is closed once ``W >= end - 1 +
    allowed_lateness``. ``process(key, ts, record, watermark)`` adds the record to each of its
    windows that is not closed at ``watermark`` and returns True, or returns False and stores
    nothing when all of them are closed (the record is late; the caller dead-letters it).
    Lateness depends only on ``watermark``, never on what happens to be in memory, so results do
    not depend on how records are batched between ``advance`` calls.

    Watermarks are treated as non-decreasing across ``process`` and ``advance``: a lower one than
    already seen is raised to the highest seen, so a window that has closed (and perhaps fired)
    never reopens and is never emitted twice.

    ``advance(watermark)`` returns, in "updates" mode, first every window changed since the last
    emission (``final=False``, ordered by end, key, start), then, in both modes, every window
    now closed (``final=True``, ordered by end, key, start), and forgets the closed ones. A
    session that was emitted as an update and later merged into a bigger session gets no final
    result of its own: the merged session's result supersedes it.

    ``restore()`` rebuilds the in-memory indexes (timers, per-key sessions) from the store after
    a restart. ``process`` is a per-kind closure built once, so the per-record path does no
    dispatch and no attribute lookups.
    """

    process: ProcessFn

    def __init__(
        self,
        kind: str,
        size_ms: int | None,
        slide_ms: int | None,
        gap_ms: int | None,
        allowed_lateness_ms: int,
        aggregator: Aggregator,
        emit: EmitMode,
        store: WindowStore,
    ) -> None:
        if emit not in ("final", "updates"):
            raise ValueError(f"emit must be 'final' or 'updates', got {emit!r}")
        self.shape = WindowShape.of(kind, size_ms, slide_ms, gap_ms, allowed_lateness_ms)
        self.aggregator = aggregator
        self.emit: EmitMode = emit
        self._store = store
        # Timer index: window end -> store keys of the open windows ending there, plus a heap of
        # the ends. The heap may hold ends whose set has gone (sessions that merged away); advance
        # skips those, so closing costs O(closed windows * log), never a scan of all windows.
        self._timers: dict[int, set[WindowKey]] = {}
        self._heap: list[int] = []
        # Session windows only: key -> that key's open sessions as (start, end), sorted, disjoint.
        self._sessions: dict[str, list[tuple[int, int]]] = {}
        # "updates" mode: windows changed since the last emission.
        self._changed: set[WindowKey] = set()
        # Highest watermark seen, in a one-slot list so the process closure can update it.
        self._watermark = [NO_WATERMARK]
        if self.shape.kind == "tumbling":
            self.process = self._build_tumbling()
        elif self.shape.kind == "sliding":
            self.process = self._build_sliding()
        else:
            self.process = self._build_session()

    @property
    def open_windows(self) -> int:
        """Number of windows held (open, or closed but not yet fired by ``advance``)."""
        return sum(len(ks) for ks in self._timers.values())

    @property
    def watermark(self) -> int:
        """The highest watermark passed to ``process`` or ``advance`` so far."""
        return self._watermark[0]

    def process_batch(
        self, batch: Iterable[tuple[str, int, dict[str, Any], int]]
    ) -> list[tuple[str, int, dict[str, Any], int]]:
        """``process`` each ``(key, ts, record, watermark)`` in order; returns the late ones."""
        process = self.process
        return [item for item in batch if not process(item[0], item[1], item[2], item[3])]

    def advance(self, watermark: int) -> list[WindowResult]:
        """Emit pending updates ("updates" mode), then fire and forget the windows closed at ``watermark``."""
        wm = self._watermark
        if watermark < wm[0]:
            watermark = wm[0]
        else:
            wm[0] = watermark
        out: list[WindowResult] = []
        store = self._store
        result = self.aggregator.result
        changed = self._changed
        if changed:
            for k in sorted(changed, key=_fire_order):
                acc = store.get(k)
                if acc is not None:
                    out.append(WindowResult(k[0], k[1], k[2], result(acc), False))
            changed.clear()

        # A window is closed iff end <= watermark - allowed_lateness + 1.
        threshold = watermark - self.shape.allowed_lateness_ms + 1
        heap = self._heap
        timers = self._timers
        sessions = self._sessions
        while heap and heap[0] <= threshold:
            ks = timers.pop(heapq.heappop(heap), None)
            if not ks:
                continue  # stale heap entry: its windows merged away, or a duplicate push
            for k in sorted(ks):  # one end: order by key, then start
                acc = store.get(k)
                if acc is None:
                    raise RuntimeError(f"window {k} is in the timer index but not in the store")
                store.delete(k)
                out.append(WindowResult(k[0], k[1], k[2], result(acc), True))
                if sessions:
                    _forget_session(sessions, k)
        return out

    def restore(self) -> None:
        """Rebuild the timer index and the per-key session lists from ``store.items()``.

        Call once after constructing the operator over a store that already holds state
        (a restart). Pending "updates" emissions are not persisted: replaying input from the
        checkpointed offsets re-marks the windows it touches.
        """
        timers = self._timers
        sessions = self._sessions
        timers.clear()
        sessions.clear()
        self._changed.clear()
        is_session = self.shape.kind == "session"
        for k, _acc in self._store.items():
            key, start, end = k
            ks = timers.get(end)
            if ks is None:
                timers[end] = {k}
            else:
                ks.add(k)
            if is_session:
                sessions.setdefault(key, []).append((start, end))
        for lst in sessions.values():
            lst.sort()
        self._heap[:] = timers
        heapq.heapify(self._heap)

    # -- per-kind record paths -------------------------------------------------------------
    #
    # Each builder returns a closure over locals (store methods, aggregator functions, indexes,
    # constants): local/cell loads are the cheapest lookups Python has, and the record path runs
    # once per input record.

    def _build_tumbling(self) -> ProcessFn:
        size = self.shape.size_ms
        lateness_m1 = self.shape.allowed_lateness_ms - 1
        get, put = self._store.get, self._store.put
        create, add = self.aggregator.create, self.aggregator.add
        timers, heap, wm = self._timers, self._heap, self._watermark
        changed = self._changed if self.emit == "updates" else None
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
                ks = timers.get(end)
                if ks is None:
                    timers[end] = {k}
                    heappush(heap, end)
                else:
                    ks.add(k)
            add(acc, record, ts)
            put(k, acc)
            if changed is not None:
                changed.add(k)
            return True

        return process

    def _build_sliding(self) -> ProcessFn:
        size, slide = self.shape.size_ms, self.shape.slide_ms
        lateness_m1 = self.shape.allowed_lateness_ms - 1
        get, put = self._store.get, self._store.put
        create, add = self.aggregator.create, self.aggregator.add
        timers, heap, wm = self._timers, self._heap, self._watermark
        changed = self._changed if self.emit == "updates" else None
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
            for start in range(first, ts + 1, slide):
                end = start + size
                k = (key, start, end)
                acc = get(k)
                if acc is None:
                    acc = create()
                    ks = timers.get(end)
                    if ks is None:
                        timers[end] = {k}
                        heappush(heap, end)
                    else:
                        ks.add(k)
                add(acc, record, ts)
                put(k, acc)
                if changed is not None:
                    changed.add(k)
            return True

        return process

    def _build_session(self) -> ProcessFn:
        gap = self.shape.gap_ms
        lateness_m1 = self.shape.allowed_lateness_ms - 1
        store = self._store
        get, put, delete = store.get, store.put, store.delete
        create, add, merge = self.aggregator.create, self.aggregator.add, self.aggregator.merge
        timers, heap, wm, sessions = self._timers, self._heap, self._watermark, self._sessions
        changed = self._changed if self.emit == "updates" else None
        heappush = heapq.heappush

        def unschedule(k: WindowKey) -> None:
            ks = timers.get(k[2])
            if ks is not None:
                ks.discard(k)
                if not ks:
                    # The heap keeps the end; advance skips it as stale.
                    del timers[k[2]]
            if changed is not None:
                changed.discard(k)

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
                # start a session before a closed one's start would itself be late, so no open
                # session starts at or before a closed one.
                while sess and sess[0][1] <= threshold:
                    del sess[0]
                # The remaining sessions are open, hence pairwise disjoint, so ends are sorted too
                # and the ones [ts, end) intersects are contiguous.
                i = bisect_right(sess, ts, key=_end)
                j = i
                n = len(sess)
                while j < n and sess[j][0] < end:
                    j += 1
            if i == j:
                sess.insert(i, (ts, end))
                k = (key, ts, end)
                acc = create()
            else:
                start = sess[i][0]
                if ts < start:
                    start = ts
                last_end = sess[j - 1][1]
                if last_end > end:
                    end = last_end
                old = (key, sess[i][0], sess[i][1])
                found = get(old)
                if found is None:
                    raise RuntimeError(f"session {old} is indexed but not in the store")
                acc = found
                if j - i == 1 and old[1] == start and old[2] == end:
                    # The record falls inside an existing session: the common case.
                    add(acc, record, ts)
                    put(old, acc)
                    if changed is not None:
                        changed.add(old)
                    return True
                delete(old)
                unschedule(old)
                # Merge in start order. Disjoint sessions cannot share an event time, so merge's
                # first/last tie rule never matters here; the new record is added last, as the
                # latest arrival.
                for m in range(i + 1, j):
                    other = (key, sess[m][0], sess[m][1])
                    other_acc = get(other)
                    if other_acc is None:
                        raise RuntimeError(f"session {other} is indexed but not in the store")
                    acc = merge(acc, other_acc)
                    delete(other)
                    unschedule(other)
                sess[i:j] = [(start, end)]
                k = (key, start, end)
            ks = timers.get(end)
            if ks is None:
                timers[end] = {k}
                heappush(heap, end)
            else:
                ks.add(k)
            add(acc, record, ts)
            put(k, acc)
            if changed is not None:
                changed.add(k)
            return True

        return process


def _fire_order(k: WindowKey) -> tuple[int, str, int]:
    return (k[2], k[0], k[1])


def _forget_session(sessions: dict[str, list[tuple[int, int]]], k: WindowKey) -> None:
    sess = sessions.get(k[0])
    if sess is None:
        return
    try:
        sess.remove((k[1], k[2]))
    except ValueError:
        return  # already dropped from the mergeable list when it closed
    if not sess:
        del sessions[k[0]]
