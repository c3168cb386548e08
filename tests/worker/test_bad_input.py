"""Issue 2's bad-input table through the CLI: each case exits 2, names the field or path at fault,
writes nothing (no output folder, no temp folder, not even the output's parent), and reports
InvalidSpec in the result file."""

from __future__ import annotations

import math
import os

import pytest
import torch

from support.tiny_models import edit_adapter_config, set_adapter_tensor


def _spec(**changes) -> dict:
    spec = {
        "adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
        "method": "linear",
        "output": {"path": "merged/out"},
    }
    spec.update(changes)
    return spec


def _assert_invalid(run, store, *words: str) -> None:
    assert run.code == 2, run.err
    for word in words:
        assert word in run.err, f"{word!r} not in: {run.err}"
    assert run.result["reason"] == "InvalidSpec" and run.result["exitCode"] == 2
    assert words[0] in run.result["message"]
    assert not (store / "merged").exists(), "nothing may be written on bad input"
    leftovers = [p for p in store.rglob(".*") if ".tmp-" in p.name]
    assert not leftovers


def test_missing_adapter_folder(store, adaptermerge):
    spec = _spec(adapters=[{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/nope"}])
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.adapters[1].path", "does not exist")


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_adapter_file(store, adaptermerge, missing):
    (store / "adapters" / "b" / missing).unlink()
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[1].path", missing)


def test_unmapped_claim(store, adaptermerge):
    spec = _spec(adapters=[{"name": "a", "path": "adapters/a"},
                           {"name": "b", "path": "adapters/b", "claimName": "elsewhere"}])
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.adapters[1].path", "'elsewhere'")


@pytest.mark.parametrize("path", ["../outside", "adapters/../../outside", "/etc/passwd"])
def test_path_escaping_with_dotdot_or_absolute(store, adaptermerge, path):
    spec = _spec(adapters=[{"name": "a", "path": "adapters/a"}, {"name": "b", "path": path}])
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.adapters[1].path", "relative path")


def test_adapter_folder_symlinked_out_of_the_volume(store, adaptermerge, tmp_path):
    outside = tmp_path / "outside-adapter"
    (store / "adapters" / "b").rename(outside)
    os.symlink(outside, store / "adapters" / "b")
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[1].path", "leads outside")


def test_adapter_file_symlinked_out_of_the_volume(store, adaptermerge, tmp_path):
    weights = store / "adapters" / "b" / "adapter_model.safetensors"
    weights.rename(tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", weights)
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[1].path", "leads outside")


def test_two_adapters_with_different_shapes_for_one_module(store, adaptermerge):
    set_adapter_tensor(store / "adapters" / "b", "layers.0.self_attn.q_proj.lora_A",
                       lambda t: torch.cat([t, t], dim=1))  # in_features 32 -> 64
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[1].path",
                    "model.layers.0.self_attn.q_proj", str(store / "adapters" / "b"))


def test_different_base_models(store, adaptermerge):
    edit_adapter_config(store / "adapters" / "b", base_model_name_or_path="someone/other-model")
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[1].path",
                    "someone/other-model", "allowBaseMismatch")
    accepted = adaptermerge("run", _spec(allowBaseMismatch=True), store)
    assert accepted.code == 0, accepted.err
    assert (store / "merged" / "out" / "adapter_model.safetensors").is_file()


def test_slerp_needs_two_adapters(store, adaptermerge):
    spec = _spec(method="slerp", adapters=[{"name": n, "path": f"adapters/{n}"} for n in ("a", "b", "c")])
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.adapters", "exactly two")


def test_weights_of_the_wrong_count(store, adaptermerge):
    spec = _spec(parameters={"weights": [0.5, 0.3, 0.2]})
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.parameters.weights", "3 weights")


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_outside_0_1(store, adaptermerge, density):
    spec = _spec(method="ties", parameters={"density": density})
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.parameters.density")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_adapter_tensor(store, adaptermerge, value):
    def poison(t):
        t[1, 2] = value
        return t

    key = set_adapter_tensor(store / "adapters" / "b", "layers.1.self_attn.q_proj.lora_A", poison)
    bad = "NaN" if math.isnan(value) else "Inf"
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[1].path", key, bad)


def test_unknown_method(store, adaptermerge):
    _assert_invalid(adaptermerge("run", _spec(method="average"), store), store, "spec.method")


def test_malformed_yaml_names_file_and_line(store, adaptermerge, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: adaptermerge.io/v1alpha1\nkind: AdapterMerge\nspec:\n  method: [linear\n"
                    "  output: {path: merged/out}\n")
    run = adaptermerge("run", path, store)
    _assert_invalid(run, store, f"{path}:5:", "malformed YAML")


def test_dora_is_not_supported_yet(store, adaptermerge):
    edit_adapter_config(store / "adapters" / "a", use_dora=True)
    _assert_invalid(adaptermerge("run", _spec(), store), store, "spec.adapters[0].path", "DoRA",
                    "not supported yet")


def test_modules_to_save_without_base_must_be_identical(store, adaptermerge):
    # adapter c trains lm_head fully; without a base model its copy cannot be merged with a's (none).
    spec = _spec(adapters=[{"name": "a", "path": "adapters/a"}, {"name": "c", "path": "adapters/c"}])
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.adapters[0].path", "lm_head.weight",
                    "baseModel")


def test_existing_output_is_not_touched_without_overwrite(store, adaptermerge):
    existing = store / "merged" / "out"
    existing.mkdir(parents=True)
    (existing / "mine.txt").write_text("the user's file")
    before = os.stat(existing / "mine.txt").st_mtime_ns
    run = adaptermerge("run", _spec(), store)
    assert run.code == 2 and "spec.output.path" in run.err and "overwrite" in run.err
    assert sorted(p.name for p in (store / "merged").iterdir()) == ["out"]
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]
    assert (existing / "mine.txt").read_text() == "the user's file"
    assert os.stat(existing / "mine.txt").st_mtime_ns == before


def test_validate_reports_bad_input_without_writing(store, adaptermerge):
    spec = _spec(adapters=[{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/nope"}])
    run = adaptermerge("validate", spec, store)
    assert run.code == 2 and "spec.adapters[1].path" in run.err
    good = adaptermerge("validate", _spec(), store)
    assert good.code == 0 and "valid" in good.out
    assert not (store / "merged").exists()


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"prompt": "x", "completion": "y"}\n{"prompt": 3}\n', "line 2"),
    (b'{"prompt": "x", "completion": "\xff"}\n', "not UTF-8"),
])
def test_bad_evaluation_dataset_is_found_before_merging(store, adaptermerge, content, problem):
    (store / "eval").mkdir()
    (store / "eval" / "python.jsonl").write_bytes(content)
    spec = _spec(baseModel={"path": "models/tiny", "quantization": "none"},
                 evaluation={"datasets": [{"name": "python", "path": "eval/python.jsonl", "adapter": "a"}]})
    checked = adaptermerge("validate", spec, store)
    assert checked.code == 2 and "spec.evaluation.datasets[0].path" in checked.err and problem in checked.err
    _assert_invalid(adaptermerge("run", spec, store), store, "spec.evaluation.datasets[0].path", problem)
