"""Tests of weir.join_stage with a hand-written fake behind the joins: what the operator behind
sees (each record with the watermark it arrived with; advanced no further than the tables'
time), lookups by a record field, and the stores checkpointed as one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import pytest

from weir.join import JoinOperator, JoinSpec
from weir.join_stage import JoinStage, JoinStep, StoreSet
from weir.join_table import JoinStore
from weir.records import DeadLetter


class Behind:
    """The operator behind the joins: records what it is given."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict[str, Any], int]] = []
        self.advanced: list[int] = []
        self.firing = False

    def process(self, key: str, ts: int, record: dict[str, Any], wm: int) -> bool:
        self.records.append((key, ts, record, wm))
        return True

    def advance(self, wm: int, limit: int) -> list[Any]:
        self.advanced.append(wm)
        return []


def stage(
    tmp_path: Path, key_field: str | None = None, kind: str = "inner"
) -> tuple[JoinStage, Behind, list[Any]]:
    spec = JoinSpec(("price",), kind, "p_")  # type: ignore[arg-type]
    step = JoinStep(0, "catalog", key_field, "global", spec, 0)
    op = JoinOperator(spec, JoinStore(tmp_path / "join"), [0])
    behind = Behind()
    dead: list[Any] = []
    js = JoinStage([(step, op)], cast(Any, behind), on_dead=lambda e, k, r: dead.append((e.reason, k, r)))  # type: ignore[attr-defined]
    return js, behind, dead


def test_a_held_record_reaches_the_operator_behind_with_the_watermark_it_arrived_with(tmp_path: Path) -> None:
    js, behind, _dead = stage(tmp_path)
    op = js.joins[0][1]
    op.table_record(0, 0, "k", 100, {"price": 1})

    assert js.process("k", 150, {"id": 1}, 50)  # after the table's time (100): held
    js.advance(200, 10)
    assert behind.records == []
    assert behind.advanced == [100]  # not past the table's time: the held record's window stays open

    op.table_record(0, 1, "k", 300, {"price": 2})
    js.advance(250, 10)
    assert behind.records == [("k", 150, {"id": 1, "p_price": 1}, 50)]
    assert behind.advanced == [100, 250]


def test_a_lookup_by_a_record_field_keeps_the_records_key(tmp_path: Path) -> None:
    js, behind, _dead = stage(tmp_path, key_field="product")
    js.joins[0][1].table_record(0, 0, "apple", 10, {"price": 3})
    js.joins[0][1].table_record(0, 1, "pear", 30, {"price": 4})  # the table's time passes 20

    js.process("user-1", 20, {"product": "apple"}, 0)

    assert behind.records == [("user-1", 20, {"product": "apple", "p_price": 3}, 0)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({}, "join key field 'product' (steps[0].join.key) is missing"),
        (
            {"product": 1.5},
            "join key field 'product' (steps[0].join.key) must be a string or integer, not float",
        ),
    ],
)
def test_a_record_without_a_usable_key_field_is_dead_lettered_before_it_is_held(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    js, _behind, _dead = stage(tmp_path, key_field="product")

    with pytest.raises(DeadLetter, match=re.escape(message)):
        js.process("u", 20, record, 0)
    assert js.held == 0


def test_an_inner_miss_is_dead_lettered_as_join_miss_with_the_record_unchanged(tmp_path: Path) -> None:
    js, behind, dead = stage(tmp_path)
    js.joins[0][1].table_record(0, 0, "other", 100, {"price": 1})

    js.process("k", 50, {"id": 7}, 0)

    assert behind.records == []
    assert dead == [("join_miss", "k", {"id": 7})]


def test_a_store_set_checkpoints_its_parts_as_one_flat_directory_and_unpacks_them(tmp_path: Path) -> None:
    a, b = JoinStore(tmp_path / "db"), JoinStore(tmp_path / "db" / "part1")
    a.hold(1, 0, "k", {"a": 1})
    b.hold(2, 0, "k", {"b": 2})
    stores = StoreSet([a, b])
    stores.flush({"offset": 5})
    snap = stores.checkpoint(tmp_path / "snap")
    stores.close()

    assert all(f.is_file() for f in snap.iterdir())
    assert any(f.name.startswith("part1-") for f in snap.iterdir())
    StoreSet.unpack(snap)
    restored = StoreSet([JoinStore(snap), JoinStore(snap / "part1")])
    assert restored.progress == {"offset": 5}
    assert [s.held for s in restored.parts] == [1, 1]  # type: ignore[union-attr]
    restored.close()


def test_a_store_set_whose_parts_were_flushed_apart_claims_no_progress(tmp_path: Path) -> None:
    a, b = JoinStore(tmp_path / "db"), JoinStore(tmp_path / "db" / "part1")
    StoreSet([a, b]).flush({"offset": 5})
    b.flush({"offset": 6})

    assert StoreSet([a, b]).progress is None
    a.close()
    b.close()


def test_a_record_that_cannot_be_held_is_dead_lettered_not_a_crash(tmp_path: Path) -> None:
    js, _behind, _dead = stage(tmp_path)  # the table is empty: every record is held

    with pytest.raises(DeadLetter, match="cannot be held for the join"):
        js.process("k", 5, {"tags": {"a", "b"}}, 0)  # a set (from a map step) is not JSON
    assert js.held == 0
