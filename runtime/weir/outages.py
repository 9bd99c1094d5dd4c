"""Which of a worker's dependencies (the Kafka broker, the checkpoint store) are unreachable, since
when and why; the back-off between retries; one log line per change of state.

A worker rides out an outage instead of exiting: it keeps retrying with :class:`Backoff`, reports
not-ready (``/readyz`` 503), shows the outage in ``/status`` (``"outages": {"kafka": {"since": ...,
"error": ...}}``) and in the metrics ``weir_dependency_up`` and ``weir_outage_seconds_total``, and
logs exactly two lines per outage::

    kafka unreachable: <cause>; retrying
    kafka back after 61.2 s

not one per failed request: librdkafka reports a refused connection several times a second per
client, and a retry loop may fail every half second.

Pure logic, no I/O: the clocks are injected (tests drive them by hand), the logger is a parameter.
Thread-safe: the worker loop reports Kafka, the checkpoint thread reports the store, and the control
server's threads read the status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["DEPENDENCIES", "Backoff", "Dependencies", "Outage"]

DEPENDENCIES = ("kafka", "store")
"""What a worker depends on: the Kafka broker and the checkpoint store."""

log = logging.getLogger(__name__)


class Backoff:
    """Exponential back-off: ``initial_s``, then doubled each time, never more than ``cap_s``.

    The cap bounds how long a worker may sleep after its dependency is back: 30 s is what a
    Kubernetes probe period tolerates, while doubling keeps a long outage from costing a request
    every half second.
    """

    def __init__(self, initial_s: float = 0.5, cap_s: float = 30.0, factor: float = 2.0) -> None:
        if not 0 < initial_s <= cap_s:
            raise ValueError(f"need 0 < initial_s <= cap_s, got {initial_s}, {cap_s}")
        self.initial_s, self.cap_s, self.factor = initial_s, cap_s, factor
        self._next = initial_s

    def next(self) -> float:
        """The delay before the next attempt, seconds; each call doubles the following one."""
        delay = self._next
        self._next = min(self._next * self.factor, self.cap_s)
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits ``initial_s`` again."""
        self._next = self.initial_s


@dataclass(frozen=True)
class Outage:
    """One dependency being unreachable."""

    since: float
    """Monotonic seconds (the ``clock`` of :class:`Dependencies`) when it went down."""
    since_wall: float
    """The same instant in epoch seconds, for ``/status``."""
    error: str
    """The cause as first reported (later failures of the same outage do not replace it)."""
    last_error: str
    """The cause of the most recent failure."""


class Dependencies:
    """The up/down state of each dependency in :data:`DEPENDENCIES`.

    :meth:`down` and :meth:`up` may be called as often as failures and successes happen; only a
    change of state logs (at WARNING going down, INFO coming back) and is counted.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        logger: logging.Logger = log,
    ) -> None:
        self._clock, self._wall, self._log = clock, wall, logger
        self._lock = threading.Lock()
        self._outages: dict[str, Outage] = {}
        self._past_s: dict[str, float] = dict.fromkeys(DEPENDENCIES, 0.0)
        self._counts: dict[str, int] = dict.fromkeys(DEPENDENCIES, 0)

    def down(self, name: str, error: str) -> bool:
        """Report a failure to reach ``name``; True when it was up until now (and one line is logged)."""
        error = " ".join(str(error).split()) or "no error given"
        with self._lock:
            current = self._outages.get(name)
            if current is not None:
                self._outages[name] = Outage(current.since, current.since_wall, current.error, error)
                return False
            self._outages[name] = Outage(self._clock(), self._wall(), error, error)
            self._counts[name] = self._counts.get(name, 0) + 1
        self._log.warning("%s unreachable: %s; retrying", name, error)
        return True

    def up(self, name: str) -> float | None:
        """Report a success; the outage's length in seconds when it was down (one line is logged)."""
        with self._lock:
            current = self._outages.pop(name, None)
            if current is None:
                return None
            seconds = max(0.0, self._clock() - current.since)
            self._past_s[name] = self._past_s.get(name, 0.0) + seconds
        self._log.info("%s back after %.1f s", name, seconds)
        return seconds

    def is_down(self, name: str) -> bool:
        with self._lock:
            return name in self._outages

    def outage(self, name: str) -> Outage | None:
        with self._lock:
            return self._outages.get(name)

    def seconds_total(self, name: str) -> float:
        """Seconds ``name`` has been unreachable since start, the current outage included."""
        with self._lock:
            total = self._past_s.get(name, 0.0)
            current = self._outages.get(name)
            if current is not None:
                total += max(0.0, self._clock() - current.since)
            return total

    def reason(self) -> str:
        """Why the worker is not ready because of its dependencies ("" when every one is up)."""
        with self._lock:
            outages = sorted(self._outages.items())
        return "; ".join(f"{name} unreachable: {o.last_error}" for name, o in outages)

    def status(self) -> dict[str, dict[str, object]]:
        """``/status``'s ``outages``: per unreachable dependency, since when and why."""
        now = self._clock()
        with self._lock:
            outages = sorted(self._outages.items())
            counts = dict(self._counts)
        return {
            name: {
                "since": datetime.fromtimestamp(o.since_wall, tz=UTC).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "seconds": round(max(0.0, now - o.since), 1),
                "error": o.error,
                "lastError": o.last_error,
                "outages": counts.get(name, 0),
            }
            for name, o in outages
        }
