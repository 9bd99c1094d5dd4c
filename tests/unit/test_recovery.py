"""Which state a starting worker restores, per partition (weir.recovery.choose)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from weir.recovery import ReplayRefused, RestoreSourceUnusable, choose
from weir.state_migration import StateShapeMismatch


@dataclass(frozen=True)
class Snap:
    id: str
    created_ms: int
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def progress(self, partition: str) -> Mapping[str, Any] | None:
        return self.parts.get(partition)


def snap(sid: str, t: int, offset: int, wm: int = 0) -> Snap:
    return Snap(sid, t, {"t/0": {"offset": offset, "wm": wm}})


C1, C2, C3 = snap("c1", 1, 100, 10), snap("c2", 2, 200, 20), snap("c3", 3, 300, 30)


def test_nothing_committed_and_nothing_given_starts_fresh() -> None:
    assert choose("t/0", None, [C1, C2]).how == "fresh"


def test_the_checkpoint_at_the_committed_offset_is_restored_not_a_newer_one() -> None:
    # c3 was uploaded but its transaction never committed: restoring it would skip output.
    r = choose("t/0", 200, [C3, C1, C2])
    assert (r.how, r.source, r.offset) == ("exact", C2, 200)


def test_local_state_at_the_committed_offset_needs_no_download() -> None:
    r = choose("t/0", 200, [C1, C2], local=(200, "c2"), committed_id="c2")
    assert (r.how, r.offset) == ("local", 200)
    # Local state ahead of the commit (snapshot taken, transaction not committed) is not used.
    assert choose("t/0", 200, [C1, C2, C3], local=(300, "c3"), committed_id="c2").source == C2


def test_the_committed_id_tells_apart_snapshots_at_the_same_offset() -> None:
    # An idle partition's watermark moved between c2 and c2b without input: same offset, and
    # only c2 committed. c2b's state lacks windows whose results were never committed.
    c2b = snap("c2b", 4, 200, 99)
    r = choose("t/0", 200, [C1, C2, c2b], committed_id="c2")
    assert (r.how, r.source) == ("exact", C2)
    assert choose("t/0", 200, [C2, c2b], local=(200, "c2b"), committed_id="c2").how == "exact"


def test_a_corrupt_committed_snapshot_falls_back_to_an_older_one_and_lifts_the_watermark() -> None:
    c2a = snap("c2a", 2, 200, 15)
    c2 = snap("c2", 3, 200, 20)
    r = choose("t/0", 200, [C1, c2a, c2], committed_id="c2", usable=lambda s: s.id != "c2")
    assert (r.how, r.source, r.offset, r.replay_until, r.replay_wm) == ("replay", c2a, 200, 200, 20)


def test_a_corrupt_checkpoint_at_the_committed_offset_falls_back_to_replay_from_an_older_one() -> None:
    tried = []

    def usable(s: Any) -> bool:
        tried.append(s.id)
        return bool(s.id != "c2")

    r = choose("t/0", 200, [C1, C2, C3], usable=usable, committed_id="c2")
    assert (r.how, r.source, r.offset, r.replay_until, r.replay_wm) == ("replay", C1, 100, 200, 20)
    assert tried == ["c2", "c1"]  # c3 (ahead of the commit) is never considered


def test_no_usable_checkpoint_replays_from_the_start_position() -> None:
    r = choose("t/0", 200, [C2], usable=lambda s: False)
    assert (r.how, r.source, r.offset, r.replay_until) == ("replay", None, None, 200)


def test_an_explicit_savepoint_wins_until_a_checkpoint_after_it_matches_the_commit() -> None:
    sp = snap("sp", 5, 150)
    first = choose("t/0", 200, [C1, C2], restore_from=[sp])
    assert (first.how, first.source, first.offset) == ("exact", sp, 150)
    after = snap("c9", 9, 400)
    resumed = choose("t/0", 400, [C1, C2, after], restore_from=[sp])
    assert (resumed.how, resumed.source) == ("exact", after)


def test_after_a_savepoint_the_committed_id_picks_among_checkpoints_at_the_same_offset() -> None:
    # An idle partition: two checkpoints after the savepoint share its offset; c7 committed, c8 not.
    sp, c7, c8 = snap("sp", 5, 400, 40), snap("c7", 7, 400, 70), snap("c8", 8, 400, 80)
    assert choose("t/0", 400, [c7, c8], restore_from=[sp], committed_id="c7").source == c7
    # The commit still names the savepoint itself: nothing after it was committed.
    assert choose("t/0", 400, [c7, c8], restore_from=[sp], committed_id="sp").source == sp


def test_a_partition_missing_from_the_savepoint_follows_the_checkpoints() -> None:
    sp = Snap("sp", 5, {"t/1": {"offset": 1}})
    assert choose("t/0", 200, [C2], restore_from=[sp]).source == C2


def test_a_corrupt_explicit_savepoint_is_an_error_not_a_silent_fresh_start() -> None:
    with pytest.raises(RestoreSourceUnusable):
        choose("t/0", None, [], restore_from=[snap("sp", 5, 150)], usable=lambda s: False)


# -- a partition behind a join (replayable=False) ------------------------------------------
def test_a_join_partition_whose_committed_checkpoint_is_corrupt_is_refused_naming_the_ways_out() -> None:
    with pytest.raises(ReplayRefused) as refused:
        choose("t/0", 200, [C1, C2], usable=lambda s: s.id != "c2", committed_id="c2", replayable=False)
    message = str(refused.value)
    assert message.startswith("t/0: cannot restore the state committed at offset 200")
    assert "--restore-from" in message and "--allow-state-reset" in message and "\n" not in message
    assert isinstance(refused.value, StateShapeMismatch)  # weir run exits 2 for it


def test_a_join_partition_with_no_checkpoint_left_is_refused_rather_than_replayed_from_the_start() -> None:
    with pytest.raises(ReplayRefused, match="its checkpoint c2 is gone"):
        choose("t/0", 200, [C1], usable=lambda s: s.id == "c1", committed_id="c2", replayable=False)
    with pytest.raises(ReplayRefused, match="checkpoint c2 is corrupt or incomplete"):
        choose("t/0", 200, [C2], usable=lambda s: False, replayable=False)


def test_a_join_partition_never_downloads_an_older_checkpoint_it_would_not_use() -> None:
    tried: list[str] = []

    def usable(s: Any) -> bool:
        tried.append(s.id)
        return bool(s.id != "c2")

    with pytest.raises(ReplayRefused):
        choose("t/0", 200, [C1, C2, C3], usable=usable, committed_id="c2", replayable=False)
    assert tried == ["c2"]


def test_a_join_partition_with_reset_allowed_starts_empty_at_the_committed_offset_and_watermark() -> None:
    r = choose(
        "t/0", 200, [C1, C2], usable=lambda s: s.id != "c2", committed_id="c2", replayable=False,
        allow_reset=True,
    )
    # Not C1's offset: nothing committed is written again; C2's manifest gives the watermark.
    assert (r.how, r.source, r.offset, r.replay_until) == ("reset", C2, 200, None)
    gone = choose("t/0", 200, [C1], committed_id="c2", replayable=False, allow_reset=True)
    assert (gone.how, gone.source, gone.offset) == ("reset", None, 200)


def test_a_join_partition_whose_committed_snapshot_has_another_shape_is_refused_not_replayed() -> None:
    other = snap("c2", 2, 200, 20)
    with pytest.raises(ReplayRefused, match="another state shape"):
        choose(
            "t/0", 200, [C1, other], committed_id="c2", compatible=lambda s: s.id != "c2", replayable=False
        )


def test_a_join_partition_restores_its_committed_state_exactly_as_any_other() -> None:
    exact = choose("t/0", 200, [C1, C2, C3], committed_id="c2", replayable=False)
    assert (exact.how, exact.source, exact.offset) == ("exact", C2, 200)
    local = choose("t/0", 200, [C1, C2], local=(200, "c2"), committed_id="c2", replayable=False)
    assert local.how == "local"
    sp = snap("sp", 5, 150)
    assert choose("t/0", 200, [C1, C2], restore_from=[sp], replayable=False).source == sp
