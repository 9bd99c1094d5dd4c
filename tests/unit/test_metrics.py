"""Worker metrics: private registries, identity labels, pre-bound series and the busy/rate trackers."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weir.metrics import (
    JOB_LABEL,
    WORKER_LABEL,
    BusyTracker,
    RateTracker,
    WorkerMetrics,
    partition_label,
)

pytestmark = pytest.mark.timeout(5)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: WorkerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every exposed sample keyed by (name, labels), parsed back from the text exposition."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    key = frozenset({JOB_LABEL: "ns/clicks", WORKER_LABEL: "1", **labels}.items())
    return samples(metrics).get((name, key))


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(job="ns/clicks", worker=1)


def test_two_workers_in_one_process_have_separate_registries_and_leave_the_global_one_alone() -> None:
    a = WorkerMetrics(job="ns/clicks", worker=0)
    b = WorkerMetrics(job="ns/clicks", worker=0)
    a.bind_partition("events-0").records_in.inc(3)

    assert a.registry is not b.registry
    assert b"weir_records_in_total{" not in generate_latest(b.registry)
    assert not any(f.name.startswith("weir_") for f in REGISTRY.collect())


def test_every_exposed_sample_carries_the_streamjob_and_worker_labels(metrics: WorkerMetrics) -> None:
    metrics.bind_partition("events-3")
    metrics.dead_letter_total.labels(reason="undecodable").inc()
    metrics.checkpoint_duration_seconds.observe(0.2)

    keys = samples(metrics)
    assert keys
    for _name, labels in keys:
        assert (JOB_LABEL, "ns/clicks") in labels
        assert (WORKER_LABEL, "1") in labels


def test_the_job_label_is_not_named_job_so_prometheus_does_not_rename_it_exported_job() -> None:
    assert JOB_LABEL != "job"


def test_every_metric_the_runtime_promises_is_exposed_with_the_weir_prefix(metrics: WorkerMetrics) -> None:
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}

    assert families == {
        "weir_records_in": "counter",
        "weir_bytes_in": "counter",
        "weir_records_out": "counter",
        "weir_bytes_out": "counter",
        "weir_dead_letter": "counter",
        "weir_late_records": "counter",
        "weir_consumer_lag_records": "gauge",
        "weir_watermark_ms": "gauge",
        "weir_watermark_lag_ms": "gauge",
        "weir_open_windows": "gauge",
        "weir_state_size_bytes": "gauge",
        "weir_busy_ratio": "gauge",
        "weir_processing_rate": "gauge",
        "weir_producer_queue_full": "counter",
        "weir_checkpoint_duration_seconds": "histogram",
        "weir_checkpoint_size_bytes": "gauge",
        "weir_checkpoint_uploaded_bytes": "counter",
        "weir_checkpoint_failures": "counter",
        "weir_last_checkpoint_id": "gauge",
        "weir_last_checkpoint_timestamp_seconds": "gauge",
        "weir_restore_duration_seconds": "gauge",
        "weir_checkpoints_skipped": "counter",
        "weir_checkpoint_sync_seconds": "histogram",
        "weir_dependency_up": "gauge",
        "weir_outage_seconds": "counter",
        "weir_memory_budget_bytes": "gauge",
        "weir_memory_share_bytes": "gauge",
        "weir_memory_used_bytes": "gauge",
        "weir_memory_rss_bytes": "gauge",
        "weir_join_held_records": "gauge",
        "weir_join_table_updates": "counter",
        "weir_join_misses": "counter",
        "weir_join_bootstrapped": "gauge",
        "weir_join_table_versions": "gauge",
    }


def test_a_bound_partition_moves_its_exposed_series_by_batch_increments(metrics: WorkerMetrics) -> None:
    part = metrics.bind_partition(partition_label("events", 3))
    part.records_in.inc(500)
    part.records_in.inc(250)
    part.bytes_in.inc(64_000)
    part.late_records.inc(2)
    part.consumer_lag.set(1_200)
    part.open_windows.set(7)
    part.state_size.set(4096)

    assert value(metrics, "weir_records_in_total", partition="events-3") == 750
    assert value(metrics, "weir_bytes_in_total", partition="events-3") == 64_000
    assert value(metrics, "weir_late_records_total", partition="events-3") == 2
    assert value(metrics, "weir_consumer_lag_records", partition="events-3") == 1_200
    assert value(metrics, "weir_open_windows", partition="events-3") == 7
    assert value(metrics, "weir_state_size_bytes", partition="events-3") == 4096


def test_binding_the_same_partition_twice_updates_the_same_series(metrics: WorkerMetrics) -> None:
    metrics.bind_partition("events-0").records_in.inc(1)
    metrics.bind_partition("events-0").records_in.inc(1)

    assert value(metrics, "weir_records_in_total", partition="events-0") == 2


def test_set_watermark_sets_the_watermark_and_its_lag_behind_the_wall_clock(metrics: WorkerMetrics) -> None:
    part = metrics.bind_partition("events-0")
    part.set_watermark(watermark_ms=1_700_000_000_000, now_ms=1_700_000_004_500)

    assert value(metrics, "weir_watermark_ms", partition="events-0") == 1_700_000_000_000
    assert value(metrics, "weir_watermark_lag_ms", partition="events-0") == 4_500


def test_a_released_partition_stops_being_exposed_and_others_stay(metrics: WorkerMetrics) -> None:
    metrics.bind_partition("events-0").consumer_lag.set(10)
    metrics.bind_partition("events-1").consumer_lag.set(20)

    metrics.release_partition("events-0")

    exposed = {dict(labels).get("partition") for _name, labels in samples(metrics)}
    assert "events-0" not in exposed
    assert value(metrics, "weir_consumer_lag_records", partition="events-1") == 20


def test_releasing_a_partition_that_was_never_bound_is_harmless(metrics: WorkerMetrics) -> None:
    metrics.release_partition("events-9")


def test_a_bound_output_counts_records_and_bytes_per_topic(metrics: WorkerMetrics) -> None:
    out = metrics.bind_output("clicks-per-minute")
    out.records_out.inc(10)
    out.bytes_out.inc(900)

    assert value(metrics, "weir_records_out_total", topic="clicks-per-minute") == 10
    assert value(metrics, "weir_bytes_out_total", topic="clicks-per-minute") == 900


def test_counters_do_not_expose_created_companion_series(metrics: WorkerMetrics) -> None:
    metrics.bind_partition("events-0").records_in.inc()
    metrics.checkpoint_duration_seconds.observe(1.0)

    assert b"_created" not in generate_latest(metrics.registry)


def test_partition_label_uses_kafkas_topic_dash_partition_spelling() -> None:
    assert partition_label("events", 3) == "events-3"
    assert partition_label("page-views", 12) == "page-views-12"


def test_busy_ratio_is_zero_before_any_time_passes() -> None:
    assert BusyTracker(FakeClock()).ratio() == 0.0


def test_busy_ratio_is_busy_seconds_over_elapsed_seconds_before_the_window_fills() -> None:
    clock = FakeClock(100.0)
    busy = BusyTracker(clock, window_s=10.0, buckets=10)
    busy.add_busy(100.0, 101.0)
    clock.now = 104.0

    assert busy.ratio() == pytest.approx(0.25)


def test_a_busy_interval_spanning_bucket_edges_counts_in_full() -> None:
    clock = FakeClock(100.0)
    busy = BusyTracker(clock, window_s=10.0, buckets=10)
    busy.add_busy(100.5, 102.5)
    clock.now = 102.5

    assert busy.ratio() == pytest.approx(0.8)


def test_busy_ratio_forgets_busy_time_that_slid_out_of_the_window() -> None:
    clock = FakeClock(100.0)
    busy = BusyTracker(clock, window_s=10.0, buckets=10)
    busy.add_busy(100.0, 105.0)

    # Buckets are 1 s wide: at 110.5 the window holds buckets 101..110, i.e. [101, 110.5).
    clock.now = 110.5
    assert busy.ratio() == pytest.approx(4.0 / 9.5)

    clock.now = 120.0
    assert busy.ratio() == 0.0


def test_an_always_busy_worker_reads_one_and_overlapping_reports_do_not_exceed_it() -> None:
    clock = FakeClock(0.0)
    busy = BusyTracker(clock, window_s=10.0, buckets=10)
    busy.add_busy(0.0, 30.0)
    busy.add_busy(25.0, 30.0)
    clock.now = 30.0

    assert busy.ratio() == 1.0


def test_a_late_report_older_than_the_window_does_not_overwrite_newer_buckets() -> None:
    clock = FakeClock(100.0)
    busy = BusyTracker(clock, window_s=10.0, buckets=10)
    busy.add_busy(121.0, 122.0)
    busy.add_busy(101.0, 102.0)  # same ring slot as 121, but ten seconds older
    clock.now = 125.0

    assert busy.ratio() == pytest.approx(1.0 / 9.0)


def test_rate_is_records_over_elapsed_seconds() -> None:
    clock = FakeClock(0.0)
    rate = RateTracker(clock, window_s=10.0, buckets=10)
    clock.now = 1.0
    rate.add(100)
    clock.now = 2.0
    rate.add(100)
    clock.now = 4.0

    assert rate.rate() == pytest.approx(50.0)


def test_rate_counts_only_the_recent_window_and_falls_to_zero_when_idle() -> None:
    clock = FakeClock(0.0)
    rate = RateTracker(clock, window_s=10.0, buckets=10)
    for second in range(30):
        clock.now = float(second)
        rate.add(10)
    clock.now = 29.5

    # Window = buckets 20..29 = [20, 29.5): ten adds of 10 records over 9.5 s.
    assert rate.rate() == pytest.approx(100 / 9.5)

    clock.now = 60.0
    assert rate.rate() == 0.0


@pytest.mark.parametrize(("window_s", "buckets"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_trackers_reject_an_empty_window(window_s: float, buckets: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        BusyTracker(FakeClock(), window_s=window_s, buckets=buckets)
    with pytest.raises(ValueError, match="must be"):
        RateTracker(FakeClock(), window_s=window_s, buckets=buckets)


def test_an_outage_shows_as_dependency_down_and_its_seconds_grow_while_it_lasts(
    metrics: WorkerMetrics,
) -> None:
    metrics.set_dependency("kafka", True, 0.0)
    assert value(metrics, "weir_dependency_up", dependency="kafka") == 1
    assert value(metrics, "weir_outage_seconds_total", dependency="kafka") == 0

    metrics.set_dependency("kafka", False, 2.5)
    metrics.set_dependency("kafka", False, 7.0)
    assert value(metrics, "weir_dependency_up", dependency="kafka") == 0
    assert value(metrics, "weir_outage_seconds_total", dependency="kafka") == 7.0

    metrics.set_dependency("kafka", True, 7.0)
    assert value(metrics, "weir_dependency_up", dependency="kafka") == 1
    assert value(metrics, "weir_outage_seconds_total", dependency="kafka") == 7.0
