"""The operator's own Prometheus metrics (``/metrics`` on ``--metrics-port``)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from weir_operator import model

__all__ = ["OperatorMetrics"]


class OperatorMetrics:
    """Counters and gauges of one operator process, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "weir_operator_reconciles", "Reconciles of a StreamJob, by result (ok, error, invalid).",
            ["result"], registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "weir_operator_reconcile_seconds", "Time of one reconcile (observe, decide, act), seconds.",
            registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.events = Counter(
            "weir_operator_events", "Events emitted about StreamJobs, by type and reason.",
            ["type", "reason"], registry=self.registry,
        )
        self.leader = Gauge(
            "weir_operator_leader", "1 while this replica holds the leader Lease (or runs without one).",
            registry=self.registry,
        )
        self.jobs = Gauge(
            "weir_operator_jobs", "StreamJobs this operator manages, by phase.", ["phase"],
            registry=self.registry,
        )
        self.autoscaler_decisions = Counter(
            "weir_operator_autoscaler_decisions",
            "Autoscaler decisions, by direction (up, down, manual) and whether the operator acted on them "
            "(applied=false: mode recommend).",
            ["direction", "applied"], registry=self.registry,
        )
        self.autoscaler_recommendation = Gauge(
            "weir_operator_autoscaler_recommendation",
            "The parallelism the autoscaler recommends for a job now (absent while it cannot decide).",
            ["namespace", "job"], registry=self.registry,
        )
        self._phases: dict[str, str] = {}

    def autoscaler(
        self, namespace: str, name: str, before: model.AutoscalerStatus | None,
        after: model.AutoscalerStatus | None,
    ) -> None:
        """Count the decisions ``after`` has that ``before`` had not, and set the recommendation gauge."""
        known = {d.at for d in before.history} if before is not None else set()
        for decision in after.history if after is not None else ():
            if decision.at not in known:
                self.autoscaler_decisions.labels(decision.direction, str(decision.applied).lower()).inc()
        recommendation = after.recommendation if after is not None else None
        if recommendation is None:
            with contextlib.suppress(KeyError):
                self.autoscaler_recommendation.remove(namespace, name)
        else:
            self.autoscaler_recommendation.labels(namespace, name).set(recommendation)

    def job_phase(self, key: str, phase: model.Phase | None) -> None:
        """Record a job's phase (None: the job is gone) and refresh the per-phase gauge."""
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        counts: dict[str, int] = {}
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for known in ("Pending", "Deploying", "Running", "Upgrading", "Savepointing", "Suspended",
                      "RollingBack", "Failed", "Deleting"):
            self.jobs.labels(known).set(counts.get(known, 0))
