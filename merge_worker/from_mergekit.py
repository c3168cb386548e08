"""`adaptermerge from-mergekit CONFIG.yml`: a mergekit merge configuration whose models are LoRA adapters
of one base (mergekit's `BASE+ADAPTER` syntax) as an AdapterMerge resource (docs/merging.md).

The translation is exact or refused: whatever mergekit would compute differently from the resource we
write (layer slices, per-layer gradients and filters, whole-weight methods, full fine-tunes) is a
`TranslationError` naming the mergekit field, never a silent approximation. Settings that do not change
the merged weights (int8_mask, mergekit's compute dtype) come back as notes. Pure pydantic + PyYAML.
"""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_worker.spec import (
    API_GROUP, API_VERSION, KIND, METHOD_OPTIONS, METHODS, SpecError, _loc_to_path, parse_resource,
)

# mergekit's per-model ("non-base") parameters that AdapterMerge has per adapter, and its shared ones.
PER_MODEL = ("weight", "density", "gamma", "epsilon")
SHARED = {"normalize", "rescale", "lambda", "int8_mask", "select_topk", "t", "filter_wise", "nuslerp_flatten",
          "nuslerp_row_wise"}
# Parameters each mergekit method takes (mergekit 0.1.5's registry), besides int8_mask where noted.
MERGEKIT_PARAMETERS: dict[str, set[str]] = {
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "density", "normalize", "rescale", "lambda", "int8_mask"},
    "ties": {"weight", "density", "normalize", "rescale", "lambda", "int8_mask"},
    "dare_ties": {"weight", "density", "normalize", "rescale", "lambda", "int8_mask"},
    "dare_linear": {"weight", "density", "normalize", "rescale", "lambda", "int8_mask"},
    "breadcrumbs": {"weight", "density", "gamma", "normalize", "rescale", "lambda", "int8_mask"},
    "breadcrumbs_ties": {"weight", "density", "gamma", "normalize", "rescale", "lambda", "int8_mask"},
    "della": {"weight", "density", "epsilon", "normalize", "rescale", "lambda", "int8_mask"},
    "della_linear": {"weight", "density", "epsilon", "normalize", "rescale", "lambda", "int8_mask"},
    "nuslerp": {"weight", "nuslerp_flatten", "nuslerp_row_wise"},
    "model_stock": {"filter_wise"},
    "sce": {"select_topk", "int8_mask"},
    "slerp": {"t"},
}
# Methods of mergekit with no translation, and why (docs/merging.md has the table).
UNSUPPORTED = {
    "slerp": "interpolates whole weights: equal to linear with weights (1-t, t) only where their cosine"
             " exceeds 0.9995, and off that branch its delta holds a full-rank multiple of the base weights"
             " (docs/merging.md); nuslerp of two adapters with a base model is the task-vector slerp",
    "multislerp": "interpolates on the sphere of whole weights",
    "karcher": "averages whole weights on the sphere",
    "arcee_fusion": "selects by the KL divergence of whole-weight softmaxes",
    "nearswap": "interpolates by the distance between whole weights",
    "passthrough": "copies layers (slices), it does not merge",
    "ram": "not yet implemented for adapters",
    "ramplus_tl": "not yet implemented for adapters",
}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class TranslationError(SpecError):
    """What cannot be translated; `field` is a path into the mergekit YAML (exit code 2)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Model):
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class MergekitConfig(_Model):
    """mergekit's MergeConfiguration, as far as a translation needs it; unknown keys are named."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Any = None
    tokenizer: Any = None
    chat_template: Any = None
    slices: Any = None
    modules: Any = None
    name: str | None = None


def translate(config: dict[str, Any], *, claim: str, output: str, name: str, root: Path | None = None,
              output_format: str = "merged-model") -> tuple[dict[str, Any], list[str]]:
    """The AdapterMerge resource for a loaded mergekit YAML, and notes on what was dropped as harmless.
    Raises TranslationError naming the mergekit field."""
    cfg = _parse(config)
    notes: list[str] = []
    method = cfg.merge_method
    if method in UNSUPPORTED:
        raise TranslationError("merge_method", f"{method} {UNSUPPORTED[method]}")
    if method not in MERGEKIT_PARAMETERS or method not in METHODS:
        raise TranslationError("merge_method", f"unknown mergekit method {method!r}")
    for key in ("slices", "modules"):
        if getattr(cfg, key) is not None:
            raise TranslationError(key, "layer slices and modules are not translatable: AdapterMerge merges"
                                   " every module the adapters target; list the models instead")
    if cfg.tokenizer_source not in (None, "base") or cfg.tokenizer is not None:
        raise TranslationError("tokenizer_source" if cfg.tokenizer is None else "tokenizer",
                               "AdapterMerge keeps the base model's tokenizer")
    if cfg.chat_template is not None:
        raise TranslationError("chat_template", "AdapterMerge keeps the base model's chat template")
    if not cfg.models:
        raise TranslationError("models", "no models to merge")
    if cfg.base_model is None:
        if method != "linear":  # linear averages whole weights; the others need the base's task vectors
            raise TranslationError("base_model", f"mergekit's {method} needs it (the task vectors' origin)")
        base = _split(cfg.models[0].model)[0]  # every model must be BASE+ADAPTER of this one (checked below)
    else:
        base, base_adapter = _split(cfg.base_model)
        if base_adapter is not None:
            raise TranslationError("base_model", "a base with an adapter applied is not a base model")

    accepted = MERGEKIT_PARAMETERS[method]
    shared = _check_parameters(cfg.parameters, "parameters", accepted, per_model=False)
    adapters: list[dict[str, Any]] = []
    base_weight = None  # a plain base model in `models` (linear counts its weight)
    for i, entry in enumerate(cfg.models):
        where = f"models[{i}]"
        model, adapter = _split(entry.model)
        if model != base:
            raise TranslationError(f"{where}.model", f"{entry.model!r} is not {base!r} or {base!r}+ADAPTER:"
                                   " AdapterMerge merges LoRA adapters of one base model; extract an adapter"
                                   " from a full fine-tune first (e.g. mergekit-extract-lora)")
        values = _check_parameters(entry.parameters, f"{where}.parameters", accepted, per_model=True)
        if adapter is None:
            base_weight = values.get("weight", shared.get("weight"))
            notes.append(f"{where}: the base model itself (task vector 0)")
            continue
        ref: dict[str, Any] = {"name": _unique_name(adapter, [a["name"] for a in adapters]),
                               "path": _relative(adapter, root, f"{where}.model")}
        weight = values.get("weight", shared.get("weight"))
        if weight is not None:
            ref["weight"] = weight
        ref.update({key: values[key] for key in ("density", "gamma", "epsilon") if key in values})
        if "weight" in accepted and "weight" not in ref:
            raise TranslationError(f"{where}.parameters.weight", f"mergekit's {method} requires a weight")
        adapters.append(ref)
    if not adapters:
        raise TranslationError("models", "no BASE+ADAPTER model to merge")
    if method == "linear" and cfg.base_model is not None and base_weight is None:
        # mergekit's linear takes base_model as one more input to average, with its own weight.
        base_weight = shared.get("weight")
        if base_weight is None:
            raise TranslationError("base_model", "mergekit's linear averages it in too and needs its weight (in"
                                   " parameters.weight or a models entry); or leave base_model out")

    parameters: dict[str, Any] = {"conventions": "mergekit"}
    parameters.update({key: shared[key] for key in ("density", "gamma", "epsilon") if key in shared})
    allowed = METHOD_OPTIONS.get(method, frozenset())
    if "lambda" in shared:
        parameters["lambda"] = shared["lambda"]
    if "normalize" in shared and "normalize" in allowed:
        parameters["normalize"] = shared["normalize"]
    if "rescale" in shared:
        parameters["rescale"] = "l1" if shared["rescale"] else "none"
    if "select_topk" in shared:
        parameters["selectTopk"] = shared["select_topk"]
    if "int8_mask" in shared:
        notes.append("parameters.int8_mask: only the sign mask's memory type; it does not change the result")
    if shared.get("filter_wise"):
        raise TranslationError("parameters.filter_wise", "model_stock per row is not implemented")
    if shared.get("nuslerp_flatten") is False or shared.get("nuslerp_row_wise"):
        key = "nuslerp_flatten" if shared.get("nuslerp_flatten") is False else "nuslerp_row_wise"
        raise TranslationError(f"parameters.{key}", "nuslerp per row or column is not implemented")
    _fold_linear(method, adapters, base_weight, parameters)
    _hoist_shared(adapters, parameters)

    spec: dict[str, Any] = {
        "volume": {"claimName": claim},
        "baseModel": {"path": _relative(base, root, "base_model")},
        "adapters": adapters,
        "method": method,
        "parameters": parameters,
        "output": {"path": output, "format": output_format},
    }
    dtype = cfg.out_dtype or cfg.dtype
    if dtype is not None:
        field = "out_dtype" if cfg.out_dtype else "dtype"
        if dtype not in DTYPES:
            raise TranslationError(field, f"{dtype!r} is not one of {sorted(DTYPES)}")
        spec["output"]["dtype"] = DTYPES[dtype]
        if cfg.dtype:
            notes.append("dtype: AdapterMerge computes in float32 and writes the output in this dtype")
    resource = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
                "metadata": {"name": name}, "spec": spec}
    try:
        parse_resource(resource)
    except SpecError as exc:
        raise TranslationError(_mergekit_field(exc.field, adapters, cfg), exc.message) from None
    return resource, notes


def _parse(config: Any) -> MergekitConfig:
    if not isinstance(config, dict):
        raise TranslationError("<document>", "expected a mergekit YAML mapping (merge_method, models, ...)")
    try:
        return MergekitConfig.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc_to_path(err["loc"])
        message = "not a mergekit field AdapterMerge knows" if err["type"] == "extra_forbidden" else err["msg"]
        raise TranslationError(field or "<document>", message) from None


def _split(reference: str) -> tuple[str, str | None]:
    """mergekit's `MODEL+LORA` (revisions `@rev` are not translatable: a claim holds one version)."""
    if "@" in reference:
        raise TranslationError("model", f"{reference!r}: revisions (@) are not translatable")
    model, plus, adapter = reference.partition("+")
    return model, (adapter if plus else None)


def _check_parameters(values: dict[str, Any], where: str, accepted: set[str], *, per_model: bool) -> dict[str, Any]:
    for key, value in values.items():
        field = f"{where}.{key}"
        if key not in accepted:
            raise TranslationError(field, "not a parameter of this mergekit method")
        if per_model and key in SHARED:
            raise TranslationError(field, "a global parameter in mergekit, not a per-model one")
        if isinstance(value, (list, dict)):
            raise TranslationError(field, "per-layer gradients and tensor filters are not translatable:"
                                   " AdapterMerge takes one value per adapter")
        if isinstance(value, float) and not math.isfinite(value):
            raise TranslationError(field, "must be a finite number")
    return dict(values)


def _fold_linear(method: str, adapters: list[dict[str, Any]], base_weight: float | None,
                 parameters: dict[str, Any]) -> None:
    """mergekit's linear averages whole weights: W = sum_j w_j W_j / sum_j w_j over every model, the
    base included. With normalize it is the base plus sum_i w_i tau_i / sum_j w_j (the base's weight in
    the divisor); without, the base is scaled by sum_j w_j, which task vectors cannot express unless
    that sum is 1."""
    if method != "linear":
        return
    total = sum(a["weight"] for a in adapters) + (base_weight or 0.0)
    if not parameters.get("normalize", True):
        if abs(total - 1) > 1e-6:
            raise TranslationError("parameters.normalize", f"false with weights summing to {total:g} scales the"
                                   " base weights by that sum; adapters cannot express it")
        return
    if base_weight is None:
        return  # mergekit conventions normalize linear by the adapters' weights already
    divisor = 1.0 if abs(total) < 1e-8 else total
    for a in adapters:
        a["weight"] = a["weight"] / divisor
    parameters["normalize"] = False


def _hoist_shared(adapters: list[dict[str, Any]], parameters: dict[str, Any]) -> None:
    """A per-model value every adapter gives alike becomes the global parameter (weight stays per adapter)."""
    for key in ("density", "gamma", "epsilon"):
        values = [a.get(key) for a in adapters]
        if values[0] is not None and all(v == values[0] for v in values):
            parameters[key] = values[0]
            for a in adapters:
                del a[key]


def _relative(path: str, root: Path | None, field: str) -> str:
    """A path inside the claim: relative as written, or absolute under --root."""
    p = PurePosixPath(path)
    if p.is_absolute():
        if root is None:
            raise TranslationError(field, f"{path!r} is absolute: pass --root with the folder the claim mounts")
        try:
            p = p.relative_to(PurePosixPath(str(root.resolve())))
        except ValueError:
            raise TranslationError(field, f"{path!r} is not under --root {root}") from None
    if ".." in p.parts or not p.parts:
        raise TranslationError(field, f"{path!r} must stay inside the claim (no '..')")
    return str(p)


def _unique_name(path: str, taken: list[str]) -> str:
    """A DNS-label adapter name from the adapter's last path component."""
    stem = re.sub(r"[^a-z0-9-]+", "-", PurePosixPath(path).name.lower()).strip("-")[:50] or "adapter"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name


def _mergekit_field(spec_field: str, adapters: list[dict[str, Any]], cfg: MergekitConfig) -> str:
    """The mergekit field a spec validation error comes from, as near as it can be told."""
    match = re.match(r"spec\.adapters\[(\d+)\]\.(\w+)", spec_field)
    if match:
        index = [i for i, e in enumerate(cfg.models or []) if _split(e.model)[1] is not None][int(match[1])]
        return f"models[{index}].parameters.{match[2]} (spec field {spec_field})"
    parameter = spec_field.removeprefix("spec.parameters.")
    if parameter != spec_field:
        return f"parameters.{parameter} (spec field {spec_field})"
    return spec_field


def load_config(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise TranslationError(str(path), f"cannot read the file: {exc}") from None
    except yaml.YAMLError as exc:
        raise TranslationError(str(path), f"malformed YAML: {exc}") from None


def to_yaml(resource: dict[str, Any]) -> str:
    return yaml.safe_dump(resource, sort_keys=False)
