"""Writes the merge as a PEFT LoRA adapter folder that `PeftModel.from_pretrained` loads.

Merged factors have scale 1, so every module gets lora_alpha == its rank: `r` and `lora_alpha` are the
largest rank, and modules of smaller rank get `rank_pattern` / `alpha_pattern` entries. Pattern keys are
the full module names, regex-escaped, because PEFT reads them as regular expressions. target_modules lists
full module names (PEFT matches a listed name exactly), so only the merged modules get LoRA layers.
Modules arrive one at a time and are streamed to disk; the config is written last, when all ranks are known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from merge_worker.inputs.adapters import CONFIG_FILE, PEFT_PREFIX, SAFETENSORS_FILE, ModuleKind
from merge_worker.factors import MergedModule
from merge_worker.output.finite import cast_finite
from merge_worker.output.safetensors_stream import SafetensorsStreamWriter


class AdapterWriter:
    def __init__(self, folder: Path, *, dtype: torch.dtype, inputs_config: dict[str, Any]):
        """inputs_config: settings carried over from the input adapters (base_model_name_or_path,
        task_type, fan_in_fan_out)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._inputs_config = inputs_config
        self._tensors = SafetensorsStreamWriter(self.folder / SAFETENSORS_FILE)
        self._ranks: dict[str, int] = {}
        self._saved_modules: list[str] = []

    def add_module(self, name: str, kind: ModuleKind, merged: MergedModule) -> None:
        if merged.rank == 0:
            return  # an all-zero delta: leaving the module out is exact
        a_name, b_name = ("lora_A.weight", "lora_B.weight") if kind == "linear" else (
            "lora_embedding_A", "lora_embedding_B")
        for key, factor in ((a_name, merged.a), (b_name, merged.b)):
            self._tensors.add(f"{PEFT_PREFIX}{name}.{key}",
                              cast_finite(factor, self.dtype, f"module {name} ({key.split('.')[0]})"))
        self._ranks[name] = merged.rank

    def add_saved(self, tensor_name: str, tensor: torch.Tensor) -> None:
        """A merged modules_to_save tensor (full weights), e.g. "lm_head.weight"."""
        self._tensors.add(f"{PEFT_PREFIX}{tensor_name}",
                          cast_finite(tensor, self.dtype, f"modules_to_save tensor {tensor_name}"))
        module = tensor_name.rpartition(".")[0]
        if module not in self._saved_modules:
            self._saved_modules.append(module)

    def close(self) -> dict[str, Any]:
        self._tensors.close()
        config = self._config()
        (self.folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return config

    def abort(self) -> None:
        self._tensors.abort()

    def _config(self) -> dict[str, Any]:
        r = max(self._ranks.values(), default=1)
        smaller = {re.escape(name): rank for name, rank in self._ranks.items() if rank != r}
        return {
            "peft_type": "LORA",
            "task_type": self._inputs_config.get("task_type"),
            "base_model_name_or_path": self._inputs_config.get("base_model_name_or_path"),
            "r": r,
            "lora_alpha": r,
            "rank_pattern": smaller,
            "alpha_pattern": dict(smaller),
            "use_rslora": False,
            "use_dora": False,
            "target_modules": sorted(self._ranks),
            "modules_to_save": self._saved_modules or None,
            "fan_in_fan_out": bool(self._inputs_config.get("fan_in_fan_out", False)),
            "bias": "none",
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "inference_mode": True,
        }
