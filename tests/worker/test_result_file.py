"""The result file (a pod's termination message) is valid UTF-8 JSON under 4 KiB that keeps reason,
exitCode and field, whatever the message holds. Through the real CLI, with messages built from paths."""

from __future__ import annotations

import json
import os

import pytest

from merge_worker.cli import main
from merge_worker.output.result import build_result, encode_result

SPEC = {"adapters": [{"name": "a", "path": "adapters/a"}], "method": "linear", "output": {"path": "merged/out"}}


def test_undecodable_path_bytes_are_shown_escaped(store, adaptermerge, tmp_path):
    # A volume folder whose name is not UTF-8: Python keeps the byte as a lone surrogate.
    odd = tmp_path / os.fsdecode(b"st\xffore")
    store.rename(odd)
    run = adaptermerge("run", {**SPEC, "adapters": [{"name": "a", "path": "adapters/nope"}]}, odd)
    assert run.code == 2, run.err
    assert run.result["reason"] == "InvalidSpec" and run.result["exitCode"] == 2
    assert run.result["field"] == "spec.adapters[0].path"
    assert "st\\xffore" in run.result["message"]


def test_a_long_multibyte_message_is_cut_after_optional_parts(store, adaptermerge):
    path = "adapters/" + "/".join(["ü" * 126] * 8)  # 1024 characters (the most), 2 bytes each; named twice
    run = adaptermerge("run", {**SPEC, "adapters": [{"name": "a", "path": path}]}, store)
    assert run.code == 2, run.err
    assert run.result["field"] == "spec.adapters[0].path" and run.result["reason"] == "InvalidSpec"
    assert run.result["message"].startswith("spec.adapters[0].path: ") and run.result["message"].endswith("[cut]")
    assert "seconds" not in run.result  # dropped before the message was cut


@pytest.mark.parametrize("message", ["é" * 5000, "\udcff" * 5000, "\x00\n\"\\" * 2000, "a" * 100000,
                                     "€" * 1365 + "x"])
def test_encoding_always_fits_and_keeps_the_required_keys(message):
    result = build_result(2, message, field="spec." + "f" * 5000, seconds=1.0, modules=4, rank=16,
                          retention={f"d{i}": 0.5 for i in range(64)},
                          output={"claimName": "c", "path": "p" * 900, "format": "adapter"})
    data = encode_result(result)
    assert len(data) < 4096
    decoded = json.loads(data.decode("utf-8"))
    assert decoded["reason"] == "InvalidSpec" and decoded["exitCode"] == 2 and decoded["field"].startswith("spec.")


def test_an_unreadable_spec_file_names_it_in_the_result(tmp_path):
    result_file = tmp_path / "result.json"
    code = main(["run", str(tmp_path / os.fsdecode(b"missing-\xfe.yaml")), "--device", "cpu",
                 "--result-file", str(result_file)])
    result = json.loads(result_file.read_bytes().decode("utf-8"))
    assert code == 2 and result["exitCode"] == 2 and "missing-\\xfe.yaml" in result["field"]
