"""The StreamJob pipeline spec: pydantic models (the source of truth), validation messages, loading.

The models live in ``weir.spec_common`` (errors, durations, the base model), ``weir.spec_steps``
(steps), ``weir.spec_pipeline`` (the pipeline and its ``Stages``), ``weir.spec_connections``
(Kafka and the checkpoint store) and ``weir.spec_job`` (pods, autoscaler, ``JobSpec``); this
module re-exports them and reads manifests. ``weir.spec`` stays the import path users know.

The models describe what a user writes under ``spec`` of a ``weir.dev/v1alpha1`` StreamJob.
YAML and JSON keys are camelCase; Python attributes are snake_case (both are accepted when
constructing a model). Every model is frozen and forbids unknown keys, so a typo is an
error instead of a silently ignored setting. The CRD's OpenAPI schema is generated from
these models, which is why each step is a flat object with optional members (a
"structural" schema) rather than a ``oneOf`` of differently shaped objects.

Exceptions::

    ValueError
     └── SpecError          a manifest or pipeline is invalid; ``str()`` names each bad field path
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from weir.spec_common import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    Duration,
    LocatedError,
    ObjectName,
    PositiveDuration,
    SecretKey,
    SecretKeyRef,
    SpecError,
    SpecModel,
    parse_duration,
)
from weir.spec_connections import (
    CheckpointCredentials,
    CheckpointSpec,
    KafkaSasl,
    KafkaSpec,
    KafkaTls,
    SecurityProtocol,
)
from weir.spec_job import (
    MAX_PARALLELISM,
    RESERVED_LABEL_PREFIX,
    WORKER_ENV_PREFIX,
    AutoscalerSpec,
    DeliveryGuarantee,
    EnvVar,
    JobSpec,
    JobState,
    KubernetesObject,
    LocalObjectReference,
    PodTemplate,
    Quantity,
    Resources,
    Toleration,
    UpgradeMode,
)
from weir.spec_pipeline import (
    MAX_STEPS,
    DeadLetterSink,
    EventTime,
    FieldScope,
    Pipeline,
    PipelineLike,
    Repartition,
    Sink,
    Source,
    SourceKey,
    Stages,
    Terminal,
    Watermark,
    WindowedStages,
    as_pipeline,
)
from weir.spec_steps import (
    Aggregate,
    Condition,
    FunctionRef,
    FunctionStep,
    KeyBy,
    OnError,
    Output,
    Step,
    Window,
)

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_PARALLELISM",
    "MAX_STEPS",
    "RESERVED_LABEL_PREFIX",
    "WORKER_ENV_PREFIX",
    "Aggregate",
    "AutoscalerSpec",
    "CheckpointCredentials",
    "CheckpointSpec",
    "Condition",
    "DeadLetterSink",
    "DeliveryGuarantee",
    "Duration",
    "EnvVar",
    "EventTime",
    "FieldScope",
    "FunctionRef",
    "FunctionStep",
    "Job",
    "JobSpec",
    "JobState",
    "KafkaSasl",
    "KafkaSpec",
    "KafkaTls",
    "KeyBy",
    "KubernetesObject",
    "LocalObjectReference",
    "ObjectMeta",
    "ObjectName",
    "OnError",
    "Output",
    "Pipeline",
    "PipelineLike",
    "PodTemplate",
    "PositiveDuration",
    "Quantity",
    "Repartition",
    "Resources",
    "SecretKey",
    "SecretKeyRef",
    "SecurityProtocol",
    "Sink",
    "Source",
    "SourceKey",
    "SpecError",
    "Stages",
    "Step",
    "StreamJob",
    "Terminal",
    "Toleration",
    "UpgradeMode",
    "Watermark",
    "Window",
    "WindowedStages",
    "as_pipeline",
    "format_validation_error",
    "load_job",
    "parse_duration",
    "parse_manifest",
]

API_VERSION = "weir.dev/v1alpha1"
KIND = "StreamJob"

# --------------------------------------------------------------------------- manifests

class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata weir reads; other keys (labels, uid, ...)
    are ignored because ``kubectl get -o yaml`` output carries many of them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] = "default"
    uid: str | None = None
    """Set by the API server; the operator's children name it in their ownerReferences."""


class StreamJob(SpecModel):
    """A StreamJob manifest as weir reads it; ``status`` is accepted and ignored."""

    api_version: Literal["weir.dev/v1alpha1"]
    kind: Literal["StreamJob"]
    metadata: ObjectMeta
    spec: JobSpec
    status: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A loaded StreamJob: its identity, its spec as written and the pipeline it runs
    (from ``spec.pipeline`` or produced by ``spec.entrypoint``)."""

    name: str
    namespace: str
    spec: JobSpec
    pipeline: Pipeline

    @property
    def consumer_group(self) -> str:
        """Consumer group the job commits its source offsets to."""
        return f"weir-{self.namespace}-{self.name}"

    @property
    def repartition_topic(self) -> str | None:
        """Topic between stage 1 and stage 2, or None when the pipeline has one stage."""
        repartition = self.pipeline.stages().repartition
        if repartition is None:
            return None
        return repartition.topic(self.namespace, self.name)

    @property
    def dead_letter_topic(self) -> str:
        """``pipeline.deadLetter.topic``, or ``weir-<namespace>-<name>-dlq`` when omitted."""
        if self.pipeline.dead_letter is not None:
            return self.pipeline.dead_letter.topic
        return f"weir-{self.namespace}-{self.name}-dlq"


def parse_manifest(source: str | os.PathLike[str]) -> StreamJob:
    """Validate a StreamJob manifest without importing any entrypoint.

    ``source`` is a path (a ``PathLike``, or a ``str`` without newlines that does not start
    with ``{``) or the manifest text itself (YAML or JSON). Raises ``SpecError``.
    """
    document = _read_document(source)
    try:
        return StreamJob.model_validate(document)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc).splitlines()) from None


def load_job(source: str | os.PathLike[str]) -> Job:
    """Load a StreamJob manifest (see ``parse_manifest``) and resolve its pipeline.

    With ``spec.entrypoint``, imports ``module`` and calls ``function()``, which must return
    a ``Pipeline`` or a builder with ``build()``. Raises ``SpecError`` naming the field.
    """
    manifest = parse_manifest(source)
    spec = manifest.spec
    pipeline = spec.pipeline if spec.pipeline is not None else _resolve_entrypoint(spec.entrypoint or "")
    return Job(manifest.metadata.name, manifest.metadata.namespace, spec, pipeline)


def _read_document(source: str | os.PathLike[str]) -> object:
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        text, origin = source, "manifest"
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
        origin = str(path)
    try:
        if text.lstrip().startswith("{"):
            return orjson.loads(text)
        return yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError([f"{origin}: not valid YAML or JSON ({exc})"]) from None


def _resolve_entrypoint(entrypoint: str) -> Pipeline:
    where = "spec.entrypoint"
    module_name, _, function_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user module may fail to import in any way
        why = f"{type(exc).__name__}: {exc}"
        raise SpecError([f"{where}: cannot import module {module_name!r} ({why})"]) from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise SpecError([f"{where}: module {module_name!r} has no attribute {function_name!r}"])
    if not callable(function):
        raise SpecError([f"{where}: {entrypoint} is not callable"])
    try:
        result = function()
    except SpecError as exc:
        raise SpecError([f"{where}: {entrypoint}() built an invalid pipeline", *exc.lines]) from None
    except Exception as exc:  # any failure of user code becomes a spec error naming it
        raise SpecError([f"{where}: {entrypoint}() raised {type(exc).__name__}: {exc}"]) from exc
    try:
        return as_pipeline(result)
    except SpecError as exc:
        raise SpecError([f"{where}: {entrypoint}() built an invalid pipeline", *exc.lines]) from None
    except TypeError:
        got = type(result).__name__
        raise SpecError(
            [f"{where}: {entrypoint}() must return a weir Pipeline or pipeline builder, not {got}"]
        ) from None


# --------------------------------------------------------------------------- error messages

_MODELS: dict[str, type[BaseModel]] = {}


def _register_models() -> None:
    models = (Pipeline, JobSpec, StreamJob, Step, Condition, Window, Source, KafkaSpec)
    for model in (*models, CheckpointSpec, AutoscalerSpec, PodTemplate):
        _MODELS[model.__name__] = model


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """One line per error: ``<field path>: <what is wrong> (got <value>)``.

    Paths use the YAML names (``spec.pipeline.steps[2].window.type``); enum errors list the
    allowed values; unknown keys say ``unknown field`` and suggest a close known name.
    ``prefix`` is prepended to every path (e.g. ``"spec.pipeline"``).
    """
    root = _MODELS.get(exc.title)
    lines = []
    for error in exc.errors():
        loc: tuple[str | int, ...] = tuple(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx", {})
        if kind == "value_error" and isinstance(ctx.get("error"), LocatedError):
            located = ctx["error"]
            loc = (*loc, *located.loc)
            message = str(located)
        elif kind in ("value_error", "assertion_error"):
            message = str(ctx.get("error", error["msg"]))
        elif kind == "extra_forbidden":
            message = "unknown field" + _suggestion(root, loc)
        elif kind == "missing":
            message = "required field is missing"
        elif kind in ("literal_error", "enum"):
            allowed = ", ".join(re.findall(r"'((?:[^'\\]|\\.)*)'", str(ctx.get("expected", ""))))
            message = f"must be one of {allowed} (got {_shown(error['input'])})"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be an object (got {_shown(error['input'])})"
        elif kind in ("tuple_type", "list_type"):
            message = f"must be a list (got {_shown(error['input'])})"
        elif kind in ("int_type", "bool_type"):
            wanted = "an integer" if kind == "int_type" else "true or false"
            message = f"must be {wanted} (got {_shown(error['input'])})"
        elif kind == "greater_than_equal":
            message = f"must be >= {ctx.get('ge')} (got {_shown(error['input'])})"
        elif kind == "string_pattern_mismatch":
            message = f"must match {ctx.get('pattern')} (got {_shown(error['input'])})"
        elif kind == "too_short" or (kind == "string_too_short" and ctx.get("min_length") == 1):
            message = f"must not be empty (got {_shown(error['input'])})"
        elif kind == "too_long":
            message = f"must have at most {ctx.get('max_length')} items (got {ctx.get('actual_length')})"
        else:
            message = f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {_shown(error['input'])})"
        path = _format_loc(loc)
        if prefix:
            path = f"{prefix}.{path}" if path and not path.startswith("[") else f"{prefix}{path}"
        lines.append(f"{path or '(top level)'}: {message}")
    return "\n".join(lines)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a message names the bad value, it need not echo a whole object."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(part):
            # Keys such as librdkafka's "group.id" would read as two levels when dotted.
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out


def _suggestion(root: type[BaseModel] | None, loc: tuple[str | int, ...]) -> str:
    if root is None or not loc or not isinstance(loc[-1], str):
        return ""
    known = _known_keys(root, loc[:-1])
    matches = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return f" (did you mean {matches[0]}?)" if matches else ""


def _known_keys(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """YAML keys allowed at ``loc`` below ``root``, walking the models' annotations."""
    current: object = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            info = next(
                (f for name, f in current.model_fields.items() if part in (name, f.alias)),
                None,
            )
            current = info.annotation if info is not None else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _unwrap(annotation: object) -> object:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


_register_models()
