"""The plan ``decide`` is building (status changes, actions, events) and the operator's fixed knobs.

Shared by the modules of the decision (``decide``, ``lifecycle``, ``savepoints``,
``conditions``, ``deletion``) so that each writes into the same draft; none of them acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from weir import spec
from weir_operator import model
from weir_operator.plans import Action, Apply, Event

__all__ = ["Draft", "Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the decision, fixed per operator."""

    savepoint_history: int = 10
    """Failed savepoints kept in ``status.savepointHistory`` (newest first); completed ones too
    for jobs without ``spec.savepoints`` (with it, retention bounds the completed ones)."""
    savepoint_attempts: int = 3
    """Failed savepoints per generation and trigger before the job is ``Stalled``."""
    savepoint_retry_after: timedelta = timedelta(seconds=60)
    """Wait after a failed savepoint (or a failed deletion of one) before trying again."""
    cleanup_timeout: timedelta = timedelta(minutes=10)
    """How long a deleted job with ``cleanupPolicy: delete`` waits for its store to be removed
    before it is let go anyway (with a Warning naming what is left)."""
    apply_retry_after: timedelta = timedelta(seconds=10)
    """Wait after the first refused apply of a job's children; doubled after each further
    refusal of the same generation (a new spec is applied at once)."""
    apply_retry_max: timedelta = timedelta(minutes=5)
    """Longest wait between two applies of children the API server refused."""
    autoscaler_interval: timedelta = timedelta(seconds=10)
    """The autoscaler measures and decides at most this often per job (reconciles in between, e.g.
    the one its own status write triggers, leave ``status.autoscaler`` alone)."""
    autoscaler_stale_after: timedelta = timedelta(seconds=30)
    """A worker status older than this is stale: no autoscaling decision on it."""


@dataclass
class Draft:
    """The plan being built: status changes, actions, events."""

    status: model.StreamJobStatus
    updates: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stalled: tuple[str, str] | None = None
    """A ``Stalled`` condition (reason, message) this decision found."""
    capped: Any = None
    """The parallelism cap (``decide._Cap``) in force, if any."""
    apply_spec: spec.JobSpec | None = None
    """The spec the ``Apply`` actions of this decision run when it is not the job's own (a rollback)."""

    def get(self, name: str) -> Any:
        return self.updates[name] if name in self.updates else getattr(self.status, name)

    def set(self, **values: Any) -> None:
        self.updates.update(values)

    @property
    def intent(self) -> model.Intent | None:
        intent: model.Intent | None = self.get("intent")
        return intent

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def apply(self, workers: int, replicas: int, restore_from: str | None) -> None:
        """Add an ``Apply`` of the spec this decision runs."""
        self.actions.append(Apply(workers, replicas, restore_from, spec=self.apply_spec))
