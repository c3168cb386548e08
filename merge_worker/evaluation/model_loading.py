"""Loading a causal language model and its tokenizer for evaluation (and the example scripts).

The base is loaded as `baseModel.quantization` asks: nf4/fp4/int8 go through bitsandbytes, which needs
CUDA; on a machine without CUDA (or without bitsandbytes) the model is loaded unquantized instead and the
returned note says so, since a quantized evaluation there is impossible, not wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode, on `device`
    quantization: str  # what was actually applied: nf4 | fp4 | int8 | none
    note: str  # why it differs from what was asked, or ""


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # padding positions are masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_unavailable(quantization: str, device: torch.device) -> str:
    """Why `quantization` cannot be used on `device`, or "" when it can."""
    if quantization == "none":
        return ""
    if device.type != "cuda":
        return f"quantization {quantization} needs CUDA (bitsandbytes); evaluated the unquantized base on {device.type}"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        return f"quantization {quantization} needs bitsandbytes ({exc}); evaluated the unquantized base"
    return ""


def bitsandbytes_config(quantization: str) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # QLoRA's setting: 4-bit storage with double-quantized scales, bfloat16 compute.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,  # "nf4" or "fp4"
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_causal_lm(
    path: Path, quantization: str, device: torch.device, log: Callable[[str], None] = lambda _: None
) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the worker logs its own progress lines
    note = quantization_unavailable(quantization, device)
    if note:
        log(note)
        quantization = "none"
    if quantization != "none":
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bitsandbytes_config(quantization),
            device_map={"": device.index or 0},
            dtype=torch.bfloat16,
        )
    else:
        # CPUs compute float32 fastest and exactly; on CUDA keep the checkpoint's own dtype.
        dtype = torch.float32 if device.type == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return LoadedModel(model=model, quantization=quantization, note=note)
