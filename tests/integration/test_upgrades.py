"""Safe upgrades through `weir up`: real workers on the real broker, checkpoints and savepoints in S3.

Each test runs a windowed count/sum job (2 workers, 2 partitions, 10 s tumbling windows) and feeds
it its input in phases, one per version: the records of a phase start at a window boundary and
are in event-time order within each partition, so which windows a version closes is known in
advance (the last window of a phase stays open until the next phase's records arrive).
Partitions never go idle (no idle timeout); one far-future record per partition at the end
closes every window. The read_committed output is compared with the brute-force reference
(``weir.testing.reference_windows``) window by window: nothing lost, nothing twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

import user_functions
from harness import up
from harness.kafka import KafkaHelper
from harness.s3 import S3Helper
from weir.testing import reference_windows
from weir_operator.crashpoints import ENV_CRASH_AT, STEPS

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

Event = tuple[int, str, int, dict[str, Any]]  # (partition, key, event time, record)
Window = tuple[str, int, int]  # (key, start, end)

START_MS = 1_704_067_200_000  # 2024-01-01
SIZE_MS = 10_000
OOO_MS = 1_000
PARTITIONS = 2
PER_WINDOW = 5
"""Records per partition and window, evenly spaced: the last is 8 s into its window, so the next
window's first record moves the watermark past the previous window's end."""
END_MS = START_MS + 10_000_000
"""Event time of the closing record of each partition: closes every window of the test."""
OUTPUTS: dict[str, dict[str, str]] = {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "price"}}
TESTS_DIR = str(Path(user_functions.__file__).parent)
UPGRADE = {"stabilityWindow": "5s", "readinessTimeout": "40s"}
ADOPTED = "workers of a previous weir up still run"


# --------------------------------------------------------------------------- the job and its input


class Upgradable:
    """One job run by `weir up`: its manifest, topics, store, input so far, and the `weir up` process."""

    def __init__(self, kafka: KafkaHelper, s3: S3Helper, tmp_path: Path, prefix: str, **spec: Any) -> None:
        self.kafka, self.s3 = kafka, s3
        self.name = f"{prefix}-{kafka.unique('j')[-6:]}"
        self.source = kafka.create_topic(kafka.unique("src"), PARTITIONS)
        self.sink = kafka.create_topic(kafka.unique("out"), 1)
        self.dlq = kafka.create_topic(kafka.unique("dlq"), 1)
        self.prefix = "ck"
        self.path = tmp_path / "job.yaml"
        self.state = tmp_path / "state"
        self.log = tmp_path / "up.log"
        self.events: list[Event] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._log_sink: Any = None
        self.spec: dict[str, Any] = {}
        self.write(**spec)

    # the manifest
    def write(self, *, outputs: dict[str, Any] | None = None, size_ms: int = SIZE_MS,
              steps: tuple[dict[str, Any], ...] = (), upgrade: dict[str, Any] | None = None,
              **spec: Any) -> None:
        """(Re)write the manifest: a new spec is a new generation for the running `weir up`."""
        document: dict[str, Any] = {
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "StreamJob",
            "metadata": {"name": self.name, "namespace": "local"},
            "spec": {
                "parallelism": PARTITIONS,
                "kafka": {"bootstrapServers": self.kafka.bootstrap},
                "checkpoint": {"url": f"s3://{self.s3.bucket}/{self.prefix}", "endpoint": self.s3.endpoint,
                               "region": self.s3.region, "interval": "1s"},
                "upgrade": {**UPGRADE, **(upgrade or {})},
                "pipeline": {
                    "source": {"topics": [self.source], "eventTime": {"field": "ts"}},
                    "watermark": {"maxOutOfOrderness": f"{OOO_MS}ms"},
                    "steps": [
                        *steps,
                        {"window": {"type": "tumbling", "size": f"{size_ms}ms"}},
                        {"aggregate": {"emit": "final", "outputs": outputs or OUTPUTS}},
                    ],
                    "sink": {"topic": self.sink},
                    "deadLetter": {"topic": self.dlq},
                },
                **spec,
            },
        }
        self.spec = document["spec"]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(document, sort_keys=False))
        tmp.replace(self.path)  # weir up never reads half a manifest

    # the input
    def produce(self, first_window: int, windows: int, seed: int, *, size_ms: int = SIZE_MS,
                poison: bool = False) -> list[Event]:
        """Records for ``windows`` windows from ``first_window`` on, in order per partition; key
        ``k<i>`` lives in partition ``i % 2``. ``poison``: the first record of partition 0 is marked."""
        rng = random.Random(seed)
        events: list[Event] = []
        step = size_ms // PER_WINDOW
        for w in range(first_window, first_window + windows):
            base = START_MS + w * size_ms
            for p in range(PARTITIONS):
                for i in range(PER_WINDOW):
                    key = f"k{rng.randrange(3) * PARTITIONS + p}"
                    events.append((p, key, base + i * step + rng.randrange(step // 2),
                                   {"price": rng.randint(1, 100)}))
        if poison:
            p0 = next(i for i, e in enumerate(events) if e[0] == 0)
            events[p0] = (*events[p0][:3], {**events[p0][3], "poison": True})
        self._send(events)
        return events

    def close_windows(self) -> None:
        """A far-future record per partition: every window closes (their own windows never do)."""
        self._send([(p, f"end{p}", END_MS, {"price": 1}) for p in range(PARTITIONS)])

    def _send(self, events: list[Event]) -> None:
        self.kafka.produce(self.source, [
            {"value": orjson.dumps({**record, "ts": ts}), "key": key.encode(), "partition": p}
            for p, key, ts, record in events
        ])
        self.events += events

    # weir up
    def start(self, crash_at: str | None = None) -> None:
        """Start `weir up`; ``crash_at``: ``<step>@<generation>`` where it SIGKILLs itself."""
        env = {**os.environ, **self.s3.env(),
               "PYTHONPATH": os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)}
        env.pop(ENV_CRASH_AT, None)
        if crash_at is not None:
            env[ENV_CRASH_AT] = crash_at
        self._log_sink = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "weir", "up", str(self.path), "--state-dir",
             str(self.state), "--bootstrap-servers", self.kafka.bootstrap, "--interval", "5"],
            stdout=self._log_sink, stderr=subprocess.STDOUT, env=env,
        )

    def kill(self) -> None:
        """SIGKILL `weir up` (its workers are left running, as after a crash)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log_sink.close()

    def stop(self) -> None:
        """SIGTERM `weir up`: a shutdown savepoint, then its workers stop."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=90) == 0, self.tail()
        if self._log_sink is not None:
            self._log_sink.close()

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in worker_pids(self.state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # observing
    def status(self) -> dict[str, Any]:
        return up.status(self.state, self.name)

    def events_log(self) -> str:
        path = self.state / "local" / self.name / "events.log"
        return path.read_text() if path.exists() else ""

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.3)
        raise AssertionError(f"{what}: not within {timeout}s\nstatus: {self.status()}\n"
                             f"--- events ---\n{self.events_log()[-3000:]}\n--- weir up ---\n{self.tail()}")

    def wait_stable(self, generation: int, timeout: float = 90) -> None:
        def stable() -> bool:
            status = self.status()
            return (status.get("lifecycleState") == "Stable"
                    and (status.get("stable") or {}).get("generation") == generation)

        self.wait(stable, f"generation {generation} Stable", timeout)

    def output(self) -> dict[Window, dict[str, Any]]:
        """The committed results, by window; a window emitted twice fails."""
        out: dict[Window, dict[str, Any]] = {}
        for message in self.kafka.read_all(self.sink, timeout=10):
            assert message.value is not None
            record = orjson.loads(message.value)
            window = (record["key"], record["windowStartMs"], record["windowEndMs"])
            assert window not in out, f"window {window} emitted twice"
            out[window] = {k: v for k, v in record.items()
                           if k not in ("key", "windowStart", "windowEnd", "windowStartMs", "windowEndMs")}
        return out

    def wait_output(self, windows: set[Window], what: str, timeout: float = 90) -> None:
        try:
            self.wait(lambda: windows <= set(self.output()), what, timeout)
        except AssertionError as exc:
            missing = sorted(windows - set(self.output()))
            dead = [(dict(m.headers).get("weir.reason"), m.value)
                    for m in self.kafka.read_all(self.dlq, timeout=5)]
            raise AssertionError(f"{exc}\nmissing windows: {missing[:20]}\ndead letters: {dead[:10]}"
                                 ) from None

    def savepoint_ids(self) -> set[str]:
        """The savepoints in the store (listing the bucket)."""
        client = self.s3.client()
        try:
            prefix = f"{self.prefix}/local/{self.name}/savepoints/"
            ids = set()
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.s3.bucket, Prefix=prefix)
            for page in pages:
                ids |= {o["Key"][len(prefix):].split("/", 1)[0] for o in page.get("Contents", ())}
            return ids
        finally:
            client.close()

    def savepoint_complete_in_store(self, savepoint_id: str) -> bool:
        client = self.s3.client()
        try:
            prefix = f"{self.prefix}/local/{self.name}/savepoints/{savepoint_id}/"
            listed = client.list_objects_v2(Bucket=self.s3.bucket, Prefix=prefix).get("Contents", ())
            return sum(1 for o in listed if o["Key"].endswith("/manifest.json")) == PARTITIONS
        finally:
            client.close()


def worker_pids(state: Path) -> dict[int, str]:
    """pid -> manifest of every `weir run` worker whose state directory is under ``state``."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = [w.decode(errors="replace") for w in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "run" in words and "--state-dir" in words and words[words.index("--state-dir") + 1].startswith(
            str(state)
        ):
            found[int(proc.name)] = words[words.index("run") + 1]
    return found


def reference(events: list[Event], size_ms: int = SIZE_MS, outputs: dict[str, Any] | None = None
              ) -> dict[Window, dict[str, Any]]:
    """The final result of every window of ``events`` (the closing records' windows left out)."""
    specs = [(name, o["fn"], o.get("field")) for name, o in (outputs or OUTPUTS).items()]
    windows, late = reference_windows(events, "tumbling", size_ms, None, None, 0, OOO_MS, specs)
    assert not late
    return {w: r for w, r in windows.items() if not w[0].startswith("end")}


def closed(events: list[Event], size_ms: int = SIZE_MS) -> set[Window]:
    """The windows of ``events`` their own watermarks have closed (the rest are still open)."""
    watermark: dict[int, int] = {}
    partition_of: dict[str, int] = {}
    for p, key, ts, _ in events:
        watermark[p] = max(watermark.get(p, ts - OOO_MS), ts - OOO_MS)
        partition_of[key] = p
    return {w for w in reference(events, size_ms) if w[2] - 1 <= watermark[partition_of[w[0]]]}


def window_index(window: Window, size_ms: int = SIZE_MS) -> int:
    return (window[1] - START_MS) // size_ms


@pytest.fixture
def job_factory(kafka: KafkaHelper, s3: S3Helper, tmp_path: Path) -> Iterator[Callable[..., Upgradable]]:
    made: list[Upgradable] = []

    def make(prefix: str, **spec: Any) -> Upgradable:
        job = Upgradable(kafka, s3, tmp_path, prefix, **spec)
        made.append(job)
        return job

    yield make
    for job in made:
        job.cleanup()


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", ()) if c["type"] == type_), {})


def _upgrade_savepoints(status: dict[str, Any], generation: int) -> list[dict[str, Any]]:
    return [s for s in status.get("savepointHistory", ())
            if s["trigger"] == "upgrade" and s.get("generation") == generation]


# --------------------------------------------------------------------------- (a) a compatible upgrade


@pytest.mark.timeout(240)
def test_a_compatible_upgrade_becomes_stable_and_the_output_stays_exact(
    job_factory: Callable[..., Upgradable],
) -> None:
    job = job_factory("compat")
    first = job.produce(0, 3, seed=1)
    job.start()
    job.wait_stable(1)
    job.wait_output(closed(first), "the first version's windows")

    # A filter every record passes: the workers restart, the state keeps its meaning.
    job.write(steps=({"filter": {"field": "price", "op": "gt", "value": 0}},))
    job.wait_stable(2)
    job.produce(3, 3, seed=2)
    job.close_windows()
    expected = reference(job.events)
    job.wait_output(set(expected), "every window")
    time.sleep(3)  # a window emitted twice would show now
    status = job.status()  # before the shutdown savepoint suspends the job
    job.stop()

    assert job.output() == expected
    added = {"filter": {"field": "price", "op": "gt", "value": 0}}
    assert status["lastStableSpec"]["pipeline"]["steps"][0] == added
    upgrade = _upgrade_savepoints(status, 2)
    assert len(upgrade) == 1 and upgrade[0].get("url") and not upgrade[0].get("error"), upgrade
    events = job.events_log()
    assert "Upgrading" in events and "Stable" in events and "Upgraded" in events


# --------------------------------------------------------------------------- (b) a crash-looping upgrade


@pytest.mark.timeout(300)
def test_an_upgrade_that_crash_loops_is_rolled_back_automatically_and_the_output_stays_exact(
    job_factory: Callable[..., Upgradable],
) -> None:
    job = job_factory("crashy", upgrade={"readinessTimeout": "25s"})
    first = job.produce(0, 3, seed=3)
    job.start()
    job.wait_stable(1)
    job.wait_output(closed(first), "the first version's windows")

    # Version 2 fails (exit 6) on the first record of partition 0 that it reads.
    job.write(steps=({"map": {"function": "user_functions:fail_on_poison", "onError": "fail"}},),
              upgrade={"readinessTimeout": "25s"})
    job.wait(lambda: (job.status().get("stabilization") or {}).get("generation") == 2, "generation 2 applied")
    job.produce(3, 2, seed=4, poison=True)
    job.wait(lambda: job.status().get("lifecycleState") == "RolledBack", "rolled back", timeout=150)
    job.produce(5, 2, seed=5)
    job.close_windows()
    expected = reference(job.events)
    job.wait_output(set(expected), "every window")
    time.sleep(3)
    status = job.status()  # before the shutdown savepoint suspends the job
    job.stop()

    assert job.output() == expected
    degraded = _condition(status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "RolledBack", degraded
    assert "generation 2" in degraded["message"] and "exit code 6" in degraded["message"], degraded
    assert status["rollback"]["fromGeneration"] == 2 and status["rollback"]["toGeneration"] == 1
    assert status["stable"]["generation"] == 1
    assert "map" not in str(status["lastStableSpec"]["pipeline"]["steps"])
    events = job.events_log()
    assert "RollingBack" in events and "RolledBack" in events


@pytest.mark.timeout(300)
def test_reverting_a_crash_looping_upgrade_by_hand_under_savepoint_mode_restores_the_stable_savepoint(
    job_factory: Callable[..., Upgradable],
) -> None:
    # The issue: the revert's savepoint request met the crash-looping worker (connection refused).
    job = job_factory("revert", upgrade={"rollback": "manual"})
    first = job.produce(0, 3, seed=13)
    job.start()
    job.wait_stable(1)
    job.wait_output(closed(first), "the first version's windows")
    job.write(steps=({"map": {"function": "user_functions:fail_on_poison", "onError": "fail"}},),
              upgrade={"rollback": "manual"})
    job.wait(lambda: (job.status().get("stabilization") or {}).get("generation") == 2, "generation 2 applied")
    job.produce(3, 2, seed=14, poison=True)
    job.wait(lambda: _condition(job.status(), "Degraded").get("reason") == "WorkersCrashLooping",
             "crash loop")

    job.write(upgrade={"rollback": "manual"})  # back to version 1, by hand
    job.wait_stable(3)
    job.produce(5, 2, seed=15)
    job.close_windows()
    expected = reference(job.events)
    job.wait_output(set(expected), "every window")
    time.sleep(3)
    status = job.status()
    job.stop()

    assert job.output() == expected
    assert not _upgrade_savepoints(status, 3)  # none could be taken from the crash-looping version
    (taken,) = _upgrade_savepoints(status, 2)  # the savepoint version 1 stopped with
    assert f"restoring the stable version's {taken['url']}" in job.events_log()
    assert not [s for s in status["savepointHistory"] if s.get("error")], status["savepointHistory"]
    assert "map" not in str(status["lastStableSpec"]["pipeline"]["steps"])


# --------------------------------------------------------------------------- (c) an incompatible change


@pytest.mark.timeout(300)
def test_an_incompatible_window_change_is_refused_while_the_old_job_runs_and_a_state_reset_applies_it(
    job_factory: Callable[..., Upgradable],
) -> None:
    job = job_factory("resize")
    first = job.produce(0, 4, seed=6)
    job.start()
    job.wait_stable(1)
    job.wait_output(closed(first), "the first version's windows")

    job.write(size_ms=20_000)

    def refused() -> bool:
        stalled = _condition(job.status(), "Stalled")
        return stalled.get("status") == "True" and stalled.get("reason") == "IncompatibleStateChange"

    job.wait(refused, "Stalled IncompatibleStateChange")
    stalled = _condition(job.status(), "Stalled")
    assert "pipeline.window.size" in stalled["message"] and "allowStateReset" in stalled["message"], stalled
    # The old version keeps running and producing: the next phase's windows come out of it.
    second = job.produce(4, 2, seed=7)
    job.wait_output(closed(first + second), "windows of the old version after the refusal")
    assert job.status()["stable"]["generation"] == 1 and not job.savepoint_ids()

    # With the opt-in: an upgrade through a savepoint; the new version starts with empty windows.
    job.write(size_ms=20_000, upgrade={"allowStateReset": True})
    job.wait_stable(3)
    third = job.produce(4, 3, seed=8, size_ms=20_000)  # 20 s windows from 80 s on
    job.close_windows()
    old_version = {w: r for w, r in reference(first + second).items() if w in closed(first + second)}
    # Documented effect: windows open at the upgrade restart empty, so the old version's last
    # windows (60-70 s) are never emitted; the new version counts only what it read.
    new_version = reference(third, size_ms=20_000)
    expected = {**old_version, **new_version}
    job.wait_output(set(expected), "every window")
    time.sleep(3)
    job.stop()

    assert job.output() == expected
    assert not any(window_index(w) == 5 for w in job.output() if w[2] - w[1] == SIZE_MS)
    assert "state reset allowed: windows restart empty (pipeline.window.size" in job.events_log()


# --------------------------------------------------------------------------- (d) periodic savepoints


@pytest.mark.timeout(180)
def test_periodic_savepoints_are_taken_and_the_oldest_are_removed_from_the_store(
    job_factory: Callable[..., Upgradable],
) -> None:
    job = job_factory("periodic", savepoints={"interval": "2s", "maxCount": 2})
    job.produce(0, 3, seed=9)
    job.start()
    taken: set[str] = set()

    def several() -> bool:
        history = job.status().get("savepointHistory", ())
        taken.update(s["id"] for s in history if s["trigger"] == "periodic" and s.get("url"))
        return len(taken) >= 5

    job.wait(several, "five periodic savepoints", timeout=120)
    job.wait(lambda: len(job.savepoint_ids()) <= 2, "retention")
    in_store = job.savepoint_ids()
    history = [s for s in job.status()["savepointHistory"] if s.get("url") and not s.get("disposeError")]
    job.stop()

    assert 1 <= len(in_store) <= 2, in_store
    assert in_store <= taken
    # The newest ones are kept, the oldest deleted.
    newest = sorted(taken)[-len(in_store):]
    assert sorted(in_store) == newest, (in_store, taken)
    assert {s["id"] for s in history if s["trigger"] == "periodic"} >= in_store


# --------------------------------------------------------------------------- (e) adding an output, and back


@pytest.mark.timeout(300)
def test_adding_an_output_fills_it_in_every_window_closing_after_the_upgrade_and_reverting_drops_it(
    job_factory: Callable[..., Upgradable],
) -> None:
    job = job_factory("addmx")
    first = job.produce(0, 3, seed=10)  # windows 0-2: 0 and 1 close under version 1
    job.start()
    job.wait_stable(1)
    job.wait_output(closed(first), "the first version's windows")

    with_max = {**OUTPUTS, "mx": {"fn": "max", "field": "price"}}
    job.write(outputs=with_max)
    job.wait_stable(2)
    second = job.produce(3, 3, seed=11)  # windows 3-5: 2, 3 and 4 close under version 2
    job.wait_output(closed(first + second), "the second version's windows")

    job.write()  # back to version 1's outputs
    job.wait_stable(3)
    third = job.produce(6, 2, seed=12)
    job.close_windows()
    expected = reference(job.events)
    job.wait_output(set(expected), "every window")
    time.sleep(3)
    status = job.status()
    job.stop()

    output = job.output()
    assert set(output) == set(expected)
    assert {w: {k: v for k, v in r.items() if k != "mx"} for w, r in output.items()} == expected
    maxima = reference(second, outputs={"mx": {"fn": "max", "field": "price"}})
    for window, result in output.items():
        index = window_index(window)
        if index in (0, 1) or index >= 5:
            assert "mx" not in result, (window, result)  # closed by a version without it
        elif index == 2:
            # Open at the upgrade: mx covers the records since (none of window 2's).
            assert "mx" in result and result["mx"] is None, (window, result)
        else:
            assert result["mx"] == maxima[window]["mx"], (window, result)
    assert all(window_index(w) >= 6 for w in reference(third))
    assert len(_upgrade_savepoints(status, 2)) == 1 and len(_upgrade_savepoints(status, 3)) == 1


# --------------------------------------------------------------------------- (f) weir up killed mid-upgrade


def _intent(job: Upgradable, generation: int) -> dict[str, Any]:
    intent = job.status().get("intent") or {}
    return intent if intent.get("generation") == generation and intent.get("savepointId") else {}


def _check_where_it_died(job: Upgradable, step: str, generation: int, old: set[str]) -> None:
    """What status.json, the store and /proc say right after `weir up` died at ``step``."""
    intent = _intent(job, generation)
    running = set(worker_pids(job.state).values())  # the manifests the running workers were given
    status = job.status()
    if step in ("intent-written", "savepoint-requested", "savepoint-done"):
        assert intent and not intent.get("restoreFrom"), status
        assert running <= old, running  # no new worker (the old ones may be ending after a stop-savepoint)
    if step == "intent-written":
        assert not job.savepoint_complete_in_store(intent["savepointId"])  # nothing was asked
    if step == "savepoint-done":
        assert job.savepoint_complete_in_store(intent["savepointId"])  # taken, not yet recorded
    if step == "old-stopped":
        assert intent.get("restoreFrom") and not running, (status, running)
    if step == "new-applied":
        assert intent.get("restoreFrom") and running and not running & old, (status, running)
    if step == "stabilizing":
        assert status["lifecycleState"] == "Stabilizing", status
        assert status["stabilization"]["generation"] == generation, status


@pytest.mark.timeout(420)
def test_weir_up_sigkilled_at_each_step_of_an_upgrade_and_restarted_completes_it_with_one_savepoint(
    job_factory: Callable[..., Upgradable],
) -> None:
    """`weir up` dies by SIGKILL (``weir_operator.crashpoints``: the steps are milliseconds apart)
    at each step of an upgrade in turn; each restart finishes that upgrade and is armed for the next."""
    job = job_factory("killed")
    job.produce(0, 2, seed=20)
    job.start(crash_at=f"{STEPS[0]}@2")
    job.wait_stable(1)
    for index, step in enumerate(STEPS):
        generation = index + 2
        old = set(worker_pids(job.state).values())
        job.write(steps=({"filter": {"field": "price", "op": "gt", "value": -index}},))
        job.wait(lambda: job.process is not None and job.process.poll() is not None,
                 f"weir up killed at {step}")
        assert job.process is not None and job.process.returncode == -signal.SIGKILL, job.tail()
        assert f"killing weir up at {step}" in job.tail()
        _check_where_it_died(job, step, generation, old)
        job.kill()  # (already dead: closes its log)
        adopted = job.log.read_text().count(ADOPTED)
        job.start(crash_at=f"{STEPS[index + 1]}@{generation + 1}" if index + 1 < len(STEPS) else None)
        job.wait_stable(generation, timeout=120)
        if step in ("intent-written", "new-applied", "stabilizing"):
            # The killed weir up's workers still ran: adopted (for intent-written they took the
            # savepoint the restarted weir up asked for), and stopped before new ones started.
            assert job.log.read_text().count(ADOPTED) == adopted + 1, job.tail()
        job.produce(2 + 2 * index, 2, seed=21 + index)
    job.close_windows()
    expected = reference(job.events)
    job.wait_output(set(expected), "every window")
    time.sleep(3)
    status = job.status()
    job.stop()

    assert job.output() == expected
    for g in range(2, len(STEPS) + 2):
        upgrade = _upgrade_savepoints(status, g)
        assert len(upgrade) == 1 and upgrade[0].get("url") and not upgrade[0].get("error"), (g, upgrade)
    # No second savepoint in the store either: one per upgrade, nothing else before the shutdown.
    upgrade_ids = {s["id"] for s in status["savepointHistory"] if s["trigger"] == "upgrade"}
    assert len(upgrade_ids) == len(STEPS)
    shutdown = {s["id"] for s in job.status()["savepointHistory"] if s["trigger"] != "upgrade"}
    assert job.savepoint_ids() - shutdown == upgrade_ids
