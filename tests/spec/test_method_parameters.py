"""The merge methods' parameters in the spec: mergekit's names and options, per-adapter values, and errors
that name the field (docs/merging.md)."""

import copy

import pytest

from merge_worker.spec import METHODS, SpecError, parse_spec

BASE = {
    "volume": {"claimName": "store"},
    "adapters": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
    "method": "ties",
    "parameters": {"density": 0.5},
    "output": {"path": "out"},
}


def spec_with(**changes):
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        data[key] = value
    return data


def test_every_mergekit_task_vector_method_is_a_spec_method():
    for name in ("task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear", "nuslerp", "model_stock", "sce"):
        assert name in METHODS


def test_mergekit_options_and_per_adapter_values_parse():
    spec = parse_spec(spec_with(
        method="della",
        adapters=[{"name": "a", "path": "a", "density": 0.3, "epsilon": 0.1, "weight": 2.0},
                  {"name": "b", "path": "b"}],
        parameters={"density": 0.5, "conventions": "mergekit", "normalize": False, "rescale": "none",
                    "epsilon": 0.2},
    ))
    assert spec.adapters[0].density == 0.3 and spec.adapters[1].density is None
    assert spec.parameters.conventions == "mergekit" and spec.parameters.rescale == "none"


def test_density_is_optional_under_mergekit_conventions_or_when_every_adapter_has_one():
    parse_spec(spec_with(parameters={"conventions": "mergekit"}))
    parse_spec(spec_with(adapters=[{"name": "a", "path": "a", "density": 0.2},
                                   {"name": "b", "path": "b", "density": 0.7}], parameters={}))
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(adapters=[{"name": "a", "path": "a", "density": 0.2}, {"name": "b", "path": "b"}],
                             parameters={}))
    assert err.value.field == "spec.parameters.density"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"method": "linear", "parameters": {"gamma": 0.1}}, "spec.parameters.gamma", "does not use it"),
        ({"method": "ties", "parameters": {"density": 0.5, "epsilon": 0.1}}, "spec.parameters.epsilon",
         "does not use it"),
        ({"method": "slerp", "parameters": {"normalize": True}}, "spec.parameters.normalize", "does not use it"),
        ({"method": "ties", "parameters": {"density": 0.5, "rescale": "inverse-probability"}},
         "spec.parameters.rescale", "inverse-probability"),
        ({"method": "linear", "adapters": [{"name": "a", "path": "a", "density": 0.5}, {"name": "b", "path": "b"}]},
         "spec.adapters[0].density", "does not use it"),
        ({"method": "ties", "adapters": [{"name": "a", "path": "a", "gamma": 0.1}, {"name": "b", "path": "b"}]},
         "spec.adapters[0].gamma", "does not use it"),
        ({"method": "della", "parameters": {"density": 0.9}}, "spec.parameters.density", "density +/- epsilon"),
        ({"method": "della", "adapters": [{"name": "a", "path": "a", "density": 0.1}, {"name": "b", "path": "b"}],
          "parameters": {"density": 0.5}}, "spec.adapters[0].density", "density +/- epsilon"),
        ({"method": "nuslerp", "adapters": [{"name": "a", "path": "a"}]}, "spec.adapters", "exactly two"),
        ({"method": "model_stock", "adapters": [{"name": "a", "path": "a"}]}, "spec.adapters", "two adapters"),
        ({"method": "slerp", "parameters": {"conventions": "mergekit"}}, "spec.method", "whole weights"),
        ({"parameters": {"density": 0.5, "conventions": "peft"}}, "spec.parameters.conventions", "mergekit"),
        ({"parameters": {"density": 0.5, "rescale": "l2"}}, "spec.parameters.rescale", "l1"),
        ({"method": "breadcrumbs", "parameters": {"gamma": 1.0}}, "spec.parameters.gamma", "less than 1"),
        ({"method": "sce", "parameters": {"selectTopk": 0}}, "spec.parameters.selectTopk", "greater than 0"),
    ],
)
def test_bad_method_parameters_name_the_field(changes, field, message):
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(**changes))
    assert err.value.field == field
    assert message in err.value.message
