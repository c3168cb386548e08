"""The shared spec models: defaults, derived values, and errors that name the offending field."""

import copy
import subprocess
import sys

import pytest

from merge_worker.spec import SpecError, parse_resource, parse_spec

VALID = {
    "apiVersion": "adaptermerge.io/v1alpha1",
    "kind": "AdapterMerge",
    "metadata": {"name": "dev-assistant"},
    "spec": {
        "volume": {"claimName": "llm-store"},
        "baseModel": {"path": "models/base"},
        "adapters": [
            {"name": "python-coder", "path": "adapters/python", "weight": 0.7},
            {"name": "sql-generator", "path": "adapters/sql", "claimName": "other-store"},
        ],
        "method": "ties",
        "parameters": {"density": 0.5, "lambda": 1.2},
        "output": {"path": "adapters/merged", "rank": "auto", "energy": 0.95},
        "evaluation": {
            "datasets": [{"name": "python", "path": "eval/python.jsonl", "adapter": "python-coder"}],
            "minRetention": 0.8,
        },
    },
}


def with_change(change):
    doc = copy.deepcopy(VALID)
    change(doc["spec"])
    return doc


def test_valid_resource_fills_defaults_and_derived_values():
    spec = parse_resource(VALID).spec
    assert spec.parameters.lambda_ == 1.2
    assert spec.parameters.seed == 0 and spec.parameters.t == 0.5
    assert spec.output.rank == "auto" and spec.output.format == "adapter" and not spec.output.overwrite
    assert spec.base_model.quantization == "none"
    assert spec.job.backoff_limit == 2 and spec.job.gpus == 1
    # Unset weights default to 1; the output's claim is the only writable one.
    assert spec.adapter_weights() == [0.7, 1.0]
    assert spec.claims() == {"llm-store": True, "other-store": False}
    assert spec.claim_of(spec.adapters[1]) == "other-store"


def test_weights_may_come_from_parameters():
    def change(spec):
        for a in spec["adapters"]:
            a.pop("weight", None)
        spec["parameters"]["weights"] = [0.25, 0.75]

    assert parse_resource(with_change(change)).spec.adapter_weights() == [0.25, 0.75]


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda s: s.update(method="slerp", parameters={}) or s["adapters"].append(
            {"name": "third", "path": "a/c"}), "spec.adapters", "exactly two"),
        (lambda s: s["parameters"].update(density=1.5), "spec.parameters.density", "less than or equal"),
        (lambda s: s["parameters"].update(density=0), "spec.parameters.density", "greater than"),
        (lambda s: s["parameters"].pop("density"), "spec.parameters.density", "required for method ties"),
        (lambda s: s["adapters"][1].update(path="../escape"), "spec.adapters[1].path", "relative path"),
        (lambda s: s["adapters"][0].update(path="/abs/olute"), "spec.adapters[0].path", "relative path"),
        (lambda s: s.update(method="average"), "spec.method", "'ties'"),
        (lambda s: s["parameters"].update(weights=[1, 2, 3]) or [a.pop("weight", None) for a in s["adapters"]],
         "spec.parameters.weights", "3 weights given for 2 adapters"),
        (lambda s: s["parameters"].update(weights=[1, 2]), "spec.adapters[0].weight", "either per adapter"),
        (lambda s: s["output"].update(rank=0), "spec.output.rank", "positive integer or 'auto'"),
        (lambda s: s["output"].update(rank="full"), "spec.output.rank", "positive integer or 'auto'"),
        (lambda s: s.update(methd="ties"), "spec.methd", "Extra inputs"),
        (lambda s: s["adapters"][0].update(weight=float("inf")), "spec.adapters[0].weight", "finite"),
        (lambda s: s.pop("volume"), "spec.output.claimName", "no spec.volume"),
        (lambda s: s["adapters"][1].update(name="python-coder"), "spec.adapters[1].name", "duplicate"),
        (lambda s: s["adapters"][1].update(name="Not A Label"), "spec.adapters[1].name", "pattern"),
        (lambda s: s["evaluation"]["datasets"][0].update(adapter="nope"),
         "spec.evaluation.datasets[0].adapter", "not in spec.adapters"),
        (lambda s: s.pop("baseModel"), "spec.baseModel", "evaluation needs a base model"),
        (lambda s: s.pop("evaluation") and s.pop("baseModel") and s["output"].update(format="merged-model"),
         "spec.baseModel", "merged-model needs a base model"),
        (lambda s: s.update(adapters=[]), "spec.adapters", "at least 1"),
        (lambda s: s.update(adapters=[{"name": f"a{i}", "path": f"a/{i}"} for i in range(65)]),
         "spec.adapters", "at most 64"),
    ],
)
def test_invalid_spec_names_the_field(change, field, words):
    with pytest.raises(SpecError) as err:
        parse_resource(with_change(change))
    assert err.value.field == field
    assert words in err.value.message


def test_document_level_errors():
    with pytest.raises(SpecError, match="expected a YAML mapping"):
        parse_resource(["not", "a", "mapping"])
    doc = copy.deepcopy(VALID)
    doc["kind"] = "Deployment"
    with pytest.raises(SpecError) as err:
        parse_resource(doc)
    assert err.value.field == "kind"


def test_parse_spec_accepts_the_operator_view_without_apiversion():
    assert parse_spec(VALID["spec"]).method == "ties"


def test_spec_module_does_not_import_torch():
    code = "import sys, merge_worker.spec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
