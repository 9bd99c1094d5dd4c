"""Window assignment and session merging against brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weir.window_shapes import (
    WindowShape,
    assign_sliding,
    assign_tumbling,
    closes_at,
    is_closed,
    merge_session,
)

SETTINGS = settings(deadline=None, max_examples=200)

times = st.integers(min_value=-(10**13), max_value=10**13)


@SETTINGS
@given(ts=times, size=st.integers(min_value=1, max_value=10**7))
def test_tumbling_assignment_is_the_aligned_window_containing_the_timestamp(ts: int, size: int) -> None:
    start = assign_tumbling(ts, size)
    assert start % size == 0
    assert start <= ts < start + size


def test_tumbling_assignment_floors_negative_times() -> None:
    assert assign_tumbling(-1, 10) == -10
    assert assign_tumbling(-10, 10) == -10
    assert assign_tumbling(-11, 10) == -20
    assert assign_tumbling(0, 10) == 0
    assert assign_tumbling(9, 10) == 0


@SETTINGS
@given(
    ts=st.integers(min_value=-5000, max_value=5000),
    slide=st.integers(min_value=1, max_value=50),
    extra=st.integers(min_value=0, max_value=120),
)
def test_sliding_assignment_matches_enumerating_every_window_start(ts: int, slide: int, extra: int) -> None:
    size = slide + extra  # any size >= slide, not only multiples of it
    expected = [s for s in range(ts - size - slide, ts + slide + 1) if s % slide == 0 and s <= ts < s + size]
    assert assign_sliding(ts, size, slide) == expected


def test_sliding_windows_need_not_be_a_multiple_of_the_slide() -> None:
    # size 5, slide 3: windows [0,5), [3,8), [6,11), ...
    assert assign_sliding(4, 5, 3) == [0, 3]
    assert assign_sliding(5, 5, 3) == [3]
    assert assign_sliding(-1, 5, 3) == [-3]
    assert assign_sliding(7, 10, 10) == [0]


def test_a_window_closes_when_the_watermark_reaches_its_last_millisecond_plus_lateness() -> None:
    assert closes_at(10, 0) == 9
    assert not is_closed(10, 8, 0)
    assert is_closed(10, 9, 0)
    assert not is_closed(10, 13, 5)
    assert is_closed(10, 14, 5)


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("tumbling", {"size_ms": 0}, "size_ms must be > 0"),
        ("tumbling", {}, "size_ms is required"),
        ("sliding", {"size_ms": 10, "slide_ms": 11}, "must be <= size_ms"),
        ("sliding", {"size_ms": 10, "slide_ms": 0}, "slide_ms > 0"),
        ("sliding", {"size_ms": 86_400_000, "slide_ms": 1}, "puts each record in 86400000 windows"),
        ("sliding", {"size_ms": 20_001, "slide_ms": 2}, "puts each record in 10001 windows"),
        ("session", {"gap_ms": -1}, "gap_ms must be > 0"),
        ("session", {"gap_ms": 5, "allowed_lateness_ms": -1}, "allowed_lateness_ms must be >= 0"),
        ("session", {"gap_ms": True}, "must be an int"),
        ("hopping", {"size_ms": 5}, "unknown window kind"),
    ],
)
def test_window_shapes_reject_nonsense_parameters(kind: str, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowShape.of(kind, **kwargs)


def test_a_sliding_window_may_put_a_record_in_at_most_ten_thousand_windows() -> None:
    assert WindowShape.of("sliding", size_ms=10_000, slide_ms=1).slide_ms == 1
    assert WindowShape.of("sliding", size_ms=19_999, slide_ms=2).size_ms == 19_999  # 10,000 windows


def test_window_shapes_ignore_parameters_their_kind_does_not_use() -> None:
    shape = WindowShape.of("tumbling", size_ms=10, slide_ms=999, gap_ms=-3)
    assert shape == WindowShape("tumbling", size_ms=10)


# -- session merging ----------------------------------------------------------------------


def _components(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Connected components of the overlaps-or-touches graph, by brute force (union-find)."""
    parent = list(range(len(intervals)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, (s1, e1) in enumerate(intervals):
        for j, (s2, e2) in enumerate(intervals):
            if s1 <= e2 and s2 <= e1:
                parent[root(i)] = root(j)
    groups: dict[int, list[tuple[int, int]]] = {}
    for i, iv in enumerate(intervals):
        groups.setdefault(root(i), []).append(iv)
    return sorted((min(s for s, _ in g), max(e for _, e in g)) for g in groups.values())


intervals = st.lists(
    st.tuples(st.integers(min_value=-100, max_value=100), st.integers(min_value=1, max_value=30)).map(
        lambda t: (t[0], t[0] + t[1])
    ),
    max_size=40,
)


@SETTINGS
@given(intervals)
def test_merging_sessions_in_any_arrival_order_gives_the_connected_components(
    ivs: list[tuple[int, int]],
) -> None:
    sessions: list[tuple[int, int]] = []
    for start, end in ivs:
        before = list(sessions)
        merged, absorbed = merge_session(sessions, start, end)
        # What was absorbed is exactly what the new interval intersects, and it left the list.
        assert absorbed == [(s, e) for s, e in before if s <= end and start <= e]
        assert merged == (min([start, *(s for s, _ in absorbed)]), max([end, *(e for _, e in absorbed)]))
        assert sorted(set(before) - set(absorbed) | {merged}) == sessions
        # The invariant: sorted and pairwise apart.
        assert all(a[1] < b[0] for a, b in itertools.pairwise(sessions))
    assert sessions == _components(ivs)


def test_a_bridging_session_merges_a_chain_of_sessions() -> None:
    sessions: list[tuple[int, int]] = []
    merge_session(sessions, 0, 5)
    merge_session(sessions, 10, 15)
    merge_session(sessions, 20, 25)
    assert sessions == [(0, 5), (10, 15), (20, 25)]
    merged, absorbed = merge_session(sessions, 4, 21)
    assert merged == (0, 25)
    assert absorbed == [(0, 5), (10, 15), (20, 25)]
    assert sessions == [(0, 25)]


def test_sessions_that_only_touch_merge_as_in_flink() -> None:
    sessions: list[tuple[int, int]] = []
    merge_session(sessions, 5, 10)
    merged, absorbed = merge_session(sessions, 0, 5)
    assert (merged, absorbed) == ((0, 10), [(5, 10)])
    merge_session(sessions, 11, 12)
    assert sessions == [(0, 10), (11, 12)]
    merged, absorbed = merge_session(sessions, 10, 11)
    assert (merged, absorbed) == ((0, 12), [(0, 10), (11, 12)])
