"""The AdapterMerge resource as pydantic models: the one definition the CLI, the worker, the operator
and the generated CRD (crds/) all share. Pure pydantic: importing this never imports torch.

Field names are the camelCase names of docs/cli.md and docs/operator.md (Python attributes are snake_case); unknown
fields are errors, so a typo like `spec.methd` is named instead of silently ignored.
"""

from __future__ import annotations

import math
import re
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

from merge_worker.job_spec import Job
from merge_worker.spec_base import SpecModel as _Model
from merge_worker.spec_base import cel_rules as _cel

API_GROUP = "adaptermerge.io"
API_VERSION = "v1alpha1"
KIND = "AdapterMerge"
PLURAL = "adaptermerges"
SINGULAR = "adaptermerge"
SHORT_NAME = "am"

# docs/merging.md says what each computes; the names shared with mergekit follow mergekit's definitions
# under `parameters.conventions: mergekit` and keep adaptermerge's under the default conventions.
Method = Literal[
    "linear", "cat", "magnitude_prune", "ties", "dare_linear", "dare_ties", "slerp",
    "task_arithmetic", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "nuslerp", "model_stock",
    "sce",
]
METHODS: tuple[str, ...] = Method.__args__
# Methods whose result depends on `density`; under adaptermerge conventions it is required for these (no
# silent default). Under mergekit conventions, and for mergekit's other sparsifying methods, it defaults
# to 1 as in mergekit.
DENSITY_METHODS = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
# Which optional parameters each method reads; setting one a method ignores is an error naming it.
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "linear": frozenset({"normalize"}),
    "task_arithmetic": frozenset({"normalize"}),
    "ties": frozenset({"normalize", "rescale"}),
    "magnitude_prune": frozenset({"normalize", "rescale"}),
    "dare_linear": frozenset({"normalize", "rescale"}),
    "dare_ties": frozenset({"normalize", "rescale"}),
    "breadcrumbs": frozenset({"normalize", "rescale", "gamma"}),
    "breadcrumbs_ties": frozenset({"normalize", "rescale", "gamma"}),
    "della": frozenset({"normalize", "rescale", "epsilon"}),
    "della_linear": frozenset({"normalize", "rescale", "epsilon"}),
    "sce": frozenset({"selectTopk"}),
}
# mergekit's per-model `density` (per adapter here) exists for its task-arithmetic family only.
PER_ADAPTER_DENSITY_METHODS = (
    "magnitude_prune", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear",
)
Conventions = Literal["adaptermerge", "mergekit"]
# mergekit's defaults for breadcrumbs' gamma and della's epsilon.
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15
Rescale = Literal["l1", "inverse-probability", "none"]
Quantization = Literal["nf4", "fp4", "int8", "none"]
OutputFormat = Literal["adapter", "merged-model"]
DType = Literal["float32", "bfloat16", "float16"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
MAX_LIST_ITEMS = 64  # adapters, evaluation datasets


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


class VolumeRef(_Model):
    """The default PersistentVolumeClaim for every path that names no claim of its own."""

    claim_name: ClaimName
    """Name of a PersistentVolumeClaim in the resource's namespace."""


# A URI in place of a path: an S3 object or prefix (s3://bucket/key; bucket names follow S3's rules, the
# key may not climb with '..': its objects land under the run's scratch folder, named by their key below
# the prefix), or an OCI artifact (oci://registry[:port]/repository:tag or @sha256:<64 hex>; the
# repository and tag follow the OCI distribution spec's grammar).
_S3_URI = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f]*)?"
_OCI_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
OCI_URI = (rf"oci://[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{{1,5}})?/{_OCI_COMPONENT}(/{_OCI_COMPONENT})*"
           r"(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|@sha256:[a-f0-9]{64})")


_URI_PATTERN = rf"^({_S3_URI}|{OCI_URI})$"


def _storage_uri(value: str) -> str:
    # Checked here rather than by a pydantic pattern so the message says what is wrong, not the regex;
    # the CRD carries the same pattern.
    if value.startswith("oci://"):
        if not re.fullmatch(OCI_URI, value):
            raise ValueError(f"{value[:200]!r} is not oci://registry[:port]/repository:tag or"
                             " oci://registry[:port]/repository@sha256:<64 hex> (lowercase repository)")
    elif not re.fullmatch(_S3_URI, value):
        raise ValueError(f"{value[:200]!r} is not s3://bucket/key or oci://registry/repository:tag")
    elif ".." in value.removeprefix("s3://").partition("/")[2].split("/"):
        raise ValueError(f"{value!r}: the key may not contain '..' components")
    return value


StorageUri = Annotated[
    str,
    StringConstraints(max_length=1024),
    AfterValidator(_storage_uri),
    Field(
        description="s3://bucket/prefix in the S3-compatible store spec.storage names, or"
                    " oci://registry/repository:tag (or @sha256:digest) in an OCI registry (docs/storage.md).",
        json_schema_extra={"pattern": _URI_PATTERN, **_cel(
            ("!self.split('/').exists(p, p == '..')", "the key may not contain '..' components")
        )},
    ),
]


class PathRef(_Model):
    """A file or folder on a claim (`path`; `claimName` defaults to `spec.volume.claimName`), or in an
    S3-compatible bucket or an OCI registry (`uri`). Exactly one of path and uri."""

    model_config = ConfigDict(
        json_schema_extra=_cel(("has(self.path) != has(self.uri)", "give exactly one of path and uri"))
    )

    path: RelPath | None = None
    """Path on the claim; or give uri instead."""
    claim_name: ClaimName | None = None
    """PersistentVolumeClaim holding the path; defaults to spec.volume.claimName."""
    uri: StorageUri | None = None
    """s3://bucket/prefix (a folder), s3://bucket/key (a file) or oci://registry/repository:tag (an
    artifact or adapter image) instead of path (docs/storage.md)."""

    @model_validator(mode="after")
    def _path_or_uri(self) -> PathRef:
        if (self.path is None) == (self.uri is None):
            raise ValueError("give exactly one of path and uri")
        if self.uri is not None and self.claim_name is not None:
            raise ValueError("claimName applies to path, not to uri")
        return self


class BaseModelSpec(PathRef):
    """The base model (a Hugging Face folder) the adapters were trained on."""

    quantization: Quantization = "none"
    """How the base model is loaded for evaluation: nf4, fp4, int8 or none (its own dtype)."""


class AdapterRef(PathRef):
    """A PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors)."""

    name: Name
    """Short name of the adapter (a DNS label), unique in spec.adapters."""
    weight: float | None = Field(default=None, description="Defaults to 1 (or parameters.weights).")
    # mergekit's per-model parameters: they override parameters.density/gamma/epsilon for this adapter.
    density: float | None = Field(default=None, gt=0, le=1, description="Overrides parameters.density.")
    gamma: float | None = Field(default=None, ge=0, lt=1, description="Overrides parameters.gamma.")
    epsilon: float | None = Field(default=None, ge=0, lt=0.5, description="Overrides parameters.epsilon.")


class Parameters(_Model):
    """Parameters of the merge method (docs/merging.md)."""

    density: float | None = Field(default=None, gt=0, le=1)
    """Fraction of each task vector kept, in (0, 1]; required by magnitude_prune, ties, dare_linear, dare_ties."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale applied to the merged task vector."""
    t: float = Field(default=0.5, ge=0, le=1)
    """Interpolation factor of slerp, in [0, 1]."""
    seed: int = Field(default=0, ge=0)
    """Seed of the random masks of the dare methods."""
    # Alternative to per-adapter `weight`, in the order of `spec.adapters`.
    weights: list[float] | None = None
    """One weight per adapter, in the order of spec.adapters (instead of adapters[].weight)."""
    conventions: Conventions = Field(
        default="adaptermerge",
        description="mergekit: mergekit's defaults for the names it shares with adaptermerge, int(density*n)"
        " kept entries, and + elected where a sign sum is exactly 0 (docs/merging.md).",
    )
    normalize: bool | None = Field(default=None, description="Divide by the sum of weights; default per method.")
    rescale: Rescale | None = Field(default=None, description="How survivors are rescaled; default per method.")
    gamma: float | None = Field(default=None, ge=0, lt=1, description="breadcrumbs: top fraction removed (0.01).")
    epsilon: float | None = Field(default=None, ge=0, lt=0.5, description="della: probability spread (0.15).")
    select_topk: float | None = Field(default=None, gt=0, le=1,
                                      description="sce: fraction of entries kept by variance (1 when unset).")

    @model_validator(mode="after")
    def _finite(self) -> Parameters:
        for name in ("density", "lambda_", "t", "gamma", "epsilon", "select_topk"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name.rstrip('_')} must be a finite number")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise ValueError("weights must be finite numbers")
        return self


class Output(PathRef):
    """Where and how the merge is written."""

    format: OutputFormat = "adapter"
    """adapter: a PEFT LoRA adapter; merged-model: the base model with the merge folded in."""
    rank: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = 16
    """Rank of the merged adapter, or auto: the smallest rank keeping `energy` of each module."""
    energy: float = Field(default=0.99, gt=0, le=1)
    """Share of the spectral energy rank auto keeps, in (0, 1]."""
    # None: float32 for an adapter, the base model's own dtype for a merged model.
    dtype: DType | None = None
    """Tensor dtype written; unset: float32 for an adapter, the base model's dtype for a merged model."""
    overwrite: bool = False
    """Replace an existing output at the path instead of failing."""
    modules_to_save: Literal["merge", "drop"] = "merge"
    """Full tensors the input adapters carry in modules_to_save (e.g. a trained lm_head): merge keeps
    them merged in an adapter output; drop leaves them out (vLLM refuses adapters that have them,
    docs/serving.md). A merged model always folds them in."""

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto', got {value!r}")


class EvalDataset(PathRef):
    """A JSONL file of prompt/completion rows scoring one skill (docs/evaluation.md)."""

    name: Name
    """Short name of the dataset (a DNS label), unique in evaluation.datasets."""
    adapter: Name = Field(description="Name of the source adapter in spec.adapters for this skill.")
    # Also score greedy completions by exact match (for skills with one right answer).
    exact_match: bool = False
    """Also score greedy completions by exact match (for skills with one right answer)."""
    max_examples: int | None = Field(default=None, ge=1)
    """Score at most this many rows; unset: all."""


class Evaluation(_Model):
    """Scores the merge against each source adapter on its own skill before publishing it."""

    datasets: list[EvalDataset] = Field(
        min_length=1,
        max_length=MAX_LIST_ITEMS,
        json_schema_extra=_cel(
            ("self.all(d, self.exists_one(e, e.name == d.name))", "dataset names must be unique"),
        ),
    )
    """One dataset per skill to score."""
    min_retention: float | None = None
    """Fail (exit 3, RetentionBelowThreshold) when any dataset's retention is below this."""
    publish_below_threshold: bool = True
    """Publish an output whose retention is below minRetention (the run still ends RetentionBelowThreshold).
    false: such an output is discarded, and an existing output stays as it was."""
    batch_size: int = Field(default=8, ge=1)
    """Rows scored per forward pass."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Longest greedy completion generated for exact match."""


# -- search (docs/search.md): many candidate merges scored on a split of the evaluation datasets -----

SearchStrategy = Literal["grid", "random", "tpe"]
SearchObjective = Literal["worst", "mean"]
# Which methods read each searchable parameter (lambda and weights: every method).
SEARCH_PARAMETER_METHODS: dict[str, tuple[str, ...]] = {
    "density": PER_ADAPTER_DENSITY_METHODS,
    "t": ("slerp", "nuslerp"),
}


class SearchValues(_Model):
    """Values one parameter takes in the search: a list of `values`, or a range `min`..`max` (random and
    tpe draw from it; grid takes `steps` evenly spaced values)."""

    values: list[float] | None = Field(default=None, min_length=1, max_length=MAX_LIST_ITEMS)
    """The values to try."""
    min: float | None = None
    """Lower end of the range."""
    max: float | None = None
    """Upper end of the range."""
    steps: int = Field(default=3, ge=1, le=MAX_LIST_ITEMS)
    """How many evenly spaced values of the range grid search tries."""

    @model_validator(mode="after")
    def _one_form(self) -> SearchValues:
        ranged = self.min is not None or self.max is not None
        if (self.values is None) == (not ranged):
            raise ValueError("give either values or min and max")
        if ranged and (self.min is None or self.max is None):
            raise ValueError("a range needs both min and max")
        numbers = self.values if self.values is not None else [self.min, self.max]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError("must be finite numbers")
        if ranged and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def bounds(self) -> tuple[float, float]:
        values = self.values if self.values is not None else [self.min, self.max]
        return min(values), max(values)


class SearchMethod(_Model):
    """One method of the search space and the values of its parameters; an unset parameter keeps
    spec.parameters' value (or the adapters' own weights)."""

    method: Method
    """Merge method (docs/merging.md)."""
    density: SearchValues | None = None
    """Fraction of each task vector kept, in (0, 1]."""
    lambda_: SearchValues | None = Field(default=None, alias="lambda")
    """Scale applied to the merged task vector."""
    t: SearchValues | None = None
    """Interpolation factor of slerp and nuslerp, in [0, 1]."""
    weights: SearchValues | None = None
    """Each adapter's weight, drawn from these values independently of the others."""


class Search(_Model):
    """Search for the merge that keeps the skills best instead of running one (docs/search.md)."""

    space: list[SearchMethod] = Field(min_length=1, max_length=len(METHODS))
    """The methods to try, each with the values of its parameters."""
    strategy: SearchStrategy = "random"
    """grid: every combination in order; random: uniform draws; tpe: Optuna's TPE sampler."""
    trials: int = Field(default=20, ge=1, le=10000)
    """Most candidates scored."""
    seconds: float | None = Field(default=None, gt=0)
    """Stop starting new trials after this many seconds; unset: no time limit."""
    objective: SearchObjective = "worst"
    """worst: the lowest retention across datasets; mean: their weighted mean (datasetWeights)."""
    dataset_weights: dict[str, float] | None = None
    """Weight of each evaluation dataset in the mean objective (default 1 each)."""
    seed: int = Field(default=0, ge=0)
    """Seed of the sampler and of the selection split."""
    selection_fraction: float = Field(default=0.5, gt=0, lt=1)
    """Share of each evaluation dataset's examples the search selects on; the rest is the report split
    the final evaluation scores (docs/search.md)."""


class Storage(_Model):
    """Where the s3:// URIs of the spec live and how the worker reaches them (docs/storage.md)."""

    endpoint: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/.*)?$", max_length=1024)] | None = None
    """URL of an S3-compatible endpoint; unset: AWS S3 (or AWS_ENDPOINT_URL)."""
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")] | None = None
    """Region of the buckets; unset: us-east-1 (or AWS_REGION)."""
    credentials_secret: Name | None = None
    """Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN) in the resource's
    namespace that the Job's worker gets as environment; the operator never reads it. The local CLI
    takes credentials from its environment instead."""
    max_download_bytes: int = Field(default=256 << 30, ge=1)
    """Refuse to download more than this many bytes in all (default 256 GiB)."""


class Registry(_Model):
    """How the worker reaches the OCI registries of the spec's oci:// URIs (docs/storage.md)."""

    credentials_secret: Name | None = None
    """Secret of type kubernetes.io/dockerconfigjson the Job mounts read-only for the worker (the
    operator never reads it). The local CLI reads a Docker config file instead (REGISTRY_AUTH_FILE,
    $DOCKER_CONFIG/config.json or ~/.docker/config.json)."""
    insecure: bool = False
    """Speak plain HTTP to the registries (a registry on a trusted local network); default HTTPS."""
    push_layout: Literal["artifact", "adapter-image"] = "artifact"
    """How an oci:// output is pushed: an ORAS artifact (one layer per file), or adapter-image, the image
    layout KAITO pulls adapters from (the files under /data in one tar layer)."""


class AdapterMergeSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.method != 'slerp' || size(self.adapters) == 2", "slerp needs exactly two adapters"),
            ("self.method != 'nuslerp' || size(self.adapters) == 2", "nuslerp needs exactly two adapters"),
            ("self.method != 'model_stock' || size(self.adapters) >= 2", "model_stock needs two adapters or more"),
            (
                "!(self.method in ['magnitude_prune', 'ties', 'dare_linear', 'dare_ties'])"
                " || (has(self.parameters) && has(self.parameters.density))"
                " || (has(self.parameters) && has(self.parameters.conventions)"
                " && self.parameters.conventions == 'mergekit')"
                " || self.adapters.all(a, has(a.density))",
                "parameters.density is required for this method",
            ),
            (
                "!has(self.parameters) || !has(self.parameters.weights)"
                " || size(self.parameters.weights) == size(self.adapters)",
                "parameters.weights needs one weight per adapter",
            ),
            (
                "has(self.volume) || ((has(self.output.claimName) || has(self.output.uri))"
                " && self.adapters.all(a, has(a.claimName) || has(a.uri)))",
                "every path needs a claimName, or set spec.volume",
            ),
            ("!has(self.search) || has(self.evaluation)", "search needs spec.evaluation to score candidates"),
            ("!has(self.output.uri) || !self.output.uri.startsWith('oci://') || !self.output.uri.contains('@')",
             "an oci:// output is pushed to a tag, not to a digest"),
        )
    )

    volume: VolumeRef | None = None
    """Default claim for every path that names none."""
    storage: Storage | None = None
    """Endpoint, region and credentials of the s3:// URIs; unset: AWS defaults (docs/storage.md)."""
    registry: Registry | None = None
    """Credentials and transport of the oci:// URIs; unset: HTTPS, credentials from a Docker config."""
    base_model: BaseModelSpec | None = None
    """The base model; needed for evaluation and for output format merged-model."""
    # The bound (far above any real merge) also lets the API server estimate the cost of the CRD's
    # per-path CEL rules: without maxItems it assumes a list as long as a request allows and refuses it.
    adapters: list[AdapterRef] = Field(
        min_length=1,
        max_length=MAX_LIST_ITEMS,
        json_schema_extra=_cel(
            ("self.all(a, self.exists_one(b, b.name == a.name))", "adapter names must be unique"),
        ),
    )
    """The adapters to merge, each with a unique name."""
    method: Method
    """Merge method (docs/merging.md)."""
    parameters: Parameters = Field(default_factory=Parameters)
    """Parameters of the method."""
    output: Output
    """The merged adapter or model to write."""
    evaluation: Evaluation | None = None
    """Score the merge before publishing it; unset: no evaluation."""
    # Merge adapters trained on different bases (their adapter_config.json disagree) anyway.
    allow_base_mismatch: bool = False
    """Merge adapters whose adapter_config.json name different base models anyway."""
    job: Job = Field(default_factory=Job)
    """Settings of the Kubernetes Job that runs the merge (ignored by the local CLI)."""
    search: Search | None = None
    """Try many methods and parameters and write the best (docs/search.md); unset: merge once."""

    @model_validator(mode="after")
    def _consistent(self) -> AdapterMergeSpec:
        names = [a.name for a in self.adapters]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _FieldError(f"adapters[{i}].name", f"duplicate adapter name {name!r}")
        if self.method in ("slerp", "nuslerp") and len(self.adapters) != 2:
            raise _FieldError("adapters", f"{self.method} needs exactly two adapters, got {len(self.adapters)}")
        if self.method == "model_stock" and len(self.adapters) < 2:
            raise _FieldError("adapters", f"model_stock needs two adapters or more, got {len(self.adapters)}")
        self._check_method_options()
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
        if self.volume is None:
            for where, ref in self.refs():
                if ref.claim_name is None and ref.uri is None:
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
        if self.output.uri is not None and self.output.uri.startswith("oci://") and "@" in self.output.uri:
            raise _FieldError("output.uri", "an oci:// output is pushed to a tag (oci://registry/repo:tag),"
                              " not to a digest")
        if self.output.format == "merged-model" and self.base_model is None:
            raise _FieldError("baseModel", "output format merged-model needs a base model")
        if self.search is not None:
            from merge_worker.search.validation import check_search

            check_search(self, _FieldError)
        return self

    def _check_method_options(self) -> None:
        p = self.parameters
        mergekit = p.conventions == "mergekit"
        if mergekit and self.method == "slerp":
            raise _FieldError(
                "method", "mergekit's slerp interpolates whole weights, not task vectors; with a base model it"
                " equals nuslerp (docs/merging.md)"
            )
        allowed = METHOD_OPTIONS.get(self.method, frozenset())
        for attr in ("normalize", "rescale", "gamma", "epsilon", "select_topk"):
            # A value, not mere presence: a spec written back with model_dump carries every key, unset as null.
            if getattr(p, attr) is not None and to_camel(attr) not in allowed:
                raise _FieldError(f"parameters.{to_camel(attr)}", f"method {self.method} does not use it")
        if p.rescale == "inverse-probability" and not self.method.startswith(("dare_", "della")):
            raise _FieldError("parameters.rescale", "inverse-probability applies to the random drops of dare_*"
                              " and della*")
        per_adapter = (("density", PER_ADAPTER_DENSITY_METHODS), ("gamma", ("breadcrumbs", "breadcrumbs_ties")),
                       ("epsilon", ("della", "della_linear")))
        for i, a in enumerate(self.adapters):
            for attr, methods in per_adapter:
                if getattr(a, attr) is not None and self.method not in methods:
                    raise _FieldError(f"adapters[{i}].{attr}", f"method {self.method} does not use it")
        if (self.method in DENSITY_METHODS and not mergekit and p.density is None
                and any(a.density is None for a in self.adapters)):
            raise _FieldError("parameters.density", f"required for method {self.method}, in (0, 1]")
        if self.method in ("della", "della_linear"):
            for i, a in enumerate(self.adapters):
                density = a.density or p.density or 1.0
                epsilon = DEFAULT_EPSILON if (a.epsilon, p.epsilon) == (None, None) else (
                    a.epsilon if a.epsilon is not None else p.epsilon)
                if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
                    where = f"adapters[{i}].density" if a.density is not None else "parameters.density"
                    raise _FieldError(where, f"della needs density +/- epsilon in (0, 1): density {density},"
                                      f" epsilon {epsilon}")

    # -- derived values both sides use ----------------------------------------------------------
    def claim_of(self, ref: PathRef) -> str:
        return ref.claim_name or self.volume.claim_name  # type: ignore[union-attr]

    def refs(self) -> list[tuple[str, PathRef]]:
        """Every path or uri the spec names, with its field under spec (the output first)."""
        refs: list[tuple[str, PathRef]] = [("output", self.output)]
        refs += [(f"adapters[{i}]", a) for i, a in enumerate(self.adapters)]
        if self.base_model:
            refs.append(("baseModel", self.base_model))
        if self.evaluation:
            refs += [(f"evaluation.datasets[{i}]", d) for i, d in enumerate(self.evaluation.datasets)]
        return refs

    def claims(self) -> dict[str, bool]:
        """Every claim the spec touches -> whether it must be writable (only the output's is)."""
        claims: dict[str, bool] = {}
        for _, ref in self.refs():
            if ref.uri is not None:
                continue
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
    """The output this generation writes: claimName and path, or uri."""

    claim_name: str | None = None
    """Claim of the output (an output on a volume)."""
    path: str | None = None
    """Path of the output on its claim."""
    uri: str | None = None
    """URI of the output (an output pushed to object storage or a registry)."""
    digest: str | None = None
    """Digest of the pushed output, when the worker reports one (e.g. sha256:... of an OCI artifact)."""
    format: OutputFormat
    """adapter or merged-model."""
    rank: Union[int, Literal["auto"], None] = None
    """Rank written (the worker's, once it reported; the spec's before)."""


class StatusResult(BaseModel):
    """The worker's short result summary (its termination message), as the status carries it."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="allow", use_attribute_docstrings=True
    )
    seconds: float | None = None
    """Seconds the worker took."""
    modules: int | None = None
    """Modules merged."""
    max_reconstruction_error: float | None = None
    """Largest relative error of the rank-limited merge against the exact one."""
    retention: dict[str, float | None] | None = None
    """Retention per evaluation dataset (null: undefined for that dataset)."""
    reason: str | None = None
    """The worker's reason."""


class StatusSearchParameters(_Model):
    """The searchable parameters (spec.search.space[]) a candidate sets."""

    density: float | None = None
    """Density."""
    lambda_: float | None = Field(default=None, alias="lambda")
    """Lambda."""
    t: float | None = None
    """Interpolation factor."""
    weights: list[float] | None = None
    """One weight per adapter, in spec.adapters order."""


class StatusSearchChoice(_Model):
    """A candidate of the search."""

    trial: int | None = None
    """Its trial number."""
    method: Method
    """Its method."""
    parameters: StatusSearchParameters = Field(default_factory=lambda: StatusSearchParameters())
    """The parameters it sets; the others are spec.parameters'."""


class StatusSearch(_Model):
    """A search's progress while its Job runs, then what it chose (docs/search.md)."""

    trials: int
    """Trials scored so far (once finished: in all)."""
    budget: int | None = None
    """At most this many trials (while running)."""
    best_score: float | None = None
    """The best candidate's score on the search split (null: undefined)."""
    best: StatusSearchChoice
    """The best candidate so far (once finished: the one written)."""


class Condition(_Model):
    """A condition in the Kubernetes convention (metav1.Condition)."""

    type: str
    """Condition type, e.g. Ready."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str
    """Machine-readable reason of the last transition."""
    message: str = ""
    """Human-readable details."""
    last_transition_time: str | None = None
    """When status last changed."""
    observed_generation: int | None = None
    """The generation this condition describes."""


class AdapterMergeStatus(_Model):
    model_config = ConfigDict(extra="allow")  # kopf keeps its own bookkeeping here
    phase: Phase | None = None
    """Pending, Running, Succeeded or Failed (docs/operator.md)."""
    observed_generation: int | None = None
    """The generation of the spec this status describes."""
    job_name: str | None = None
    """The Job running this generation's merge."""
    start_time: str | None = None
    """When the Job started."""
    completion_time: str | None = None
    """When the merge finished."""
    output: StatusOutput | None = None
    """The output this generation writes."""
    result: StatusResult | None = None
    """The worker's result summary."""
    search: StatusSearch | None = None
    """spec.search only: trial k of n and the best so far while the Job runs, then the chosen candidate."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions (Ready) in the Kubernetes convention."""


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
