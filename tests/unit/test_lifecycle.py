"""The upgrade life cycle on the in-memory platform: stability gate, rollback, refusal, periodic
savepoints and retention, and an operator restart injected after every single step."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from weir import spec
from weir_operator import lifecycle, model, render
from weir_operator.decide import Policy
from weir_operator.plans import Apply, WorkerReport
from weir_operator.reconciler import finalize, reconcile
from weir_operator.testing import FakePlatform, OperatorCrashed

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
STORE = "file:///var/lib/weir/checkpoints/default/revenue/savepoints"
FAST = {"stabilityWindow": "30s", "readinessTimeout": "2m"}
"""A short gate, so a test walks through it in a few reconciles."""


def job(**changes: Any) -> spec.StreamJob:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["uid"] = "uid-1"
    document["spec"].update({"parallelism": 2, "upgrade": dict(FAST), **changes})
    return spec.StreamJob.model_validate(document)


def condition(status: model.StreamJobStatus, type_: str) -> model.StatusCondition:
    return next(c for c in status.conditions if c.type == type_)


def run(
    platform: FakePlatform, the_job: spec.StreamJob, generation: int = 1, **kwargs: Any
) -> model.StreamJobStatus:
    return reconcile(platform, the_job, generation, platform.status, platform.clock, **kwargs)


def drive(
    platform: FakePlatform,
    the_job: spec.StreamJob,
    generation: int,
    until: Callable[[model.StreamJobStatus], bool],
    *,
    every: float = 10,
    rounds: int = 60,
) -> model.StreamJobStatus:
    """Reconcile every ``every`` seconds until ``until(status)``; a crashed operator is replaced at once
    by a fresh one that starts from the persisted status."""
    for _ in range(rounds):
        try:
            status = run(platform, the_job, generation)
        except OperatorCrashed:
            continue
        if until(status):
            return status
        platform.clock.advance(every)
    raise AssertionError(f"not reached in {rounds} rounds: {platform.status.lifecycle_state}")


def is_(*states: str) -> Callable[[model.StreamJobStatus], bool]:
    return lambda status: status.intent is None and status.lifecycle_state in states


def stable_job(**changes: Any) -> tuple[FakePlatform, spec.StreamJob]:
    platform, the_job = FakePlatform(broken_images=frozenset({"weir:broken"})), job(**changes)
    drive(platform, the_job, 1, is_("Stable"))
    platform.events.clear()
    platform.calls.clear()
    return platform, the_job


def reasons(platform: FakePlatform) -> list[str]:
    return [e.reason for e in platform.events]


# --------------------------------------------------------------------------- the stability gate


def states(platform: FakePlatform) -> list[str | None]:
    """The life-cycle states the written statuses went through, repeats dropped."""
    seen: list[str | None] = []
    for status in platform.statuses:
        if not seen or seen[-1] != status.lifecycle_state:
            seen.append(status.lifecycle_state)
    return seen


def test_a_new_job_is_deploying_then_stabilizing_then_stable() -> None:
    platform = FakePlatform()

    drive(platform, job(), 1, is_("Stable"))

    assert states(platform) == ["Deploying", "Stabilizing", "Stable"]
    assert [r for r in reasons(platform) if r in ("Deploying", "Stabilizing", "Stable", "Deployed")] == [
        "Deploying",
        "Stabilizing",
        "Stable",
        "Deployed",
    ]


def test_an_upgrade_is_upgrading_then_stabilizing_then_stable() -> None:
    platform, _ = stable_job(image="weir:1")
    platform.statuses.clear()

    drive(platform, job(image="weir:2"), 2, is_("Stable"))

    assert states(platform) == ["Upgrading", "Stabilizing", "Stable"]


def test_suspend_and_resume_are_suspended_then_deploying_stabilizing_stable() -> None:
    platform, _ = stable_job()
    platform.statuses.clear()

    drive(platform, job(state="suspended"), 2, is_("Suspended"))
    drive(platform, job(), 3, is_("Stable"))

    assert states(platform) == ["Suspended", "Deploying", "Stabilizing", "Stable"]
    assert "Resumed" in reasons(platform)


def test_a_deleted_job_is_deleting() -> None:
    platform, the_job = stable_job()

    assert finalize(platform, the_job, 1, platform.status, platform.clock)

    assert platform.status.lifecycle_state == "Deleting" and platform.status.stabilization is None


def test_an_upgrade_is_stable_and_announced_only_after_the_window_with_every_worker_ready() -> None:
    platform, _ = stable_job(image="weir:1")
    new = job(image="weir:2")

    status = run(platform, new, 2)
    assert status.lifecycle_state == "Stabilizing" and status.intent is None
    assert "Upgraded" not in reasons(platform) and "Stabilizing" in reasons(platform)
    assert status.stable is not None and status.stable.generation == 1
    assert status.stable_fingerprint == render.fingerprint(job(image="weir:1").spec)

    platform.calls.clear()
    platform.clock.advance(29)
    assert run(platform, new, 2).lifecycle_state == "Stabilizing"
    assert platform.calls == []  # nothing changed: no status write while the window runs
    platform.clock.advance(1)
    status = run(platform, new, 2)

    assert status.lifecycle_state == "Stable" and status.stabilization is None
    assert status.stable is not None and status.stable.generation == 2
    assert status.stable_fingerprint == render.fingerprint(new.spec)
    assert lifecycle.stable_spec(status) == new.spec
    stable_event = next(e for e in platform.events if e.reason == "Stable")
    assert stable_event.message.startswith("generation 2 stable: 30s with 2/2 workers ready, 0 restarts")
    assert reasons(platform).index("Stable") < reasons(platform).index("Upgraded")


def test_the_last_stable_spec_is_the_whole_spec_in_camel_case_and_reads_back() -> None:
    platform, the_job = stable_job(image="weir:1")

    document = platform.status.last_stable_spec
    assert document is not None
    assert document["upgradeMode"] == "savepoint" and document["upgrade"]["stabilityWindow"] == 30_000
    assert document["pipeline"]["sink"]["topic"] == "revenue-per-minute"
    assert lifecycle.stable_spec(platform.status) == the_job.spec
    dumped = platform.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert model.StreamJobStatus.model_validate(dumped) == platform.status


def test_a_worker_restart_starts_the_window_again_but_the_deadline_keeps_running() -> None:
    platform, _ = stable_job(image="weir:1")
    new = job(image="weir:2")
    run(platform, new, 2)
    started = platform.status.stabilization
    assert started is not None and started.window_start is not None

    platform.clock.advance(20)
    platform.restarts[1] = 1
    status = run(platform, new, 2)
    assert status.stabilization is not None
    assert status.stabilization.window_start == platform.clock()
    assert status.stabilization.deadline == started.deadline
    assert "restarted" in status.stabilization.measured

    platform.clock.advance(20)
    assert (
        run(platform, new, 2).lifecycle_state == "Stabilizing"
    )  # 40 s since the upgrade, 20 s since the restart
    platform.clock.advance(10)
    assert run(platform, new, 2).lifecycle_state == "Stable"


def test_workers_of_the_old_revision_do_not_count_as_ready_for_the_new_one() -> None:
    platform, _ = stable_job(image="weir:1")
    new = job(image="weir:2")
    platform.not_current = frozenset({1})  # the rolling update has not replaced worker 1 yet
    run(platform, new, 2)
    platform.clock.advance(60)
    status = run(platform, new, 2)
    assert status.lifecycle_state == "Stabilizing" and status.ready_workers == 1
    assert status.stabilization is not None and "1/2 workers ready" in status.stabilization.measured

    platform.not_current = frozenset()
    status = drive(platform, new, 2, is_("Stable"))
    assert status.stable is not None and status.stable.generation == 2


def test_a_job_with_checkpoints_is_stable_only_once_one_completed_in_the_window() -> None:
    checkpointed = {"checkpoint": {"url": "s3://bucket/weir"}}
    platform = FakePlatform()
    the_job = job(**checkpointed)
    run(platform, the_job)
    platform.clock.advance(60)
    status = run(platform, the_job)
    assert status.lifecycle_state == "Stabilizing"
    assert status.stabilization is not None and "no checkpoint completed" in status.stabilization.measured

    done = model.CheckpointInfo(id="ck-17", url="s3://bucket/weir/ck-17", completed_at=platform.clock())
    platform.reports = (WorkerReport(0, done, 10), WorkerReport(1, done, 20))
    status = run(platform, the_job)

    assert status.lifecycle_state == "Stable"
    message = next(e.message for e in platform.events if e.reason == "Stable")
    assert "checkpoints to ck-17" in message


def test_growing_lag_starts_the_window_again_and_lag_within_the_slack_does_not() -> None:
    platform = FakePlatform()
    the_job = job()
    platform.reports = (WorkerReport(0, lag_records=1200),)
    run(platform, the_job)

    platform.clock.advance(30)
    platform.reports = (WorkerReport(0, lag_records=1200 + lifecycle.LAG_SLACK_RECORDS + 121),)
    status = run(platform, the_job)
    assert status.lifecycle_state == "Stabilizing"
    assert (
        status.stabilization is not None and "lag grew 1200 -> 2321 records" in status.stabilization.measured
    )

    platform.clock.advance(30)
    platform.reports = (WorkerReport(0, lag_records=300),)
    status = run(platform, the_job)
    assert status.lifecycle_state == "Stable"
    assert "lag 2321 -> 300 records" in next(e.message for e in platform.events if e.reason == "Stable")


def test_a_restart_nonce_goes_through_the_stability_gate() -> None:
    platform, _ = stable_job()

    run(platform, job(restartNonce=1), 2)
    assert platform.status.lifecycle_state == "Stabilizing"
    status = drive(platform, job(restartNonce=1), 2, is_("Stable"))

    assert status.stable is not None and status.stable.generation == 2
    assert "Redeployed" in reasons(platform)


def test_a_job_an_older_operator_deployed_goes_through_the_gate_and_gets_a_stable_spec() -> None:
    platform, the_job = stable_job()
    legacy = model.StreamJobStatus.model_validate(
        platform.status.model_dump(
            by_alias=False,
            exclude={"lifecycle_state", "stable", "last_stable_spec", "stabilization", "stable_fingerprint"},
        )
    )
    platform.statuses.append(legacy)

    assert run(platform, the_job).lifecycle_state == "Stabilizing"
    status = drive(platform, the_job, 1, is_("Stable"))

    assert lifecycle.stable_spec(status) == the_job.spec and platform.savepoints == {}


def test_a_new_change_after_a_failed_one_clears_the_failure() -> None:
    manual = {**FAST, "rollback": "manual"}
    platform, _ = stable_job(image="weir:1", upgrade=manual)
    drive(platform, job(image="weir:broken", upgrade=manual), 2, is_("Failed"))

    status = run(platform, job(image="weir:3", upgrade=manual), 3)

    assert status.error is None and status.phase != "Failed"
    status = drive(platform, job(image="weir:3", upgrade=manual), 3, is_("Stable"))
    assert condition(status, "Degraded").status == "False"


# --------------------------------------------------------------------------- rollback


def test_an_upgrade_that_crash_loops_is_rolled_back_to_the_last_stable_spec_from_its_savepoint() -> None:
    platform, before = stable_job(image="weir:1")
    broken = job(image="weir:broken")

    status = drive(platform, broken, 2, is_("RolledBack"))

    upgrade_savepoint = next(iter(platform.savepoints))
    url = f"{STORE}/{upgrade_savepoint}"
    assert len(platform.savepoints) == 1  # a failing version takes no savepoint
    assert status.stable is not None and status.stable.snapshot == url
    # the broken workers stop completely before the stable ones start from the upgrade's savepoint
    assert [(a.workers, a.replicas, a.restore_from) for a in platform.applied[-3:]] == [
        (2, 2, url),
        (2, 0, url),
        (2, 2, url),
    ]
    assert platform.applied[-1].spec == before.spec
    assert platform.deployed is not None and platform.deployed.fingerprint == render.fingerprint(before.spec)
    assert status.rollback is not None
    assert (status.rollback.from_generation, status.rollback.to_generation) == (2, 1)
    assert status.rollback.restored_from == url and status.rollback.outcome == "RolledBack"
    degraded = condition(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "RolledBack")
    assert degraded.message.startswith(f"generation 2 rolled back to generation 1 (restored from {url}): ")
    assert "worker 0 crash-looping (CrashLoopBackOff), 5 restarts in 2m" in degraded.message
    assert [e.type for e in platform.events if e.reason == "RolledBack"] == ["Warning"]
    assert sorted(e.type for e in platform.events if e.reason == "RollingBack") == ["Normal", "Warning"]
    rolling = next(e for e in platform.events if e.reason == "RollingBack" and e.type == "Warning")
    assert "generation 2 is not stable within 2m" in rolling.message


def test_the_stable_workers_start_only_once_no_failing_worker_is_left() -> None:
    platform, _ = stable_job(image="weir:1")
    broken = job(image="weir:broken")
    run(platform, broken, 2)
    platform.clock.advance(120)
    platform.lingering = 2  # the failing pods take their time to terminate

    run(platform, broken, 2)
    assert platform.status.intent is not None and platform.status.intent.action == "rollback"
    assert platform.status.phase == "RollingBack" and platform.status.lifecycle_state == "RollingBack"
    assert (platform.applied[-1].replicas, platform.deployed and platform.deployed.replicas) == (0, 0)
    applies = len(platform.applied)
    run(platform, broken, 2)
    assert len(platform.applied) == applies

    platform.lingering = 0
    run(platform, broken, 2)
    assert platform.applied[-1].replicas == 2 and platform.applied[-1].spec == job(image="weir:1").spec


def test_a_rolled_back_job_stays_rolled_back_until_its_generation_changes() -> None:
    platform, _ = stable_job(image="weir:1")
    drive(platform, job(image="weir:broken"), 2, is_("RolledBack"))
    applies = len(platform.applied)

    for _ in range(5):
        platform.clock.advance(60)
        status = run(platform, job(image="weir:broken"), 2)
    assert status.lifecycle_state == "RolledBack" and len(platform.applied) == applies

    fixed = job(image="weir:3")
    status = drive(platform, fixed, 3, is_("Stable"))
    assert status.stable is not None and status.stable.generation == 3
    assert condition(status, "Degraded").status == "False"
    assert lifecycle.stable_spec(status) == fixed.spec


def test_a_rolled_back_job_redeployed_from_scratch_stays_rolled_back() -> None:
    platform, _ = stable_job(image="weir:1")
    drive(platform, job(image="weir:broken"), 2, is_("RolledBack"))

    platform.deployed = None  # weir up restarted: no workers, the status remains
    status = drive(platform, job(image="weir:broken"), 2, is_("RolledBack"))

    assert platform.deployed is not None and platform.deployed.spec is not None
    assert platform.deployed.spec.image == "weir:1"
    assert condition(status, "Degraded").reason == "RolledBack"


def test_with_rollback_manual_a_failing_upgrade_is_failed_and_its_workers_left_alone() -> None:
    manual = {**FAST, "rollback": "manual"}
    platform, _ = stable_job(image="weir:1", upgrade=manual)

    status = drive(platform, job(image="weir:broken", upgrade=manual), 2, is_("Failed"))

    assert platform.deployed is not None and platform.deployed.spec is not None
    assert platform.deployed.spec.image == "weir:broken"
    degraded = condition(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "UpgradeFailed")
    assert (
        "generation 2 is not stable within 2m" in degraded.message and "rollback: manual" in degraded.message
    )
    assert [e.type for e in platform.events if e.reason == "UpgradeFailed"] == ["Warning"]


def test_an_outage_of_kafka_while_stabilizing_holds_the_deadline_instead_of_rolling_back() -> None:
    platform, _ = stable_job(image="weir:1")
    upgraded = job(image="weir:2")
    run(platform, upgraded, 2)
    # The new workers wait for the broker: not ready, and they say why.
    platform.workers_ready = False
    platform.reports = tuple(
        WorkerReport(index=i, outages={"kafka": "connection refused (for 30 s)"}) for i in range(2)
    )
    for _ in range(30):  # 5 minutes: well past readinessTimeout (2m)
        platform.clock.advance(10)
        status = run(platform, upgraded, 2)
    assert status.lifecycle_state == "Stabilizing" and status.rollback is None
    assert status.stabilization is not None
    assert status.stabilization.measured == "kafka unreachable: the readiness deadline waits for it"

    # Kafka is back: the gate measures again and the upgrade becomes stable.
    platform.workers_ready, platform.reports = True, ()
    status = drive(platform, upgraded, 2, is_("Stable"))
    assert status.stable is not None and status.stable.generation == 2


def test_an_upgrade_that_stays_unready_after_an_outage_ends_still_rolls_back() -> None:
    platform, _ = stable_job(image="weir:1")
    broken = job(image="weir:broken")
    run(platform, broken, 2)
    platform.reports = (WorkerReport(index=0, outages={"store": "timed out (for 5 s)"}),)
    for _ in range(15):
        platform.clock.advance(10)
        run(platform, broken, 2)
    assert platform.status.lifecycle_state == "Stabilizing"
    platform.reports = ()
    status = drive(platform, broken, 2, is_("RolledBack"))
    assert status.rollback is not None and "crash-looping" in status.rollback.reason


def test_a_first_deploy_that_never_gets_ready_is_failed_and_stable_once_it_recovers() -> None:
    platform = FakePlatform(workers_ready=False)
    the_job = job()

    status = drive(platform, the_job, 1, is_("Failed"))
    assert "no stable version to roll back to" in condition(status, "Degraded").message
    assert "0/2 workers ready" in condition(status, "Degraded").message
    assert status.last_stable_spec is None

    platform.workers_ready = True
    status = drive(platform, the_job, 1, is_("Stable"))
    assert status.stable is not None and condition(status, "Degraded").status == "False"


def test_a_rollback_that_does_not_stabilize_either_is_failed_without_a_loop() -> None:
    platform, _ = stable_job(image="weir:1")
    platform.broken_images = frozenset({"weir:broken", "weir:1"})  # the stable image broke meanwhile

    status = drive(platform, job(image="weir:broken"), 2, is_("Failed"), rounds=80)
    applies = len(platform.applied)
    for _ in range(20):
        platform.clock.advance(30)
        status = run(platform, job(image="weir:broken"), 2)

    assert len(platform.applied) == applies
    assert status.rollback is not None and status.rollback.outcome == "Failed"
    assert condition(status, "Degraded").reason == "RollbackFailed"
    assert [e.reason for e in platform.events if e.type == "Warning"].count("RollingBack") == 1


def test_reverting_a_crash_looping_savepoint_upgrade_by_hand_restores_the_stable_snapshot() -> None:
    slow = {**FAST, "readinessTimeout": "1h"}  # no automatic rollback during the test
    platform, _ = stable_job(image="weir:1", upgrade=slow)
    run(platform, job(image="weir:broken", upgrade=slow), 2)
    assert platform.status.lifecycle_state == "Stabilizing"
    url = platform.status.stable.snapshot if platform.status.stable else None
    assert url is not None

    status = drive(platform, job(image="weir:1", upgrade=slow), 3, is_("Stable"))

    assert len(platform.savepoints) == 1  # no savepoint was asked of the crash-looping workers
    assert platform.applied[-1] == Apply(2, 2, url)
    assert status.stable is not None and status.stable.generation == 3
    upgrading = [e for e in platform.events if e.reason == "Upgrading"][-1]
    assert "not healthy" in upgrading.message


def test_a_change_to_a_crash_looping_version_restores_its_checkpoints_without_a_savepoint() -> None:
    slow = {**FAST, "readinessTimeout": "1h"}
    platform, _ = stable_job(image="weir:1", upgrade=slow)
    run(platform, job(image="weir:broken", upgrade=slow), 2)

    status = drive(platform, job(image="weir:4", upgrade=slow), 3, is_("Stable"))

    assert len(platform.savepoints) == 1
    assert platform.applied[-1] == Apply(2, 2, None)
    assert status.stable is not None and status.stable.generation == 3


# --------------------------------------------------------------------------- refusal of incompatible state


def pipeline_with(window_size: str = "1m", **outputs: Any) -> dict[str, Any]:
    pipeline: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())["spec"]["pipeline"]
    pipeline["steps"][5]["window"]["size"] = window_size
    pipeline["steps"][6]["aggregate"]["outputs"].update(outputs)
    return pipeline


def test_a_change_that_makes_the_state_unusable_is_refused_while_the_old_workers_keep_running() -> None:
    platform, _ = stable_job()
    applied = list(platform.applied)
    bigger = job(pipeline=pipeline_with("5m"))

    status = run(platform, bigger, 2)

    assert platform.applied == applied and platform.savepoints == {}
    assert status.intent is None and status.lifecycle_state == "Stable" and status.observed_generation == 2
    stalled = condition(status, "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "IncompatibleStateChange")
    assert "pipeline.window.size: 1m -> 5m" in stalled.message
    assert "upgrade.allowStateReset: true" in stalled.message and "upgradeMode: stateless" in stalled.message
    assert [(e.type, e.reason) for e in platform.events] == [("Warning", "IncompatibleStateChange")]

    platform.clock.advance(60)
    run(platform, bigger, 2)
    assert len(platform.events) == 1 and platform.applied == applied  # the same refusal: no new event

    status = run(platform, job(), 3)  # changed back
    assert condition(status, "Stalled").status == "False"


def test_with_allow_state_reset_the_change_goes_through_a_savepoint_saying_windows_restart() -> None:
    platform, _ = stable_job()
    reset = job(pipeline=pipeline_with("5m"), upgrade={**FAST, "allowStateReset": True})

    status = drive(platform, reset, 2, is_("Stable"))

    assert len(platform.savepoints) == 1
    assert platform.applied[-1].restore_from is not None
    upgrading = next(e for e in platform.events if e.reason == "Upgrading")
    assert "windows restart empty (pipeline.window.size: 1m -> 5m)" in upgrading.message
    assert condition(status, "Stalled").status == "False"


def test_going_back_by_hand_from_a_failing_reset_upgrade_to_the_stable_spec_is_not_refused() -> None:
    slow = {**FAST, "readinessTimeout": "1h"}
    platform, before = stable_job(image="weir:1", upgrade=slow)
    reset = job(image="weir:broken", pipeline=pipeline_with("5m"), upgrade={**slow, "allowStateReset": True})
    run(platform, reset, 2)
    snapshot = platform.status.stable.snapshot if platform.status.stable else None
    assert snapshot is not None

    status = drive(platform, before, 3, is_("Stable"))

    assert platform.applied[-1] == Apply(2, 2, snapshot)
    assert condition(status, "Stalled").status == "False"


def test_in_stateless_mode_an_incompatible_change_is_not_refused() -> None:
    platform, _ = stable_job(upgradeMode="stateless")

    status = drive(platform, job(upgradeMode="stateless", pipeline=pipeline_with("5m")), 2, is_("Stable"))

    assert status.stable is not None and status.stable.generation == 2 and platform.savepoints == {}


def test_adding_an_output_keeps_the_state_usable_and_upgrades_through_a_savepoint() -> None:
    platform, _ = stable_job()

    status = drive(
        platform, job(pipeline=pipeline_with(mx={"fn": "max", "field": "amount"})), 2, is_("Stable")
    )

    assert len(platform.savepoints) == 1 and status.stable is not None and status.stable.generation == 2
    assert condition(status, "Stalled").status == "False"


# --------------------------------------------------------------------------- modes, initial savepoint


def test_a_new_job_starts_from_its_initial_savepoint_path_and_ignores_it_once_it_ran() -> None:
    initial = "s3://other/weir/default/old/savepoints/sp-9"
    platform = FakePlatform()
    the_job = job(initialSavepointPath=initial)

    drive(platform, the_job, 1, is_("Stable"))
    assert platform.applied[0] == Apply(2, 2, initial)

    platform.deployed = None  # weir up restarted: no workers, the status remains
    run(platform, the_job, 1)
    assert platform.applied[-1] == Apply(2, 2, None)


def test_a_state_reset_allowed_by_the_spec_reaches_the_workers_environment() -> None:
    def env(job_spec: spec.JobSpec) -> dict[str, Any]:
        children = render.render(job().model_copy(update={"spec": job_spec}), render.RenderOptions("weir:1"))
        container = children.stateful_set["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    assert "WEIR_ALLOW_STATE_RESET" not in env(job().spec)
    assert env(job(upgrade={"allowStateReset": True}).spec)["WEIR_ALLOW_STATE_RESET"] == "1"
    assert env(job(upgradeMode="stateless").spec)["WEIR_ALLOW_STATE_RESET"] == "1"


def test_upgrade_and_savepoint_settings_change_no_worker() -> None:
    platform, _ = stable_job()
    changed = job(
        upgrade={"stabilityWindow": "5m"}, savepoints={"maxCount": 3}, initialSavepointPath="s3://b/x"
    )

    status = run(platform, changed, 2)

    assert platform.calls == [c for c in platform.calls if c.startswith("status:")]
    assert status.observed_generation == 2 and status.lifecycle_state == "Stable"


# --------------------------------------------------------------------------- periodic savepoints, retention


def test_periodic_savepoints_are_taken_at_the_interval_without_stopping_the_workers() -> None:
    platform, the_job = stable_job(savepoints={"interval": "1m"})
    taken = len(platform.savepoints)
    assert taken == 1  # the first one as soon as the job was healthy
    first = platform.status.savepoint_history[0].completed_at
    assert first is not None

    platform.clock.current = first + timedelta(seconds=59)
    run(platform, the_job)
    assert len(platform.savepoints) == taken
    platform.clock.advance(1)
    status = run(platform, the_job)

    assert len(platform.savepoints) == taken + 1
    assert status.last_savepoint is not None and status.last_savepoint.trigger == "periodic"
    assert status.intent is None and platform.applied[-1].replicas == 2
    assert [s.trigger for s in status.savepoint_history] == ["periodic", "periodic"]


def test_no_periodic_savepoint_is_asked_of_workers_that_are_not_ready() -> None:
    platform, the_job = stable_job(savepoints={"interval": "1m"})
    platform.workers_ready = False
    platform.clock.advance(120)

    run(platform, the_job)

    assert len(platform.savepoints) == 1


def test_periodic_savepoints_go_on_while_a_change_is_refused_and_while_rolled_back() -> None:
    settings = {"interval": "1m"}
    platform, _ = stable_job(image="weir:1", savepoints=settings)
    refused = job(image="weir:1", savepoints=settings, pipeline=pipeline_with("5m"))
    run(platform, refused, 2)
    taken = len(platform.savepoints)
    platform.clock.advance(60)
    run(platform, refused, 2)
    assert len(platform.savepoints) == taken + 1
    assert (
        platform.deployed is not None and platform.deployed.fingerprint == platform.status.stable_fingerprint
    )

    broken = job(image="weir:broken", savepoints=settings)
    drive(platform, broken, 3, is_("RolledBack"))
    taken = len(platform.savepoints)
    platform.clock.advance(60)
    run(platform, broken, 3)
    assert len(platform.savepoints) == taken + 1
    assert platform.status.last_savepoint is not None and platform.status.last_savepoint.trigger == "periodic"


def history_of(platform: FakePlatform) -> list[str]:
    return [s.id for s in platform.status.savepoint_history]


def test_retention_deletes_savepoints_beyond_max_count_from_the_store_and_the_history() -> None:
    platform, the_job = stable_job(savepoints={"interval": "1m", "maxCount": 2})
    for _ in range(4):
        platform.clock.advance(60)
        run(platform, the_job)

    ids = list(platform.savepoints)
    assert len(ids) == 5
    assert platform.disposed == [f"{STORE}/{i}" for i in ids[:3]]
    assert history_of(platform) == ids[:2:-1]  # the newest 2, newest first
    assert "SavepointDisposed" in reasons(platform)


def test_retention_deletes_savepoints_older_than_max_age() -> None:
    platform, the_job = stable_job(savepoints={"interval": "1m", "maxAge": "90s"})
    for _ in range(3):
        platform.clock.advance(60)
        run(platform, the_job)

    ids = list(platform.savepoints)
    assert platform.disposed == [f"{STORE}/{i}" for i in ids[:2]]
    assert history_of(platform) == ids[:1:-1]


def test_retention_never_deletes_the_savepoint_a_rollback_to_the_stable_spec_needs() -> None:
    settings = {"interval": "1m", "maxCount": 1}
    slow = {**FAST, "readinessTimeout": "1h"}
    platform, _ = stable_job(image="weir:1", savepoints=settings, upgrade=slow)
    broken = job(image="weir:broken", savepoints=settings, upgrade=slow)
    run(platform, broken, 2)  # the upgrade savepoint is the stable version's snapshot
    snapshot = platform.status.stable.snapshot if platform.status.stable else None
    assert snapshot is not None

    fixed = job(image="weir:2", savepoints=settings, upgrade=slow)
    drive(platform, fixed, 3, is_("Stable"))  # the stable version changes: its snapshot is free now
    for _ in range(3):
        platform.clock.advance(60)
        run(platform, fixed, 3)

    assert snapshot in platform.disposed
    kept = platform.status.savepoint_history
    assert len([s for s in kept if s.url]) == 1


def test_a_failed_deletion_is_shown_in_the_history_warned_once_and_retried() -> None:
    platform, the_job = stable_job(savepoints={"interval": "1m", "maxCount": 1})
    platform.dispose_error = "AccessDenied"
    platform.clock.advance(60)
    status = run(platform, the_job)

    failed = [s for s in status.savepoint_history if s.dispose_error]
    assert len(failed) == 1 and failed[0].dispose_error == "AccessDenied"
    assert [e.type for e in platform.events if e.reason == "SavepointDisposeFailed"] == ["Warning"]
    assert condition(status, "Degraded").status == "False"

    platform.clock.advance(30)
    run(platform, the_job)
    assert len([c for c in platform.calls if c.startswith("dispose:")]) == 1  # waits for the retry delay
    platform.dispose_error = None
    platform.clock.advance(30)
    status = run(platform, the_job)
    assert len([c for c in platform.calls if c.startswith("dispose:")]) >= 2
    assert not [s for s in status.savepoint_history if s.dispose_error]
    assert [e.type for e in platform.events if e.reason == "SavepointDisposeFailed"] == ["Warning"]


def test_the_history_keeps_at_least_max_count_completed_savepoints_beyond_the_policy_bound() -> None:
    platform, the_job = stable_job(savepoints={"interval": "1m", "maxCount": 5})
    policy = Policy(savepoint_history=2)
    for _ in range(6):
        platform.clock.advance(60)
        run(platform, the_job, policy=policy)

    assert len(platform.status.savepoint_history) == 5


def test_a_nonce_answered_long_ago_is_not_taken_again_after_newer_savepoints() -> None:
    settings = {"interval": "1m", "maxCount": 1}
    platform = FakePlatform()
    nonced = job(savepointTriggerNonce=1, savepoints=settings)
    drive(platform, nonced, 1, is_("Stable"))
    for _ in range(3):
        platform.clock.advance(60)
        run(platform, nonced, 1)

    assert "nonce" not in [s.trigger for s in platform.status.savepoint_history]  # deleted by retention
    assert platform.status.answered_savepoint_nonce == 1
    nonce_requests = [e for e in platform.events if e.message == "savepointTriggerNonce 1"]
    assert len(nonce_requests) == 1
    assert len(platform.savepoints) >= 4


# ------------------------------------------------------------------- an operator restart after each step


def summary(platform: FakePlatform) -> dict[str, Any]:
    status = platform.status
    deployed = platform.deployed
    return {
        "lifecycle": status.lifecycle_state,
        "intent": status.intent,
        "stable": status.stable.model_dump(by_alias=False) if status.stable else None,
        "last_stable_spec": status.last_stable_spec,
        "rollback": status.rollback.model_dump(by_alias=False, exclude={"started_at"})
        if status.rollback
        else None,
        "deployed": (deployed.fingerprint, deployed.workers, deployed.replicas, deployed.restore_from)
        if deployed
        else None,
        "savepoints": sorted(platform.savepoints),
        "conditions": [(c.type, c.status, c.reason) for c in status.conditions],
    }


def crash_after_every_step(
    scenario: Callable[[FakePlatform], None], setup: Callable[[], FakePlatform]
) -> tuple[dict[str, Any], int]:
    """Run ``scenario`` uninterrupted, then once per step k with the operator crashing right after
    step k (and a fresh one starting from the stored status); every run must end the same."""
    platform = setup()
    start = platform.steps
    scenario(platform)
    expected, steps = summary(platform), platform.steps - start
    assert steps > 5
    for k in range(1, steps + 1):
        crashed = setup()
        crashed.crash_at_step = crashed.steps + k
        scenario(crashed)
        assert crashed.crash_at_step is None, f"step {k}: the crash did not happen"
        assert summary(crashed) == expected, f"operator crash after step {k}"
    return expected, steps


def test_an_operator_crash_after_any_step_of_an_upgrade_ends_stable_with_one_savepoint() -> None:
    def setup() -> FakePlatform:
        return stable_job(image="weir:1")[0]

    def scenario(platform: FakePlatform) -> None:
        platform.savepoints.clear()
        drive(platform, job(image="weir:2"), 2, is_("Stable"))

    expected, _ = crash_after_every_step(scenario, setup)

    assert expected["lifecycle"] == "Stable" and len(expected["savepoints"]) == 1
    assert expected["stable"]["generation"] == 2


def test_an_operator_crash_after_any_step_of_a_failing_upgrade_ends_rolled_back_with_one_savepoint() -> None:
    def setup() -> FakePlatform:
        return stable_job(image="weir:1")[0]

    def scenario(platform: FakePlatform) -> None:
        platform.savepoints.clear()
        drive(platform, job(image="weir:broken"), 2, is_("RolledBack"))

    expected, _ = crash_after_every_step(scenario, setup)

    assert expected["lifecycle"] == "RolledBack" and len(expected["savepoints"]) == 1
    assert expected["rollback"]["from_generation"] == 2 and expected["rollback"]["outcome"] == "RolledBack"
    assert expected["deployed"][0] == render.fingerprint(job(image="weir:1").spec)


@pytest.mark.parametrize("limit", [timedelta(minutes=2)])
def test_the_deadline_counts_from_the_start_of_the_change(limit: timedelta) -> None:
    platform, _ = stable_job(image="weir:1")
    start = platform.clock()
    run(platform, job(image="weir:broken"), 2)

    assert platform.status.stabilization is not None
    assert platform.status.stabilization.deadline == start + limit
