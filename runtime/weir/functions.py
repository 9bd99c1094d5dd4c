"""User code in pipelines: references to Python functions, their failures, and the state encoding.

A manifest names user code as ``"package.module:name"`` (``name`` may be dotted: a class
attribute). The worker imports it at start; a reference that does not resolve is a configuration
error with the field path (``weir run`` exits 2), never a crash on the first record.

A user function that raises sends the record it was called with to the dead-letter topic with
reason ``function_error`` and a one-line cause (``FunctionError``), unless its step says
``onError: fail``: then the worker stops with the cause (``FunctionFailed``), like Flink's
default of failing the job.

State encoding (version 1). Every value a user keeps in keyed state or in a custom aggregate's
accumulator is stored as one byte ``0x01`` followed by its JSON text (UTF-8, keys in insertion
order). JSON is stable across Python and weir versions, readable by any tool, and independent
of class layouts, which is what makes savepoints portable. Consequences a user sees: tuples come
back as lists, dict keys must be strings, integers must fit in signed 64 bits, and NaN/infinite
floats are refused (``StateEncodingError``). A future format gets the next version byte; readers
keep decoding every older one.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from typing import Any, Final

import orjson

from weir.records import DeadLetter
from weir.spec_common import FUNCTION_REF  # defined with the spec models, which must not import this module

__all__ = [
    "FUNCTION_REF",
    "STATE_FORMAT_VERSION",
    "FunctionError",
    "FunctionFailed",
    "FunctionNotFound",
    "StateEncodingError",
    "cause",
    "decode_state",
    "encode_state",
    "load_function",
]

_REF = re.compile(FUNCTION_REF)

STATE_FORMAT_VERSION: Final = 1
_V1: Final = b"\x01"
_MAX_CAUSE: Final = 300


class FunctionNotFound(ValueError):
    """A function reference that does not resolve to a callable (message says why)."""


class FunctionError(DeadLetter):
    """A user function raised on one record: the record is dead-lettered as ``function_error``."""

    __slots__ = ()

    def __init__(self, ref: str, exc: BaseException) -> None:
        super().__init__("function_error", f"{ref}: {cause(exc)}")


class FunctionFailed(RuntimeError):
    """A user function raised in a step with ``onError: fail``: the worker stops with this cause."""

    def __init__(self, ref: str, exc: BaseException) -> None:
        super().__init__(f"{ref} raised on a record (onError: fail): {cause(exc)}")


class StateEncodingError(ValueError):
    """A value that state encoding version 1 cannot store (see the module docstring)."""


def cause(exc: BaseException) -> str:
    """One line naming the exception: ``TypeName: message``, newlines folded, at most 300 chars."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= _MAX_CAUSE else line[: _MAX_CAUSE - 1] + "…"


def load_function(ref: str) -> Any:
    """Import ``package.module:name`` and return the object it names.

    Raises ``FunctionNotFound`` with a one-line reason (bad form, module not importable, no such
    attribute, not callable); the caller prefixes the field path.
    """
    if not _REF.match(ref):
        raise FunctionNotFound(f"{ref!r} is not of the form 'package.module:name'")
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FunctionNotFound(f"cannot import module {module_name!r}: {cause(exc)}") from exc
    except Exception as exc:  # the user's module failed while importing
        raise FunctionNotFound(f"importing module {module_name!r} failed: {cause(exc)}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FunctionNotFound(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise FunctionNotFound(f"{ref} is a {type(obj).__name__}, not a function or class")
    return obj


def encode_state(value: Any) -> bytes:
    """Encode one state value (version 1); raises ``StateEncodingError`` for what it cannot store."""
    try:
        data = orjson.dumps(value)
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        raise StateEncodingError(f"state value cannot be stored: {cause(exc)}") from exc
    if b"null" in data:  # orjson writes NaN and infinities as null: refuse them, never lose them
        _check_finite(value)
    return _V1 + data


def encode_state_list(encoded: Sequence[bytes]) -> bytes:
    """``encode_state`` of the list of the values ``encoded`` holds (each from ``encode_state``),
    without decoding them: the same bytes."""
    return _V1 + b"[" + b",".join(e[1:] for e in encoded) + b"]"


def _check_finite(value: Any) -> None:
    if value.__class__ is float and not math.isfinite(value):
        raise StateEncodingError(f"state value cannot be stored: {value} is not a finite number")
    if isinstance(value, dict):
        for v in value.values():
            _check_finite(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_finite(v)


def decode_state(data: bytes) -> Any:
    """Decode a value ``encode_state`` wrote (any version this weir knows)."""
    if data[:1] == _V1:
        return orjson.loads(data[1:])
    version = data[0] if data else None
    raise StateEncodingError(
        f"state written in encoding version {version}, which this weir does not know "
        f"(it reads version {STATE_FORMAT_VERSION}); use a newer weir"
    )
