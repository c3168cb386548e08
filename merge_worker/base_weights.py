"""Lazy access to a base model's weights as transformers saves them: `model.safetensors`, or shards
listed in `model.safetensors.index.json`. Used for modules_to_save deltas and the merged-model output;
tensors are read one at a time (memory-mapped), never the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merge_worker.input_error import InputError
from merge_worker.safetensors_stream import FLOAT_DTYPES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class BaseWeightsError(InputError):
    """Unusable base model weights (a missing shard, an unreadable index); names the folder."""


class BaseWeights:
    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if (self.folder / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX_FILE).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BaseWeightsError(self.folder, f"{INDEX_FILE} is unreadable: {exc}") from None
            shard_names = list(dict.fromkeys(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            shard_names = [SINGLE_FILE]
        else:
            raise BaseWeightsError(
                self.folder, f"no {SINGLE_FILE} or {INDEX_FILE} (the base model must be in safetensors)"
            )
        self.shards: list[Path] = []
        self._handles = {}
        self._where: dict[str, str] = {}  # tensor name -> shard file name, in file order
        for shard in shard_names:
            path = self.folder / shard
            if Path(shard).name != shard or not path.is_file():
                raise BaseWeightsError(self.folder, f"shard {shard} listed in {INDEX_FILE} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - any failure to open is the file's fault
                raise BaseWeightsError(self.folder, f"cannot read {shard}: {exc}") from None
            self._handles[shard] = handle
            self.shards.append(path)
            for key in handle.keys():
                self._where[key] = shard

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (that of its first floating tensor), read from headers."""
        for name, shard in self._where.items():
            stored = self._handles[shard].get_slice(name).get_dtype()
            if stored in FLOAT_DTYPES:
                return FLOAT_DTYPES[stored]
        return torch.float32

    def files(self) -> list[Path]:
        """Every file of the folder a merged model copies or a manifest hashes (weights and the rest)."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())
