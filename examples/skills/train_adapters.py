#!/usr/bin/env python3
"""Trains the example LoRA adapters (one per skill) on SmolLM2-135M-Instruct, on the CPU, with peft.

The adapters differ on purpose, as real ones do: ranks 8, 16 and 4, different alphas, and the extract
adapter touches only the attention projections. Loss is on completion tokens only (prompt tokens are
masked), using the very encoding the evaluation scores (merge_worker.evaluation.scoring.encode/collate).
Weights are stored in bfloat16 to keep the repository small (the rounding is far below what training
moves). Reproducible: data from make_datasets.py's seed, LoRA init and batch order from --seed.

Usage (bootstrap venv): train_adapters.py [--skill NAME]... [--seed N] [--out DIR]
Takes about 40 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded in adapter_config.json
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Recipe:
    rank: int
    alpha: int
    targets: list[str]
    lr: float
    steps: int  # batches of 8; the formats are learned fast, and CPU time is what limits us


RECIPES = {
    "python": Recipe(rank=8, alpha=16, targets=ATTENTION + MLP, lr=1e-3, steps=60),
    "sql": Recipe(rank=16, alpha=16, targets=ATTENTION + MLP, lr=1e-3, steps=40),
    "extract": Recipe(rank=4, alpha=8, targets=ATTENTION, lr=1e-3, steps=40),
}


def prepared_base() -> Path:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare-smollm2.py")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def learning_rate(step: int, steps: int, peak: float, warmup: int = 10) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def to_bfloat16(adapter_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def train(skill: str, base: Path, out: Path, steps: int | None, batch_size: int, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    from merge_worker.evaluation.scoring import collate, encode, read_jsonl
    from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

    recipe = RECIPES[skill]
    steps = steps or recipe.steps
    torch.manual_seed(seed)  # LoRA's A init
    tokenizer = load_tokenizer(base)
    rows = read_jsonl(HERE / "train" / f"{skill}.jsonl", f"train/{skill}.jsonl")
    examples = [encode(tokenizer, r["prompt"], r["completion"]) for r in rows]
    model = load_causal_lm(base, "none", torch.device("cpu")).model
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=recipe.targets,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=0.0)
    order = random.Random(f"{seed}/{skill}")
    pool: list[int] = []
    started = time.monotonic()
    for step in range(steps):
        if len(pool) < batch_size:  # epochs without replacement
            pool = list(range(len(examples)))
            order.shuffle(pool)
        picked, pool = pool[:batch_size], pool[batch_size:]
        batch = collate([examples[i] for i in picked], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, recipe.lr)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"{skill} step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)

    target = out / skill
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{skill}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        to_bfloat16(tmp)
        config_path = tmp / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        saved["base_model_name_or_path"] = BASE_MODEL_ID  # not this machine's cache path
        saved["target_modules"] = sorted(saved["target_modules"])  # peft writes a set: random order
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card template says nothing here
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp/peft make them private
        if target.exists():
            shutil.rmtree(target)  # only ever this script's own earlier output
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{skill}: wrote {target}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skill", action="append", choices=sorted(RECIPES), help="default: all")
    parser.add_argument("--steps", type=int, help="default: each skill's recipe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, help="transformers folder (default: scripts/prepare-smollm2.py)")
    parser.add_argument("--out", type=Path, default=HERE / "adapters")
    args = parser.parse_args()
    base = args.base or prepared_base()
    for skill in args.skill or list(RECIPES):
        train(skill, base, args.out, args.steps, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
