"""Checkpoint benchmark: time and bytes to checkpoint, increment, savepoint and restore one partition's
RocksDB state of 10 MB / 100 MB / 1 GB to the test S3 server (S3Proxy).

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python bench/checkpoint_bench.py [--sizes 10,100,1000] [--series 40] [--out FILE]

It starts (or reuses) the test harness's S3 server, writes into a fresh bucket that it empties
and deletes afterwards, keeps the RocksDB databases under ~/.cache/weir/bench-checkpoint
(removed afterwards) and writes the figures to bench/results/checkpoint.json.

Per size: fill one PartitionStore with random (incompressible) 520-byte values, wait for
RocksDB's background compactions to settle, then measure
- snapshot: ``flush`` + ``PartitionStore.checkpoint`` (what the worker thread is stalled for),
- full: the first ``write_checkpoint`` (hash + upload of every file),
- incremental: change a random 1 % of the keys, snapshot, ``write_checkpoint`` again,
- restore: ``restore`` (download + size/sha256 check) into a new directory, and opening it,
- savepoint: ``write_savepoint`` (export to one SST + upload) and restoring it.
A database that took its whole state in one go holds it in L0 and RocksDB compacts it once,
right after the first checkpoint's memtable flush; the checkpoint after that re-uploads the
compacted files whatever the options. Both are recorded ("full", "settled"); the 1 % change
is measured after the settled one.
With ``--series N``, two fresh 100 MB databases each take N more checkpoints, one after
changing a random 1 % of the keys each time (the worst case: every key range is touched),
the other after adding 1 % new windows at the end of the key range (how window state
usually grows: window keys sort by start time), with a pause like a checkpoint interval
between them; mean / p90 / max bytes uploaded per checkpoint show what compaction adds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from measure import log  # noqa: E402

from harness import s3 as s3_server  # noqa: E402
from weir.checkpoint import CheckpointStore, PartitionSnapshot, S3Settings, StoreReader  # noqa: E402
from weir.state import PartitionStore  # noqa: E402

VALUE_BYTES = 520
WORK = Path(os.environ.get("WEIR_CACHE", Path.home() / ".cache" / "weir")) / "bench-checkpoint"


def _store(path: Path) -> PartitionStore:
    return PartitionStore(path, lambda acc: acc[0], lambda b: [b], max_cached=1000)


def _key(i: int) -> tuple[str, int, int]:
    return (f"key-{i:010d}", 0, 60_000)


def _settle(store: PartitionStore, timeout_s: float = 600) -> float:
    t0 = time.monotonic()
    time.sleep(0.2)
    while store.compacting() and time.monotonic() - t0 < timeout_s:
        time.sleep(0.1)
    return time.monotonic() - t0


class Bench:
    def __init__(self, settings: S3Settings, bucket: str) -> None:
        self.settings = settings
        self.bucket = bucket
        self.seq = 0

    def snapshot(self, live: PartitionStore, offset: int) -> tuple[PartitionSnapshot, float]:
        t0 = time.perf_counter()
        live.flush({"offset": offset, "wm": 0})
        self.seq += 1
        path = live.checkpoint(WORK / "snapshots" / f"s{self.seq}")
        return PartitionSnapshot(path, offset, 0), time.perf_counter() - t0

    def checkpoint(self, store: CheckpointStore, snap: PartitionSnapshot) -> Any:
        res = store.write_checkpoint(f"{self.seq:010d}-w0", (0, 1), {"orders/0": snap})
        shutil.rmtree(snap.path)
        store.retain(keep=2, worker_index=0, owned_partitions=["orders/0"])
        return res

    def prepare(self, size_mb: int, name: str) -> tuple[PartitionStore, CheckpointStore, dict[str, Any]]:
        """A database of ``size_mb`` MB, its full checkpoint, then (after the one compaction of
        the bulk-loaded L0 has run) the checkpoint of the settled database."""
        n = size_mb * 1_000_000 // VALUE_BYTES
        rnd = random.Random(size_mb)
        db_dir = WORK / f"db-{name}"
        shutil.rmtree(db_dir, ignore_errors=True)
        live = _store(db_dir)
        t0 = time.perf_counter()
        for start in range(0, n, 20_000):
            for i in range(start, min(n, start + 20_000)):
                live.put(_key(i), [rnd.randbytes(VALUE_BYTES)])
            live.flush({"offset": start, "wm": 0})
        fill_s = time.perf_counter() - t0
        out: dict[str, Any] = {
            "size_mb": size_mb,
            "windows": n,
            "value_bytes": VALUE_BYTES,
            "fill_seconds": fill_s,
        }
        store = CheckpointStore.open(f"s3://{self.bucket}/bench", "bench", name, s3=self.settings)
        snap, snap_s = self.snapshot(live, n)
        full = self.checkpoint(store, snap)
        out["full"] = _result(full, snap_s)
        out["settle_seconds"] = _settle(live)
        snap, snap_s = self.snapshot(live, n)
        settled = self.checkpoint(store, snap)
        out["settled"] = _result(settled, snap_s)
        log(f"{size_mb} MB ({name}): {n:,} windows written in {fill_s:.1f} s")
        log(f"  full: {_fmt(out['full'])}")
        log(
            f"  compaction of the bulk load settled in {out['settle_seconds']:.1f} s; "
            f"then: {_fmt(out['settled'])}"
        )
        return live, store, out

    def run_size(self, size_mb: int) -> dict[str, Any]:
        live, store, out = self.prepare(size_mb, f"size-{size_mb}")
        n = out["windows"]
        rnd = random.Random(size_mb + 1)
        target = WORK / "restored" / f"r-{size_mb}"
        try:
            for i in rnd.sample(range(n), n // 100):
                live.put(_key(i), [rnd.randbytes(VALUE_BYTES)])
            snap, snap_s = self.snapshot(live, n + 1)
            inc = self.checkpoint(store, snap)
            out["incremental_1pct"] = _result(inc, snap_s)
            out["incremental_ratio_to_full"] = inc.bytes_uploaded / out["full"]["bytes_uploaded"]
            log(
                f"  1 % changed: {_fmt(out['incremental_1pct'])} "
                f"({100 * out['incremental_ratio_to_full']:.2f} % of full)"
            )

            with StoreReader(self.settings) as reader:  # as in a new process: nothing cached
                manifest = reader.read_manifest(inc.url)
                shutil.rmtree(target, ignore_errors=True)
                t0 = time.perf_counter()
                reader.restore(manifest, "orders/0", target)
                restore_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                restored = _store(target)
                count = len(restored)
                open_s = time.perf_counter() - t0
                restored.close()
                assert count == n, (count, n)
                out["restore"] = {
                    "seconds": restore_s,
                    "open_seconds": open_s,
                    "bytes": manifest.total_bytes,
                    "mb_per_s": manifest.total_bytes / 1e6 / restore_s,
                }
                log(
                    f"  restore: {restore_s:.2f} s download+verify ({out['restore']['mb_per_s']:.0f} MB/s), "
                    f"{open_s:.2f} s open"
                )
                shutil.rmtree(target)

                snap, snap_s = self.snapshot(live, n + 2)
                sp = store.write_savepoint(f"sp-{size_mb}", (0, 1), {"orders/0": snap})
                shutil.rmtree(snap.path)
                out["savepoint"] = _result(sp, snap_s)
                log(f"  savepoint: {_fmt(out['savepoint'])}")
                [spm] = reader.read_savepoint(sp.url)
                t0 = time.perf_counter()
                reader.restore(spm, "orders/0", target)
                out["savepoint"]["restore_seconds"] = time.perf_counter() - t0
                log(f"  savepoint restore: {out['savepoint']['restore_seconds']:.2f} s")
                shutil.rmtree(target)
        finally:
            store.close()
            live.close()
            shutil.rmtree(live.path, ignore_errors=True)
            shutil.rmtree(WORK / "snapshots", ignore_errors=True)
        return out

    def run_series(self, size_mb: int, mode: str, count: int) -> dict[str, Any]:
        live, store, prep = self.prepare(size_mb, f"series-{mode}")
        n = prep["windows"]
        rnd = random.Random(7)
        uploads: list[int] = []
        seconds: list[float] = []
        next_new = n
        try:
            for _ in range(count):
                time.sleep(0.3)  # a (short) checkpoint interval: compactions run meanwhile
                if mode == "random_1pct":
                    ids = rnd.sample(range(n), n // 100)
                else:
                    ids = list(range(next_new, next_new + n // 100))
                    next_new += n // 100
                for i in ids:
                    live.put(_key(i), [rnd.randbytes(VALUE_BYTES)])
                snap, _ = self.snapshot(live, n)
                res = self.checkpoint(store, snap)
                uploads.append(res.bytes_uploaded)
                seconds.append(res.seconds)
        finally:
            store.close()
            live.close()
            shutil.rmtree(live.path, ignore_errors=True)
            shutil.rmtree(WORK / "snapshots", ignore_errors=True)
        ordered = sorted(uploads)
        out = {
            "size_mb": size_mb,
            "checkpoints": count,
            "change_bytes": (n // 100) * VALUE_BYTES,
            "uploaded_mean": statistics.mean(uploads),
            "uploaded_p90": ordered[int(0.9 * (len(ordered) - 1))],
            "uploaded_max": ordered[-1],
            "seconds_mean": statistics.mean(seconds),
            "seconds_max": max(seconds),
            "uploaded": uploads,
        }
        log(
            f"  series {mode}: mean {out['uploaded_mean'] / 1e6:.2f} MB, "
            f"p90 {out['uploaded_p90'] / 1e6:.2f} MB, "
            f"max {out['uploaded_max'] / 1e6:.2f} MB per checkpoint"
        )
        return out


def _result(res: Any, snap_s: float) -> dict[str, Any]:
    return {
        "snapshot_seconds": snap_s,
        "upload_seconds": res.seconds,
        "bytes_total": res.bytes_total,
        "bytes_uploaded": res.bytes_uploaded,
        "files_uploaded": res.files_uploaded,
        "mb_per_s": res.bytes_uploaded / 1e6 / res.seconds if res.seconds else None,
    }


def _fmt(r: dict[str, Any]) -> str:
    return (
        f"{r['bytes_uploaded'] / 1e6:.2f} MB uploaded of {r['bytes_total'] / 1e6:.1f} MB "
        f"in {r['upload_seconds']:.2f} s "
        f"({r['files_uploaded']} files), snapshot {1000 * r['snapshot_seconds']:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10,100,1000", help="state sizes in MB (default 10,100,1000)")
    parser.add_argument(
        "--series", type=int, default=40, help="checkpoints per incremental series on 100 MB (0: none)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "checkpoint.json")
    args = parser.parse_args()

    running = s3_server.up()
    helper = s3_server.S3Helper(running)
    settings = S3Settings(
        endpoint_url=helper.endpoint,
        region=helper.region,
        access_key_id=helper.access_key,
        secret_access_key=helper.secret_key,
    )
    bucket = helper.new_bucket("weir-bench")
    bench = Bench(settings, bucket)
    results: list[dict[str, Any]] = []
    series: dict[str, Any] = {}
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(bench.run_size(size))
        if args.series:
            for mode in ("random_1pct", "append_1pct"):
                series[mode] = bench.run_series(100, mode, args.series)
    finally:
        helper.drop_bucket(bucket)
        shutil.rmtree(WORK, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    doc = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit.strip(),
        "command": " ".join([".venv/bin/python", "bench/checkpoint_bench.py", *sys.argv[1:]]),
        "store": f"S3Proxy {running.info.get('version')} on 127.0.0.1 (same machine), path-style",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
        },
        "sizes": results,
        "series": series,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
