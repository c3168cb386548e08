"""The adapter output satisfies the rules vLLM's LoRA loader applies to a PEFT folder (docs/serving.md),
restated here in our own words and checked on real outputs of the CLI, including `rank: auto` (which
writes rank_pattern) and `cat`. The checker is shown to catch each rule on an adapter that breaks it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from support.storage_cli import cli

# The values vLLM accepts for --max-lora-rank; an adapter's largest rank must not exceed the one chosen.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# What vLLM's Llama class takes LoRA on (the last part of a module's name); the tiny test model is a Llama.
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head"}
PREFIX = "base_model.model."
FACTORS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def _pattern_value(pattern: dict, module: str):
    # As PEFT and vLLM match rank_pattern / alpha_pattern keys: a regular expression over the module name
    # or a '.'-suffix of it; the first key that matches wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def vllm_refusals(folder: Path, *, max_lora_rank: int, supported: set[str] = LLAMA_LORA_MODULES) -> list[str]:
    """Why vLLM would refuse to load the adapter in `folder` (empty: it loads)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if problems:
        return problems
    if not isinstance(config["r"], int) or config["r"] <= 0:
        problems.append("r is not a positive integer")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set (vLLM takes none for a causal LM)")
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if config.get(flag):
            problems.append(f"{flag} is set")
    for unsupported in ("layer_replication", "alora_invocation_tokens", "use_bdlora"):
        if config.get(unsupported):
            problems.append(f"{unsupported} is set")
    if config.get("bias", "none") != "none":
        problems.append("bias is not 'none'")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights {init!r} changes the base weights")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    largest = max([config["r"], *rank_pattern.values()])
    if largest > max_lora_rank:
        problems.append(f"rank {largest} is above --max-lora-rank {max_lora_rank}")
    with safe_open(folder / "adapter_model.safetensors", "pt") as tensors:
        for name in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
            factor = next((f for f in FACTORS if name.endswith("." + f)), None)
            if not name.startswith(PREFIX) or factor is None:
                problems.append(f"tensor {name} is not a LoRA factor")
                continue
            module = name[len(PREFIX):-len(factor) - 1]
            if module.rsplit(".", 1)[-1] not in supported:
                problems.append(f"module {module} is not one vLLM takes LoRA on")
            rank = _pattern_value(rank_pattern, module) or config["r"]
            alpha = _pattern_value(alpha_pattern, module)
            alpha = config["lora_alpha"] if alpha is None else alpha
            shape = tensors.get_slice(name).get_shape()
            held = shape[0] if factor in ("lora_A.weight", "lora_embedding_A") else shape[1]
            if held != rank:
                problems.append(f"module {module}: {factor} holds rank {held}, the config says {rank}")
            # A vLLM that predates rank_pattern scales every module by lora_alpha / r: the same number
            # only when each module's alpha / rank equals it.
            if abs(alpha / rank - config["lora_alpha"] / config["r"]) > 1e-9:
                problems.append(f"module {module}: scale {alpha}/{rank} differs from lora_alpha / r")
    return problems


@pytest.mark.parametrize("output", [{"rank": 4}, {"rank": "auto", "energy": 0.9}],
                         ids=["fixed-rank", "rank-auto"])
@pytest.mark.parametrize("method", ["linear", "ties", "cat"])
def test_merged_adapter_loads_under_vllm_rules(tiny_store, tmp_path, method, output):
    out = tmp_path / "out"
    out.mkdir()
    spec = {"adapters": [{"name": "a", "path": "adapters/a", "claimName": "store"},
                         {"name": "b", "path": "adapters/b", "claimName": "store"}],
            "method": method, "output": {"path": "merged", "claimName": "out", **output}}
    if method == "ties":
        spec["parameters"] = {"density": 0.5}
    if method == "cat":
        spec["output"] = {"path": "merged", "claimName": "out"}
    code, log, _ = cli(tmp_path, spec, extra=("--volume", f"store={tiny_store}", "--volume", f"out={out}"))
    assert code == 0, log
    folder = out / "merged"
    config = json.loads((folder / "adapter_config.json").read_text())
    smallest = min(r for r in VLLM_MAX_LORA_RANKS if r >= max([config["r"], *config["rank_pattern"].values()]))
    assert vllm_refusals(folder, max_lora_rank=smallest) == []
    if output.get("rank") == "auto" and method != "cat":
        assert config["rank_pattern"], "rank auto should give modules of different ranks here"


@pytest.mark.parametrize(("change", "words"), [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"r": 1024, "lora_alpha": 1024}, "--max-lora-rank"),
    ({"alpha_pattern": {"q_proj": 16}}, "scale"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
])
def test_the_checker_catches_each_rule(tiny_store, tmp_path, change, words):
    folder = tmp_path / "adapter"
    folder.mkdir()
    source = tiny_store / "adapters" / "a"
    config = json.loads((source / "adapter_config.json").read_text())
    (folder / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    # The fixture adapter as trained (r 4, alpha 8): it loads; each change below breaks one rule.
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert vllm_refusals(folder, max_lora_rank=16) == []
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    refusals = vllm_refusals(folder, max_lora_rank=16)
    assert any(words in r for r in refusals), refusals


@pytest.mark.parametrize("modules_to_save", ["merge", "drop"])
def test_modules_to_save_are_kept_only_when_asked_to(tiny_store, tmp_path, modules_to_save):
    """An input adapter that trained lm_head (modules_to_save): `merge` (the default) keeps it merged, which
    vLLM refuses and the log says so; `drop` leaves it out and the output loads."""
    from support.tiny_models import make_lora_adapter

    store = tmp_path / "store"
    make_lora_adapter(store / "lm-head", tiny_store / "models" / "tiny", r=2, alpha=4, target_modules=("v_proj",),
                      modules_to_save=["lm_head"], seed=3)
    out = tmp_path / "out"
    out.mkdir()
    spec = {"adapters": [{"name": "a", "path": "adapters/a", "claimName": "tiny"},
                         {"name": "c", "path": "lm-head", "claimName": "store"}],
            "baseModel": {"path": "models/tiny", "claimName": "tiny"},
            "method": "linear", "output": {"path": "merged", "claimName": "out", "rank": 4}}
    if modules_to_save == "drop":
        spec["output"]["modulesToSave"] = "drop"
    code, log, _ = cli(tmp_path, spec, extra=("--volume", f"tiny={tiny_store}", "--volume", f"store={store}",
                                              "--volume", f"out={out}"))
    assert code == 0, log
    folder = out / "merged"
    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        saved = [k for k in weights.keys() if "lm_head" in k]
    refusals = vllm_refusals(folder, max_lora_rank=8)
    if modules_to_save == "merge":
        assert saved and any("modules_to_save" in r for r in refusals), (saved, refusals)
        assert "kept modules_to_save lm_head.weight" in log and "modulesToSave: drop" in log, log
    else:
        assert saved == [] and refusals == [], (saved, refusals)
        assert "left out modules_to_save lm_head.weight" in log, log
