"""The AdapterMerge CustomResourceDefinition, generated from the pydantic models in merge_worker.spec.

One definition of the resource: pydantic's JSON schema is rewritten into the structural OpenAPI v3
subset Kubernetes accepts (no $ref, no titles, no anyOf with types, boolean exclusive bounds), and the
CEL rules spec.py declares ride along as x-kubernetes-validations. `adaptermerge crd` prints crd_yaml();
crds/adaptermerge.io_adaptermerges.yaml is its checked-in output. Pure pydantic + PyYAML: no torch.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from merge_worker import spec as specs

CRD_NAME = f"{specs.PLURAL}.{specs.API_GROUP}"

# Keys of pydantic's JSON schema that have no place in a CRD: defaults live in the pydantic models
# (the worker and the operator apply them), so stored objects stay exactly as the user wrote them.
_DROPPED_KEYS = frozenset({"title", "default", "$defs"})

_PRINTER_COLUMNS = [
    {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Output", "type": "string", "jsonPath": ".spec.output.path"},
    # An output is a path or a uri (s3://, oci://): a column can show one field, so each has its own.
    {"name": "URI", "type": "string", "jsonPath": ".spec.output.uri"},
    {
        "name": "Reason",
        "type": "string",
        "priority": 1,  # `kubectl get -o wide` only
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inlines every `$ref: #/$defs/X` (structural schemas have no references)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **siblings}, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _int_or_string_rule(branches: list[dict[str, Any]]) -> dict[str, str]:
    """A CEL rule carrying the bounds of both branches, which x-kubernetes-int-or-string cannot."""
    int_branch = next(b for b in branches if b.get("type") == "integer")
    str_branch = next(b for b in branches if b.get("type") == "string")
    minimum = int_branch.get("minimum")
    allowed = str_branch.get("enum") or ([str_branch["const"]] if "const" in str_branch else [])
    int_rule = "true" if minimum is None else f"self >= {minimum}"
    str_rule = " || ".join(f"self == '{v}'" for v in allowed) or "true"
    integer = "an integer" if minimum is None else f"an integer >= {minimum}"
    strings = " or ".join(repr(v) for v in allowed) or "a string"
    if "pattern" in str_branch:  # e.g. a Kubernetes quantity: "500m", "64Gi"
        str_rule = f"self.matches(r'{str_branch['pattern']}')"
        strings = f"a string matching {str_branch['pattern']}"
    return {
        "rule": f"type(self) == int ? {int_rule} : ({str_rule})",
        "message": f"must be {integer} or {strings}",
    }


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrites one (already resolved) pydantic schema node, and its children, into CRD form."""
    default = node.get("default")
    node = {k: v for k, v in node.items() if k not in _DROPPED_KEYS}
    if default not in (None, "", [], {}) and "description" in node:
        # Shown by `kubectl explain`, not applied by the API server (that would rewrite stored specs).
        node["description"] = f"{node['description']} Defaults to {json.dumps(default)}."
    out: dict[str, Any] = {}
    key_rules: list[tuple[str, str]] = []
    if "anyOf" in node:
        branches = node.pop("anyOf")
        typed = [b for b in branches if b.get("type") != "null"]
        if len(typed) < len(branches):
            node["nullable"] = True  # `X | None`: null is a value (a retention that is undefined)
        types = {b.get("type") for b in typed}
        if len(typed) == 1:
            node = {**{k: v for k, v in typed[0].items() if k not in _DROPPED_KEYS}, **node}
        elif types == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
            string_bound = next((b["maxLength"] for b in typed if "maxLength" in b), None)
            if string_bound is not None:  # bounds the CEL cost estimate of the rule below
                node["maxLength"] = string_bound
            node["x-kubernetes-validations"] = [
                *node.get("x-kubernetes-validations", []),
                _int_or_string_rule(typed),
            ]
        else:
            raise ValueError(f"no structural form for anyOf of {sorted(map(str, types))}")
    for key, value in node.items():
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020-12 gives the bound; OpenAPI v3.0 wants the bound plus a flag.
            out[key.replace("exclusive", "").lower()] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _structural(child) for name, child in value.items()}
        elif key == "items":
            out[key] = _structural(value)
        elif key == "patternProperties":  # a map with constrained keys (pydantic's dict[Key, V])
            ((pattern, child),) = value.items()
            out["additionalProperties"] = _structural(child)
            key_rules.append((f"self.all(k, k.matches(r'{pattern}'))", f"every key must match {pattern}"))
        elif key == "propertyNames":
            if "maxLength" in value:
                key_rules.append((f"self.all(k, size(k) <= {value['maxLength']})",
                                  f"keys have at most {value['maxLength']} characters"))
        elif key == "additionalProperties":
            if value is True:  # a free-form map (resources, affinity, a toleration)
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _structural(value)
            # False: unknown fields are pruned, which is the structural default
        else:
            out[key] = value
    if key_rules:  # structural schemas have no propertyNames: the keys are checked in CEL
        out["x-kubernetes-validations"] = [
            *out.get("x-kubernetes-validations", []),
            *({"rule": rule, "message": message} for rule, message in key_rules),
        ]
    return _readable_order(out)


def _readable_order(node: dict[str, Any]) -> dict[str, Any]:
    """type and description first, nested schemas last: the generated file is read by people too."""
    first = [k for k in ("type", "description", "nullable") if k in node]
    last = [k for k in ("required", "properties", "additionalProperties", "items") if k in node]
    middle = [k for k in node if k not in first and k not in last]
    return {k: node[k] for k in first + middle + last}


def _schema_of(model: type[specs.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})))


def _open_schema() -> dict[str, Any]:
    spec_schema = _schema_of(specs.AdapterMergeSpec)
    status_schema = _schema_of(specs.AdapterMergeStatus)
    # kopf keeps its bookkeeping (status.kopf, handler results) in status: it must survive pruning.
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "description": "Merges PEFT LoRA adapters in delta-W space, as a Kubernetes Job.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }


def crd_manifest() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition for AdapterMerge."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": specs.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": specs.KIND,
                "listKind": f"{specs.KIND}List",
                "plural": specs.PLURAL,
                "singular": specs.SINGULAR,
                "shortNames": [specs.SHORT_NAME],
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": specs.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": _open_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `adaptermerge crd` from merge_worker/spec.py: do not edit by hand.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)
