"""`adaptermerge from-mergekit`: what a mergekit YAML becomes, and the mergekit field each refusal names.

(That the translated resources merge to mergekit's own result is test_mergekit_parity.py's job.)"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merge_worker.from_mergekit import TranslationError, translate
from merge_worker.spec import parse_resource

CONFIG = {
    "merge_method": "ties",
    "base_model": "models/llama",
    "models": [
        {"model": "models/llama"},
        {"model": "models/llama+adapters/Python_Coder", "parameters": {"weight": 0.7, "density": 0.3}},
        {"model": "models/llama+adapters/sql", "parameters": {"weight": 0.3}},
    ],
    "parameters": {"density": 0.5, "normalize": True, "int8_mask": True},
    "dtype": "bfloat16",
}


LINEAR_MODELS = [{"model": "models/llama+a", "parameters": {"weight": 0.7}},
                 {"model": "models/llama+b", "parameters": {"weight": 0.7}}]


def translated(config=CONFIG, **options):
    return translate(copy.deepcopy(config), **{"claim": "store", "output": "merged", "name": "m", **options})


def changed(change):
    config = copy.deepcopy(CONFIG)
    change(config)
    return config


def test_models_parameters_and_dtype_become_a_valid_resource():
    resource, notes = translated()
    spec = resource["spec"]
    assert spec["baseModel"] == {"path": "models/llama"}
    assert spec["adapters"] == [
        {"name": "python-coder", "path": "adapters/Python_Coder", "weight": 0.7, "density": 0.3},
        {"name": "sql", "path": "adapters/sql", "weight": 0.3},
    ]
    assert spec["parameters"] == {"conventions": "mergekit", "density": 0.5, "normalize": True}
    assert spec["output"] == {"path": "merged", "format": "merged-model", "dtype": "bfloat16"}
    assert parse_resource(resource).spec.method == "ties"
    assert any("int8_mask" in n for n in notes) and any("models[0]" in n for n in notes)


def test_a_value_every_adapter_gives_alike_becomes_the_global_parameter():
    config = changed(lambda c: (c["parameters"].pop("density"), c["models"][2]["parameters"].update(density=0.3)))
    resource, _ = translated(config)
    assert resource["spec"]["parameters"]["density"] == 0.3
    assert all("density" not in a for a in resource["spec"]["adapters"])


def test_rescale_becomes_l1_or_none_and_absolute_paths_are_made_relative_to_root(tmp_path):
    config = changed(lambda c: c.update(
        merge_method="dare_ties", base_model=str(tmp_path / "base"), parameters={"rescale": False},
        models=[{"model": f"{tmp_path / 'base'}+{tmp_path / 'a'}", "parameters": {"weight": 1.0}}]))
    resource, _ = translated(config, root=tmp_path)
    assert resource["spec"]["parameters"] == {"conventions": "mergekit", "rescale": "none"}
    assert resource["spec"]["baseModel"]["path"] == "base" and resource["spec"]["adapters"][0]["path"] == "a"


def test_linear_with_the_base_among_its_models_folds_the_base_weight_into_the_adapters():
    config = changed(lambda c: c.update(merge_method="linear", parameters={}, models=[
        {"model": "models/llama", "parameters": {"weight": 2.0}},
        {"model": "models/llama+a", "parameters": {"weight": 1.0}},
        {"model": "models/llama+b", "parameters": {"weight": 1.0}},
    ]))
    resource, _ = translated(config)
    assert [a["weight"] for a in resource["spec"]["adapters"]] == [0.25, 0.25]
    assert resource["spec"]["parameters"]["normalize"] is False


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda c: c.update(merge_method="karcher"), "merge_method", "whole weights"),
        (lambda c: c.update(merge_method="slerp"), "merge_method", "nuslerp"),
        (lambda c: c.update(merge_method="frankenmerge"), "merge_method", "unknown"),
        (lambda c: c.update(slices=[{"sources": []}]), "slices", "not translatable"),
        (lambda c: c.update(tokenizer_source="union"), "tokenizer_source", "base model's tokenizer"),
        (lambda c: c.update(chat_template="chatml"), "chat_template", "chat template"),
        (lambda c: c.update(typo=1), "typo", "not a mergekit field"),
        (lambda c: c.pop("base_model"), "base_model", "needs it"),
        (lambda c: c.update(base_model="models/llama+x"), "base_model", "not a base model"),
        (lambda c: c["models"][2].update(model="models/mistral+adapters/sql"), "models[2].model", "extract"),
        (lambda c: c["models"][2].update(model="models/full-finetune"), "models[2].model", "extract"),
        (lambda c: c["models"][2].update(model="models/llama+adapters/sql@v2"), "model", "revisions"),
        (lambda c: c["models"][2]["parameters"].pop("weight"), "models[2].parameters.weight", "requires a weight"),
        (lambda c: c["models"][1]["parameters"].update(density=[0.1, 0.5]), "models[1].parameters.density",
         "gradients"),
        (lambda c: c["parameters"].update(density={"filter": "mlp", "value": 0.2}), "parameters.density",
         "filters"),
        (lambda c: c["models"][1]["parameters"].update(normalize=True), "models[1].parameters.normalize",
         "global parameter"),
        (lambda c: c["parameters"].update(gamma=0.1), "parameters.gamma", "not a parameter"),
        (lambda c: c.update(dtype="float64"), "dtype", "not one of"),
        (lambda c: c.update(merge_method="model_stock", parameters={"filter_wise": True},
                            models=[{"model": "models/llama+a"}, {"model": "models/llama+b"}]),
         "parameters.filter_wise", "not implemented"),
        (lambda c: (c.update(merge_method="linear", parameters={"normalize": False}, models=LINEAR_MODELS),
                    c.pop("base_model")), "parameters.normalize", "scales the base"),
        (lambda c: c.update(merge_method="linear", parameters={}, models=LINEAR_MODELS), "base_model",
         "needs its weight"),
        (lambda c: c.update(merge_method="della", parameters={"density": 0.9}),
         "parameters.density (spec field spec.parameters.density)", "epsilon"),
        (lambda c: c["models"][2]["parameters"].update(density=1.5),
         "models[2].parameters.density (spec field spec.adapters[1].density)", "less than or equal to 1"),
        (lambda c: c.update(merge_method="della", parameters={"density": 0.5},
                            models=[{"model": "models/llama+a", "parameters": {"weight": 1, "density": 0.05}},
                                    {"model": "models/llama+b", "parameters": {"weight": 1}}]),
         "models[0].parameters.density (spec field spec.adapters[0].density)", "epsilon"),
    ],
)
def test_what_cannot_be_translated_names_the_mergekit_field(change, field, message):
    with pytest.raises(TranslationError) as err:
        translated(changed(change))
    assert err.value.field == field
    assert message in err.value.message


def adaptermerge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_worker.cli", *args], capture_output=True, text=True)


def test_cli_prints_the_resource_and_notes(tmp_path):
    config = tmp_path / "my_merge.yml"
    config.write_text(yaml.safe_dump(CONFIG))
    done = adaptermerge("from-mergekit", str(config), "--claim", "llm-store", "--output", "out/m", "--format",
                        "adapter")
    assert done.returncode == 0, done.stderr
    resource = yaml.safe_load(done.stdout)
    assert resource["metadata"]["name"] == "my-merge"
    assert resource["spec"]["volume"] == {"claimName": "llm-store"}
    assert resource["spec"]["output"]["format"] == "adapter"
    assert "note: parameters.int8_mask" in done.stderr


def test_cli_exits_2_naming_the_field_and_prints_nothing(tmp_path):
    config = tmp_path / "bad.yml"
    config.write_text(yaml.safe_dump(changed(lambda c: c.update(merge_method="arcee_fusion"))))
    done = adaptermerge("from-mergekit", str(config))
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{config}: merge_method: arcee_fusion" in done.stderr
    missing = adaptermerge("from-mergekit", str(tmp_path / "absent.yml"))
    assert missing.returncode == 2 and "cannot read the file" in missing.stderr
