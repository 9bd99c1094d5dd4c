"""The memory budget: its syntax and how it is split between the parts that hold memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from weir import cli, memory, spec
from weir.memory import MemoryBudgetTooSmall, MemoryPlan, parse_size

MiB = 1 << 20
EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("268435456", 256 * MiB),
        ("256Mi", 256 * MiB),
        ("1.5Gi", 3 * 512 * MiB),
        ("512M", 512_000_000),
        ("1e9", 1_000_000_000),
        ("64Ki", 65536),
    ],
)
def test_a_budget_is_bytes_or_a_kubernetes_quantity(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1", "256MiB", "0", "1 Mb"])
def test_anything_else_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)
    assert repr(text) in str(info.value)


def test_the_budget_above_the_base_is_split_between_kafka_rocksdb_and_windows() -> None:
    plan = MemoryPlan.split(256 * MiB, 80 * MiB)
    free = 176 * MiB
    assert plan.base == 80 * MiB
    assert plan.kafka_queues == int(free * memory.KAFKA_SHARE)
    assert plan.rocksdb == int(free * memory.ROCKSDB_SHARE)
    assert plan.base + plan.kafka_queues + plan.rocksdb + plan.windows == plan.budget
    assert plan.window_share(4) == plan.windows // 4
    assert plan.shares() == {
        "base": plan.base,
        "windows": plan.windows,
        "rocksdb": plan.rocksdb,
        "kafka_queues": plan.kafka_queues,
    }


def test_the_kafka_share_bounds_both_client_queues() -> None:
    plan = MemoryPlan.split(1024 * MiB, 100 * MiB)
    consumer = plan.consumer_queue_kbytes * 1024 + plan.fetch_max_bytes
    producer = plan.producer_queue_kbytes * 1024
    assert consumer + producer <= plan.kafka_queues + 2048
    assert plan.consumer_queue_messages(4) * 4 * memory.MESSAGE_BYTES <= plan.kafka_queues // 3
    assert plan.producer_queue_messages * memory.MESSAGE_BYTES <= plan.kafka_queues // 3


def test_a_budget_below_the_process_plus_the_floors_is_refused_naming_both() -> None:
    with pytest.raises(MemoryBudgetTooSmall, match=r"memory budget 64Mi is below the minimum 80Mi"):
        MemoryPlan.split(64 * MiB, 60 * MiB)


def test_a_small_budget_still_gives_every_part_its_floor() -> None:
    plan = MemoryPlan.split(100 * MiB, 70 * MiB)
    assert plan.kafka_queues >= memory.KAFKA_FLOOR
    assert plan.rocksdb >= memory.ROCKSDB_FLOOR
    assert plan.windows >= memory.WINDOWS_FLOOR
    assert plan.base + plan.kafka_queues + plan.rocksdb + plan.windows == plan.budget


def test_the_resident_size_of_this_process_is_read() -> None:
    assert memory.rss_bytes() > 10 * MiB


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WEIR_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("flag", "env", "message"),
    [
        ("lots", None, "--memory-budget: memory size 'lots' is not a number of bytes"),
        (None, "12Mi", "--memory-budget: memory budget 12Mi is below the minimum"),
    ],
)
def test_weir_run_refuses_a_bad_or_too_small_budget_in_one_line_before_connecting(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flag: str | None,
    env: str | None,
    message: str,
) -> None:
    if env is not None:
        monkeypatch.setenv("WEIR_MEMORY_BUDGET", env)
    args = ["run", str(EXAMPLE), "--state-dir", str(tmp_path), "--http-port", "0"]
    if flag is not None:
        args += ["--memory-budget", flag]

    code = cli.main(args)

    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_SPEC == 2
    assert len(err) == 1
    assert err[0].startswith(message)
