"""End to end through the CLI on a tiny Llama: the merged adapter, loaded by PEFT itself, and the merged
model, loaded by transformers, must equal the base plus the expected merged delta.

The expected delta comes from PEFT, independently of our reader: each input adapter is loaded with
PeftModel.from_pretrained and asked for its delta weights (so rank_pattern, alpha_pattern and rslora
are interpreted by PEFT), then combined with linear's definition (MERGING.md): lambda * sum_i w_i tau_i.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

ADAPTERS = ["a", "b", "c", "emb"]  # mixed ranks, alphas, rslora, patterns, layer subsets, embedding, lm_head
WEIGHTS = [0.5, 0.3, 0.7, 0.4]
LAMBDA = 1.2


def _load_base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _peft_model(base_folder, adapter_folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_base(base_folder), str(adapter_folder)).eval()


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and ("default" in module.lora_A or "default" in module.lora_embedding_A):
            yield name, module


def _peft_deltas(base_folder, adapter_folder):
    """PEFT's own delta weights (weight space) and modules_to_save weights of one adapter."""
    from peft.utils import ModulesToSaveWrapper

    model = _peft_model(base_folder, adapter_folder)
    deltas = {name: m.get_delta_weight("default").detach().clone() for name, m in _lora_layers(model)}
    saved = {
        f"{name}.weight": m.modules_to_save["default"].weight.detach().clone()
        for name, m in model.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)
    }
    return deltas, saved


@pytest.fixture(scope="module")
def expected(tiny_inputs):
    """Weight-space merged delta per module and the merged lm_head (modules_to_save of adapter c)."""
    base_folder = tiny_inputs / "models" / "tiny"
    base = _load_base(base_folder)
    deltas: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    for name, w in zip(ADAPTERS, WEIGHTS):
        adapter_deltas, adapter_saved = _peft_deltas(base_folder, tiny_inputs / "adapters" / name)
        for module, delta in adapter_deltas.items():
            deltas[module] = deltas.get(module, 0) + LAMBDA * w * delta.double()
        for tensor, weight in adapter_saved.items():
            base_weight = base.get_parameter(tensor).detach().double()
            saved[tensor] = saved.get(tensor, base_weight) + LAMBDA * w * (weight.double() - base_weight)
    assert "model.layers.1.self_attn.q_proj" in deltas and "model.embed_tokens" in deltas
    assert list(saved) == ["lm_head.weight"]
    return deltas, saved


def _spec(output: dict) -> dict:
    return {
        "baseModel": {"path": "models/tiny"},
        "adapters": [{"name": n, "path": f"adapters/{n}"} for n in ADAPTERS],
        "method": "linear",
        "parameters": {"lambda": LAMBDA, "weights": WEIGHTS},
        "output": output,
    }


def _patched_base(base_folder, deltas, saved):
    model = _load_base(base_folder)
    with torch.no_grad():
        for module, delta in deltas.items():
            weight = model.get_submodule(module).weight
            weight.copy_(weight.double() + delta)
        for tensor, value in saved.items():
            model.get_parameter(tensor).copy_(value)
    return model


TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 5, 7], [1, 60, 12, 33, 2, 3, 3, 3]])


def test_merged_adapter_loads_in_peft_and_matches(store, adaptermerge, expected):
    deltas, saved = expected
    run = adaptermerge("run", _spec({"path": "merged/adapter", "rank": 64}), store)
    assert run.code == 0, run.err
    out = store / "merged" / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"], "ranks differ per module here, so rank_pattern must be in use"
    assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"]

    model = _peft_model(store / "models" / "tiny", out)
    layers = dict(_lora_layers(model))
    assert set(layers) == set(deltas)
    torch.manual_seed(0)
    for name, layer in layers.items():
        delta = deltas[name].float()
        torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=1e-4, atol=1e-5)
        if name == "model.embed_tokens":
            x = TOKENS
            expected_out = torch.nn.functional.embedding(x, layer.base_layer.weight + delta)
        else:
            x = torch.randn(3, layer.in_features)
            expected_out = torch.nn.functional.linear(x, layer.base_layer.weight + delta)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected_out, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        patched = _patched_base(store / "models" / "tiny", deltas, saved)
        torch.testing.assert_close(model(TOKENS).logits, patched(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_merged_model_loads_in_transformers_and_matches(store, adaptermerge, expected):
    deltas, saved = expected
    run = adaptermerge("run", _spec({"path": "merged/full", "format": "merged-model"}), store)
    assert run.code == 0, run.err
    out = store / "merged" / "full"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    merged = _load_base(out)
    base = _load_base(store / "models" / "tiny")
    base_state = base.state_dict()
    for name, tensor in merged.state_dict().items():
        module = name.removesuffix(".weight")
        if module in deltas:
            want = base_state[name].double() + deltas[module]
        else:
            want = saved.get(name, base_state[name])
        torch.testing.assert_close(tensor.double(), want.double(), rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        patched = _patched_base(store / "models" / "tiny", deltas, saved)
        torch.testing.assert_close(merged(TOKENS).logits, patched(TOKENS).logits, rtol=1e-4, atol=1e-4)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out))("select x from table")["input_ids"]


def test_output_dtype_is_honoured(store, adaptermerge):
    spec = _spec({"path": "merged/bf16", "rank": 4, "dtype": "bfloat16"})
    assert adaptermerge("run", spec, store).code == 0
    with safe_open(str(store / "merged" / "bf16" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k}
    assert dtypes == {"BF16"} and ranks <= {1, 2, 3, 4}
