"""The native hot path (``weir.native``, the Rust extension ``weir_native``) against the Python
path: the same job compiled both ways, fed the same random batches, must write the same bytes.

Every comparison is of everything the core writes (results, dead letters with their reasons,
details and source offsets, in order) and of its counters and watermarks. The inputs mix clean
records with what the native side must hand back to Python: malformed JSON, escapes, duplicate
fields, numbers at and past 64 bits, floats where ints are read, null keys, late and future
records, values over the size limit, sums that overflow.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weir.core import TaskCore
from weir.graph import JobGraph, compile_job
from weir.native import explain, plan_for
from weir.spec import load_job
from weir.tasks import Consumed

T0 = 1_704_067_200_000
WALL = T0 + 3_600_000


def job_doc(
    steps: list[dict[str, Any]],
    event_time: dict[str, Any] | None = None,
    watermark: dict[str, Any] | None = None,
    max_value_bytes: int | None = None,
) -> dict[str, Any]:
    source: dict[str, Any] = {"topics": ["events"]}
    if event_time is not None:
        source["eventTime"] = event_time
    if max_value_bytes is not None:
        source["maxValueBytes"] = max_value_bytes
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "native", "namespace": "test"},
        "spec": {
            "kafka": {"bootstrapServers": "memory"},
            "pipeline": {
                "source": source,
                "watermark": watermark or {"maxOutOfOrderness": "2s"},
                "steps": steps,
                "sink": {"topic": "out"},
                "deadLetter": {"topic": "dlq"},
            },
        },
    }


def graphs(doc: dict[str, Any]) -> tuple[JobGraph, JobGraph]:
    job = load_job(orjson.dumps(doc).decode())
    native = compile_job(job, wall_ms=lambda: WALL, native=True)
    python = compile_job(job, wall_ms=lambda: WALL, native=False)
    assert native.native is not None, "this job must run the native path"
    assert python.native is None
    return native, python


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int, tuple[Any, ...]]] = []

    def produce(
        self, topic: str, value: bytes | None, key: bytes | None, partition: int = -1, headers: Any = None
    ) -> None:
        self.sent.append((topic, value, key, partition, tuple(headers or ())))


def open_core(
    graph: JobGraph, path: Path, partitions: int, max_cached_windows: int
) -> tuple[TaskCore, Recorder]:
    core = TaskCore(graph, max_cached_windows=max_cached_windows)
    out = Recorder()
    core.send = out.produce
    core.build({"events": partitions}, 0, 1, 0.0)
    for task in core.tasks.values():
        core.open_state(task, path / task.label)
        if task.op is not None and task.store is not None and len(task.store):
            task.op.restore()  # type: ignore[union-attr]
    return core, out


def snapshot(core: TaskCore) -> Any:
    return (
        core.dead_lettered,
        core.records_out,
        sorted((t.label, t.wm, t.records, t.bytes, t.late) for t in core.tasks.values()),
        sorted(
            (t.label, sorted((k, t.store.get(k)) for k, _ in t.store.items()))  # type: ignore[union-attr]
            for t in core.tasks.values()
            if t.store is not None
        ),
    )


def run_both(
    doc: dict[str, Any],
    batches: list[list[Consumed]],
    tmp_path: Path,
    partitions: int = 1,
    max_cached_windows: int = 1_000_000,
    restart_after: int | None = None,
) -> None:
    """Feed ``batches`` to the native and the Python core (ticking between batches, restarting
    from a snapshot of the stores after batch ``restart_after``) and require identical output
    and state."""
    native_graph, python_graph = graphs(doc)
    outs: list[Recorder] = []
    snaps = []
    for name, graph in (("native", native_graph), ("python", python_graph)):
        path = tmp_path / name
        core, out = open_core(graph, path, partitions, max_cached_windows)
        for n, batch in enumerate(batches):
            core.process(batch, now=float(n))
            core.tick(float(n), WALL, lambda _t: False, lambda t: t.next_offset)
            if n == restart_after:
                # A restart resumes from a snapshot (as a checkpoint takes it): windows changed
                # since the last one exist only in memory and are not on disk to compare.
                wms = {t.label: t.wm for t in core.tasks.values()}
                for t in core.tasks.values():
                    if t.store is not None:
                        t.store.flush({"offset": t.next_offset, "watermark": t.wm})  # type: ignore[arg-type]
                core.close()
                core, fresh = open_core(graph, path, partitions, max_cached_windows)
                fresh.sent = out.sent
                out = fresh
                for t in core.tasks.values():
                    t.wm = wms[t.label]
        outs.append(out)
        snaps.append(snapshot(core))
        core.close()
    native_out, python_out = outs
    assert native_out.sent == python_out.sent
    assert snaps[0] == snaps[1]


# -- random records ------------------------------------------------------------------------------

KEYS = [b"k0", b"k1", b"k2", b"\xc3\xa9", b"k-\xe2\x82\xac"]

numbers = st.one_of(
    st.integers(-1000, 1000),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 1, 1.0, 2**53 + 1, float(2**53), 2**63 - 1, -(2**63), 1e308]),
)


@st.composite
def record_values(draw: st.DrawFn) -> bytes | None:
    """A message value: mostly a clean event, sometimes one that the native side must hand back."""
    kind = draw(st.integers(0, 19))
    ts = T0 + draw(st.integers(-5_000, 240_000))
    doc: dict[str, Any] = {
        "ts": ts,
        "price": draw(numbers),
        "qty": draw(st.integers(0, 5)),
        "type": draw(st.sampled_from(["view", "buy", "b\u00fcy", ""])),
        "extra": draw(st.sampled_from([None, [1, {"a": [True, False]}], {"n": "x"}, "é", 1.5e-7])),
    }
    if kind == 0:
        return None  # a tombstone
    if kind == 1:
        return b'{"ts": ' + str(ts).encode() + b', "price": 1'  # truncated
    if kind == 2:
        return b"\xff\xfe" + orjson.dumps(doc)  # not UTF-8
    if kind == 3:
        return orjson.dumps([doc])  # not an object
    if kind == 4:
        doc["type"] = 'quote " and \\ backslash'  # escapes: handed back, decided by Python
    elif kind == 5:
        del doc[draw(st.sampled_from(["ts", "price", "qty"]))]
    elif kind == 6:
        doc[draw(st.sampled_from(["ts", "price", "qty"]))] = draw(
            st.sampled_from([None, "12", True, [1], 2**64 - 1, 2**63, -(2**63) - 1, 10**30, 1.5])
        )
        return json.dumps(doc).encode()  # orjson writes no int beyond 64 bits
    elif kind == 7:
        text = orjson.dumps(doc)
        return text[:-1] + b',"price":' + orjson.dumps(draw(numbers)) + b"}"  # a field twice
    elif kind == 8:
        doc["ts"] = WALL + 10 * 86_400_000  # far in the future
    elif kind == 9:
        doc["ts"] = draw(st.sampled_from([-1, 0, 253_402_300_800_000, float(ts) + 0.5]))
    elif kind == 10:
        return orjson.dumps(doc)[:-1] + b', "big": 1e400}'  # orjson refuses an infinite float
    elif kind == 11:
        return b" \n" + orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\t "
    elif kind == 12:
        doc["price"] = draw(st.sampled_from([2**62, 2**63 - 1, 1e308, -1e308]))  # sums overflow
    elif kind == 13:
        doc["pad"] = "x" * 300  # over maxValueBytes in the jobs that set it
    elif kind == 14:
        return orjson.dumps(doc)[:-1] + b', "ctl": "a\x01b"}'  # a control character in a string
    return orjson.dumps(doc)


@st.composite
def batches_of(draw: st.DrawFn, partitions: int = 1) -> list[list[Consumed]]:
    values = draw(st.lists(record_values(), min_size=1, max_size=120))
    offsets = [0] * partitions
    messages = []
    for value in values:
        p = draw(st.integers(0, partitions - 1))
        key = (
            draw(st.sampled_from([*KEYS, None, b"\xff"]))
            if draw(st.integers(0, 9)) == 0
            else draw(st.sampled_from(KEYS))
        )
        stamp = T0 + draw(st.integers(-1000, 200_000))
        messages.append(Consumed("events", p, offsets[p], key, value, stamp))
        offsets[p] += 1
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=6, unique=True)))
    out, last = [], 0
    for cut in [*cuts, len(messages)]:
        if cut > last:
            out.append(messages[last:cut])
            last = cut
    return out


AGGREGATES = {
    "count": {"fn": "count"},
    "revenue": {"fn": "sum", "field": "price"},
    "low": {"fn": "min", "field": "price"},
    "high": {"fn": "max", "field": "price"},
    "mean": {"fn": "avg", "field": "qty"},
}

SETTINGS = settings(
    max_examples=int(os.environ.get("WEIR_NATIVE_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def windowed(
    size: str = "1m",
    lateness: str | None = None,
    emit: str = "final",
    filters: Any = (),
    slide: str | None = None,
) -> list[Any]:
    window: dict[str, Any] = {"type": "tumbling", "size": size}
    if slide is not None:
        window = {"type": "sliding", "size": size, "slide": slide}
    if lateness:
        window["allowedLateness"] = lateness
    return [
        *({"filter": f} for f in filters),
        {"keyBy": {"messageKey": True}},
        {"window": window},
        {"aggregate": {"emit": emit, "outputs": AGGREGATES}},
    ]


# -- the families ---------------------------------------------------------------------------------


@SETTINGS
@given(batches=batches_of())
def test_random_batches_give_the_same_results_dead_letters_and_state(
    tmp_path_factory: Any, batches: Any
) -> None:
    doc = job_doc(windowed(), {"field": "ts"}, max_value_bytes=400)
    run_both(doc, batches, tmp_path_factory.mktemp("b"))


@SETTINGS
@given(batches=batches_of(partitions=3))
def test_several_partitions_lateness_and_updates_mode_match(tmp_path_factory: Any, batches: Any) -> None:
    doc = job_doc(
        windowed("10s", lateness="5s", emit="updates"),
        {"field": "ts"},
        {"maxOutOfOrderness": "0ms", "maxFutureSkew": "1h"},
    )
    run_both(doc, batches, tmp_path_factory.mktemp("p"), partitions=3)


FILTERS = [
    {"field": "type", "op": "eq", "value": "buy"},
    {"not": {"field": "type", "op": "in", "value": ["view", 3, True, None]}},
    {"or": [{"field": "qty", "op": "ge", "value": 2}, {"field": "price", "op": "lt", "value": 0.5}]},
    {"field": "extra", "op": "exists"},
    {"field": "extra", "op": "ne"},
    {"field": "type", "op": "gt", "value": "b"},
    {"field": "qty", "op": "eq", "value": 1.0},
    {"field": "price", "op": "notIn", "value": [1, 2.5, "1"]},
]


@SETTINGS
@given(batches=batches_of(), filters=st.lists(st.sampled_from(FILTERS), max_size=3))
def test_filters_select_and_rename_match(tmp_path_factory: Any, batches: Any, filters: Any) -> None:
    steps = [
        *({"filter": f} for f in filters),
        {"rename": {"price": "amount"}},
        {"select": ["amount", "qty", "ts"]},
        {"keyBy": {"messageKey": True}},
        {"window": {"type": "tumbling", "size": "30s"}},
        {"aggregate": {"outputs": {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "amount"}}}},
    ]
    run_both(job_doc(steps, {"field": "ts"}), batches, tmp_path_factory.mktemp("f"))


@SETTINGS
@given(batches=batches_of(), fmt=st.sampled_from(["kafka", "epochSeconds"]))
def test_kafka_timestamps_and_epoch_seconds_match(tmp_path_factory: Any, batches: Any, fmt: str) -> None:
    if fmt == "kafka":
        doc = job_doc(windowed("20s"), None)
    else:
        for batch in batches:  # event times in seconds
            for m in batch:
                v = m.value()
                if v and v.startswith(b"{") and b'"ts":' in v:
                    try:
                        d = orjson.loads(v)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(d, dict) and isinstance(d.get("ts"), int):
                        d["ts"] //= 1000
                        m._value = orjson.dumps(d)
        doc = job_doc(windowed("20s"), {"field": "ts", "format": "epochSeconds"})
    run_both(doc, batches, tmp_path_factory.mktemp("t"))


@SETTINGS
@given(batches=batches_of(), restart=st.integers(0, 3))
def test_a_restart_from_the_store_and_a_small_memory_budget_match(
    tmp_path_factory: Any, batches: Any, restart: int
) -> None:
    doc = job_doc(windowed("5s"), {"field": "ts"})
    run_both(doc, batches, tmp_path_factory.mktemp("r"), max_cached_windows=3, restart_after=restart)


@SETTINGS
@given(
    batches=batches_of(partitions=3),
    shape=st.sampled_from([("20s", "5s"), ("25s", "10s"), ("30s", "30s"), ("7s", "3s")]),
    lateness=st.sampled_from([None, "4s"]),
    emit=st.sampled_from(["final", "updates"]),
)
def test_sliding_windows_match_with_lateness_several_partitions_and_updates_mode(
    tmp_path_factory: Any, batches: Any, shape: tuple[str, str], lateness: str | None, emit: str
) -> None:
    size, slide = shape  # 25s/10s: a size that is not a multiple of the slide
    doc = job_doc(
        windowed(size, lateness=lateness, emit=emit, slide=slide),
        {"field": "ts"},
        {"maxOutOfOrderness": "1s", "maxFutureSkew": "1h"},
        max_value_bytes=400,
    )
    run_both(doc, batches, tmp_path_factory.mktemp("s"), partitions=3)


@SETTINGS
@given(batches=batches_of(), restart=st.integers(0, 3))
def test_sliding_windows_match_after_a_restart_and_with_a_small_cache(
    tmp_path_factory: Any, batches: Any, restart: int
) -> None:
    doc = job_doc(windowed("15s", slide="5s"), {"field": "ts"})
    run_both(doc, batches, tmp_path_factory.mktemp("sr"), max_cached_windows=3, restart_after=restart)


def test_a_sliding_record_that_would_overflow_one_of_its_windows_joins_none_of_them(tmp_path: Path) -> None:
    """All or none, as the Python path: every window of the record is checked before any changes
    (here the one that would overflow comes second, after one that would take the value)."""
    doc = job_doc(windowed("20s", slide="10s"), {"field": "ts"}, {"maxOutOfOrderness": "30s"})
    # ts 0 is in [-10s, 10s) and [0, 20s); 25s in [10s, 30s) and [20s, 40s); 15s and 16s in
    # [0, 20s) and [10s, 30s). The third record's 2**62 fits [0, 20s) but takes [10s, 30s) past
    # 2**63 - 1.
    values = [(0, 5), (25_000, 2**62), (15_000, 2**62), (16_000, 1)]
    batch = [
        Consumed("events", 0, i, b"k0", orjson.dumps({"ts": T0 + t, "price": p, "qty": 1}))
        for i, (t, p) in enumerate(values)
    ]
    close = [Consumed("events", 0, 4, b"k0", orjson.dumps({"ts": T0 + 600_000, "price": 0, "qty": 0}))]
    run_both(doc, [batch, close], tmp_path)
    for cut in (1, 2, 3):  # the same split over two batches: the windows come from the store
        run_both(doc, [batch[:cut], batch[cut:], close], tmp_path / f"cut{cut}")
    core, out = open_core(graphs(doc)[0], tmp_path / "again", 1, 1_000_000)
    core.process(batch + close, now=0.0)
    results = {
        r["windowStartMs"] - T0: (r["count"], r["revenue"])
        for r in (orjson.loads(v) for t, v, *_ in out.sent if t == "out" and v)
        if r["windowStartMs"] < T0 + 600_000 - 20_000
    }
    assert core.dead_lettered == {"overflow": 1}
    assert results == {
        -10_000: (1, 5),
        0: (2, 6),  # not 2**62 + 6: the overflowing record joined none of its windows
        10_000: (2, 2**62 + 1),
        20_000: (1, 2**62),
    }


def test_sums_past_64_bits_are_dead_lettered_by_the_python_path_and_leave_the_window_exact(
    tmp_path: Path,
) -> None:
    doc = job_doc(windowed(), {"field": "ts"})
    values = [{"ts": T0 + i, "price": p, "qty": 1} for i, p in enumerate([2**62, 2**62, 1, -5, 1.5])]
    batch = [Consumed("events", 0, i, b"k0", orjson.dumps(v)) for i, v in enumerate(values)]
    close = [Consumed("events", 0, 5, b"k0", orjson.dumps({"ts": T0 + 600_000, "price": 0, "qty": 0}))]
    run_both(doc, [batch, close], tmp_path)
    core, out = open_core(graphs(doc)[0], tmp_path / "again", 1, 1_000_000)
    core.process(batch + close, now=0.0)
    (result,) = [orjson.loads(v) for t, v, *_ in out.sent if t == "out" and v and b'"k0"' in v]
    # 2**62 + 1 - 5 then + 1.5 (a float from then on); the second 2**62 would pass 2**63 - 1
    assert result["revenue"] == 2**62 - 4 + 1.5 and result["count"] == 4
    assert core.dead_lettered == {"overflow": 1}


def test_which_pipelines_run_natively(monkeypatch: Any) -> None:
    def plan(doc: dict[str, Any]) -> Any:
        job = load_job(orjson.dumps(doc).decode())
        graph = compile_job(job, native=True)
        return graph.native

    assert plan(job_doc(windowed(), {"field": "ts"})) is not None
    assert plan(job_doc(windowed(), {"field": "ts", "format": "iso8601"})) is None
    sliding = plan(job_doc(windowed("1m", slide="10s"), {"field": "ts"}))
    assert sliding is not None and (sliding.size_ms, sliding.slide_ms) == (60_000, 10_000)
    tumbling = plan(job_doc(windowed("1m"), {"field": "ts"}))
    assert (tumbling.size_ms, tumbling.slide_ms) == (60_000, 60_000)
    session = windowed()
    session[1] = {"window": {"type": "session", "gap": "10s"}}
    assert plan(job_doc(session, {"field": "ts"})) is None
    by_field = windowed()
    by_field[0] = {"keyBy": {"field": "type"}}
    keyed = plan(job_doc(by_field, {"field": "ts"}))
    assert keyed is not None and keyed.forwarded, "a repartitioned job's keyed stage runs natively"
    assert keyed.fields == ("price", "qty")
    distinct = windowed()
    distinct[2] = {"aggregate": {"outputs": {"users": {"fn": "count_distinct", "field": "type"}}}}
    assert plan(job_doc(distinct, {"field": "ts"})) is None
    job = load_job(orjson.dumps(job_doc(windowed(), {"field": "ts"})).decode())
    assert compile_job(job, native=False).native is None
    assert explain(job.pipeline) == "the native hot path runs this pipeline"
    assert explain(load_job(orjson.dumps(job_doc(session, {"field": "ts"})).decode()).pipeline) == (
        "the Python path runs this pipeline: the native path runs tumbling and sliding windows only"
    )
    assert explain(load_job(orjson.dumps(job_doc(with_functions([FUNCTIONS[1]]))).decode()).pipeline) == (
        "the native hot path runs this pipeline's window segment (its Python functions per record)"
    )
    monkeypatch.setenv("WEIR_NATIVE", "0")
    assert explain(job.pipeline) == "the Python path runs this pipeline: WEIR_NATIVE=0"
    assert plan_for(job.pipeline) is None
    assert plan_for(job.pipeline, force=True) is not None


# -- the window segment after Python functions ------------------------------------------------------


def with_functions(
    functions: list[dict[str, Any]], size: str = "30s", slide: str | None = None, emit: str = "final"
) -> list[Any]:
    return [*functions, *windowed(size, emit=emit, slide=slide)]


FUNCTIONS = [
    {"map": {"function": "user_functions:reprice"}},
    {"flatMap": {"function": "user_functions:split_order"}},
    {"filter": {"field": "qty", "op": "ge", "value": 1}},
]


@SETTINGS
@given(
    batches=batches_of(partitions=2),
    functions=st.lists(st.sampled_from(FUNCTIONS), min_size=1, max_size=3).filter(
        lambda fs: any("filter" not in f for f in fs)
    ),
    shape=st.sampled_from([("30s", None), ("20s", "5s")]),
    emit=st.sampled_from(["final", "updates"]),
    restart=st.sampled_from([None, 0, 2]),
)
def test_python_functions_then_the_native_window_segment_match(
    tmp_path_factory: Any,
    batches: Any,
    functions: Any,
    shape: tuple[str, str | None],
    emit: str,
    restart: int | None,
) -> None:
    """Python functions run per record; the prepared records' windows fold natively
    (``Windows.accept``), handing back what is not a plain number, as the Python path decides."""
    size, slide = shape
    doc = job_doc(
        with_functions(functions, size, slide, emit),
        {"field": "ts"},
        {"maxOutOfOrderness": "1s", "maxFutureSkew": "1h"},
    )
    run_both(
        doc,
        batches,
        tmp_path_factory.mktemp("fn"),
        partitions=2,
        max_cached_windows=3 if restart is not None else 1_000_000,
        restart_after=restart,
    )


def test_the_window_segment_after_a_python_function_folds_natively(tmp_path: Path) -> None:
    doc = job_doc(with_functions([FUNCTIONS[0]]), {"field": "ts"})
    native_graph, _ = graphs(doc)
    assert native_graph.native is not None and native_graph.native.prepared
    assert native_graph.native.fields == ("price", "qty")
    core, out = open_core(native_graph, tmp_path, 1, 1_000_000)
    batch = [
        Consumed("events", 0, i, b"k0", orjson.dumps({"ts": T0 + i, "price": 2, "qty": 1})) for i in range(5)
    ]
    core.process(batch, now=0.0)
    (task,) = core.tasks.values()
    assert task.native.cached == 1, "the window is in the native cache: the extension folded the records"
    later = [  # the watermark passes the first window's end; then a record of it is late
        Consumed("events", 0, 5, b"k0", orjson.dumps({"ts": T0 + 40_000, "price": 1, "qty": 1})),
        Consumed("events", 0, 6, b"k0", orjson.dumps({"ts": T0 + 10, "price": 1, "qty": 1})),
    ]
    close = Consumed("events", 0, 7, b"k0", orjson.dumps({"ts": T0 + 600_000, "price": 0, "qty": 1}))
    core.process(later, now=1.0)
    core.process([close], now=2.0)
    assert core.dead_lettered == {"late": 1} and task.late == 1
    first = next(orjson.loads(v) for t, v, *_ in out.sent if t == "out" and v and b'"k0"' in v)
    assert (first["count"], first["revenue"], first["low"], first["high"]) == (5, 20, 4, 4)
    run_both(doc, [batch, later, [close]], tmp_path / "both")


def test_weir_validate_says_which_path_runs_the_job(tmp_path: Path, capsys: Any) -> None:
    from weir import cli

    native, functions = tmp_path / "native.json", tmp_path / "functions.json"
    native.write_bytes(orjson.dumps(job_doc(windowed(), {"field": "ts"})))
    functions.write_bytes(orjson.dumps(job_doc(with_functions([FUNCTIONS[0]]), {"field": "ts"})))
    assert cli.main(["validate", str(native)]) == 0
    assert capsys.readouterr().out.endswith("\n  the native hot path runs this pipeline\n")
    assert cli.main(["validate", str(functions)]) == 0
    assert "the native hot path runs this pipeline's window segment" in capsys.readouterr().out


# -- stage 2 of a repartitioned job -------------------------------------------------------------------

REPARTITION = "weir-test-native-2-repartition"


def by_field(size: str = "20s", slide: str | None = None, emit: str = "final") -> list[Any]:
    steps = windowed(size, emit=emit, slide=slide)
    steps[0] = {"keyBy": {"field": "type", "partitions": 2}}
    return steps


@st.composite
def forwarded_values(draw: st.DrawFn) -> bytes | None:
    """What a repartition topic may hold besides stage 1's own records: near misses of
    ``[event time, record]`` the native side must refuse (Python decides) or read exactly."""
    ts = T0 + draw(st.integers(-5_000, 120_000))
    record = {"price": draw(numbers), "qty": draw(st.integers(0, 5))}
    body = orjson.dumps(record)
    return draw(
        st.sampled_from(
            [
                b"[" + str(ts).encode() + b"," + body + b"]",
                b"[" + str(ts).encode() + b", " + body + b" ]",
                b"[ " + str(ts).encode() + b"," + body + b"]",
                b"[" + str(ts).encode() + b".0," + body + b"]",
                b"[" + str(ts * 10**9).encode() + b"," + body + b"]",
                b"[-" + str(ts).encode() + b"," + body + b"]",
                b'["' + str(ts).encode() + b'",' + body + b"]",
                b"[" + str(ts).encode() + b"," + body + b"]]",
                b"[" + str(ts).encode() + b"," + body + b",1]",
                b"[" + str(ts).encode() + b",[1]]",
                b"[" + str(ts).encode() + b"," + body[:-1] + b',"price":3}]',
                b"[" + str(ts).encode() + b"," + body[:-1] + b',"q":"a\\"b"}]',
                b"[" + str(ts).encode() + b"," + body,
                orjson.dumps(record),
                None,
            ]
        )
    )


def run_both_repartitioned(
    doc: dict[str, Any],
    batches: list[list[Consumed]],
    strays: list[bytes | None],
    chunks: list[int],
    tmp_path: Path,
    partitions: int = 2,
    max_cached_windows: int = 1_000_000,
) -> None:
    """``run_both`` for a repartitioned job in one worker: what stage 1 forwards (and its
    watermark markers) goes back in as the repartition topic's records, in chunks of
    ``chunks`` sizes, with the ``strays`` (as if another writer had put them there) mixed in."""
    native_graph, python_graph = graphs(doc)
    assert native_graph.native is not None and native_graph.native.forwarded
    sends, snaps = [], []
    for name, graph in (("native", native_graph), ("python", python_graph)):
        assert graph.repartition_topic is not None
        topic = graph.repartition_topic
        core = TaskCore(graph, max_cached_windows=max_cached_windows)
        out = Recorder()
        core.send = out.produce
        core.build({"events": partitions, topic: 2}, 0, 1, 0.0)
        for task in core.tasks.values():
            if not task.forward:
                core.open_state(task, tmp_path / name / task.label)
        offsets, fed, stray = [0, 0], 0, list(strays)
        for n, batch in enumerate(batches):
            core.process(batch, now=float(n))
            core.tick(float(n), WALL, lambda _t: False, lambda t: t.next_offset)
            routed = []
            for t, value, key, partition, _h in out.sent[fed:]:
                if t == topic:
                    q = partition if partition >= 0 else zlib.crc32(key or b"") % 2
                    routed.append((q, key, value))
                    if stray and len(routed) % 3 == 0:
                        routed.append((len(routed) % 2, b"k0", stray.pop()))
            fed = len(out.sent)
            while routed:
                size = chunks[len(routed) % len(chunks)]
                chunk, routed = routed[:size], routed[size:]
                msgs = []
                for q, key, value in chunk:
                    msgs.append(Consumed(topic, q, offsets[q], key, value, 0))
                    offsets[q] += 1
                core.process(msgs, now=float(n))
                core.tick(float(n), WALL, lambda _t: False, lambda t: t.next_offset)
        sends.append(out.sent)
        snaps.append(snapshot(core))
        core.close()
    assert sends[0] == sends[1]
    assert snaps[0] == snaps[1]


@SETTINGS
@given(
    batches=batches_of(partitions=2),
    strays=st.lists(forwarded_values(), max_size=12),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    shape=st.sampled_from([("20s", None), ("15s", "5s")]),
    emit=st.sampled_from(["final", "updates"]),
    small=st.booleans(),
)
def test_the_keyed_stage_of_a_repartitioned_job_matches(
    tmp_path_factory: Any,
    batches: Any,
    strays: Any,
    chunks: Any,
    shape: tuple[str, str | None],
    emit: str,
    small: bool,
) -> None:
    size, slide = shape
    doc = job_doc(
        by_field(size, slide, emit), {"field": "ts"}, {"maxOutOfOrderness": "1s", "maxFutureSkew": "1h"}
    )
    cache = 3 if small else 1_000_000
    path = tmp_path_factory.mktemp("rp")
    run_both_repartitioned(doc, batches, strays, chunks, path, max_cached_windows=cache)


def test_the_keyed_stage_folds_forwarded_records_natively_and_dead_letters_a_late_one(tmp_path: Path) -> None:
    doc = job_doc(by_field(), {"field": "ts"}, {"maxOutOfOrderness": "1s"})

    def event(p: int, offset: int, ms: int, kind: str = "buy") -> Consumed:
        value = orjson.dumps({"ts": T0 + ms, "price": 2, "qty": 1, "type": kind})
        return Consumed("events", p, offset, b"k", value)

    first = [event(0, 0, 40_000), event(1, 0, 40_000), event(0, 1, 41_000, "view")]
    late = [event(0, 2, 10), event(1, 1, 42_000)]  # T0 + 10 ms: its window closed at stage 2
    strays = [b"[" + str(T0 + 42_500).encode() + b',{"price":1.5,"qty":1}]']
    run_both_repartitioned(doc, [first, late], strays, [2], tmp_path / "both")
    # The native core alone: the keyed stage's windows are in the extension's cache.
    graph = graphs(doc)[0]
    assert graph.repartition_topic is not None
    core = TaskCore(graph)
    out = Recorder()
    core.send = out.produce
    core.build({"events": 2, graph.repartition_topic: 1}, 0, 1, 0.0)
    (keyed,) = [t for t in core.tasks.values() if not t.forward]
    core.open_state(keyed, tmp_path / "alone")
    for n, batch in enumerate([first, late]):
        core.process(batch, now=float(n))
        core.tick(float(n), WALL, lambda _t: False, lambda t: t.next_offset)
        sent = [(t, v, k) for t, v, k, *_ in out.sent if t == graph.repartition_topic]
        out.sent = [s for s in out.sent if s[0] != graph.repartition_topic]
        fed = [Consumed(t, 0, keyed.next_offset + i, k, v, 0) for i, (t, v, k) in enumerate(sent)]
        core.process(fed, now=float(n))
        if n == 0:
            assert keyed.native.cached == 2, "buy and view: their windows are in the native cache"
    assert core.dead_lettered == {"late": 1} and keyed.late == 1
