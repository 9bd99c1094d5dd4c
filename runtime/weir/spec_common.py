"""What every spec module shares: ``SpecError``, durations, names and the frozen base model."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

__all__ = [
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "FUNCTION_REF",
    "Duration",
    "FieldName",
    "LocatedError",
    "ObjectName",
    "PositiveDuration",
    "SecretKey",
    "SecretKeyRef",
    "SpecError",
    "SpecModel",
    "TopicName",
    "parse_duration",
]

class SpecError(ValueError):
    """A StreamJob manifest or pipeline is invalid.

    ``str(error)`` is one line per problem, each starting with the field path
    (``spec.pipeline.steps[2].window.type: must be one of ...``); ``lines`` holds them.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


class LocatedError(ValueError):
    """A validator's error about a member below the model being validated.

    Pydantic reports a model validator's error at the model itself; this carries the
    relative path so that ``format_validation_error`` can point at the member at fault.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


# --------------------------------------------------------------------------- durations

_DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION_PATTERN = r"^[0-9]+(ms|s|m|h|d)$"
_DURATION_RE = re.compile(r"([0-9]+)(ms|s|m|h|d)")


def parse_duration(value: object) -> int:
    """Return ``value`` as whole milliseconds.

    Accepts a string of digits and one unit (``250ms``, ``5s``, ``1m``, ``2h``, ``1d``) or a
    non-negative integer meaning milliseconds. Raises ``ValueError`` for anything else,
    including booleans and floats (a float is almost always a unit mistake).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative (got {value!r})")
        return value
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is not None:
            return int(match.group(1)) * _DURATION_UNITS_MS[match.group(2)]
    raise ValueError(
        f"must be a duration like 250ms, 5s, 1m, 2h, 1d or an integer of milliseconds (got {value!r})"
    )


def _parse_positive_duration(value: object) -> int:
    millis = parse_duration(value)
    if millis == 0:
        raise ValueError(f"must be a positive duration (got {value!r})")
    return millis


# Kubernetes' structural schemas express "string or integer" only as int-or-string; the CRD
# generator (weir_operator.crd) reduces the anyOf to its bare types and hoists the constraints.
_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _DURATION_PATTERN}],
    "x-kubernetes-int-or-string": True,
}

Duration = Annotated[int, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""Milliseconds; written as ``"250ms"``, ``"5s"``, ``"1m"``, ``"2h"``, ``"1d"`` or an integer."""

PositiveDuration = Annotated[int, BeforeValidator(_parse_positive_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""A ``Duration`` that must be greater than zero."""

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
FUNCTION_REF = f"^{_DOTTED}:{_DOTTED}$"
"""The form of a function reference, ``package.module:name`` (``weir.functions`` loads them;
also the CRD's pattern)."""

# Kafka's legal topic names: at most 249 of these characters.
_TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
TopicName = Annotated[str, Field(pattern=_TOPIC_PATTERN)]
FieldName = Annotated[str, Field(min_length=1)]



class SpecModel(BaseModel):
    """Base of every spec model: frozen, unknown keys rejected, camelCase aliases."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


# --------------------------------------------------------------------------- Kubernetes references

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
ObjectName = Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
"""The name of a Kubernetes object such as a Secret (a DNS subdomain)."""
SecretKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
"""A key of a Secret's data."""


class SecretKeyRef(SpecModel):
    """One key of a Secret in the StreamJob's namespace. Only the reference is stored: workers
    receive the value as an environment variable (``secretKeyRef``) or a mounted file."""

    name: ObjectName
    """Name of the Secret."""
    key: SecretKey
    """Key within the Secret."""
