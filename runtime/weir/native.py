"""The native hot path: a consumed batch through declarative steps and tumbling or sliding windows, in Rust.

``weir_native`` (the Rust extension in ``native/``, built by ``make setup``) runs what
``weir.records``' generated ``prepare`` and the tumbling or sliding ``WindowOperator.process``
do, for a whole batch of one partition, without a Python object per record: it scans each JSON
value for the fields the pipeline reads, filters, takes the event time and the message key,
assigns the windows, checks lateness against the per-record watermark and folds the aggregates
into a write-back cache of accumulators (``weir_native.Windows``, one per partition task).

Semantics are the Python path's, by construction:

- The native side *certifies* a record or hands it back. It handles only records it can decide
  exactly (a JSON object it fully validates, no string escapes, 64-bit ints, numbers where the
  aggregates read, an event time in range and under the future-skew horizon, a UTF-8 key, sums
  that stay representable). Any other record goes through the Python path (``TaskCore._prepare``)
  at its place in the batch, so dead letters, their reasons and their order are the Python path's.
- Before a handed-back record touches state, the native side writes the windows holding it back
  to the store (``evict``); after the batch, every changed window (``flush``). The store is the truth between
  batches: windows fire from it, checkpoints copy it, a restart restores it.
- Per-record watermarks and lateness are computed in the same order as ``_prepare`` does. A
  sliding-window record joins its open windows only, and all of them or none (an overflow in
  one hands the record back), as ``build_sliding`` does.

Which pipelines run natively (``plan_for``): JSON source, keyed by the message key (so no
repartition), declarative steps only (filter, select, rename), a tumbling or sliding window, and the
aggregates count, sum, min, max, avg; event time from a field in epoch milliseconds or seconds
or from the Kafka timestamp. A pipeline with Python functions (and otherwise the same) runs its
steps per record in Python, as before, and its window segment natively: the prepared records go
to ``weir_native.Windows.accept`` instead of ``WindowOperator.process`` (a ``prepared`` plan:
the aggregates read their fields from the record dicts; anything but a plain int or float
where they read goes the Python path, as above). A pipeline keyed by a record field runs stage 1
(prepare, forward to the repartition topic) in Python and stage 2 natively (a ``forwarded``
plan: ``Windows.run_forwarded`` reads ``[event time, record]`` as ``encode_forward`` writes it,
at the upstream watermark; a marker or anything else goes the Python path at its place).
Everything else, and every pipeline when ``WEIR_NATIVE=0`` or the extension is missing, runs
the Python path.
``tests/unit/test_native.py`` compares the two on random batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from weir.aggregates import INT_MAX, INT_MIN
from weir.records import system_ms, walk_steps
from weir.spec import Condition, FieldScope, Pipeline
from weir.tasks import Consumed, Message

log = logging.getLogger(__name__)

__all__ = ["Fetched", "NativePlan", "available", "explain", "fetcher", "plan_for"]

weir_native: ModuleType | None
try:
    import weir_native as _extension
except ImportError:  # not built: the Python path runs everything
    weir_native = None
else:
    weir_native = _extension

_NATIVE_FUNCTIONS = frozenset({"count", "sum", "min", "max", "avg"})
_CACHE_LIMIT = 200_000
"""Windows one task's native cache holds before it starts over from the store (about 150 bytes
each)."""
_SMALL_CACHE_LIMIT = 4_096
"""The same under a memory budget (``--memory-budget``), which the cache is not part of: the
store keeps within its share, and the cache stays at a few hundred kilobytes a task."""


def available() -> bool:
    """Whether the extension is importable and not switched off (``WEIR_NATIVE=0``)."""
    return weir_native is not None and os.environ.get("WEIR_NATIVE", "1") != "0"


def fetcher(consumer: Any) -> Any | None:
    """A ``weir_native.Fetch`` reading ``consumer``'s records without a Python object each, or
    None (logged, with the reason) when the extension cannot read this consumer: then
    ``consumer.consume`` reads everything, as it did before. ``WEIR_NATIVE_FETCH=0`` turns it
    off alone."""
    if not available() or os.environ.get("WEIR_NATIVE_FETCH", "1") == "0":
        return None
    fetch_class = getattr(weir_native, "Fetch", None)
    if fetch_class is None:
        return None
    try:
        return fetch_class(consumer)
    except Exception as exc:  # noqa: BLE001 - any reason means: consume the usual way
        log.info("records are consumed through confluent-kafka: the native reader is unavailable: %s", exc)
        return None


class Fetched:
    """A batch ``weir_native.Fetch`` consumed, still in librdkafka's memory until the next
    consume: per partition (``groups``: topic, partition, count, last offset), its records in
    order. ``TaskCore.process`` folds a group natively, or runs its ``records`` in Python."""

    __slots__ = ("count", "fetch", "groups")

    def __init__(self, fetch: Any, groups: list[tuple[str, int, int, int]]):
        self.fetch = fetch
        self.groups = groups
        self.count = sum(g[2] for g in groups)

    def __len__(self) -> int:
        return self.count

    def records(self, group: int, lo: int = 0, hi: int | None = None) -> list[Message]:
        end = self.groups[group][2] if hi is None else hi
        return [
            Consumed(topic, partition, offset, key, value, ts, None, kind)
            for topic, partition, offset, key, value, kind, ts in self.fetch.records(group, lo, end)
        ]


class _NotNative(Exception):
    """Why a pipeline runs the Python path."""


@dataclass(frozen=True)
class NativePlan:
    """What one ``weir_native.Windows`` per task is built from (``plan_for``)."""

    size_ms: int
    slide_ms: int
    """``size_ms`` for tumbling windows."""
    allowed_lateness_ms: int
    max_out_of_orderness_ms: int
    max_value_bytes: int
    fields: tuple[str, ...]
    time: tuple[str, int]
    key: tuple[str, int]
    filter: Any
    aggregates: tuple[tuple[str, int], ...]
    max_future_skew_ms: int
    now_ms: Callable[[], int]
    prepared: bool = False
    """The window segment alone, after Python functions: records come prepared (key, event time,
    record dict) to ``accept``; ``fields`` are the record's, nothing else is read."""

    @property
    def message_keys(self) -> bool:
        return self.key[0] == "message"

    @property
    def kafka_time(self) -> bool:
        return self.time[0] == "kafka"

    @property
    def forwarded(self) -> bool:
        """Stage 2 of a repartitioned job: the repartition topic's records fold natively."""
        return self.time[0] == "forwarded"

    def horizon(self) -> int:
        """The latest event time accepted now (``maxFutureSkew`` past the clock)."""
        if not self.max_future_skew_ms:
            return INT_MAX
        return self.now_ms() + self.max_future_skew_ms

    def task(self, small: bool = False) -> Any:
        """A fresh ``weir_native.Windows`` for one partition task (``small``: under a memory
        budget, with a small cache)."""
        assert weir_native is not None
        return weir_native.Windows(
            self.size_ms,
            self.slide_ms,
            self.allowed_lateness_ms,
            self.max_out_of_orderness_ms,
            self.max_value_bytes,
            _SMALL_CACHE_LIMIT if small else _CACHE_LIMIT,
            list(self.fields),
            self.time,
            self.key,
            self.filter,
            list(self.aggregates),
        )


def plan_for(
    pipeline: Pipeline, now_ms: Callable[[], int] | None = None, force: bool = False
) -> NativePlan | None:
    """The native plan of ``pipeline``, or None (logged once, with the reason) when it runs
    the Python path. ``force`` ignores ``WEIR_NATIVE`` (the equivalence tests)."""
    if weir_native is None or not (force or available()):
        return None
    try:
        plan = _plan(pipeline, now_ms or system_ms)
    except _NotNative as exc:
        log.info("the Python path runs this pipeline: %s", exc)
        return None
    log.info("%s", _sentence(plan))
    return plan


def explain(pipeline: Pipeline) -> str:
    """Which path runs ``pipeline``'s records, in a sentence (the worker logs it at start,
    ``weir validate`` prints it)."""
    if weir_native is None:
        return "the Python path runs this pipeline: the native extension (weir_native) is not installed"
    if not available():
        return "the Python path runs this pipeline: WEIR_NATIVE=0"
    try:
        return _sentence(_plan(pipeline, system_ms))
    except _NotNative as exc:
        return f"the Python path runs this pipeline: {exc}"


def _sentence(plan: NativePlan) -> str:
    if plan.prepared:
        return "the native hot path runs this pipeline's window segment (its Python functions per record)"
    if plan.forwarded:
        return "the native hot path runs this pipeline's keyed stage (stage 1 runs the Python path)"
    return "the native hot path runs this pipeline"


def _plan(pipeline: Pipeline, now_ms: Callable[[], int]) -> NativePlan:
    stages = pipeline.stages()
    source = pipeline.source
    window, aggregate = stages.window, stages.aggregate
    if stages.joins or stages.process is not None:
        raise _NotNative("it has joins or a process function")
    if window is None or aggregate is None or window.type == "session" or window.size is None:
        raise _NotNative("the native path runs tumbling and sliding windows only")
    specs = [(name, o.fn, o.field) for name, o in aggregate.outputs.items()]
    slide = window.size if window.type == "tumbling" else window.slide
    assert slide is not None  # the spec requires it of a sliding window
    for _name, fn, _field in specs:
        if fn not in _NATIVE_FUNCTIONS:
            raise _NotNative(f"aggregate {fn} has no native form")
    fields: list[str] = []

    def index(name: str) -> int:
        if name not in fields:
            fields.append(name)
        return fields.index(name)

    prepared = bool(stages.functions) and stages.repartition is None
    time_plan: tuple[str, int] = ("kafka", -1)
    condition: Any = None
    if stages.repartition is not None or prepared:
        # Python prepares each record (functions, filters, key, event time); the keyed stage
        # reads the aggregates' fields from the prepared record: handed to ``accept`` after the
        # functions, or (repartitioned) forwarded by stage 1 as ``[event time, record]``.
        if stages.repartition is not None:
            time_plan = ("forwarded", -1)
        aggregates = [(fn, -1 if f is None else index(f)) for _n, fn, f in specs]
    else:
        if stages.key_from != "messageKey":
            raise _NotNative("it is keyed by a record field (repartitioned)")
        if source.format != "json":
            raise _NotNative("its source format is not json")
        filters: list[Any] = []
        scope, _ = walk_steps(pipeline, lambda _i, c, s: filters.append(_condition(c, s, index)))
        event_time = source.event_time
        if event_time is not None and event_time.field is not None:
            if event_time.format == "epochMillis":
                time_plan = ("millis", index(event_time.field))
            elif event_time.format == "epochSeconds":
                time_plan = ("seconds", index(event_time.field))
            else:
                raise _NotNative(f"event time is {event_time.format}")
        aggregates = [(fn, -1 if f is None else index(scope.source_of(f))) for _n, fn, f in specs]
        condition = None if not filters else filters[0] if len(filters) == 1 else ("and", filters)
    if len(fields) > 16:
        raise _NotNative("it reads more than 16 fields")
    return NativePlan(
        size_ms=window.size,
        slide_ms=slide,
        allowed_lateness_ms=window.allowed_lateness,
        max_out_of_orderness_ms=pipeline.watermark.max_out_of_orderness,
        max_value_bytes=source.max_value_bytes,
        fields=tuple(fields),
        time=time_plan,
        key=("message", -1),
        filter=condition,
        aggregates=tuple(aggregates),
        max_future_skew_ms=pipeline.watermark.max_future_skew,
        now_ms=now_ms,
        prepared=prepared,
    )


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise _NotNative(f"a filter compares with {value}, beyond 64 bits")
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return value
    raise _NotNative(f"a filter compares with {value!r}")


def _condition(c: Condition, scope: FieldScope, index: Callable[[str], int]) -> Any:
    """A filter condition in the extension's tuple form (see ``weir.records._condition_expr``
    for the semantics both implement)."""
    if c.function is not None:
        raise _NotNative("a filter is a Python function")
    if c.and_ is not None:
        return ("and", [_condition(m, scope, index) for m in c.and_])
    if c.or_ is not None:
        return ("or", [_condition(m, scope, index) for m in c.or_])
    if c.not_ is not None:
        return ("not", _condition(c.not_, scope, index))
    assert c.field is not None and c.op is not None
    f = index(scope.source_of(c.field))
    op, value = c.op, c.value
    if op == "exists":
        return ("exists", f)
    if op in ("eq", "ne"):
        test = ("eq", f, _scalar(value))
        return test if op == "eq" else ("not", test)
    if op in ("in", "notIn"):
        test = ("in", f, [_scalar(v) for v in value])
        return test if op == "in" else ("not", test)
    if value is None or isinstance(value, bool):
        raise _NotNative(f"{op} with {value!r}")
    return (op, f, _scalar(value))

