"""Reading PEFT adapter folders: key names, scales from the config (patterns, rslora), lazy factors,
and the checks across adapters. Expected values come from the files and configs peft wrote."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_worker.inputs.adapters import AdapterError, check_same_base, plan_modules, read_adapter
from support.tiny_models import edit_adapter_config, set_adapter_tensor

PREFIX = "base_model.model."


def test_reads_factors_and_scales(store):
    adapter = read_adapter(store / "adapters" / "b")
    raw = load_file(str(store / "adapters" / "b" / "adapter_model.safetensors"))
    expected_modules = {k[len(PREFIX):-len(".lora_A.weight")] for k in raw if k.endswith("lora_A.weight")}
    assert set(adapter.modules) == expected_modules
    assert "model.layers.0.mlp.up_proj" in expected_modules
    # r=6, lora_alpha=3, rslora; o_proj alpha 5 (alpha_pattern); layers.1 q_proj rank 2 (rank_pattern)
    cases = {
        "model.layers.0.self_attn.q_proj": (6, 3 / math.sqrt(6)),
        "model.layers.1.self_attn.o_proj": (6, 5 / math.sqrt(6)),
        "model.layers.1.self_attn.q_proj": (2, 3 / math.sqrt(2)),
    }
    for module, (rank, scale) in cases.items():
        factors = adapter.factors(module)
        assert factors.rank == rank
        assert factors.scale == pytest.approx(scale)
        assert torch.equal(factors.a, raw[f"{PREFIX}{module}.lora_A.weight"])
        assert torch.equal(factors.b, raw[f"{PREFIX}{module}.lora_B.weight"])


def test_rank_pattern_does_not_leak_to_similar_names(store):
    # "layers.1.self_attn.q_proj" must not match layer 11 or a name merely containing it.
    from merge_worker.inputs.patterns import first_matches

    modules = ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
               "model.xlayers.1.self_attn.q_proj"]
    assert list(first_matches(["layers.1.self_attn.q_proj"], modules).values()) == [0, None, None]


@pytest.mark.parametrize("keys", [
    ["q_proj", "layers.1.self_attn.q_proj"], ["layers.1.self_attn.q_proj", "q_proj"], ["o_proj", "v_proj"],
    ["layers\\.[13]\\..*", "proj"], ["^model.layers.0.self_attn.q_proj", "self_attn.q_proj"], ["x-y", "q_pro"],
])
def test_pattern_keys_match_as_peft_matches_them(keys):
    from peft.utils.other import get_pattern_key

    from merge_worker.inputs.patterns import first_matches

    modules = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1, 3, 11) for m in ("q_proj", "v_proj", "o_proj")]
    for module, index in first_matches(keys, modules).items():
        peft_key = get_pattern_key(keys, module)  # PEFT returns the name itself when no key matches
        assert (keys[index] if index is not None else module) == peft_key, module


def test_non_rslora_scale_and_modules_to_save(store):
    adapter = read_adapter(store / "adapters" / "c")
    assert list(adapter.modules) == ["model.layers.1.self_attn.v_proj"]  # layers_to_transform=[1]
    assert adapter.factors("model.layers.1.self_attn.v_proj").scale == pytest.approx(4 / 2)
    assert list(adapter.saved) == ["lm_head.weight"]
    raw = load_file(str(store / "adapters" / "c" / "adapter_model.safetensors"))
    assert torch.equal(adapter.saved_tensor("lm_head.weight"), raw[f"{PREFIX}lm_head.weight"])


def test_embedding_factors(store):
    adapter = read_adapter(store / "adapters" / "emb")
    entry = adapter.modules["model.embed_tokens"]
    vocab = json.loads((store / "models" / "tiny" / "config.json").read_text())["vocab_size"]
    assert entry.kind == "embedding" and entry.shape == (32, vocab)  # B @ A space: (dim, vocab)
    assert adapter.factors("model.embed_tokens").scale == pytest.approx(6 / 3)


def test_adapter_name_in_keys_is_normalised(store):
    folder = store / "adapters" / "a"
    raw = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in raw.items()}
    save_file(renamed, str(folder / "adapter_model.safetensors"))
    adapter = read_adapter(folder)
    assert torch.equal(
        adapter.factors("model.layers.0.self_attn.q_proj").b,
        raw[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"],
    )


def test_pickle_adapter_is_read_with_weights_only(store):
    folder = store / "adapters" / "a"
    raw = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(raw, folder / "adapter_model.bin")
    adapter = read_adapter(folder)
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"
    assert torch.equal(adapter.factors("model.layers.1.self_attn.v_proj").a, raw[key])


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickle_with_code_is_refused(store, capsys):
    folder = store / "adapters" / "a"
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(AdapterError, match="weights_only=True"):
        read_adapter(folder)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_dora_is_not_supported_yet(store):
    edit_adapter_config(store / "adapters" / "a", use_dora=True)
    with pytest.raises(AdapterError, match="DoRA.*not supported yet"):
        read_adapter(store / "adapters" / "a")


@pytest.mark.parametrize(("missing", "words"), [("adapter_config.json", "no adapter_config.json"),
                                                 ("adapter_model.safetensors", "no adapter_model.safetensors")])
def test_missing_files_are_named(store, missing, words):
    (store / "adapters" / "a" / missing).unlink()
    with pytest.raises(AdapterError) as err:
        read_adapter(store / "adapters" / "a")
    assert words in str(err.value) and str(store / "adapters" / "a") in str(err.value)


def test_rank_disagreeing_with_config_is_an_error(store):
    edit_adapter_config(store / "adapters" / "a", r=8)
    with pytest.raises(AdapterError, match="rank 8"):
        read_adapter(store / "adapters" / "a")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_tensor(store, value):
    def poison(t):
        t[0, 0] = value
        return t

    key = set_adapter_tensor(store / "adapters" / "b", "layers.1.self_attn.o_proj.lora_B", poison)
    adapter = read_adapter(store / "adapters" / "b")  # opening does not load tensors
    with pytest.raises(AdapterError) as err:
        adapter.check_finite()
    assert key in str(err.value) and ("NaN" if math.isnan(value) else "Inf") in str(err.value)


def test_plan_is_the_union_of_targets(store):
    adapters = [read_adapter(store / "adapters" / n) for n in ("a", "b", "c")]
    plan = {p.name: p for p in plan_modules(adapters)}
    expected = set().union(*(a.modules for a in adapters))
    assert set(plan) == expected
    assert plan["model.layers.0.self_attn.v_proj"].present == (True, False, False)
    assert plan["model.layers.1.self_attn.v_proj"].present == (True, False, True)
    assert plan["model.layers.0.mlp.up_proj"].shape == (64, 32)


def test_different_shapes_for_one_module_are_an_error(store):
    def widen(t):
        return torch.cat([t, t])  # lora_B (32, r) -> (64, r): out_features 64

    set_adapter_tensor(store / "adapters" / "b", "layers.0.self_attn.q_proj.lora_B", widen)
    adapters = [read_adapter(store / "adapters" / n) for n in ("a", "b")]
    with pytest.raises(AdapterError) as err:
        plan_modules(adapters)
    assert err.value.path == store / "adapters" / "b"
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "[64, 32]" in str(err.value)


def test_different_base_models_are_an_error(store):
    edit_adapter_config(store / "adapters" / "b", base_model_name_or_path="other/model")
    adapters = [read_adapter(store / "adapters" / n) for n in ("a", "b")]
    with pytest.raises(AdapterError, match="allowBaseMismatch") as err:
        check_same_base(adapters)
    assert err.value.path == store / "adapters" / "b" and "other/model" in str(err.value)
