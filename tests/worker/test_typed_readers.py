"""Issue 11, classes 3 and 6: malformed values in every file the worker reads (adapter_config.json, a
base model's config.json and index, safetensors headers) and in the spec YAML exit 2 naming the file
and field, never 1 with a traceback; pattern keys cannot hang the reader, and declared shapes cannot
exceed what the files hold."""

from __future__ import annotations

import json
import struct
import time

import pytest

from support.tiny_models import edit_adapter_config

BIG = 100_000


def _spec(**changes) -> dict:
    spec = {"adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
            "method": "linear", "output": {"path": "merged/out"}}
    spec.update(changes)
    return spec


def _merged_model_spec() -> dict:
    return _spec(baseModel={"path": "models/tiny"}, output={"path": "merged/out", "format": "merged-model"})


def _assert_exit_2(run, *words: str) -> None:
    assert run.code == 2, run.err
    assert "Traceback" not in run.err
    for word in words:
        assert word in run.err, f"{word!r} not in: {run.err}"


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# -- adapter_config.json -------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("r", '"8"'), ("r", "true"), ("r", "1e400"), ("r", str(10**30)), ("r", "0"),
    ("lora_alpha", '"x"'), ("lora_alpha", "NaN"), ("lora_alpha", "Infinity"),
    ("use_rslora", '"yes"'), ("use_dora", "[]"), ("fan_in_fan_out", "1"),
    ("rank_pattern", "[]"), ("rank_pattern", '{"q_proj": "4"}'), ("rank_pattern", '{"q_proj": 0}'),
    ("rank_pattern", '{"(": 4}'), ("rank_pattern", '{"[z-a]": 4}'), ("rank_pattern", '{"a{2,1}": 4}'),
    ("alpha_pattern", '{"q_proj": NaN}'), ("alpha_pattern", '{"x\\u0000": 1}'),
    ("modules_to_save", '{"a": 1}'), ("modules_to_save", "[1]"),
    ("base_model_name_or_path", '"tiny\\u0000model"'), ("base_model_name_or_path", "7"),
    ("peft_type", "null"), ("task_type", "[]"),
])
def test_malformed_adapter_config_values_name_the_file_and_field(store, adaptermerge, field, value):
    path = store / "adapters" / "b" / "adapter_config.json"
    text = json.dumps(json.loads(path.read_text()) | {field: None})
    path.write_text(text.replace(f'"{field}": null', f'"{field}": {value}'))
    for command in ("validate", "run"):
        _assert_exit_2(adaptermerge(command, _spec(), store), "spec.adapters[1].path", "adapter_config.json",
                       field)


@pytest.mark.parametrize(("content", "words"), [
    (b"[]", "must hold a JSON object"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b'{"r": 4,', "not valid UTF-8 JSON"),
    (('{"r": 4, "x": ' + _deep(BIG) + "}").encode(), "nested too deeply"),
    (('{"r": 4, "lora_alpha": 8, "rank_pattern": ' + json.dumps({f"k{i}": 2 for i in range(BIG)}) + "}").encode(),
     "rank_pattern"),
])
def test_malformed_adapter_config_files(store, adaptermerge, content, words):
    (store / "adapters" / "b" / "adapter_config.json").write_bytes(content)
    _assert_exit_2(adaptermerge("validate", _spec(), store), "spec.adapters[1].path", "adapter_config.json", words)


@pytest.mark.parametrize("key", ["(.*.*)*x", "(.*.*.*)*z", "([\\w.]*[\\w.]*)*z"])
def test_a_catastrophic_pattern_key_does_not_hang(store, adaptermerge, key, monkeypatch):
    import merge_worker.inputs.patterns as patterns

    monkeypatch.setattr(patterns, "MATCH_SECONDS", 2.0)
    # Python's re takes exponential time on these against a module name; the first key is tried first.
    edit_adapter_config(store / "adapters" / "b", rank_pattern={key: 2, "layers.1.self_attn.q_proj": 2})
    started = time.monotonic()
    run = adaptermerge("validate", _spec(), store)
    assert time.monotonic() - started < 30
    _assert_exit_2(run, "spec.adapters[1].path", "rank_pattern", "did not finish within")


def test_pattern_keys_keep_peft_semantics(store, adaptermerge):
    # adapter b has r=6 and rank_pattern {"layers.1.self_attn.q_proj": 2}: as a regex, and with a plain
    # name key ahead of it that matches first (PEFT takes the first key that matches).
    from merge_worker.inputs.adapters import read_adapter

    edit_adapter_config(store / "adapters" / "b", rank_pattern={"layers\\.1\\..*q_proj": 2})
    assert read_adapter(store / "adapters" / "b").modules["model.layers.1.self_attn.q_proj"].rank == 2


# -- a base model's config.json and index ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "change", "words"), [
    ("config.json", lambda c: c | {"vocab_size": "big"}, "vocab_size"),
    ("config.json", lambda c: c | {"model_type": None}, "model_type"),
    ("config.json", lambda c: c | {"model_type": "llama\u0000"}, "model_type"),
    ("config.json", lambda c: {k: v for k, v in c.items() if k != "model_type"}, "model_type"),
    ("model.safetensors.index.json", lambda c: c | {"weight_map": []}, "weight_map"),
    ("model.safetensors.index.json", lambda c: c | {"weight_map": {"x": 3}}, "weight_map"),
    ("model.safetensors.index.json", lambda c: c | {"weight_map": {"x": "../../adapters/a/adapter_model.safetensors"}},
     "weight_map"),
])
def test_malformed_base_files_name_the_file_and_field(store, adaptermerge, name, change, words):
    path = store / "models" / "tiny" / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    for command in ("validate", "run"):
        _assert_exit_2(adaptermerge(command, _merged_model_spec(), store), "spec.baseModel.path", name, words)


def test_deeply_nested_base_config(store, adaptermerge):
    (store / "models" / "tiny" / "config.json").write_text('{"model_type": "llama", "x": ' + _deep(BIG) + "}")
    _assert_exit_2(adaptermerge("validate", _merged_model_spec(), store), "config.json", "nested too deeply")


# -- safetensors headers ------------------------------------------------------------------------------


def _header_file(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(("content", "words"), [
    (b"\x01\x02", "too short"),
    (_header_file({}, length=1 << 40), "header length"),
    (_header_file(b"[1, 2]"), "JSON object"),
    (_header_file(b"\xff\xff"), "not UTF-8 JSON"),
    (_header_file(("{" + '"x": ' + _deep(BIG) + "}").encode()), "nested too deeply"),
    (_header_file({A: {"dtype": "F4", "shape": [4, 32], "data_offsets": [0, 64]}}, bytes(64)), "dtype"),
    (_header_file({A: {"dtype": "F32", "shape": [-4, 32], "data_offsets": [0, 512]}}, bytes(512)), "shape"),
    (_header_file({A: {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, bytes(16)), "shape"),
    (_header_file({A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 3]}}, bytes(16)), "data_offsets"),
    (_header_file({A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1}}, bytes(16)), "x"),
    (_header_file({"__metadata__": {"format": 1}}), "__metadata__"),
    (_header_file({"a\u0000": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "header"),
    # A tiny file declaring a huge module: the shape must match the bytes the file holds.
    (_header_file({A: {"dtype": "F32", "shape": [4, 1 << 40], "data_offsets": [0, 16]},
                   B: {"dtype": "F32", "shape": [1 << 40, 4], "data_offsets": [16, 32]}}, bytes(32)),
     "do not match"),
    (_header_file({A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                   B: {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)), "data_offsets"),
    (_header_file({A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(20)), "file holds"),
])
def test_malformed_safetensors_headers(store, adaptermerge, content, words):
    (store / "adapters" / "b" / "adapter_model.safetensors").write_bytes(content)
    for command in ("validate", "run"):
        _assert_exit_2(adaptermerge(command, _spec(), store), "spec.adapters[1].path", "adapter_model.safetensors",
                       words)


def test_malformed_base_shard_header(store, adaptermerge):
    shard = sorted((store / "models" / "tiny").glob("model-*.safetensors"))[0]
    shard.write_bytes(_header_file({"x": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, bytes(4)))
    _assert_exit_2(adaptermerge("validate", _merged_model_spec(), store), "spec.baseModel.path", shard.name,
                   "do not match")


# -- the spec YAML itself -------------------------------------------------------------------------------


def _spec_file(tmp_path, text: str | bytes):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


HEAD = "apiVersion: adaptermerge.io/v1alpha1\nkind: AdapterMerge\nmetadata: {name: x}\n"
GOOD_SPEC = ("spec:\n  volume: {claimName: store}\n  adapters: [{name: a, path: adapters/a}]\n"
             "  method: linear\n  output: {path: merged/out}\n")


@pytest.mark.parametrize(("text", "words"), [
    (HEAD + "spec: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    (HEAD + "spec: " + "{a: " * 200 + "1" + "}" * 200 + "\n", "nested deeper"),
    (HEAD.replace("metadata: {name: x}", 'metadata: {name: "x\\0y"}') + GOOD_SPEC, "control character"),
    (HEAD + GOOD_SPEC.replace("path: adapters/a", 'path: "adapters/a\\0"'), "control character"),
    (HEAD + GOOD_SPEC.replace("path: adapters/a", 'path: "adapters/a\\n"'), "control character"),
    (b"apiVersion: adaptermerge.io/v1alpha1\x00\n", "malformed YAML"),
    (HEAD + "spec:\n  job:\n    resources:\n      a: &a [x, x, x, x, x, x, x, x, x]\n      b: &b [*a, *a, *a, *a, *a]\n"
     "      c: [*b, *b, *b, *b, *b, *b]\n", "aliases"),
    (HEAD + GOOD_SPEC.replace("method: linear", "method: [linear]"), "spec.method"),
    (HEAD + GOOD_SPEC.replace("adapters: [{name: a, path: adapters/a}]", "adapters: adapters/a"), "spec.adapters"),
    (HEAD + GOOD_SPEC.replace("output: {path: merged/out}", "output: 5"), "spec.output"),
    (HEAD + GOOD_SPEC.replace("output: {path: merged/out}", "output: {path: {a: 1}}"), "spec.output.path"),
    (HEAD + GOOD_SPEC + "  ? [a, b]\n  : c\n", "malformed YAML"),
    (HEAD + GOOD_SPEC + "  parameters: {weights: [.nan]}\n", "weights"),
    (HEAD + GOOD_SPEC + "---\n" + HEAD + GOOD_SPEC, "one YAML document"),
    (b"\xff\xfe" + HEAD.encode(), "not UTF-8"),
    ("- 1\n- 2\n", "<document>"),
])
def test_hostile_spec_files(store, adaptermerge, tmp_path, text, words):
    for command in ("validate", "run"):
        _assert_exit_2(adaptermerge(command, _spec_file(tmp_path, text), store), words)
