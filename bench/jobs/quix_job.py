"""The benchmark job on Quix Streams; runs in its own virtualenv (~/.cache/weir/bench/venv-quix).

1-minute tumbling windows on the ``ts`` field, count and sum of ``price`` per message key,
5 s grace, windows closed per partition (``closing_strategy="partition"``: the partition's
event time closes every key's windows, as weir's and Flink's per-partition watermarks do),
JSON results to the output topic. At-least-once, Quix's default state (RocksDB with
changelog topics) and commit interval. Prints ``WEIR_BENCH_FIRST_RECORD_MS=<epoch ms>``
when the first record is read. Runs until SIGTERM.

    python quix_job.py BOOTSTRAP INPUT OUTPUT GROUP STATE_DIR CONSUMER_EXTRA_JSON
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from quixstreams import Application
from quixstreams.dataframe.windows import Count, Sum


def main(argv: list[str]) -> None:
    bootstrap, source, sink, group, state_dir, extra = argv
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        processing_guarantee="at-least-once",
        consumer_extra_config=json.loads(extra),
        loglevel="WARNING",
    )
    first = [True]

    def event_time(value: Any, headers: Any, timestamp: int, timestamp_type: Any) -> int:
        if first[0]:
            first[0] = False
            print(f"WEIR_BENCH_FIRST_RECORD_MS={int(time.time() * 1000)}", flush=True)
        return int(value["ts"])

    events = app.topic(
        source, value_deserializer="json", key_deserializer="str", timestamp_extractor=event_time
    )
    results = app.topic(sink, value_serializer="json", key_serializer="str")
    sdf = app.dataframe(events)
    sdf = (
        sdf.tumbling_window(duration_ms=60_000, grace_ms=5_000)
        .agg(count=Count(), revenue=Sum("price"))
        .final(closing_strategy="partition")
    )
    sdf = sdf.apply(
        lambda w, key, timestamp, headers: {
            "key": key,
            "windowStartMs": w["start"],
            "windowEndMs": w["end"],
            "count": w["count"],
            "revenue": w["revenue"],
        },
        metadata=True,
    )
    sdf.to_topic(results)
    app.run()


if __name__ == "__main__":
    main(sys.argv[1:])
