"""The platforms' side of savepoints and restarts: finding a savepoint in the store, disposing of one,
and the workers a killed `weir up` left behind (a file:// store and real processes, no broker)."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from weir import spec
from weir.checkpoint import CheckpointError, CheckpointStore
from weir.checkpoint_manifest import PartitionSnapshot, checkpoint_id
from weir_operator import crashpoints, local_workers, up
from weir_operator.lifecycle import reset_allowed
from weir_operator.local import LocalPlatform
from weir_operator.plans import Apply, SavepointOutcome
from weir_operator.platforms import completed_in_store, dispose_job_savepoint, find_savepoint
from weir_operator.render import ENV_ALLOW_STATE_RESET

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
NOW = datetime(2026, 12, 2, 4, 0, tzinfo=UTC)


def _job(store: Path | None, name: str = "revenue", **changes: Any) -> spec.StreamJob:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"] = {"name": name, "namespace": "local"}
    if store is not None:
        document["spec"]["checkpoint"] = {"url": store.as_uri()}
    document["spec"].update(changes)
    return spec.StreamJob.model_validate(document)


def _savepoint(store: Path, savepoint_id: str, workers: int, parts: list[int] | None = None,
               name: str = "revenue") -> str:
    """Write the parts ``parts`` (default all) of a savepoint of ``workers`` workers; its job-level URL."""
    url = ""
    store.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointStore.open(store.as_uri(), "local", name) as writer:
        for index in parts if parts is not None else range(workers):
            data = store.parent / f"{savepoint_id}-{index}.sst"
            data.write_bytes(b"state of worker %d" % index)
            result = writer.write_savepoint(savepoint_id, (index, workers),
                                            {f"events/{index}": PartitionSnapshot(data, 10 + index)})
            url = result.url
    return url


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- finding a savepoint


def test_a_savepoint_with_every_workers_part_is_found_at_its_job_level_url(tmp_path: Path) -> None:
    store = tmp_path / "store"
    url = _savepoint(store, "upgrade-4-1", 2)

    found = find_savepoint(store.as_uri(), "local", "revenue", "upgrade-4-1", None)

    assert found == url == f"{store.as_uri()}/local/revenue/savepoints/upgrade-4-1"


def test_a_savepoint_missing_a_workers_part_is_not_found(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _savepoint(store, "upgrade-4-1", 2, parts=[0])

    assert find_savepoint(store.as_uri(), "local", "revenue", "upgrade-4-1", None) is None
    assert find_savepoint(store.as_uri(), "local", "revenue", "upgrade-9-9", None) is None


def test_a_savepoint_of_another_job_is_not_found_for_this_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _savepoint(store, "upgrade-4-1", 1, name="revenue-eu")

    assert find_savepoint(store.as_uri(), "local", "revenue", "upgrade-4-1", None) is None


def test_no_worker_answering_is_a_completed_savepoint_when_the_store_holds_it_whole() -> None:
    failed = SavepointOutcome("upgrade-4-1", completed=False, error="no workers are running")
    url = "file:///store/local/revenue/savepoints/upgrade-4-1"

    found = completed_in_store(failed, lambda: url, NOW, asked_all=False)
    missing = completed_in_store(failed, lambda: None, NOW, asked_all=False)

    assert found == SavepointOutcome("upgrade-4-1", completed=True, url=url, completed_at=NOW)
    assert missing == failed


def test_a_savepoint_only_some_workers_answered_for_is_complete_only_if_the_store_has_every_part() -> None:
    partial = SavepointOutcome("sp-1", completed=True, url="file:///s/local/revenue/savepoints/sp-1",
                               completed_at=NOW)

    incomplete = completed_in_store(partial, lambda: None, NOW, asked_all=False)

    assert not incomplete.completed and "not every worker's part" in (incomplete.error or "")
    assert completed_in_store(partial, lambda: partial.url, NOW, asked_all=False) == partial


def test_an_answer_from_every_worker_is_taken_without_looking_in_the_store() -> None:
    answered = SavepointOutcome("sp-1", completed=True, url="file:///s/x/y/savepoints/sp-1", completed_at=NOW)

    def unreachable() -> str | None:
        raise AssertionError("the store was read")

    assert completed_in_store(answered, unreachable, NOW, asked_all=True) == answered


def test_a_store_that_cannot_be_read_leaves_a_failed_answer_as_it_is() -> None:
    failed = SavepointOutcome("sp-1", completed=False, error="worker 0: connection refused")

    def broken() -> str | None:
        raise CheckpointError("store unreachable")

    assert completed_in_store(failed, broken, NOW, asked_all=True) == failed


def test_the_local_platform_with_no_worker_running_answers_with_the_savepoint_found_in_the_store(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    url = _savepoint(store, "upgrade-4-1", 2)
    platform = LocalPlatform(tmp_path / "state", now=lambda: NOW)

    outcome = platform.savepoint(_job(store), "upgrade-4-1", stop=True)
    missing = platform.savepoint(_job(store), "upgrade-5-1", stop=True)

    assert outcome == SavepointOutcome("upgrade-4-1", completed=True, url=url, completed_at=NOW)
    assert missing == SavepointOutcome("upgrade-5-1", completed=False, error="no workers are running")


def test_a_job_without_a_store_is_looked_up_in_the_platforms_default_store(tmp_path: Path) -> None:
    platform = LocalPlatform(tmp_path / "state", now=lambda: NOW)
    url = _savepoint(tmp_path / "state" / "checkpoints", "sp-1", 1)

    assert platform.savepoint(_job(None), "sp-1", stop=False).url == url


# --------------------------------------------------------------------------- disposing of a savepoint


def test_disposing_of_a_savepoint_deletes_every_part_of_it_and_nothing_else(tmp_path: Path) -> None:
    store = tmp_path / "store"
    doomed = _savepoint(store, "periodic-1", 2)
    _savepoint(store, "periodic-2", 2)
    _savepoint(store, "periodic-1", 1, name="revenue-eu")
    checkpoint = store / "local" / "revenue" / "checkpoints" / checkpoint_id(1, 0)
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_bytes(b"{}")
    before = _files(store)

    deleted = dispose_job_savepoint(_job(store), doomed, None)

    gone = {f for f in before if f.startswith("local/revenue/savepoints/periodic-1/")}
    assert deleted == len(gone) == 4  # two workers: a manifest and a file each
    assert _files(store) == before - gone
    assert not (store / "local" / "revenue" / "savepoints" / "periodic-1").exists()
    assert dispose_job_savepoint(_job(store), doomed, None) == 0  # already gone: no error


@pytest.mark.parametrize("where", [
    "local/revenue-eu/savepoints/periodic-1",  # another job's
    "local/revenue/savepoints",  # all of them
    "local/revenue",  # the job's whole store
    "local/revenue/checkpoints/0000000001-w0",
])
def test_disposing_refuses_anything_but_one_savepoint_of_the_job(tmp_path: Path, where: str) -> None:
    store = tmp_path / "store"
    _savepoint(store, "periodic-1", 1)
    _savepoint(store, "periodic-1", 1, name="revenue-eu")
    before = _files(store)

    with pytest.raises(CheckpointError, match="is not a savepoint of local/revenue"):
        dispose_job_savepoint(_job(store), f"{store.as_uri()}/{where}", None)

    assert _files(store) == before


def test_the_local_platform_disposes_of_a_savepoint_in_the_jobs_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    url = _savepoint(store, "periodic-1", 1)
    kept = _savepoint(store, "periodic-2", 1)

    LocalPlatform(tmp_path / "state").dispose_savepoint(_job(store), url)

    assert find_savepoint(store.as_uri(), "local", "revenue", "periodic-1", None) is None
    assert find_savepoint(store.as_uri(), "local", "revenue", "periodic-2", None) == kept


# --------------------------------------------------------------------------- a killed weir up's workers


def _fake_worker(state_dir: Path, *, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A process that looks like a worker to the record (its command line names ``state_dir``)."""
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('up', flush=True)\ntime.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", code, "--state-dir", str(state_dir)],
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    started = process.stdout.readline()
    process.stdout.close()
    assert started == b"up\n"
    return process


def _record(job_dir: Path, *entries: tuple[int, int, Path]) -> None:
    workers = [local_workers.Worker(index, 2, 1, pid, str(state), "file:///store")
               for index, pid, state in entries]
    job_dir.mkdir(parents=True, exist_ok=True)
    local_workers.write_record(job_dir, workers)


def test_recorded_workers_that_still_run_are_found_and_a_reused_pid_is_not_taken_for_one(
    tmp_path: Path,
) -> None:
    job_dir = tmp_path / "local" / "revenue"
    alive = _fake_worker(job_dir / "w0")
    other = _fake_worker(tmp_path / "somebody-else")
    ended = _fake_worker(job_dir / "w2")
    ended.kill()
    ended.wait()
    try:
        # w1's pid now runs another program (pids are reused); w2 has ended.
        _record(job_dir, (0, alive.pid, job_dir / "w0"), (1, other.pid, job_dir / "w1"),
                (2, ended.pid, job_dir / "w2"))

        found = local_workers.previous_workers(job_dir)

        assert [(w.index, w.pid, w.adopted) for w in found] == [(0, alive.pid, True)]
    finally:
        for process in (alive, other):
            process.kill()
            process.wait()


def test_stopping_workers_terminates_them_and_kills_one_that_ignores_sigterm(tmp_path: Path) -> None:
    polite = _fake_worker(tmp_path / "w0")
    stubborn = _fake_worker(tmp_path / "w1", ignore_term=True)
    _record(tmp_path, (0, polite.pid, tmp_path / "w0"), (1, stubborn.pid, tmp_path / "w1"))
    adopted = local_workers.previous_workers(tmp_path)
    assert len(adopted) == 2

    local_workers.stop(adopted, timeout=1.0)

    assert polite.wait(timeout=5) == -signal.SIGTERM
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert all(w.poll() == local_workers.UNKNOWN_EXIT for w in adopted)


def test_a_killed_weir_ups_workers_linger_until_an_apply_stops_them_before_starting_any(
    tmp_path: Path,
) -> None:
    platform = LocalPlatform(tmp_path / "state")
    job = _job(tmp_path / "store")
    job_dir = platform.job_dir("local", "revenue")
    orphan = _fake_worker(job_dir / "w0")
    try:
        _record(job_dir, (0, orphan.pid, job_dir / "w0"))

        assert platform.observe(job).lingering == 1
        platform.apply(job, Apply(workers=1, replicas=0))

        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert platform.observe(job).lingering == 0
        assert local_workers.previous_workers(job_dir) == []
    finally:
        orphan.kill()
        orphan.wait()


def test_the_workers_of_a_spec_that_allows_a_state_reset_get_the_variable_and_others_do_not() -> None:
    assert reset_allowed(_job(None, upgrade={"allowStateReset": True}).spec)
    assert reset_allowed(_job(None, upgradeMode="stateless").spec)
    assert not reset_allowed(_job(None).spec)
    assert ENV_ALLOW_STATE_RESET == "WEIR_ALLOW_STATE_RESET"


# --------------------------------------------------------------------------- generations


def test_weir_up_started_again_on_an_unchanged_manifest_continues_its_generation(tmp_path: Path) -> None:
    platform = LocalPlatform(tmp_path / "state")
    key = ("local", "revenue")

    first = up._generation(platform, key, "digest-a")
    again = up._generation(platform, key, "digest-a")
    edited = up._generation(platform, key, "digest-b")

    assert (first, again, edited) == (1, 1, 2)
    assert up._generation(platform, key, "digest-b") == 2


# --------------------------------------------------------------------------- the kill tests' crash points


def test_a_crash_point_names_a_step_and_a_generation_and_anything_else_is_refused() -> None:
    assert crashpoints.CrashPoint.parse("savepoint-done@4") == crashpoints.CrashPoint("savepoint-done", 4)
    for bad in ("savepoint-done", "teatime@4", "new-applied@x", "@3"):
        with pytest.raises(ValueError, match="expected <step>@<generation>"):
            crashpoints.CrashPoint.parse(bad)


class _StatefulSets:
    """The one AppsV1Api call ``KubernetesPlatform.savepoint`` makes: a StatefulSet stopped at 0."""

    def read_namespaced_stateful_set(self, name: str, namespace: str) -> Any:
        from kubernetes import client

        return client.V1StatefulSet(spec=client.V1StatefulSetSpec(
            replicas=0, selector=client.V1LabelSelector(), service_name=name,
            template=client.V1PodTemplateSpec(),
        ))


def test_the_kubernetes_platform_answers_with_the_savepoint_in_the_store_when_no_worker_answers(
    tmp_path: Path,
) -> None:
    from weir_operator import kube

    store = tmp_path / "store"
    url = _savepoint(store, "upgrade-4-1", 2)
    platform = kube.KubernetesPlatform(None, worker_image="weir:test", now=lambda: NOW)
    platform.apps = _StatefulSets()  # type: ignore[assignment]

    assert platform.savepoint(_job(store), "upgrade-4-1", stop=True) == SavepointOutcome(
        "upgrade-4-1", completed=True, url=url, completed_at=NOW
    )
    assert platform.savepoint(_job(store), "upgrade-5-1", stop=True) == SavepointOutcome(
        "upgrade-5-1", completed=False, error="no workers are running"
    )
    platform.dispose_savepoint(_job(store), url)
    assert find_savepoint(store.as_uri(), "local", "revenue", "upgrade-4-1", None) is None
