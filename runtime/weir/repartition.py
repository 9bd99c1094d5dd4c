"""The repartition topic's record format: how stage 1 forwards a prepared record and stage 2
reads it back.

When ``pipeline.stages().repartition`` is set, stage 1 runs ``prepare`` (``weir.records``) and
forwards each result with ``encode_forward`` (message key = group key, value = the JSON array
``[event_time_ms, record]``); stage 2 reads the repartition topic with
``prepare_repartitioned``, which returns the same triple without re-checking. The event time
travels in the value rather than the Kafka timestamp so that it does not depend on the topic's
timestamp type or on time-based retention of old event times. (Watermark markers, records
with a null key, share the topic: ``weir.core`` tells them apart before this is called.)
"""

from __future__ import annotations

from typing import Any

import orjson

from weir.records import DeadLetter, Prepared, _decode_error, _decode_key

__all__ = ["encode_forward", "prepare_repartitioned"]


def encode_forward(group_key: str, event_time_ms: int, record: dict[str, Any]) -> tuple[bytes, bytes]:
    """Message key and value with which stage 1 forwards a prepared record to the
    repartition topic; ``prepare_repartitioned`` reads them back."""
    return group_key.encode(), orjson.dumps((event_time_ms, record))


def prepare_repartitioned(value: bytes | None, key: bytes | None, kafka_ts_ms: int) -> Prepared:
    """Stage 2's prepare: read a record written by ``encode_forward``.

    Stage 1 has already filtered and checked it, so nothing is re-validated except the
    framing; ``kafka_ts_ms`` is ignored (the event time is in the value). Raises
    ``DeadLetter`` (``decode_error``/``not_an_object``/``bad_key``) only for records that
    were not written by ``encode_forward``.
    """
    if value is None:
        raise DeadLetter("not_an_object", "the value is null (a tombstone)")
    try:
        event_time, record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(exc) from None
    except (TypeError, ValueError):
        raise DeadLetter("not_an_object", "not an [event_time, record] pair") from None
    if event_time.__class__ is not int or record.__class__ is not dict:
        raise DeadLetter("not_an_object", "not an [event_time, record] pair")
    return ("" if key is None else _decode_key(key)), event_time, record
