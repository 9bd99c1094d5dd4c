"""The checkpoint store against the real S3 server (MinIO): round trips, multipart, increments,
corruption, retention and the `weir checkpoints` command."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from harness.s3 import S3Helper
from weir.checkpoint import (
    CheckpointError,
    CheckpointStore,
    CorruptCheckpoint,
    PartitionSnapshot,
    S3Settings,
    checkpoint_id,
)
from weir.state import PartitionStore

pytestmark = pytest.mark.s3

NS, JOB = "team-a", "revenue"


def _settings(s3: S3Helper, **kw: Any) -> S3Settings:
    return S3Settings(
        endpoint_url=s3.endpoint,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        **kw,
    )


def _store(s3: S3Helper, **kw: Any) -> CheckpointStore:
    return CheckpointStore.open(f"s3://{s3.bucket}/weir", NS, JOB, s3=_settings(s3, **kw))


def _json_store(path: Path) -> PartitionStore:
    return PartitionStore(path, orjson.dumps, lambda b: list(orjson.loads(b)), max_cached=1000)


def _bytes_store(path: Path) -> PartitionStore:
    """Accumulators are ``[bytes]`` stored as-is: random values make on-disk size = state size."""
    return PartitionStore(path, lambda acc: acc[0], lambda b: [b], max_cached=1000)


def _fill_random(store: PartitionStore, keys: range, rnd: random.Random, value_bytes: int) -> None:
    for start in range(keys.start, keys.stop, 20_000):
        for i in range(start, min(start + 20_000, keys.stop)):
            store.put((f"key-{i:08d}", 0, 60_000), [rnd.randbytes(value_bytes)])
        store.flush({"offset": start, "wm": 0})


def _snap(store: PartitionStore, where: Path, offset: int) -> PartitionSnapshot:
    store.flush({"offset": offset, "wm": 1_000})
    return PartitionSnapshot(store.checkpoint(where), offset, 1_000)


def _objects(s3: S3Helper, prefix: str) -> dict[str, int]:
    client = s3.client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", ())}
    finally:
        client.close()


def test_a_checkpoint_round_trips_through_s3_with_state_and_offsets(s3: S3Helper, tmp_path: Path) -> None:
    live = _json_store(tmp_path / "live")
    for i in range(2_000):
        live.put((f"k{i}", 0, 10), [i, "x" * 50])
    items = dict(live.items())
    with _store(s3) as store:
        res = store.write_checkpoint(
            checkpoint_id(1, 0), (0, 1), {"orders/0": _snap(live, tmp_path / "s", 2_000)}
        )
        assert res.url == f"s3://{s3.bucket}/weir/{NS}/{JOB}/checkpoints/0000000001-w0"
        keys = _objects(s3, f"weir/{NS}/{JOB}/")
        assert f"weir/{NS}/{JOB}/checkpoints/0000000001-w0/manifest.json" in keys
        for f in res.manifest.partitions["orders/0"].files:
            assert keys[f"weir/{NS}/{JOB}/{f.key}"] == f.size

    with _store(s3) as fresh:  # another process: nothing cached
        [m] = fresh.manifests()
        assert m.partitions["orders/0"].offset == 2_000
        restored = _json_store(fresh.restore(m, "orders/0", tmp_path / "restored"))
    assert dict(restored.items()) == items
    assert restored.progress == {"offset": 2_000, "wm": 1_000}
    restored.close()
    live.close()


def test_a_file_above_the_transfer_threshold_goes_up_and_down_in_parts(s3: S3Helper, tmp_path: Path) -> None:
    live = _bytes_store(tmp_path / "live")
    _fill_random(live, range(24_000), random.Random(1), 500)  # ~12 MB: one flushed SST
    mib5 = 5 << 20
    with _store(s3, multipart_threshold_bytes=mib5, multipart_chunk_bytes=mib5) as store:
        res = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s", 1)})
        big = max(res.manifest.partitions["orders/0"].files, key=lambda f: f.size)
        assert big.size > 2 * mib5
        client = s3.client()
        try:
            head = client.head_object(Bucket=s3.bucket, Key=f"weir/{NS}/{JOB}/{big.key}")
        finally:
            client.close()
        # A multipart object's ETag is "<md5 of the part md5s>-<number of parts>".
        assert head["ETag"].strip('"').endswith(f"-{-(-big.size // mib5)}")
        restored = _bytes_store(store.restore(res.manifest, "orders/0", tmp_path / "r"))
    assert len(restored) == 24_000
    assert restored.get(("key-00000007", 0, 60_000)) == live.get(("key-00000007", 0, 60_000))
    restored.close()
    live.close()


def test_after_100_mb_of_state_changing_1_percent_of_keys_uploads_under_10_percent(
    s3: S3Helper, tmp_path: Path
) -> None:
    """The issue's Incremental acceptance, on a settled database.

    A database that just took 100 MB in one go holds it in L0, and RocksDB compacts that
    into sorted levels once (the first checkpoint's memtable flush triggers it): whatever
    the options, the checkpoint after that compaction uploads the rewritten files again.
    So, as in a running worker, the first checkpoint is followed by the compaction
    settling (well within any checkpoint interval), a checkpoint of the settled >= 100 MB
    state, a 1 % change, and the checkpoint measured against them.
    """
    n, value_bytes = 200_000, 520
    rnd = random.Random(42)
    live = _bytes_store(tmp_path / "live")
    _fill_random(live, range(n), rnd, value_bytes)
    with _store(s3) as store:
        first = store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", n)})
        deadline = time.monotonic() + 60
        while live.compacting() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live.compacting()
        settled = store.write_checkpoint(
            "0000000002-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", n)}
        )
        for i in rnd.sample(range(n), n // 100):
            live.put((f"key-{i:08d}", 0, 60_000), [rnd.randbytes(value_bytes)])
        third = store.write_checkpoint(
            "0000000003-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s3", n + 1)}
        )
    print(
        "\n".join(
            f"{name}: {r.bytes_total / 1e6:.1f} MB referenced, {r.bytes_uploaded / 1e6:.2f} MB uploaded "
            f"({r.files_uploaded} files) in {r.seconds:.2f} s"
            for name, r in (("first", first), ("settled", settled), ("1 % changed", third))
        )
    )
    assert first.bytes_total >= 100_000_000 and settled.bytes_total >= 100_000_000
    assert first.bytes_uploaded >= first.bytes_total
    assert third.bytes_uploaded < 0.10 * settled.bytes_uploaded
    assert third.bytes_uploaded < 0.10 * first.bytes_uploaded
    assert third.bytes_uploaded >= (n // 100) * value_bytes * 0.9  # the changed data did go up
    live.close()


def test_with_one_object_of_the_latest_checkpoint_deleted_the_previous_one_still_restores(
    s3: S3Helper, tmp_path: Path
) -> None:
    live = _json_store(tmp_path / "live")
    for i in range(1_000):
        live.put((f"k{i}", 0, 10), [i])
    with _store(s3) as store:
        store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s1", 1_000)})
        before = dict(live.items())
        for i in range(1_000, 1_100):
            live.put((f"k{i}", 0, 10), [i])
        latest = store.write_checkpoint(
            "0000000002-w0", (0, 1), {"orders/0": _snap(live, tmp_path / "s2", 1_100)}
        )
        older = {f.key for f in store.manifests()[1].partitions["orders/0"].files}
        victim = next(f for f in latest.manifest.partitions["orders/0"].files if f.key not in older)
        client = s3.client()
        try:
            client.delete_object(Bucket=s3.bucket, Key=f"weir/{NS}/{JOB}/{victim.key}")
        finally:
            client.close()

    with _store(s3) as store:
        newest, previous = store.manifests()
        assert newest.id == "0000000002-w0"
        with pytest.raises(CorruptCheckpoint, match=f"{victim.key}: missing"):
            store.restore(newest, "orders/0", tmp_path / "r")
        assert not (tmp_path / "r").exists()
        assert store.verify(newest) == [f"{newest.file_url(victim)}: missing"]
        assert store.verify(previous) == []
        restored = _json_store(store.restore(previous, "orders/0", tmp_path / "r"))
    assert dict(restored.items()) == before
    assert restored.progress == {"offset": 1_000, "wm": 1_000}
    restored.close()
    live.close()


def test_retention_on_s3_deletes_old_checkpoints_and_unreferenced_files_only(
    s3: S3Helper, tmp_path: Path
) -> None:
    blobs = [os.urandom(1000) for _ in range(5)]
    layouts = [(0, 1), (1, 2), (2, 3), (1, 3, 4)]  # which blobs each checkpoint's SST files hold
    with _store(s3) as store:
        for seq, layout in enumerate(layouts, start=1):
            d = tmp_path / f"s{seq}"
            d.mkdir()
            (d / "CURRENT").write_bytes(b"MANIFEST-000001\n")
            (d / "MANIFEST-000001").write_bytes(os.urandom(50))
            for b in layout:
                (d / f"{b:06d}.sst").write_bytes(blobs[b])
            store.write_checkpoint(checkpoint_id(seq, 0), (0, 1), {"orders/0": PartitionSnapshot(d, seq)})
        other = _json_store(tmp_path / "x")
        other.put(("k", 0, 10), [1])
        sp = store.write_savepoint("keep-me", (0, 1), {"orders/0": _snap(other, tmp_path / "sx", 0)})
        other.close()

        deleted = store.retain(keep=2, worker_index=0, owned_partitions=["orders/0"])

        assert [m.id for m in store.manifests()] == ["0000000004-w0", "0000000003-w0"]
        shared = sorted(k.rsplit("-", 1)[1] for k in _objects(s3, f"weir/{NS}/{JOB}/shared/"))
        assert shared == ["000001.sst", "000002.sst", "000003.sst", "000004.sst"]
        assert deleted == 2 * 3 + 1
        for m in store.manifests():
            assert store.verify(m) == []
        assert store.verify(store.read_savepoint(sp.url)[0]) == []


def test_weir_checkpoints_ls_and_inspect_read_s3_with_credentials_from_the_environment(
    s3: S3Helper, tmp_path: Path
) -> None:
    live = _json_store(tmp_path / "live")
    live.put(("k", 0, 10), [1])
    with _store(s3) as store:
        res = store.write_checkpoint(
            "0000000007-w1", (1, 2), {"orders/1": _snap(live, tmp_path / "s", 31_337)}
        )
    env = {**os.environ, **s3.env()}
    env.pop("WEIR_S3_ENDPOINT", None)

    def weir(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "weir", "checkpoints", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ls = weir("ls", f"s3://{s3.bucket}/weir")
    assert ls.returncode == 0, ls.stderr
    row = next(line for line in ls.stdout.splitlines() if "0000000007-w1" in line)
    assert row.split()[0] == "checkpoint" and f"{NS}/{JOB}" in row and "1/2" in row

    inspect = weir("inspect", "--verify", res.url)
    assert inspect.returncode == 0, inspect.stderr
    assert "orders/1" in inspect.stdout and "31337" in inspect.stdout and "verify: ok" in inspect.stdout

    as_json = weir("inspect", "--json", res.url)
    [doc] = orjson.loads(as_json.stdout)
    assert doc["partitions"]["orders/1"]["offset"] == 31_337

    for done in (ls, inspect, as_json):
        assert s3.secret_key not in done.stdout + done.stderr
    live.close()


def test_an_unreachable_store_fails_a_write_within_seconds(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    (d / "CURRENT").write_bytes(b"x")
    settings = S3Settings(
        endpoint_url="http://127.0.0.1:9",
        region="us-east-1",
        access_key_id="a",
        secret_access_key="b",
        connect_timeout_s=1,
        max_attempts=2,
    )
    t0 = time.monotonic()
    with (
        CheckpointStore.open("s3://nowhere/weir", NS, JOB, s3=settings) as store,
        pytest.raises(CheckpointError, match=r"s3://nowhere/weir/team-a/revenue/.* failed"),
    ):
        store.write_checkpoint("0000000001-w0", (0, 1), {"orders/0": PartitionSnapshot(d, 0)})
    assert time.monotonic() - t0 < 10
