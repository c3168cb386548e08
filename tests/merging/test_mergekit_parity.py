"""adaptermerge's merged model equals mergekit's own merge of the same adapters (docs/merging.md).

For each case, one mergekit configuration is run twice: by mergekit itself (its Python API, in-process on
the CPU) on full models, each the base plus one adapter merged in by PEFT; and, translated by
`adaptermerge from-mergekit` with the models written as BASE+ADAPTER, by adaptermerge's runner with
merged-model output. Every tensor of the two models must agree to 1e-5 of the merged delta.

DARE and DELLA draw random masks, and mergekit's draws (torch.bernoulli on the global generator) are not
ours. mergekit is therefore given our draws: its sparsification runs with a `torch.bernoulli` that
compares the uniform draws adaptermerge makes for that module and adapter with mergekit's own keep
probabilities. Everything else (the probabilities, rescaling, sign election, sums) stays mergekit's.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergekit.merge_methods.generalized_task_arithmetic as mergekit_gta
import mergekit.sparsify as mergekit_sparsify
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge as mergekit_run_merge
from mergekit.options import MergeOptions
from merge_worker.from_mergekit import translate
from merge_worker.methods.dare_linear import keyed_uniform
from merge_worker.run import run_merge
from merge_worker.spec import parse_resource
from merge_worker.inputs.volumes import Volumes
from support.tiny_models import make_lora_adapter, make_tiny_llama

# name -> make_lora_adapter options: different ranks, alphas, rslora and target sets (so some modules
# have one adapter, some two, some three).
ADAPTERS = {
    "a": {"r": 4, "alpha": 8, "target_modules": ("q_proj", "v_proj", "up_proj"), "seed": 1},
    "b": {"r": 2, "alpha": 4, "use_rslora": True, "target_modules": ("q_proj", "o_proj", "down_proj", "up_proj"),
          "seed": 2},
    "c": {"r": 3, "alpha": 6, "target_modules": ("q_proj", "v_proj", "gate_proj"), "seed": 3},
}


def models(weights=(0.5, 0.3, 0.7), names="abc", **per_model):
    """The `models` list: one entry per adapter with its weight and any per-model lists in per_model."""
    entries = []
    for i, name in enumerate(names):
        parameters = {"weight": weights[i]} if weights else {}
        parameters.update({key: values[i] for key, values in per_model.items() if values[i] is not None})
        entries.append({"model": name, "parameters": parameters})
    return entries


# (case id, merge_method, models, global parameters). density 0.4 of a 32 x 32 module keeps int(409.6) = 409
# entries in mergekit and round() = 410 under adaptermerge conventions; gamma 0.07 likewise (71 vs 72).
CASES = [
    ("linear", "linear", models(), {}),
    ("linear-with-base", "linear", [{"model": "base", "parameters": {"weight": 0.5}}] + models(), {}),
    ("task_arithmetic", "task_arithmetic", models(), {"lambda": 1.2}),
    ("task_arithmetic-normalize", "task_arithmetic", models(), {"normalize": True}),
    ("ties", "ties", models(), {"density": 0.4}),
    ("ties-per-model-no-normalize", "ties", models(density=(0.3, 0.6, None)), {"normalize": False}),
    ("ties-rescale", "ties", models(), {"density": 0.4, "rescale": True, "int8_mask": True}),
    ("dare_linear", "dare_linear", models(), {"density": 0.5}),
    ("dare_ties-per-model", "dare_ties", models(density=(0.3, 0.7, 0.5)), {}),
    ("dare_ties-no-rescale-normalize", "dare_ties", models(), {"density": 0.4, "rescale": False, "normalize": True}),
    ("breadcrumbs", "breadcrumbs", models(), {"density": 0.6, "gamma": 0.07}),
    ("breadcrumbs-clamped", "breadcrumbs", models(), {"density": 0.9, "gamma": 0.2}),
    ("breadcrumbs_ties-per-model", "breadcrumbs_ties", models(gamma=(0.0, 0.05, None)), {"density": 0.4}),
    ("della", "della", models(), {"density": 0.5, "epsilon": 0.1}),
    ("della_linear-per-model", "della_linear", models(epsilon=(0.05, None, 0.2)), {"density": 0.4}),
    ("nuslerp", "nuslerp", models(weights=(0.3, 0.7), names="ab"), {}),
    ("model_stock", "model_stock", models(weights=None), {}),
    ("sce", "sce", models(weights=None), {"select_topk": 0.5}),
    ("sce-all", "sce", models(weights=None), {}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A claim folder: base/, adapters a, b, c, and full/<x> = base with adapter x merged in by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("store")
    base = make_tiny_llama(root / "base", tokenizer=False)
    for name, options in ADAPTERS.items():
        make_lora_adapter(root / name, base, **options)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        PeftModel.from_pretrained(model, str(root / name)).merge_and_unload().save_pretrained(str(root / "full" / name))
    return root


class FixedDraws:
    """mergekit's sparsify with adaptermerge's uniform draws: the delta being sparsified is matched to
    (module, adapter index) by its exact values, and torch.bernoulli(p) becomes `draws < p`."""

    def __init__(self, deltas: dict[tuple[str, int], torch.Tensor], seed: int):
        self.deltas = deltas
        self.seed = seed
        self.draws: torch.Tensor | None = None
        self.matched = 0

    def sparsify(self, tensor, *args, **kwargs):
        key = next((k for k, d in self.deltas.items() if d.shape == tensor.shape and torch.equal(d, tensor)), None)
        if key is None:
            assert not tensor.any(), "a non-zero delta mergekit sparsifies is none of the adapters'"
            self.draws = torch.zeros(tensor.shape)  # any mask leaves a zero delta zero
        else:
            self.matched += 1
            self.draws = keyed_uniform(self.seed, key[0], key[1], tensor)
        return ORIGINAL_SPARSIFY(tensor, *args, **kwargs)

    def bernoulli(self, probabilities, *args, **kwargs):
        return (self.draws.reshape(probabilities.shape) < probabilities).to(probabilities.dtype)


ORIGINAL_SPARSIFY = mergekit_gta.sparsify


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def task_deltas(store: Path, names: str) -> dict[tuple[str, int], torch.Tensor]:
    """(module name, adapter index) -> full model minus base, as mergekit computes it (float32)."""
    base = weights(store / "base")
    out = {}
    for i, name in enumerate(names):
        full = weights(store / "full" / name)
        for key, tensor in full.items():
            delta = tensor - base[key]
            if delta.any():
                out[(key.removesuffix(".weight"), i)] = delta
    return out


@pytest.mark.parametrize(("case", "method", "entries", "parameters"), CASES, ids=[c[0] for c in CASES])
def test_merged_model_equals_mergekit(store, tmp_path, monkeypatch, case, method, entries, parameters):
    names = "".join(e["model"] for e in entries if e["model"] != "base")
    config = {"merge_method": method, "parameters": parameters, "dtype": "float32"}
    if method != "linear":  # mergekit's linear averages base_model in as one more model: ours is in `models`
        config["base_model"] = str(store / "base")

    # mergekit, on full models.
    on_full_models = copy.deepcopy(config)
    on_full_models["models"] = [
        {**e, "model": str(store / "base") if e["model"] == "base" else str(store / "full" / e["model"])}
        for e in entries
    ]
    draws = FixedDraws(task_deltas(store, names), seed=0)
    monkeypatch.setattr(mergekit_gta, "sparsify", draws.sparsify)
    patched_torch = {name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")}
    monkeypatch.setattr(mergekit_sparsify, "torch", types.SimpleNamespace(**{**patched_torch,
                                                                              "bernoulli": draws.bernoulli}))
    mergekit_run_merge(MergeConfiguration.model_validate(on_full_models), str(tmp_path / "mergekit"),
                       MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    if method.startswith(("dare", "della")):
        assert draws.matched >= len(names), "mergekit drew its masks from adaptermerge's draws"

    # adaptermerge, on the adapters, through the translation.
    as_adapters = copy.deepcopy(config)
    as_adapters["models"] = [
        {**e, "model": str(store / "base") + ("" if e["model"] == "base" else "+" + e["model"])} for e in entries
    ]
    resource, _ = translate(as_adapters, claim="store", output=f"out-{case}", name=case, root=store)
    spec = parse_resource(resource).spec
    run_merge(spec, Volumes({"store": store}), device="cpu", print_out=lambda *_: None, tty=False)

    theirs = weights(tmp_path / "mergekit")
    ours = weights(store / f"out-{case}")
    base = weights(store / "base")
    assert sorted(ours) == sorted(theirs)
    targeted = {module + ".weight" for module, _ in draws.deltas}
    assert len(targeted) >= 4
    for key, want in theirs.items():
        got, want, origin = ours[key].double(), want.double(), base[key].double()
        difference = float((got - want).norm())
        if key in targeted:  # (model_stock leaves the base where one adapter alone targets a module)
            assert difference <= 1e-5 * float((want - origin).norm()) or difference == 0, key
        else:  # no adapter targets it: the base, exactly in ours, up to float32 rounding in mergekit's average
            assert torch.equal(got, origin), key
            assert difference <= 1e-6 * float(origin.norm()), key
