"""A partition database as one SST file: what a savepoint holds per partition.

``export_sst`` writes every entry of a database (a checkpoint of it) into one SST file;
``import_sst`` creates a fresh database from one. See ``weir.checkpoint`` for why SST.
"""

from __future__ import annotations

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
