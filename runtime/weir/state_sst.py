"""A partition database as one SST file: what a savepoint holds per partition.

``export_sst`` writes every entry of a database (a checkpoint of it) into one SST file;
``import_sst`` creates a fresh database from one. See ``weir.checkpoint`` for why SST.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from rocksdict import AccessType, IngestExternalFileOptions, Rdict, SstFileWriter

from weir.rocksdb_options import rocksdb_options


def export_sst(db_dir: Path, sst_path: Path) -> int:
    """Write every entry of the database in ``db_dir`` (e.g. a ``checkpoint``) into one SST file.

    Returns the number of entries; with none, no file is written (RocksDB cannot write an
    empty SST). The file holds the raw keys and values, progress included, and is read back
    by ``import_sst`` into a fresh database of any later version: the SST table format is
    RocksDB's stable, versioned on-disk format with a checksum per block.
    """
    db = Rdict(str(db_dir), rocksdb_options(), access_type=AccessType.read_only())
    try:
        writer: SstFileWriter | None = None
        count = 0
        for key, value in db.items():
            if writer is None:
                sst_path.parent.mkdir(parents=True, exist_ok=True)
                writer = SstFileWriter(rocksdb_options())
                writer.open(str(sst_path))
            writer[key] = value
            count += 1
        if writer is not None:
            writer.finish()
        return count
    finally:
        db.close()


def import_sst(db_dir: Path, sst_path: Path | None) -> None:
    """Create a database in ``db_dir`` (which must not exist) holding the entries of ``sst_path``.

    The file is moved into the database rather than copied; ``None`` gives an empty one.
    """
    if db_dir.exists():
        raise FileExistsError(f"database directory {db_dir} already exists")
    db_dir.parent.mkdir(parents=True, exist_ok=True)
    db = Rdict(str(db_dir), rocksdb_options())
    try:
        if sst_path is not None:
            ingest = IngestExternalFileOptions()
            ingest.set_move_files(True)
            db.ingest_external_file([str(sst_path)], ingest)
    finally:
        db.close()


# A task's state may be several databases checkpointed as one directory (``weir.join_stage.
# StoreSet``): part 0's files as they are, part ``i``'s named ``part<i>-<name>``. A savepoint
# exports each part to its own SST file, ``<stem>.sst`` and ``<stem>.part<i>.sst``.
_PART = re.compile(r"^part(\d+)-(.+)$")
_PART_SST = re.compile(r"\.part(\d+)\.sst$")


def export_parts(db_dir: Path, work: Path, stem: str) -> tuple[list[Path], int]:
    """Export every part of the checkpoint in ``db_dir`` into SST files in ``work`` (named from
    ``stem``); returns the files written (an empty part writes none) and the entries in all."""
    parts: dict[int, list[Path]] = {}
    for f in db_dir.iterdir():
        m = _PART.match(f.name)
        if m is not None and f.is_file():
            parts.setdefault(int(m.group(1)), []).append(f)
    files: list[Path] = []
    main = work / f"{stem}.sst"
    total = export_sst(db_dir, main)
    if total:
        files.append(main)
    for i, members in sorted(parts.items()):
        part_dir = work / f"{stem}.part{i}.db"
        part_dir.mkdir(parents=True)
        for f in members:
            os.link(f, part_dir / _PART.sub(r"\2", f.name))
        sst = work / f"{stem}.part{i}.sst"
        n = export_sst(part_dir, sst)
        shutil.rmtree(part_dir)
        if n:
            files.append(sst)
            total += n
    return files, total


def import_parts(db_dir: Path, ssts: list[Path]) -> None:
    """Create the databases ``export_parts`` exported: part 0 in ``db_dir`` (empty when it had no
    file), part ``i`` in ``db_dir/part<i>``."""
    main = [s for s in ssts if _PART_SST.search(s.name) is None]
    if len(main) > 1:
        raise ValueError(f"{len(main)} main export files: {', '.join(s.name for s in main)}")
    import_sst(db_dir, main[0] if main else None)
    for s in ssts:
        m = _PART_SST.search(s.name)
        if m is not None:
            import_sst(db_dir / f"part{m.group(1)}", s)
