"""The autoscaler inside decide(): its decisions go through the same scale intent as spec.parallelism."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from weir import spec
from weir_operator import model
from weir_operator.decide import Policy
from weir_operator.plans import WorkerReport
from weir_operator.reconciler import reconcile
from weir_operator.testing import FakePlatform, SimulatedJob

EXAMPLE = Path(spec.__file__).parent / "examples" / "revenue.yaml"
FAST = {"enabled": True, "metricsWindow": "20s", "scaleUpStabilizationWindow": "10s",
        "scaleDownStabilizationWindow": "60s", "cooldown": "10s", "catchUpDuration": "60s"}


def job(parallelism: int = 1, **autoscaler: Any) -> spec.StreamJob:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["uid"] = "uid-1"
    document["spec"]["parallelism"] = parallelism
    document["spec"]["autoscaler"] = {**FAST, **autoscaler}
    return spec.StreamJob.model_validate(document)


@dataclass
class Loop:
    """decide() on the fake platform, fed by a simulated job (8 partitions of ``events``)."""

    the_job: spec.StreamJob
    sim: SimulatedJob = field(
        default_factory=lambda: SimulatedJob(partitions=8, capacity=1000, topic="events", restore_s=0)
    )
    platform: FakePlatform = field(default_factory=FakePlatform)
    generation: int = 1
    policy: Policy = field(default_factory=Policy)

    def tick(self, seconds: float = 2.0, load: float = 0.0) -> model.StreamJobStatus:
        self.sim.advance(seconds, load)
        now = self.platform.clock.advance(seconds)
        deployed = self.platform.deployed
        if deployed is not None and deployed.replicas and deployed.workers != self.sim.workers:
            self.sim.rescale(deployed.workers)
        self.platform.lag = self.sim.reading()
        self.platform.reports = tuple(
            WorkerReport(r.index, input_partitions={"events": 8}, records_per_second=r.records_per_second,
                         busy_ratio=r.busy_ratio, published_at=now)
            for r in self.sim.reports(now)
        ) if deployed is not None and deployed.replicas else ()
        return reconcile(self.platform, self.the_job, self.generation, self.platform.status,
                         self.platform.clock, policy=self.policy)

    def run(self, seconds: float, load: float) -> model.StreamJobStatus:
        status = self.platform.status
        for _ in range(int(seconds / 2)):
            status = self.tick(2.0, load)
        return status


def test_an_overloaded_job_is_scaled_up_through_a_savepoint_with_the_reason_in_status_and_an_event() -> None:
    loop = Loop(job(1), policy=Policy(autoscaler_interval=timedelta(seconds=1)))
    loop.tick()
    assert loop.platform.deployed is not None and loop.platform.deployed.workers == 1

    status = loop.run(60, load=3000)

    assert loop.platform.deployed.workers == 8
    scale = [e for e in loop.platform.events if e.reason == "AutoscalerScaleUp"]
    assert len(scale) == 1 and "scaling up 1 → 8" in scale[0].message and scale[0].message.startswith("lag ")
    auto = status.autoscaler
    assert auto is not None and auto.parallelism == 8 and auto.history[0].to_parallelism == 8
    assert auto.history[0].applied and status.last_scaling == auto.history[0]
    # The same path as a change of spec.parallelism: the intent is written, then the savepoint, then
    # the new workers start from it.
    calls = loop.platform.calls
    first_savepoint = next(i for i, c in enumerate(calls) if c.startswith("savepoint:scale-"))
    assert calls[first_savepoint - 1].startswith("status:") and ":scale-" in calls[first_savepoint - 1]
    assert loop.platform.applied[-1].workers == 8
    restore_from = loop.platform.applied[-1].restore_from
    assert restore_from is not None and "/savepoints/scale-" in restore_from
    assert loop.the_job.spec.parallelism == 1  # the spec is never written


def test_recommend_mode_writes_the_recommendation_and_an_event_and_keeps_spec_parallelism() -> None:
    loop = Loop(job(1, mode="recommend"))

    status = loop.run(80, load=3000)

    assert loop.platform.deployed is not None and loop.platform.deployed.workers == 1
    auto = status.autoscaler
    assert auto is not None and auto.recommendation == 8 and auto.mode == "recommend"
    events = [e for e in loop.platform.events if e.reason == "AutoscalerRecommendation"]
    assert len(events) == 1 and events[0].message.endswith("recommending up 1 → 8")
    assert not auto.history[0].applied


def test_kubectl_scale_sets_the_running_parallelism_once_and_a_reapplied_manifest_does_not_fight_it() -> None:
    loop = Loop(job(1))
    loop.run(60, load=3000)
    assert loop.platform.deployed is not None and loop.platform.deployed.workers == 8

    # A GitOps tool re-applies the same manifest (a new generation, same spec.parallelism): nothing moves.
    loop.the_job, loop.generation = job(1, scaleDownStabilizationWindow="1h"), 2
    loop.run(20, load=3000)
    assert loop.platform.deployed.workers == 8

    # kubectl scale --replicas=2: the new running parallelism, then the autoscaler resumes from it.
    loop.the_job, loop.generation = job(2, scaleDownStabilizationWindow="1h"), 3
    status = loop.tick(2, load=3000)
    manual = [e for e in loop.platform.events if e.reason == "AutoscalerManualScale"]
    assert len(manual) == 1 and "spec.parallelism changed 1 -> 2" in manual[0].message
    assert status.autoscaler is not None and status.autoscaler.parallelism == 2
    loop.run(4, load=3000)
    assert loop.platform.deployed.workers == 2


def test_disabling_the_autoscaler_hands_the_parallelism_back_to_the_spec() -> None:
    loop = Loop(job(1))
    loop.run(60, load=3000)
    assert loop.platform.deployed is not None and loop.platform.deployed.workers == 8

    loop.the_job, loop.generation = job(1, enabled=False), 2
    status = loop.run(6, load=3000)

    assert loop.platform.deployed.workers == 1
    assert status.autoscaler is not None and status.autoscaler.recommendation is None
    assert status.autoscaler.reason == "disabled: spec.parallelism runs"
    assert status.autoscaler.history[0].to_parallelism == 8  # what it did stays readable


def test_a_reconcile_within_the_autoscaler_interval_writes_no_status() -> None:
    loop = Loop(job(1))
    loop.run(10, load=100)
    writes = len(loop.platform.statuses)

    loop.tick(0.5, load=100)

    assert len(loop.platform.statuses) == writes


def test_operator_metrics_count_decisions_by_direction_once_and_show_the_recommendation() -> None:
    from prometheus_client import generate_latest

    from weir_operator.metrics import OperatorMetrics

    loop = Loop(job(1))
    metrics = OperatorMetrics()
    before = None
    for _ in range(40):
        status = loop.tick(2, load=3000)
        metrics.autoscaler("default", "revenue", before, status.autoscaler)
        before = status.autoscaler

    text = generate_latest(metrics.registry).decode()
    assert 'weir_operator_autoscaler_decisions_total{applied="true",direction="up"} 1.0' in text
    assert 'weir_operator_autoscaler_recommendation{job="revenue",namespace="default"} 8.0' in text
    metrics.autoscaler("default", "revenue", before, None)
    assert "weir_operator_autoscaler_recommendation{" not in generate_latest(metrics.registry).decode()
