"""The autoscaler's decision: a pure function from lag, worker metrics and its own status to a parallelism.

No Kafka, Kubernetes or clock in here: ``step`` gets the lag reading and the worker reports
the platform observed, the previous ``status.autoscaler`` and ``now``, and returns the next
``status.autoscaler`` and the decision, if any. ``weir_operator.decide`` calls it and carries a
decision out by the same path as a change of ``spec.parallelism``.

The model is DS2's ("Three steps is all you need", OSDI '18), on the job as one operator:

- a worker's *true* processing rate is its observed rate divided by its busy ratio (what it
  would process if it never waited for input);
- the job must process ``input rate + backlog / catchUpDuration`` records per second;
- it needs ``required / (true rate per worker x targetUtilization)`` workers, rounded up, then
  to the smallest parallelism with the same most partitions per worker (a worker owns whole
  partitions, so 8 partitions over 3 workers is as slow as over 3 and no faster than over 4:
  the busiest worker has 3), then clamped to ``[minParallelism, maxParallelism]``.

And the rules that keep it from doing what users of other autoscalers complain about:

- **Stabilization.** Recommendations are kept as runs (``status.autoscaler.recommendations``).
  Up: once every recommendation of the last ``scaleUpStabilizationWindow`` is above the running
  parallelism, to the lowest of them. Down: once every recommendation of the last
  ``scaleDownStabilizationWindow`` is below it, to the highest of them, removing at most
  ``maxScaleDownFactor`` of the workers. Input oscillating faster than a window changes nothing.
- **Never down while catching up**: lag above ``lagThresholdRecords`` / ``lagThresholdTime``,
  or lag growing over the metrics window, holds the parallelism.
- **Cooldown**: no decision while a rescale runs, nor for ``cooldown`` after its workers are
  all ready; the rescale's measured duration is kept (``lastRescale``) and counted as backlog
  the next rescale adds (input arriving while the job restarts).
- **No decision on missing data**: a missing or unready worker, a worker that reports no rate
  or a stale status, an unreadable lag, or too short a measurement: the recommendation is
  absent, the reason says which, and the stabilization windows start again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from weir import spec
from weir_operator import model
from weir_operator.plans import LagReading, WorkerReport

__all__ = [
    "HISTORY",
    "Outcome",
    "Signals",
    "adopt_spec_parallelism",
    "fit_to_partitions",
    "step",
]

HISTORY = 10
"""Decisions kept in ``status.autoscaler.history``."""
MAX_SAMPLES = 40
"""Lag samples kept: one per 1/32 of the metrics window, and the one just before it."""
MAX_RUNS = 40
"""Recommendation runs kept (a run starts whenever the recommendation changes)."""
STALE_AFTER = timedelta(seconds=30)
"""A worker status older than this is stale: its loop has not come round (workers refresh it
several times a second)."""
MIN_SPAN_FRACTION = 0.5
"""Measure rates over at least this fraction of the metrics window before deciding."""


@dataclass(frozen=True, slots=True)
class Signals:
    """What the platform observed, as the autoscaler needs it."""

    lag: LagReading | None
    """The consumer lag of every input partition (None: not read)."""
    reports: tuple[WorkerReport, ...]
    """The ready workers' ``/status``."""
    workers: int
    """The parallelism running now."""
    ready: int
    """Workers ready."""
    partitions: int | None
    """Partition count of the largest input topic (None: no worker has said yet)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The next ``status.autoscaler`` and the decision taken in this step, if any."""

    status: model.AutoscalerStatus
    decision: model.ScalingDecision | None = None


def fit_to_partitions(target: int, partitions: int | None, low: int, high: int | None) -> int:
    """The parallelism to run for ``target`` workers' worth of capacity on ``partitions`` partitions.

    A worker owns whole partitions, so ``p`` workers are as fast as their busiest, which owns
    ``ceil(P / p)`` partitions. The result is the smallest parallelism whose busiest worker owns at
    most ``floor(P / target)`` partitions (8 partitions: 1, 2, 3→4, 5→8), clamped to ``[low, high]``
    (``high`` defaults to ``P``); a clamp to ``high`` goes down to the smallest parallelism with the
    same most partitions per worker (``high`` 5 on 8 partitions runs 4: 5 would be no faster).
    Unknown partitions: ``target`` clamped.
    """
    ceiling = high if high is not None else partitions
    if partitions is None or partitions < 1:
        result = max(target, low)
        return min(result, ceiling) if ceiling is not None else result
    target = max(1, min(target, partitions))
    per_worker = max(1, partitions // target)
    fitted = -(-partitions // per_worker)
    if ceiling is not None and fitted > ceiling:
        fitted = -(-partitions // -(-partitions // max(1, min(ceiling, partitions))))
    return max(fitted, low)


def adopt_spec_parallelism(
    settings: spec.AutoscalerSpec, previous: model.AutoscalerStatus | None, spec_parallelism: int,
    running: int | None, partitions: int | None, now: datetime,
) -> Outcome:
    """Who owns parallelism: the autoscaler, starting from ``spec.parallelism``.

    First call (no previous status): the running parallelism (or ``spec.parallelism`` when nothing
    runs) is the autoscaler's. Later, a ``spec.parallelism`` different from the one last seen (a
    ``kubectl scale``, an edit) becomes the running parallelism once, clamped to the bounds, as
    a ``manual`` decision; the cooldown starts. The same value re-applied (a GitOps sync) is no
    change: the autoscaler's parallelism stays.
    """
    if previous is None or previous.spec_parallelism is None or previous.parallelism is None:
        base = previous or model.AutoscalerStatus()
        start = running if running else spec_parallelism
        status = base.model_copy(update={
            "mode": settings.mode, "parallelism": start, "spec_parallelism": spec_parallelism,
        })
        return Outcome(status)
    if previous.spec_parallelism == spec_parallelism:
        return Outcome(previous.model_copy(update={"mode": settings.mode}))
    wanted = max(settings.min_parallelism, spec_parallelism)
    high = settings.max_parallelism if settings.max_parallelism is not None else partitions
    if high is not None:
        wanted = min(wanted, max(high, settings.min_parallelism))
    clamp = "" if wanted == spec_parallelism else f" (clamped to {wanted} by min/maxParallelism)"
    decision = model.ScalingDecision(
        at=now, from_parallelism=previous.parallelism, to_parallelism=wanted, direction="manual",
        applied=settings.mode == "auto",
        reason=f"spec.parallelism changed {previous.spec_parallelism} -> {spec_parallelism}{clamp}: "
        "the new running parallelism; the autoscaler continues from it after the cooldown",
    )
    status = previous.model_copy(update={
        "mode": settings.mode,
        "parallelism": wanted,
        "spec_parallelism": spec_parallelism,
        "recommendations": (),
        "history": (decision, *previous.history)[:HISTORY],
        "last_rescale": model.Rescale(started_at=now, to_parallelism=wanted)
        if wanted != previous.parallelism else previous.last_rescale,
    })
    return Outcome(status, decision)


def step(
    settings: spec.AutoscalerSpec,
    previous: model.AutoscalerStatus,
    signals: Signals,
    now: datetime,
    *,
    checkpoint_interval_ms: int = 10_000,
    stale_after: timedelta = STALE_AFTER,
) -> Outcome:
    """One observation: record the lag sample, recommend a parallelism, and decide whether to move.

    ``previous`` is the status ``adopt_spec_parallelism`` returned (its ``parallelism`` is the
    one the autoscaler owns). Call it only when no other change (an intent) is in progress. A
    decision in ``mode: auto`` sets ``parallelism`` and starts ``lastRescale``; in ``recommend``
    it is recorded (once per distinct change) and nothing else moves.
    """
    status = previous.model_copy(update={"mode": settings.mode, "measured_at": now})
    rescale = status.last_rescale
    if (
        rescale is not None and rescale.ready_at is None and signals.workers == rescale.to_parallelism
        and signals.ready >= signals.workers
    ):
        rescale = rescale.model_copy(update={"ready_at": now})
        status = status.model_copy(update={"last_rescale": rescale})

    lag = signals.lag
    if lag is not None and lag.error is None:
        status = status.model_copy(update={"samples": _add_sample(status.samples, lag, now, settings)})

    why_not = _missing(settings, status, signals, now, stale_after)
    if why_not is not None:
        return Outcome(_no_decision(status, why_not))
    assert lag is not None
    m = _measure(settings, status, signals, lag, now, checkpoint_interval_ms)
    if isinstance(m, str):
        return Outcome(_no_decision(status, m))

    current = signals.workers
    reason = m.describe()
    recommended = m.target
    if m.target < current and m.catching_up is not None:
        # Held: the scale-down window starts once the job has caught up, not while it catches up.
        recommended = current
        reason = f"{reason}; not scaling down while catching up ({m.catching_up})"
    runs = _add_run(status.recommendations, recommended, now, settings)
    status = status.model_copy(update={
        "recommendation": recommended, "inputs": m.inputs, "recommendations": runs,
    })
    move, hold = _stabilized(settings, runs, current, recommended, signals.partitions, now)
    if move is None:
        return Outcome(status.model_copy(update={"reason": f"{reason}; {hold}" if hold else reason}))
    direction: model.ScalingDirection = "up" if move > current else "down"
    verb = "scaling" if settings.mode == "auto" else "recommending"
    reason = f"{reason}; {verb} {direction} {current} → {move}"
    if move != recommended:
        reason += _why_not_all_the_way(settings, runs, current, move, now)
    decision = model.ScalingDecision(
        at=now, from_parallelism=current, to_parallelism=move, direction=direction,
        applied=settings.mode == "auto", reason=reason,
    )
    if settings.mode == "recommend":
        last = previous.history[0] if previous.history else None
        repeated = last is not None and (last.from_parallelism, last.to_parallelism) == (current, move)
        history = previous.history if repeated else (decision, *previous.history)[:HISTORY]
        status = status.model_copy(update={"reason": reason, "history": history})
        return Outcome(status, None if repeated else decision)
    status = status.model_copy(update={
        "reason": reason,
        "parallelism": move,
        "recommendations": (),
        "history": (decision, *previous.history)[:HISTORY],
        "last_rescale": model.Rescale(started_at=now, to_parallelism=move),
    })
    return Outcome(status, decision)


# --------------------------------------------------------------------------- measuring


def _add_sample(
    samples: tuple[model.LagSample, ...], lag: LagReading, now: datetime, settings: spec.AutoscalerSpec
) -> tuple[model.LagSample, ...]:
    window = timedelta(milliseconds=settings.metrics_window)
    at = min(lag.measured_at or now, now)
    if samples and samples[-1].at >= at:
        return samples  # the same reading again
    sample = model.LagSample(at=at, end_offsets=lag.end_offsets, lag_records=lag.records)
    kept = [s for s in samples if s.at <= now]
    if len(kept) >= 2 and now - kept[-2].at < window / 32:
        kept[-1] = sample  # at most one sample per 1/32 of the window, and always the newest
    else:
        kept.append(sample)
    # Keep the window, plus the newest sample older than it (so a difference spans the window).
    while len(kept) > 2 and now - kept[1].at >= window:
        kept.pop(0)
    return tuple(kept[-MAX_SAMPLES:])


def _add_run(
    runs: tuple[model.RecommendationRun, ...], target: int, now: datetime, settings: spec.AutoscalerSpec
) -> tuple[model.RecommendationRun, ...]:
    kept = list(runs)
    if not kept or kept[-1].parallelism != target:
        kept.append(model.RecommendationRun(since=now, parallelism=target))
    longest = timedelta(milliseconds=max(settings.scale_up_stabilization_window,
                                         settings.scale_down_stabilization_window))
    while len(kept) > 1 and now - kept[1].since >= longest:
        kept.pop(0)
    return tuple(kept[-MAX_RUNS:])


def _no_decision(status: model.AutoscalerStatus, why: str) -> model.AutoscalerStatus:
    # A gap in the recommendations breaks their consistency: the windows start again.
    return status.model_copy(update={"recommendation": None, "reason": f"no decision: {why}",
                                     "recommendations": ()})


def _missing(
    settings: spec.AutoscalerSpec, status: model.AutoscalerStatus, signals: Signals, now: datetime,
    stale_after: timedelta,
) -> str | None:
    """Why no decision can be made now, or None."""
    rescale = status.last_rescale
    if rescale is not None:
        if rescale.ready_at is None:
            return f"rescale to {rescale.to_parallelism} in progress since {_clock(rescale.started_at)}"
        until = rescale.ready_at + timedelta(milliseconds=settings.cooldown)
        if now < until:
            took = rescale.restore_seconds or 0.0
            return (f"cooldown after the rescale to {rescale.to_parallelism} (which took {took:.0f} s) "
                    f"until {_clock(until)}")
    lag = signals.lag
    if lag is None:
        return "the consumer lag was not read"
    if lag.error is not None:
        return f"the consumer lag cannot be read: {lag.error}"
    if not lag.partitions:
        return "the job's input topics have no partitions (or do not exist yet)"
    if signals.ready < signals.workers:
        return f"{signals.ready}/{signals.workers} workers ready"
    by_index = {r.index: r for r in signals.reports}
    missing = [i for i in range(signals.workers) if i not in by_index]
    if missing:
        return f"worker{'s' if len(missing) > 1 else ''} {_list(missing)} did not report its status"
    no_rate = [r.index for r in signals.reports if r.records_per_second is None or r.busy_ratio is None]
    if no_rate:
        several = len(no_rate) > 1
        return (f"worker{'s' if several else ''} {_list(no_rate)} report{'' if several else 's'} "
                "no processing rate or busy ratio")
    for report in signals.reports:
        if report.published_at is None:
            return f"worker {report.index} does not say when its metrics were measured (an older weir?)"
        age = (now - report.published_at).total_seconds()
        if age > stale_after.total_seconds():
            return f"worker {report.index}'s metrics are stale ({age:.0f} s old: its loop is stuck)"
    samples = status.samples
    window = timedelta(milliseconds=settings.metrics_window)
    span = samples[-1].at - samples[0].at if samples else timedelta(0)
    if span < window * MIN_SPAN_FRACTION or span <= timedelta(0):
        return (f"measuring the input rate ({span.total_seconds():.0f} s of the "
                f"{(window * MIN_SPAN_FRACTION).total_seconds():.0f} s needed)")
    return None


@dataclass(frozen=True, slots=True)
class _Measure:
    inputs: model.AutoscalerInputs
    target: int
    needed: float
    raw: int
    catching_up: str | None
    """Why the job counts as catching up (never scaled down), or None."""
    per_worker: int | None

    def describe(self) -> str:
        i = self.inputs
        seconds = f" ({i.lag_seconds:.0f} s)" if i.lag_seconds is not None else ""
        growth = i.lag_growth_per_second or 0.0
        trend = (f", growing {_num(growth)}/s" if growth > 0.5 else f", shrinking {_num(-growth)}/s"
                 if growth < -0.5 else ", steady")
        parts = [f"lag {_num(i.lag_records)} records{seconds}{trend}", f"input {_num(i.input_rate or 0)}/s"]
        if i.slowest_partition is not None:
            slow = i.slowest_partition_lag_seconds
            if slow is None:
                parts[0] += f", partition {i.slowest_partition} not advancing"
            elif slow > max(10.0, 2 * (i.lag_seconds or 0)):
                parts[0] += f", partition {i.slowest_partition} {slow:.0f} s behind"
        if i.capacity_per_worker is not None:
            workers = f"{i.workers} workers process" if i.workers != 1 else "1 worker processes"
            parts.append(f"{workers} {_num(i.processing_rate or 0)}/s at busy {i.busy_ratio or 0:.2f}: "
                         f"{_num(i.capacity_per_worker)}/s each at full load")
        else:
            parts.append("workers idle")
        plural = "s" if self.per_worker != 1 else ""
        each = f" ({self.per_worker} partition{plural} each)" if self.per_worker else ""
        parts.append(f"need {self.needed:.1f} workers → {self.target}{each}")
        return "; ".join(parts)


def _measure(
    settings: spec.AutoscalerSpec, status: model.AutoscalerStatus, signals: Signals, lag: LagReading,
    now: datetime, checkpoint_interval_ms: int,
) -> _Measure | str:
    oldest, newest = status.samples[0], status.samples[-1]
    span = (newest.at - oldest.at).total_seconds()
    input_rate = max(0.0, (newest.end_offsets - oldest.end_offsets) / span)
    growth = (newest.lag_records - oldest.lag_records) / span
    backlog = lag.records
    reports = signals.reports
    processing = sum(r.records_per_second or 0.0 for r in reports)
    busy = sum(r.busy_ratio or 0.0 for r in reports)
    busy_mean = busy / len(reports) if reports else 0.0
    capacity = processing / busy if processing > 0 and busy > 0 else None
    rescale = status.last_rescale
    restore_s = rescale.restore_seconds if rescale is not None and rescale.restore_seconds else 0.0
    catch_up_s = settings.catch_up_duration / 1000
    # A rescale stops the job for about as long as the last one took: that input is backlog too.
    required = input_rate + (backlog + input_rate * restore_s) / catch_up_s
    wm_lags = [r.watermark_lag_ms for r in reports if r.watermark_lag_ms is not None]
    lag_seconds = backlog / processing if processing > 0 else (0.0 if backlog == 0 else None)
    if capacity is None:
        if backlog > 0 or input_rate > 0:
            return (f"the workers processed nothing in their last seconds while the lag is {_num(backlog)} "
                    f"records and the input {_num(input_rate)}/s: their capacity is unknown")
        needed = 0.0
    else:
        needed = required / (capacity * settings.target_utilization)
    raw = max(1, math.ceil(needed - 1e-9))
    target = fit_to_partitions(raw, signals.partitions, settings.min_parallelism, settings.max_parallelism)
    per_worker = -(-signals.partitions // target) if signals.partitions else None

    threshold_s = (settings.lag_threshold_time / 1000 if settings.lag_threshold_time is not None
                   else max(30.0, 3 * checkpoint_interval_ms / 1000))
    catching_up = None
    if settings.lag_threshold_records is not None and backlog > settings.lag_threshold_records:
        catching_up = f"lag above lagThresholdRecords ({settings.lag_threshold_records})"
    elif lag_seconds is None and backlog > 0:
        catching_up = "lag while nothing is processed"
    elif lag_seconds is not None and lag_seconds > threshold_s:
        catching_up = f"lag above {threshold_s:.0f} s"
    else:
        # Exactly-once commits at checkpoints: the lag saw-tooths by up to an interval's input.
        # Growth beyond half the threshold's worth of records is real growth.
        band = settings.lag_threshold_records or threshold_s * max(input_rate, processing)
        if newest.lag_records - oldest.lag_records > band / 2 and growth > 0:
            catching_up = "lag growing"
    slowest, slowest_s = _slowest(lag)
    inputs = model.AutoscalerInputs(
        lag_records=backlog,
        lag_seconds=round(lag_seconds, 3) if lag_seconds is not None else None,
        lag_growth_per_second=round(growth, 3),
        input_rate=round(input_rate, 3),
        processing_rate=round(processing, 3),
        busy_ratio=round(min(1.0, busy_mean), 4),
        capacity_per_worker=round(capacity, 3) if capacity is not None else None,
        required_rate=round(required, 3),
        workers_needed=round(needed, 3),
        event_time_lag_seconds=max(0.0, max(wm_lags) / 1000) if wm_lags else None,
        partitions=signals.partitions,
        workers=signals.workers,
        slowest_partition=slowest,
        slowest_partition_lag_seconds=round(slowest_s, 3) if slowest_s is not None else None,
    )
    return _Measure(inputs, target, needed, raw, catching_up, per_worker)


def _slowest(lag: LagReading) -> tuple[str | None, float | None]:
    """The partition whose lag takes longest to work off at its own rate, and how long (None: it
    has lag and is not processed at all). Partitions without rates (a first reading) are skipped."""
    worst: tuple[str | None, float | None] = (None, None)
    worst_key = -1.0
    for p in lag.partitions:
        if p.processing_rate is None or p.lag == 0:
            continue
        seconds = p.lag_seconds
        key = math.inf if seconds is None else seconds
        if key > worst_key:
            worst_key, worst = key, (f"{p.topic}-{p.partition}", seconds)
    return worst


def _stabilized(
    settings: spec.AutoscalerSpec, runs: tuple[model.RecommendationRun, ...], current: int, target: int,
    partitions: int | None, now: datetime,
) -> tuple[int | None, str]:
    """The parallelism to move to now (None: stay) and, when staying, why (empty: nothing to say)."""
    if target == current:
        return None, ""
    up = target > current
    window = timedelta(milliseconds=settings.scale_up_stabilization_window if up
                       else settings.scale_down_stabilization_window)
    since = now - window
    covering = [r for i, r in enumerate(runs) if i + 1 == len(runs) or runs[i + 1].since > since]
    if covering[0].since > since:
        name = "scaleUpStabilizationWindow" if up else "scaleDownStabilizationWindow"
        until = _clock(covering[0].since + window)
        return None, f"{'up' if up else 'down'} once this holds until {until} ({name})"
    targets = [r.parallelism for r in covering]
    if up:
        if min(targets) <= current:
            return None, "recommendations within scaleUpStabilizationWindow differ"
        return min(targets), ""
    if max(targets) >= current:
        return None, "recommendations within scaleDownStabilizationWindow differ"
    floor = math.ceil(current * (1 - settings.max_scale_down_factor) - 1e-9)
    bound = fit_to_partitions(max(1, floor), partitions, settings.min_parallelism, settings.max_parallelism)
    move = max(max(targets), bound)
    return (move, "") if move < current else (None, "")


def _why_not_all_the_way(
    settings: spec.AutoscalerSpec, runs: tuple[model.RecommendationRun, ...], current: int, move: int,
    now: datetime,
) -> str:
    """Why a move stops short of the latest recommendation."""
    up = move > current
    millis = settings.scale_up_stabilization_window if up else settings.scale_down_stabilization_window
    since = now - timedelta(milliseconds=millis)
    covering = [r.parallelism for i, r in enumerate(runs) if i + 1 == len(runs) or runs[i + 1].since > since]
    if up or max(covering) == move:
        which = "lowest" if up else "highest"
        return f" (the {which} recommendation of the last {millis / 1000:g} s)"
    factor = settings.max_scale_down_factor
    return f" (a step down removes at most maxScaleDownFactor {factor:g} of the workers)"


def _num(value: float) -> str:
    """1234567 → 1.2M, 4000 → 4k, 12.5 → 12.5."""
    magnitude = abs(value)
    if magnitude >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if magnitude >= 10_000:
        return f"{value / 1000:.0f}k"
    if magnitude >= 1000:
        return f"{value / 1000:.1f}k"
    if magnitude >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.1f}"


def _clock(at: datetime) -> str:
    return at.strftime("%H:%M:%S")


def _list(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)

