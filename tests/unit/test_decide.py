"""decide() and the reconcile loop around it, phase by phase, on the in-memory platform."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from weir import spec
from weir_operator import model, render
from weir_operator.decide import Change, Policy, classify, cleanup_url, decide
from weir_operator.plans import Apply, Deployed, Observed, SavepointOutcome, TakeSavepoint, WorkerReport
from weir_operator.reconciler import finalize, reconcile
from weir_operator.testing import Clock, FakePlatform, OperatorCrashed

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"


def job(**changes: Any) -> spec.StreamJob:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["uid"] = "uid-1"
    document["spec"].update(changes)
    return spec.StreamJob.model_validate(document)


def condition(status: model.StreamJobStatus, type_: str) -> model.StatusCondition:
    return next(c for c in status.conditions if c.type == type_)


def run(
    platform: FakePlatform, the_job: spec.StreamJob, generation: int = 1, **kwargs: Any
) -> model.StreamJobStatus:
    return reconcile(platform, the_job, generation, platform.status, platform.clock, **kwargs)


def settle(
    platform: FakePlatform, the_job: spec.StreamJob, generation: int = 1, **kwargs: Any
) -> model.StreamJobStatus:
    """Let the stability window (default 1m) pass with healthy workers: the gate holds."""
    platform.clock.advance(61)
    return run(platform, the_job, generation, **kwargs)


def running(parallelism: int = 2, **changes: Any) -> tuple[FakePlatform, spec.StreamJob]:
    platform, the_job = FakePlatform(), job(parallelism=parallelism, **changes)
    run(platform, the_job)
    assert platform.status.phase == "Running"
    if the_job.spec.checkpoint is not None:  # the gate waits for a checkpoint of the new version
        at = platform.clock() + timedelta(seconds=30)
        done = model.CheckpointInfo(id="c-1", url="file:///s/c-1", completed_at=at)
        platform.reports = tuple(WorkerReport(i, done) for i in range(parallelism))
    assert settle(platform, the_job).lifecycle_state == "Stable"
    platform.reports = ()
    platform.calls.clear()
    platform.events.clear()
    return platform, the_job


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, Change.IGNORE),
        ({"upgradeMode": "stateless", "autoscaler": {"enabled": True}}, Change.IGNORE),
        ({"savepointTriggerNonce": 7}, Change.IGNORE),
        ({"parallelism": 3}, Change.SCALE),
        ({"image": "weir:2"}, Change.UPGRADE),
        ({"image": "weir:2", "parallelism": 3}, Change.UPGRADE),
        ({"restartNonce": 1}, Change.REDEPLOY),
        ({"restartNonce": 1, "image": "weir:2", "parallelism": 4}, Change.REDEPLOY),
    ],
)
def test_a_spec_change_is_classified_by_the_largest_kind_of_field_it_touches(
    changes: dict[str, Any], expected: Change
) -> None:
    old = job(parallelism=2).spec
    deployed = Deployed(fingerprint=render.fingerprint(old), workers=2, replicas=2, spec=old)

    assert classify(deployed, job(**{"parallelism": 2, **changes}).spec) == expected


def test_without_the_deployed_spec_the_fingerprint_still_tells_an_upgrade_from_a_scale() -> None:
    old = job(parallelism=2).spec
    deployed = Deployed(fingerprint=render.fingerprint(old), workers=2, replicas=2, spec=None)

    assert classify(deployed, job(parallelism=3).spec) == Change.SCALE
    assert classify(deployed, job(parallelism=2, image="weir:2").spec) == Change.UPGRADE


# --------------------------------------------------------------------------- deploy


def test_a_new_job_records_a_deploy_intent_and_applies_its_children_in_one_plan() -> None:
    clock = Clock()
    plan = decide(job(parallelism=3), 1, model.StreamJobStatus(), Observed(), clock())

    assert plan.status.intent is not None
    assert plan.status.intent.action == "deploy"
    assert plan.status.intent.generation == 1
    assert plan.status.observed_generation == 1
    assert plan.status.phase == "Deploying"
    assert plan.actions == (Apply(workers=3, replicas=3, restore_from=None),)


def test_the_intent_is_written_before_the_children_are_applied() -> None:
    platform = FakePlatform()

    run(platform, job())

    assert platform.calls[0].startswith("status:Deploying:deploy-1-")
    assert platform.calls[1] == "apply"


def test_a_deployed_job_with_ready_workers_is_running_and_ready() -> None:
    platform = FakePlatform()

    run(platform, job(parallelism=2))
    status = settle(platform, job(parallelism=2))

    assert status.phase == "Running"
    assert status.intent is None
    assert status.parallelism == 2 and status.ready_workers == 2
    assert status.selector == "weir.dev/job=revenue"
    assert status.reconciled_fingerprint == render.fingerprint(job(parallelism=2).spec)
    assert [c.type for c in status.conditions] == ["Ready", "Progressing", "Degraded", "Stalled"]
    assert condition(status, "Ready").status == "True"
    assert condition(status, "Progressing").status == "False"
    assert {e.reason for e in platform.events} >= {
        "Deploying", "Stabilizing", "Stable", "Deployed", "PhaseRunning", "WorkersReady"
    }


def test_workers_not_ready_yet_keep_the_job_deploying_and_progressing() -> None:
    platform = FakePlatform(workers_ready=False)

    status = run(platform, job(parallelism=2))

    assert status.phase == "Deploying"
    assert condition(status, "Ready").status == "False"
    assert condition(status, "Ready").reason == "WorkersNotReady"
    assert condition(status, "Progressing").reason == "WorkersStarting"

    platform.workers_ready = True
    assert run(platform, job(parallelism=2)).phase == "Running"


def test_a_reconcile_of_an_unchanged_running_job_writes_nothing_and_emits_nothing() -> None:
    platform, the_job = running()

    run(platform, the_job)

    assert platform.calls == []
    assert platform.events == []


def test_an_ignored_change_only_moves_the_observed_generation() -> None:
    platform, _ = running()

    status = run(platform, job(parallelism=2, upgradeMode="stateless"), generation=2)

    assert status.observed_generation == 2
    assert platform.applied == [Apply(2, 2, None)]  # the one from the deploy
    assert [c for c in platform.calls if not c.startswith("status")] == []


def test_a_deleted_config_map_is_recreated_without_an_intent() -> None:
    platform, the_job = running()
    assert platform.deployed is not None
    platform.deployed = Deployed(
        platform.deployed.fingerprint, 2, 2, None, platform.deployed.spec, missing=("ConfigMap",)
    )

    run(platform, the_job)

    assert platform.calls == ["apply"]
    assert platform.events[0].reason == "Repairing"


# --------------------------------------------------------------------------- scale


def test_scaling_a_savepoint_mode_job_stops_it_with_a_savepoint_then_restores_the_new_workers() -> None:
    platform, _ = running(parallelism=2)

    run(platform, job(parallelism=4), generation=2)
    status = settle(platform, job(parallelism=4), generation=2)

    savepoint_calls = [c for c in platform.calls if c.startswith("savepoint:")]
    assert len(savepoint_calls) == 1
    savepoint_id = savepoint_calls[0].split(":", 1)[1]
    assert savepoint_id.startswith("scale-2-")
    # intent first, then the savepoint, then the outcome recorded, then the apply
    assert platform.calls.index(f"status:Savepointing:{savepoint_id}") < platform.calls.index(
        f"savepoint:{savepoint_id}"
    )
    url = f"file:///var/lib/weir/checkpoints/default/revenue/savepoints/{savepoint_id}"
    assert platform.applied[-1] == Apply(workers=4, replicas=4, restore_from=url)
    assert status.phase == "Running" and status.parallelism == 4 and status.intent is None
    assert status.last_savepoint is not None
    assert status.last_savepoint.trigger == "upgrade" and status.last_savepoint.url == url
    assert status.last_savepoint.generation == 2
    assert status.savepoint_history == (status.last_savepoint,)
    assert {"Scaling", "SavepointCompleted", "Scaled"} <= {e.reason for e in platform.events}


def test_the_savepoint_before_a_scale_stops_the_workers() -> None:
    platform, _ = running(parallelism=2)
    plan = decide(job(parallelism=3), 2, platform.status, platform.observe(job()), platform.clock())

    assert plan.actions == (TakeSavepoint(plan.status.intent.id, stop=True),)  # type: ignore[union-attr]
    assert plan.status.phase == "Savepointing"


def test_scaling_a_stateless_job_redeploys_without_a_savepoint() -> None:
    platform, _ = running(parallelism=2, upgradeMode="stateless")

    status = run(platform, job(parallelism=3, upgradeMode="stateless"), generation=2)

    assert not [c for c in platform.calls if c.startswith("savepoint")]
    assert platform.applied[-1] == Apply(workers=3, replicas=3, restore_from=None)
    assert status.parallelism == 3 and status.last_savepoint is None


def test_a_rescale_stops_every_old_worker_before_any_new_one_starts() -> None:
    platform, _ = running(parallelism=2)

    run(platform, job(parallelism=4), generation=2)

    url = platform.applied[-1].restore_from
    assert url is not None
    # deploy, then the old workers to zero (after their stop-savepoint), then the new ones
    assert platform.applied == [Apply(2, 2, None), Apply(2, 0, None), Apply(4, 4, url)]
    acts = [c for c in platform.calls if not c.startswith("status:")]
    assert acts[0].startswith("savepoint:") and acts[1:] == ["apply", "apply"]


def test_new_workers_of_another_parallelism_wait_until_the_old_ones_are_gone() -> None:
    platform, _ = running(parallelism=4, upgradeMode="stateless")
    platform.lingering = 2  # two old pods still terminating after the scale to zero

    run(platform, job(parallelism=2, upgradeMode="stateless"), generation=2)
    assert platform.applied[-1] == Apply(4, 0, None)
    assert platform.status.intent is not None and platform.status.phase == "Deploying"

    platform.lingering = 0
    status = run(platform, job(parallelism=2, upgradeMode="stateless"), generation=2)
    assert platform.applied[-1] == Apply(2, 2, None)
    assert status.intent is None and status.phase == "Running"


def test_an_upgrade_at_the_same_parallelism_replaces_workers_without_stopping_them_all() -> None:
    # One pod per ordinal and the same transactional ids: a new worker fences its predecessor.
    platform, _ = running(parallelism=2, upgradeMode="stateless")

    run(platform, job(parallelism=2, upgradeMode="stateless", image="weir:2"), generation=2)

    assert platform.applied == [Apply(2, 2, None), Apply(2, 2, None)]


def test_last_state_takes_a_savepoint_to_rescale_but_upgrades_from_the_latest_checkpoint() -> None:
    platform, _ = running(parallelism=2, upgradeMode="last-state")
    run(platform, job(parallelism=3, upgradeMode="last-state"), generation=2)
    assert len(platform.savepoints) == 1

    run(platform, job(parallelism=3, upgradeMode="last-state", image="weir:2"), generation=3)

    assert len(platform.savepoints) == 1
    assert platform.applied[-1] == Apply(workers=3, replicas=3, restore_from=None)


def test_an_upgrade_in_savepoint_mode_restores_from_a_stop_savepoint() -> None:
    platform, _ = running(parallelism=2)

    run(platform, job(parallelism=2, image="weir:2"), generation=2)
    assert not any(e.reason == "Upgraded" for e in platform.events)  # applied is not upgraded
    status = settle(platform, job(parallelism=2, image="weir:2"), generation=2)

    assert status.phase == "Running"
    assert platform.applied[-1].restore_from is not None
    assert platform.applied[-1].restore_from.endswith(status.last_savepoint.id)  # type: ignore[union-attr]
    assert any(e.reason == "Upgraded" for e in platform.events)


def test_a_restart_nonce_redeploys_the_workers() -> None:
    platform, _ = running(parallelism=2, upgradeMode="stateless")

    run(platform, job(parallelism=2, upgradeMode="stateless", restartNonce=1), generation=2)
    settle(platform, job(parallelism=2, upgradeMode="stateless", restartNonce=1), generation=2)

    assert platform.calls.count("apply") == 1
    assert any(e.reason == "Redeployed" for e in platform.events)


# --------------------------------------------------------------------------- savepoint failures


def test_a_failed_savepoint_keeps_the_old_workers_and_is_degraded() -> None:
    platform, _ = running(parallelism=2)
    platform.savepoint_error = "worker 1: timed out"

    status = run(platform, job(parallelism=4), generation=2)

    assert platform.calls.count("apply") == 0
    assert platform.deployed is not None and platform.deployed.workers == 2
    assert status.intent is None
    assert status.last_savepoint is not None and status.last_savepoint.error == "worker 1: timed out"
    assert status.last_savepoint.url is None
    assert condition(status, "Degraded").reason == "SavepointFailed"
    assert condition(status, "Stalled").status == "False"
    assert any(e.type == "Warning" and e.reason == "SavepointFailed" for e in platform.events)


def test_a_failed_savepoint_is_retried_after_the_backoff_and_then_stalls() -> None:
    platform, _ = running(parallelism=2)
    platform.savepoint_error = "unreachable"
    policy = Policy(savepoint_attempts=2)
    scaled = job(parallelism=4)

    run(platform, scaled, generation=2, policy=policy)
    run(platform, scaled, generation=2, policy=policy)
    assert len(platform.savepoints) == 1  # still backing off

    platform.clock.advance(61)
    run(platform, scaled, generation=2, policy=policy)
    assert len(platform.savepoints) == 2

    platform.clock.advance(61)
    status = run(platform, scaled, generation=2, policy=policy)
    assert len(platform.savepoints) == 2
    assert condition(status, "Stalled").status == "True"
    assert condition(status, "Stalled").reason == "SavepointFailed"
    assert "upgradeMode: stateless" in condition(status, "Stalled").message
    assert status.phase == "Running"

    status = run(platform, job(parallelism=4, upgradeMode="stateless"), generation=3, policy=policy)
    assert status.parallelism == 4
    assert condition(status, "Stalled").status == "False"


# --------------------------------------------------------------------------- operator restarts


def test_an_operator_restart_before_the_savepoint_resumes_the_same_savepoint_id() -> None:
    platform, _ = running(parallelism=2)
    platform.crash_before = frozenset({"savepoint"})
    with pytest.raises(OperatorCrashed):
        run(platform, job(parallelism=4), generation=2)
    intent = platform.status.intent
    assert intent is not None and intent.savepoint_id is not None
    assert platform.savepoints == {}

    platform.crash_before = frozenset()
    platform.clock.advance(30)  # a new operator, later: the id must not be derived from the time again
    status = run(platform, job(parallelism=4), generation=2)

    assert list(platform.savepoints) == [intent.savepoint_id]
    assert status.last_savepoint is not None and status.last_savepoint.id == intent.savepoint_id
    assert platform.applied[-1].restore_from is not None
    assert platform.applied[-1].restore_from.endswith(intent.savepoint_id)


def test_an_operator_restart_after_the_savepoint_asks_again_by_its_id_and_takes_no_second_one() -> None:
    platform, _ = running(parallelism=2)
    platform.crash_after = frozenset({"savepoint"})
    with pytest.raises(OperatorCrashed):
        run(platform, job(parallelism=4), generation=2)
    assert len(platform.savepoints) == 1

    platform.crash_after = frozenset()
    run(platform, job(parallelism=4), generation=2)

    requests = [c for c in platform.calls if c.startswith("savepoint:")]
    assert len(requests) == 2 and requests[0] == requests[1]
    assert len(platform.savepoints) == 1
    assert platform.status.parallelism == 4


def test_an_operator_restart_before_the_apply_applies_with_the_recorded_savepoint() -> None:
    platform, _ = running(parallelism=2)
    platform.crash_before = frozenset({"apply"})
    with pytest.raises(OperatorCrashed):
        run(platform, job(parallelism=4), generation=2)
    intent = platform.status.intent
    assert intent is not None and intent.restore_from is not None

    platform.crash_before = frozenset()
    status = run(platform, job(parallelism=4), generation=2)

    assert len(platform.savepoints) == 1
    assert platform.applied[-1] == Apply(4, 4, intent.restore_from)
    assert status.intent is None


def test_decide_continues_a_recorded_intent_instead_of_starting_another() -> None:
    platform, _ = running(parallelism=2)
    first = decide(job(parallelism=4), 2, platform.status, platform.observe(job()), platform.clock())
    platform.clock.advance(10)

    again = decide(job(parallelism=4), 2, first.status, platform.observe(job()), platform.clock())

    assert again.status.intent == first.status.intent
    assert again.actions == first.actions


# --------------------------------------------------------------------------- savepoint nonce


def test_a_new_savepoint_trigger_nonce_takes_a_savepoint_without_stopping_the_workers() -> None:
    platform, _ = running(parallelism=2)

    status = run(platform, job(parallelism=2, savepointTriggerNonce=1), generation=2)

    assert len(platform.savepoints) == 1
    assert platform.applied == [Apply(2, 2, None)]
    info = status.last_savepoint
    assert info is not None and info.trigger == "nonce" and info.trigger_nonce == 1 and info.url
    assert status.savepoint_history[0] == info
    assert status.intent is None and status.phase == "Running"

    run(platform, job(parallelism=2, savepointTriggerNonce=1), generation=2)
    assert len(platform.savepoints) == 1

    status = run(platform, job(parallelism=2, savepointTriggerNonce=2), generation=3)
    assert len(platform.savepoints) == 2
    assert [s.trigger_nonce for s in status.savepoint_history] == [2, 1]


def test_a_savepoint_nonce_waits_until_every_worker_is_ready() -> None:
    platform = FakePlatform(workers_ready=False)
    run(platform, job(parallelism=2, savepointTriggerNonce=1))
    assert platform.savepoints == {}

    platform.workers_ready = True
    run(platform, job(parallelism=2, savepointTriggerNonce=1))
    assert len(platform.savepoints) == 1


def test_the_savepoint_history_is_bounded() -> None:
    platform, _ = running(parallelism=1)
    policy = Policy(savepoint_history=3)
    for nonce in range(1, 6):
        nonced = job(parallelism=1, savepointTriggerNonce=nonce)
        status = run(platform, nonced, generation=nonce + 1, policy=policy)

    assert [s.trigger_nonce for s in status.savepoint_history] == [5, 4, 3]


# --------------------------------------------------------------------------- suspend, resume, shutdown


def test_suspending_stops_the_workers_with_a_savepoint_and_resuming_restores_from_it() -> None:
    platform, _ = running(parallelism=2)

    status = run(platform, job(parallelism=2, state="suspended"), generation=2)

    assert status.phase == "Suspended"
    assert platform.deployed is not None and platform.deployed.replicas == 0
    assert status.parallelism == 0
    assert condition(status, "Ready").reason == "Suspended"
    assert status.last_savepoint is not None and status.last_savepoint.trigger == "suspend"
    url = status.last_savepoint.url

    status = run(platform, job(parallelism=3), generation=3)

    assert platform.applied[-1] == Apply(3, 3, url)
    assert status.phase == "Running" and status.parallelism == 3


def test_suspending_a_stateless_job_scales_it_to_zero_without_a_savepoint() -> None:
    platform, _ = running(parallelism=2, upgradeMode="stateless")

    status = run(platform, job(parallelism=2, upgradeMode="stateless", state="suspended"), generation=2)

    assert platform.savepoints == {}
    assert platform.applied[-1] == Apply(2, 0, None)
    assert status.phase == "Suspended"


def test_a_job_created_suspended_gets_children_without_workers() -> None:
    platform = FakePlatform()

    status = run(platform, job(state="suspended"))

    assert platform.applied == [Apply(1, 0, None)]
    assert status.phase == "Suspended"


def test_a_shutdown_savepoint_is_where_the_next_deploy_resumes() -> None:
    platform, the_job = running(parallelism=2)

    status = run(platform, the_job, shutdown=True)
    assert status.last_savepoint is not None and status.last_savepoint.trigger == "shutdown"
    url = status.last_savepoint.url

    platform.deployed = None  # the local platform starts with no processes
    run(platform, the_job)
    assert platform.applied[-1] == Apply(2, 2, url)


# --------------------------------------------------------------------------- crash loops, errors, reports


def test_crash_looping_workers_make_the_job_degraded_with_their_restart_counts() -> None:
    platform, the_job = running(parallelism=3)
    platform.crash_looping = frozenset({1})

    status = run(platform, the_job)

    degraded = condition(status, "Degraded")
    assert degraded.status == "True" and degraded.reason == "WorkersCrashLooping"
    assert "worker 1: CrashLoopBackOff (5 restarts)" in degraded.message
    assert status.worker_restarts == 5
    assert status.phase == "Deploying"
    assert [e.reason for e in platform.events if e.type == "Warning"] == ["WorkersCrashLooping"]

    platform.events.clear()
    run(platform, the_job)
    assert platform.events == []  # no new transition, no new event

    platform.crash_looping = frozenset()
    status = run(platform, the_job)
    assert condition(status, "Degraded").status == "False"
    assert any(e.reason == "DegradedCleared" for e in platform.events)


def test_a_broker_outage_reported_by_the_workers_degrades_the_job_naming_it_until_it_ends() -> None:
    platform, the_job = running(parallelism=2)
    done = model.CheckpointInfo(id="c-1", url="file:///s/c-1", completed_at=Clock().advance(1))
    platform.reports = (
        WorkerReport(0, done, outages={"kafka": "all brokers down (for 12.5 s)"}),
        WorkerReport(1, done, outages={"kafka": "all brokers down (for 12.4 s)"}),
    )

    status = run(platform, the_job)

    degraded = condition(status, "Degraded")
    assert degraded.status == "True" and degraded.reason == "KafkaUnreachable"
    assert "worker 0: Kafka unreachable: all brokers down (for 12.5 s)" in degraded.message
    assert "worker 1: Kafka unreachable" in degraded.message
    assert [e.reason for e in platform.events if e.type == "Warning"] == ["KafkaUnreachable"]

    platform.events.clear()
    platform.reports = (WorkerReport(0, outages={"kafka": "all brokers down (for 30.0 s)"}),
                        WorkerReport(1, outages={"kafka": "all brokers down (for 30.1 s)"}))
    run(platform, the_job)
    assert platform.events == []  # the same outage going on adds no event

    platform.reports = (WorkerReport(0, done), WorkerReport(1, done))
    status = run(platform, the_job)
    assert condition(status, "Degraded").status == "False"
    assert any(e.reason == "DegradedCleared" for e in platform.events)


def test_an_unreachable_checkpoint_store_and_broker_together_are_named_both() -> None:
    platform, the_job = running(parallelism=1)
    platform.reports = (WorkerReport(0, outages={"store": "connect timeout (for 3.0 s)"}),)
    assert condition(run(platform, the_job), "Degraded").reason == "CheckpointStoreUnreachable"

    platform.reports = (WorkerReport(0, outages={"store": "connect timeout", "kafka": "brokers down"}),)
    degraded = condition(run(platform, the_job), "Degraded")
    assert degraded.reason == "DependenciesUnreachable"
    assert "checkpoint store unreachable: connect timeout" in degraded.message
    assert "Kafka unreachable: brokers down" in degraded.message


def test_refused_children_stall_the_job_with_one_warning_and_are_retried_with_a_growing_back_off() -> None:
    refusal = "StatefulSet default/revenue: HTTP 500: failed to create typed patch object"
    platform = FakePlatform(reject_apply=refusal)

    status = run(platform, job())
    assert status.phase == "Failed"
    stalled = condition(status, "Stalled")
    assert stalled.status == "True" and stalled.reason == "ApplyFailed"
    assert stalled.message.startswith(refusal) and status.error == refusal
    assert "refused 1 times" in stalled.message
    warnings = [e for e in platform.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["ApplyFailed"]
    assert warnings[0].message.startswith(f"Stalled=True: {refusal}")
    events = len(platform.events)

    run(platform, job())  # a resync before the back-off: nothing is applied
    assert platform.calls.count("apply") == 1
    platform.clock.advance(10)
    status = run(platform, job())  # 10 s later: the second attempt, then 20 s to the third
    assert platform.calls.count("apply") == 2
    assert status.apply_failure is not None and status.apply_failure.attempts == 2
    assert status.apply_failure.retry_at == platform.clock() + timedelta(seconds=20)
    platform.clock.advance(10)
    run(platform, job())
    assert platform.calls.count("apply") == 2
    assert len(platform.events) == events  # the same refusal again: no new event

    platform.reject_apply = None
    platform.clock.advance(10)
    status = run(platform, job())
    assert status.phase == "Running" and status.error is None and status.apply_failure is None
    assert condition(status, "Stalled").status == "False"


def test_refusals_back_off_up_to_the_policys_maximum() -> None:
    platform, policy = FakePlatform(reject_apply="quota exceeded"), Policy()
    run(platform, job())
    for _ in range(12):
        failure = platform.status.apply_failure
        assert failure is not None
        platform.clock.current = failure.retry_at
        run(platform, job())

    failure = platform.status.apply_failure
    assert failure is not None and failure.attempts == 13
    assert failure.retry_at - platform.clock() == policy.apply_retry_max


def test_a_new_generation_of_a_refused_job_is_applied_at_once_and_converges() -> None:
    platform = FakePlatform(reject_apply="StatefulSet default/revenue: HTTP 500: expected map, got &{yes}")
    run(platform, job(), generation=1)
    assert platform.calls.count("apply") == 1

    platform.reject_apply = None  # the user fixed the pod template: generation 2
    status = run(platform, job(image="weir:fixed"), generation=2)

    assert platform.calls.count("apply") == 2
    assert status.phase == "Running" and status.error is None
    assert condition(status, "Stalled").status == "False"
    assert any(e.reason == "StalledCleared" for e in platform.events)


def test_worker_reports_give_the_lag_and_the_oldest_of_the_newest_checkpoints() -> None:
    clock = Clock()
    platform, the_job = running(parallelism=2)
    older = model.CheckpointInfo(id="c-7", url="file:///s/c-7", completed_at=clock.advance(10))
    newer = model.CheckpointInfo(id="c-8", url="file:///s/c-8", completed_at=clock.advance(10))
    platform.reports = (WorkerReport(0, newer, 5), WorkerReport(1, older, 7))

    status = run(platform, the_job)

    assert status.lag is not None and status.lag.records == 12
    assert status.last_checkpoint == older

    platform.reports = (WorkerReport(0, newer, 0),)  # worker 1 did not answer
    assert run(platform, the_job).last_checkpoint == older


# --------------------------------------------------------------------------- partitions


REPARTITION = "weir-default-revenue-4-repartition"


def reporting(partitions: dict[str, int], workers: int) -> tuple[WorkerReport, ...]:
    return tuple(WorkerReport(i, input_partitions=partitions) for i in range(workers))


def test_a_parallelism_above_the_partition_count_is_capped_with_a_condition_naming_both_numbers() -> None:
    platform, the_job = running(parallelism=12)
    platform.reports = reporting({"events": 8, REPARTITION: 4}, 12)

    status = run(platform, the_job)

    assert (platform.applied[-1].workers, platform.applied[-1].replicas) == (8, 8)
    assert platform.deployed is not None and platform.deployed.replicas == 8
    assert status.parallelism == 8 and status.input_partitions == {"events": 8, REPARTITION: 4}
    degraded = condition(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "ParallelismCapped")
    assert degraded.message == (
        "parallelism 12 exceeds the 8 partitions of its largest input topic events; running 8 workers"
    )
    warnings = [e for e in platform.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["ParallelismCapped"]
    assert "parallelism 12 -> 8" in next(e.message for e in platform.events if e.reason == "Scaling")


def test_with_known_partition_counts_a_capped_job_never_starts_idle_workers() -> None:
    platform, the_job = running(parallelism=4)
    platform.reports = reporting({"events": 6, REPARTITION: 4}, 4)
    run(platform, the_job)
    platform.applied.clear()

    status = run(platform, job(parallelism=100), generation=2)

    assert [a.workers for a in platform.applied] == [4, 6]  # stop the 4 old ones, start 6: never 100
    assert status.parallelism == 6
    assert condition(status, "Degraded").message.startswith("parallelism 100 exceeds the 6 partitions")


def test_more_partitions_lift_the_cap_and_clear_the_condition() -> None:
    platform, the_job = running(parallelism=12)
    platform.reports = reporting({"events": 8}, 12)
    run(platform, the_job)
    assert platform.deployed is not None and platform.deployed.workers == 8

    platform.reports = reporting({"events": 16}, 8)
    status = run(platform, the_job)

    assert platform.deployed.workers == 12
    assert condition(status, "Degraded").status == "False"
    assert any(e.reason == "DegradedCleared" for e in platform.events)


def test_a_parallelism_within_the_partition_count_is_not_capped() -> None:
    platform, the_job = running(parallelism=8)
    platform.reports = reporting({"events": 8}, 8)

    status = run(platform, the_job)

    assert platform.deployed is not None and platform.deployed.workers == 8
    assert condition(status, "Degraded").status == "False"


def test_topics_the_spec_no_longer_reads_do_not_cap_it() -> None:
    platform, the_job = running(parallelism=12)
    platform.reports = reporting({"old-events": 2}, 12)

    status = run(platform, the_job)

    assert platform.deployed is not None and platform.deployed.workers == 12
    assert condition(status, "Degraded").status == "False"


def test_conditions_keep_their_transition_time_while_they_hold() -> None:
    platform, the_job = running()
    before = condition(platform.status, "Ready").last_transition_time

    platform.clock.advance(60)
    platform.reports = (WorkerReport(0, None, 3),)
    status = run(platform, the_job)

    assert condition(status, "Ready").last_transition_time == before


def test_a_savepoint_outcome_for_another_id_is_not_taken_for_the_intents_own() -> None:
    platform, _ = running(parallelism=2)
    first = decide(job(parallelism=4), 2, platform.status, platform.observe(job()), platform.clock())
    stray = SavepointOutcome("someone-else", completed=True, url="file:///x")
    observed = Observed(deployed=platform.deployed, savepoint=stray)

    again = decide(job(parallelism=4), 2, first.status, observed, platform.clock())

    assert isinstance(again.actions[0], TakeSavepoint)
    assert again.status.last_savepoint is None


# --------------------------------------------------------------------------- deletion


def deleting_job(policy: str = "delete") -> spec.StreamJob:
    return job(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": policy})


def test_a_deleted_job_with_cleanup_delete_stops_its_workers_before_removing_its_store() -> None:
    platform, the_job = running(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": "delete"})

    released = finalize(platform, the_job, 1, platform.status, platform.clock)

    assert released
    assert platform.calls[0].startswith("status:Deleting:cleanup-1-")  # the intent first
    assert [c for c in platform.calls if not c.startswith("status:")] == ["deleted", "removed"]
    reasons = [e.reason for e in platform.events]
    assert reasons[0] == "CleaningUp" and "CleanedUp" in reasons
    cleaned = next(e for e in platform.events if e.reason == "CleanedUp")
    assert "removed 7 objects under s3://bucket/weir/default/revenue" in cleaned.message
    assert platform.status.phase == "Deleting" and platform.status.intent is None


def test_the_store_is_not_removed_while_a_stopping_worker_may_still_write_to_it() -> None:
    platform, the_job = running(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": "delete"})
    platform.lingering = 2

    assert not finalize(platform, the_job, 1, platform.status, platform.clock)
    assert "removed" not in platform.calls
    assert condition(platform.status, "Progressing").message == (
        "waiting for 2 workers to stop before removing the store"
    )

    platform.lingering = 0
    assert finalize(platform, the_job, 1, platform.status, platform.clock)
    assert platform.calls.count("removed") == 1


def test_a_deleted_job_with_cleanup_retain_keeps_its_store() -> None:
    platform, the_job = running(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": "retain"})

    assert finalize(platform, the_job, 1, platform.status, platform.clock)

    assert "removed" not in platform.calls and "deleted" in platform.calls
    assert "cleanupPolicy retain" in platform.events[0].message


def test_a_store_that_cannot_be_removed_stalls_the_deletion_and_is_retried_without_new_events() -> None:
    platform, the_job = running(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": "delete"})
    platform.remove_error = "connecting to s3://bucket failed: connection refused"

    assert not finalize(platform, the_job, 1, platform.status, platform.clock)
    stalled = condition(platform.status, "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "CleanupFailed")
    assert "connection refused" in stalled.message and platform.status.error is not None
    failures = [e for e in platform.events if e.reason == "CleanupFailed"]
    assert len(failures) == 1 and failures[0].type == "Warning" and "retried until" in failures[0].message

    platform.clock.advance(30)
    assert not finalize(platform, the_job, 1, platform.status, platform.clock)
    assert platform.calls.count("removed") == 2
    # The same failure again: no new event.
    assert len([e for e in platform.events if e.reason == "CleanupFailed"]) == 1

    platform.remove_error = None
    assert finalize(platform, the_job, 1, platform.status, platform.clock)
    assert condition(platform.status, "Stalled").status == "False"


def test_a_store_unreachable_past_the_cleanup_timeout_is_left_and_the_job_let_go_with_a_warning() -> None:
    platform, the_job = running(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": "delete"})
    platform.remove_error = "AccessDenied"
    policy = Policy(cleanup_timeout=timedelta(minutes=10))

    assert not finalize(platform, the_job, 1, platform.status, platform.clock, policy=policy)
    platform.clock.advance(599)
    assert not finalize(platform, the_job, 1, platform.status, platform.clock, policy=policy)
    platform.clock.advance(1)
    assert finalize(platform, the_job, 1, platform.status, platform.clock, policy=policy)

    abandoned = [e for e in platform.events if e.reason == "CleanupAbandoned"]
    assert len(abandoned) == 1 and abandoned[0].type == "Warning"
    assert "s3://bucket/weir/default/revenue" in abandoned[0].message
    assert "AccessDenied" in abandoned[0].message


def test_an_operator_restart_during_deletion_continues_the_same_cleanup_intent() -> None:
    platform, the_job = running(checkpoint={"url": "s3://bucket/weir", "cleanupPolicy": "delete"})
    platform.crash_before = frozenset({"remove"})

    with pytest.raises(OperatorCrashed):
        finalize(platform, the_job, 1, platform.status, platform.clock)
    intent = platform.status.intent
    assert intent is not None and intent.action == "cleanup"

    platform.crash_before = frozenset()
    platform.clock.advance(5)
    assert finalize(platform, the_job, 1, platform.status, platform.clock)
    assert [e.reason for e in platform.events].count("CleaningUp") == 1  # resumed, not begun again


def test_cleanup_url_names_the_jobs_own_directory_only_for_the_delete_policy() -> None:
    assert cleanup_url(deleting_job("delete")) == "s3://bucket/weir/default/revenue"
    assert cleanup_url(deleting_job("retain")) is None
    assert job().spec.checkpoint is None and cleanup_url(job()) is None
