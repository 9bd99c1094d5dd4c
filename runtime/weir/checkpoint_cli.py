"""The ``weir checkpoints ls|inspect`` command: tables and JSON of a store's manifests."""

from __future__ import annotations

import argparse
import io
import sys
from typing import IO, Any

import orjson

from weir.checkpoint_manifest import MANIFEST, CorruptCheckpoint, Manifest, iso_ms
from weir.checkpoint_reader import StoreReader
from weir.objectstores import CheckpointError, S3Settings
from weir.state_shape import StateShape

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2


def add_cli(sub: Any) -> None:
    """Register ``weir checkpoints ls|inspect`` on the ``weir`` command's subparsers."""
    cp = sub.add_parser(
        "checkpoints",
        help="list and inspect checkpoints and savepoints in a store",
        description="List and inspect checkpoints and savepoints in a file:// or s3:// store. S3 "
        "credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL_S3 or WEIR_S3_ENDPOINT).",
    )
    cmds = cp.add_subparsers(dest="checkpoints_command", required=True, metavar="ls|inspect")
    ls = cmds.add_parser(
        "ls",
        help="table of the checkpoints and savepoints under a URL",
        description="List every checkpoint and savepoint manifest under URL (a store root, "
        "<store>/<namespace>/<job>, or anything below), newest first.",
    )
    ls.add_argument("url", help="file:///path or s3://bucket/prefix")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect = cmds.add_parser(
        "inspect",
        help="show one checkpoint or savepoint: partitions, offsets, watermarks, files",
        description="Show the checkpoint or savepoint at URL (its directory; for a savepoint "
        "taken by several workers the savepoint directory shows them all).",
        epilog="exit codes: 0 ok, 1 corrupt (with --verify) or store unreachable, 2 nothing at URL",
    )
    inspect.add_argument("url", help="the checkpoint's or savepoint's directory")
    inspect.add_argument("--json", action="store_true", help="print the manifest(s) as JSON")
    inspect.add_argument(
        "--verify", action="store_true", help="download every file and check its size and sha256"
    )


def run_cli(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``weir checkpoints ...``; S3 settings come from the environment."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with StoreReader(S3Settings.from_env()) as reader:
            if args.checkpoints_command == "ls":
                return cli_ls(reader, args.url, args.json, out, err)
            return cli_inspect(reader, args.url, args.json, args.verify, out, err)
    except CorruptCheckpoint as exc:
        print(f"corrupt: {exc}", file=err)
        return EXIT_CORRUPT
    except CheckpointError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_CORRUPT


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "kind": m.kind,
        "id": m.id,
        "url": m.url,
        "createdAt": m.created_iso,
        "createdAtMs": m.created_ms,
        "job": f"{m.namespace}/{m.job}",
        "worker": m.worker_index,
        "workers": m.workers,
        "partitions": sorted(m.partitions),
        "bytes": m.total_bytes,
        "files": m.total_files,
        "weirVersion": m.weir_version,
    }


def cli_ls(reader: StoreReader, url: str, as_json: bool, out: IO[str], err: IO[str]) -> int:
    found = reader.scan(url.rstrip("/"))
    for problem in found.unreadable:
        print(f"warning: {problem}", file=err)
    if as_json:
        doc = {
            "manifests": [_summary(m) for m in found.manifests],
            "unreadable": [str(p) for p in found.unreadable],
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    if not found.manifests:
        print(f"no checkpoints or savepoints under {url}", file=out)
        return EXIT_OK
    rows = [["KIND", "ID", "CREATED", "JOB", "WORKER", "PARTITIONS", "FILES", "SIZE"]]
    for m in found.manifests:
        rows.append(
            [
                m.kind,
                m.id,
                m.created_iso,
                f"{m.namespace}/{m.job}",
                f"{m.worker_index}/{m.workers}",
                str(len(m.partitions)),
                str(m.total_files),
                _size(m.total_bytes),
            ]
        )
    _table(rows, out)
    return EXIT_OK


def cli_inspect(
    reader: StoreReader, url: str, as_json: bool, verify: bool, out: IO[str], err: IO[str]
) -> int:
    url = url.rstrip("/")
    manifests = reader.manifests_at(url)  # a checkpoint, one worker's savepoint, or all its workers
    if not manifests:
        print(f"error: no {MANIFEST} in {url} or in a directory below it", file=err)
        return EXIT_USAGE
    problems: dict[str, list[str]] = {}
    if verify:
        for m in manifests:
            problems[m.url] = reader.verify(m)
    if as_json:
        docs = []
        for m in manifests:
            doc = orjson.loads(m.to_json())
            doc["url"] = m.url
            if verify:
                doc["verify"] = {"ok": not problems[m.url], "problems": problems[m.url]}
            docs.append(doc)
        out.write(orjson.dumps(docs, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        buf = io.StringIO()
        for m in manifests:
            _print_manifest(m, buf)
            if verify:
                if problems[m.url]:
                    print(f"  verify: {len(problems[m.url])} problem(s)", file=buf)
                    for p in problems[m.url]:
                        print(f"    {p}", file=buf)
                else:
                    print(f"  verify: ok ({m.total_files} files, {_size(m.total_bytes)})", file=buf)
        out.write(buf.getvalue())
    return EXIT_CORRUPT if any(problems.values()) else EXIT_OK


def _shape(m: Manifest) -> str:
    """The state shape the snapshot was written with, in one line (what a restore compares)."""
    if m.state_shape is None:
        return "(not recorded: written by an older weir)"
    try:
        return StateShape.from_json(m.state_shape).describe()
    except ValueError as exc:
        return f"(unreadable: {exc})"


def _print_manifest(m: Manifest, out: IO[str]) -> None:
    print(f"{m.kind} {m.id}  job {m.namespace}/{m.job}  worker {m.worker_index}/{m.workers}", file=out)
    print(f"  url: {m.url}", file=out)
    print(
        f"  created: {m.created_iso}  weir {m.weir_version}  {m.total_files} files, {_size(m.total_bytes)}",
        file=out,
    )
    print(f"  state: {_shape(m)}", file=out)
    rows = [["PARTITION", "OFFSET", "WATERMARK", "FILES", "SIZE"]]
    for name, p in sorted(m.partitions.items()):
        wm = "-" if p.watermark is None else f"{p.watermark} ({iso_ms(p.watermark)})"
        rows.append([name, str(p.offset), wm, str(len(p.files)), _size(p.bytes)])
    buf = io.StringIO()
    _table(rows, buf)
    for line in buf.getvalue().splitlines():
        print("  " + line, file=out)
    for name, p in sorted(m.partitions.items()):
        print(f"  {name} files ({p.format}):", file=out)
        for f in p.files:
            print(f"    {f.key}  {f.size} B  sha256 {f.sha256[:16]}", file=out)

