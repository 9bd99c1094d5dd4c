"""What the task core writes: window results as sink records, and dead letters' values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from weir.aggregates import representable
from weir.window_operator import WindowResult

__all__ = ["iso", "printable", "result_record"]

_ISO_CACHE: dict[int, str] = {}


def iso(ms: int) -> str:
    """ISO-8601 UTC with milliseconds; window bounds repeat for many keys, so cache them."""
    s = _ISO_CACHE.get(ms)
    if s is None:
        if len(_ISO_CACHE) > 100_000:
            _ISO_CACHE.clear()
        s = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
        s = s.replace("+00:00", "Z")
        _ISO_CACHE[ms] = s
    return s


def result_record(r: WindowResult, with_final: bool) -> dict[str, Any]:
    """The sink record of one window result (the shape documented in the README)."""
    out: dict[str, Any] = {
        "key": r.key,
        "windowStart": iso(r.start),
        "windowEnd": iso(r.end),
        "windowStartMs": r.start,
        "windowEndMs": r.end,
    }
    out.update(r.values)
    if with_final:
        out["final"] = r.final
    if r.retract:
        out["retract"] = True
    return out


def printable(record: dict[str, Any]) -> bytes:
    """A dead-lettered result's value: JSON, with what JSON cannot carry (NaN, inf, ints beyond
    64 bits) as strings, so the dead-letter topic shows the value that could not be sent."""
    shown = {
        k: str(v) if v.__class__ in (int, float) and not representable(v) else v for k, v in record.items()
    }
    try:
        return orjson.dumps(shown, default=repr)
    except (TypeError, ValueError):
        return orjson.dumps({k: repr(v) for k, v in record.items()})
