"""The AdapterMerge resource as pydantic models: the one definition the CLI, the worker, the operator
and the generated CRD (crds/) all share. Pure pydantic: importing this never imports torch.

Field names are the camelCase names of ../shared/API.md (Python attributes are snake_case); unknown
fields are errors, so a typo like `spec.methd` is named instead of silently ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "adaptermerge.io"
API_VERSION = "v1alpha1"
KIND = "AdapterMerge"
PLURAL = "adaptermerges"
SINGULAR = "adaptermerge"
SHORT_NAME = "am"

Method = Literal["linear", "cat", "magnitude_prune", "ties", "dare_linear", "dare_ties", "slerp"]
METHODS: tuple[str, ...] = Method.__args__
# Methods whose result depends on `density`; for these it is required (no silent default).
DENSITY_METHODS = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
Quantization = Literal["nf4", "fp4", "int8", "none"]
OutputFormat = Literal["adapter", "merged-model"]
DType = Literal["float32", "bfloat16", "float16"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
MAX_LIST_ITEMS = 64  # adapters, evaluation datasets


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules the CRD carries for what the schema alone cannot say (read by merge_worker.crd)."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


# A DNS-1123 label: adapter and dataset names become keys in status and file names.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


# A path inside a volume: relative, no `..` component. Symlinks leaving the volume are caught on disk.
def _relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be a relative path inside the volume, without '..'")
    return value


RelPath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1024),
    AfterValidator(_relative_path),
    Field(
        description="Path inside the volume: relative, without '..' components.",
        json_schema_extra=_cel(
            ("!self.startsWith('/') && !self.split('/').exists(p, p == '..')",
             "must be a relative path inside the volume, without '..'")
        ),
    ),
]
ClaimName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", max_length=253)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class VolumeRef(_Model):
    claim_name: ClaimName


class PathRef(_Model):
    """A file or folder on a claim; `claimName` defaults to `spec.volume.claimName`."""

    path: RelPath
    claim_name: ClaimName | None = None


class BaseModelSpec(PathRef):
    quantization: Quantization = "none"


class AdapterRef(PathRef):
    name: Name
    weight: float | None = Field(default=None, description="Defaults to 1 (or parameters.weights).")


class Parameters(_Model):
    density: float | None = Field(default=None, gt=0, le=1)
    lambda_: float = Field(default=1.0, alias="lambda")
    t: float = Field(default=0.5, ge=0, le=1)
    seed: int = Field(default=0, ge=0)
    # Alternative to per-adapter `weight`, in the order of `spec.adapters`.
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _finite(self) -> Parameters:
        for name in ("density", "lambda_", "t"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name.rstrip('_')} must be a finite number")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise ValueError("weights must be finite numbers")
        return self


class Output(PathRef):
    format: OutputFormat = "adapter"
    rank: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = 16
    energy: float = Field(default=0.99, gt=0, le=1)
    # None: float32 for an adapter, the base model's own dtype for a merged model.
    dtype: DType | None = None
    overwrite: bool = False

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto', got {value!r}")


class EvalDataset(PathRef):
    name: Name
    adapter: Name = Field(description="Name of the source adapter in spec.adapters for this skill.")
    # Also score greedy completions by exact match (for skills with one right answer).
    exact_match: bool = False
    max_examples: int | None = Field(default=None, ge=1)


class Evaluation(_Model):
    datasets: list[EvalDataset] = Field(min_length=1, max_length=MAX_LIST_ITEMS)
    min_retention: float | None = None
    publish_below_threshold: bool = Field(
        default=True,
        description="Publish an output whose retention falls below minRetention (the run still ends "
                    "RetentionBelowThreshold). false: such an output is discarded and any existing one kept.",
    )
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)


class Job(_Model):
    """Kubernetes-only settings; the local CLI ignores them."""

    gpus: int = Field(default=1, ge=0)
    resources: dict[str, Any] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str = ""
    queue_name: str = ""
    backoff_limit: int = Field(default=2, ge=0)
    active_deadline_seconds: int = Field(default=7200, ge=1)
    ttl_seconds_after_finished: int = Field(default=86400, ge=0)


class AdapterMergeSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.method != 'slerp' || size(self.adapters) == 2", "slerp needs exactly two adapters"),
            (
                "!(self.method in ['magnitude_prune', 'ties', 'dare_linear', 'dare_ties'])"
                " || (has(self.parameters) && has(self.parameters.density))",
                "parameters.density is required for this method",
            ),
            (
                "!has(self.parameters) || !has(self.parameters.weights)"
                " || size(self.parameters.weights) == size(self.adapters)",
                "parameters.weights needs one weight per adapter",
            ),
            (
                "has(self.volume) || (has(self.output.claimName) && self.adapters.all(a, has(a.claimName)))",
                "every path needs a claimName, or set spec.volume",
            ),
        )
    )

    volume: VolumeRef | None = None
    base_model: BaseModelSpec | None = None
    # The bound (far above any real merge) also lets the API server estimate the cost of the CRD's
    # per-path CEL rules: without maxItems it assumes a list as long as a request allows and refuses it.
    adapters: list[AdapterRef] = Field(min_length=1, max_length=MAX_LIST_ITEMS)
    method: Method
    parameters: Parameters = Field(default_factory=Parameters)
    output: Output
    evaluation: Evaluation | None = None
    # Merge adapters trained on different bases (their adapter_config.json disagree) anyway.
    allow_base_mismatch: bool = False
    job: Job = Field(default_factory=Job)

    @model_validator(mode="after")
    def _consistent(self) -> AdapterMergeSpec:
        names = [a.name for a in self.adapters]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _FieldError(f"adapters[{i}].name", f"duplicate adapter name {name!r}")
        if self.method == "slerp" and len(self.adapters) != 2:
            raise _FieldError("adapters", f"slerp needs exactly two adapters, got {len(self.adapters)}")
        if self.method in DENSITY_METHODS and self.parameters.density is None:
            raise _FieldError("parameters.density", f"required for method {self.method}, in (0, 1]")
        weights = self.parameters.weights
        if weights is not None:
            if len(weights) != len(self.adapters):
                raise _FieldError(
                    "parameters.weights",
                    f"{len(weights)} weights given for {len(self.adapters)} adapters",
                )
            for i, a in enumerate(self.adapters):
                if a.weight is not None:
                    raise _FieldError(
                        f"adapters[{i}].weight", "give weights either per adapter or in parameters.weights"
                    )
        for i, a in enumerate(self.adapters):
            if a.weight is not None and not math.isfinite(a.weight):
                raise _FieldError(f"adapters[{i}].weight", "must be a finite number")
        refs = [("output", self.output)] + [(f"adapters[{i}]", a) for i, a in enumerate(self.adapters)]
        if self.base_model:
            refs.append(("baseModel", self.base_model))
        if self.evaluation:
            refs += [(f"evaluation.datasets[{i}]", d) for i, d in enumerate(self.evaluation.datasets)]
        if self.volume is None:
            for where, ref in refs:
                if ref.claim_name is None:
                    raise _FieldError(f"{where}.claimName", "no claimName and no spec.volume to default to")
        if self.evaluation:
            seen: list[str] = []
            for i, d in enumerate(self.evaluation.datasets):
                if d.adapter not in names:
                    raise _FieldError(
                        f"evaluation.datasets[{i}].adapter", f"{d.adapter!r} is not in spec.adapters"
                    )
                if d.name in seen:
                    raise _FieldError(f"evaluation.datasets[{i}].name", f"duplicate dataset name {d.name!r}")
                seen.append(d.name)
            if self.base_model is None:
                raise _FieldError("baseModel", "evaluation needs a base model")
        if self.output.format == "merged-model" and self.base_model is None:
            raise _FieldError("baseModel", "output format merged-model needs a base model")
        return self

    # -- derived values both sides use ----------------------------------------------------------
    def claim_of(self, ref: PathRef) -> str:
        return ref.claim_name or self.volume.claim_name  # type: ignore[union-attr]

    def claims(self) -> dict[str, bool]:
        """Every claim the spec touches -> whether it must be writable (only the output's is)."""
        refs: list[PathRef] = [*self.adapters, self.output]
        if self.base_model:
            refs.append(self.base_model)
        if self.evaluation:
            refs += self.evaluation.datasets
        claims: dict[str, bool] = {}
        for ref in refs:
            claims[self.claim_of(ref)] = claims.get(self.claim_of(ref), False) or ref is self.output
        return claims

    def adapter_weights(self) -> list[float]:
        if self.parameters.weights is not None:
            return list(self.parameters.weights)
        return [1.0 if a.weight is None else a.weight for a in self.adapters]


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    namespace: str | None = None


class AdapterMerge(BaseModel):
    """The whole resource as a user writes it (kubectl apply, or `adaptermerge run FILE`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal[f"{API_GROUP}/{API_VERSION}"] = Field(alias="apiVersion")
    kind: Literal["AdapterMerge"]
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: AdapterMergeSpec
    status: dict[str, Any] | None = None  # present in `kubectl get -o yaml` output; ignored


# -- status (written by the operator, read by users and GitOps tools) ------------------------------


class StatusOutput(_Model):
    claim_name: str
    path: str
    format: OutputFormat
    rank: Union[int, Literal["auto"], None] = None


class StatusResult(BaseModel):
    """The worker's short result summary (its termination message), as the status carries it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    seconds: float | None = None
    modules: int | None = None
    max_reconstruction_error: float | None = None
    retention: dict[str, float | None] | None = None
    reason: str | None = None


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class AdapterMergeStatus(_Model):
    model_config = ConfigDict(extra="allow")  # kopf keeps its own bookkeeping here
    phase: Phase | None = None
    observed_generation: int | None = None
    job_name: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    output: StatusOutput | None = None
    result: StatusResult | None = None
    conditions: list[Condition] = Field(default_factory=list)


class _FieldError(ValueError):
    """A spec error that knows which field (dotted camelCase path under spec) it is about."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SpecError(ValueError):
    """Invalid input; `field` is a path like `spec.adapters[1].path` (exit code 2)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "str", "constrained-int", "literal['auto']", "function-after[_finite()]"):
            continue  # union-branch labels pydantic inserts, meaningless to a user
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_resource(data: Any) -> AdapterMerge:
    """Validates a loaded YAML document; every problem becomes a SpecError naming the field."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise SpecError("<document>", "expected a YAML mapping with apiVersion, kind, metadata, spec")
    try:
        return AdapterMerge.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            raise SpecError(f"spec.{ctx_error.field}", ctx_error.message) from None
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise SpecError(_loc_to_path(err["loc"]) or "<document>", msg + more) from None


def parse_spec(data: Any) -> AdapterMergeSpec:
    """Validates a bare spec (the operator's view: kopf hands it over without apiVersion/kind)."""
    return parse_resource(
        {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "spec": data}
    ).spec
