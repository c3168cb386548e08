"""What a run writes may never cost the user data: the output never is, holds or lies inside an input
(even with overwrite: true, through symlinks or claims mapped to overlapping folders), and every value
written is finite after the cast to output.dtype. Through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.merge_specs import LINEAR_TWO_ADAPTERS, with_output


SPEC = with_output(LINEAR_TWO_ADAPTERS, overwrite=True)


def _tree(folder):
    """Every file below folder with its bytes: to prove nothing of it changed."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _with_output(path, **extra):
    return {**SPEC, "output": {**SPEC["output"], "path": path}, **extra}


@pytest.mark.parametrize(("output", "input_field"), [
    ("adapters/a", "spec.adapters[0].path"),         # is an adapter
    ("adapters", "spec.adapters[0].path"),           # contains the adapters
    ("models", "spec.baseModel.path"),               # contains the base model
    ("adapters/a/sub", "spec.adapters[0].path"),     # lies inside an adapter
])
def test_overwrite_never_replaces_an_input_folder(store, adaptermerge, output, input_field):
    before = _tree(store)
    run = adaptermerge("run", _with_output(output), store)
    assert run.code == 2, run.err
    assert run.result["field"] == "spec.output.path" and input_field in run.result["message"]
    assert _tree(store) == before


def test_overwrite_never_replaces_a_folder_holding_an_evaluation_dataset(store, adaptermerge):
    (store / "eval").mkdir()
    (store / "eval" / "python.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    spec = _with_output("eval", evaluation={"datasets": [{"name": "python", "path": "eval/python.jsonl",
                                                          "adapter": "a"}]})
    before = _tree(store)
    run = adaptermerge("run", spec, store)
    assert run.code == 2 and "spec.evaluation.datasets[0].path" in run.result["message"], run.err
    assert _tree(store) == before


def test_overwrite_never_replaces_a_folder_an_input_file_links_into(store, adaptermerge):
    # The adapter's weights live in another folder; the adapter folder holds a symlink to them.
    elsewhere = store / "weights"
    elsewhere.mkdir()
    weights = store / "adapters" / "a" / "adapter_model.safetensors"
    weights.rename(elsewhere / "a.safetensors")
    weights.symlink_to("../../weights/a.safetensors")
    before = _tree(store)
    run = adaptermerge("run", _with_output("weights"), store)
    assert run.code == 2 and "spec.adapters[0].path" in run.result["message"], run.err
    assert _tree(store) == before


def test_overwrite_never_replaces_inputs_of_another_claim_on_an_overlapping_folder(store, adaptermerge):
    # Claim `out` is a folder inside claim `store`; the output on `out` is the adapters folder on `store`.
    spec = _with_output("a")
    spec["output"]["claimName"] = "out"
    before = _tree(store)
    run = adaptermerge("run", spec, store, "--volume", f"out={store / 'adapters'}")
    assert run.code == 2 and "spec.adapters[0].path" in run.result["message"], run.err
    assert _tree(store) == before


def test_overwrite_never_replaces_the_spec_file(store, adaptermerge):
    import yaml

    (store / "merged" / "out").mkdir(parents=True)
    spec_file = store / "merged" / "out" / "merge.yaml"
    spec_file.write_text(yaml.safe_dump({"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
                                         "spec": {"volume": {"claimName": "store"}, **SPEC}}))
    run = adaptermerge("run", spec_file, store)
    assert run.code == 2 and "spec file" in run.result["message"], run.err
    assert spec_file.exists()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_output_name_without_room_for_the_temporary_names_is_an_input_error(store, adaptermerge, command):
    # ".<name>.adaptermerge-lock" beside the output must fit the 255-byte name limit too.
    run = adaptermerge(command, _with_output("merged/" + "n" * 240), store)
    assert run.code == 2 and "spec.output.path" in run.err and "leave room" in run.err, run.err
    assert not (store / "merged").exists()


# -- finite after the cast ----------------------------------------------------------------------------


def _scale_tensors(path, factor, keys):
    tensors = load_file(str(path))
    for key in keys(tensors):
        tensors[key] = tensors[key] * factor
    save_file(tensors, str(path), metadata={"format": "pt"})


def _written_finite(folder) -> bool:
    tensors = [t for f in folder.glob("*.safetensors") for t in load_file(str(f)).values()]
    return bool(tensors) and all(torch.isfinite(t.float()).all() for t in tensors)


def test_merged_factors_beyond_float16_are_an_input_error_not_inf(store, adaptermerge):
    # Finite in float32, but the merged factors (each about sqrt of the delta) pass 65504.
    _scale_tensors(store / "adapters" / "a" / "adapter_model.safetensors", 1e12,
                   lambda t: [k for k in t if "lora_B" in k])
    spec = {**SPEC, "output": {"path": "merged/out", "rank": 4, "dtype": "float16"}}
    run = adaptermerge("run", spec, store)
    assert run.code == 2, run.err
    assert run.result["field"] == "spec.output.dtype" and run.result["reason"] == "InvalidSpec"
    assert "module model.layers." in run.result["message"] and "float16" in run.result["message"]
    assert not (store / "merged").exists()
    # The same inputs fit float32: written, and finite.
    fine = adaptermerge("run", {**spec, "output": {**spec["output"], "dtype": "float32"}}, store)
    assert fine.code == 0 and _written_finite(store / "merged" / "out"), fine.err


def test_modules_to_save_beyond_float16_are_an_input_error(store, adaptermerge):
    _scale_tensors(store / "adapters" / "c" / "adapter_model.safetensors", 1e6,
                   lambda t: [k for k in t if "lm_head" in k])
    spec = {**SPEC, "adapters": [{"name": "c", "path": "adapters/c"}],
            "output": {"path": "merged/out", "rank": 4, "dtype": "float16"}}
    run = adaptermerge("run", spec, store)
    assert run.code == 2 and "modules_to_save tensor lm_head.weight" in run.result["message"], run.err
    assert not (store / "merged").exists()


def test_merged_model_weights_beyond_float16_are_an_input_error(store, adaptermerge):
    # A copied base tensor (not merged) whose float32 values pass float16's range.
    index = json.loads((store / "models" / "tiny" / "model.safetensors.index.json").read_text())
    shard = store / "models" / "tiny" / index["weight_map"]["model.norm.weight"]
    _scale_tensors(shard, 1e6, lambda t: ["model.norm.weight"])
    spec = {**SPEC, "output": {"path": "merged/model", "format": "merged-model", "dtype": "float16"}}
    run = adaptermerge("run", spec, store)
    assert run.code == 2 and run.result["field"] == "spec.output.dtype", run.err
    assert "model.norm.weight" in run.result["message"]
    assert not (store / "merged").exists()
