"""Fault injection for the kill tests: ``weir up`` SIGKILLs itself at one step of an upgrade.

The steps of an upgrade follow each other within milliseconds (the status that says "savepoint
taken" lives ~10 ms before the new workers are applied), so a test polling ``status.json``
cannot stop ``weir up`` between them. With ``WEIR_UP_CRASH_AT=<step>@<generation>`` in its
environment, ``weir up`` kills itself with SIGKILL — exactly what an outside ``kill -9`` does:
no clean-up, its workers left running — when the upgrade to ``<generation>`` reaches ``<step>``:

``intent-written``       the intent (with its savepoint id) is in the status; nothing asked yet
``savepoint-requested``  the savepoint request is at the workers, their answer not yet read
``savepoint-done``       every worker answered "completed"; the status does not know it yet
``old-stopped``          the status has the savepoint and the old workers have exited; nothing applied
``new-applied``          the new workers run; the status does not say so yet
``stabilizing``          the status says ``Stabilizing`` for the new generation

Test-only: nothing else reads the variable, and without it ``weir up`` is unchanged.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Final

from weir import spec
from weir_operator import model
from weir_operator.local import LocalPlatform
from weir_operator.plans import Apply, SavepointOutcome

__all__ = ["ENV_CRASH_AT", "STEPS", "CrashPoint", "CrashingPlatform"]

logger = logging.getLogger(__name__)

ENV_CRASH_AT: Final = "WEIR_UP_CRASH_AT"
STEPS: Final = (
    "intent-written", "savepoint-requested", "savepoint-done", "old-stopped", "new-applied", "stabilizing",
)
_IN_FLIGHT_S = 0.3
"""How long after sending the savepoint request ``savepoint-requested`` strikes: the workers have
it and are taking the savepoint (it takes about a second), their answer has not come back."""


@dataclass(frozen=True)
class CrashPoint:
    step: str
    generation: int

    @classmethod
    def parse(cls, text: str) -> CrashPoint:
        """``<step>@<generation>``; a ValueError names what is wrong."""
        step, _, generation = text.partition("@")
        if step not in STEPS or not generation.isdigit():
            raise ValueError(
                f"{ENV_CRASH_AT}={text!r}: expected <step>@<generation>, step one of {', '.join(STEPS)}"
            )
        return cls(step, int(generation))


def _die(step: str) -> None:
    logger.warning("%s: killing weir up at %s", ENV_CRASH_AT, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingPlatform(LocalPlatform):
    """``LocalPlatform`` that SIGKILLs this process at ``point`` (see the module docstring)."""

    def __init__(self, point: CrashPoint, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.point = point
        self._upgrading = False

    def _at(self, step: str) -> bool:
        return self.point.step == step

    def write_status(self, job: spec.ObjectMeta, status: model.StreamJobStatus) -> None:
        super().write_status(job, status)
        intent = status.intent
        if intent is not None and intent.generation == self.point.generation and intent.savepoint_id:
            self._upgrading = True
            if self._at("intent-written") and intent.restore_from is None:
                _die(self.point.step)
            if self._at("old-stopped") and intent.restore_from is not None:
                _die(self.point.step)
        stabilization = status.stabilization
        if (self._at("stabilizing") and intent is None and status.lifecycle_state == "Stabilizing"
                and stabilization is not None and stabilization.generation == self.point.generation):
            _die(self.point.step)

    def savepoint(self, job: spec.StreamJob, savepoint_id: str, stop: bool) -> SavepointOutcome:
        if not self._upgrading or not self._at("savepoint-requested"):
            return super().savepoint(job, savepoint_id, stop)
        threading.Thread(target=super().savepoint, args=(job, savepoint_id, stop), daemon=True).start()
        threading.Event().wait(_IN_FLIGHT_S)
        _die(self.point.step)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answered(self, outcome: SavepointOutcome) -> None:
        if self._upgrading and self._at("savepoint-done") and outcome.completed:
            _die(self.point.step)

    def apply(self, job: spec.StreamJob, action: Apply) -> None:
        super().apply(job, action)
        if self._upgrading and self._at("new-applied") and action.replicas > 0:
            _die(self.point.step)
