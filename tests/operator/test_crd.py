"""The generated CustomResourceDefinition: current on disk, structural, and faithful to the spec models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml
from pydantic import BaseModel, Field

from merge_worker import crd, spec

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "adaptermerge.io_adaptermerges.yaml"


def version() -> dict[str, Any]:
    return crd.crd_manifest()["spec"]["versions"][0]


def open_schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = ""):
    """Every schema node with its path, children after parents."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def rules_in(node: Any) -> set[str]:
    """Every CEL rule anywhere in a (pydantic or CRD) schema."""
    found: set[str] = set()
    if isinstance(node, dict):
        found |= {v["rule"] for v in node.get("x-kubernetes-validations", [])}
        for value in node.values():
            found |= rules_in(value)
    elif isinstance(node, list):
        for value in node:
            found |= rules_in(value)
    return found


def test_checked_in_file_is_the_generated_crd():
    assert CRD_FILE.read_text() == crd.crd_yaml(), "run: adaptermerge crd > crds/adaptermerge.io_adaptermerges.yaml"


def test_cli_prints_the_checked_in_crd():
    cli = Path(sys.executable).parent / "adaptermerge"
    done = subprocess.run([str(cli), "crd"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == CRD_FILE.read_text()


def test_generated_yaml_parses_back_to_the_manifest():
    assert yaml.safe_load(crd.crd_yaml()) == crd.crd_manifest()


def test_names_scope_and_subresources():
    manifest = crd.crd_manifest()
    names = manifest["spec"]["names"]
    assert manifest["metadata"]["name"] == "adaptermerges.adaptermerge.io"
    assert (names["kind"], names["plural"], names["singular"]) == ("AdapterMerge", "adaptermerges", "adaptermerge")
    assert names["shortNames"] == ["am"] and names["categories"] == ["all"]
    assert manifest["spec"]["scope"] == "Namespaced"
    assert version()["name"] == "v1alpha1" and version()["storage"] and version()["served"]
    assert version()["subresources"] == {"status": {}}


def test_schema_is_structural():
    """The rules of https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema
    that pydantic's JSON schema breaks unless rewritten."""
    for path, node in walk(open_schema()):
        assert not {"$ref", "$defs", "title", "anyOf", "oneOf", "allOf", "const", "default"} & node.keys(), path
        open_ended = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or open_ended, f"{path} has no type"
        if node.get("additionalProperties") is not None:
            assert isinstance(node["additionalProperties"], dict), path
            assert "properties" not in node, f"{path}: properties and additionalProperties are exclusive"
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(flag, True), bool), f"{path}.{flag} must be a boolean in OpenAPI v3.0"


def test_every_cel_rule_of_the_spec_models_is_in_the_crd():
    declared = rules_in(spec.AdapterMergeSpec.model_json_schema(by_alias=True))
    assert declared, "spec.py declares CEL rules"
    assert declared <= rules_in(open_schema()["properties"]["spec"])


def test_every_spec_field_is_in_the_schema():
    """A field the CRD does not know would be pruned silently by the apiserver."""
    schema = open_schema()["properties"]["spec"]

    def check(model: type[BaseModel], node: dict[str, Any], where: str) -> None:
        for name, field in model.model_fields.items():
            alias = field.alias or name
            assert alias in node["properties"], f"{where}.{alias} missing from the CRD"

    check(spec.AdapterMergeSpec, schema, "spec")
    check(spec.Output, schema["properties"]["output"], "spec.output")
    check(spec.Job, schema["properties"]["job"], "spec.job")
    check(spec.Parameters, schema["properties"]["parameters"], "spec.parameters")
    check(spec.AdapterRef, schema["properties"]["adapters"]["items"], "spec.adapters[]")


def test_kubernetes_fields_of_the_job_are_modelled_not_free_form():
    """resources, affinity and tolerations are checked at kubectl apply, so the Job is never refused later."""
    for path, node in walk(open_schema()["properties"]["spec"]):
        assert not node.get("x-kubernetes-preserve-unknown-fields"), f"{path} is free-form"
    job = open_schema()["properties"]["spec"]["properties"]["job"]["properties"]
    assert job["nodeSelector"]["additionalProperties"]["pattern"] == r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
    assert job["tolerations"]["items"]["properties"]["operator"]["enum"] == ["Exists", "Equal"]


def test_every_field_has_a_description_and_shows_its_default():
    """`kubectl explain adaptermerge.spec...` documents every field, defaults included."""
    for path, node in walk(open_schema()["properties"]["spec"]):
        assert path == "" or node.get("description") or path.endswith("[]") or path.endswith("{}"), path
    output = open_schema()["properties"]["spec"]["properties"]["output"]["properties"]
    assert output["rank"]["description"].endswith("Defaults to 16.")
    assert output["format"]["description"].endswith('Defaults to "adapter".')


def test_kopf_bookkeeping_in_status_survives_pruning():
    status = open_schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert {"phase", "observedGeneration", "jobName", "conditions", "output", "result"} <= status["properties"].keys()


def test_printer_columns_point_at_fields_that_exist():
    columns = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    assert {"Method", "Phase", "Output", "URI", "Age"} <= columns.keys()
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    for name in ("Method", "Phase", "Output", "URI"):
        node = open_schema()
        for part in columns[name]["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == "string", name


def test_list_bounds_keep_cel_costs_inside_the_budget():
    # Without maxItems the apiserver refuses the per-path rule inside these lists (cost budget).
    props = open_schema()["properties"]["spec"]["properties"]
    assert props["adapters"]["maxItems"] >= 16
    assert props["evaluation"]["properties"]["datasets"]["maxItems"] >= 16


# -- the rewriting rules, each on a tiny model ---------------------------------------------------------


class Tiny(BaseModel):
    rank: Annotated[int, Field(ge=1)] | Literal["auto"] = 4
    maybe: float | None = None
    fraction: float = Field(default=0.5, gt=0, lt=1)
    free: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    mode: Literal["only"] = "only"


def tiny_schema() -> dict[str, Any]:
    raw = Tiny.model_json_schema()
    return crd._structural(crd._resolve(raw, raw.get("$defs", {})))["properties"]


def test_int_or_string_union_becomes_int_or_string_with_a_cel_rule():
    rank = tiny_schema()["rank"]
    assert rank["x-kubernetes-int-or-string"] is True and "type" not in rank
    [rule] = rank["x-kubernetes-validations"]
    assert "self >= 1" in rule["rule"] and "self == 'auto'" in rule["rule"]


def test_optional_becomes_nullable_and_defaults_are_left_to_pydantic():
    maybe = tiny_schema()["maybe"]
    assert maybe == {"type": "number", "nullable": True}


def test_exclusive_bounds_become_openapi_v3_flags():
    fraction = tiny_schema()["fraction"]
    assert (fraction["minimum"], fraction["exclusiveMinimum"]) == (0, True)
    assert (fraction["maximum"], fraction["exclusiveMaximum"]) == (1, True)


def test_maps_and_constants():
    props = tiny_schema()
    assert props["free"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert props["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["mode"]["enum"] == ["only"]


def test_an_untranslatable_union_is_refused_instead_of_guessed():
    class Odd(BaseModel):
        value: int | list[int]

    raw = Odd.model_json_schema()
    with pytest.raises(ValueError, match="no structural form"):
        crd._structural(raw)
