"""The checkpoint store on the file:// backend: round trips, increments, retention, corruption, savepoints."""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from weir import checkpoint_cli
from weir.checkpoint import (
    CheckpointError,
    CheckpointStore,
    CorruptCheckpoint,
    Manifest,
    PartitionSnapshot,
    S3Settings,
    StoreReader,
    checkpoint_id,
)
from weir.objectstores import FileBackend, MemoryBackend, ObjectInfo
from weir.state import PartitionStore

NS, JOB = "team-a", "revenue"


def _pstore(path: Path) -> PartitionStore:
    return PartitionStore(path, orjson.dumps, lambda b: list(orjson.loads(b)), max_cached=100)


def _fill(store: PartitionStore, n: int, seed: int = 0, value_bytes: int = 100) -> dict[Any, Any]:
    rnd = random.Random(seed)
    for i in range(n):
        store.put((f"key-{i}", 0, 60_000), [i, rnd.randbytes(value_bytes).hex()])
    return dict(store.items())


def _snap(store: PartitionStore, where: Path, offset: int, wm: int = 1_000) -> PartitionSnapshot:
    progress = {"offset": offset, "wm": wm, "upstream": {"0": wm}}
    store.flush(progress)
    return PartitionSnapshot(store.checkpoint(where), offset, wm, {"upstream": {"0": wm}})


def _open(tmp_path: Path, **kw: Any) -> CheckpointStore:
    return CheckpointStore.open(f"file://{tmp_path}/store", NS, JOB, **kw)


def _fake_rocksdb_dir(where: Path, **files: bytes) -> Path:
    """A directory shaped like a RocksDB checkpoint, for the store's file bookkeeping only."""
    where.mkdir(parents=True)
    for name, data in {"CURRENT": b"MANIFEST-000005\n", "MANIFEST-000005": os.urandom(64), **files}.items():
        (where / name.replace("_", ".")).write_bytes(data)
    return where


class FailingBackend:
    """A file backend that fails the writes whose key matches ``fail_on`` (an outage mid-write)."""

    scheme = "file"
    bucket = ""

    def __init__(self, fail_on: str) -> None:
        self.inner = FileBackend()
        self.fail_on = fail_on
        self.armed = True

    def _check(self, key: str) -> None:
        if self.armed and self.fail_on in key:
            raise CheckpointError(f"writing {key} failed: simulated outage")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._check(key)
        self.inner.put_bytes(key, data)

    def put_file(self, key: str, path: Path) -> None:
        self._check(key)
        self.inner.put_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def get_file(self, key: str, path: Path) -> None:
        self.inner.get_file(key, path)

    def read_chunks(self, key: str) -> Iterator[bytes]:
        return self.inner.read_chunks(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, keys: Sequence[str]) -> None:
        self.inner.delete(keys)

    def close(self) -> None:
        pass


# -- round trips ------------------------------------------------------------------------------
def test_a_checkpoint_restores_the_same_windows_and_progress_into_a_new_directory(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    items = _fill(live, 500)
    store = _open(tmp_path)
    res = store.write_checkpoint(
        checkpoint_id(1, 0), (0, 2), {"orders/0": _snap(live, tmp_path / "snap-1", offset=500)}
    )
    assert res.bytes_total > 0 and res.files_uploaded >= 3
    [manifest] = store.manifests()
    assert manifest.id == "0000000001-w0" and manifest.kind == "checkpoint"
    assert manifest.partitions["orders/0"].offset == 500
    assert manifest.partitions["orders/0"].progress == {"upstream": {"0": 1_000}}

    restored_dir = store.restore(manifest, "orders/0", tmp_path / "restored" / "orders-0")
    restored = _pstore(restored_dir)
    assert dict(restored.items()) == items
    assert restored.progress == {"offset": 500, "wm": 1_000, "upstream": {"0": 1_000}}
    restored.close()
    live.close()
    store.close()


def test_the_manifest_is_versioned_and_lists_every_file_with_size_and_sha256(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 50)
    store = _open(tmp_path, clock=lambda: 1_767_225_600.5)
    snap = _snap(live, tmp_path / "snap", offset=50, wm=77)
    store.write_checkpoint("0000000003-w1", (1, 2), {"orders/1": snap})
    doc = orjson.loads(
        (tmp_path / "store" / NS / JOB / "checkpoints" / "0000000003-w1" / "manifest.json").read_bytes()
    )
    assert doc["format"] == 1
    assert doc["kind"] == "checkpoint" and doc["id"] == "0000000003-w1"
    assert doc["createdAtMs"] == 1_767_225_600_500 and doc["createdAt"] == "2026-01-01T00:00:00.500Z"
    assert doc["job"] == {"namespace": NS, "name": JOB} and doc["worker"] == {"index": 1, "workers": 2}
    part = doc["partitions"]["orders/1"]
    assert part["offset"] == 50 and part["watermark"] == 77
    local = {p.name: p for p in snap.path.iterdir()}
    assert {f["name"] for f in part["files"]} == set(local)
    for f in part["files"]:
        data = local[f["name"]].read_bytes()
        assert f["size"] == len(data)
        assert f["sha256"] == __import__("hashlib").sha256(data).hexdigest()
        stored = tmp_path / "store" / NS / JOB / f["key"]
        assert stored.read_bytes() == data
        if f["name"].endswith(".sst"):
            assert f["key"] == f"shared/orders-1/{f['sha256']}-{f['name']}"
        else:
            assert f["key"] == f"checkpoints/0000000003-w1/orders-1/{f['name']}"
    assert doc["totals"] == {"bytes": sum(f["size"] for f in part["files"]), "files": len(part["files"])}
    live.close()
    store.close()


def test_a_second_checkpoint_after_a_small_change_uploads_only_the_new_files(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 20_000, value_bytes=200)
    store = _open(tmp_path)
    first = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    rnd = random.Random(7)
    for i in rnd.sample(range(20_000), 200):  # 1 % of the keys
        live.put((f"key-{i}", 0, 60_000), [i, "changed"])
    second = store.write_checkpoint("0000000002-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 2)})

    assert first.bytes_total > 4_000_000
    assert second.bytes_uploaded < 0.1 * first.bytes_uploaded
    assert second.bytes_total > first.bytes_total  # it still references the first one's big file
    shared_first = {f.key for f in first.manifest.partitions["orders/0"].files if f.name.endswith(".sst")}
    shared_second = {f.key for f in second.manifest.partitions["orders/0"].files if f.name.endswith(".sst")}
    assert shared_first < shared_second
    restored = _pstore(store.restore(second.manifest, "orders/0", tmp_path / "r"))
    assert restored.get(("key-5", 0, 60_000)) == live.get(("key-5", 0, 60_000))
    assert len(restored) == 20_000
    restored.close()
    live.close()
    store.close()


def test_a_file_an_earlier_checkpoint_read_is_not_read_again_and_only_current_files_are_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weir import checkpoint as ck

    read: list[str] = []
    real = ck.sha256_file

    def counting(path: Path) -> str:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(ck, "sha256_file", counting)
    live = _pstore(tmp_path / "live")
    _fill(live, 2_000)
    store = _open(tmp_path)
    one = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    first_read = list(read)
    read.clear()
    live.put(("key-1", 0, 60_000), [1, "changed"])
    two = store.write_checkpoint("0000000002-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 2)})

    ssts_one = {f.name for f in one.manifest.partitions["orders/0"].files if f.name.endswith(".sst")}
    ssts_two = {f.name for f in two.manifest.partitions["orders/0"].files if f.name.endswith(".sst")}
    assert ssts_one and ssts_one < ssts_two
    assert sorted(first_read) == sorted(f.name for f in one.manifest.partitions["orders/0"].files)
    # The SST files of the first checkpoint (hard links of the same files) are not read again.
    assert not ssts_one & set(read), read
    assert ssts_two - ssts_one <= set(read)
    # What it remembers is this checkpoint's files, not every file it ever read.
    assert sorted(name for *_, name in store._digests) == sorted(
        f.name for f in two.manifest.partitions["orders/0"].files
    )
    live.close()
    store.close()


def test_a_new_store_object_lists_the_shared_area_once_instead_of_uploading_again(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 2_000)
    snap = _snap(live, tmp_path / "s1", 1)
    with _open(tmp_path) as store:
        store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": snap})
    with _open(tmp_path) as again:  # a restarted worker
        res = again.write_checkpoint("0000000002-w0", (0, 1), {"orders/0": snap})
    ssts = list(snap.path.glob("*.sst"))
    assert ssts
    assert res.files_uploaded == len(list(snap.path.iterdir())) - len(ssts) + 1  # + manifest.json
    live.close()


# -- failures and corruption ---------------------------------------------------------------------
def test_a_write_that_fails_before_its_manifest_leaves_no_listed_checkpoint(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 100)
    backend = FailingBackend(fail_on="0000000002-w0/manifest.json")
    store = _open(tmp_path, backend=backend)
    store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    _fill(live, 200, seed=2)
    with pytest.raises(CheckpointError, match="simulated outage"):
        store.write_checkpoint("0000000002-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 2)})

    found = store.scan_kind("checkpoint")
    assert [m.id for m in found.manifests] == ["0000000001-w0"]
    assert found.incomplete == ["0000000002-w0"]
    assert store.next_seq(0) == 3  # the failed id is never reused
    assert store.next_seq(1) == 0
    live.close()
    store.close()


def test_a_missing_file_makes_fetch_raise_corrupt_checkpoint_naming_the_file(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 100)
    store = _open(tmp_path)
    res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    sst = next(f for f in res.manifest.partitions["orders/0"].files if f.name.endswith(".sst"))
    (tmp_path / "store" / NS / JOB / sst.key).unlink()

    with pytest.raises(CorruptCheckpoint, match=rf"{sst.key}: missing"):
        store.fetch(res.manifest, "orders/0", tmp_path / "f")
    assert store.verify(res.manifest) == [f"{res.manifest.file_url(sst)}: missing"]
    live.close()
    store.close()


def test_a_changed_byte_makes_fetch_raise_corrupt_checkpoint_with_both_checksums(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 100)
    store = _open(tmp_path)
    res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    sst = next(f for f in res.manifest.partitions["orders/0"].files if f.name.endswith(".sst"))
    path = tmp_path / "store" / NS / JOB / sst.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(
        CorruptCheckpoint, match=rf"{sst.key}: sha256 [0-9a-f]{{64}}, manifest says {sst.sha256}"
    ):
        store.fetch(res.manifest, "orders/0", tmp_path / "f")
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(CorruptCheckpoint, match=rf"size {sst.size - 1} bytes, manifest says {sst.size}"):
        store.fetch(res.manifest, "orders/0", tmp_path / "g")
    live.close()
    store.close()


def test_a_failed_restore_leaves_the_existing_database_directory_untouched(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 100)
    store = _open(tmp_path)
    res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    current = next(f for f in res.manifest.partitions["orders/0"].files if f.name == "CURRENT")
    (tmp_path / "store" / NS / JOB / current.key).unlink()
    target = tmp_path / "state" / "orders-0"
    target.mkdir(parents=True)
    (target / "marker").write_text("old state")

    with pytest.raises(CorruptCheckpoint, match="CURRENT: missing"):
        store.restore(res.manifest, "orders/0", target)
    assert [p.name for p in target.iterdir()] == ["marker"]
    assert [p.name for p in target.parent.iterdir()] == ["orders-0"]  # no leftovers
    live.close()
    store.close()


def test_an_unreadable_manifest_is_reported_by_scan_and_left_out_of_manifests(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 10)
    store = _open(tmp_path)
    store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    bad = tmp_path / "store" / NS / JOB / "checkpoints" / "0000000002-w0" / "manifest.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b'{"format": 1, "kind": "checkpoint"')
    newer = bad.parent.parent / "0000000003-w0" / "manifest.json"
    newer.parent.mkdir()
    newer.write_bytes(b'{"format": 9}')

    found = store.scan_kind("checkpoint")
    assert [m.id for m in found.manifests] == ["0000000001-w0"]
    reasons = sorted(str(e) for e in found.unreadable)
    assert "0000000002-w0/manifest.json: not JSON" in reasons[0]
    assert "0000000003-w0/manifest.json: manifest format 9 is not supported" in reasons[1]
    assert [m.id for m in store.manifests()] == ["0000000001-w0"]
    live.close()
    store.close()


def test_a_manifest_may_not_point_outside_its_store() -> None:
    doc = {
        "format": 1,
        "kind": "checkpoint",
        "id": "x",
        "createdAtMs": 0,
        "job": {"namespace": "a", "name": "b"},
        "worker": {"index": 0, "workers": 1},
        "filesRelativeTo": "job",
        "partitions": {
            "t/0": {
                "offset": 0,
                "format": "rocksdb-checkpoint",
                "files": [{"name": "a.sst", "key": "../../etc/passwd", "size": 1, "sha256": "0"}],
            }
        },
    }
    with pytest.raises(CorruptCheckpoint, match=r"may not contain '\.\.'"):
        Manifest.from_json(orjson.dumps(doc), "file:///s/a/b/checkpoints/x")
    doc["partitions"]["t/0"]["files"][0]["key"] = "shared/t-0/a.sst"  # type: ignore[index]
    del doc["partitions"]["t/0"]["offset"]  # type: ignore[index]
    with pytest.raises(CorruptCheckpoint, match=r"malformed manifest \(KeyError: 'offset'"):
        Manifest.from_json(orjson.dumps(doc), "file:///s/a/b/checkpoints/x")


# -- retention -----------------------------------------------------------------------------------
def test_retention_keeps_the_newest_n_and_every_shared_file_they_reference(tmp_path: Path) -> None:
    store = _open(tmp_path)
    a, b, c, d = (os.urandom(100) for _ in range(4))
    layouts = [
        {"000001_sst": a, "000002_sst": b},
        {"000002_sst": b, "000003_sst": c},
        {"000003_sst": c, "000004_sst": d},
        {"000002_sst": b, "000004_sst": d},
    ]
    for seq, files in enumerate(layouts, start=1):
        snap = _fake_rocksdb_dir(tmp_path / f"s{seq}", **files)
        store.write_checkpoint(checkpoint_id(seq, 0), (0, 1), {"orders/0": PartitionSnapshot(snap, seq)})

    deleted = store.retain(keep=2, worker_index=0, owned_partitions=["orders/0"])

    assert [m.id for m in store.manifests()] == ["0000000004-w0", "0000000003-w0"]
    shared = sorted(
        p.name.split("-", 1)[1] for p in (tmp_path / "store" / NS / JOB / "shared" / "orders-0").iterdir()
    )
    assert shared == ["000002.sst", "000003.sst", "000004.sst"]  # 000001 was only in checkpoint 1
    assert not (tmp_path / "store" / NS / JOB / "checkpoints" / "0000000001-w0").exists()
    assert deleted == 2 * 3 + 1  # two checkpoints (manifest, CURRENT, MANIFEST-*) and one shared file
    for m in store.manifests():
        assert store.verify(m) == []
    # The retained checkpoints still reuse what is there: nothing is uploaded twice.
    again = store.write_checkpoint(
        "0000000005-w0", (0, 1), {"orders/0": PartitionSnapshot(tmp_path / "s4", 5)}
    )
    assert again.files_uploaded == 3  # CURRENT, MANIFEST-*, manifest.json
    store.close()


def test_retention_never_deletes_files_that_another_workers_checkpoint_references(tmp_path: Path) -> None:
    # After a rescale, worker 0 owns orders/1, whose files worker 1's old checkpoints still use.
    store = _open(tmp_path)
    old = os.urandom(100)
    s_old = _fake_rocksdb_dir(tmp_path / "w1", **{"000007_sst": old})
    store.write_checkpoint("0000000009-w1", (1, 2), {"orders/1": PartitionSnapshot(s_old, 10)})
    for seq in (1, 2):
        snap = _fake_rocksdb_dir(tmp_path / f"w0-{seq}", **{f"00001{seq}_sst": os.urandom(100)})
        store.write_checkpoint(checkpoint_id(seq, 0), (0, 1), {"orders/1": PartitionSnapshot(snap, 10 + seq)})

    store.retain(keep=1, worker_index=0, owned_partitions=["orders/1"])

    ids = sorted(m.id for m in store.manifests())
    assert ids == ["0000000002-w0", "0000000009-w1"]  # the other worker's checkpoint stays
    for m in store.manifests():
        assert store.verify(m) == []
    store.close()


def test_after_a_scale_down_worker_0_deletes_departed_indices_checkpoints_once_every_worker_has_newer(
    tmp_path: Path,
) -> None:
    clock = iter(range(1_000, 100_000, 1_000))
    store = _open(tmp_path, clock=lambda: next(clock) / 1000)

    def write(cid: str, worker: tuple[int, int], partition: str) -> None:
        snap = _fake_rocksdb_dir(tmp_path / cid, **{"000009_sst": os.urandom(100)})
        store.write_checkpoint(cid, worker, {partition: PartitionSnapshot(snap, 1)})

    # Four workers ran; now two do. Worker 0 has checkpointed, worker 1 not yet.
    for index in range(4):
        write(checkpoint_id(5, index), (index, 4), f"orders/{index}")
    job = tmp_path / "store" / NS / JOB
    unfinished = job / "checkpoints" / "0000000006-w3" / "orders-3"  # a departed worker's, never finished
    unfinished.mkdir(parents=True)
    (unfinished / "CURRENT").write_bytes(b"MANIFEST-000001\n")
    write(checkpoint_id(6, 0), (0, 2), "orders/0")

    store.retain(keep=3, worker_index=0, owned_partitions=["orders/0", "orders/2"], workers=2)
    assert sorted(m.id for m in store.manifests()) == [
        "0000000005-w0", "0000000005-w1", "0000000005-w2", "0000000005-w3", "0000000006-w0"
    ]  # worker 1 may still restore orders/3 from 0000000005-w3: nothing departed goes yet
    assert unfinished.exists()

    write(checkpoint_id(6, 1), (1, 2), "orders/1")
    store.retain(keep=3, worker_index=1, owned_partitions=["orders/1", "orders/3"], workers=2)
    store.retain(keep=3, worker_index=0, owned_partitions=["orders/0", "orders/2"], workers=2)

    assert sorted(m.id for m in store.manifests()) == [
        "0000000005-w0", "0000000005-w1", "0000000006-w0", "0000000006-w1"
    ]
    assert not unfinished.parent.exists()
    # The departed checkpoints' files of orders/2 (now worker 0's) are gone; orders/3's go at
    # worker 1's next retention, the first after the manifests that referenced them went.
    assert not any((job / "shared" / "orders-2").glob("*"))
    store.retain(keep=3, worker_index=1, owned_partitions=["orders/1", "orders/3"], workers=2)
    assert not any((job / "shared" / "orders-3").glob("*"))
    store.close()


def test_retention_removes_the_files_of_a_failed_checkpoint_and_never_touches_savepoints(
    tmp_path: Path,
) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 200)
    backend = FailingBackend(fail_on="0000000002-w0/manifest.json")
    store = _open(tmp_path, backend=backend)
    store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    sp = store.write_savepoint("sp-1", (0, 1), {"orders/0": PartitionSnapshot(tmp_path / "s1", 1)})
    _fill(live, 300, seed=3)
    with pytest.raises(CheckpointError):
        store.write_checkpoint("0000000002-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 2)})
    backend.armed = False
    live.put(("other", 0, 1), [1])
    for seq in (3, 4):
        store.write_checkpoint(
            checkpoint_id(seq, 0), (0, 1), {"orders/0": _snap(live, tmp_path / f"s{seq}", seq)}
        )

    store.retain(keep=1, worker_index=0, owned_partitions=["orders/0"])

    job = tmp_path / "store" / NS / JOB
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["0000000004-w0"]
    [latest] = store.manifests()
    referenced = {f.key for f in latest.partitions["orders/0"].files}
    on_disk = {p.relative_to(job).as_posix() for p in (job / "shared").rglob("*") if p.is_file()}
    assert on_disk == {k for k in referenced if k.startswith("shared/")}
    assert store.read_savepoint(sp.url)[0].id == "sp-1"
    assert store.verify(store.read_savepoint(sp.url)[0]) == []
    live.close()
    store.close()


def test_retention_refuses_to_keep_nothing(tmp_path: Path) -> None:
    with _open(tmp_path) as store, pytest.raises(CheckpointError, match="keep must be >= 1"):
        store.retain(keep=0, worker_index=0, owned_partitions=[])


def test_remove_all_deletes_the_jobs_checkpoints_savepoints_and_shared_files_and_nothing_else(
    tmp_path: Path,
) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 200)
    store = _open(tmp_path)
    neighbour = CheckpointStore.open(f"file://{tmp_path}/store", NS, JOB + "-2")  # a name with our prefix
    store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1)})
    store.write_savepoint("sp-1", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 2)})
    neighbour.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s3", 3)})
    job = tmp_path / "store" / NS / JOB
    files = sum(1 for p in job.rglob("*") if p.is_file())

    assert store.remove_all() == files

    assert not job.exists()
    assert store.manifests() == [] and store.manifests("savepoint") == []
    assert [m.id for m in neighbour.manifests()] == ["0000000001-w0"]
    assert neighbour.verify(neighbour.manifests()[0]) == []
    assert store.remove_all() == 0  # a second removal finds nothing and is no error
    live.close()
    store.close()
    neighbour.close()


class RecordingBackend(MemoryBackend):
    """A memory backend that remembers each delete call's keys, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[list[str]] = []

    def delete(self, keys: Sequence[str]) -> None:
        self.deleted.append(list(keys))
        super().delete(keys)


def test_remove_all_deletes_manifests_before_the_files_they_list() -> None:
    backend = RecordingBackend()
    deleted = backend.deleted
    store = CheckpointStore.open("memory://mem/root", NS, JOB, backend=backend)
    for key in ("checkpoints/0000000001-w0/manifest.json", "checkpoints/0000000001-w0/orders-0/CURRENT",
                "shared/orders-0/abc-000001.sst", "savepoints/sp/w0/manifest.json",
                "savepoints/sp/w0/orders-0.sst"):
        backend.put_bytes(f"root/{NS}/{JOB}/{key}", b"x")

    assert store.remove_all() == 5

    assert all(k.endswith("/manifest.json") for k in deleted[0]) and len(deleted[0]) == 2
    assert not any(k.endswith("/manifest.json") for k in deleted[1]) and len(deleted[1]) == 3
    assert list(backend.list("root/")) == []


# -- savepoints ----------------------------------------------------------------------------------
def test_a_savepoint_restores_into_a_fresh_store_with_the_same_items_and_progress(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    items = _fill(live, 3_000)
    store = _open(tmp_path)
    res = store.write_savepoint("upgrade-1", (0, 2), {"orders/0": _snap(live, tmp_path / "s", 3_000, wm=55)})
    assert res.url == f"file://{tmp_path}/store/{NS}/{JOB}/savepoints/upgrade-1"
    [m] = store.read_savepoint(res.url)
    entry = m.partitions["orders/0"]
    assert (m.kind, entry.format, entry.entries, entry.offset, entry.watermark) == (
        "savepoint",
        "sst-export",
        3_001,
        3_000,
        55,
    )  # 3,000 windows and the progress entry

    restored = _pstore(store.restore(m, "orders/0", tmp_path / "new" / "orders-0"))
    assert dict(restored.items()) == items
    assert restored.progress == live.progress
    restored.close()
    live.close()
    store.close()


def test_a_savepoint_is_self_contained_and_restores_after_being_copied_elsewhere(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    items = _fill(live, 500)
    store = _open(tmp_path)
    res = store.write_savepoint("sp", (0, 1), {"orders/0": _snap(live, tmp_path / "s", 500)})
    for f in res.manifest.partitions["orders/0"].files:
        assert "/" not in f.key and "shared" not in f.key
    moved = tmp_path / "elsewhere" / "sp"
    shutil.copytree(tmp_path / "store" / NS / JOB / "savepoints" / "sp", moved)
    shutil.rmtree(tmp_path / "store")

    with StoreReader() as reader:
        [m] = reader.read_savepoint(f"file://{moved}")
        restored = _pstore(reader.restore(m, "orders/0", tmp_path / "db"))
    assert dict(restored.items()) == items
    restored.close()
    live.close()
    store.close()


def test_a_savepoint_of_two_workers_reads_back_as_the_union_of_their_partitions(tmp_path: Path) -> None:
    stores = {p: _pstore(tmp_path / f"live-{p}") for p in range(4)}
    items = {p: _fill(s, 50, seed=p) for p, s in stores.items()}
    store = _open(tmp_path)
    for w in (0, 1):
        snaps = {f"orders/{p}": _snap(stores[p], tmp_path / f"s{p}", 50 + p) for p in range(4) if p % 2 == w}
        res = store.write_savepoint("rescale", (w, 2), snaps, path=f"file://{tmp_path}/manual")
    assert res.url == f"file://{tmp_path}/manual/rescale"

    manifests = store.read_savepoint(res.url)
    owners = {p: m for m in manifests for p in m.partitions}
    assert sorted(owners) == ["orders/0", "orders/1", "orders/2", "orders/3"]
    for p in range(4):
        db = _pstore(store.restore(owners[f"orders/{p}"], f"orders/{p}", tmp_path / "r" / str(p)))
        assert dict(db.items()) == items[p]
        assert owners[f"orders/{p}"].partitions[f"orders/{p}"].offset == 50 + p
        db.close()
    # One worker's directory restores on its own too.
    assert [m.worker_index for m in store.read_savepoint(res.url + "/w1")] == [1]
    for s in stores.values():
        s.close()
    store.close()


def test_the_same_savepoint_id_twice_returns_the_first_savepoint(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 10)
    store = _open(tmp_path)
    first = store.write_savepoint("sp", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 10)})
    _fill(live, 20, seed=9)
    second = store.write_savepoint("sp", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 20)})
    assert second.existing and not first.existing
    assert second.bytes_uploaded == 0
    assert second.manifest.partitions["orders/0"].offset == 10
    live.close()
    store.close()


def test_an_empty_partition_savepoint_restores_to_an_empty_database(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    store = _open(tmp_path)
    empty = PartitionSnapshot(live.checkpoint(tmp_path / "s"), 0)
    res = store.write_savepoint("sp", (0, 1), {"orders/0": empty})
    [m] = store.read_savepoint(res.url)
    assert m.partitions["orders/0"].files == () and m.partitions["orders/0"].entries == 0
    db = _pstore(store.restore(m, "orders/0", tmp_path / "r"))
    assert len(db) == 0 and db.progress is None
    db.close()
    live.close()
    store.close()


# -- inputs, settings, backends -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("store/dir", "must start with file:/// or s3://"),
        ("file://relative/dir", "must hold an absolute path"),
        ("s3:///prefix", "names no bucket"),
        ("gs://bucket/x", "must start with file:/// or s3://"),
        ("file:///a/../b", "may not contain '..'"),
    ],
)
def test_a_bad_store_url_raises_an_error_naming_it(url: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        CheckpointStore.open(url, NS, JOB)


def test_bad_names_raise_errors_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="namespace 'a/b'"):
        CheckpointStore.open(f"file://{tmp_path}", "a/b", JOB)
    with _open(tmp_path) as store:
        with pytest.raises(CheckpointError, match="partition 'orders-0' is not of the form"):
            store.write_checkpoint("x", (0, 1), {"orders-0": PartitionSnapshot(tmp_path, 0)})
        with pytest.raises(CheckpointError, match=r"checkpoint id '\.\./x'"):
            store.write_checkpoint("../x", (0, 1), {})
        with pytest.raises(CheckpointError, match=r"worker index 2 is outside 0\.\.1"):
            store.write_checkpoint("x", (2, 2), {})
        snap = _fake_rocksdb_dir(tmp_path / "snap")
        with pytest.raises(CheckpointError, match="progress is not JSON-serialisable"):
            store.write_checkpoint(
                "y", (0, 1), {"orders/0": PartitionSnapshot(snap, 0, progress={"x": object()})}
            )
    with pytest.raises(CheckpointError, match="backend for memory://mem cannot serve store URL"):
        CheckpointStore.open(f"file://{tmp_path}", NS, JOB, backend=MemoryBackend())


def test_s3_settings_take_explicit_values_over_the_environment_and_never_show_secrets() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-specific:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret-value",
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.region, s.access_key_id) == ("http://s3-specific:2", "eu-west-1", "AKIDEXAMPLE")
    assert S3Settings.from_env({**env, "WEIR_S3_ENDPOINT": "http://weir:3"}).endpoint_url == "http://weir:3"
    assert S3Settings.from_env(env, region="us-east-2").region == "us-east-2"
    assert S3Settings.from_env({}).access_key_id is None
    assert "very-secret-value" not in repr(s) and "AKIDEXAMPLE" not in repr(s)


def test_the_memory_backend_holds_a_checkpoint_like_any_other(tmp_path: Path) -> None:
    live = _pstore(tmp_path / "live")
    items = _fill(live, 100)
    mem = MemoryBackend("test")
    store = CheckpointStore.open("memory://test/root", NS, JOB, backend=mem)
    res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s", 100)})
    assert res.url == f"memory://test/root/{NS}/{JOB}/checkpoints/0000000001-w0"
    assert any(k.endswith("/manifest.json") for k in mem.objects)
    [m] = store.manifests()
    db = _pstore(store.restore(m, "orders/0", tmp_path / "r"))
    assert dict(db.items()) == items
    db.close()
    live.close()
    store.close()


# -- the weir checkpoints command ------------------------------------------------------------------
def _run_cli(*argv: str) -> tuple[int, str, str]:
    import argparse

    parser = argparse.ArgumentParser()
    checkpoint_cli.add_cli(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    code = checkpoint_cli.run_cli(parser.parse_args(list(argv)), out, err)
    return code, out.getvalue(), err.getvalue()


def test_checkpoints_ls_and_inspect_show_ids_partitions_offsets_and_verify_detects_damage(
    tmp_path: Path,
) -> None:
    live = _pstore(tmp_path / "live")
    _fill(live, 100)
    store = _open(tmp_path)
    res = store.write_checkpoint(
        "0000000001-w0", (0, 2), {"orders/0": _snap(live, tmp_path / "s1", 4242, wm=99)}
    )
    sp = store.write_savepoint("sp-1", (0, 2), {"orders/0": PartitionSnapshot(tmp_path / "s1", 4242, 99)})
    root = f"file://{tmp_path}/store"

    code, out, _ = _run_cli("checkpoints", "ls", root)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "ID", "CREATED", "JOB", "WORKER", "PARTITIONS", "FILES", "SIZE"]
    assert {line.split()[0] for line in lines[1:]} == {"checkpoint", "savepoint"}
    assert any("0000000001-w0" in line and f"{NS}/{JOB}" in line and "0/2" in line for line in lines)

    code, out, _ = _run_cli("checkpoints", "ls", "--json", f"{root}/{NS}/{JOB}")
    listed = orjson.loads(out)["manifests"]
    assert sorted(m["id"] for m in listed) == ["0000000001-w0", "sp-1"]

    code, out, _ = _run_cli("checkpoints", "inspect", "--verify", res.url)
    assert code == 0, out
    assert "orders/0" in out and "4242" in out and "verify: ok" in out
    code, out, _ = _run_cli("checkpoints", "inspect", "--json", sp.url)
    [doc] = orjson.loads(out)
    assert doc["kind"] == "savepoint" and doc["partitions"]["orders/0"]["offset"] == 4242

    sst = next(f for f in res.manifest.partitions["orders/0"].files if f.name.endswith(".sst"))
    (tmp_path / "store" / NS / JOB / sst.key).unlink()
    code, out, _ = _run_cli("checkpoints", "inspect", "--verify", res.url)
    assert code == 1
    assert f"{sst.key}: missing" in out and "verify: 1 problem(s)" in out
    code, _, err = _run_cli("checkpoints", "inspect", f"{root}/nothing-here")
    assert code == 2 and "no manifest.json" in err
    live.close()
    store.close()


# -- a file store on the state's own file system --------------------------------------------------
def test_a_file_store_on_the_same_file_system_links_the_checkpoint_files_instead_of_copying(
    tmp_path: Path,
) -> None:
    live = _pstore(tmp_path / "live")
    expected = _fill(live, 2_000)
    snap = _snap(live, tmp_path / "s1", 7)
    with _open(tmp_path) as store:
        res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": snap})
        files = res.manifest.partitions["orders/0"].files
        stored = {f.name: tmp_path / "store" / NS / JOB / f.key for f in files}
        assert res.files_uploaded == len(stored) + 1  # + manifest.json
        for name, path in stored.items():
            assert path.stat().st_ino == (snap.path / name).stat().st_ino, name
        assert not list((tmp_path / "store").rglob("*.tmp"))
        shutil.rmtree(snap.path)  # what the worker does once the checkpoint is written
        live.close()
        shutil.rmtree(tmp_path / "live")
        restored = _pstore(store.restore(res.manifest, "orders/0", tmp_path / "r"))
    assert dict(restored.items()) == expected
    assert restored.progress is not None and restored.progress["offset"] == 7
    restored.close()


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.EPERM])
def test_where_a_link_is_refused_the_file_store_copies_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr("weir.objectstores.os.link", refuse)
    live = _pstore(tmp_path / "live")
    expected = _fill(live, 500)
    snap = _snap(live, tmp_path / "s1", 3)
    with _open(tmp_path) as store:
        res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": snap})
        for f in res.manifest.partitions["orders/0"].files:
            path = tmp_path / "store" / NS / JOB / f.key
            assert path.stat().st_ino != (snap.path / f.name).stat().st_ino
            assert path.read_bytes() == (snap.path / f.name).read_bytes()
        restored = _pstore(store.restore(res.manifest, "orders/0", tmp_path / "r"))
    assert dict(restored.items()) == expected
    restored.close()
    live.close()


def test_a_file_store_that_cannot_write_fails_the_checkpoint_and_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    live = _pstore(tmp_path / "live")
    _fill(live, 100)
    snap = _snap(live, tmp_path / "s1", 1)
    monkeypatch.setattr("weir.objectstores.os.link", full)
    with _open(tmp_path) as store:
        with pytest.raises(CheckpointError, match="No space left on device"):
            store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": snap})
        assert store.manifests() == []
        assert not list((tmp_path / "store").rglob("*.tmp"))
        monkeypatch.undo()
        res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": snap})  # once it has room
        assert [m.id for m in store.manifests()] == [res.manifest.id]
    live.close()
