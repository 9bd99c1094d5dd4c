"""The Dockerfile, read as text (no Docker here): two stages on one slim base, a non-root final stage
without build tools, entrypoint `weir`; the .dockerignore keeps the context small."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cmake", "clang", "cargo", "rustc", "apt-get", "apk")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            found.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        else:
            assert found, f"{keyword} before the first FROM"
            found[-1].instructions.append((keyword, args.strip()))
    return found


def test_both_stages_build_on_the_same_slim_python_3_11_base() -> None:
    built = stages()

    assert len(built) == 2
    assert {s.base for s in built} == {"python:3.11-slim-bookworm"}
    assert built[0].name == "build"


def test_the_build_stage_installs_pinned_by_the_constraints_file() -> None:
    build = stages()[0]
    runs = " ".join(build.all("RUN"))

    assert any("constraints.txt" in copy for copy in build.all("COPY"))
    assert "-c constraints.txt" in runs
    assert "--no-index" in runs, "the virtualenv is installed from the wheels built here only"


def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    user = final.all("USER")

    assert len(user) == 1
    uid, _, gid = user[0].partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert gid.isdigit() and int(gid) != 0


def test_the_final_stage_has_no_build_tools_and_copies_only_the_virtualenv() -> None:
    final = stages()[-1]

    for run in final.all("RUN"):
        words = set(shlex.split(run.replace("&&", " ")))
        assert not words & set(BUILD_TOOLS), run
    copies = final.all("COPY")
    assert copies == ["--from=build /opt/weir /opt/weir"]


def test_the_entrypoint_is_weir_and_state_and_tmp_are_volumes() -> None:
    final = stages()[-1]

    assert final.all("ENTRYPOINT") == ['["weir"]']
    env = " ".join(final.all("ENV"))
    assert "PATH=/opt/weir/bin:$PATH" in env
    assert "WEIR_STATE_DIR=/var/lib/weir/state" in env
    assert final.all("VOLUME") == ['["/var/lib/weir/state", "/tmp"]']


def test_the_image_user_is_the_one_the_rendered_pods_and_the_chart_run_as() -> None:
    import yaml

    from weir_operator import render

    uid = int(stages()[-1].all("USER")[0].partition(":")[0])
    chart_values = yaml.safe_load((ROOT / "charts" / "weir-operator" / "values.yaml").read_text())

    assert uid == render.RUN_AS_USER == chart_values["podSecurityContext"]["runAsUser"]


def test_the_dockerignore_keeps_the_virtualenv_git_and_tests_out_of_the_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}

    assert {".git", ".venv", "tests", "**/__pycache__"} <= ignored
    for needed in ("runtime", "operator", "pyproject.toml", "constraints.txt", "README.md"):
        assert needed not in ignored


def test_the_build_stage_builds_the_native_hot_path_into_the_virtualenv() -> None:
    build = stages()[0]
    runs = " ".join(build.all("RUN"))

    assert "COPY native ./native" in [f"COPY {c}" for c in build.all("COPY")]
    assert "pip wheel --no-deps --wheel-dir /wheels ./native" in runs
    assert "--find-links /wheels weir weir-native" in runs, "the image runs the native path, not the fallback"
    assert any(c.startswith("--from=rust:") for c in build.all("COPY")), "Rust comes from the official image"
