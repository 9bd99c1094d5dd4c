"""The task core's output: every record it writes, and its dead letters (``TaskCore`` inherits it).

Output goes through ``out``, which a replay suppresses (``weir.recovery``: what was committed
before is not written again); dead letters carry headers saying why and where they came from,
and are counted (``weir_dead_letter_total``).
"""

from __future__ import annotations

import logging
from typing import Any

from weir.graph import JobGraph
from weir.results import printable
from weir.tasks import Headers, Message, Send, Task
from weir.window_operator import WindowResult

log = logging.getLogger("weir.core")

__all__ = ["CoreOutput"]


class CoreOutput:
    """Writing and dead-lettering for ``weir.core.TaskCore`` (which sets these attributes)."""

    graph: JobGraph
    metrics: Any
    send: Send
    suppressed: int
    out_counts: dict[str, int]
    out_bytes: dict[str, int]
    dead_lettered: dict[str, int]
    _suppress: bool

    # -- output -----------------------------------------------------------------------
    def out(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int = -1,
        headers: Headers | None = None,
    ) -> None:
        """Write one record, unless a replay suppresses it (it was committed before)."""
        if self._suppress:
            self.suppressed += 1
            return
        self.send(topic, value, key, partition, headers)
        self.out_counts[topic] = self.out_counts.get(topic, 0) + 1
        self.out_bytes[topic] = self.out_bytes.get(topic, 0) + (len(value) if value else 0)

    def _count_dead(self, reason: str) -> None:
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.dead_letter_total.labels(reason=reason).inc()

    def dead_letter(self, m: Message, exc: Exception) -> None:
        """Send a consumed record that cannot be processed to the dead-letter topic, with
        headers saying why and where it came from."""
        reason = str(getattr(exc, "reason", "error"))
        detail = str(getattr(exc, "detail", exc))
        self._count_dead(reason)
        topic = self.graph.dead_letter_topic
        if topic is None:
            log.warning(
                "dead letter (%s) at %s-%d@%d dropped: no deadLetter topic configured: %s",
                reason,
                m.topic(),
                m.partition(),
                m.offset(),
                detail,
            )
            return
        # An oversized value is not copied: it would fail the same size limit again. The
        # headers locate the original in its source topic.
        value = None if reason == "too_large" else m.value()
        headers: Headers = [
            ("weir.reason", reason.encode()),
            ("weir.detail", detail[:1000].encode()),
            ("weir.source.topic", m.topic().encode()),
            ("weir.source.partition", str(m.partition()).encode()),
            ("weir.source.offset", str(m.offset()).encode()),
        ]
        self.out(topic, value, m.key(), -1, headers)

    def _dead_letter_result(
        self, task: Task, r: WindowResult, record: dict[str, Any], exc: Exception
    ) -> None:
        reason = str(getattr(exc, "reason", "unserializable_result"))
        detail = f"window [{r.start}, {r.end}) of key {r.key!r}: {getattr(exc, 'detail', exc)}"
        self._result_dead_letter(reason, detail, r.key, record, task)

    def _result_dead_letter(
        self, reason: str, detail: str, key: str, record: dict[str, Any], task: Task | None
    ) -> None:
        """Dead-letter a result (it has no source record: the headers name the task's partition)."""
        self._count_dead(reason)
        topic = self.graph.dead_letter_topic
        if topic is None:
            log.warning("result dropped: no deadLetter topic configured: %s", detail)
            return
        headers: Headers = [("weir.reason", reason.encode()), ("weir.detail", detail[:1000].encode())]
        if task is not None:
            headers += [
                ("weir.source.topic", task.topic.encode()),
                ("weir.source.partition", str(task.partition).encode()),
            ]
        self.out(topic, printable(record), key.encode(), -1, headers)
