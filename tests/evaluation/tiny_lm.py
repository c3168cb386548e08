"""Small datasets and trained adapters on the shared tiny Llama (support.tiny_models), so the evaluation
code runs in seconds and its numbers can be recomputed by hand in the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from support.tiny_models import SPECIAL_TOKENS, WORDS, make_tiny_llama

VOCAB = SPECIAL_TOKENS + WORDS
EOS = VOCAB.index("</s>")

# Two "skills" with one right answer each, in the tiny vocabulary.
CODE = [("question add one two", "def add"), ("question sum x", "return sum ( x )"),
        ("question print hello", "print hello world"), ("question add x y", "return x + y")]
SQL = [("question count table", "select count"), ("question name id", "select name from table"),
       ("question where id one", "where id = one"), ("question query", "select id")]


def token_ids(text: str) -> list[int]:
    """What the word-level tokenizer must produce, computed without it."""
    return [VOCAB.index(word) for word in text.split()]


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))


def train_lora(base: Path, pairs: list[tuple[str, str]], out: Path, *, rank: int, targets: list[str],
               steps: int = 60) -> None:
    """A LoRA adapter that learns `pairs` (completion tokens only) well enough to beat the base."""
    from peft import LoraConfig, get_peft_model

    from merge_worker.evaluation.scoring import collate, encode
    from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

    torch.manual_seed(1)
    tokenizer = load_tokenizer(base)
    model = get_peft_model(load_causal_lm(base, "none", torch.device("cpu")).model,
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    batch = collate([encode(tokenizer, p, c) for p, c in pairs], tokenizer.pad_token_id)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def write_tiny_store(root: Path) -> Path:
    """A volume folder: models/tiny, adapters/{code,sql}, eval/{code,sql}.jsonl."""
    make_tiny_llama(root / "models" / "tiny")
    write_jsonl(root / "eval" / "code.jsonl", CODE)
    write_jsonl(root / "eval" / "sql.jsonl", SQL)
    train_lora(root / "models" / "tiny", CODE, root / "adapters" / "code", rank=4,
               targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    train_lora(root / "models" / "tiny", SQL, root / "adapters" / "sql", rank=2,
               targets=["k_proj", "o_proj", "gate_proj"])
    return root
