"""Tiny models for tests, built offline in a second: a random Llama with a real tokenizer, and PEFT LoRA
adapters for it made by peft itself (so their files are exactly what users have on disk).

    base = make_tiny_llama(tmp_path / "base")
    make_lora_adapter(tmp_path / "a", base, r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=1)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

# A word-level vocabulary: enough words for short prompts in tests, small enough for a 32-wide model.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = (
    "the a an of to in is on and or not def return select from where print if else for while "
    "x y z one two three four five six seven eight nine ten zero add sub mul sum count table "
    "name id value code query python sql true false yes no hello world question answer : ( ) , = +"
).split()


def make_tokenizer(folder: Path) -> Path:
    """A WordLevel tokenizer saved as a PreTrainedTokenizerFast (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(folder))
    return Path(folder)


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(WORDS)


def make_tiny_llama(
    folder: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
) -> Path:
    """A random LlamaForCausalLM (untied lm_head) saved as safetensors; `max_shard_size` (e.g. "20KB")
    makes a sharded checkpoint with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    config = LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer:
        make_tokenizer(folder)
    return folder


def make_lora_adapter(
    folder: Path,
    base: Path,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: list[str] | None = None,
    layers_to_transform: list[int] | None = None,
    seed: int = 1,
    base_model_name: str | None = None,
    dtype: torch.dtype | None = None,
    safetensors: bool = True,
) -> Path:
    """A PEFT LoRA adapter for the model in `base`, with random non-zero lora_B (a fresh adapter has
    B = 0, i.e. no effect) and, for modules_to_save, randomly perturbed copies of those modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(str(folder), safe_serialization=safetensors)
    if base_model_name is not None:
        edit_adapter_config(folder, base_model_name_or_path=base_model_name)
    return folder


def edit_adapter_config(folder: Path, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def set_adapter_tensor(folder: Path, key_contains: str, change) -> str:
    """Rewrites the first tensor whose key contains `key_contains` as `change(tensor)`; returns its key."""
    from safetensors.torch import save_file

    tensors = adapter_tensors(folder)
    key = next(k for k in sorted(tensors) if key_contains in k)
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    return key
