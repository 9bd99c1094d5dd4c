"""Nexmark-style queries on weir and Apache Flink: q5 hot items, q7 highest bid, q11 user sessions.

Usage (from the repository root, with the project's virtualenv; ``make bench-setup`` first)::

    .venv/bin/python bench/nexmark.py [--events N] [--partitions P] [--repeat R] [--quick]
                                      [--queries q5,q7,q11] [--runners weir,flink] [--bootstrap HOST:PORT]

Writes ``bench/results/nexmark.json`` (``--quick``: ``nexmark-quick.json``) and rewrites the
"Nexmark-style queries" section of ``BENCHMARKS.md`` through ``bench/report.py``. The exit
status is 1 when any run failed its output check. See bench/README.md ("Nexmark-style
queries") for the queries and how they differ from Nexmark's.

Data. N Nexmark ``Bid`` events as JSON (``auction``, ``bidder``, ``price`` in cents,
``channel``, ``url``, ``dateTime`` in epoch ms, ``extra``), a pure function of
``(N, seed)``, written once to a P-partition topic named after the parameters and keyed by
the auction (as the existing benchmark keys by product). Event time runs at
``EVENTS_PER_S`` bids per second (nominal ``BASE_TS + i / EVENTS_PER_S``) minus the same
``[0, 4 s)`` jitter as ``generate.py``, under the queries' 5 s bound, so no bid is late. Half
the bids go to a hot set of ``HOT_AUCTIONS`` auctions that moves every 20 s, the rest to any
of ``AUCTIONS``; bidders are uniform over ``BIDDERS``.

End of input: two rounds of end records (auction and bidder negative, price 0) in every
partition, ``END_GAP_MS`` and ``2 * END_GAP_MS`` after the last bid. The first round closes
every real window of a single-stage job; the second closes the first round's own windows, so a
two-stage job chained through a topic sees stage 1's end results and closes its last real
windows from the data alone too (see ``end_records`` and ``weir_jobs``). Results past the last
bid's time (the end records' windows) are ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import generate
import install
import measure
import orjson
import runners
from measure import log

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

NEXMARK_VERSION = 4
SEED = 42
BASE_TS = generate.BASE_TS
EVENTS_PER_S = 5_000  # bids per second of event time
AUCTIONS = 1_000
HOT_AUCTIONS = 10
HOT_PERIOD_MS = 20_000
BIDDERS = 20_000
FIRST_ID = 1_000  # Nexmark's ids start at 1000
BOUND_MS = generate.OUT_OF_ORDER_MS  # every query's out-of-orderness bound
DISORDER_MS = generate.DISORDER_MS
CHANNELS = ("Google", "Facebook", "Baidu", "Apple")

Q5_SIZE_MS, Q5_SLIDE_MS = 10_000, 2_000
Q7_SIZE_MS = 10_000
Q11_GAP_MS = 10_000
END_GAP_MS = 2 * 60_000
RUN_TIMEOUT_S = 900.0
PORTS = range(31100, 32000)  # this benchmark's worker and Flink REST ports


class Bid(NamedTuple):
    auction: int
    bidder: int
    price: int
    ts: int


# --------------------------------------------------------------------------- data


def topic_name(n: int, partitions: int, seed: int = SEED) -> str:
    return f"weir-nexmark-bids-v{NEXMARK_VERSION}-n{n}-p{partitions}-s{seed}"


def bids(n: int, seed: int = SEED) -> Iterator[tuple[Bid, bytes]]:
    """Yield ``(bid, json value)`` for each of the ``n`` bids, in production order."""
    rng = random.Random(seed)
    randrange, random_ = rng.randrange, rng.random
    dumps = orjson.dumps
    for i in range(n):
        nominal = BASE_TS + i * 1000 // EVENTS_PER_S
        if random_() < 0.5:
            hot_base = (nominal // HOT_PERIOD_MS) % (AUCTIONS // HOT_AUCTIONS) * HOT_AUCTIONS
            auction = FIRST_ID + hot_base + randrange(HOT_AUCTIONS)
        else:
            auction = FIRST_ID + randrange(AUCTIONS)
        bidder = FIRST_ID + randrange(BIDDERS)
        price = randrange(100, 100_000)
        ts = nominal - randrange(DISORDER_MS)
        channel = CHANNELS[randrange(len(CHANNELS))]
        value = dumps(
            {
                "auction": auction,
                "bidder": bidder,
                "price": price,
                "channel": channel,
                "url": f"https://www.nexmark.com/{channel.lower()}/item.htm?query=1&channel_id={randrange(10_000)}",
                "dateTime": ts,
                "extra": "",
            }
        )
        yield Bid(auction, bidder, price, ts), value


def horizon(n: int) -> int:
    """The last bid's nominal event time: no real window starts after it."""
    return BASE_TS + (n - 1) * 1000 // EVENTS_PER_S


def end_ids(partitions: int) -> list[int]:
    """Negative ids, the one at index p with a key (its decimal text) that librdkafka's default
    partitioner (CRC32 of the key) puts in partition p of a ``partitions``-partition topic."""
    out: dict[int, int] = {}
    i = -1
    while len(out) < partitions:
        out.setdefault(zlib.crc32(str(i).encode()) % partitions, i)
        i -= 1
    return [out[p] for p in range(partitions)]


def end_records(n: int, partitions: int) -> list[list[tuple[int, bytes, bytes]]]:
    """The two rounds of end records, each a list of ``(partition, key, value)``.

    In partition p the auction (and message key) is ``end_ids[p]``, so stage 1's end results
    land in partition p of a chained job's topic like the results of partition p's real
    auctions; the bidders are every one of ``end_ids``, so q11's end records reach every
    partition of its repartition topic.
    """
    ids = end_ids(partitions)
    rounds = []
    for r in (1, 2):
        ts = horizon(n) + r * END_GAP_MS
        rounds.append(
            [
                (
                    p,
                    str(ids[p]).encode(),
                    orjson.dumps(
                        {
                            "auction": ids[p],
                            "bidder": b,
                            "price": 0,
                            "channel": "-",
                            "url": "-",
                            "dateTime": ts,
                            "extra": "",
                        }
                    ),
                )
                for p in range(partitions)
                for b in ids
            ]
        )
    return rounds


def ensure_input(bootstrap: str, n: int, partitions: int, seed: int = SEED) -> str:
    """The input topic with exactly the ``n`` bids and the end records, written if it is not."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = topic_name(n, partitions, seed)
    ends = end_records(n, partitions)
    want = (partitions, n + sum(len(r) for r in ends))
    size = generate.topic_size(admin, bootstrap, topic)
    if size == want:
        log(f"reusing input topic {topic} ({n:,} bids)")
        return topic
    generate.create_topic(admin, topic, partitions)
    log(f"writing {n:,} bids to {topic} ...")
    started = time.monotonic()
    items = ((str(b.auction), b.ts, 0.0, v) for b, v in bids(n, seed))
    generate.produce(bootstrap, topic, items)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for records in ends:  # round by round: every partition's first round before any second
        for p, key, value in records:
            producer.produce(topic, value, key, partition=p)
        if producer.flush(60):
            raise RuntimeError(f"writing the end records of {topic} failed")
    size = generate.topic_size(admin, bootstrap, topic)
    if size != want:
        raise RuntimeError(f"{topic} holds {size} after writing, want {want}")
    log(f"wrote {n:,} bids in {time.monotonic() - started:.1f} s")
    return topic


# --------------------------------------------------------------------------- reference answers

Q5Result = tuple[int, tuple[int, ...]]  # (bids of the hottest auction(s), those auctions ascending)
Q7Result = tuple[int, int, int, int]  # (price, auction, bidder, dateTime)
Q11Result = tuple[int, int]  # (session window end = last bid + gap, bids)


def q5_reference(items: Iterable[Bid]) -> dict[int, Q5Result]:
    """Per sliding window (start ms; 10 s long, every 2 s): the largest number of bids one
    auction got in it and every auction with that many."""
    counts: dict[tuple[int, int], int] = {}
    for b in items:
        last = b.ts - b.ts % Q5_SLIDE_MS
        for start in range(last, b.ts - Q5_SIZE_MS, -Q5_SLIDE_MS):
            k = (start, b.auction)
            counts[k] = counts.get(k, 0) + 1
    best: dict[int, list[Any]] = {}
    for (start, auction), c in counts.items():
        cur = best.get(start)
        if cur is None or c > cur[0]:
            best[start] = [c, [auction]]
        elif c == cur[0]:
            cur[1].append(auction)
    return {s: (c, tuple(sorted(a))) for s, (c, a) in best.items()}


def q7_reference(items: Iterable[Bid]) -> dict[int, Q7Result]:
    """Per 10 s tumbling window (start ms): its highest bid; ties go to the lowest auction, then
    the lowest bidder, then the earliest dateTime."""
    best: dict[int, Q7Result] = {}
    for b in items:
        start = b.ts - b.ts % Q7_SIZE_MS
        cand = (b.price, b.auction, b.bidder, b.ts)
        cur = best.get(start)
        if cur is None or (cand[0], -cand[1], -cand[2], -cand[3]) > (cur[0], -cur[1], -cur[2], -cur[3]):
            best[start] = cand
    return best


def q11_reference(items: Iterable[Bid]) -> dict[tuple[int, int], Q11Result]:
    """Per bidder and session (bids no more than 10 s apart): ``(bidder, first bid ms) ->
    (last bid ms + 10 s, bids)``."""
    times: dict[int, list[int]] = {}
    for b in items:
        times.setdefault(b.bidder, []).append(b.ts)
    out: dict[tuple[int, int], Q11Result] = {}
    for bidder, ts_list in times.items():
        ts_list.sort()
        start = prev = ts_list[0]
        count = 0
        for t in ts_list:
            if t - prev > Q11_GAP_MS:
                out[(bidder, start)] = (prev + Q11_GAP_MS, count)
                start, count = t, 0
            prev = t
            count += 1
        out[(bidder, start)] = (prev + Q11_GAP_MS, count)
    return out


REFERENCES: dict[str, Callable[[Iterable[Bid]], dict[Any, Any]]] = {
    "q5": q5_reference,
    "q7": q7_reference,
    "q11": q11_reference,
}

QUERIES: dict[str, str] = {
    "q5": "hot items: bids per auction over 10 s sliding windows every 2 s, then per window the "
    "auction(s) with the most bids",
    "q7": "highest bid: the highest bid (price, auction, bidder) per 10 s tumbling window",
    "q11": "user sessions: bids per bidder per session window (10 s gap)",
}


def parse_result(query: str, r: dict[str, Any], last: int) -> tuple[Any, Any] | None:
    """A result record as ``(window, answer)`` comparable with the reference; None for the end
    records' own windows (starting after the last bid). Raises on a malformed record."""
    if query == "q11":
        bidder, start = int(r["key"]), int(r["windowStartMs"])
        if bidder < 0 or start > last:
            return None
        return (bidder, start), (int(r["windowEndMs"]), int(r["count"]))
    start = int(r["key"])
    if start > last:
        return None
    if query == "q5":
        hot = r["hot"]
        return start, (int(hot["count"]), tuple(int(a) for a in hot["auctions"]))
    best = r["best"]
    return start, (int(best[0]), int(best[1]), int(best[2]), int(best[3]))


# --------------------------------------------------------------------------- the jobs


def _stage(
    name: str, source: dict[str, Any], bound_ms: int, steps: list[dict[str, Any]], sink: str, bootstrap: str
) -> dict[str, Any]:
    return {
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "parallelism": 1,
            "kafka": {"bootstrapServers": bootstrap},
            "pipeline": {
                "source": {"format": "json", "startFrom": "earliest", **source},
                # No idleTimeout: the end records close every window, and a stage 2 marked idle
                # while stage 1 works would move its watermark to the wall clock.
                "watermark": {"maxOutOfOrderness": f"{bound_ms}ms"},
                "steps": steps,
                "sink": {"topic": sink},
                "deadLetter": {"topic": f"{sink}-dlq"},
            },
        },
    }


def weir_jobs(
    query: str, source: str, between: str, sink: str, bootstrap: str, run_id: str
) -> list[dict[str, Any]]:
    """The query as weir StreamJobs, as a user writes them: one job, or two chained through the
    one-partition topic ``between`` (stage 1's sink, stage 2's source).

    Stage 2 reads stage 1's results with their ``windowStartMs`` as event time. Stage 1 runs one
    task per input partition, each closing its windows on its own partition's event time, so
    across partitions its results are as far apart as one partition runs ahead of another (on a
    replay, up to the whole input). ``between`` therefore has as many partitions as the input: a
    result is keyed by its auction, so it lands in the partition of that auction's bids, written
    only by that partition's task, in window order. Stage 2's ``keyBy`` makes its windows'
    watermark the minimum over ``between``'s partitions (weir's watermark markers through the
    repartition topic), as Flink's is the minimum over its inputs.
    """
    bids_source = {"topics": [source], "eventTime": {"field": "dateTime", "format": "epochMillis"}}
    results_source = {"topics": [between], "eventTime": {"field": "windowStartMs", "format": "epochMillis"}}
    if query == "q5":
        return [
            _stage(
                f"nx5a-{run_id}",
                bids_source,
                BOUND_MS,
                [
                    {"keyBy": {"messageKey": True}},
                    {"window": {"type": "sliding", "size": f"{Q5_SIZE_MS}ms", "slide": f"{Q5_SLIDE_MS}ms"}},
                    {"aggregate": {"emit": "final", "outputs": {"count": {"fn": "count"}}}},
                ],
                between,
                bootstrap,
            ),
            _stage(
                f"nx5b-{run_id}",
                results_source,
                BOUND_MS,
                [
                    {"keyBy": {"field": "windowStartMs", "partitions": 1}},
                    {"window": {"type": "tumbling", "size": f"{Q5_SLIDE_MS}ms"}},
                    {
                        "aggregate": {
                            "emit": "final",
                            "outputs": {"hot": {"fn": "custom", "function": "nexmark_functions:HotItems"}},
                        }
                    },
                ],
                sink,
                bootstrap,
            ),
        ]
    if query == "q7":
        return [
            _stage(
                f"nx7a-{run_id}",
                bids_source,
                BOUND_MS,
                [
                    {"keyBy": {"messageKey": True}},
                    {"window": {"type": "tumbling", "size": f"{Q7_SIZE_MS}ms"}},
                    {
                        "aggregate": {
                            "emit": "final",
                            "outputs": {"best": {"fn": "custom", "function": "nexmark_functions:HighestBid"}},
                        }
                    },
                ],
                between,
                bootstrap,
            ),
            _stage(
                f"nx7b-{run_id}",
                results_source,
                BOUND_MS,
                [
                    {"keyBy": {"field": "windowStartMs", "partitions": 1}},
                    {"window": {"type": "tumbling", "size": f"{Q7_SIZE_MS}ms"}},
                    {
                        "aggregate": {
                            "emit": "final",
                            "outputs": {
                                "best": {
                                    "fn": "custom",
                                    "function": "nexmark_functions:HighestOf",
                                    "field": "best",
                                }
                            },
                        }
                    },
                ],
                sink,
                bootstrap,
            ),
        ]
    if query == "q11":
        return [
            _stage(
                f"nx11-{run_id}",
                bids_source,
                BOUND_MS,
                [
                    {"keyBy": {"field": "bidder"}},
                    {"window": {"type": "session", "gap": f"{Q11_GAP_MS}ms"}},
                    {"aggregate": {"emit": "final", "outputs": {"count": {"fn": "count"}}}},
                ],
                sink,
                bootstrap,
            ),
        ]
    raise ValueError(query)


def free_port() -> int:
    """A free port in this benchmark's range (31100-31999)."""
    start = random.randrange(len(PORTS))
    for i in range(len(PORTS)):
        port = PORTS[(start + i) % len(PORTS)]
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port in 31100-31999")


class Started(NamedTuple):
    procs: list[Any]  # run.Process
    ports: list[int]
    topics: list[str]  # to delete afterwards
    groups: list[str]


def start_weir(
    query: str, bootstrap: str, source: str, sink: str, work: Path, run_id: str, partitions: int
) -> Started:
    import run as bench_run
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    between = f"{sink}-between"
    jobs = weir_jobs(query, source, between, sink, bootstrap, run_id)
    topics = [between, *(j["spec"]["pipeline"]["deadLetter"]["topic"] for j in jobs)]
    for t in topics:
        generate.create_topic(admin, t, partitions if t == between else 1)
    guarantee = ["--guarantee", "at-least-once"] if "--guarantee" in runners.weir_run_flags() else []
    procs, ports = [], []
    env = {"PYTHONPATH": str(BENCH)}
    for i, job in enumerate(jobs):
        path = work / f"job{i + 1}.json"
        path.write_text(json.dumps(job, indent=2))
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "weir",
            "run",
            str(path),
            "--bootstrap-servers",
            bootstrap,
            "--state-dir",
            str(work / f"state{i + 1}"),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--log-level",
            "WARNING",
            *guarantee,
        ]
        procs.append(bench_run.Process(cmd, env, work / f"weir{i + 1}.log"))
        ports.append(port)
    groups = [f"weir-bench-{j['metadata']['name']}" for j in jobs]
    return Started(procs, ports, topics, groups)


def start_flink(
    query: str, bootstrap: str, source: str, sink: str, work: Path, run_id: str, partitions: int
) -> Started:
    import run as bench_run

    port = free_port()
    cmd = [
        "java",
        *runners.FLINK_JAVA_OPTS,
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=error",
        "-cp",
        install.flink_classpath(),
        "dev.weir.bench.NexmarkJob",
        "--query",
        query,
        "--bootstrap",
        bootstrap,
        "--input",
        source,
        "--output",
        sink,
        "--group",
        f"weir-nexmark-{run_id}",
        "--checkpoint-dir",
        str(work / "checkpoints"),
        "--checkpoint-interval-ms",
        "5000",
        "--rest-port",
        str(port),
    ]
    return Started([bench_run.Process(cmd, {}, work / "flink.log")], [port], [], [f"weir-nexmark-{run_id}"])


def weir_first_record(started: Started) -> float | None:
    return measure.weir_first_record(started.ports[:1])


def flink_first_record(started: Started) -> float | None:
    try:
        m = runners.MARKER.search(started.procs[0].log_path.read_bytes())
    except OSError:
        return None
    return int(m.group(1)) / 1000 if m else None


# --------------------------------------------------------------------------- one run


def verify(results: dict[Any, Any], expected: dict[Any, Any]) -> list[str]:
    problems = []
    missing = expected.keys() - results.keys()
    extra = results.keys() - expected.keys()
    if missing:
        problems.append(f"{len(missing)} windows missing, e.g. {sorted(missing)[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected windows, e.g. {sorted(extra)[:3]}")
    wrong = [k for k, v in expected.items() if k in results and results[k] != v]
    if wrong:
        examples = [f"{k}: got {results[k]}, want {expected[k]}" for k in sorted(wrong)[:3]]
        problems.append(f"{len(wrong)} windows with a wrong answer, e.g. {examples}")
    return problems


def run_once(
    system: str, query: str, bootstrap: str, source: str, n: int, expected: dict[Any, Any], partitions: int
) -> dict[str, Any]:
    """One run of ``query`` on ``system`` (weir or flink) until every expected answer is readable; checked."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    run_id = f"{datetime.now(UTC):%H%M%S}-{os.getpid()}-{time.monotonic_ns() % 100000}"
    work = Path(tempfile.mkdtemp(prefix=f"weir-nexmark-{system}-{query}-"))
    sink = f"weir-nexmark-out-{query}-{system}-{run_id}"
    generate.create_topic(AdminClient({"bootstrap.servers": bootstrap}), sink, 1)
    last = horizon(n)
    reader = measure.SinkReader(bootstrap, sink, lambda r: parse_result(query, r, last), expected)
    start = start_weir if system == "weir" else start_flink
    first = weir_first_record if system == "weir" else flink_first_record
    load_before = measure.loadavg()
    started = start(query, bootstrap, source, sink, work, run_id, partitions)
    procs = started.procs
    t_first = t_done = None
    failure = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            for p in procs:
                p.snapshot()
            if t_first is None:
                t_first = first(started)
            reader.poll(0.02 if t_first is None else 0.05)
            if t_first is not None and not reader.awaiting:
                t_done = max(reader.arrived[k] for k in expected)
                break
            dead = [p for p in procs if not p.alive()]
            if dead:
                failure = f"a process exited with {dead[0].exit_code}: {dead[0].tail(1500)}"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {RUN_TIMEOUT_S:.0f} s"
                break
        for p in procs:
            p.snapshot(every=0)
        if failure is None:
            reader.settle(0.5)  # a straggling duplicate or extra window shows up before judging
    finally:
        for p in procs:
            p.stop()
        reader.close()
    problems = [failure] if failure else []
    problems += verify(reader.results, expected)
    if reader.duplicates:
        problems.append(f"{reader.duplicates} duplicate results")
    if reader.malformed:
        problems.append(f"{len(reader.malformed)} malformed results, e.g. {reader.malformed[:2]}")
    if system == "weir":
        for t in started.topics:
            if t.endswith("-dlq") and (dead := measure.topic_records(bootstrap, t)):
                problems.append(f"{dead} records in the dead-letter topic {t}")
        problems += [
            f"worker {i + 1} exited with {p.exit_code} after SIGTERM"
            for i, p in enumerate(procs)
            if p.exit_code not in (0, None)
        ]
    if problems:
        return {
            "status": "failed",
            "problems": problems,
            "windows_read": len(reader.results),
            "kept": str(work),
            "log_tail": procs[0].tail(2000),
        }
    measure.delete_topics(bootstrap, [sink, *started.topics], started.groups, containing=run_id)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    assert t_first is not None and t_done is not None
    seconds = t_done - t_first
    cpu_s = sum(p.cpu.at(t_done) - p.cpu.at(t_first) for p in procs)
    return {
        "status": "ok",
        "records": n,
        "windows": len(expected),
        "seconds": seconds,
        "events_per_s": n / seconds,
        "cpu_s": cpu_s,
        "cpu_us_per_event": cpu_s / n * 1e6,
        # Per process (a chained weir query: stage 1, stage 2): where the CPU went.
        "cpu_s_per_process": [p.cpu.at(t_done) - p.cpu.at(t_first) for p in procs],
        "peak_rss_mib_per_process": [p.mem.get("peak_rss_mib", 0.0) for p in procs],
        # Both stages of a chained weir query run at once: their peaks add up.
        "peak_rss_mib": round(sum(p.mem.get("peak_rss_mib", 0.0) for p in procs), 1),
        "processes": len(procs),
        "loadavg_before": load_before,
        "loadavg_after": measure.loadavg(),
    }


# --------------------------------------------------------------------------- main


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per query and system: medians over the runs (only when every run passed), and weir ÷ Flink."""
    out: dict[str, Any] = {}
    for query in QUERIES:
        row: dict[str, Any] = {}
        for system in ("weir", "flink"):
            rs = [r[query][system] for r in runs if query in r and system in r[query]]
            if not rs:
                continue
            ok = [r for r in rs if r["status"] == "ok"]
            row[system] = {
                "status": "ok" if len(ok) == len(rs) else "failed",
                "runs": len(rs),
                "events_per_s": measure.stat([r["events_per_s"] for r in ok]),
                "cpu_us_per_event": measure.stat([r["cpu_us_per_event"] for r in ok]),
                "peak_rss_mib": measure.stat([r["peak_rss_mib"] for r in ok]),
            }
        if row.get("weir", {}).get("status") == "ok" and row.get("flink", {}).get("status") == "ok":
            ratios = [
                r[query]["weir"]["events_per_s"] / r[query]["flink"]["events_per_s"]
                for r in runs
                if query in r
            ]
            cpu = [
                r[query]["weir"]["cpu_us_per_event"] / r[query]["flink"]["cpu_us_per_event"]
                for r in runs
                if query in r
            ]
            row["weir_over_flink"] = measure.stat(ratios)
            row["weir_over_flink_cpu"] = measure.stat(cpu)
        if row:
            out[query] = row
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench/nexmark.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--events", type=int, help="bids in the input topic (default 2,000,000; --quick 200,000)"
    )
    parser.add_argument("--partitions", type=int, default=4, help="input topic partitions (4)")
    parser.add_argument("--repeat", type=int, help="runs of each query on each system (default 2; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="200,000 bids, 1 run, nexmark-quick.json")
    parser.add_argument("--queries", default="q5,q7,q11", help="comma-separated subset of q5,q7,q11")
    parser.add_argument("--runners", default="weir,flink", help="comma-separated subset of weir,flink")
    parser.add_argument("--bootstrap", help="use this broker instead of starting the test harness's")
    parser.add_argument(
        "--out", help="result file (default bench/results/nexmark.json; --quick nexmark-quick.json)"
    )
    args = parser.parse_args(argv)
    n = args.events or (200_000 if args.quick else 2_000_000)
    repeat = args.repeat or (1 if args.quick else 2)
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    systems = [s.strip() for s in args.runners.split(",") if s.strip()]
    if set(queries) - set(QUERIES) or set(systems) - {"weir", "flink"}:
        parser.error("--queries from q5,q7,q11; --runners from weir,flink")
    out = Path(args.out) if args.out else RESULTS / ("nexmark-quick.json" if args.quick else "nexmark.json")
    status = {s: "ok" for s in systems}
    if "flink" in systems:
        reason = runners.Flink().unavailable()
        if reason:
            status["flink"] = f"unavailable: {reason}"
            log(f"flink: {reason}")
    active = [s for s in systems if status[s] == "ok"]

    import report
    import run as bench_run

    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    bootstrap, kafka_version = (
        (args.bootstrap, bench_run.broker_version(args.bootstrap)) if args.bootstrap else bench_run.kafka_up()
    )
    log(f"broker {bootstrap} (Kafka {kafka_version}); load average {measure.loadavg()}")
    source = ensure_input(bootstrap, n, args.partitions)
    expected: dict[str, dict[Any, Any]] = {}
    for q in queries:
        t = time.monotonic()
        expected[q] = REFERENCES[q](b for b, _ in bids(n))
        log(f"reference {q}: {len(expected[q]):,} windows ({time.monotonic() - t:.1f} s)")
    sample = min(n, 20_000)
    avg_bytes = sum(len(v) for _, v in bids(sample)) / sample

    failed = False
    runs: list[dict[str, Any]] = []
    for i in range(repeat):
        run: dict[str, Any] = {}
        for q in queries:
            run[q] = {}
            for s in active:
                res = run_once(s, q, bootstrap, source, n, expected[q], args.partitions)
                run[q][s] = res
                failed |= res["status"] != "ok"
                if res["status"] == "ok":
                    log(
                        f"run {i + 1}/{repeat} {q} {s}: {res['events_per_s']:,.0f} events/s, "
                        f"{res['cpu_us_per_event']:.2f} CPU µs/event, {res['peak_rss_mib']:.0f} MiB, "
                        f"load {res['loadavg_after']}"
                    )
                else:
                    log(f"run {i + 1}/{repeat} {q} {s}: FAILED: {'; '.join(res['problems'])[:600]}")
        runs.append(run)

    doc: dict[str, Any] = {
        "started": started,
        "command": ".venv/bin/python bench/nexmark.py" + ("" if not argv else " " + " ".join(argv)),
        "git": measure.git_commit(),
        "parameters": {
            "events": n,
            "partitions": args.partitions,
            "repeat": repeat,
            "topic": source,
            "avg_event_bytes": avg_bytes,
            "seed": SEED,
            "generator_version": NEXMARK_VERSION,
            "events_per_s_event_time": EVENTS_PER_S,
            "auctions": AUCTIONS,
            "hot_auctions": HOT_AUCTIONS,
            "bidders": BIDDERS,
            "out_of_orderness_ms": BOUND_MS,
            "disorder_ms": DISORDER_MS,
            "windows": {q: len(expected[q]) for q in queries},
        },
        "queries": {q: QUERIES[q] for q in queries},
        "status": status,
        "machine": measure.machine(),
        "versions": {
            "kafka_broker": kafka_version,
            **(runners.Flink().versions() if "flink" in active else {}),
        },
        "runs": runs,
    }
    doc["summary"] = summarise(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    bench_run.write_atomic(out, json.dumps(bench_run.no_nan(doc), indent=2) + "\n")
    if not args.quick and not args.out and (RESULTS / "latest.json").exists():
        report.main()  # BENCHMARKS.md with the section from this nexmark.json
    log(f"wrote {out}" + ("; SOME RUNS FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
