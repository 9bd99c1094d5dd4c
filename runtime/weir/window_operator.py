"""The keyed event-time window operator of one partition task: assign, aggregate, close and emit."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import Any, Literal, NamedTuple, Protocol

from weir.aggregates import Accumulator, Aggregator
from weir.window_record_paths import (
    ProcessFn,
    Session,
    arm,
    build_session,
    build_sliding,
    build_tumbling,
    mark_emitted,
)
from weir.window_shapes import WindowKey, WindowShape

__all__ = ["NO_WATERMARK", "EmitMode", "WindowOperator", "WindowResult", "WindowStore"]

EmitMode = Literal["final", "updates"]

NO_WATERMARK = -(2**63)
"""The watermark before a partition has seen any record: nothing is complete yet."""


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

    # The on-disk timer index of tumbling and sliding windows (sessions do not use it).
    @property
    def evictions(self) -> int:
        """Changes whenever windows were dropped from memory; right after a change every window
        the store holds can be found through ``pop_windows_at`` (once ``spill``ed)."""
        ...

    def spill(self) -> None:
        """Make every change so far visible to ``pop_windows_at``."""
        ...

    def pop_windows_at(
        self, start: int, end: int, after: str | None, limit: int, /
    ) -> list[tuple[WindowKey, Accumulator]]:
        """Delete and return up to ``limit`` windows ``[start, end)`` whose key sorts after
        ``after``, in key order."""
        ...

    def window_ends(self) -> list[int]:
        """The distinct ends of every window held (used by ``restore`` after an eviction)."""
        ...


class WindowResult(NamedTuple):
    """One emitted window: ``final`` is True exactly once per window, when it closes.

    ``retract`` (sessions in "updates" mode only) withdraws an update emitted earlier with these
    exact bounds: the session has since grown or been merged into another; ``values`` is empty.
    """

    key: str
    start: int
    end: int
    values: dict[str, Any]
    final: bool
    retract: bool = False


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

    Sessions: each record makes ``[ts, ts + gap)``; sessions of a key that overlap or touch merge,
    in chains too: records at most ``gap`` apart share a session, as in Flink (whose
    ``TimeWindow.intersects`` counts touching) and Kafka Streams. A record never merges into a session that
    is closed at the record's watermark, fired or not: it starts or joins a separate session.

    ``advance(watermark)`` returns, in "updates" mode, first a retraction (``retract=True``) of
    every session update whose bounds have stopped existing since it was emitted, then every
    window changed since the last emission (``final=False``), then, in both modes, every window
    now closed (``final=True``), each group ordered by end, key, start; and forgets the closed
    ones. So every ``(key, start, end)`` emitted as an update is later either finalised with
    those bounds or retracted, as in Flink's retract streams: a session that grows retracts its
    old bounds; one absorbed by a merge is retracted and the merged session goes on to its
    final result. (After ``restore()`` every stored session counts as emitted, since the worker
    emits after every batch, so a retraction may name bounds that were never sent.)

    Aggregates: ``process`` raises ``aggregates.Overflow`` when the record would make an aggregate
    of one of its windows unrepresentable; then nothing at all is stored or indexed for it (for
    a sliding record, in none of its windows; for a merging session record, no merge happens).

    ``restore()`` rebuilds the in-memory indexes (timers, per-key sessions) from the store after
    a restart. ``process`` is a per-kind closure built once, so the per-record path does no
    dispatch and no attribute lookups.

    Memory (tumbling and sliding): the timer index holds the windows created in memory since
    the store last evicted windows (``store.evictions``), plus the distinct window ends. After
    an eviction every window is on disk, where the store's entries ordered by ``(end, key)``
    are the timer index: the operator forgets its per-window timers (keeping the ends), and
    fires an end whose windows went to disk by ``store.spill()`` and a scan of
    ``store.pop_windows_at`` in chunks. So the in-memory index never grows with spilled windows,
    and results and their order are the same as with everything in memory. Sessions keep
    their per-key index in memory.
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
        # Timer index: a heap of timer times plus, per time, what to check then. Tumbling and
        # sliding windows never change their end, so their timer is their end and the entry is
        # the store key. Sessions grow, so their entry is the mutable Session and its timer may
        # lag its end: when it fires, the session is either closed (fire it) or re-armed at its
        # current end. Extending a session (the common per-record case) then touches no index,
        # and advance costs O(due timers * log), never a scan of all windows.
        self._heap: list[int] = []
        self._timers: dict[int, list[WindowKey]] = {}
        # Ends whose windows may be on disk without a timer here (see the class docstring); a
        # window created later at such an end still gets an entry in its (emptied) timer list.
        self._ends_on_disk: set[int] = set()
        self._evictions_seen = 0
        # Closed windows waiting to fire, in firing order, when ``advance`` had a ``limit``:
        # ``(end, keys)`` with keys in reverse firing order (popped from the back), or
        # ``(end, None)`` for an end fired from disk from ``_cursor`` (the last key fired) on.
        self._due: deque[tuple[int | None, list[WindowKey] | None]] = deque()
        self._cursor: str | None = None
        self._session_timers: dict[int, list[Session]] = {}
        # Sessions only: key -> that key's sessions not known to be closed, sorted by start.
        self._sessions: dict[str, list[Session]] = {}
        # "updates" mode: windows changed since the last emission, and (sessions) emitted bounds
        # that a growth or merge has made stale and that the next advance retracts.
        self._changed: set[WindowKey] = set()
        self._retract: list[WindowKey] = []
        # Highest watermark seen, in a one-slot list so the process closure can update it.
        self._watermark = [NO_WATERMARK]
        changed = self._changed if emit == "updates" else None
        if self.shape.kind == "tumbling":
            self.process = build_tumbling(
                self.shape, aggregator, store, self._timers, self._heap, self._watermark, changed
            )
        elif self.shape.kind == "sliding":
            self.process = build_sliding(
                self.shape, aggregator, store, self._timers, self._heap, self._watermark, changed
            )
        else:
            self.process = build_session(
                self.shape, aggregator, store, self._session_timers, self._heap, self._watermark,
                self._sessions, changed, self._retract,
            )

    @property
    def open_windows(self) -> int:
        """Number of windows held in the store (open, or closed but not yet fired by ``advance``)."""
        return len(self._store)

    @property
    def firing(self) -> bool:
        """Whether closed windows are still waiting to fire (``advance`` stopped at its limit)."""
        return bool(self._due)

    @property
    def timer_entries(self) -> int:
        """Per-window entries of the in-memory timer index (sessions: keys and timer times,
        a lower bound kept O(1)-ish: the metric must not scan every session)."""
        n = sum(len(b) for b in self._timers.values())
        n += len(self._session_timers) + len(self._sessions)
        return n + sum(len(keys) for _end, keys in self._due if keys is not None)

    @property
    def watermark(self) -> int:
        """The highest watermark passed to ``process`` or ``advance`` so far."""
        return self._watermark[0]

    # -- the native hot path's seam (weir.native): its write-back cache over this operator's store
    def stored(self, key: str, start: int, end: int) -> Accumulator | None:
        """The accumulator the store holds for window ``(key, start, end)``, or None."""
        return self._store.get((key, start, end))

    @property
    def watermark_cell(self) -> list[int]:
        """The one-slot highest watermark itself: the native path lifts it as ``process`` does."""
        return self._watermark

    def adopt(self, k: WindowKey, acc: Accumulator, new: bool) -> None:
        """Take a window's accumulator computed outside ``process`` (tumbling and sliding
        windows): store it and, for a ``new`` window, index its timer, as ``process`` would have."""
        self._store.put(k, acc)
        if new:
            end = k[2]
            bucket = self._timers.get(end)
            if bucket is None:
                self._timers[end] = [k]
                heapq.heappush(self._heap, end)
            else:
                bucket.append(k)
        if self.emit == "updates":
            self._changed.add(k)

    def lift_watermark(self, watermark: int) -> None:
        """Raise the highest watermark seen (records processed outside ``process`` saw it)."""
        if watermark > self._watermark[0]:
            self._watermark[0] = watermark

    def process_batch(
        self, batch: Iterable[tuple[str, int, dict[str, Any], int]]
    ) -> list[tuple[str, int, dict[str, Any], int]]:
        """``process`` each ``(key, ts, record, watermark)`` in order; returns the late ones.

        ``Overflow`` from a record propagates, with the items before it processed."""
        process = self.process
        return [item for item in batch if not process(item[0], item[1], item[2], item[3])]

    def advance(self, watermark: int, limit: int | None = None) -> list[WindowResult]:
        """Emit pending updates ("updates" mode), then fire and forget the windows closed at ``watermark``.

        With ``limit``, at most ``limit`` final results come back; ``firing`` then says whether
        more closed windows wait, and the next call continues with them, in order, before any
        window that closes later. The caller bounds the memory a big closing takes this way.
        """
        wm = self._watermark
        if watermark < wm[0]:
            watermark = wm[0]
        else:
            wm[0] = watermark
        out: list[WindowResult] = []
        store = self._store
        result = self.aggregator.result
        changed = self._changed
        retract = self._retract
        if retract:
            for k in sorted(retract, key=_fire_order):
                out.append(WindowResult(k[0], k[1], k[2], {}, False, True))
            retract.clear()
        if changed:
            sessions = self._sessions if self.shape.kind == "session" else None
            for k in sorted(changed, key=_fire_order):
                acc = store.get(k)
                if acc is not None:
                    out.append(WindowResult(k[0], k[1], k[2], result(acc), False))
                    if sessions is not None:
                        mark_emitted(sessions, k)
            changed.clear()

        if store.evictions != self._evictions_seen:
            self._note_evictions()
        # A window is closed iff end <= watermark - allowed_lateness + 1.
        threshold = watermark - self.shape.allowed_lateness_ms + 1
        heap = self._heap
        if heap and heap[0] <= threshold:
            self._collect_due(threshold)
        if not self._due:
            return out
        due = self._due
        size = self.shape.size_ms or 0
        fired = 0
        while due and (limit is None or fired < limit):
            end, keys = due[0]
            if keys is None:
                assert end is not None
                want = _FIRE_CHUNK if limit is None else min(_FIRE_CHUNK, limit - fired)
                chunk = store.pop_windows_at(end - size, end, self._cursor, want)
                for k, acc in chunk:
                    out.append(WindowResult(k[0], k[1], k[2], result(acc), True))
                fired += len(chunk)
                if len(chunk) < want:
                    due.popleft()
                    self._cursor = None
                else:
                    self._cursor = chunk[-1][0][0]
                continue
            while keys and (limit is None or fired < limit):
                k = keys.pop()
                acc = store.get(k)
                if acc is None:
                    raise RuntimeError(f"window {k} is in the timer index but not in the store")
                store.delete(k)
                out.append(WindowResult(k[0], k[1], k[2], result(acc), True))
                fired += 1
            if not keys:
                due.popleft()
        return out

    def _collect_due(self, threshold: int) -> None:
        """Move every window closed at ``threshold`` from the timer index to ``_due``."""
        heap = self._heap
        if self.shape.kind == "session":
            due = self._due_sessions(threshold)
            due.sort(key=_fire_order, reverse=True)
            self._due.append((None, due))
            return
        timers, on_disk = self._timers, self._ends_on_disk
        from_disk = False
        while heap and heap[0] <= threshold:
            end = heapq.heappop(heap)
            bucket = timers.pop(end)
            if end in on_disk:
                # Its windows are on disk (and perhaps changed in memory since): fire them by
                # scanning the store once it has written every change.
                on_disk.discard(end)
                from_disk = True
                self._due.append((end, None))
            else:
                bucket.sort(key=_fire_order, reverse=True)
                self._due.append((end, bucket))
        if from_disk:
            self._store.spill()

    def _note_evictions(self) -> None:
        """After the store evicted windows, their timers live on disk: keep only the ends."""
        self._evictions_seen = self._store.evictions
        if self.shape.kind == "session":
            return  # sessions keep their index in memory and read evicted windows back by key
        self._ends_on_disk.update(self._timers)
        for bucket in self._timers.values():
            bucket.clear()

    def _due_sessions(self, threshold: int) -> list[WindowKey]:
        heap = self._heap
        timers = self._session_timers
        sessions = self._sessions
        due: list[WindowKey] = []
        while heap and heap[0] <= threshold:
            for s in timers.pop(heapq.heappop(heap)):
                if not s.live:
                    continue  # merged into another session, which has its own timer
                if s.end <= threshold:
                    s.live = False
                    due.append((s.key, s.start, s.end))
                    key_sessions = sessions.get(s.key)
                    if key_sessions is not None and s in key_sessions:
                        key_sessions.remove(s)
                        if not key_sessions:
                            del sessions[s.key]
                else:
                    # Grew since the timer was set: wait for its current end (> threshold, so
                    # this loop will not pop it again).
                    arm(timers, heap, s.end, s)
        return due

    def restore(self) -> None:
        """Rebuild the timer index and the per-key session lists from ``store.items()``.

        Call once after constructing the operator over a store that already holds state
        (a restart). Pending "updates" emissions are not persisted: replaying input from the
        checkpointed offsets re-marks the windows it touches. Neither is the watermark: the
        caller passes it with every record, as before the restart.
        """
        self._timers.clear()
        self._session_timers.clear()
        self._sessions.clear()
        self._changed.clear()
        self._retract.clear()
        self._heap.clear()
        updates = self.emit == "updates"
        self._due.clear()
        self._cursor = None
        self._ends_on_disk.clear()
        self._evictions_seen = self._store.evictions
        if self.shape.kind != "session" and self._evictions_seen:
            # The windows are on disk: index their ends only, never every window.
            ends = sorted(set(self._store.window_ends()))
            self._timers.update((end, []) for end in ends)
            self._ends_on_disk.update(ends)
            self._heap.extend(ends)
        elif self.shape.kind == "session":
            for (key, start, end), _acc in self._store.items():
                s = Session(key, start, end)
                if updates:
                    s.emitted = (key, start, end)
                self._sessions.setdefault(key, []).append(s)
                self._session_timers.setdefault(end, []).append(s)
            for key_sessions in self._sessions.values():
                key_sessions.sort(key=_start)
            self._heap.extend(self._session_timers)
        else:
            for k, _acc in self._store.items():
                self._timers.setdefault(k[2], []).append(k)
            self._heap.extend(self._timers)
        heapq.heapify(self._heap)


_FIRE_CHUNK = 10_000
"""Windows read from disk per scan when an end fires from disk."""

_start = attrgetter("start")


def _fire_order(k: WindowKey) -> tuple[int, str, int]:
    return (k[2], k[0], k[1])
