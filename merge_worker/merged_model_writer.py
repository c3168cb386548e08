"""Writes the merge as a full model: W_base + delta for every merged module (and the merged
modules_to_save tensors), everything else copied, as sharded safetensors that transformers loads.

Streams tensor by tensor in the base checkpoint's order: one base tensor and one delta in memory at a
time, never two copies of the model. The config, tokenizer and other small files are copied as they are
(config.json's dtype updated when the output dtype differs from the base's).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from merge_worker.adapter_io import ModuleKind
from merge_worker.base_weights import INDEX_FILE, SINGLE_FILE, BaseWeights
from merge_worker.output.finite import cast_finite
from merge_worker.safetensors_stream import SafetensorsStreamWriter

DEFAULT_SHARD_BYTES = 4 << 30
# Weight files of other formats that a base folder may also hold; the output has its own weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_SKIP_FILES = {INDEX_FILE, "pytorch_model.bin.index.json"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def weight_name(module: str) -> str:
    return f"{module}.weight"


def apply_delta(weight: torch.Tensor, delta: torch.Tensor, kind: ModuleKind, fan_in_fan_out: bool) -> torch.Tensor:
    """W + delta in float32; delta is in B @ A space (out, in), transposed where the weight is stored
    the other way round (embeddings, fan_in_fan_out Conv1D layers)."""
    if kind == "embedding" or fan_in_fan_out:
        delta = delta.T
    return weight.to(torch.float32) + delta.to(device="cpu", dtype=torch.float32)


def write_merged_model(
    folder: Path,
    base: BaseWeights,
    modules: dict[str, ModuleKind],
    delta_for: Callable[[str], torch.Tensor],
    saved: dict[str, Callable[[], torch.Tensor]],
    *,
    dtype: torch.dtype,
    fan_in_fan_out: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """modules: merged module name -> kind; delta_for(module) computes its merged delta when its weight
    comes up; saved: tensor name -> a function computing its merged modules_to_save tensor (also only
    when it comes up). Returns the weight files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_weight = {weight_name(m): m for m in modules}
    shards = _ShardedWriter(folder, max_shard_bytes)
    try:
        for name in base.names():
            copied_from = None  # the input field a tensor copied unchanged comes from
            if name in by_weight:
                module = by_weight[name]
                tensor = apply_delta(base.get(name), delta_for(module), modules[module], fan_in_fan_out)
                what = f"merged weight {name} (base + merged delta)"
            elif name in saved:
                tensor = saved[name]()  # it reads the base tensor itself; loading it here too is waste
                what = f"modules_to_save tensor {name}"
            else:
                tensor = base.get(name)
                what, copied_from = f"base model tensor {name}", "spec.baseModel.path"
            shards.add(name, cast_finite(tensor, dtype, what, copied_from=copied_from))
        written = shards.close()
    except BaseException:
        shards.abort()
        raise
    _copy_other_files(base.folder, folder, dtype, base.dtype())
    return written


class _ShardedWriter:
    """Rolls over to a new shard past max_bytes; names shards like transformers once the count is known."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self._done: list[SafetensorsStreamWriter] = []
        self._current: SafetensorsStreamWriter | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._current is not None and self._current.nbytes > 0 and (
            self._current.nbytes + tensor.numel() * tensor.element_size() > self.max_bytes
        ):
            self._current.close()
            self._done.append(self._current)
            self._current = None
        if self._current is None:
            part = self.folder / f".part-{len(self._done) + 1:05d}.safetensors"
            self._current = SafetensorsStreamWriter(part)
        self._current.add(name, tensor)

    def close(self) -> list[Path]:
        if self._current is not None:
            self._current.close()
            self._done.append(self._current)
            self._current = None
        count = len(self._done)
        if count == 1:
            final = [self.folder / SINGLE_FILE]
        else:
            final = [self.folder / f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        weight_map: dict[str, str] = {}
        for shard, path in zip(self._done, final):
            shard.path.rename(path)
            weight_map.update({name: path.name for name in shard.names})
        if count > 1:
            total = sum(s.nbytes for s in self._done)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()


def _copy_other_files(source: Path, target: Path, dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _SKIP_FILES or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.name == "config.json" and dtype != base_dtype:
            config = json.loads(path.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
            (target / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(path, target / path.name)
