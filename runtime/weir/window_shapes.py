"""Window shapes: validation, tumbling/sliding assignment and session-interval merging (pure functions).

What a window *is* (its kind, size, slide, gap, lateness; its ``WindowKey``) and the arithmetic
of which windows a timestamp falls in. The operator that keeps and fires windows over a
partition's records is ``weir.window_operator``; its per-record paths are
``weir.window_record_paths``.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from operator import itemgetter
from typing import Literal, get_args

__all__ = [
    "MAX_SLIDING_WINDOWS",
    "WindowKey",
    "WindowKind",
    "WindowShape",
    "assign_sliding",
    "assign_tumbling",
    "closes_at",
    "is_closed",
    "merge_session",
]

WindowKind = Literal["tumbling", "sliding", "session"]
"""The three window shapes the runtime supports."""

WINDOW_KINDS: tuple[str, ...] = get_args(WindowKind)

WindowKey = tuple[str, int, int]
"""``(key, start, end)`` of one window of one key; sessions use their current bounds."""

Interval = tuple[int, int]
"""A half-open window ``[start, end)`` in epoch milliseconds."""

_end = itemgetter(1)


@dataclass(frozen=True, slots=True)
class WindowShape:
    """A validated window definition; the fields a kind does not use are stored as 0.

    ``size_ms`` is the window length (tumbling, sliding), ``slide_ms`` the distance between sliding
    window starts, ``gap_ms`` the session inactivity gap, ``allowed_lateness_ms`` how long after the
    watermark passes a window's end it still accepts records. All are milliseconds.
    """

    kind: WindowKind
    size_ms: int = 0
    slide_ms: int = 0
    gap_ms: int = 0
    allowed_lateness_ms: int = 0

    @classmethod
    def of(
        cls,
        kind: str,
        size_ms: int | None = None,
        slide_ms: int | None = None,
        gap_ms: int | None = None,
        allowed_lateness_ms: int = 0,
    ) -> WindowShape:
        """Build a shape from loosely-filled arguments, ignoring the ones the kind does not use.

        Raises ValueError for an unknown kind or a missing/out-of-range parameter.
        """
        if kind == "tumbling":
            return cls(
                "tumbling", size_ms=_required(size_ms, "size_ms"), allowed_lateness_ms=allowed_lateness_ms
            )
        if kind == "sliding":
            return cls(
                "sliding",
                size_ms=_required(size_ms, "size_ms"),
                slide_ms=_required(slide_ms, "slide_ms"),
                allowed_lateness_ms=allowed_lateness_ms,
            )
        if kind == "session":
            return cls("session", gap_ms=_required(gap_ms, "gap_ms"), allowed_lateness_ms=allowed_lateness_ms)
        raise ValueError(f"unknown window kind {kind!r}; expected one of {WINDOW_KINDS}")

    def __post_init__(self) -> None:
        for name in ("size_ms", "slide_ms", "gap_ms", "allowed_lateness_ms"):
            value = getattr(self, name)
            # bool is an int subclass; a True window size is a configuration bug, not 1 ms.
            if type(value) is not int:
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {self.allowed_lateness_ms}")
        if self.kind == "tumbling":
            if self.size_ms <= 0:
                raise ValueError(f"tumbling window size_ms must be > 0, got {self.size_ms}")
        elif self.kind == "sliding":
            if self.size_ms <= 0 or self.slide_ms <= 0:
                raise ValueError(
                    f"sliding window needs size_ms > 0 and slide_ms > 0, got {self.size_ms}, {self.slide_ms}"
                )
            if self.slide_ms > self.size_ms:
                # Larger slides would leave gaps that no window covers: records there would be
                # silently dropped, which is never what a user means.
                raise ValueError(f"slide_ms ({self.slide_ms}) must be <= size_ms ({self.size_ms})")
            per_record = sliding_windows_per_record(self.size_ms, self.slide_ms)
            if per_record > MAX_SLIDING_WINDOWS:
                raise ValueError(
                    f"a sliding window of size_ms {self.size_ms} and slide_ms {self.slide_ms} puts each "
                    f"record in {per_record} windows; at most {MAX_SLIDING_WINDOWS}"
                )
        elif self.kind == "session":
            if self.gap_ms <= 0:
                raise ValueError(f"session gap_ms must be > 0, got {self.gap_ms}")
        else:
            raise ValueError(f"unknown window kind {self.kind!r}; expected one of {WINDOW_KINDS}")


MAX_SLIDING_WINDOWS = 10_000
"""Most windows a sliding window puts one record in (``ceil(size / slide)``). Each costs a state
entry and an update per record: a day sliding by a millisecond (86.4 million per record) would
stall the worker on its first record and fill its memory, so such a spec is refused up front."""


def sliding_windows_per_record(size_ms: int, slide_ms: int) -> int:
    """How many sliding windows hold one record at most."""
    return -(-size_ms // slide_ms)


def _required(value: int | None, name: str) -> int:
    if value is None:
        raise ValueError(f"{name} is required for this window kind")
    return value


def assign_tumbling(ts: int, size: int) -> int:
    """Start of the tumbling window of length ``size`` containing ``ts``.

    Floor semantics, also for negative times: ``assign_tumbling(-1, 10) == -10``.
    """
    # Python's % with a positive divisor is already a floor modulo.
    return ts - ts % size


def assign_sliding(ts: int, size: int, slide: int) -> list[int]:
    """Ascending starts ``s`` (multiples of ``slide``) of every sliding window with ``s <= ts < s + size``.

    ``size`` need not be a multiple of ``slide``; requires ``0 < slide <= size``.
    """
    lo = ts - size + 1
    first = lo + (-lo) % slide  # smallest multiple of slide >= lo
    return list(range(first, ts + 1, slide))


def closes_at(end: int, allowed_lateness: int) -> int:
    """The smallest watermark at which the window ending (exclusively) at ``end`` is closed."""
    return end - 1 + allowed_lateness


def is_closed(end: int, watermark: int, allowed_lateness: int) -> bool:
    """Whether a window ending at ``end`` is closed at ``watermark``: ``W >= end - 1 + allowed_lateness``."""
    return watermark >= end - 1 + allowed_lateness


def merge_session(sessions: list[Interval], start: int, end: int) -> tuple[Interval, list[Interval]]:
    """Insert ``[start, end)`` into ``sessions``, merging every interval it overlaps or touches.

    ``sessions`` is one key's list of open sessions: sorted by start and pairwise apart (``[0, 5)``
    and ``[5, 9)`` touch, so they merge, as Flink's session windows do). It is updated in place
    and keeps that invariant. Returns the resulting interval and the intervals it absorbed
    (ascending; empty when the new interval met nothing). Because the existing intervals are
    apart, the ones a new interval meets are contiguous, and the union of meeting intervals is
    again one interval, so a single pass resolves chains of merges.
    """
    # The first interval that can meet it is the first one ending at or after `start`; ends are
    # sorted too because the intervals are apart and sorted by start.
    i = bisect_left(sessions, start, key=_end)
    j = i
    n = len(sessions)
    while j < n and sessions[j][0] <= end:
        j += 1
    if i == j:
        sessions.insert(i, (start, end))
        return (start, end), []
    absorbed = sessions[i:j]
    merged = (min(start, absorbed[0][0]), max(end, absorbed[-1][1]))
    sessions[i:j] = [merged]
    return merged, absorbed
