"""The example registry (``weir.examples``) and what ``weir demo`` and the broker tests rely on:
every listed module exists and defines ``EXAMPLE``, manifests load and compile, generators are
deterministic and keep the interface's promises, references compute what the job should write;
the revenue example's reference on hand-written records; ``weir demo --list`` and its errors."""

from __future__ import annotations

import importlib
import re
from datetime import datetime
from itertools import islice
from typing import Any

import orjson
import pytest

from weir import cli, demo
from weir.examples import EXAMPLES, Example, Record, example, examples
from weir.examples import revenue as rev
from weir.graph import JobGraph, compile_job
from weir.spec import Job, load_job

START_MS = 1_704_067_200_000
STEP_MS = 100
SAMPLE = 3_000
FOUND = examples()
"""The examples whose modules exist: a missing one fails the first test only."""
each_example = pytest.mark.parametrize("found", FOUND, ids=[e.name for e in FOUND])


def by_module(module: str) -> Example:
    loaded = importlib.import_module(f"weir.examples.{module}")
    found = loaded.EXAMPLE
    assert isinstance(found, Example), f"weir.examples.{module}.EXAMPLE is a {type(found).__name__}"
    return found


def plans_of(found: Example) -> list[JobGraph]:
    return [compile_job(job) for job in demo.jobs(found)]


def event_time(job: Job, value: dict[str, Any]) -> int:
    """A stream record's event time in ms, as the manifest's ``eventTime`` reads it."""
    spec = job.pipeline.source.event_time
    assert spec is not None and spec.field is not None, "generated records carry their event time in a field"
    raw = value[spec.field]
    if spec.format == "iso8601":
        return int(datetime.fromisoformat(raw).timestamp() * 1000)
    return int(raw * 1000) if spec.format == "epochSeconds" else int(raw)


def stream_times(found: Example, seed: int, step_ms: int, n: int = SAMPLE) -> list[int]:
    """The event times of the generated stream records (those to a source of the first job)."""
    job = demo.jobs(found)[0]
    sources = set(job.pipeline.source.topics)
    return [
        event_time(job, r.value)
        for r in islice(found.generate(seed, START_MS, step_ms), n)
        if r.topic in sources and r.raw is None and r.value is not None
    ]


@pytest.mark.parametrize("module", EXAMPLES)
def test_every_listed_example_module_exists_and_defines_an_example_named_after_it(module: str) -> None:
    found = by_module(module)
    assert found.name.replace("-", "_") == module
    assert found in examples()
    assert example(found.name) is found


def test_example_names_are_unique_lowercase_and_dashed() -> None:
    names = [e.name for e in FOUND]
    assert len(set(names)) == len(names), names
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", n) for n in names), names


def test_an_unknown_example_name_raises_a_key_error_naming_the_known_ones() -> None:
    with pytest.raises(KeyError, match="no example 'nope'; known: revenue"):
        example("nope")


@each_example
def test_each_manifest_loads_and_compiles_and_names_its_table_topics(found: Example) -> None:
    plans = plans_of(found)
    assert plans and len({p.group_id for p in plans}) == len(plans), "one job or several, each named"
    tables = {t for p in plans for t in p.table_topics}
    assert set(found.table_topics) <= tables, "Example.table_topics must be join tables"
    assert found.summary and "\n" not in found.summary and found.header and "\n" not in found.header


@each_example
def test_each_generator_is_deterministic_per_seed_and_writes_only_the_jobs_input_topics(
    found: Example,
) -> None:
    plans = plans_of(found)
    first = list(islice(found.generate(1, START_MS, STEP_MS), SAMPLE))
    assert first == list(islice(found.generate(1, START_MS, STEP_MS), SAMPLE))
    assert first != list(islice(found.generate(2, START_MS, STEP_MS), SAMPLE))
    written = {p.sink_topic for p in plans}
    inputs = {t for p in plans for t in (*p.source_topics, *p.table_topics)} - written
    assert {r.topic for r in first} <= inputs
    assert all(isinstance(r, Record) and (r.key is None or isinstance(r.key, str)) for r in first)


@each_example
def test_each_generators_event_time_starts_at_start_and_advances_about_a_step_per_record_never_late(
    found: Example,
) -> None:
    # Lateness exists where a window or process step waits for the watermark (in a chain: the
    # job after a join-only job, which passes records on whatever their order).
    bounds = [p.max_out_of_orderness_ms for p in plans_of(found) if p.terminal != "none"]
    ooo = min(bounds, default=None)
    for step in (STEP_MS, 4 * STEP_MS):
        times = stream_times(found, 3, step)
        assert len(times) > SAMPLE // 2, "most records are stream records"
        assert START_MS - (ooo or 0) <= min(times[:10]) <= START_MS + 10 * step
        span = max(times) - START_MS
        assert len(times) * step / 2 <= span <= len(times) * step * 2, (step, span, len(times))
        newest = times[0]
        for t in times:  # at or above the watermark (newest - maxOutOfOrderness): nothing is late
            assert ooo is None or t >= newest - ooo, (t, newest, ooo)
            newest = max(newest, t)


@each_example
def test_each_reference_gives_output_the_demo_can_show_on_one_line(found: Example) -> None:
    # What the broker test produces: 12,000 records over the demo's default 40 minutes.
    records = list(islice(found.generate(5, START_MS, 200), 12_000))
    expected = found.reference(records)
    assert expected and expected == found.reference(records)
    shown = [found.show(r) for r in expected]
    assert all(line and "\n" not in line for line in shown)


# --------------------------------------------------------------------------- revenue


def purchase(ts: int, product: str = "p-1", price: float = 10.0, user: str = "u-1") -> Record:
    event = {"type": "purchase", "product_id": product, "user_id": user, "ts": ts, "price": price}
    return Record("events", user, event)


def test_the_revenue_reference_sums_counted_purchases_per_product_and_minute() -> None:
    t = START_MS
    records = [
        purchase(t + 1_000, price=10.0),
        purchase(t + 59_999, price=20.5),
        purchase(t + 60_000, price=7.0),  # the next minute
        purchase(t + 2_000, product="p-2", price=3.0),
        purchase(t + 3_000, price=0),  # free: filtered
        purchase(t + 4_000, price=99.0, user="bot"),  # a bot: filtered
        Record("events", "u-1", {"type": "page_view", "product_id": "p-1", "user_id": "u-1", "ts": t}),
        Record("events", "u-1", None, raw=rev.MALFORMED),
    ]
    got = sorted(rev.reference(records), key=lambda r: (r["windowStartMs"], r["key"]))
    assert got == [
        {"key": "p-1", "windowStart": "2024-01-01T00:00:00.000Z", "windowEnd": "2024-01-01T00:01:00.000Z",
         "windowStartMs": t, "windowEndMs": t + 60_000, "revenue": 30.5, "orders": 2, "averageOrder": 15.25},
        {"key": "p-2", "windowStart": "2024-01-01T00:00:00.000Z", "windowEnd": "2024-01-01T00:01:00.000Z",
         "windowStartMs": t, "windowEndMs": t + 60_000, "revenue": 3.0, "orders": 1, "averageOrder": 3.0},
        {"key": "p-1", "windowStart": "2024-01-01T00:01:00.000Z", "windowEnd": "2024-01-01T00:02:00.000Z",
         "windowStartMs": t + 60_000, "windowEndMs": t + 120_000, "revenue": 7.0, "orders": 1,
         "averageOrder": 7.0},
    ]


def test_the_revenue_generator_includes_what_the_job_filters_out_and_a_malformed_record_every_5000() -> None:
    records = list(islice(rev.generate(7, START_MS, 30), 10_000))
    raw = [i for i, r in enumerate(records) if r.raw is not None]
    assert raw == [4_999, 9_999]
    purchases = [r.value for r in records if r.value is not None and r.value["type"] == "purchase"]
    assert any(p["user_id"] == "bot" for p in purchases) and any(p["price"] == 0 for p in purchases)
    assert all(p["price"] in (0, rev.PRICES[p["product_id"]]) for p in purchases)
    assert all(r.key == r.value["user_id"] for r in records if r.value is not None)


def test_the_revenue_demo_line_shows_the_minute_product_and_figures_under_the_header() -> None:
    line = rev.show({"key": "p-7", "windowStart": "2024-01-01T10:05:00.000Z",
                     "windowEnd": "2024-01-01T10:06:00.000Z", "orders": 3, "revenue": 30.0,
                     "averageOrder": 10.0})
    assert line.split() == ["10:05-10:06", "p-7", "3", "30.00", "10.00"]
    assert len(line) == len(rev.HEADER)


# --------------------------------------------------------------------------- weir demo


def test_weir_demo_list_prints_each_examples_name_and_summary_on_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["demo", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [e.name for e in examples()]
    assert all(line.endswith(e.summary) for line, e in zip(lines, examples(), strict=True))


def test_weir_demo_with_an_unknown_name_exits_2_naming_the_known_examples_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing listens on port 1: reaching for the broker would fail with exit code 3 instead.
    assert cli.main(["demo", "nope", "--bootstrap-servers", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "no example 'nope'" in err and "revenue" in err


def test_weir_demo_refuses_a_rate_below_one() -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--rate", "0"])
    assert exited.value.code == 2


def test_the_demo_creates_sources_tables_repartition_sink_and_dead_letters_with_their_partitions() -> None:
    document = {
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": "layout", "namespace": "test"},
        "spec": {"kafka": {"bootstrapServers": "x"}, "pipeline": {
            "source": {"topics": ["clicks"], "eventTime": {"field": "ts"}},
            "steps": [
                {"keyBy": {"field": "user", "partitions": 6}},
                {"join": {"topic": "users", "fields": ["segment"], "mode": "copartitioned"}},
                {"join": {"topic": "catalog", "key": "product", "fields": ["price"]}},
            ],
            "sink": {"topic": "out"},
            "deadLetter": {"topic": "dlq"},
        }},
    }
    plan = compile_job(load_job(_json(document)))
    layout = demo.topic_layout(plan, compacted=["users"])
    assert layout == {
        "clicks": demo.TopicLayout(demo.SOURCE_PARTITIONS),
        "users": demo.TopicLayout(6, {"cleanup.policy": "compact"}),
        "catalog": demo.TopicLayout(6),
        plan.repartition_topic: demo.TopicLayout(6),
        "out": demo.TopicLayout(1),
        "dlq": demo.TopicLayout(1),
    }


def test_the_revenue_demo_creates_its_topics_as_before() -> None:
    plan = compile_job(load_job(example("revenue").manifest_path()))
    layout = demo.topic_layout(plan)
    assert {t: v.partitions for t, v in layout.items()} == {
        "events": 4, plan.repartition_topic: 4, "revenue-per-minute": 1, "revenue-dlq": 1,
    }
    assert all(not v.config for v in layout.values())


def test_a_generated_record_becomes_its_key_and_json_raw_bytes_or_a_tombstone() -> None:
    assert demo.message(Record("t", "k", {"a": 1})) == (b"k", b'{"a":1}')
    assert demo.message(Record("t", "k", None, raw=b"{oops")) == (b"k", b"{oops")
    assert demo.message(Record("t", None, None)) == (None, None)


def _json(document: dict[str, Any]) -> str:
    return orjson.dumps(document).decode()


def test_the_demo_prints_a_batch_of_window_results_by_minute_then_key_in_numeric_order() -> None:
    batch = [{"key": k, "windowStartMs": t} for k, t in (("p-10", 60), ("p-2", 60), ("p-9", 0), ("b", 0))]
    assert [(r["windowStartMs"], r["key"]) for r in sorted(batch, key=demo.reading_order)] == [
        (0, "b"), (0, "p-9"), (60, "p-2"), (60, "p-10"),
    ]


def _job(name: str, source: str, sink: str, steps: list[dict[str, Any]]) -> JobGraph:
    document = {
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "test"},
        "spec": {"kafka": {"bootstrapServers": "x"}, "pipeline": {
            "source": {"topics": [source], "eventTime": {"field": "ts"}},
            "steps": steps, "sink": {"topic": sink}, "deadLetter": {"topic": "dlq"},
        }},
    }
    return compile_job(load_job(_json(document)))


def test_chained_jobs_show_the_last_jobs_output_and_the_topic_between_them_has_source_partitions() -> None:
    lookup = {"join": {"topic": "catalog", "key": "p", "fields": ["price"]}}
    join = _job("join", "purchases", "enriched", [lookup])
    total = _job("total", "enriched", "totals", [
        {"keyBy": {"field": "p", "partitions": 2}},
        {"window": {"type": "tumbling", "size": "1m"}},
        {"aggregate": {"outputs": {"n": {"fn": "count"}}}},
    ])
    assert demo.output_topic([join, total]) == demo.output_topic([total, join]) == "totals"
    layout = demo.topic_layout([join, total], compacted=["catalog"])
    assert layout["enriched"] == demo.TopicLayout(demo.SOURCE_PARTITIONS)
    assert layout["catalog"] == demo.TopicLayout(demo.SOURCE_PARTITIONS, {"cleanup.policy": "compact"})
    assert layout["totals"] == layout["dlq"] == demo.TopicLayout(1)
    assert total.repartition_topic is not None and layout[total.repartition_topic] == demo.TopicLayout(2)


def test_only_table_records_of_the_enrichment_example_carry_a_kafka_timestamp() -> None:
    records = list(islice(example("enrichment").generate(1, 1_704_067_200_000, 50), 3000))
    assert {r.topic for r in records if r.timestamp is not None} == {"catalog", "user-segments"}
    assert all(r.timestamp is None for r in records if r.topic == "purchases")
