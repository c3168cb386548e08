"""Issue 11, class 3: a fuzz test over every reader, through the real `adaptermerge validate`: whatever
bytes an input file or the spec holds, the command exits 0 or 2 (never 1, never a traceback).

Hypothesis generates near-valid files (the real file with fields replaced by arbitrary JSON values,
headers with arbitrary entries) as well as arbitrary bytes. Derandomized and bounded, so it runs in CI
in about a minute with the same cases every time."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SPEC = {"adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
        "method": "linear", "output": {"path": "merged/out"}}
MERGED_MODEL_SPEC = {**SPEC, "baseModel": {"path": "models/tiny"},
                     "output": {"path": "merged/out", "format": "merged-model"}}

text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\x00", "q_proj", "(", "(.*.*)*x", "LORA", "none", "F32", "BF16", "F8_E4M3", "model.safetensors", "../x"])
numbers = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, 4, 6])
scalars = st.none() | st.booleans() | numbers | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text, inner, max_size=4), max_leaves=12)
# Values shaped like what the field holds (a pattern dict, a list of names), with arbitrary contents.
shaped = st.dictionaries(text, scalars, max_size=3) | st.lists(text, max_size=3)


@pytest.fixture
def check(store, adaptermerge):
    """Runs validate on `spec` and asserts the exit code is 0 or 2 without a traceback."""

    def run(spec=SPEC) -> None:
        shutil.rmtree(store / "merged", ignore_errors=True)
        result = adaptermerge("validate", spec, store)
        assert result.code in (0, 2), result.err
        assert "Traceback" not in result.err

    return run


def _replace_fields(path, changes: dict) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, allow_nan=True))


ADAPTER_FIELDS = ["r", "lora_alpha", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern",
                  "modules_to_save", "base_model_name_or_path", "fan_in_fan_out", "peft_type", "task_type",
                  "trainable_token_indices", "lora_bias"]


PER_FIELD = settings(FUZZ, max_examples=15)


@pytest.mark.parametrize("field", ADAPTER_FIELDS)
@PER_FIELD
@given(value=json_values | shaped)
def test_adapter_config_fields(store, check, field, value):
    # One field at a time, the others valid, so each value reaches the code that reads that field.
    _replace_fields(store / "adapters" / "b" / "adapter_config.json", {field: value})
    check()


@FUZZ
@given(content=st.binary(max_size=200))
def test_adapter_config_bytes(store, check, content):
    (store / "adapters" / "b" / "adapter_config.json").write_bytes(content)
    check()


entries = st.fixed_dictionaries(
    {},
    optional={"dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "I32", "BOOL", "F4"])
              | json_values,
              "shape": st.lists(st.integers(-2, 70), max_size=3) | json_values,
              "data_offsets": st.lists(st.integers(-1, 600), min_size=0, max_size=3) | json_values},
)
tensor_names = st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                                "__metadata__"]) | text


@FUZZ
@given(header=st.dictionaries(tensor_names, entries | json_values, max_size=3), data=st.binary(max_size=600),
       length_delta=st.sampled_from([0, 0, 0, 1, -1, 1 << 40]))
def test_safetensors_headers(store, check, header, data, length_delta):
    raw = json.dumps(header, allow_nan=True).encode()
    length = max(len(raw) + length_delta, 0)
    (store / "adapters" / "b" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", length) + raw + data)
    check()


@pytest.mark.parametrize(("name", "field"), [
    ("config.json", f) for f in ("model_type", "vocab_size", "torch_dtype", "architectures", "tie_word_embeddings")
] + [("model.safetensors.index.json", f) for f in ("weight_map", "metadata")])
@PER_FIELD
@given(value=json_values | shaped)
def test_base_config_and_index(store, check, name, field, value):
    _replace_fields(store / "models" / "tiny" / name, {field: value})
    check(MERGED_MODEL_SPEC)


adapter_refs = st.lists(st.fixed_dictionaries({"name": st.just("a") | text, "path": st.just("adapters/a") | text},
                                              optional={"weight": numbers, "claimName": text}), min_size=1, max_size=2)


@FUZZ
@given(spec=st.fixed_dictionaries({}, optional={
    "adapters": st.just(SPEC["adapters"]) | adapter_refs | json_values, "method": st.sampled_from(["linear", "ties"]) | json_values,
    "output": st.just(SPEC["output"]) | st.fixed_dictionaries({"path": text}) | json_values,
    "parameters": json_values, "baseModel": st.fixed_dictionaries({"path": text}) | json_values,
    "evaluation": json_values, "job": json_values, "allowBaseMismatch": json_values}))
def test_spec_fields(check, spec):
    check(spec)


@FUZZ
@given(text_=st.text(st.sampled_from(list("abc:-[]{}&*!|>'\"#%@`,? \n\t\\0x")), max_size=120))
def test_spec_yaml_text(store, adaptermerge, tmp_path, text_):
    path = tmp_path / "fuzz.yaml"
    path.write_text("apiVersion: adaptermerge.io/v1alpha1\nkind: AdapterMerge\n" + text_)
    result = adaptermerge("validate", path, store)
    assert result.code in (0, 2) and "Traceback" not in result.err, result.err


@FUZZ
@given(lines=st.lists(json_values.map(lambda v: json.dumps(v, allow_nan=True)) | st.text(max_size=20),
                      max_size=4))
def test_evaluation_dataset_lines(store, check, lines):
    (store / "eval").mkdir(exist_ok=True)
    (store / "eval" / "a.jsonl").write_text("\n".join(lines))
    check({**SPEC, "baseModel": {"path": "models/tiny"},
           "evaluation": {"datasets": [{"name": "a", "path": "eval/a.jsonl", "adapter": "a"}]}})


def test_the_fuzzed_spec_is_valid_to_begin_with(store, adaptermerge):
    # Otherwise every fuzz case could exit 2 for one reason and prove nothing.
    for spec in (SPEC, MERGED_MODEL_SPEC):
        assert adaptermerge("validate", spec, store).code == 0
    assert yaml.safe_dump(SPEC)
