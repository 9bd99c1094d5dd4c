"""The autoscaler's pure decision, driven by a simulated job (``weir_operator.testing.SimulatedJob``)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from weir import spec
from weir_operator import model
from weir_operator.autoscaler import Signals, adopt_spec_parallelism, fit_to_partitions, step
from weir_operator.plans import LagReading, WorkerReport
from weir_operator.testing import Clock, SimulatedJob


def settings(**changes: Any) -> spec.AutoscalerSpec:
    document: dict[str, Any] = {
        "enabled": True, "metricsWindow": "1m", "scaleUpStabilizationWindow": "1m",
        "scaleDownStabilizationWindow": "15m", "cooldown": "1m", "catchUpDuration": "5m",
    }
    document.update(changes)
    return spec.AutoscalerSpec.model_validate(document)


@dataclass
class Run:
    """The autoscaler driving a simulated job in ``mode: auto``, ``dt`` seconds per reconcile."""

    config: spec.AutoscalerSpec
    job: SimulatedJob
    clock: Clock = field(default_factory=Clock)
    status: model.AutoscalerStatus = field(default_factory=model.AutoscalerStatus)
    decisions: list[tuple[float, model.ScalingDecision]] = field(default_factory=list)
    trace: list[tuple[float, int, float, int | None]] = field(default_factory=list)
    """(seconds, workers, lag, recommendation) after each step."""

    def __post_init__(self) -> None:
        self.status = adopt_spec_parallelism(
            self.config, None, self.job.workers, self.job.workers, self.job.partitions, self.clock()
        ).status

    def drive(self, seconds: float, load: Callable[[float], float], dt: float = 5.0) -> None:
        end = self.job.now_s + seconds
        while self.job.now_s < end - 1e-9:
            self.job.advance(dt, load(self.job.now_s))
            now = self.clock.advance(dt)
            ready = 0 if self.job.restoring else self.job.workers
            signals = Signals(self.job.reading(), self.job.reports(now) if ready else (), self.job.workers,
                              ready, self.job.partitions)
            outcome = step(self.config, self.status, signals, now)
            self.status = outcome.status
            if outcome.decision is not None:
                self.decisions.append((self.job.now_s, outcome.decision))
                if outcome.decision.applied:
                    self.job.rescale(outcome.decision.to_parallelism)
            self.trace.append((self.job.now_s, self.job.workers, self.job.lag, self.status.recommendation))

    @property
    def changes(self) -> list[tuple[float, int, int]]:
        return [(t, d.from_parallelism, d.to_parallelism) for t, d in self.decisions]


def constant(rate: float) -> Callable[[float], float]:
    return lambda _t: rate


# --------------------------------------------------------------------------- DS2


def test_steady_load_a_worker_handles_changes_nothing() -> None:
    run = Run(settings(), SimulatedJob(partitions=8, capacity=1000, workers=1))

    run.drive(3600, constant(500))

    assert run.changes == []
    assert run.status.recommendation == 1
    assert "need 0.7 workers → 1" in run.status.reason


def test_a_backlog_one_worker_cannot_clear_in_time_scales_up_once_to_a_parallelism_that_keeps_up() -> None:
    job = SimulatedJob(partitions=8, capacity=1000, workers=1, lag=600_000)
    run = Run(settings(), job)

    run.drive(1800, constant(1500))

    ups = [c for c in run.changes if c[2] > c[1]]
    assert 1 <= len(ups) <= 3, run.changes  # DS2: at most three steps to the right parallelism
    assert ups[0][1] == 1 and ups[0][2] >= 4
    assert run.decisions[0][1].reason.startswith("lag ")
    final = job.workers
    assert job.capacity * 8 / -(-8 // final) >= 1500  # it keeps up
    assert job.lag < 1500 * 5  # and has worked the backlog off
    # Once caught up the extra catch-up capacity goes, after the scale-down window: 8 -> 4.
    assert run.changes[1:] in ([], [(run.changes[1][0], 8, 4)]), run.changes


def test_the_first_decision_reads_like_the_numbers_behind_it() -> None:
    run = Run(settings(scaleUpStabilizationWindow="0s"), SimulatedJob(partitions=8, capacity=95_000,
                                                                     workers=1, lag=1_200_000))
    run.drive(40, constant(200_000))

    reason = run.decisions[0][1].reason
    assert re.fullmatch(
        r"lag [0-9.]+M records \([0-9]+ s\), growing [0-9]+k/s; input 200k/s; "
        r"1 worker processes 95k/s at busy 1.00: 95k/s each at full load; "
        r"need 3.[0-9] workers → 4 \(2 partitions each\); scaling up 1 → 4",
        reason,
    ), reason


def test_a_job_catching_up_is_never_scaled_down() -> None:
    # A long catch-up time makes the backlog term small: DS2 alone would say 1 worker.
    config = settings(catchUpDuration="1h", scaleDownStabilizationWindow="1m")
    job = SimulatedJob(partitions=8, capacity=1000, workers=8, lag=4_000_000)
    run = Run(config, job)

    run.drive(240, constant(100))
    assert run.changes == []
    assert job.lag > 30 * 8000
    assert "→ 1 (8 partitions each); not scaling down while catching up (lag above 30 s)" in run.status.reason
    assert run.status.recommendation == 8

    run.drive(1200, constant(100))
    downs = [t for t, d in run.decisions if d.direction == "down"]
    assert downs, run.changes
    caught_up = next(t for t, _, lag, _ in run.trace if lag <= 30 * 8000)
    # The scale-down window starts once the job has caught up, not before.
    assert downs[0] >= caught_up + 60


def test_after_a_load_drop_the_job_scales_down_only_after_the_window_and_by_at_most_the_factor() -> None:
    config = settings(scaleDownStabilizationWindow="15m", maxScaleDownFactor=0.5)
    job = SimulatedJob(partitions=8, capacity=1000, workers=8)
    run = Run(config, job)

    run.drive(3600, constant(200))

    downs = [(t, d) for t, d in run.decisions if d.direction == "down"]
    assert [(d.from_parallelism, d.to_parallelism) for _, d in downs] == [(8, 4), (4, 2), (2, 1)]
    assert downs[0][1].reason.endswith(
        "scaling down 8 → 4 (a step down removes at most maxScaleDownFactor 0.5 of the workers)")
    assert downs[0][0] >= 15 * 60  # the whole window of consistent recommendations first
    for (t0, _), (t1, _) in itertools.pairwise(downs):
        assert t1 - t0 >= 15 * 60


def test_oscillating_input_changes_the_parallelism_at_most_once_per_window() -> None:
    config = settings(scaleUpStabilizationWindow="2m", scaleDownStabilizationWindow="10m")
    job = SimulatedJob(partitions=8, capacity=1000, workers=2)
    run = Run(config, job)

    # 3k/s and 200/s alternating every 50 s: faster than either window.
    run.drive(3 * 3600, lambda t: 3000.0 if int(t // 50) % 2 == 0 else 200.0)

    times = [t for t, _ in run.decisions]
    assert len(times) <= 3, run.changes
    for (t0, _d0), (t1, d1) in itertools.pairwise(run.decisions):
        window = 120 if d1.direction == "up" else 600
        assert t1 - t0 >= window


def test_cooldown_after_a_rescale_waits_for_the_restore_and_then_the_cooldown() -> None:
    config = settings(scaleUpStabilizationWindow="0s", cooldown="2m")
    job = SimulatedJob(partitions=8, capacity=1000, workers=1, restore_s=45, lag=2_000_000)
    run = Run(config, job)

    run.drive(600, constant(5000))

    first = run.decisions[0][0]
    # Restoring (45 s), then the cooldown (2 min) counted from when every worker is ready again.
    held = [r for t, _, _, r in run.trace if first < t < first + 45 + 120]
    assert held and all(r is None for r in held)
    after = [r for t, _, _, r in run.trace if t >= first + 45 + 120 + 5]
    assert after and all(r is not None for r in after)
    assert all(t >= first + 45 + 120 for t, _ in run.decisions[1:])
    rescale = run.status.last_rescale
    assert rescale is not None and rescale.restore_seconds is not None and 45 <= rescale.restore_seconds <= 50


def test_during_the_cooldown_the_reason_says_until_when_and_how_long_the_rescale_took() -> None:
    config = settings(scaleUpStabilizationWindow="0s", cooldown="5m")
    job = SimulatedJob(partitions=8, capacity=1000, workers=1, restore_s=30, lag=900_000)
    run = Run(config, job)

    run.drive(120, constant(2000))

    assert run.status.recommendation is None
    assert "cooldown after the rescale to" in run.status.reason and "(which took 30 s)" in run.status.reason


# --------------------------------------------------------------------------- missing data


def _steady(**changes: Any) -> tuple[spec.AutoscalerSpec, model.AutoscalerStatus, SimulatedJob, Clock]:
    config = settings(**changes)
    job = SimulatedJob(partitions=4, capacity=1000, workers=2)
    run = Run(config, job)
    run.drive(300, constant(500))
    assert run.status.recommendation == 1
    return config, run.status, job, run.clock


def _stale(job: SimulatedJob, now: Any) -> Signals:
    reports = tuple(
        WorkerReport(r.index, records_per_second=r.records_per_second, busy_ratio=r.busy_ratio,
                     published_at=now - timedelta(seconds=95))
        for r in job.reports(now)
    )
    return Signals(job.reading(), reports, 2, 2, 4)


@pytest.mark.parametrize(
    ("signals", "reason"),
    [
        (lambda job, now: Signals(job.reading(), job.reports(now)[:1], 2, 2, 4),
         "no decision: worker 1 did not report its status"),
        (lambda job, now: Signals(job.reading(), job.reports(now), 2, 1, 4),
         "no decision: 1/2 workers ready"),
        (_stale, "no decision: worker 0's metrics are stale (95 s old: its loop is stuck)"),
        (lambda job, now: Signals(job.reading(), tuple(WorkerReport(r.index) for r in job.reports(now)),
                                  2, 2, 4),
         "no decision: workers 0, 1 report no processing rate or busy ratio"),
        (lambda job, now: Signals(LagReading(error="broker down"), job.reports(now), 2, 2, 4),
         "no decision: the consumer lag cannot be read: broker down"),
        (lambda job, now: Signals(None, job.reports(now), 2, 2, 4),
         "no decision: the consumer lag was not read"),
    ],
)
def test_missing_or_stale_metrics_give_no_decision_and_say_why(
    signals: Callable[[SimulatedJob, Any], Signals], reason: str
) -> None:
    config, status, job, clock = _steady()
    now = clock.advance(5)

    outcome = step(config, status, signals(job, now), now)

    assert outcome.decision is None
    assert outcome.status.recommendation is None
    assert outcome.status.reason.startswith(reason), outcome.status.reason
    assert outcome.status.recommendations == ()  # the stabilization windows start again


def test_no_decision_until_the_input_rate_was_measured_over_half_the_window() -> None:
    config = settings(metricsWindow="5m")
    run = Run(config, SimulatedJob(partitions=4, capacity=1000, workers=1))

    run.drive(60, constant(100))

    assert run.status.reason == "no decision: measuring the input rate (55 s of the 150 s needed)"


# --------------------------------------------------------------------------- rounding and clamps


@pytest.mark.parametrize(
    ("partitions", "expected"),
    [
        (4, {1: 1, 2: 2, 3: 4, 4: 4, 5: 4}),
        (6, {1: 1, 2: 2, 3: 3, 4: 6, 5: 6, 6: 6}),
        (8, {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 7: 8, 8: 8, 20: 8}),
        (12, {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 7: 12, 11: 12, 12: 12}),
    ],
)
def test_a_target_rounds_up_to_the_smallest_parallelism_with_the_same_most_partitions_per_worker(
    partitions: int, expected: dict[int, int]
) -> None:
    assert {t: fit_to_partitions(t, partitions, 1, None) for t in expected} == expected


def test_min_and_max_parallelism_clamp_the_target() -> None:
    assert fit_to_partitions(1, 8, 3, None) == 3
    assert fit_to_partitions(8, 8, 1, 5) == 4  # 5 workers on 8 partitions are no faster than 4
    assert fit_to_partitions(8, 8, 1, 6) == 4
    assert fit_to_partitions(8, 12, 1, 6) == 6
    assert fit_to_partitions(7, None, 2, 5) == 5  # partitions not known yet: the plain clamp


def test_max_parallelism_bounds_the_decisions_of_a_simulated_overload() -> None:
    config = settings(maxParallelism=3, scaleUpStabilizationWindow="0s")
    run = Run(config, SimulatedJob(partitions=8, capacity=1000, workers=1))

    run.drive(900, constant(20_000))

    assert run.changes and all(to <= 3 for _, _, to in run.changes)
    assert run.job.workers == 3  # 3, 3 and 2 partitions


def test_min_parallelism_bounds_the_decisions_of_an_idle_job() -> None:
    config = settings(minParallelism=2, scaleDownStabilizationWindow="1m")
    run = Run(config, SimulatedJob(partitions=8, capacity=1000, workers=8))

    run.drive(3600, constant(0))

    assert run.job.workers == 2
    assert run.status.recommendation == 2


# --------------------------------------------------------------------------- modes and ownership


def test_recommend_mode_records_the_decision_once_and_changes_nothing() -> None:
    config = settings(mode="recommend", scaleUpStabilizationWindow="0s")
    job = SimulatedJob(partitions=8, capacity=1000, workers=1)
    run = Run(config, job)

    run.drive(600, constant(3000))

    assert job.workers == 1
    assert len(run.decisions) == 1 and not run.decisions[0][1].applied
    assert run.status.parallelism == 1
    assert run.status.recommendation == 8
    assert run.status.history[0].reason.endswith("recommending up 1 → 8")


def test_a_changed_spec_parallelism_is_adopted_once_and_a_reapplied_one_changes_nothing() -> None:
    config = settings(maxParallelism=6)
    clock = Clock()
    first = adopt_spec_parallelism(config, None, 2, 2, 8, clock()).status
    scaled = first.model_copy(update={"parallelism": 4})  # the autoscaler moved it

    same = adopt_spec_parallelism(config, scaled, 2, 4, 8, clock())
    assert same.decision is None and same.status.parallelism == 4

    manual = adopt_spec_parallelism(config, scaled, 10, 4, 8, clock())
    assert manual.decision is not None and manual.decision.direction == "manual"
    assert manual.status.parallelism == 6 and manual.status.spec_parallelism == 10
    assert "clamped to 6" in manual.decision.reason

    again = adopt_spec_parallelism(config, manual.status, 10, 6, 8, clock())
    assert again.decision is None and again.status.parallelism == 6


def test_the_environment_gives_a_worker_a_known_capacity_for_autoscaler_tests() -> None:
    from weir.config import Environment

    assert Environment.read({"WEIR_MAX_RECORDS_PER_SECOND": "250"}).max_records_per_second == 250.0
    assert Environment.read({}).max_records_per_second is None


def test_a_partition_far_behind_the_others_is_named_with_its_own_lag_in_seconds() -> None:
    from dataclasses import replace

    config = settings()
    job = SimulatedJob(partitions=4, capacity=1000, workers=2)
    run = Run(config, job)
    run.drive(60, constant(400))
    now = run.clock.advance(5)
    rows = [replace(p, input_rate=100.0, processing_rate=100.0) for p in job.reading().partitions]
    rows[3] = replace(rows[3], lag=12_000, processing_rate=100.0)  # 120 s behind at its own rate
    signals = Signals(LagReading(tuple(rows)), job.reports(now), 2, 2, 4)

    outcome = step(config, run.status, signals, now)

    inputs = outcome.status.inputs
    assert inputs is not None
    assert (inputs.slowest_partition, inputs.slowest_partition_lag_seconds) == ("orders-3", 120.0)
    assert "partition orders-3 120 s behind" in outcome.status.reason
