"""The repository layout keeps the standard library and the packages where they belong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_operator_from_the_repository_root_gives_the_standard_library() -> None:
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__, operator.add)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "built-in function add" in out
    assert str(ROOT / "operator") not in out


def test_no_directory_named_operator_is_a_package() -> None:
    offenders = [p for p in ROOT.rglob("operator/__init__.py") if ".venv" not in p.parts]
    assert offenders == []


def test_both_import_packages_come_from_their_source_directories() -> None:
    import weir
    import weir_operator

    assert Path(weir.__file__).parent == ROOT / "runtime" / "weir"
    assert Path(weir_operator.__file__).parent == ROOT / "operator" / "weir_operator"
