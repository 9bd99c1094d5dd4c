"""The worker control API's payloads: what ``GET /status`` answers and ``POST /savepoint`` carries.

These models are the one contract between the runtime, which builds and serves them (``weir.worker``,
``weir.control``), and the operator, which reads them (``weir_operator.workers``). The JSON is
camelCase, as the spec and the StreamJob status are.

Compatibility across weir versions, because a rolling upgrade runs an operator and workers of
different versions side by side:

- Reading ignores unknown keys, so an older operator reads a newer worker's answers.
- Every field that is not essential to the payload's meaning has a default, so a newer operator
  reads an older worker that does not send it yet. A field added later must have a default.
- :class:`SavepointRequest` is the one exception: it rejects unknown keys. A misspelt
  ``"stpo": true`` must not take a savepoint and leave the job running when the operator meant to
  stop it.

Parsing bad input raises :class:`ControlPayloadError` with one line naming the field path, e.g.
``savepoint request: stop: must be true or false (got 'yes')``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeAlias, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError
from pydantic.alias_generators import to_camel

from weir.spec import format_validation_error

__all__ = [
    "WIRE_MODEL_CONFIG",
    "CheckpointStatus",
    "ControlPayloadError",
    "MemoryStatus",
    "OutageStatus",
    "PartitionStatus",
    "SavepointAnswer",
    "SavepointRequest",
    "Timestamp",
    "WorkerStatus",
    "parse",
]


def _iso_ms(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Timestamp: TypeAlias = Annotated[AwareDatetime, PlainSerializer(_iso_ms, return_type=str, when_used="json")]
"""An instant with a time zone; on the wire ISO-8601 UTC with milliseconds (``2026-01-01T00:00:05.123Z``),
the form workers wrote before the models existed."""


WIRE_MODEL_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    extra="ignore",
    frozen=True,
    use_attribute_docstrings=True,
    allow_inf_nan=False,
)
"""How a model read from another process is configured: frozen, camelCase on the wire, unknown
keys ignored on reading (a newer writer's fields). The operator's StreamJob status models use it too."""


class _Payload(BaseModel):
    """Base of the payloads (``WIRE_MODEL_CONFIG``)."""

    model_config = WIRE_MODEL_CONFIG

    def to_json(self) -> bytes:
        """The wire form: camelCase keys, ``None`` kept as ``null`` (readers tell "unknown" from absent)."""
        return self.model_dump_json(by_alias=True).encode()


class PartitionStatus(_Payload):
    """One input partition (one task) of the worker."""

    partition: str
    """Its label, ``<topic>-<partition>``."""
    offset: int
    """The next offset the worker reads (-1 before it has a position)."""
    lag: int | None = None
    """Records between ``offset`` and the partition's end; None when the broker has not said."""
    watermark: int | None = None
    """Its event-time watermark, epoch milliseconds; None before the first record."""
    watermark_lag_ms: int | None = None
    """Wall-clock now minus ``watermark``, milliseconds (event-time lag)."""
    idle: bool = False
    """Whether the partition is idle and no longer holds the watermark back."""
    records: int = 0
    """Records read from it since the worker started."""
    late: int = 0
    """Records that arrived after their window closed (dead-lettered as late)."""
    open_windows: int = 0
    """Windows open in its state."""


class CheckpointStatus(_Payload):
    """The worker's last completed checkpoint (or savepoint: ``kind`` says which)."""

    id: Annotated[str, Field(min_length=1)]
    completed_at: Timestamp
    """When its commit completed."""
    kind: Literal["checkpoint", "savepoint"] = "checkpoint"
    url: str | None = None
    """Where this worker's part of it is in the store."""
    duration_seconds: float | None = None
    """Snapshot to commit, seconds."""
    bytes: int | None = None
    """Its total size."""
    bytes_uploaded: int | None = None
    """What this checkpoint uploaded (an incremental checkpoint shares the rest)."""


class OutageStatus(_Payload):
    """A dependency (``kafka``, ``store``) the worker cannot reach right now."""

    error: str
    """The error that started the outage."""
    seconds: float = 0.0
    """How long it has lasted."""
    since: Timestamp | None = None
    """When it started."""
    last_error: str | None = None
    """The latest error seen during it."""
    outages: int = 0
    """Outages of this dependency since the worker started."""


class MemoryStatus(_Payload):
    """What the worker's memory holds, by part, against its budget."""

    rss_bytes: int
    """The process's resident set size."""
    used_bytes: dict[str, int] = Field(default_factory=dict)
    """Bytes used now per part (``window_cache``, ``timers``, ``rocksdb``, ``kafka_queues``);
    estimates for the Python parts."""
    budget_bytes: int | None = None
    """The memory budget (``WEIR_MEMORY_BUDGET``); None without one."""
    share_bytes: dict[str, int] | None = None
    """Each part's share of the budget; None without one."""


class SavepointRequest(_Payload):
    """``POST /savepoint``'s body. Idempotent by ``id``: the same id answers the same savepoint."""

    # Strict: lax parsing would read ``"stop": "no"`` as a string that pydantic turns into False and
    # ``"stop": "yes"`` into True; a request is written by a program, so a wrong type is a bug to report.
    model_config = ConfigDict(extra="forbid", strict=True)

    id: Annotated[str, Field(min_length=1)]
    """Names the request (and the savepoint's directory)."""
    path: Annotated[str, Field(min_length=1)] | None = None
    """Where to write it; None: ``<store>/<namespace>/<job>/savepoints/<id>``."""
    stop: bool = False
    """Whether the worker exits once the savepoint is complete."""


class SavepointAnswer(_Payload):
    """``POST /savepoint``'s answer: this worker's part of the savepoint."""

    id: Annotated[str, Field(min_length=1)]
    status: str
    """``completed``; any other value means not (yet) usable. A string rather than a fixed set so
    an older operator reads a state a newer worker adds, and treats it as not completed."""
    path: str | None = None
    """This worker's part: ``<savepoint>/w<index>``."""
    bytes: int | None = None
    """Its size."""
    offsets: dict[str, int] = Field(default_factory=dict)
    """The next offset of each input partition it holds, by partition label."""

    @property
    def completed(self) -> bool:
        return self.status == "completed"


class WorkerStatus(_Payload):
    """``GET /status``: a snapshot the worker loop publishes every watermark interval."""

    job: str | None = None
    """``<namespace>/<name>`` of the job."""
    worker: int | None = None
    """This worker's index."""
    workers: int | None = None
    """The job's parallelism as this worker was configured."""
    ready: bool = False
    not_ready_reason: str | None = None
    input_partitions: dict[str, Annotated[int, Field(ge=0)]] | None = None
    """Partition count of each input topic the worker reads; None from workers that do not say."""
    partitions: tuple[PartitionStatus, ...] = ()
    """The partitions assigned to this worker."""
    outages: dict[str, OutageStatus] = Field(default_factory=dict)
    """Dependencies unreachable now, by name; empty when all are reachable."""
    rollbacks: int = 0
    """Transactions rolled back since start."""
    published_at: int | None = None
    """When the loop published this snapshot, epoch milliseconds: a reader distrusts an old one."""
    busy_ratio: Annotated[float, Field(ge=0)] | None = None
    """Fraction of the last seconds the loop was busy processing, 0-1."""
    busy_ratio_since_start: float | None = None
    records_per_second: Annotated[float, Field(ge=0)] | None = None
    """Records processed per second over the last seconds."""
    records_in: int = 0
    first_record_at: int | None = None
    """When this worker first consumed a record since it started, epoch milliseconds (its
    status is published at once then, not at the next interval); None before."""
    records_out: int = 0
    dead_lettered: dict[str, int] = Field(default_factory=dict)
    """Records sent to the dead-letter topic, by reason."""
    producer_queue_full: int = 0
    """Times the producer's queue was full and the loop waited."""
    guarantee: str | None = None
    """``exactly-once`` or ``at-least-once``."""
    last_checkpoint: CheckpointStatus | None = None
    last_savepoint: SavepointAnswer | None = None
    memory: MemoryStatus | None = None


_P = TypeVar("_P", bound=_Payload)

_NAMES: dict[type[_Payload], str] = {
    WorkerStatus: "worker status",
    SavepointRequest: "savepoint request",
    SavepointAnswer: "savepoint answer",
}


class ControlPayloadError(ValueError):
    """A control API payload that does not fit its model; the message is one line with field paths."""


def parse(model: type[_P], data: bytes | str | Mapping[str, object] | object) -> _P:
    """``data`` (JSON text or an already decoded value) as ``model``, or :class:`ControlPayloadError`.

    The error's message names the payload and each bad field's path, joined on one line:
    ``savepoint request: id: required field is missing``.
    """
    try:
        if isinstance(data, bytes | str):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc).replace("\n", "; ")
        raise ControlPayloadError(f"{_NAMES.get(model, model.__name__)}: {problems}") from None
