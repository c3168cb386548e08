"""The streaming safetensors writer and the sharded merged-model writer, below the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merge_worker.inputs.base_weights import BaseWeights
from merge_worker.output.merged_model_writer import write_merged_model
from merge_worker.output.safetensors_stream import SafetensorsStreamWriter


def test_stream_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(4, 6).T,  # not contiguous
    }
    writer = SafetensorsStreamWriter(tmp_path / "t.safetensors")
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # the side file is gone


def test_stream_writer_refuses_a_name_twice(tmp_path):
    writer = SafetensorsStreamWriter(tmp_path / "t.safetensors")
    writer.add("x", torch.zeros(1))
    with pytest.raises(ValueError, match="twice"):
        writer.add("x", torch.zeros(1))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_sharded_merged_model_loads_with_new_dtype(tiny_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    base_folder = tiny_inputs / "models" / "tiny"
    base = BaseWeights(base_folder)
    modules = {"model.layers.0.self_attn.q_proj": "linear", "model.embed_tokens": "embedding"}
    shapes = {"model.layers.0.self_attn.q_proj": (32, 32), "model.embed_tokens": (32, base.shape(
        "model.embed_tokens.weight")[0])}  # embedding deltas come in B @ A space: (dim, vocab)
    deltas = {m: torch.randn(*shape, generator=torch.Generator().manual_seed(i))
              for i, (m, shape) in enumerate(shapes.items())}
    head = torch.full(base.shape("lm_head.weight"), 0.25)
    out = tmp_path / "merged"
    files = write_merged_model(out, base, modules, deltas.__getitem__, {"lm_head.weight": lambda: head},
                               dtype=torch.bfloat16, max_shard_bytes=8_000)
    assert len(files) > 2 and all(f.exists() for f in files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base.names())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    state = merged.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[q], (base.get(q) + deltas["model.layers.0.self_attn.q_proj"]).to(torch.bfloat16))
    emb = "model.embed_tokens.weight"
    assert torch.equal(state[emb], (base.get(emb) + deltas["model.embed_tokens"].T).to(torch.bfloat16))
    assert torch.equal(state["lm_head.weight"], head.to(torch.bfloat16))
    v = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(state[v], base.get(v).to(torch.bfloat16))


def test_merged_model_in_the_base_dtype_copies_unmerged_tensors_byte_for_byte(tiny_inputs, tmp_path):
    """Same dtype in and out: untouched tensors take the file-to-file copy, merged ones W + delta; with
    shards small enough that several threads write side by side."""
    from safetensors import safe_open

    base = BaseWeights(tiny_inputs / "models" / "tiny")
    module = "model.layers.1.mlp.down_proj"
    out_f, in_f = base.shape(f"{module}.weight")
    delta = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(3))
    out = tmp_path / "merged"
    files = write_merged_model(out, base, {module: "linear"}, lambda _: delta, {}, dtype=base.dtype(),
                               max_shard_bytes=20_000, threads=4)
    assert len(files) > 4
    written = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            written |= {name: f.get_tensor(name) for name in f.keys()}
    assert set(written) == set(base.names())
    for name in base.names():
        expected = base.get(name) + delta if name == f"{module}.weight" else base.get(name)
        assert written[name].dtype == base.get(name).dtype and torch.equal(written[name], expected), name


def test_merged_model_failure_leaves_no_weight_file(tiny_inputs, tmp_path):
    base = BaseWeights(tiny_inputs / "models" / "tiny")
    module = "model.layers.1.self_attn.v_proj"

    def broken(_: str) -> torch.Tensor:
        raise RuntimeError("merge failed")

    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="merge failed"):
        write_merged_model(out, base, {module: "linear"}, broken, {}, dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert not list(out.glob("*.safetensors"))
