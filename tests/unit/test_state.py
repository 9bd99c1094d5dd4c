"""The RocksDB partition store: the window store seam, bounded memory, durable progress."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weir.state import PartitionStore, decode_key, encode_key


def _store(path: Path, max_cached: int = 1000) -> PartitionStore:
    return PartitionStore(path, orjson.dumps, lambda b: list(orjson.loads(b)), max_cached)


def test_window_keys_round_trip_and_sort_by_start_then_end() -> None:
    keys = [("z", 100, 200), ("a", 0, 20), ("b", -5, 10), ("a", 0, 10)]
    assert [decode_key(encode_key(k)) for k in keys] == keys
    by_bytes = sorted(keys, key=encode_key)
    assert [(k[1], k[2]) for k in by_bytes] == [(-5, 10), (0, 10), (0, 20), (100, 200)]


def test_flushed_windows_and_progress_survive_a_reopen(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(("k", 0, 10), [1, 2])
    store.put(("k", 10, 20), [3, 4])
    store.delete(("k", 10, 20))
    store.flush({"offset": 42, "wm": 7})
    store.put(("k", 20, 30), [9, 9])  # not flushed: lost with the process, like its offset
    store.close()

    reopened = _store(tmp_path)
    assert reopened.progress == {"offset": 42, "wm": 7}
    assert dict(reopened.items()) == {("k", 0, 10): [1, 2]}
    assert len(reopened) == 1
    assert reopened.get(("k", 0, 10)) == [1, 2]
    assert reopened.get(("k", 20, 30)) is None


def test_memory_stays_bounded_and_evicted_windows_are_read_back_from_disk(tmp_path: Path) -> None:
    store = _store(tmp_path, max_cached=100)
    for i in range(1000):
        store.put((f"k{i}", 0, 10), [i])
    store.flush({"offset": 1000, "wm": 0})
    assert store.cached <= 100
    assert len(store) == 1000
    assert store.get(("k3", 0, 10)) == [3]
    acc = store.get(("k4", 0, 10))
    assert acc == [4]
    acc[0] += 1
    store.put(("k4", 0, 10), acc)
    store.delete(("k5", 0, 10))
    assert len(store) == 999
    store.flush({"offset": 1001, "wm": 0})
    assert dict(store.items())[("k4", 0, 10)] == [5]
    assert ("k5", 0, 10) not in dict(store.items())
    assert len(list(store.items())) == len(store) == 999


def test_a_window_closed_after_a_flush_is_gone_from_disk_too(tmp_path: Path) -> None:
    # Flushed windows stay in memory too; closing one later must still delete it on disk, or a
    # restart (or a checkpoint) brings a window back whose result was already emitted.
    store = PartitionStore(tmp_path / "db", orjson.dumps, orjson.loads)
    store.put(("k", 0, 10), [1])
    store.put(("k", 10, 20), [2])
    store.flush({"offset": 1})
    store.delete(("k", 0, 10))
    store.flush({"offset": 2})
    store.close()
    reopened = PartitionStore(tmp_path / "db", orjson.dumps, orjson.loads)
    assert dict(reopened.items()) == {("k", 10, 20): [2]}
    assert len(reopened) == 1
    reopened.close()


def test_a_spill_between_flushes_removes_the_progress_so_the_local_database_is_not_trusted(
    tmp_path: Path,
) -> None:
    # Windows written between checkpoints are changes past the stored offset: a restart must not
    # take this database for the state at that offset (weir.recovery then restores a checkpoint).
    store = _store(tmp_path, max_cached=10)
    store.put(("k0", 0, 10), [0])
    store.flush({"offset": 1})
    for i in range(1, 30):
        store.put((f"k{i}", 0, 10), [i])
    assert store.spills > 0
    assert store.cached <= 10
    assert store.progress is None
    store.flush({"offset": 30})
    assert store.progress == {"offset": 30}
    assert len(store) == 30
    store.close()
    reopened = _store(tmp_path)
    assert reopened.progress == {"offset": 30}
    assert dict(reopened.items()) == {(f"k{i}", 0, 10): [i] for i in range(30)}
    reopened.close()


def test_a_flush_bigger_than_one_batch_writes_its_progress_last(tmp_path: Path) -> None:
    store = _store(tmp_path, max_cached=100_000)
    store.flush({"offset": 1})
    for i in range(25_000):
        store.put((f"k{i}", 0, 10), [i])
    store.flush({"offset": 25_000})
    store.close()
    reopened = _store(tmp_path)
    assert reopened.progress == {"offset": 25_000}
    assert len(reopened) == 25_000
    reopened.close()


def test_the_windows_ending_at_one_time_are_popped_from_disk_in_key_order(tmp_path: Path) -> None:
    store = _store(tmp_path, max_cached=16)
    keys = [f"k{i:03d}" for i in range(100)]
    for key in reversed(keys):
        store.put((key, 0, 10), [key])
        store.put((key, 10, 20), [key])
    store.spill()
    first = store.pop_windows_at(0, 10, None, 40)
    rest = store.pop_windows_at(0, 10, first[-1][0][0], 1000)
    assert [k for k, _acc in first + rest] == [(key, 0, 10) for key in keys]
    assert all(acc == [k[0]] for k, acc in first + rest)
    assert len(store) == 100
    assert store.get(("k005", 0, 10)) is None
    assert store.pop_windows_at(0, 10, None, 10) == []
    store.flush({"offset": 1})
    assert store.window_ends() == [20]
    store.close()


def test_a_byte_budget_bounds_the_cache_by_the_measured_size_of_its_windows(tmp_path: Path) -> None:
    store = PartitionStore(
        tmp_path, orjson.dumps, lambda b: list(orjson.loads(b)), memory_bytes=200_000
    )
    for i in range(5_000):
        store.put((f"key-{i}", 0, 10), [i, float(i)])
    cached, _pending = store.memory_used()
    assert store.entry_bytes > 200
    assert store.cached <= 200_000 // store.entry_bytes
    assert cached <= 200_000
    assert len(store) == 5_000
    store.close()


def _tombstones(store: PartitionStore) -> int:
    """Deletes RocksDB holds in its memtables (not yet written to a file)."""
    db = store._db
    return int(db.property_int_value("rocksdb.num-deletes-active-mem-table") or 0) + int(
        db.property_int_value("rocksdb.num-deletes-imm-mem-tables") or 0
    )


def test_a_window_opened_and_closed_between_two_flushes_costs_the_second_no_tombstone(
    tmp_path: Path,
) -> None:
    # Under load most tumbling windows open and close between two checkpoints: RocksDB never
    # held them, so the checkpoint must not write (and then flush, upload) a delete for each.
    store = _store(tmp_path)
    store.put(("old", 0, 10), [1])
    store.flush({"offset": 1})
    for i in range(50):
        store.put((f"new{i}", 10, 20), [i])
    for i in range(50):
        store.delete((f"new{i}", 10, 20))
    store.delete(("old", 0, 10))  # this one is on disk: its delete must reach it
    assert store.memory_used()[1] == store.entry_bytes  # one pending delete, nothing else
    store.flush({"offset": 2})
    assert _tombstones(store) == 1
    assert list(store.items()) == [] and len(store) == 0
    store.close()
    reopened = _store(tmp_path)
    assert list(reopened.items()) == [] and reopened.progress == {"offset": 2}
    reopened.close()


def test_a_window_deleted_and_created_again_between_flushes_is_deleted_on_disk_when_it_closes(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.put(("a", 0, 10), [1])
    store.put(("b", 0, 10), [1])
    store.flush({"offset": 1})
    store.delete(("a", 0, 10))  # its delete is pending ...
    store.put(("a", 0, 10), [2])  # ... and dropped here: the window is back, and on disk still
    store.delete(("a", 0, 10))
    store.put(("b", 0, 10), [2])  # on disk, changed again
    store.delete(("b", 0, 10))
    store.flush({"offset": 2})
    store.close()
    reopened = _store(tmp_path)
    assert list(reopened.items()) == [] and len(reopened) == 0
    reopened.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "put", "delete", "delete", "get", "flush", "spill", "reopen"]),
                  st.integers(0, 5)),
        max_size=80,
    ),
    max_cached=st.sampled_from([3, 1000]),
)
def test_what_a_flush_leaves_on_disk_is_exactly_the_windows_alive_at_it(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]], max_cached: int
) -> None:
    # A model check of the store against a dict, across evictions (max_cached=3), spills, windows
    # deleted and re-created between flushes, and reopens: after every flush the database holds
    # exactly the live windows, none lost and none brought back by a skipped tombstone.
    path = tmp_path_factory.mktemp("db")
    store = _store(path, max_cached=max_cached)
    model: dict[tuple[str, int, int], list[int]] = {}
    for n, (op, i) in enumerate(ops):
        k = (f"k{i % 3}", 10 * (i // 3), 10 * (i // 3) + 10)
        if op == "put":
            acc = store.get(k)
            assert acc == model.get(k)
            model[k] = [n] if acc is None else [*acc, n]
            store.put(k, list(model[k]))
        elif op == "delete":
            if k in model:
                store.delete(k)
                del model[k]
        elif op == "get":
            assert store.get(k) == model.get(k)
        elif op == "flush":
            store.flush({"offset": n})
        elif op == "spill":
            store.spill()
        else:  # a restart right after a checkpoint
            store.flush({"offset": n})
            store.close()
            store = _store(path, max_cached=max_cached)
            assert dict(store.items()) == model
        assert len(store) == len(model)
    store.flush({"offset": len(ops)})
    store.close()
    reopened = _store(path, max_cached=max_cached)
    assert dict(reopened.items()) == model
    assert len(reopened) == len(model)
    reopened.close()


# -- the snapshot fence (``RocksStore.start_checkpoint`` / ``checkpoint`` on another thread) --------
def test_a_write_after_start_checkpoint_waits_for_the_snapshot_and_stays_out_of_it(tmp_path: Path) -> None:
    store = _store(tmp_path / "live")
    store.put(("before", 0, 60_000), [1, 1.0])
    store.flush({"offset": 1})
    store.start_checkpoint()

    def later_write() -> None:  # the worker going on while the checkpoint thread snapshots
        store.put(("after", 0, 60_000), [2, 2.0])
        store.flush({"offset": 2})

    writer = threading.Thread(target=later_write)
    writer.start()
    writer.join(0.3)
    assert writer.is_alive(), "a write went through while the snapshot was still to be taken"
    store.checkpoint(tmp_path / "snap")
    writer.join(5)
    assert not writer.is_alive()

    snap = _store(tmp_path / "snap")
    assert snap.progress == {"offset": 1}
    assert snap.get(("before", 0, 60_000)) == [1, 1.0]
    assert snap.get(("after", 0, 60_000)) is None
    assert store.progress == {"offset": 2}
    snap.close()
    store.close()


def test_a_snapshot_that_fails_or_is_given_up_lifts_the_fence(tmp_path: Path) -> None:
    store = _store(tmp_path / "live")
    store.put(("k", 0, 60_000), [1, 1.0])
    store.flush({"offset": 1})
    (tmp_path / "taken").mkdir()
    store.start_checkpoint()
    with pytest.raises(FileExistsError):
        store.checkpoint(tmp_path / "taken")
    store.flush({"offset": 2})  # would wait forever if the failed snapshot kept the fence up

    store.start_checkpoint()
    store.end_checkpoint()  # given up (the checkpoint was cancelled before it ran)
    store.flush({"offset": 3})
    store.close()
    again = _store(tmp_path / "live")
    assert again.progress == {"offset": 3}
    again.close()
