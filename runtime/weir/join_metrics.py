"""What a worker's joins have done, moved to its Prometheus series (``WorkerMetrics.join_*``) at
each status publish (``weir.status.publish``).

Per join step, labelled ``step`` (the step's index in ``spec.pipeline.steps``) and ``topic``
(its table topic), summed over the worker's tasks (one join operator per task and step):

- ``weir_join_held_records``: stream records held until the table's time reaches theirs;
- ``weir_join_table_updates_total{outcome}``: table updates ``applied``, ``late`` (seen by later
  lookups only: ``grace`` was too small) or ``dropped`` (older than the retention); a record at an
  offset the operator had read already is not an update and is not counted;
- ``weir_join_misses_total``: stream records with no table value at their event time (an inner
  join's are the ``weir_dead_letter_total{reason="join_miss"}`` ones as well);
- ``weir_join_bootstrapped``: 1 once every task's join has read its table partitions up to
  their ends as of its start, else 0;
- ``weir_join_table_versions``: the table versions stored (every task's copy).

No partition label: the per-partition picture is in ``/status``, and a global join's table is
the same for every task. Counters move by each operator's change since the last publish; an
operator built anew (a restart in the process after a rollback) counts from zero again, so the
counters never go back and count nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from weir.join import JoinOperator
from weir.join_stage import JoinStage
from weir.metrics import WorkerMetrics
from weir.tasks import Task

__all__ = ["OUTCOMES", "publish_joins"]

OUTCOMES = ("applied", "late", "dropped")
"""The ``outcome`` label values of ``weir_join_table_updates_total``."""

Label = tuple[str, str]
Counts = tuple[int, int, int, int]


def _counts(op: JoinOperator) -> Counts:
    return op.applied_table_updates, op.late_table_updates, op.dropped_table_updates, op.misses


def publish_joins(metrics: WorkerMetrics, tasks: Iterable[Task]) -> None:
    """Set the join series from the joins of ``tasks`` (any task without joins is skipped)."""
    held: dict[Label, int] = {}
    versions: dict[Label, int] = {}
    booted: dict[Label, bool] = {}
    before = metrics.joins_published
    now: dict[int, tuple[object, Counts]] = {}
    updates, misses = metrics.join_table_updates_total, metrics.join_misses_total
    for task in tasks:
        stage = task.op
        if not isinstance(stage, JoinStage):
            continue
        for step, op in stage.joins:
            label = (str(step.index), step.topic)
            held[label] = held.get(label, 0) + op.held
            versions[label] = versions.get(label, 0) + op.store.version_count
            booted[label] = booted.get(label, True) and op.bootstrapped
            counts = _counts(op)
            last = before.get(id(op))
            base = last[1] if last is not None and last[0] is op else (0, 0, 0, 0)
            for outcome, n, b in zip(OUTCOMES, counts, base, strict=False):
                child = updates.labels(*label, outcome)  # exposed at 0 before the first update
                if n > b:
                    child.inc(n - b)
            child = misses.labels(*label)
            if counts[3] > base[3]:
                child.inc(counts[3] - base[3])
            now[id(op)] = (op, counts)  # the operator itself is kept: an id is reused once it is gone
    metrics.joins_published = now
    for label, n in held.items():
        metrics.join_held_records.labels(*label).set(n)
        metrics.join_table_versions.labels(*label).set(versions[label])
        metrics.join_bootstrapped.labels(*label).set(1 if booted[label] else 0)
