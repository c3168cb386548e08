"""Reads PEFT LoRA adapter folders into per-module `LoraFactors`, lazily.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or a pickle
`adapter_model.bin`, loaded only with `torch.load(weights_only=True)`: never full unpickling).
Opening an adapter reads only the config and the tensor index; a module's tensors are loaded when
asked for, so merging streams module by module.

PEFT's names are normalised to the base model's module names: `base_model.model.` is dropped, and
`<module>.lora_A[.<adapter>].weight` / `<module>.lora_embedding_A[.<adapter>]` give the factors of
`<module>` (e.g. `model.layers.0.self_attn.q_proj`). rank_pattern / alpha_pattern keys match module
names the way PEFT matches them (`get_pattern_key`): a key is a regex that must match the whole name or
a suffix of it starting at a '.'.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merge_worker.factors import LoraFactors
from merge_worker.finite_check import suspect_tensors
from merge_worker.input_error import InputError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

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


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching `module` or a '.'-suffix of it."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


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
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, folder: Path) -> AdapterConfig:
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise AdapterError(folder, f"no {CONFIG_FILE} (not a PEFT adapter folder)")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterError(folder, f"{CONFIG_FILE} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise AdapterError(folder, f"{CONFIG_FILE} must hold a JSON object")
        return cls.from_dict(raw, folder)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], folder: Path) -> AdapterConfig:
        def unsupported(what: str) -> AdapterError:
            return AdapterError(folder, f"{CONFIG_FILE}: {what} is not supported yet")

        if raw.get("peft_type", "LORA") != "LORA":
            raise unsupported(f"peft_type {raw.get('peft_type')!r} (only LORA adapters merge)")
        if raw.get("use_dora"):
            raise unsupported("DoRA (use_dora: true)")
        if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
            raise unsupported("training biases (bias / lora_bias)")
        if raw.get("trainable_token_indices"):
            raise unsupported("trainable_token_indices")
        r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(folder, f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise AdapterError(folder, f"{CONFIG_FILE}: lora_alpha must be a number, got {alpha!r}")
        modules_to_save = raw.get("modules_to_save") or ()
        if isinstance(modules_to_save, str):
            modules_to_save = (modules_to_save,)
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            modules_to_save=tuple(modules_to_save),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            raw=raw,
        )

    def rank_for(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def scale_for(self, module: str) -> float:
        """alpha / r (alpha / sqrt(r) with rslora), after rank_pattern and alpha_pattern."""
        r = self.rank_for(module)
        alpha = float(pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def saves_module(self, module: str) -> bool:
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)


@dataclass(frozen=True)
class ModuleEntry:
    """Where one module's factors live in the weights file, and their shapes (read from the index)."""

    name: str
    kind: ModuleKind
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module's delta in B @ A space."""
        return (self.b_shape[0], self.a_shape[1])


class _TensorFile:
    """Lazy tensor access by key: safetensors through safe_open (memory-mapped), a pickle through
    torch.load(weights_only=True, mmap=True)."""

    def __init__(self, path: Path, adapter: Path):
        self.path = path
        self._adapter = adapter
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self._handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise AdapterError(adapter, f"cannot read {path.name}: {exc}") from None
            self._shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
            self._dict = None
        else:
            self._dict = _load_pickle(path, adapter)
            self._shapes = {k: tuple(v.shape) for k, v in self._dict.items()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        if self._dict is not None:
            return self._dict[key]
        return self._handle.get_tensor(key)

    def maybe_nonfinite(self) -> list[str]:
        """Keys that may hold NaN or Inf (checked in bulk where the format allows): a superset of those that do."""
        if self._dict is not None:
            return self.keys()
        return suspect_tensors(self.path)


def _load_pickle(path: Path, adapter: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise AdapterError(
            adapter, f"{path.name} cannot be loaded with torch.load(weights_only=True): {exc}"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterError(adapter, f"{path.name} must hold a dict of tensor name -> tensor")
    return data


class Adapter:
    """One PEFT LoRA adapter: its config, its module index, lazily loaded factors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = AdapterConfig.load(self.path)
        self.weights_path = _weights_file(self.path)
        self._file = _TensorFile(self.weights_path, self.path)
        self.modules: dict[str, ModuleEntry] = {}
        # modules_to_save tensors: base-model tensor name (e.g. "lm_head.weight") -> key in the file
        self.saved: dict[str, str] = {}
        self._index(self._file.keys())

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
                self.path, f"the file holds several adapters ({sorted(adapter_names)}); save one per folder"
            )
        for module, roles in sorted(factors.items()):
            self.modules[module] = self._entry(module, kinds[module], roles)
        if not self.modules and not self.saved:
            raise AdapterError(self.path, f"{self.weights_path.name} holds no LoRA tensors")

    def _entry(self, module: str, kind: ModuleKind, roles: dict[str, str]) -> ModuleEntry:
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
        rank = self.config.rank_for(module)
        if a_shape[0] != b_shape[1] or a_shape[0] != rank:
            raise AdapterError(
                self.path,
                f"module {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not match "
                f"the rank {rank} that {CONFIG_FILE} gives it",
            )
        return ModuleEntry(module, kind, roles["A"], roles["B"], a_shape, b_shape)

    # -- lazy tensors ------------------------------------------------------------------------------
    def factors(self, module: str) -> LoraFactors:
        entry = self.modules[module]
        return LoraFactors(
            a=self._file.get(entry.a_key), b=self._file.get(entry.b_key),
            scale=self.config.scale_for(module),
        )

    def saved_tensor(self, name: str) -> torch.Tensor:
        return self._file.get(self.saved[name])

    def saved_shape(self, name: str) -> tuple[int, ...]:
        return self._file.shape(self.saved[name])

    def check_finite(self) -> None:
        """Raises naming the first tensor holding NaN or Inf."""
        for key in self._file.maybe_nonfinite():
            tensor = self._file.get(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise AdapterError(self.path, f"tensor {key} in {self.weights_path.name} holds {bad}")

    def files(self) -> list[Path]:
        return [self.path / CONFIG_FILE, self.weights_path]


def _weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(folder, f"no {SAFETENSORS_FILE} (or {PICKLE_FILE})")


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def read_adapter(path: Path) -> Adapter:
    """Opens a PEFT LoRA adapter folder: reads its config and tensor index, not its tensors."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(path, "not a folder")
    return Adapter(path)


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
