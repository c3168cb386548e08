"""Reads PEFT LoRA adapter folders into per-module `LoraFactors`, lazily.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or a pickle
`adapter_model.bin`, loaded only with `torch.load(weights_only=True)`: never full unpickling).
Opening an adapter reads only the config and the tensor index; a module's tensors are loaded when
asked for, so merging streams module by module.

PEFT's names are normalised to the base model's module names: `base_model.model.` is dropped, and
`<module>.lora_A[.<adapter>].weight` / `<module>.lora_embedding_A[.<adapter>]` give the factors of
`<module>` (e.g. `model.layers.0.self_attn.q_proj`). rank_pattern / alpha_pattern keys match module
names the way PEFT matches them (`get_pattern_key`), within a time bound (merge_worker.inputs.patterns).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from merge_worker.inputs.errors import InputError
from merge_worker.inputs.config_files import AdapterConfigFile
from merge_worker.inputs.json_files import JsonFileError, read_json_model
from merge_worker.inputs.patterns import PatternError, first_matches
from merge_worker.inputs.safetensors_file import DTYPES, SafetensorsError, SafetensorsFile
from merge_worker.inputs.volume_files import InputFile, InputFolder, PathRefused, VolumeRoot

if TYPE_CHECKING:
    import numpy as np
    import torch

    from merge_worker.factors import LoraFactors

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# The dense delta of one module (out x in, float32) may have at most this many elements: the largest
# module of today's largest open models (an embedding of 128256 x 16384) fits; a small adapter declaring
# a huge shape does not make the merge allocate it. docs/cli.md states the memory this bounds.
MAX_MODULE_ELEMENTS = 1 << 31

# linear: lora_A (r, in) / lora_B (out, r), delta-W = B @ A. embedding: lora_embedding_A (r, num_embeddings)
# / lora_embedding_B (dim, r); the weight's delta is (B @ A)^T. Both merge the same way in B @ A space.
ModuleKind = Literal["linear", "embedding"]

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<role>[AB])(?:\.(?P<adapter>[^.]+))?$")
# PEFT saves the embedding layer it wraps alongside its LoRA factors (save_embedding_layers): base data.
_BASE_LAYER_KEY = re.compile(r"^.+\.(?:base_layer|original_module)\.[^.]+$")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+(?=\.[^.]+$)")

class AdapterError(InputError):
    """An unusable adapter; the message names the adapter folder (and the tensor, when one is at fault)."""


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules_to_save: tuple[str, ...]
    base_model_name_or_path: str | None
    fan_in_fan_out: bool
    task_type: str | None

    @property
    def raw(self) -> dict[str, Any]:
        """The fields a written adapter_config.json carries over from its inputs."""
        return {"task_type": self.task_type}

    @classmethod
    def read(cls, file: InputFile, folder: Path) -> AdapterConfig:
        try:
            typed = read_json_model(file, AdapterConfigFile)
        except JsonFileError as exc:
            raise AdapterError(folder, f"{CONFIG_FILE}: {exc}") from None
        return cls.from_model(typed, folder)

    @classmethod
    def from_model(cls, raw: AdapterConfigFile, folder: Path) -> AdapterConfig:
        def unsupported(what: str) -> AdapterError:
            return AdapterError(folder, f"{CONFIG_FILE}: {what} is not supported yet")

        if raw.peft_type != "LORA":
            raise unsupported(f"peft_type {raw.peft_type[:40]!r} (only LORA adapters merge)")
        if raw.use_dora:
            raise unsupported("DoRA (use_dora: true)")
        if raw.bias != "none" or raw.lora_bias:
            raise unsupported("training biases (bias / lora_bias)")
        if raw.trainable_token_indices:
            raise unsupported("trainable_token_indices")
        modules_to_save = raw.modules_to_save or ()
        if isinstance(modules_to_save, str):
            modules_to_save = (modules_to_save,)
        return cls(
            r=raw.r,
            lora_alpha=float(raw.r if raw.lora_alpha is None else raw.lora_alpha),
            use_rslora=raw.use_rslora,
            rank_pattern=dict(raw.rank_pattern or {}),
            alpha_pattern=dict(raw.alpha_pattern or {}),
            modules_to_save=tuple(modules_to_save),
            base_model_name_or_path=raw.base_model_name_or_path,
            fan_in_fan_out=raw.fan_in_fan_out,
            task_type=raw.task_type,
        )

    def scale(self, rank: int, alpha: float) -> float:
        """alpha / r (alpha / sqrt(r) with rslora), for a module's rank and alpha after the patterns."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def saves_module(self, module: str) -> bool:
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)

    def resolve_patterns(self, modules: list[str]) -> dict[str, tuple[int, float]]:
        """Each module's (rank, alpha) after rank_pattern and alpha_pattern, matched within a time bound.
        Raises PatternError naming the field."""
        result = {m: (self.r, self.lora_alpha) for m in modules}
        for field, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not pattern:
                continue
            keys, values = list(pattern), list(pattern.values())
            try:
                matches = first_matches(keys, modules)
            except PatternError as exc:
                raise PatternError(f"{field}: {exc}") from None
            for module, index in matches.items():
                if index is not None:
                    rank, alpha = result[module]
                    result[module] = (int(values[index]), alpha) if field == "rank_pattern" else \
                        (rank, float(values[index]))
        return result


@dataclass(frozen=True)
class ModuleEntry:
    """Where one module's factors live in the weights file, and their shapes (read from the index)."""

    name: str
    kind: ModuleKind
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module's delta in B @ A space."""
        return (self.b_shape[0], self.a_shape[1])


class _TensorFile:
    """Tensor access by key: safetensors through our own reader (read through the checked fd), a pickle
    through torch.load(weights_only=True) of that same fd."""

    def __init__(self, file: InputFile, adapter: Path):
        self.file = file
        self._adapter = adapter
        if file.name.endswith(".safetensors"):
            try:
                self._safetensors: SafetensorsFile | None = SafetensorsFile(file)
            except (SafetensorsError, PathRefused) as exc:
                raise AdapterError(adapter, f"{file.name}: {exc}") from None
            self._dict = None
            self._shapes = {k: self._safetensors.shape(k) for k in self._safetensors.keys()}
            self._dtypes = {k: self._safetensors.dtype(k) for k in self._safetensors.keys()}
        else:
            self._safetensors = None
            self._dict = _load_pickle(file, adapter)
            self._shapes = {k: tuple(v.shape) for k, v in self._dict.items()}
            self._dtypes = {k: _code_of(v.dtype) for k, v in self._dict.items()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        """The safetensors dtype code (F32, BF16, I64...; '?' for a pickled dtype without one)."""
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        if self._dict is not None:
            return self._dict[key]
        return self._safetensors.tensor(key)

    def array(self, key: str) -> np.ndarray:
        """The stored elements (torch-free), for comparisons."""
        if self._dict is not None:
            import torch

            return self._dict[key].contiguous().view(-1).view(torch.uint8).numpy()
        return self._safetensors.array(key)

    def first_unusable(self) -> tuple[str, str] | None:
        """(tensor, problem) for the first float tensor holding NaN/Inf or overflowing float32."""
        if self._safetensors is not None:
            return self._safetensors.first_unusable()
        import torch

        for key, tensor in self._dict.items():
            if tensor.is_floating_point():
                if not bool(torch.isfinite(tensor).all()):
                    return key, "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                if tensor.dtype == torch.float64 and bool((tensor.abs() > torch.finfo(torch.float32).max).any()):
                    return key, "a value beyond float32's range (it would become Inf)"
        return None


def _code_of(dtype: Any) -> str:
    return next((code for code, d in DTYPES.items() if d.torch_name == str(dtype).removeprefix("torch.")), "?")


def _load_pickle(file: InputFile, adapter: Path) -> dict[str, torch.Tensor]:
    try:
        import torch
    except ImportError:
        raise AdapterError(adapter, f"{file.name} is a pickle, which only torch reads: install "
                                    "adaptermerge[worker] or convert the adapter to safetensors") from None
    try:
        try:  # through the checked fd: /proc/self/fd/N opens that very file again
            data = torch.load(file.proc_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(file.proc_path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise AdapterError(
            adapter, f"{file.name} cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__})"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterError(adapter, f"{file.name} must hold a dict of tensor name -> tensor")
    return data


class Adapter:
    """One PEFT LoRA adapter: its config, its module index, lazily loaded factors."""

    def __init__(self, folder: InputFolder):
        self.folder = folder
        self.path = folder.path  # for messages
        self._config_file = _open_input(folder, CONFIG_FILE, "(not a PEFT adapter folder)")
        self.config = AdapterConfig.read(self._config_file, self.path)
        weights = _weights_file(folder)
        self.weights_path = folder.path / weights.name
        self._file = _TensorFile(weights, self.path)
        self.modules: dict[str, ModuleEntry] = {}
        # modules_to_save tensors: base-model tensor name (e.g. "lm_head.weight") -> key in the file
        self.saved: dict[str, str] = {}
        self._index(self._file.keys())
        self._view = None

    # -- index -------------------------------------------------------------------------------------
    def _index(self, keys: list[str]) -> None:
        factors: dict[str, dict[str, str]] = {}
        kinds: dict[str, ModuleKind] = {}
        adapter_names: set[str] = set()
        for key in keys:
            name = key.removeprefix(PEFT_PREFIX)
            if "lora_magnitude_vector" in name:
                raise AdapterError(self.path, f"tensor {key}: DoRA adapters are not supported yet")
            match = _LINEAR_KEY.match(name) or _EMBEDDING_KEY.match(name)
            if match:
                module, role = match["module"], match["role"][-1]
                kind: ModuleKind = "linear" if match.re is _LINEAR_KEY else "embedding"
                if match["adapter"]:
                    adapter_names.add(match["adapter"])
                if kinds.setdefault(module, kind) != kind or role in factors.get(module, {}):
                    raise AdapterError(self.path, f"tensor {key}: module {module} has conflicting factors")
                factors.setdefault(module, {})[role] = key
            elif _BASE_LAYER_KEY.match(name):
                continue  # a copy of base weights that PEFT stores for reference, not a delta
            elif self.config.saves_module(_module_of(_SAVED_WRAPPER.sub("", name))):
                self.saved[_SAVED_WRAPPER.sub("", name)] = key
            else:
                raise AdapterError(
                    self.path, f"tensor {key} is neither a LoRA factor nor in modules_to_save"
                )
        if len(adapter_names) > 1:
            raise AdapterError(
                self.path, f"the file holds several adapters ({sorted(adapter_names)[:8]}); save one per folder"
            )
        try:
            patterns = self.config.resolve_patterns(sorted(factors))
        except PatternError as exc:
            raise AdapterError(self.path, f"{CONFIG_FILE}: {exc}") from None
        for module, roles in sorted(factors.items()):
            self.modules[module] = self._entry(module, kinds[module], roles, *patterns[module])
        if not self.modules and not self.saved:
            raise AdapterError(self.path, f"{self.weights_path.name} holds no LoRA tensors")

    def _entry(self, module: str, kind: ModuleKind, roles: dict[str, str], rank: int, alpha: float) -> ModuleEntry:
        if set(roles) != {"A", "B"}:
            missing = "A" if "A" not in roles else "B"
            raise AdapterError(self.path, f"module {module} has no lora_{missing} tensor")
        a_shape, b_shape = self._file.shape(roles["A"]), self._file.shape(roles["B"])
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(
                self.path,
                f"tensor {roles['A']} has shape {list(a_shape)}: only Linear and Embedding LoRA "
                "layers are supported yet (not convolutions)",
            )
        for role in ("A", "B"):
            code = self._file.dtype(roles[role])
            if code not in DTYPES or not DTYPES[code].is_float:
                raise AdapterError(self.path, f"tensor {roles[role]} has dtype {code}; LoRA factors are "
                                              "floating point")
        if a_shape[0] != b_shape[1] or a_shape[0] != rank:
            raise AdapterError(
                self.path,
                f"module {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not match "
                f"the rank {rank} that {CONFIG_FILE} gives it",
            )
        if 0 in a_shape or 0 in b_shape:
            raise AdapterError(self.path, f"module {module}: a factor of shape {list(a_shape)} / "
                                          f"{list(b_shape)} is empty")
        if b_shape[0] * a_shape[1] > MAX_MODULE_ELEMENTS:
            raise AdapterError(self.path, f"module {module}: a delta of shape {[b_shape[0], a_shape[1]]} has "
                                          f"more than {MAX_MODULE_ELEMENTS} elements (the bound of docs/cli.md)")
        return ModuleEntry(module, kind, roles["A"], roles["B"], a_shape, b_shape, rank,
                           self.config.scale(rank, alpha))

    # -- lazy tensors ------------------------------------------------------------------------------
    def factors(self, module: str) -> LoraFactors:
        from merge_worker.factors import LoraFactors

        entry = self.modules[module]
        return LoraFactors(a=self._file.get(entry.a_key), b=self._file.get(entry.b_key), scale=entry.scale)

    def saved_tensor(self, name: str) -> torch.Tensor:
        return self._file.get(self.saved[name])

    def saved_shape(self, name: str) -> tuple[int, ...]:
        return self._file.shape(self.saved[name])

    def saved_bytes(self, name: str) -> tuple[str, tuple[int, ...], bytes]:
        """A modules_to_save tensor's dtype, shape and stored bytes (torch-free, for comparisons)."""
        key = self.saved[name]
        return self._file.dtype(key), self._file.shape(key), self._file.array(key).tobytes()

    def check_finite(self) -> None:
        """Raises naming the first tensor holding NaN or Inf (or a float64 value float32 cannot hold)."""
        try:
            bad = self._file.first_unusable()
        except PathRefused as exc:  # the file shrank while being read
            raise AdapterError(self.path, f"{self.weights_path.name} {exc}") from None
        if bad is not None:
            key, problem = bad
            raise AdapterError(self.path, f"tensor {key} in {self.weights_path.name} holds {problem}")

    def files(self) -> list[Path]:
        """Paths that read exactly the files this adapter was read from (for hashing and loaders)."""
        return [self.view / CONFIG_FILE, self.view / self.weights_path.name]

    @property
    def view(self) -> Path:
        """A folder with this adapter's config and weights, for loaders that take a path (peft)."""
        if self._view is None:
            self._view = self.folder.view([self._config_file, self._file.file])
        return self._view.path


def _weights_file(folder: InputFolder) -> InputFile:
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if folder.exists(name):
            return _open_input(folder, name)
    raise AdapterError(folder.path, f"no {SAFETENSORS_FILE} (or {PICKLE_FILE})")


def _open_input(folder: InputFolder, name: str, why_needed: str = "") -> InputFile:
    if not folder.exists(name):
        raise AdapterError(folder.path, f"no {name} {why_needed}".rstrip())
    try:
        return folder.open(name)
    except PathRefused as exc:
        raise AdapterError(folder.path, f"{name} {exc}") from None


def weight_name(module: str) -> str:
    """The base model's tensor a module's delta applies to."""
    return f"{module}.weight"


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def read_adapter(path: Path | InputFolder) -> Adapter:
    """Opens a PEFT LoRA adapter folder: reads its config and tensor index, not its tensors. A plain
    path (tests, benchmarks) is its own volume: its files may not lead out of it."""
    if isinstance(path, InputFolder):
        return Adapter(path)
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(path, "not a folder")
    return Adapter(VolumeRoot(path).open_folder(".", path))


# -- checks across adapters ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """One module of the merge: the union over adapters; `present[i]` says whether adapter i targets it."""

    name: str
    kind: ModuleKind
    shape: tuple[int, int]
    present: tuple[bool, ...]


def plan_modules(adapters: list[Adapter]) -> list[ModulePlan]:
    """The union of the adapters' target modules, sorted by name; raises AdapterError (naming the
    later adapter) when two adapters give one module different shapes or kinds."""
    first: dict[str, tuple[Adapter, ModuleEntry]] = {}
    for adapter in adapters:
        for name, entry in adapter.modules.items():
            if name not in first:
                first[name] = (adapter, entry)
                continue
            other, seen = first[name]
            if (seen.kind, seen.shape) != (entry.kind, entry.shape):
                raise AdapterError(
                    adapter.path,
                    f"module {name} ({entry.a_key}): {entry.kind} delta of shape {list(entry.shape)}, "
                    f"but {other.path} gives it {seen.kind} shape {list(seen.shape)}",
                )
    fan = {a.config.fan_in_fan_out for a in adapters}
    if len(fan) > 1:
        odd = next(a for a in adapters if a.config.fan_in_fan_out != adapters[0].config.fan_in_fan_out)
        raise AdapterError(odd.path, "fan_in_fan_out differs from the other adapters")
    return [
        ModulePlan(name, entry.kind, entry.shape, tuple(name in a.modules for a in adapters))
        for name, (_, entry) in sorted(first.items())
    ]


def check_same_base(adapters: list[Adapter]) -> None:
    """Raises naming the first adapter whose base_model_name_or_path differs from the first one's."""
    base = adapters[0].config.base_model_name_or_path
    for adapter in adapters[1:]:
        other = adapter.config.base_model_name_or_path
        if other != base:
            raise AdapterError(
                adapter.path,
                f"base_model_name_or_path is {other!r} but {adapters[0].path} has {base!r} "
                "(set spec.allowBaseMismatch: true to merge anyway)",
            )


def iter_module_factors(
    adapters: list[Adapter], plan: list[ModulePlan]
) -> Iterator[tuple[str, list[LoraFactors | None]]]:
    """The merge engine's input, loaded one module at a time."""
    for module in plan:
        yield module.name, [
            a.factors(module.name) if present else None for a, present in zip(adapters, module.present)
        ]
