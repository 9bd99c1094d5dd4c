"""Generates the StreamJob CustomResourceDefinition from the pydantic models (``make crds``).

``python -m weir_operator.crd`` writes ``crds/streamjobs.weir.dev.yaml`` and the chart's copy
``charts/weir-operator/crds/streamjobs.weir.dev.yaml``; ``--check`` only reports files that
differ (a unit test does the same). The spec schema comes from ``weir.spec.JobSpec``, the
status schema from ``weir_operator.model.StreamJobStatus``.

Pydantic writes JSON Schema 2020-12; the API server takes a *structural* OpenAPI v3.0 subset.
The conversion:

- every ``$ref`` is inlined (the API server rejects them). ``Condition`` refers to itself
  (``and``/``or``/``not``); a schema cannot be infinite, so below ``MAX_NESTING`` levels a
  nested condition is an object the server keeps as is and the models validate;
- ``anyOf: [X, {type: null}]`` (an optional member) becomes ``X``: the API server drops
  ``null`` values of non-nullable fields, which is exactly what ``None`` means in the models;
- int-or-string (durations, resource quantities): the ``anyOf`` keeps only the two bare
  types, as structural schemas require, and the options' ``pattern``/``minimum`` move up
  (each applies to one of the two types only);
- ``const`` becomes a one-value ``enum``; a numeric ``exclusiveMinimum`` becomes
  ``minimum`` + ``exclusiveMinimum: true``; ``additionalProperties: false`` is dropped
  (unknown fields are pruned, and ``kubectl`` reports them as errors);
- ``title``, ``$defs``, ``propertyNames`` and defaults are dropped. Defaults stay in the
  models: a default in the schema would be written into every stored object, and a few
  validators treat "given" differently from "defaulted". The exceptions are
  ``spec.parallelism``, which the scale subresource must always find, and
  ``spec.upgradeMode``, which the ``Upgrade Mode`` printer column shows;
- any other keyword fails the generation, so a new pydantic construct cannot slip through.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from weir import spec
from weir_operator import model

__all__ = [
    "CATEGORIES",
    "CHART_CRD_PATH",
    "CRD_NAME",
    "CRD_PATH",
    "GROUP",
    "KIND",
    "MAX_NESTING",
    "PLURAL",
    "PRINTER_COLUMNS",
    "SHORT_NAMES",
    "VERSION",
    "crd",
    "crd_yaml",
    "main",
    "openapi_schema",
    "structural_problems",
]

GROUP = "weir.dev"
VERSION = "v1alpha1"
KIND = spec.KIND
PLURAL = "streamjobs"
SINGULAR = "streamjob"
SHORT_NAMES = ("sj",)
CATEGORIES = ("weir",)
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATH = Path("crds") / f"{CRD_NAME}.yaml"
CHART_CRD_PATH = Path("charts") / "weir-operator" / "crds" / f"{CRD_NAME}.yaml"

MAX_NESTING = 3
"""How many times a self-referencing model (a filter ``Condition``) is inlined inside itself.

Each level triples the schema (``and``, ``or`` and ``not`` each hold a condition); three
levels validate every condition people write by hand at apply time, deeper ones are checked
by the models when the operator and the workers load the job.
"""

# Defaults kept in the schema, by path below the root. The scale subresource answers GET
# with an error when spec.parallelism is missing, so it must always be present; a printer
# column shows an absent field as an empty cell, so spec.upgradeMode is written out too (the
# models' default is the same value: nothing changes for objects stored without it).
_KEPT_DEFAULTS = frozenset({("spec", "parallelism"), ("spec", "upgradeMode")})

# The workers' StatefulSet and Service are named after the job: a Service name is a DNS-1035
# label, and the StatefulSet controller labels each pod with "<name>-<10-character hash>",
# which must fit in 63 characters.
_NAME_RULE = {
    "rule": "size(self.metadata.name) <= 52 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": "metadata.name must be a DNS label of at most 52 characters starting with a letter "
    "(it names the job's StatefulSet, pods and Service)",
}

PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Life-cycle phase"},
    {
        "name": "Parallelism",
        "type": "integer",
        "jsonPath": ".spec.parallelism",
        "description": "Desired number of workers",
    },
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyWorkers", "description": "Ready workers"},
    {
        "name": "Lag",
        "type": "integer",
        "jsonPath": ".status.lag.records",
        "description": "Consumer lag (records)",
    },
    {
        "name": "Last Checkpoint",
        "type": "date",
        "jsonPath": ".status.lastCheckpoint.completedAt",
        "description": "When the latest checkpoint completed",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Lifecycle",
        "type": "string",
        "jsonPath": ".status.lifecycleState",
        "description": "Upgrade life cycle (Deploying, Upgrading, Stabilizing, Stable, RollingBack, ...)",
    },
    {
        "name": "Upgrade Mode",
        "type": "string",
        "jsonPath": ".spec.upgradeMode",
        "priority": 1,
        "description": "How a changed spec replaces the workers",
    },
    {
        "name": "Image",
        "type": "string",
        "jsonPath": ".spec.image",
        "priority": 1,
        "description": "Worker image",
    },
)

# Keywords the API server accepts in a structural schema and that the models produce.
_ALLOWED = frozenset(
    {
        "type",
        "format",
        "description",
        "properties",
        "required",
        "items",
        "additionalProperties",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "anyOf",
        "default",
        "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
    }
)
# Keywords with no meaning for the API server; dropped.
_DROPPED = frozenset({"title", "$defs", "propertyNames", "examples"})


def _inline(node: Any, defs: dict[str, Any], stack: tuple[str, ...]) -> Any:
    """``node`` with every ``$ref`` replaced by a copy of its definition."""
    if isinstance(node, list):
        return [_inline(item, defs, stack) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = str(node["$ref"]).rsplit("/", 1)[-1]
        siblings = {k: _inline(v, defs, stack) for k, v in node.items() if k != "$ref"}
        if stack.count(name) >= MAX_NESTING:
            nested: dict[str, Any] = {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": f"A {name} nested deeper than the schema spells out; the models validate it.",
            }
            return {**nested, **{k: v for k, v in siblings.items() if k != "description"}}
        target = _inline(copy.deepcopy(defs[name]), defs, (*stack, name))
        return {**target, **siblings}
    return {k: _inline(v, defs, stack) for k, v in node.items() if k != "$defs"}


_RST_LITERAL = re.compile(r"``([^`]+)``")


def _description(text: str) -> str:
    """Docstring text for ``kubectl explain``: paragraphs kept, lines joined, RST literals as `x`."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return _RST_LITERAL.sub(r"`\1`", "\n\n".join(p for p in paragraphs if p))


def _clean(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """One inlined pydantic schema node as a structural OpenAPI v3.0 schema (see the module doc)."""
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**options[0], **rest}
        else:
            node["anyOf"] = options
    if not node or set(node) <= {"description", "default", "title"}:  # `Any`: keep whatever is given
        node["x-kubernetes-preserve-unknown-fields"] = True
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "default":
            if path in _KEPT_DEFAULTS:
                out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _clean(value, (*path, "*"))
            elif value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "properties":
            out[key] = {name: _clean(sub, (*path, name)) for name, sub in value.items()}
        elif key == "items":
            out[key] = _clean(value, (*path, "[]"))
        elif key == "anyOf" and node.get("x-kubernetes-int-or-string"):
            # Structural schemas allow exactly [{type: integer}, {type: string}] here; each
            # option's constraints move up, where pattern only applies to strings and
            # minimum/maximum only to numbers, so their meaning is unchanged.
            out[key] = [{"type": "integer"}, {"type": "string"}]
            for option in value:
                out.update({k: v for k, v in _clean(option, path).items() if k != "type"})
        elif key == "anyOf":
            out[key] = [_clean(option, path) for option in value]
        elif key == "description":
            out[key] = _description(value)
        elif key in _ALLOWED:
            out[key] = value
        else:
            where = ".".join(path) or "(root)"
            raise ValueError(f"{where}: JSON schema keyword {key!r} has no structural OpenAPI form")
    return out


def openapi_schema(model_type: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3.0 schema of ``model_type`` (validation mode, YAML names)."""
    raw = model_type.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return _clean(_inline(raw, defs, (model_type.__name__,)), ())


def streamjob_schema() -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema``: apiVersion/kind/metadata, the spec and the status."""
    job_spec = _spec_schema()
    status = openapi_schema(model.StreamJobStatus)
    # kopf keeps its bookkeeping (handler progress, last-handled state) under status.kopf.
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "description": "A stateful, windowed Kafka pipeline run by the weir operator.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": job_spec,
            "status": status,
        },
        "x-kubernetes-validations": [_NAME_RULE],
    }


def _spec_schema() -> dict[str, Any]:
    raw = spec.JobSpec.model_json_schema(by_alias=True, mode="validation")
    inlined = _inline(raw, raw.get("$defs", {}), ("JobSpec",))
    return _clean(inlined, ("spec",))


def crd() -> dict[str, Any]:
    """The StreamJob CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "weir", "app.kubernetes.io/part-of": "weir"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": streamjob_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.parallelism",
                            "statusReplicasPath": ".status.parallelism",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                }
            ],
        },
    }


_HEADER = (
    "# Generated by `make crds` (python -m weir_operator.crd) from weir.spec.JobSpec and\n"
    "# weir_operator.model.StreamJobStatus. Do not edit: change the models and regenerate.\n"
)


def crd_yaml() -> str:
    """The CRD as the YAML text checked in under ``crds/`` and the chart."""
    return _HEADER + yaml.safe_dump(crd(), sort_keys=False, allow_unicode=True, width=100)


def _walk(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for name, sub in (node.get("properties") or {}).items():
            yield from _walk(sub, f"{path}.{name}")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}[*]")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """What keeps ``schema`` from being structural, one line per problem (empty when it is).

    Checks what the API server would reject or silently mis-handle: a node without a type
    (unless int-or-string or preserve-unknown-fields), ``$ref``, keywords outside the allowed
    set, and types, defaults or descriptions inside ``anyOf`` other than int-or-string's.
    """
    problems = []
    for path, node in _walk(schema, ""):
        where = path or "(root)"
        if "$ref" in node or set(node) - _ALLOWED:
            problems.append(f"{where}: unsupported keywords {sorted(set(node) - _ALLOWED)}")
        free = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        if "type" not in node and not free:
            problems.append(f"{where}: no type")
        if "anyOf" in node and node["anyOf"] != [{"type": "integer"}, {"type": "string"}]:
            problems.append(
                f"{where}: anyOf other than int-or-string's [{{type: integer}}, {{type: string}}]"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weir_operator.crd", description="Write the StreamJob CRD generated from the models."
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    text = crd_yaml()
    stale = []
    for relative in (CRD_PATH, CHART_CRD_PATH):
        path = args.root / relative
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(str(relative))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {relative}")
    if args.check and stale:
        print("out of date (run `make crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
