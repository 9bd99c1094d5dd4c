"""Turns a benchmark result (bench/results/*.json) into its summary and into BENCHMARKS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import measure

CEILING_LABEL = "(a) ceiling: raw `consume(10000)` + `orjson.loads`"
CEILING_NOTES = (
    "confluent-kafka `Consumer` with the weir worker's own consumer configuration, all partitions "
    "assigned, `consume(num_messages=10000)` in a loop and `orjson.loads` of every value, nothing "
    "else: the fastest a Python process reads and decodes this topic."
)
ORDER = (
    "ceiling", "weir", "weir_py", "weir_eos", "weir_2w", "weir_kf", "weir_kf_py", "quix", "bytewax", "flink",
)  # fmt: skip
FIGURES = (
    "events_per_s", "cpu_s", "cpu_us_per_event", "peak_rss_mib", "machine_busy_cores", "broker_cores",
    "reader_cores", "python_cores", "librdkafka_cores", "rocksdb_cores",
)  # fmt: skip
LATENCY_FIGURES = ("latency_p50_s", "latency_p99_s", "close_delay_p50_s", "close_delay_p99_s", "cpu_cores")
NA = "\u2013"  # an en dash: no figure
PEER_NAMES = {"ceiling": "ceiling", "quix": "Quix Streams", "bytewax": "Bytewax", "flink": "Flink"}


def _ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("status", "ok") == "ok"


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    runs = doc["runs"]
    keys = [k for k in ORDER if k in doc["runners"]]
    out: dict[str, Any] = {"throughput": {}, "ratios": {}, "weir_over": {}, "latency": {}, "failures": {}}
    for k in keys:
        ok = [r[k] for r in runs if _ok(r.get(k))]
        bad = [r[k] for r in runs if k in r and not _ok(r[k])]
        if bad:
            out["failures"][k] = [b.get("problems") for b in bad]
        if not ok:
            continue
        out["throughput"][k] = {
            "runs_ok": len(ok),
            "runs_failed": len(bad),
            **{f: measure.stat([r.get(f) for r in ok]) for f in FIGURES},
            "load_1min": measure.stat([r["loadavg_after"][0] for r in ok]),
        }
        ratios: dict[str, Any] = {}
        for ref in ("ceiling", "weir"):
            for f in ("events_per_s", "cpu_us_per_event", "peak_rss_mib"):
                ratios[f"{f}_over_{ref}"] = measure.stat(
                    [
                        r[k][f] / r[ref][f]
                        for r in runs
                        if _ok(r.get(k)) and _ok(r.get(ref)) and r[k].get(f) and r[ref].get(f)
                    ]
                )
        out["ratios"][k] = ratios
        if k != "weir":
            out["weir_over"][k] = measure.stat(
                [
                    r["weir"]["events_per_s"] / r[k]["events_per_s"]
                    for r in runs
                    if _ok(r.get("weir")) and _ok(r.get(k))
                ]
            )
    out["keyed_native_over_python"] = measure.stat(
        [
            r["weir_kf"]["events_per_s"] / r["weir_kf_py"]["events_per_s"]
            for r in runs
            if _ok(r.get("weir_kf")) and _ok(r.get("weir_kf_py"))
        ]
    )
    lat = doc.get("latency") or {}
    weir_lat = lat.get("weir") if _ok(lat.get("weir")) else None
    for k in keys:
        r = lat.get(k)
        if not r:
            continue
        if not _ok(r):
            out["failures"].setdefault(k, []).append(r.get("problems"))
            continue
        entry = {f: r.get(f) for f in (*LATENCY_FIGURES, "ideal_p50_s", "ideal_p99_s", "peak_rss_mib")}
        if weir_lat:
            for f in ("latency_p50_s", "latency_p99_s", "cpu_cores"):
                entry[f"{f}_over_weir"] = r[f] / weir_lat[f] if weir_lat.get(f) else None
        out["latency"][k] = entry
    return out


# --------------------------------------------------------------------------- formatting


def _num(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return NA
    return f"{v:,.{digits}f}"


def _med(st: dict[str, float] | None, digits: int = 0, ranged: bool = False) -> str:
    if not st:
        return NA
    if ranged and st["min"] != st["max"]:
        return f"{_num(st['median'], digits)} ({_num(st['min'], digits)}{NA}{_num(st['max'], digits)})"
    return _num(st["median"], digits)


def _ratio(st: dict[str, float] | None) -> str:
    if not st:
        return NA
    v = st["median"]
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _status_cell(doc: dict[str, Any], k: str) -> str:
    st = doc["runners"][k]["status"]
    fails = doc["summary"]["failures"].get(k)
    if st != "ok":
        return st
    if fails:
        return "failed: " + "; ".join(str(p) for p in (fails[0] or []))[:200]
    return NA


def _scaling_note(doc: dict[str, Any]) -> list[str]:
    """What the machine leaves for a second worker: how busy all of it was while one ran."""
    thr, nproc = doc["summary"]["throughput"], doc["machine"]["nproc"]
    one = (thr.get("weir") or {}).get("machine_busy_cores")
    if not one or "weir_2w" not in thr:
        return []
    two = thr["weir_2w"].get("machine_busy_cores")
    return [
        f"Scaling on this machine: while one worker ran, the whole machine (weir, the broker, "
        f"the result reader, everything else) kept **{one['median']:.2f} of its {nproc} CPUs** "
        f"busy (median); with 2 workers, {_med(two, 2)}. At the same work per event, "
        f"{nproc} ÷ {one['median']:.2f} = **{nproc / one['median']:.2f}×** one worker is the "
        "most any number of workers can reach here.",
        "",
        *_cores_split(thr["weir"], thr["weir_2w"], nproc),
    ]


SPLIT = (
    ("python_cores", "weir's Python threads"),
    ("librdkafka_cores", "its librdkafka threads"),
    ("rocksdb_cores", "RocksDB's"),
    ("broker_cores", "the broker"),
    ("reader_cores", "the benchmark's result reader"),
)


def _cores_split(one: dict[str, Any], two: dict[str, Any], nproc: int) -> list[str]:
    """Where the busy cores went, one worker beside two (medians of each part, so they need
    not add up to the machine's median exactly)."""
    if not one.get("python_cores"):  # a result from before the split
        return []
    parts = [
        f"{label} {one[key]['median']:.2f} → {_med(two.get(key), 2)}"
        for key, label in SPLIT
        if one.get(key) is not None
    ]
    rest = [
        t["machine_busy_cores"]["median"] - sum(t[k]["median"] for k, _ in SPLIT if t.get(k))
        for t in (one, two)
        if t.get("machine_busy_cores")
    ]
    own = one["python_cores"]["median"] + one["librdkafka_cores"]["median"]
    return [
        "Where those cores went, one worker → two (medians): " + "; ".join(parts)
        + (f"; everything else {rest[0]:.2f} → {rest[1]:.2f}" if len(rest) == 2 else "") + ". "
        f"For 2 workers to reach 1.7× one, one worker may keep at most {nproc} ÷ 1.7 = "
        f"{nproc / 1.7:.2f} of the {nproc} CPUs busy, the broker and the reader included; "
        f"its own threads alone took {own:.2f}.",
        "",
    ]


def markdown(doc: dict[str, Any], profile: dict[str, Any] | None) -> str:
    s, p, m, v = doc["summary"], doc["parameters"], doc["machine"], doc["versions"]
    thr, ratios, lat = s["throughput"], s["ratios"], s["latency"]
    labels = {k: doc["runners"][k]["label"] for k in doc["runners"]}
    keys = [k for k in ORDER if k in doc["runners"]]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. How it measures: "
        "[bench/README.md](bench/README.md). Raw figures: `bench/results/latest.json`.",
        "",
        f"Run {doc['started']} on commit `{doc['git']}` with:",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "## The job and the data",
        "",
        f"Every runner runs the same job on the same topic of the same broker: {p['events']:,} JSON "
        f"events ({p['avg_event_bytes']:.0f} bytes on average, lz4) over {p['keys']:,} keys in a "
        f"{p['partitions']}-partition topic, message key = group key; 1-minute event-time tumbling "
        f"windows on the `ts` field, count and sum of `price` per key, "
        f"{p['out_of_orderness_ms'] / 1000:g} s of allowed out-of-orderness (the data's disorder is "
        f"under {p['disorder_ms'] / 1000:g} s, so nothing is late), one JSON result per window to a "
        f"result topic; {p['windows']:,} windows expected. **Every run's output is compared with "
        "the reference computed from the generator (every window, count exact, sum within 1e-9) "
        "before its figures count**; a run that differs is shown as failed, never as a number.",
        "",
        "## Throughput, CPU and memory",
        "",
        f"Median of {p['repeat']} interleaved runs (range in brackets). Throughput is events/s from "
        "the first record consumed to the last window result readable in the result topic "
        "(read_committed; each result is timed by a reader thread that does nothing else, so a "
        "checkpoint's burst is timed when it became readable, not after the reader parsed the "
        "burst before it). Each figure is also given ÷ the ceiling's and ÷ weir's (at-least-once).",
        "",
        "| runner | events/s | ÷ ceiling | ÷ weir | CPU s | CPU µs/event | ÷ ceiling | ÷ weir "
        "| peak RSS MiB | ÷ ceiling | ÷ weir | load (1 min) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in keys:
        t = thr.get(k)
        r = ratios.get(k, {})
        if not t:
            lines.append(f"| {labels[k]} | " + " | ".join([NA] * 11) + f" | {_status_cell(doc, k)} |")
            continue
        lines.append(
            f"| {labels[k]} | {_med(t['events_per_s'], 0, True)} "
            f"| {_ratio(r.get('events_per_s_over_ceiling'))} "
            f"| {_ratio(r.get('events_per_s_over_weir'))} | {_med(t['cpu_s'], 2)} "
            f"| {_med(t['cpu_us_per_event'], 2)} | {_ratio(r.get('cpu_us_per_event_over_ceiling'))} "
            f"| {_ratio(r.get('cpu_us_per_event_over_weir'))} | {_med(t['peak_rss_mib'])} "
            f"| {_ratio(r.get('peak_rss_mib_over_ceiling'))} | {_ratio(r.get('peak_rss_mib_over_weir'))} "
            f"| {_med(t['load_1min'], 2)} | {_status_cell(doc, k)} |"
        )
    wo = s["weir_over"]
    heads = [
        f"weir ÷ {PEER_NAMES.get(k, k)} = **{_ratio(wo[k])}**"
        for k in ("ceiling", "quix", "bytewax", "flink")
        if wo.get(k)
    ]
    for k, what in (
        ("weir_py", "the Python path ÷ weir"),
        ("weir_eos", "exactly-once ÷ at-least-once"),
        ("weir_2w", "2 workers ÷ 1 worker"),
        ("weir_kf", "keyed by a record field ÷ by the message key"),
    ):
        if ratios.get(k, {}).get("events_per_s_over_weir"):
            heads.append(f"{what} = **{_ratio(ratios[k]['events_per_s_over_weir'])}**")
    if s.get("keyed_native_over_python"):
        keyed = _ratio(s["keyed_native_over_python"])
        heads.append(f"keyed by a record field, native ÷ Python path = **{keyed}**")
    lines += [
        "",
        ("In events/s: " + ", ".join(heads) + ".") if heads else "",
        "",
        *_scaling_note(doc),
        "- The ceiling is timed from its first record to its last record decoded; it writes no "
        "results. weir's first record is the `firstRecordAt` its workers stamp when their first "
        "record comes (read from `/status`); the peers print the wall-clock time of their first "
        "deserialisation.",
        "- CPU is user + system time of the runner's processes (its process group; all threads: "
        "librdkafka's, the JVM's JIT and GC) between those two moments, from `/proc/<pid>/stat` "
        "sampled every ~50 ms. Peak RSS is the high-water mark (`VmHWM`, last sampled while it "
        "ran, summed over the group), start-up included. The split of weir's CPU by thread "
        "(Python, librdkafka, RocksDB) is read from `/proc/<pid>/task/*/stat` at the two moments; "
        "the broker's is its process's CPU (found by its port), the reader's the benchmark's own.",
        "- Load (1 min) is the load average right after each run, on "
        f"{m['nproc']} CPUs shared with the broker, the benchmark's reader and other work on the "
        f"machine. At the start: {doc['loadavg_start']}; at the end: {doc['loadavg_end']}.",
        "",
    ]
    lines += _latency_section(doc, lat, labels, keys)
    lines += ["## The runners", ""]
    for k in keys:
        lines.append(f"- **{labels[k]}** — {doc['runners'][k]['notes']}" + _unavailable_note(doc, k))
    lines += [
        "",
        "The peers that consume through librdkafka (Quix Streams, Bytewax) get the same "
        "`fetch.queue.backoff.ms=10` the weir worker ships with; everything else is each "
        "system's default.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu_model']}, {m['nproc']} CPUs (`nproc`); RAM {m['ram_gib']} GiB; Linux {m['kernel']}",
        f"- Python {v['python']}, weir {v['weir']}, confluent-kafka {v['confluent_kafka']}, librdkafka "
        f"{v['librdkafka']}, orjson {v['orjson']}, rocksdict {v['rocksdict']}",
    ]
    for k, name in (("quix", "Quix Streams"), ("bytewax", "Bytewax"), ("flink", "Apache Flink")):
        if v.get(k):
            lines.append(f"- {name}: " + ", ".join(f"{a} {b}" for a, b in v[k].items()))
    lines += [
        f"- Kafka broker {v['kafka_broker']} (single node, KRaft, the test harness's) on the same machine",
        "",
    ]
    lines += nexmark_markdown()
    lines += checkpoint_markdown()
    lines += rescale_markdown()
    lines += autoscale_markdown()
    lines += memory_markdown()
    if profile:
        lines += profile_markdown(profile, doc)
    return "\n".join(lines) + "\n"


def autoscale_markdown(path: Path | None = None) -> list[str]:
    """The load-step figures of ``bench/autoscale_bench.py`` (its own run, its own JSON and PNG)."""
    path = path or Path(__file__).parent / "results" / "autoscale.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    p, a = d["parameters"], d["autoscaler"]
    capacity = p["capacity"]
    labels = {"auto": "autoscaler", "fixed1": "fixed parallelism 1",
              "fixedmax": f"fixed parallelism {p['partitions']} (the maximum)"}
    settings = ", ".join(f"`{k}: {v}`" for k, v in a.items() if k != "enabled")
    lines = [
        "## Autoscaling on a load step",
        "",
        f"The same job three times through `weir up` on a {p['partitions']}-partition topic, each worker "
        f"limited to {capacity:g} records/s (`WEIR_MAX_RECORDS_PER_SECOND`: a known capacity): 10 s "
        "tumbling windows, exactly-once, checkpoints every second. The load: "
        f"{p['base']:g} s at {capacity / 2:g}/s (0.5x one worker), {p['step']:g} s at {capacity * 2:g}/s "
        f"(2x), {p['after']:g} s at {capacity / 2:g}/s, then nothing until the job has caught up. Lag is "
        "read every second with the autoscaler's own reader (read_committed ends, markers not counted); "
        f"the autoscaler ran with {settings}. Run {d['when']} on commit `{d['commit']}` with "
        f"`{d['command']}` (load {d['machine']['loadavg_start'][0]:.1f} at the start, "
        f"{d['machine']['loadavg'][0]:.1f} at the end; other jobs shared the machine's "
        f"{d['machine']['nproc']} cores).",
        "",
        "Time to lag 0: from the step's start until the lag is back under two seconds of input after "
        "its peak. Worker-seconds: the running parallelism integrated from the trace's start until "
        "caught up. **Output checked**: the read_committed output equals the reference windows of "
        "every event produced, each once.",
        "",
        "| run | peak lag | time to lag 0 | caught up after the trace | rescales | worker-seconds "
        "| output |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in d["runs"]:
        f = run["figures"]
        zero = (f"{f['time_to_lag_zero_s']:.0f} s" if f["time_to_lag_zero_s"] is not None
                else "not in the trace")
        caught = (f"{f['caught_up_after_trace_s']:.0f} s" if f["caught_up_after_trace_s"] is not None
                  else "not within the drain limit")
        output = "exact" if run["status"] == "ok" else "failed: " + "; ".join(run["problems"])[:200]
        lines.append(f"| {labels.get(run['kind'], run['kind'])} | {f['peak_lag']:,} | {zero} | {caught} "
                     f"| {f['rescales']} | {f['worker_seconds']:,} | {output} |")
    lines.append("")
    auto = next((r for r in d["runs"] if r["kind"] == "auto"), None)
    if auto is not None and auto["decisions"]:
        lines += ["The autoscaler's decisions, as `status.autoscaler.history` records them:", ""]
        lines += [f"- {x['direction']} {x['fromParallelism']} → {x['toParallelism']}: {x['reason']}"
                  for x in auto["decisions"]]
        lines.append("")
    if d.get("keda"):
        parts = [f"`lagThreshold: {k['threshold']}`: {k['changes']} changes, {k['worker_seconds']:,} "
                 "worker-seconds" for k in d["keda"]]
        lines += [
            "KEDA's Kafka scaler rule, `min(partitions, ceil(total lag / lagThreshold))`, evaluated on the "
            "autoscaled run's recorded lag (what it would have asked for at each second, not a run "
            "under it): " + "; ".join(parts) + ". It follows the lag itself, so it scales down as soon "
            "as a backlog shrinks, while the job is still catching up, and with its default threshold "
            "any lag above a few dozen records asks for every partition.",
            "",
        ]
    lines += ["![parallelism, lag and input rate over time](bench/results/autoscale.png)", ""]
    return lines


def nexmark_markdown(path: Path | None = None) -> list[str]:
    """The Nexmark-style queries of ``bench/nexmark.py`` beside Flink (its own run, its own JSON;
    from the full run's file: ``--quick`` writes ``nexmark-quick.json``)."""
    path = path or Path(__file__).parent / "results" / "nexmark.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    p, s = d["parameters"], d.get("summary", {})
    lines = [
        "## Nexmark-style queries",
        "",
        f"Three queries after [Nexmark](https://github.com/nexmark/nexmark) on {p['events']:,} JSON bids "
        f"(about {p['avg_event_bytes']:.0f} bytes each; {p['events_per_s_event_time']:,} bids per second "
        f"of event time, {p['auctions']:,} auctions of which {p['hot_auctions']} hot get half the bids, "
        f"{p['bidders']:,} bidders) in a {p['partitions']}-partition topic keyed by auction, on the same "
        "broker: weir as `weir run` workers (at-least-once) and Apache Flink as one DataStream job "
        "(MiniCluster, parallelism 1), each expressed the same way; the adaptations from Nexmark are in "
        "[bench/README.md](bench/README.md#nexmark-style-queries). events/s: bids over the time from the "
        "first record consumed to the last expected result readable; CPU µs/event: the processes' "
        "user + system CPU over that time (both stages of a chained weir query); peak RSS: `VmHWM` "
        "(summed over both stages). **Output checked**: every window's answer equals the reference "
        "computed in Python from the generator, none missing, extra or duplicated; a run that differs "
        f"is reported as failed and gives no figure. Medians of {p['repeat']} run(s) with the range; "
        f"run {d['started']} on commit `{d['git']}` with `{d['command']}`{_nexmark_load(d)}.",
        "",
        "| query | what it computes | weir events/s | Flink events/s | weir ÷ Flink | weir CPU µs/event "
        "| Flink CPU µs/event | weir / Flink peak RSS MiB | output |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for q, what in d.get("queries", {}).items():
        row = s.get(q, {})
        w, f = row.get("weir") or {}, row.get("flink") or {}
        problems = [
            f"{name} failed: " + "; ".join(r[q][key].get("problems") or [])[:160]
            for name, key in (("weir", "weir"), ("Flink", "flink"))
            for r in d.get("runs", [])
            if q in r and key in r[q] and r[q][key]["status"] != "ok"
        ][:2]
        ran = [x for x in (w, f) if x]
        windows = p.get("windows", {}).get(q)
        checked = "checked \u2713" + (f" ({windows:,} windows)" if windows else "")
        output = "; ".join(problems) if problems else (checked if ran else NA)
        rss = f"{_med(w.get('peak_rss_mib'))} / {_med(f.get('peak_rss_mib'))}"
        lines.append(
            f"| {q} | {what} | {_med(w.get('events_per_s'), ranged=True)} "
            f"| {_med(f.get('events_per_s'), ranged=True)} | {_ratio(row.get('weir_over_flink'))} "
            f"| {_med(w.get('cpu_us_per_event'), 2)} | {_med(f.get('cpu_us_per_event'), 2)} "
            f"| {rss} | {output} |"
        )
    for system, st in d.get("status", {}).items():
        if st != "ok":
            lines.append(f"\n{system}: {st}")
    lines.append("")
    return lines


def _nexmark_load(d: dict[str, Any]) -> str:
    """The 1-minute load averages after the runs, as a range (the machine is shared)."""
    loads = [
        r[q][system]["loadavg_after"][0]
        for r in d.get("runs", [])
        for q in r
        for system in r[q]
        if r[q][system].get("loadavg_after")
    ]
    if not loads:
        return ""
    cpus = d["machine"]["nproc"]
    return f" (1-minute load average after each run {min(loads):.1f}{NA}{max(loads):.1f} on {cpus} CPUs)"


def checkpoint_markdown(path: Path | None = None) -> list[str]:
    """The checkpoint figures of ``bench/checkpoint_bench.py`` (its own run, its own JSON)."""
    path = path or Path(__file__).parent / "results" / "checkpoint.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    mb = 1e6
    lines = [
        "## Checkpoints, restore and savepoints",
        "",
        f"One partition's RocksDB state against {d['store']}; run {d['when']} on commit `{d['commit']}` "
        f"with `{d['command']}` (load {d['machine']['loadavg'][0]:.1f}). Full: the first checkpoint "
        "(everything uploaded). Incremental: after changing 1 % of the keys (only new SST files go up). "
        "Stall: the part of a checkpoint the worker waits for (flush + RocksDB checkpoint); the upload "
        "runs in the background. Restore: download + size and sha256 check + open.",
        "",
        "| state | full checkpoint | 1 % change: uploaded | time | stall | restore | savepoint "
        "| savepoint restore |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for z in d["sizes"]:
        full, inc, rest, sp = z["full"], z["incremental_1pct"], z["restore"], z["savepoint"]
        lines.append(
            f"| {z['size_mb']} MB | {full['snapshot_seconds'] + full['upload_seconds']:.2f} s "
            f"({full['bytes_uploaded'] / mb:.1f} MB) | {inc['bytes_uploaded'] / mb:.2f} MB "
            f"({inc['bytes_uploaded'] / max(1, full['bytes_uploaded']):.1%}) "
            f"| {inc['snapshot_seconds'] + inc['upload_seconds']:.2f} s "
            f"| {inc['snapshot_seconds'] * 1000:.0f} ms "
            f"| {rest['seconds'] + rest['open_seconds']:.2f} s "
            f"| {sp['snapshot_seconds'] + sp['upload_seconds']:.2f} s | {sp['restore_seconds']:.2f} s |"
        )
    lines.append("")
    return lines


def rescale_markdown(path: Path | None = None) -> list[str]:
    """The rescale figures of ``bench/rescale_bench.py`` (its own run, its own JSON; like the
    checkpoint table, from the full run's file: ``--quick`` writes ``rescale-quick.json``)."""
    path = path or Path(__file__).parent / "results" / "rescale.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    p, sp = d["parameters"], d["savepoint"]
    lines = [
        "## Rescale through a savepoint",
        "",
        f"The benchmark's job (exactly-once, checkpoints every {p['checkpoint_interval_s']:g} s to "
        f"{d['store']}) as {p['from_workers']} `weir run` worker processes on a "
        f"{p['partitions']}-partition topic: {p['first_half']:,} events over {p['keys']:,} keys, then a "
        f"savepoint with stop through the workers' control API ({sp['entries']:,} open windows in "
        f"{sp['files']} files); then {p['second_half']:,} more events, and the savepoint restored into "
        "a new job of M workers (`--restore-from`, `--workers M`). Run "
        f"{d['when']} on commit `{d['commit']}` with `{d['command']}` (load "
        f"{d['machine']['loadavg_start'][0]:.1f} at the start, {d['machine']['loadavg'][0]:.1f} at the "
        "end).",
        "",
        "Savepoint: the request to every worker's answer; size: the savepoint's bytes in the store. "
        "Restore: the first worker process started to every worker ready (state downloaded and "
        "opened, transactions initialised); of which state: the longest "
        "`weir_restore_duration_seconds` of a worker (download and open alone). Caught up: started "
        "to the job's consumer group having committed the topic's end offsets (lag 0); events/s: "
        "the records after the savepoint over ready to caught up. **Output checked**: the "
        "read_committed output before the savepoint plus the restored job's equals the reference, "
        "every window once. A tumbling-window job's state is its open windows, so this savepoint is "
        "small and the restore is mostly process start-up; the checkpoint table above gives the "
        "restore rate of large state.",
        "",
        "| from → to workers | savepoint | size | restore | of which state | caught up | catch-up events/s "
        "| output |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in d["restores"]:
        head = f"| {p['from_workers']} → {r['workers']} "
        state = [v for v in r.get("restore_metric_seconds") or () if v is not None]
        if r["status"] != "ok":
            cell = "failed: " + "; ".join(r.get("problems") or [])[:200]
            lines.append(head + "| " + " | ".join([NA] * 6) + f" | {cell} |")
            continue
        lines.append(
            head + f"| {sp['seconds']:.2f} s | {sp['store_bytes'] / 1e6:.2f} MB "
            f"| {r['restore_seconds']:.2f} s | {_seconds(max(state)) if state else NA} "
            f"| {r['caught_up_seconds']:.2f} s "
            f"| {_num(r['catchup_events_per_s'])} | checked \u2713 |"
        )
    lines.append("")
    return lines


def memory_markdown(path: Path | None = None) -> list[str]:
    """The memory-budget figures of ``bench/memory_bench.py`` (its own runs, its own JSON)."""
    path = path or Path(__file__).parent / "results" / "memory.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    by_events = sorted(d.get("by_events", {}).values(), key=lambda r: r["events"])
    if not by_events:
        return []
    lines = [
        "## Memory budget",
        "",
        "One `weir run` worker, at-least-once, a 1-hour tumbling count + sum over N events with N "
        "distinct keys in a 4-partition topic, so all N windows are open until one end-of-input "
        "record per partition closes them at once. **budget**: `--memory-budget`; **unlimited**: "
        "everything in memory (no budget, `--max-cached-windows` above N). Peak RSS is the worker "
        "process's `VmHWM`, closing of all N windows included; events/s is N over the time from "
        "the first record consumed to the last of the N results readable in the sink topic. "
        "**Output checked**: every window exactly once with its count and sum. "
        "How it measures: `bench/memory_bench.py`'s docstring. The load is the machine's 1-minute "
        "load average at the start and the end of each run, on 2 CPUs shared with the broker and "
        "other work: the throughput of runs at different loads compares only roughly. The peak "
        "moves with the machine too: each row names the CPU it ran on.",
        "",
        "| N | run | peak RSS MiB | events/s | all results s | output | load (1 min) | command |",
        "|---:|---|---:|---:|---:|---|---|---|",
    ]
    for doc in by_events:
        cpu = doc.get("machine", {}).get("cpu_model", "machine not recorded")
        for r in doc["runs"]:
            what = f"budget {doc['budget']}" if r["kind"] == "budget" else "unlimited"
            ok = r["status"] == "ok"
            output = "checked \u2713" if ok else "failed: " + "; ".join(r.get("problems") or [])[:160]
            lines.append(
                f"| {doc['events']:,} | {what} | {r['peak_rss_mib']:,.0f} | {_num(r.get('events_per_s'))} "
                f"| {_num(r.get('all_results_s'), 1)} | {output} "
                f"| {r['loadavg_start'][0]:.1f} \u2192 {r['loadavg_end'][0]:.1f} "
                f"| `{doc['command']}` on `{doc['commit']}`, {cpu}, {doc['when']} |"
            )
    lines.append("")
    return lines


def _seconds(v: float) -> str:
    return f"{v:.2f} s"


def _unavailable_note(doc: dict[str, Any], k: str) -> str:
    st = doc["runners"][k]["status"]
    return "" if st == "ok" else f" *({st})*"


def _latency_section(
    doc: dict[str, Any], lat: dict[str, Any], labels: dict[str, str], keys: list[str]
) -> list[str]:
    cfg = doc["parameters"].get("latency")
    if not cfg:
        return []
    speed = cfg["speedup"]
    lines = [
        f"## End-to-end latency at {cfg['rate']:,.0f} events/s",
        "",
        f"A fresh topic per runner, fed live at {cfg['rate']:,.0f} events/s by the benchmark "
        f"while the runner runs; event time runs {speed:g}x faster than the wall clock (one "
        f"1-minute window every {60 / speed:g} s), so a short run closes many windows. Latency "
        "is, for every event, the time from the benchmark handing it to its producer to its "
        "window's result being readable in the result topic (read_committed), over the events "
        f"of the windows that opened and closed within the {cfg['seconds']:g} s measured "
        "(after a warm-up that ends with the runner's first result). **ideal** is what a runner "
        "with zero processing delay would show: the window's result at the moment its "
        "partition's event time first passes the window's end + 5 s. *Close delay* is, per "
        "window, the time from that moment to its result being readable: the runner's own part. "
        "CPU cores = CPU seconds per second during the measured interval.",
        "",
        "| runner | p50 s | p99 s | p50 ÷ weir | p99 ÷ weir | close delay p50 / p99 s | CPU cores | ÷ weir "
        "| windows | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ideal = next((r for r in lat.values() if r), None)
    if ideal:
        lines.append(
            f"| ideal | {_num(ideal['ideal_p50_s'], 3)} | {_num(ideal['ideal_p99_s'], 3)} | | | 0 | | | | |"
        )
    raw = doc.get("latency") or {}
    for k in keys:
        if k == "ceiling":
            continue
        r = lat.get(k)
        if not r:
            cell = _status_cell(doc, k)
            if raw.get(k) and raw[k].get("status") != "ok":
                cell = "failed: " + "; ".join(raw[k].get("problems") or [])[:200]
            lines.append(f"| {labels[k]} | " + " | ".join([NA] * 8) + f" | {cell} |")
            continue
        rr = raw[k]
        lines.append(
            f"| {labels[k]} | {_num(r['latency_p50_s'], 3)} | {_num(r['latency_p99_s'], 3)} "
            f"| {_fmt_ratio(r.get('latency_p50_s_over_weir'))} "
            f"| {_fmt_ratio(r.get('latency_p99_s_over_weir'))} "
            f"| {_num(r['close_delay_p50_s'], 3)} / {_num(r['close_delay_p99_s'], 3)} "
            f"| {_num(r['cpu_cores'], 2)} | {_fmt_ratio(r.get('cpu_cores_over_weir'))} "
            f"| {rr['windows_counted']:,} | load {rr['loadavg_after'][0]:.2f} |"
        )
    lines.append("")
    return lines


def _fmt_ratio(v: float | None) -> str:
    return NA if v is None else f"{v:.2f}"


def profile_markdown(profile: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    if profile.get("error"):
        return [
            "## Where a record's time goes (weir)",
            "",
            f"The profile failed at {profile['started']} on `{profile['git']}`: `{profile['error']}`.",
            "",
        ]
    stages = profile["stages"]["us_per_record"]
    lines = [
        "## Where a record's time goes (weir)",
        "",
        f"From the profile at {profile['started']} (commit `{profile['git']}`) on the first "
        f"{profile['events']:,} events of the same data. The CPU is shared with other work: read "
        "the shares, not the absolute µs.",
        "",
        "Stages timed separately on records already fetched into memory (process CPU time, no "
        f"profiler, best of {profile['stages']['repeat']}):",
        "",
        "| stage | µs/record |",
        "|---|---:|",
    ]
    for name, us in stages.items():
        lines.append(f"| {name} | {us:.2f} |")
    cp = profile["cprofile"]
    lines += [
        "",
        f"cProfile of `Worker.run()` against Kafka ({cp['wall_s']:.1f} s under the profiler): own and "
        "cumulative time per function divided by the number of records. The profiler inflates "
        "small functions several times.",
        "",
        "| function | calls | own µs/record | cumulative µs/record |",
        "|---|---:|---:|---:|",
    ]
    for row in cp["top"]:
        lines.append(
            f"| `{row['function']}` | {row['calls']:,} | {row['tottime_us']:.2f} | {row['cumtime_us']:.2f} |"
        )
    if cp.get("consume_with_records_us_per_record") is not None:
        lines += [
            "",
            "The worker's `consume` (`KafkaEdges.consume`: the native reader's batch consume and a "
            "look at the consumer's own queue) includes waiting: the "
            f"{cp['consume_with_records_calls']} calls that returned "
            f"records took {cp['consume_with_records_us_per_record']:.2f} µs/record; "
            f"{cp['consume_waiting_calls']} calls returned nothing and waited "
            f"{cp['consume_waiting_s']:.2f} s in all.",
        ]
    lines += ["", *limits_markdown(profile, doc), ""]
    return lines


def limits_markdown(profile: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """What limits weir today, in numbers from this run and its profile."""
    stages = list(profile["stages"]["us_per_record"].values())
    thr = doc["summary"]["throughput"]
    if len(stages) < 6 or "weir" not in thr or "ceiling" not in thr:
        return []
    accessors, loads, prepare, window, python_path, native_path = stages[:6]
    weir_cpu = thr["weir"]["cpu_us_per_event"]["median"]
    ceil_cpu = thr["ceiling"]["cpu_us_per_event"]["median"]
    # The same figure as the summary's "weir ÷ ceiling": the median of the runs' paired ratios.
    paired = doc["summary"].get("weir_over", {}).get("ceiling", {}).get("median")
    ratio = paired or thr["weir"]["events_per_s"]["median"] / thr["ceiling"]["events_per_s"]["median"]
    return [
        "### What limits weir today",
        "",
        f"- weir reaches {ratio:.2f}x the ceiling's events/s at {weir_cpu:.2f} CPU µs/event "
        f"(the ceiling: {ceil_cpu:.2f}, librdkafka's own threads included). The ceiling builds a "
        "`Message` per record in `consume` and decodes every value into a dict; weir reads each "
        "consumed batch where librdkafka put it (`weir_native.Fetch`: librdkafka's batch consume "
        "into the extension, without the GIL) and runs its whole job there.",
        f"- On records already in memory as confluent-kafka `Message`s the whole path costs "
        f"{native_path:.2f} µs/record with the native hot path, against {python_path:.2f} on the "
        f"Python path ({python_path / native_path:.1f}x) and {loads:.2f} for `orjson.loads` alone; "
        f"the Python path's parts: `prepare()` {prepare:.2f} µs, the window operator {window:.2f} "
        f"µs, the message accessors {accessors:.2f} µs (which the native reader does not call).",
        "- So what is left is librdkafka's fetching and lz4 decompression (its own threads) and "
        "the broker, on the same two cores as the job: more throughput per job comes from more "
        "partitions and workers on more cores.",
    ]


def main() -> int:
    """Rewrite BENCHMARKS.md from the last results (latest.json, profile-latest.json, checkpoint.json,
    rescale.json) without running anything: after ``checkpoint_bench.py`` or ``rescale_bench.py``."""
    results = Path(__file__).parent / "results"
    doc = json.loads((results / "latest.json").read_text())
    profile_path = results / "profile-latest.json"
    profile = json.loads(profile_path.read_text()) if profile_path.exists() else None
    out = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    out.write_text(markdown(doc, profile))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
