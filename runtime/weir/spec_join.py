"""The ``join`` step: a stream-table temporal join with a Kafka topic read as a versioned table.

Where it goes (checked by ``weir.spec_pipeline``): in the keyed stage, after the keyBy step
(if any) and after every filter/select/rename/map/flatMap, before the window or process step
(or last, before the sink). Why there:

- the join keeps state per stream partition task (the table's versions, the held stream
  records: ``weir.join``), and only the keyed stage has per-task state that checkpoints and
  savepoints carry; the steps before it are stateless;
- ``copartitioned`` mode needs the stream partitioned by the join key, as Flink's temporal
  join needs a keyed stream: stream partition ``p`` joins table partition ``p``, so the
  lookup key is the keyed stage's key (the keyBy field through its repartition topic, the
  source key, or the Kafka message key) and the table must have as many partitions as the
  stream and be partitioned like it: like the source topic's producer for a message key, like
  weir's repartition topic after keyBy (librdkafka's default partitioner, CRC32 of the key,
  unless ``kafka.producer.partitioner`` says otherwise; Java producers use murmur2, which
  ``partitioner: murmur2_random`` matches);
- ``global`` mode keeps the whole table in every task, so it may look up by any field of the
  record (``key``): one keyed stage can join a catalog by product and segments by user.

The models carry no join logic: ``weir.join`` is the operator.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import Field, model_validator

from weir.spec_common import Duration, FieldName, LocatedError, SpecModel, TopicName

__all__ = ["DEFAULT_RETENTION_MS", "Join", "JoinMode"]

JoinMode: TypeAlias = Literal["global", "copartitioned"]

DEFAULT_RETENTION_MS = 86_400_000
"""One day of table history (and of stream lateness) unless ``retention`` says otherwise."""


def _absent(value: object) -> bool:
    """Left out of dumps while unset, so the default stays the watermark's (not a copy of it)."""
    return value is None


class Join(SpecModel):
    """Join each record with the value a table topic held for its key at the record's event
    time (``FOR SYSTEM_TIME AS OF``); tombstones delete a key."""

    topic: TopicName
    """The table topic (typically compacted): Kafka key -> latest value, JSON objects."""
    key: FieldName | None = None
    """Record field whose value (string or integer) is the table key; omitted means the record's
    key in the keyed stage. ``global`` mode only: ``copartitioned`` joins on the stream's key."""
    mode: JoinMode = "global"
    """``global``: every task reads every table partition and holds the whole table, read to the
    topic's end before the stream is joined (for catalogs, segments). ``copartitioned``: stream
    partition ``p`` reads table partition ``p`` only (for large tables partitioned like the
    stream)."""
    kind: Literal["inner", "left"] = "inner"
    """``inner``: a record with no table value at its event time is dead-lettered (``join_miss``);
    ``left``: it goes on with the listed fields null."""
    fields: Annotated[tuple[FieldName, ...], Field(min_length=1)]
    """The table value's fields added to each record (as ``prefix`` + field; a field the value
    lacks is null). Required: a left miss must know which fields to null."""
    prefix: str = ""
    """Prepended to each added field's name; a name equal to a record field overwrites it."""
    grace: Duration = 0
    """How far a table update may trail its partition's newest update and still change
    lookups at its own time; later ones apply to later lookups only (counted)."""
    retention: Duration = DEFAULT_RETENTION_MS
    """How much table history lookups may reach behind the table's and the stream's time; a
    record older than the stream's time minus this is dead-lettered (``late``)."""
    idle_timeout: Duration | None = Field(default=None, exclude_if=_absent)
    """A table partition read to its end and quiet this long stops holding records back until
    its next update (a rarely updated catalog would otherwise hold each record until the next
    update); omitted means ``watermark.idleTimeout``; 0 never (exact as-of results whatever
    the timing, but a quiet table stops the join)."""
    format: Literal["json"] = "json"
    """How table values are decoded: ``json`` objects (others are dead-lettered, and skipped)."""

    @model_validator(mode="after")
    def _consistent(self) -> Join:
        if len(set(self.fields)) != len(self.fields):
            raise LocatedError(("fields",), "lists a field twice")
        if self.mode == "copartitioned" and self.key is not None:
            raise LocatedError(
                ("key",),
                "only applies to mode global: a copartitioned join looks up the stream's key "
                "(key the stream with keyBy instead)",
            )
        return self

    def output_names(self) -> tuple[str, ...]:
        """The fields the join adds to each record, in order."""
        return tuple(self.prefix + f for f in self.fields)
