"""Shared tiny inputs for the worker tests: built once per session (peft and transformers take a few
seconds to import; each model or adapter then takes well under a second)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.tiny_models import make_lora_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> Path:
    """A pristine store: models/tiny (sharded), adapters/{a,b,c,emb}. Copy it before changing anything."""
    store = tmp_path_factory.mktemp("pristine-store")
    base = make_tiny_llama(store / "models" / "tiny", max_shard_size="40KB")
    make_lora_adapter(store / "adapters" / "a", base, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                      seed=1)
    make_lora_adapter(store / "adapters" / "b", base, r=6, alpha=3, use_rslora=True,
                      target_modules=("q_proj", "o_proj", "up_proj"), rank_pattern={"layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"o_proj": 5}, seed=2)
    make_lora_adapter(store / "adapters" / "c", base, r=2, alpha=4, target_modules=("v_proj",),
                      layers_to_transform=[1], modules_to_save=["lm_head"], seed=3)
    make_lora_adapter(store / "adapters" / "emb", base, r=3, alpha=6, target_modules=("embed_tokens", "q_proj"),
                      seed=4)
    return store


@pytest.fixture
def store(tiny_inputs, tmp_path) -> Path:
    """A private copy of the pristine store, free to change."""
    copy = tmp_path / "store"
    shutil.copytree(tiny_inputs, copy)
    return copy
