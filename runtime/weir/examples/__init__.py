"""Example jobs: each a manifest (plus a Python module where the job needs code), a generator of
its input and a reference that computes its exact output from that input.

``weir demo NAME`` paces an example's generator into a broker and runs the job through
``weir up``; ``tests/integration/test_examples.py`` produces a bounded slice of the same generator,
runs the job through ``weir run`` and through ``weir up`` and compares the read_committed output
with the reference. No Kafka client here (an import-linter contract): generators and references
are pure, so unit tests and users can call them too.

An example module (``weir.examples.<module>``) defines ``EXAMPLE = Example(...)``; ``EXAMPLES``
below lists them in the order ``weir demo --list`` prints them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["EXAMPLES", "Example", "Record", "example", "examples", "iso_ms"]


def iso_ms(ms: int) -> str:
    """``2024-01-01T00:01:00.000Z``: how the sink writes window bounds (``windowStart``,
    ``windowEnd``); references build the same strings from epoch milliseconds."""
    return f"{datetime.fromtimestamp(ms // 1000, tz=UTC):%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


@dataclass(frozen=True)
class Record:
    """One record a generator produces, in production order.

    ``value`` None is a tombstone (a table topic's delete). ``raw`` replaces the encoded value
    with bytes that are malformed on purpose (they must reach the dead-letter topic); the
    reference ignores such records. Records without ``partition`` go where the producer's
    default partitioner puts ``key`` (one producer for every topic of the example, so a table
    and a stream keyed alike are co-partitioned). ``timestamp`` is the Kafka timestamp to
    produce with (ms): a table update's event time is its timestamp (``weir.join``); None
    leaves it to the producer's clock."""

    topic: str
    key: str | None
    value: dict[str, Any] | None
    raw: bytes | None = None
    partition: int | None = None
    timestamp: int | None = None


Generator = Callable[[int, int, int], Iterator[Record]]
"""``generate(seed, start_ms, step_ms)``: an endless, deterministic stream of records for this
seed. Event time starts at ``start_ms`` and moves about ``step_ms`` per stream record (records may
be out of order by less than the manifest's ``maxOutOfOrderness``, so none is late). Table
records that the job needs before its first stream record come first."""

Reference = Callable[[Sequence[Record]], list[dict[str, Any]]]
"""The exact sink records the job writes for ``records`` (a finite prefix of ``generate``) once
the watermark has passed every window: each as the decoded JSON dict, in any order. Computed
independently of the runtime (plain Python over the list), never by running the job."""


@dataclass(frozen=True)
class Example:
    name: str
    """``weir demo NAME``; lowercase with dashes."""
    summary: str
    """One line for ``weir demo --list``."""
    manifest: str
    """The manifest's file name in this package (``funnel.yaml``)."""
    generate: Generator
    reference: Reference
    header: str
    """The demo's column header line."""
    show: Callable[[dict[str, Any]], str]
    """One sink record as the demo prints it (aligned with ``header``)."""
    table_topics: tuple[str, ...] = ()
    """Topics the demo creates compacted (``cleanup.policy=compact``): join tables."""
    notes: tuple[str, ...] = field(default=())
    """Lines the demo prints before the results (what to look for, e.g. the injected spike)."""

    def manifest_path(self) -> Path:
        return Path(str(resources.files("weir") / "examples" / self.manifest))


EXAMPLES: tuple[str, ...] = (
    "revenue", "funnel", "active_users", "anomalies", "sessions", "enrichment", "alerts",
)
"""Module names of the examples, in ``--list`` order."""


def examples() -> list[Example]:
    """Every example, in ``EXAMPLES`` order."""
    return [importlib.import_module(f"weir.examples.{module}").EXAMPLE for module in EXAMPLES]


def example(name: str) -> Example:
    """The example called ``name``; ``KeyError`` naming the known ones otherwise."""
    for candidate in examples():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no example {name!r}; known: {', '.join(e.name for e in examples())}")
