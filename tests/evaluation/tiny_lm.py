"""A tiny Llama model with a word-level tokenizer, and small datasets and adapters on it, so the
evaluation code runs in seconds and its numbers can be recomputed by hand in the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["<pad>", "<eos>", "<unk>", "Q:", "A:", "red", "green", "blue", "cat", "dog", "sun", "moon",
         "one", "two", "three", "yes", "no"]
PAD, EOS = 0, 1

# Two "skills" with one right answer each: colours -> animals, numbers -> sky words.
COLOURS = [("Q: red", "cat dog"), ("Q: green", "dog"), ("Q: blue", "cat cat dog"), ("Q: red green", "dog cat")]
NUMBERS = [("Q: one", "sun"), ("Q: two two", "moon sun"), ("Q: three", "moon"), ("Q: one three", "sun sun moon")]


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def write_tiny_base(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer(folder)


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))


def train_lora(base: Path, pairs: list[tuple[str, str]], out: Path, *, rank: int, steps: int = 60,
               targets: list[str] | None = None) -> None:
    """A LoRA adapter that learns `pairs` (completion tokens only) well enough to beat the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from merge_worker.evaluation import collate, encode
    from merge_worker.model_loading import load_tokenizer

    torch.manual_seed(1)
    tokenizer = load_tokenizer(base)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or ["q_proj", "v_proj", "up_proj", "down_proj"]),
    )
    batch = collate([encode(tokenizer, p, c) for p, c in pairs], PAD)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def write_tiny_store(root: Path) -> Path:
    """A volume folder: models/tiny, adapters/{colours,numbers}, eval/{colours,numbers}.jsonl."""
    write_tiny_base(root / "models" / "tiny")
    write_jsonl(root / "eval" / "colours.jsonl", COLOURS)
    write_jsonl(root / "eval" / "numbers.jsonl", NUMBERS)
    train_lora(root / "models" / "tiny", COLOURS, root / "adapters" / "colours", rank=4)
    train_lora(root / "models" / "tiny", NUMBERS, root / "adapters" / "numbers", rank=2,
               targets=["k_proj", "o_proj", "gate_proj"])
    return root
