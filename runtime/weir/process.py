"""Keyed process functions: user classes with typed keyed state and event-time timers, and their operator.

The user API is Flink's ``KeyedProcessFunction`` made Pythonic::

    class Dedup(weir.ProcessFunction):
        def open(self, state: weir.KeyedState) -> None:
            self.seen = state.map("seen", ttl="1h")
        def process(self, record, ctx):
            if self.seen.get(record["id"]) is None:
                self.seen.put(record["id"], ctx.timestamp)
                yield record

``process`` and ``on_timer`` may return a dict, a list of dicts, ``None``, or yield dicts.

Semantics (what ``ProcessOperator`` guarantees):

- State handles declared in ``open`` are bound to the record's key before each call.
- A call is all or nothing: if user code raises, every state change and timer change it made
  is undone and its outputs are dropped; the record is dead-lettered (``FunctionError``) or,
  with ``onError: fail``, the worker stops (``FunctionFailed``). A state value that cannot be
  encoded (``weir.functions.encode_state``) is such an exception.
- TTL is measured in event time so replays are deterministic: an entry written by a call at
  event time ``t`` (the record's timestamp, or the timer's) expires once the watermark reaches
  ``t + ttl``; from then on it reads as absent. Expired entries are removed when read and by
  ``advance`` once the watermark passes their expiry. Every write restarts the TTL.
- Timers are event-time: one per ``(key, timestamp)``, fired by ``advance`` once the watermark
  reaches the timestamp, in ``(timestamp, key)`` order. A timer registered at or below the
  current watermark fires at the next ``advance`` (or later in the same one, when ``on_timer``
  registered it).
- Records are never late for a process function (as in Flink): ``ctx.watermark`` tells.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

from weir.functions import (
    FunctionError,
    FunctionFailed,
    FunctionNotFound,
    decode_state,
    encode_state,
    load_function,
)
from weir.process_store import MISSING, NEVER, ProcessStore, key_prefix, state_suffix
from weir.spec import parse_duration

if TYPE_CHECKING:
    from weir.rocksdb_options import RocksMemory

__all__ = [
    "Context",
    "KeyedState",
    "ListState",
    "MapState",
    "OnError",
    "Output",
    "ProcessFunction",
    "ProcessOperator",
    "Timers",
    "ValueState",
    "open_process",
]

OnError = Literal["deadLetter", "fail"]
Outputs: TypeAlias = "dict[str, Any] | Iterable[dict[str, Any]] | None"

NO_WATERMARK = -(2**63)


class Timers:
    """The current key's event-time timers (``ctx.timers``)."""

    __slots__ = ("_op",)

    def __init__(self, op: ProcessOperator) -> None:
        self._op = op

    def register(self, timestamp: int) -> None:
        """Fire ``on_timer(timestamp, ctx)`` for this key once the watermark reaches ``timestamp``
        (registering the same timestamp again is a no-op)."""
        self._op._register(_timestamp(timestamp))

    def delete(self, timestamp: int) -> None:
        """Cancel this key's timer at ``timestamp`` (no-op when there is none)."""
        self._op._delete(_timestamp(timestamp))


class Context:
    """What a call knows: the record's ``key`` and ``timestamp`` (the timer's in ``on_timer``),
    the partition's ``watermark`` and the key's ``timers``."""

    __slots__ = ("key", "timers", "timestamp", "watermark")

    def __init__(self, timers: Timers) -> None:
        self.key = ""
        self.timestamp = 0
        self.watermark = NO_WATERMARK
        self.timers = timers


class ProcessFunction:
    """Base class of a keyed process step; one instance per partition task.

    Override ``process`` (required), and ``open`` and ``on_timer`` as needed. Keep per-key data
    in the state handles ``open`` declares, never in plain attributes: only state is
    checkpointed, restored and undone when a call raises.
    """

    def open(self, state: KeyedState) -> None:
        """Declare state handles; called once per task before any record."""

    def process(self, record: dict[str, Any], ctx: Context) -> Outputs:
        """Handle one record of ``ctx.key``; return or yield output records (dicts)."""
        raise NotImplementedError(f"{type(self).__name__} must define process(record, ctx)")

    def on_timer(self, timestamp: int, ctx: Context) -> Outputs:
        """Handle this key's timer at ``timestamp`` (the watermark has reached it)."""
        return None


class _State:
    """A state handle: a name and kind, bound to whatever key the operator is calling for."""

    __slots__ = ("_op", "_suffix", "_ttl")
    _KIND = b""

    def __init__(self, op: ProcessOperator, name: str, ttl_ms: int | None) -> None:
        self._op = op
        self._suffix = state_suffix(self._KIND, name)
        self._ttl = ttl_ms

    def _key(self) -> bytes:
        return self._op._entry_key(self._suffix)

    def _expires_at(self) -> int:
        return NEVER if self._ttl is None else self._op._ctx.timestamp + self._ttl


class ValueState(_State):
    """One value per key (``None`` when unset or expired)."""

    __slots__ = ()
    _KIND = b"v"

    def get(self) -> Any:
        value = self._op._store_().get_entry(self._key(), self._op._ctx.watermark)
        return None if value is MISSING else value

    def set(self, value: Any) -> None:
        self._op._store_().put_entry(self._key(), value, self._expires_at())

    def clear(self) -> None:
        self._op._store_().delete_entry(self._key())


class ListState(_State):
    """A list per key, stored as one value (each ``append`` rewrites it: keep lists short)."""

    __slots__ = ()
    _KIND = b"l"

    def get(self) -> list[Any]:
        value = self._op._store_().get_entry(self._key(), self._op._ctx.watermark)
        return [] if value is MISSING else list(value)

    def append(self, value: Any) -> None:
        items = self.get()
        items.append(value)
        self._op._store_().put_entry(self._key(), items, self._expires_at())

    def clear(self) -> None:
        self._op._store_().delete_entry(self._key())


class MapState(_State):
    """A map per key; map keys are compared by their encoding (``1`` and ``"1"`` differ),
    ``items()``/``keys()`` come in the order of that encoding. TTL applies per map entry."""

    __slots__ = ()
    _KIND = b"m"

    def get(self, key: Any, default: Any = None) -> Any:
        value = self._op._store_().get_entry(self._key() + encode_state(key), self._op._ctx.watermark)
        return default if value is MISSING else value

    def put(self, key: Any, value: Any) -> None:
        self._op._store_().put_entry(self._key() + encode_state(key), value, self._expires_at())

    def remove(self, key: Any) -> None:
        self._op._store_().delete_entry(self._key() + encode_state(key))

    def items(self) -> list[tuple[Any, Any]]:
        entries = self._op._store_().map_entries(self._key(), self._op._ctx.watermark)
        return [(decode_state(k), v) for k, v in entries]

    def keys(self) -> list[Any]:
        return [k for k, _v in self.items()]

    def clear(self) -> None:
        store = self._op._store_()
        prefix = self._key()
        for k, _v in store.map_entries(prefix, self._op._ctx.watermark):
            store.delete_entry(prefix + k)


class KeyedState:
    """Declares state handles in ``ProcessFunction.open``; ``ttl`` is a duration (``"1h"``) or ms."""

    def __init__(self, op: ProcessOperator) -> None:
        self._op = op
        self._names: set[str] = set()
        self.sealed = False

    def value(self, name: str, ttl: str | int | None = None) -> ValueState:
        return ValueState(self._op, self._declare(name), _ttl(name, ttl))

    def list(self, name: str, ttl: str | int | None = None) -> ListState:
        return ListState(self._op, self._declare(name), _ttl(name, ttl))

    def map(self, name: str, ttl: str | int | None = None) -> MapState:
        return MapState(self._op, self._declare(name), _ttl(name, ttl))

    def _declare(self, name: str) -> str:
        if self.sealed:
            raise RuntimeError("state must be declared in open()")
        if not isinstance(name, str) or not name:
            raise ValueError(f"state name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ValueError(f"state {name!r} is declared twice")
        self._names.add(name)
        return name


def _ttl(name: str, ttl: str | int | None) -> int | None:
    if ttl is None:
        return None
    try:
        ms = parse_duration(ttl)
    except ValueError as exc:
        raise ValueError(f"state {name!r}: ttl {exc}") from None
    if ms == 0:
        raise ValueError(f"state {name!r}: ttl must be a positive duration (got {ttl!r})")
    return ms


def _timestamp(ts: object) -> int:
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise TypeError(f"timer timestamps are integer epoch milliseconds, got {ts!r}")
    return ts


class Output(NamedTuple):
    """One output of a call: a record to emit, or the error that replaced one (dead-lettered)."""

    key: str
    record: dict[str, Any] | None
    error: FunctionError | None


class ProcessOperator:
    """Runs one partition's process function over its records and timers (driven by the task core).

    Same shape as ``WindowOperator``: ``process`` per record, ``advance`` per watermark, plus
    ``take`` for the records ``process`` emitted. Watermarks are made non-decreasing.
    The constructor instantiates ``function`` (a ``ProcessFunction`` subclass), calls its
    ``open`` and loads the timers the store holds; an ``open`` that raises is ``FunctionFailed``.
    Output records are handed over as the user made them (not copied).
    """

    def __init__(self, function: object, ref: str, on_error: OnError, store: ProcessStore) -> None:
        if on_error not in ("deadLetter", "fail"):
            raise ValueError(f"onError must be 'deadLetter' or 'fail', got {on_error!r}")
        if not (isinstance(function, type) and issubclass(function, ProcessFunction)):
            raise FunctionNotFound(f"{ref} is not a subclass of weir.ProcessFunction")
        if function.process is ProcessFunction.process:
            raise FunctionNotFound(f"{ref} does not define process(record, ctx)")
        self.ref = ref
        self.on_error: OnError = on_error
        self._store = store
        self._ctx = Context(Timers(self))
        self._bound = False  # whether a call is running (state and timers usable)
        self._prefix = b""  # the entry-key prefix of the key being called for
        self._heap: list[tuple[int, str]] = []
        self._timers: set[tuple[int, str]] = set()
        self._undo: list[tuple[bool, tuple[int, str]]] = []  # (registered?, timer) of this call
        self._out: list[Output] = []
        self._watermark = NO_WATERMARK
        self._firing = False
        try:
            self.function: ProcessFunction = function()
            state = KeyedState(self)
            self.function.open(state)
        except Exception as exc:
            raise FunctionFailed(ref, exc) from exc
        state.sealed = True
        self._process: Callable[[dict[str, Any], Context], Outputs] = self.function.process
        self._on_timer: Callable[[int, Context], Outputs] = self.function.on_timer
        self.restore()

    # -- what the task core drives ---------------------------------------------------------
    def process(self, key: str, ts: int, record: dict[str, Any], wm: int) -> bool:
        """Call the function for one record; always True (no record is late for it).

        Raises ``FunctionError`` (the caller dead-letters the record) or, with onError: fail,
        ``FunctionFailed``; either way the call left no state, timer or output behind.
        """
        if wm > self._watermark:
            self._watermark = wm
            heap = self._heap
            if heap and heap[0][0] <= wm:
                # The watermark this record sees has passed timers: they fire first, as when a
                # watermark reaches a Flink operator between records. Firing only at the end of
                # the batch would let later records of the batch change what the timers read,
                # so the output would depend on how records were batched.
                self._out.extend(self.advance(wm, 1 << 62))
        self._out.extend(self._call(key, ts, self._process, record))
        return True

    def take(self) -> list[Output]:
        """The outputs of ``process`` since the last ``take``, in order."""
        out, self._out = self._out, []
        return out

    def advance(self, wm: int, limit: int) -> list[Output]:
        """Remove entries expired at ``wm`` and fire up to ``limit`` due timers, in order.

        A raising ``on_timer`` gives an ``Output`` with ``error`` (its changes undone, the timer
        consumed), or raises ``FunctionFailed`` with onError: fail. ``firing`` then says
        whether more timers (or expired entries, also at most ``limit`` per call) are due.
        """
        if wm > self._watermark:
            self._watermark = wm
        wm = self._watermark
        more_expired = self._store.expire(wm, limit)
        out: list[Output] = []
        heap, timers = self._heap, self._timers
        fired = 0
        while heap and fired < limit:
            timer = heap[0]
            if timer not in timers:
                heapq.heappop(heap)
                continue
            if timer[0] > wm:
                break
            heapq.heappop(heap)
            timers.discard(timer)
            self._store.delete_timer(*timer)  # consumed even if on_timer raises: no refiring loop
            ts, key = timer
            try:
                out.extend(self._call(key, ts, self._on_timer, ts))
            except FunctionError as exc:
                out.append(Output(key, None, exc))
            fired += 1
        while heap and heap[0] not in timers:
            heapq.heappop(heap)
        self._firing = more_expired or bool(heap and heap[0][0] <= wm)
        return out

    def restore(self) -> None:
        """Reload the timers from the store (after the core restored its files)."""
        self._heap = self._store.timers()  # sorted, hence a heap
        self._timers = set(self._heap)

    @property
    def store(self) -> ProcessStore:
        """Where the function's state and timers live (flushed and checkpointed by the core)."""
        return self._store

    @property
    def firing(self) -> bool:
        """Whether more timers or expired entries were due at the last ``advance``'s watermark."""
        return self._firing

    @property
    def open_windows(self) -> int:
        """Keys holding state (shown in status beside the window operator's open windows)."""
        return self._store.keys_with_state

    @property
    def timer_entries(self) -> int:
        return len(self._timers)

    @property
    def watermark(self) -> int:
        return self._watermark

    # -- one call, all or nothing ------------------------------------------------------------
    def _call(self, key: str, ts: int, fn: Callable[[Any, Context], Outputs], arg: Any) -> list[Output]:
        ctx = self._ctx
        ctx.key, ctx.timestamp, ctx.watermark = key, ts, self._watermark
        self._prefix = key_prefix(key)
        store = self._store
        store.begin()
        self._undo.clear()
        self._bound = True
        try:
            outs = self._collect(key, fn(arg, ctx))
        except Exception as exc:
            self._rollback()
            if self.on_error == "fail":
                raise FunctionFailed(self.ref, exc) from exc
            raise FunctionError(self.ref, exc) from exc
        except BaseException:
            self._rollback()
            raise
        finally:
            self._bound = False
        store.commit()
        return outs

    def _rollback(self) -> None:
        self._store.rollback()
        for registered, timer in reversed(self._undo):
            if registered:
                self._timers.discard(timer)
            else:
                self._timers.add(timer)
                heapq.heappush(self._heap, timer)
        self._undo.clear()

    def _collect(self, key: str, result: object) -> list[Output]:
        if result is None:
            return []
        if isinstance(result, dict):
            return [Output(key, result, None)]
        items: Iterable[object] = (
            result if isinstance(result, Iterable) and not isinstance(result, str | bytes) else [result]
        )
        out = []
        for item in items:
            if isinstance(item, dict):
                out.append(Output(key, item, None))
                continue
            bad = TypeError(f"outputs must be dicts, got {type(item).__name__}")
            if self.on_error == "fail":
                raise bad
            out.append(Output(key, None, FunctionError(self.ref, bad)))
        return out

    # -- what handles and timers call ---------------------------------------------------------
    def _store_(self) -> ProcessStore:
        if not self._bound:
            raise RuntimeError("state is bound to a key only inside process() and on_timer()")
        return self._store

    def _entry_key(self, suffix: bytes) -> bytes:
        if not self._bound:
            raise RuntimeError("state is bound to a key only inside process() and on_timer()")
        return self._prefix + suffix

    def _register(self, ts: int) -> None:
        timer = (ts, self._ctx.key)
        if not self._bound:
            raise RuntimeError("timers can be registered only inside process() and on_timer()")
        if timer in self._timers:
            return
        self._timers.add(timer)
        heapq.heappush(self._heap, timer)
        self._store.put_timer(ts, timer[1])
        self._undo.append((True, timer))

    def _delete(self, ts: int) -> None:
        timer = (ts, self._ctx.key)
        if not self._bound:
            raise RuntimeError("timers can be deleted only inside process() and on_timer()")
        if timer not in self._timers:
            return
        self._timers.discard(timer)
        self._store.delete_timer(ts, timer[1])
        self._undo.append((False, timer))


def open_process(
    ref: str,
    on_error: OnError,
    path: Path,
    rocks: RocksMemory | None = None,
    memory_bytes: int | None = None,
) -> ProcessOperator:
    """Load ``ref`` (``package.module:Class``), open its store at ``path`` and ``open()`` it.

    Raises ``FunctionNotFound`` for a reference that does not name a ``ProcessFunction``
    subclass, ``FunctionFailed`` when its ``open`` raises (the store is closed again then).
    """
    function = load_function(ref)
    if not (isinstance(function, type) and issubclass(function, ProcessFunction)):
        raise FunctionNotFound(f"{ref} is not a subclass of weir.ProcessFunction")
    store = ProcessStore(path, rocks, memory_bytes)
    try:
        return ProcessOperator(function, ref, on_error, store)
    except BaseException:
        store.close()
        raise
