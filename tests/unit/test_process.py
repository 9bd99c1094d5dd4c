"""Keyed process functions on a real ProcessStore: typed state, event-time TTL, timers, atomic calls."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import weir
from weir.examples import dedup
from weir.functions import FunctionError, FunctionFailed, FunctionNotFound
from weir.process import Context, KeyedState, OnError, Output, ProcessFunction, ProcessOperator, open_process
from weir.process_store import ProcessStore
from weir.state_sst import export_sst, import_sst
from weir.tasks import NO_WATERMARK

REF = "tests.unit.test_process:Fn"


class Fn(ProcessFunction):
    """Driven by the record: ``op`` names what to do, so each test reads as a script."""

    def open(self, state: KeyedState) -> None:
        self.value = state.value("value")
        self.list = state.list("list")
        self.map = state.map("map")
        self.short = state.value("short", ttl=500)
        self.short_map = state.map("short_map", ttl="1s")

    def process(self, record: dict[str, Any], ctx: Context) -> Any:
        op = record["op"]
        if op == "set":
            self.value.set(record["v"])
        elif op == "get":
            return {"value": self.value.get(), "list": self.list.get(), "map": self.map.items(),
                    "short": self.short.get(), "short_map": self.short_map.items()}
        elif op == "clear":
            self.value.clear()
            self.list.clear()
            self.map.clear()
        elif op == "append":
            self.list.append(record["v"])
        elif op == "put":
            self.map.put(record["k"], record["v"])
        elif op == "remove":
            self.map.remove(record["k"])
        elif op == "short":
            self.short.set(record["v"])
            self.short_map.put("k", record["v"])
        elif op == "timer":
            for ts in record["at"]:
                ctx.timers.register(ts)
        elif op == "untimer":
            ctx.timers.delete(record["at"])
        elif op == "fail":
            return self._fail(record, ctx)
        elif op == "unencodable":
            self.value.set(record["v"])
            self.map.put("x", float("nan"))
        elif op == "emit":
            return record["out"]
        elif op == "yield":
            return iter(record["out"])
        return None

    def _fail(self, record: dict[str, Any], ctx: Context) -> Iterator[dict[str, Any]]:
        """Change everything, yield, then raise (lazily: the operator runs it inside the call)."""
        self.value.set("changed")
        self.list.append("changed")
        self.map.put("changed", 1)
        ctx.timers.register(record.get("at", 1))
        yield {"never": "emitted"}
        raise ValueError("boom")

    def on_timer(self, timestamp: int, ctx: Context) -> Iterator[dict[str, Any]]:
        if self.value.get() == "explode":
            self.list.append("from failing timer")
            ctx.timers.register(timestamp + 1000)
            raise RuntimeError("timer boom")
        self.list.append(timestamp)
        yield {"timer": timestamp, "key": ctx.key, "wm": ctx.watermark}


def _op(path: Path, on_error: OnError = "deadLetter") -> ProcessOperator:
    return ProcessOperator(Fn, REF, on_error, ProcessStore(path))


def _get(op: ProcessOperator, key: str, wm: int = 0, ts: int = 0) -> dict[str, Any]:
    op.process(key, ts, {"op": "get"}, wm)
    (out,) = op.take()
    assert out.error is None and out.record is not None
    return out.record


def test_value_list_and_map_state_are_kept_per_key(tmp_path: Path) -> None:
    op = _op(tmp_path)
    for key, n in (("a", 1), ("b", 2)):
        op.process(key, 0, {"op": "set", "v": {"n": n}}, 0)
        op.process(key, 0, {"op": "append", "v": n}, 0)
        op.process(key, 0, {"op": "append", "v": [n, n]}, 0)
        op.process(key, 0, {"op": "put", "k": "x", "v": n}, 0)
        op.process(key, 0, {"op": "put", "k": 7, "v": "seven"}, 0)
    op.process("b", 0, {"op": "remove", "k": "x"}, 0)
    assert op.take() == []
    assert _get(op, "a") == {"value": {"n": 1}, "list": [1, [1, 1]], "map": [("x", 1), (7, "seven")],
                             "short": None, "short_map": []}
    assert _get(op, "b")["map"] == [(7, "seven")]  # in the order of the keys' encoding
    assert _get(op, "c") == {"value": None, "list": [], "map": [], "short": None, "short_map": []}
    assert op.open_windows == 2
    op.process("a", 0, {"op": "clear"}, 0)
    assert _get(op, "a")["value"] is None and _get(op, "a")["map"] == []
    assert op.open_windows == 1


def test_map_items_merge_flushed_and_unflushed_entries(tmp_path: Path) -> None:
    op = _op(tmp_path)
    for k in ("b", "d"):
        op.process("u", 0, {"op": "put", "k": k, "v": 1}, 0)
    op._store.flush({"offset": 1})
    op.process("u", 0, {"op": "put", "k": "a", "v": 2}, 0)
    op.process("u", 0, {"op": "put", "k": "d", "v": 3}, 0)
    op.process("u", 0, {"op": "remove", "k": "b"}, 0)
    assert _get(op, "u")["map"] == [("a", 2), ("d", 3)]


def test_an_entry_expires_once_the_watermark_reaches_its_write_time_plus_ttl(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 1_000, {"op": "short", "v": "x"}, 0)  # ttl 500 and 1 s
    assert _get(op, "k", wm=1_499)["short"] == "x"
    assert _get(op, "k", wm=1_499)["short_map"] == [("k", "x")]
    assert _get(op, "k", wm=1_500)["short"] is None
    assert _get(op, "k", wm=1_999)["short_map"] == [("k", "x")]
    assert _get(op, "k", wm=2_000)["short_map"] == []
    assert op.open_windows == 0  # reading them removed them


def test_expired_entries_are_removed_by_advance_also_after_a_flush(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("a", 1_000, {"op": "short", "v": 1}, 0)
    op._store.flush({"offset": 1})  # the TTL index is now on disk
    op.process("b", 1_200, {"op": "short", "v": 2}, 0)  # and in memory
    op.advance(1_600, limit=100)  # a's value (1 500) goes, b's (1 700) and both maps (ttl 1 s) stay
    assert op.open_windows == 2 and not op.firing
    assert _get(op, "b", wm=1_600)["short"] == 2
    calls = 0
    while True:
        op.advance(2_200, limit=1)
        calls += 1
        if not op.firing:
            break
    assert calls == 3 and op.open_windows == 0
    op._store.flush({"offset": 2})
    op._store.close()
    assert _op(tmp_path).open_windows == 0


def test_a_rewrite_restarts_the_ttl(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 1_000, {"op": "short", "v": "old"}, 0)
    op.process("k", 1_400, {"op": "short", "v": "new"}, 0)
    op.advance(1_600, limit=100)
    assert op.open_windows == 1
    assert _get(op, "k", wm=1_899)["short"] == "new"
    assert _get(op, "k", wm=1_900)["short"] is None


def test_timers_fire_once_per_key_and_timestamp_in_timestamp_then_key_order(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("b", 0, {"op": "timer", "at": [20, 10, 10]}, 0)
    op.process("a", 0, {"op": "timer", "at": [20, 30]}, 0)
    op.process("c", 0, {"op": "timer", "at": [10]}, 0)
    assert op.timer_entries == 5
    assert op.advance(9, limit=100) == []
    fired = op.advance(20, limit=100)
    assert [(o.record or {})["timer"] for o in fired] == [10, 10, 20, 20]
    assert [o.key for o in fired] == ["b", "c", "a", "b"]
    assert all((o.record or {})["wm"] == 20 for o in fired)
    assert op.advance(25, limit=100) == []
    assert [o.key for o in op.advance(30, limit=100)] == ["a"]
    assert op.timer_entries == 0


def test_advance_fires_at_most_limit_timers_and_says_more_are_due(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 0, {"op": "timer", "at": [1, 2, 3, 50]}, 0)
    assert [(o.record or {})["timer"] for o in op.advance(10, limit=2)] == [1, 2]
    assert op.firing
    assert [(o.record or {})["timer"] for o in op.advance(10, limit=2)] == [3]
    assert not op.firing


def test_a_deleted_timer_does_not_fire(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 0, {"op": "timer", "at": [5, 6]}, 0)
    op.process("k", 0, {"op": "untimer", "at": 5}, 0)
    op.process("k", 0, {"op": "untimer", "at": 99}, 0)  # none: a no-op
    assert [(o.record or {})["timer"] for o in op.advance(10, limit=10)] == [6]


def test_state_and_timers_survive_a_flush_and_reopen(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 0, {"op": "set", "v": [1, "two"]}, 0)
    op.process("k", 0, {"op": "put", "k": "m", "v": {"x": 1}}, 0)
    op.process("k", 0, {"op": "timer", "at": [100]}, 0)
    op.process("j", 0, {"op": "timer", "at": [50]}, 0)
    op._store.flush({"offset": 7, "watermark": 0})
    op._store.close()
    again = _op(tmp_path)
    assert again._store.progress == {"offset": 7, "watermark": 0}
    assert again.timer_entries == 2 and again.open_windows == 1
    assert _get(again, "k")["value"] == [1, "two"] and _get(again, "k")["map"] == [("m", {"x": 1})]
    assert [o.key for o in again.advance(100, limit=10)] == ["j", "k"]


def test_a_change_after_the_last_flush_is_absent_after_a_reopen(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 0, {"op": "set", "v": "flushed"}, 0)
    op._store.flush({"offset": 1})
    op.process("k", 0, {"op": "set", "v": "lost"}, 0)
    op.process("n", 0, {"op": "append", "v": "lost"}, 0)
    op.process("n", 0, {"op": "timer", "at": [5]}, 0)
    op._store.close()  # a crash: the pending changes die with the process
    again = _op(tmp_path)
    assert again._store.progress == {"offset": 1}
    assert _get(again, "k")["value"] == "flushed"
    assert _get(again, "n")["list"] == [] and again.timer_entries == 0 and again.open_windows == 1


def test_a_checkpoint_opens_as_a_store_holding_the_last_flush(tmp_path: Path) -> None:
    op = _op(tmp_path / "db")
    op.process("k", 0, {"op": "set", "v": 1}, 0)
    op._store.flush({"offset": 3})
    op.process("k", 0, {"op": "set", "v": 2}, 0)
    op._store.checkpoint(tmp_path / "cp")
    with pytest.raises(FileExistsError):
        op._store.checkpoint(tmp_path / "cp")
    copy = _op(tmp_path / "cp")
    assert copy._store.progress == {"offset": 3} and _get(copy, "k")["value"] == 1


def test_state_and_timers_travel_through_a_savepoint_sst_into_a_fresh_store(tmp_path: Path) -> None:
    op = _op(tmp_path / "db")
    op.process("k", 1_000, {"op": "short", "v": "ttl"}, 0)
    op.process("k", 0, {"op": "put", "k": "m", "v": [1]}, 0)
    op.process("j", 0, {"op": "timer", "at": [9_000]}, 0)
    op._store.flush({"offset": 5})
    op._store.checkpoint(tmp_path / "cp")
    assert export_sst(tmp_path / "cp", tmp_path / "sp" / "state.sst") > 0
    import_sst(tmp_path / "restored", tmp_path / "sp" / "state.sst")
    again = _op(tmp_path / "restored")
    assert again._store.progress == {"offset": 5} and again.timer_entries == 1 and again.open_windows == 1
    assert _get(again, "k", wm=1_499) == {"value": None, "list": [], "map": [("m", [1])], "short": "ttl",
                                          "short_map": [("k", "ttl")]}
    assert [o.key for o in again.advance(9_000, limit=10)] == ["j"]


def test_a_raising_call_leaves_no_state_timer_or_output_and_is_a_function_error(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 0, {"op": "set", "v": "kept"}, 0)
    op.process("k", 0, {"op": "timer", "at": [1]}, 0)
    op._store.flush({"offset": 1})
    op.process("k", 0, {"op": "emit", "out": {"before": 1}}, 0)
    with pytest.raises(FunctionError) as err:
        op.process("k", 0, {"op": "fail", "at": 2}, 0)
    assert err.value.reason == "function_error"
    assert err.value.detail == f"{REF}: ValueError: boom"
    with pytest.raises(FunctionError):
        op.process("new", 0, {"op": "fail"}, 0)
    assert op.take() == [Output("k", {"before": 1}, None)]
    assert _get(op, "k") == {"value": "kept", "list": [], "map": [], "short": None, "short_map": []}
    assert op.open_windows == 1 and op.timer_entries == 1
    assert [(o.record or {})["timer"] for o in op.advance(10, limit=10)] == [1]


def test_a_raising_on_timer_gives_an_error_output_undoes_its_changes_and_is_consumed(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("bad", 0, {"op": "set", "v": "explode"}, 0)
    op.process("bad", 0, {"op": "timer", "at": [5]}, 0)
    op.process("good", 0, {"op": "timer", "at": [6]}, 0)
    out = op.advance(10, limit=10)
    good = {"timer": 6, "key": "good", "wm": 10}
    assert [(o.key, o.record) for o in out] == [("bad", None), ("good", good)]
    assert out[0].error is not None and out[0].error.detail == f"{REF}: RuntimeError: timer boom"
    assert _get(op, "bad", wm=10)["list"] == []
    assert op.timer_entries == 0 and op.advance(10_000, limit=10) == []


def test_on_error_fail_raises_function_failed_from_process_and_on_timer(tmp_path: Path) -> None:
    op = _op(tmp_path, "fail")
    with pytest.raises(FunctionFailed, match="ValueError: boom"):
        op.process("k", 0, {"op": "fail"}, 0)
    with pytest.raises(FunctionFailed, match="outputs must be dicts, got int"):
        op.process("k", 0, {"op": "yield", "out": [{"a": 1}, 2]}, 0)
    assert op.take() == []
    op.process("k", 0, {"op": "set", "v": "explode"}, 0)
    op.process("k", 0, {"op": "timer", "at": [5]}, 0)
    with pytest.raises(FunctionFailed, match="RuntimeError: timer boom"):
        op.advance(5, limit=10)


@pytest.mark.parametrize("value", [float("inf"), {1: "int key"}, {"s": {1, 2}}, 2**64])
def test_a_state_value_encoding_refuses_fails_that_record_and_is_undone(
    tmp_path: Path, value: object
) -> None:
    op = _op(tmp_path)
    op.process("k", 0, {"op": "set", "v": "kept"}, 0)
    with pytest.raises(FunctionError, match="StateEncodingError"):
        op.process("k", 0, {"op": "unencodable", "v": value}, 0)
    assert _get(op, "k")["value"] == "kept"
    with pytest.raises(FunctionError, match="StateEncodingError: state value cannot be stored"):
        op.process("k", 0, {"op": "unencodable", "v": "fine"}, 0)  # the map's NaN
    assert _get(op, "k")["value"] == "kept"


def test_outputs_come_in_order_in_every_form_and_a_non_dict_is_an_error_output(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("a", 0, {"op": "emit", "out": {"n": 1}}, 0)
    op.process("b", 0, {"op": "emit", "out": [{"n": 2}, {"n": 3}]}, 0)
    op.process("c", 0, {"op": "emit", "out": None}, 0)
    op.process("d", 0, {"op": "yield", "out": [{"n": 4}, "oops", {"n": 5}]}, 0)
    op.process("e", 0, {"op": "emit", "out": 6}, 0)
    out = op.take()
    assert [(o.key, o.record) for o in out] == [
        ("a", {"n": 1}), ("b", {"n": 2}), ("b", {"n": 3}), ("d", {"n": 4}), ("d", None), ("d", {"n": 5}),
        ("e", None)]
    assert out[4].error is not None
    assert out[4].error.detail == f"{REF}: TypeError: outputs must be dicts, got str"
    assert out[6].error is not None and "got int" in out[6].error.detail
    assert op.take() == []


def test_state_and_timers_are_usable_only_inside_calls_and_declared_only_in_open(tmp_path: Path) -> None:
    op = _op(tmp_path)
    fn = op.function
    assert isinstance(fn, Fn)
    with pytest.raises(RuntimeError, match="only inside process"):
        fn.value.get()
    with pytest.raises(RuntimeError, match="only inside process"):
        op._ctx.timers.register(5)


class Quiet(ProcessFunction):
    def process(self, record: dict[str, Any], ctx: Context) -> None:
        return None


class Twice(Quiet):
    def open(self, state: KeyedState) -> None:
        state.value("x")
        state.map("x")


class BadTtl(Quiet):
    def open(self, state: KeyedState) -> None:
        state.value("x", ttl="soon")


def test_a_bad_declaration_in_open_fails_the_task_with_the_state_name(tmp_path: Path) -> None:
    with pytest.raises(FunctionFailed, match="state 'x' is declared twice"):
        ProcessOperator(Twice, "m:Twice", "deadLetter", ProcessStore(tmp_path / "a"))
    with pytest.raises(FunctionFailed, match="state 'x': ttl must be a duration"):
        ProcessOperator(BadTtl, "m:BadTtl", "deadLetter", ProcessStore(tmp_path / "b"))


def test_open_process_loads_the_class_by_reference_and_refuses_other_callables(tmp_path: Path) -> None:
    op = open_process(REF, "deadLetter", tmp_path / "ok")
    assert isinstance(op.function, Fn)
    with pytest.raises(FunctionNotFound, match=r"not a subclass of weir\.ProcessFunction"):
        open_process("json:dumps", "deadLetter", tmp_path / "no")
    with pytest.raises(FunctionNotFound, match=r"does not define process\(record, ctx\)"):
        ProcessOperator(ProcessFunction, "m:Base", "deadLetter", ProcessStore(tmp_path / "base"))
    with pytest.raises(ValueError, match="onError"):
        ProcessOperator(Fn, REF, "ignore", ProcessStore(tmp_path / "x"))  # type: ignore[arg-type]


def test_memory_used_counts_pending_changes_and_a_flush_releases_them(tmp_path: Path) -> None:
    op = _op(tmp_path)
    store = op._store
    assert store.memory_used() == (0, 0)
    for i in range(200):
        op.process(f"k{i}", 1_000, {"op": "short", "v": "x" * 100}, 0)
    index, pending = store.memory_used()
    assert index > 0 and 200 * 100 < pending < 200 * 2_000
    store.flush({"offset": 1})
    assert store.memory_used() == (0, 0)
    store._db.flush(wait=True)
    assert 0 < store.size_bytes() < 1 << 20  # compressed: the values repeat


def test_the_user_api_is_exported_from_weir() -> None:
    assert weir.ProcessFunction is ProcessFunction and weir.KeyedState is KeyedState
    assert {"Context", "ValueState", "ListState", "MapState", "Timers"} <= set(weir.__all__)


def _events(seed: int) -> list[tuple[str, int, dict[str, Any]]]:
    """In event-time order; repeats come within 30 s of the first (inside the 1 h TTL)."""
    rng = random.Random(seed)
    out = []
    ts = 1_704_067_200_000
    recent: list[tuple[str, int]] = []
    for n in range(400):
        ts += rng.randrange(0, 2_000)
        user = f"u{rng.randrange(5)}"
        recent = [(u, i) for u, i in recent if i > n - 15]
        if recent and rng.random() < 0.3:
            user, event = rng.choice(recent)
        else:
            event = n
            recent.append((user, n))
        out.append((user, ts, {"user": user, "eventId": f"e{event}", "ts": ts}))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_dedup_example_gives_its_reference_output_across_flushes_and_reopens(
    tmp_path: Path, seed: int
) -> None:
    events = _events(seed)
    got: list[Output] = []
    op = open_process("weir.examples.dedup:Dedup", "deadLetter", tmp_path)
    wm = NO_WATERMARK
    for i in range(0, len(events), 37):  # batches, as the worker gives them
        batch = events[i : i + 37]
        for key, ts, record in batch:  # the watermark each record sees, as the task core gives it
            op.process(key, ts, record, wm)
            wm = max(wm, ts - 1_000)  # maxOutOfOrderness 1 s
        got.extend(op.take())
        while True:
            got.extend(op.advance(wm, limit=3))
            if not op.firing:
                break
        if i % 3 == 0:  # a checkpoint, then a restart from it
            op._store.flush({"offset": i})
            op._store.close()
            op = open_process("weir.examples.dedup:Dedup", "deadLetter", tmp_path)
    got.extend(op.advance(2**62, limit=10_000))
    assert all(o.error is None for o in got)
    want = dedup.reference(events)
    assert sorted(repr((o.key, o.record)) for o in got) == sorted(repr(w) for w in want)
    summaries = [o.record for o in got if o.record is not None and o.record.get("kind") == "summary"]
    assert sum(s["unique"] + s["duplicates"] for s in summaries) == len(events)
    assert any(s["duplicates"] for s in summaries)


def test_the_key_layout_is_the_documented_savepoint_format(tmp_path: Path) -> None:
    op = _op(tmp_path)
    op.process("k", 1_000, {"op": "short", "v": 1}, 0)  # value "short" (ttl 500), map "short_map" (1 s)
    op.process("k", 0, {"op": "timer", "at": [7]}, 0)
    op._store.flush({"offset": 1})
    raw = dict(op._store._db.items())
    bias = 1 << 63

    def u64(t: int) -> bytes:
        return (t + bias).to_bytes(8, "big")

    value_key = b"s" + (1).to_bytes(4, "big") + b"k" + b"v" + (5).to_bytes(2, "big") + b"short"
    map_key = b"s" + (1).to_bytes(4, "big") + b"k" + b"m" + (9).to_bytes(2, "big") + b"short_map" + b'\x01"k"'
    assert raw == {
        b"\x00progress": b'{"offset":1}',
        value_key: u64(1_500) + b"\x011",
        map_key: u64(2_000) + b"\x011",
        b"n" + b"k": (2).to_bytes(4, "big"),
        b"t" + u64(7) + b"k": b"",
        b"e" + u64(1_500) + value_key: b"",
        b"e" + u64(2_000) + map_key: b"",
    }


class Model(ProcessFunction):
    """Applies random operations to state; the test mirrors them in dicts."""

    def open(self, state: KeyedState) -> None:
        self.v = state.value("v", ttl=300)
        self.m = state.map("m", ttl=500)
        self.lst = state.list("l")

    def process(self, record: dict[str, Any], ctx: Context) -> dict[str, Any]:
        for op, arg in record["ops"]:
            if op == "set":
                self.v.set(arg)
            elif op == "put":
                self.m.put(arg % 3, arg)
            elif op == "remove":
                self.m.remove(arg % 3)
            elif op == "append":
                self.lst.append(arg)
            elif op == "clear":
                self.v.clear()
                self.m.clear()
                self.lst.clear()
            elif op == "raise":
                raise RuntimeError("scripted")
        return {"v": self.v.get(), "m": dict(self.m.items()), "l": self.lst.get()}


@pytest.mark.parametrize("seed", range(6))
def test_random_calls_flushes_crashes_and_failures_match_a_dict_model(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ref = "tests.unit.test_process:Model"
    op = open_process(ref, "deadLetter", tmp_path)
    # model: (key, kind, name) -> (value, expires_at or None); "flushed" is what a crash returns to
    model: dict[tuple[str, str, Any], tuple[Any, int | None]] = {}
    flushed = dict(model)
    ts = wm = 0

    def live(key: str, wm: int) -> dict[str, Any]:
        def get(kind: str, name: Any) -> Any:
            entry = model.get((key, kind, name))
            return None if entry is None or (entry[1] is not None and entry[1] <= wm) else entry[0]
        m = {k: get("m", k) for k in range(3) if get("m", k) is not None}
        return {"v": get("v", None), "m": m, "l": get("l", None) or []}

    for _ in range(300):
        ts += rng.randrange(0, 60)
        wm = max(wm, ts - rng.randrange(0, 400))
        key = rng.choice("abc")
        ops = [(rng.choice(["set", "put", "remove", "append", "clear"]), rng.randrange(100))
               for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.15:
            ops.insert(rng.randrange(len(ops) + 1), ("raise", 0))
        staged = dict(model)
        for name, arg in ops:
            if name == "set":
                staged[(key, "v", None)] = (arg, ts + 300)
            elif name == "put":
                staged[(key, "m", arg % 3)] = (arg, ts + 500)
            elif name == "remove":
                staged.pop((key, "m", arg % 3), None)
            elif name == "append":
                items = list(staged[(key, "l", None)][0]) if (key, "l", None) in staged else []
                staged[(key, "l", None)] = ([*items, arg], None)
            elif name == "clear":
                for k in [k for k in staged if k[0] == key]:
                    del staged[k]
        if ("raise", 0) in ops:
            with pytest.raises(FunctionError):
                op.process(key, ts, {"ops": ops}, wm)
            assert op.take() == []
        else:
            model = staged
            op.process(key, ts, {"ops": ops}, wm)
            (out,) = op.take()
            assert out.record == live(key, op.watermark), (seed, ops)
        roll = rng.random()
        if roll < 0.1:
            op.advance(wm, limit=rng.randrange(1, 5))
        elif roll < 0.2:
            op._store.flush({"ts": ts})
            flushed = dict(model)
        elif roll < 0.25:
            op._store.close()  # a crash: back to the last flush
            op = open_process(ref, "deadLetter", tmp_path)
            model = dict(flushed)
    for key in "abc":
        op.process(key, ts, {"ops": []}, wm)
        (out,) = op.take()
        assert out.record == live(key, op.watermark)
