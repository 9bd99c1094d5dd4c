"""`weir up` with the real broker: the local platform runs a StreamJob through the operator's reconciler."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from harness import up
from harness.kafka import KafkaHelper, Message
from weir.testing import random_events, reference_windows

pytestmark = pytest.mark.kafka

START_MS = 1_704_067_200_000  # 2024-01-01: in the past, so idle partitions close their windows
OOO_MS = 2_000
OUTPUTS = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "price"}}
SPECS = [(name, o["fn"], o.get("field")) for name, o in OUTPUTS.items()]


def _manifest(
    path: Path, name: str, kafka: KafkaHelper, source: str, sink: str, dlq: str, idle: str = "2s", **spec: Any
) -> Path:
    document = {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "local"},
        "spec": {
            "parallelism": 2,
            "kafka": {"bootstrapServers": kafka.bootstrap},
            "pipeline": {
                "source": {"topics": [source], "eventTime": {"field": "ts"}},
                "watermark": {"maxOutOfOrderness": f"{OOO_MS}ms", "idleTimeout": idle},
                "steps": [
                    {"window": {"type": "tumbling", "size": "10s"}},
                    {"aggregate": {"emit": "final", "outputs": OUTPUTS}},
                ],
                "sink": {"topic": sink},
                "deadLetter": {"topic": dlq},
            },
            **spec,
        },
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _topics(kafka: KafkaHelper, partitions: int) -> tuple[str, str, str]:
    """A fresh source (``partitions``), sink and dead-letter topic."""
    source, sink, dlq = kafka.unique("src"), kafka.unique("out"), kafka.unique("dlq")
    kafka.create_topic(source, partitions)
    kafka.create_topic(sink, 1)
    kafka.create_topic(dlq, 1)
    return source, sink, dlq


def _all_windows_once(kafka: KafkaHelper, sink: str, expected: Any, process: Any, log: Path) -> None:
    """Wait for every expected window, give duplicates time to show, then stop ``weir up``."""
    up.wait(lambda: len(kafka.read_all(sink, timeout=5)) >= len(expected), 120, "all windows", log)
    time.sleep(3)  # anything emitted twice would show up now
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0, log.read_text()


def _produce(kafka: KafkaHelper, topic: str, events: list[Any]) -> None:
    kafka.produce(
        topic,
        [
            {"value": orjson.dumps({**record, "ts": ts}), "key": key.encode(), "partition": partition}
            for partition, key, ts, record in events
        ],
    )


def _results(messages: list[Message]) -> dict[tuple[str, int, int], dict[str, Any]]:
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for message in messages:
        assert message.value is not None
        record = orjson.loads(message.value)
        key = (record["key"], record["windowStartMs"], record["windowEndMs"])
        assert key not in out, f"window {key} emitted twice"
        out[key] = {name: record[name] for name in OUTPUTS}
    return out


def _expected(events: list[Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    expected, _late = reference_windows(events, "tumbling", 10_000, None, None, 0, OOO_MS, SPECS)
    return expected


def _worker_pids(manifest_dir: Path) -> dict[int, int]:
    """pid of each `weir run` worker started for the job directory (from /proc)."""
    pids: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "run" in words and "--worker-index" in words and any(str(manifest_dir) in w for w in words):
            pids[int(words[words.index("--worker-index") + 1])] = int(proc.name)
    return pids


def test_weir_up_runs_a_job_end_to_end_with_the_reference_results(kafka: KafkaHelper, tmp_path: Path) -> None:
    name = "up-" + kafka.unique("j")[-8:]
    source, sink, dlq = _topics(kafka, 2)
    events = random_events(7, 400, partitions=2, keys=6, start_ms=START_MS, mean_step_ms=150,
                           max_out_of_orderness_ms=OOO_MS // 2, too_late_fraction=0.0)
    _produce(kafka, source, events)
    expected = _expected(events)
    manifest = _manifest(tmp_path / "job.yaml", name, kafka, source, sink, dlq)
    state, log = tmp_path / "state", tmp_path / "up.log"

    with up.weir_up(manifest, state, kafka.bootstrap, log) as process:
        up.wait(lambda: up.status(state, name).get("phase") == "Running", 60, "phase Running", log)
        up.wait(lambda: len(kafka.read_all(sink, timeout=5)) >= len(expected), 90, "all windows", log)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0, log.read_text()

    assert _results(kafka.read_all(sink)) == expected
    output = log.read_text()
    assert "NAME" in output and "PHASE" in output and "PARALLELISM" in output and "LAST CHECKPOINT" in output
    assert any(line.split()[:3] == [name, "Running", "2"] for line in output.splitlines() if line.strip())
    status = up.status(state, name)
    shutdown = status["lastSavepoint"]
    assert shutdown["trigger"] == "shutdown"
    assert shutdown.get("url") and status["parallelism"] == 0, status
    assert _worker_pids(state / "local" / name) == {}
    assert status["observedGeneration"] == 1
    assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded", "Stalled"}
    events_log = (state / "local" / name / "events.log").read_text()
    assert "Deploying" in events_log and "PhaseRunning" in events_log


@pytest.mark.timeout(300)
def test_a_sigkilled_worker_is_restarted_and_the_output_stays_exact(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    name = "kill-" + kafka.unique("j")[-8:]
    source, sink, dlq = _topics(kafka, 2)
    events = random_events(11, 800, partitions=2, keys=6, start_ms=START_MS, mean_step_ms=150,
                           max_out_of_orderness_ms=OOO_MS // 2, too_late_fraction=0.0)
    first, second = events[:400], events[400:]
    # Idle partitions close windows by the wall clock: the pause between the two halves must
    # stay under the idle timeout, or the second half's records would rightly be late.
    manifest = _manifest(tmp_path / "job.yaml", name, kafka, source, sink, dlq, idle="30s",
                         checkpoint={"url": (tmp_path / "store").as_uri(), "interval": "1s"})
    state, log = tmp_path / "state", tmp_path / "up.log"
    _produce(kafka, source, first)

    with up.weir_up(manifest, state, kafka.bootstrap, log) as process:
        up.wait(lambda: up.status(state, name).get("lastCheckpoint") is not None, 90, "a checkpoint", log)
        pids = _worker_pids(state / "local" / name)
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        up.wait(lambda: (up.status(state, name).get("workerRestarts") or 0) >= 1, 60, "worker restarted", log)
        _produce(kafka, source, second)
        expected = _expected(events)
        _all_windows_once(kafka, sink, expected, process, log)

    assert _results(kafka.read_all(sink)) == expected
    assert _worker_pids(state / "local" / name) == {}


@pytest.mark.timeout(300)
def test_changing_the_parallelism_rescales_through_a_savepoint_and_the_output_stays_exact(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    name = "scale-" + kafka.unique("j")[-8:]
    source, sink, dlq = _topics(kafka, 4)
    events = random_events(13, 800, partitions=4, keys=8, start_ms=START_MS, mean_step_ms=150,
                           max_out_of_orderness_ms=OOO_MS // 2, too_late_fraction=0.0)
    first, second = events[:400], events[400:]
    checkpoint = {"url": (tmp_path / "store").as_uri(), "interval": "1s"}
    manifest = _manifest(tmp_path / "job.yaml", name, kafka, source, sink, dlq, idle="30s",
                         checkpoint=checkpoint)
    state, log = tmp_path / "state", tmp_path / "up.log"
    _produce(kafka, source, first)

    with up.weir_up(manifest, state, kafka.bootstrap, log) as process:
        up.wait(lambda: up.status(state, name).get("lastCheckpoint") is not None, 90, "a checkpoint", log)
        _manifest(manifest, name, kafka, source, sink, dlq, idle="30s", checkpoint=checkpoint, parallelism=3)
        up.wait(lambda: up.status(state, name).get("parallelism") == 3
              and up.status(state, name).get("phase") == "Running", 90, "3 workers running", log)
        assert sorted(_worker_pids(state / "local" / name)) == [0, 1, 2]
        _produce(kafka, source, second)
        expected = _expected(events)
        _all_windows_once(kafka, sink, expected, process, log)

    assert _results(kafka.read_all(sink)) == expected
    status = up.status(state, name)
    upgrade = [s for s in status["savepointHistory"] if s["trigger"] == "upgrade"]
    assert len(upgrade) == 1 and upgrade[0].get("url"), status["savepointHistory"]
    events_log = (state / "local" / name / "events.log").read_text()
    # "Scaled" waits for the stability gate (upgrade.stabilityWindow); applied is "Stabilizing".
    assert "Scaling" in events_log and "Stabilizing" in events_log


@pytest.mark.timeout(300)
def test_a_parallelism_above_the_partition_count_is_capped_to_it_and_the_output_stays_exact(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    name = "cap-" + kafka.unique("j")[-8:]
    source, sink, dlq = _topics(kafka, 2)
    events = random_events(17, 400, partitions=2, keys=6, start_ms=START_MS, mean_step_ms=150,
                           max_out_of_orderness_ms=OOO_MS // 2, too_late_fraction=0.0)
    _produce(kafka, source, events)
    expected = _expected(events)
    checkpoint = {"url": (tmp_path / "store").as_uri(), "interval": "1s"}
    manifest = _manifest(tmp_path / "job.yaml", name, kafka, source, sink, dlq, checkpoint=checkpoint,
                         parallelism=3)
    state, log = tmp_path / "state", tmp_path / "up.log"

    def capped() -> bool:
        status = up.status(state, name)
        degraded = next((c for c in status.get("conditions", ()) if c["type"] == "Degraded"), {})
        return (status.get("parallelism") == 2 and status.get("phase") == "Running"
                and degraded.get("reason") == "ParallelismCapped")

    with up.weir_up(manifest, state, kafka.bootstrap, log) as process:
        # The 3 workers report 2 partitions; the job is rescaled (through a savepoint) to 2.
        up.wait(capped, 120, "capped at 2 workers", log)
        assert sorted(_worker_pids(state / "local" / name)) == [0, 1]
        _all_windows_once(kafka, sink, expected, process, log)

    assert _results(kafka.read_all(sink)) == expected
    status = up.status(state, name)
    assert status["inputPartitions"] == {source: 2}
    events_log = (state / "local" / name / "events.log").read_text()
    assert f"parallelism 3 exceeds the 2 partitions of {source}; running 2 workers" in events_log


def test_a_savepoint_trigger_nonce_lands_in_the_savepoint_history(kafka: KafkaHelper, tmp_path: Path) -> None:
    name = "nonce-" + kafka.unique("j")[-8:]
    source, sink, dlq = _topics(kafka, 2)
    _produce(kafka, source, random_events(3, 200, partitions=2, keys=4, start_ms=START_MS, mean_step_ms=150,
                                          max_out_of_orderness_ms=OOO_MS // 2, too_late_fraction=0.0))
    store = tmp_path / "store"
    checkpoint = {"url": store.as_uri(), "interval": "1s"}
    manifest = _manifest(tmp_path / "job.yaml", name, kafka, source, sink, dlq, checkpoint=checkpoint)
    state, log = tmp_path / "state", tmp_path / "up.log"

    with up.weir_up(manifest, state, kafka.bootstrap, log):
        up.wait(lambda: up.status(state, name).get("phase") == "Running", 60, "phase Running", log)
        _manifest(manifest, name, kafka, source, sink, dlq, checkpoint=checkpoint, savepointTriggerNonce=1)
        up.wait(lambda: bool(up.status(state, name).get("savepointHistory")), 60, "a savepoint", log)

    history = up.status(state, name)["savepointHistory"]
    nonce = [s for s in history if s["trigger"] == "nonce"]
    assert nonce and nonce[0]["triggerNonce"] == 1 and nonce[0].get("url"), history
    assert nonce[0]["url"].startswith(store.as_uri())
    assert Path(nonce[0]["url"].removeprefix("file://")).is_dir()


def test_a_manifest_taken_out_of_weir_up_deletes_the_job_and_cleanup_delete_removes_its_store(
    kafka: KafkaHelper, tmp_path: Path
) -> None:
    source, dlq = kafka.unique("src"), kafka.unique("dlq")
    kafka.create_topic(source, 2)
    kafka.create_topic(dlq, 1)
    _produce(kafka, source, random_events(5, 200, partitions=2, keys=4, start_ms=START_MS, mean_step_ms=150,
                                          max_out_of_orderness_ms=OOO_MS // 2, too_late_fraction=0.0))
    jobs, store = tmp_path / "jobs", tmp_path / "store"
    jobs.mkdir()
    names = {policy: f"{policy}-" + kafka.unique("j")[-8:] for policy in ("delete", "retain")}
    for policy, name in names.items():
        sink = kafka.unique("out")
        kafka.create_topic(sink, 1)
        _manifest(jobs / f"{name}.yaml", name, kafka, source, sink, dlq,
                  checkpoint={"url": store.as_uri(), "interval": "1s", "cleanupPolicy": policy})
    state, log = tmp_path / "state", tmp_path / "up.log"

    with up.weir_up(jobs, state, kafka.bootstrap, log):
        for name in names.values():
            def checkpointed(n: str = name) -> bool:
                return up.status(state, n).get("lastCheckpoint") is not None

            up.wait(checkpointed, 90, "a checkpoint", log)
        for name in names.values():
            assert (store / "local" / name / "checkpoints").is_dir()
            (jobs / f"{name}.yaml").unlink()
        for name in names.values():
            up.wait(lambda n=name: not _worker_pids(state / "local" / n), 60, "the workers stopped", log)
        up.wait(lambda: not (store / "local" / names["delete"]).exists(), 30, "store removed", log)
        time.sleep(2)  # a removed job is not started again
        assert not _worker_pids(state / "local" / names["delete"])

    assert (store / "local" / names["retain"] / "checkpoints").is_dir()
    events_log = (state / "local" / names["delete"] / "events.log").read_text()
    assert "CleaningUp" in events_log and f"under {store.as_uri()}/local/{names['delete']}" in events_log
    assert up.status(state, names["delete"])["phase"] == "Deleting"
