"""Who sets the parallelism a job runs: the autoscaler's glue in the decision, and the cap at the
largest input topic's partition count."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from weir import spec
from weir_operator import autoscaler, model
from weir_operator.drafts import Draft, Policy
from weir_operator.plans import Observed

__all__ = ["Cap", "autoscale", "cap", "largest_input"]


@dataclass(frozen=True, slots=True)
class Cap:
    """A parallelism above the input partition count, and what runs instead."""

    wanted: int
    """``spec.parallelism``."""
    workers: int
    """The partition count of the largest input topic: the workers that run."""
    topic: str
    """That topic."""
    several: bool
    """Whether the job has more than one input topic (the message says "largest")."""

    def message(self) -> str:
        largest = "its largest input topic " if self.several else ""
        return (
            f"parallelism {self.wanted} exceeds the {self.workers} partitions of {largest}{self.topic}; "
            f"running {self.workers} workers"
        )


_DECISION_REASON: dict[model.ScalingDirection, str] = {
    "up": "AutoscalerScaleUp",
    "down": "AutoscalerScaleDown",
    "manual": "AutoscalerManualScale",
}


def autoscale(
    draft: Draft,
    job: spec.StreamJob,
    status: model.StreamJobStatus,
    observed: Observed,
    now: datetime,
    *,
    shutdown: bool,
    policy: Policy,
) -> spec.StreamJob:
    """Run the autoscaler (``weir_operator.autoscaler``) and return ``job`` at the parallelism it owns.

    **Who owns parallelism.** With ``autoscaler.enabled`` and ``mode: auto`` the autoscaler does:
    the job runs ``status.autoscaler.parallelism``; ``spec.parallelism`` is its starting value, and
    a *change* of ``spec.parallelism`` (``kubectl scale``, an edit) becomes the running parallelism
    once (a ``manual`` decision, then the cooldown). Re-applying the same manifest changes nothing,
    so a GitOps tool never fights the autoscaler, and the autoscaler never writes the spec. With
    ``mode: recommend``, or the autoscaler disabled, ``spec.parallelism`` is what runs.

    A decision here changes the job's parallelism before ``_start`` compares it with what runs: the
    rescale is the same ``scale`` intent (stop with a savepoint, restore at the new parallelism) as
    a change of ``spec.parallelism``, so exactly-once holds across it.
    """
    settings = job.spec.autoscaler
    if settings is None or not settings.enabled:
        before = status.autoscaler
        if before is not None and before.parallelism is not None:
            # Ownership goes back to spec.parallelism; enabling again starts from what runs then.
            draft.set(
                autoscaler=before.model_copy(
                    update={
                        "parallelism": None,
                        "spec_parallelism": None,
                        "recommendation": None,
                        "reason": "disabled: spec.parallelism runs",
                        "recommendations": (),
                        "samples": (),
                    }
                )
            )
        return job
    deployed = observed.deployed
    running = deployed.workers if deployed is not None and deployed.replicas > 0 else None
    largest = largest_input(job, draft.get("input_partitions"))
    partitions = largest[1] if largest is not None else None
    adopted = autoscaler.adopt_spec_parallelism(
        settings, status.autoscaler, job.spec.parallelism, running, partitions, now
    )
    current, decision = adopted.status, adopted.decision
    previous = current.measured_at
    due = previous is None or now - previous >= policy.autoscaler_interval or previous > now
    if (
        decision is None
        and due
        and job.spec.state == "running"
        and not shutdown
        and deployed is not None
        and deployed.replicas > 0
        and status.intent is None
    ):
        signals = autoscaler.Signals(
            observed.lag, observed.reports, deployed.workers, observed.ready_workers, partitions
        )
        interval = job.spec.checkpoint.interval if job.spec.checkpoint is not None else 5_000
        outcome = autoscaler.step(
            settings,
            current,
            signals,
            now,
            checkpoint_interval_ms=interval,
            stale_after=policy.autoscaler_stale_after,
        )
        current, decision = outcome.status, outcome.decision
    draft.set(autoscaler=current)
    if decision is not None:
        draft.set(last_scaling=decision)
        reason = _DECISION_REASON[decision.direction] if decision.applied else "AutoscalerRecommendation"
        draft.event("Normal", reason, decision.reason)
    if settings.mode == "auto" and current.parallelism is not None:
        owned = job.spec.model_copy(update={"parallelism": current.parallelism})
        return job.model_copy(update={"spec": owned})
    return job


def _inputs(job: spec.StreamJob, reported: dict[str, int] | None) -> dict[str, int]:
    """The partition count of each input topic of ``job``, from the workers' reports.

    Only the topics this spec reads count (an upgrade may have changed them); with an
    ``entrypoint`` the operator does not know the pipeline, so every reported topic counts.
    """
    pipeline = job.spec.pipeline
    if not reported or pipeline is None:
        return dict(reported or {})
    repartition = f"weir-{job.metadata.namespace}-{job.metadata.name}-"
    return {
        topic: count
        for topic, count in reported.items()
        if topic in pipeline.source.topics
        or (topic.startswith(repartition) and topic.endswith("-repartition"))
    }


def largest_input(job: spec.StreamJob, reported: dict[str, int] | None) -> tuple[str, int] | None:
    """The input topic with the most partitions, and its count (None: not reported yet)."""
    inputs = _inputs(job, reported)
    return max(inputs.items(), key=lambda item: (item[1], item[0])) if inputs else None


def cap(job: spec.StreamJob, reported: dict[str, int] | None) -> Cap | None:
    """The cap on ``job``'s parallelism from the input partition counts the workers reported.

    A worker owns the partitions ``p`` with ``p % workers == index`` of every input topic (the
    sources and the repartition topic), so beyond the largest partition count a worker owns
    nothing in any stage: it would idle, yet hold a pod and take part in every savepoint.
    Only the topics this spec reads count; unknown counts (no worker has reported yet) cap nothing.
    """
    found = largest_input(job, reported)
    if found is None:
        return None
    topic, largest = found
    if largest < 1 or job.spec.parallelism <= largest:
        return None
    return Cap(job.spec.parallelism, largest, topic, several=len(_inputs(job, reported)) > 1)
