"""The runner's promises: manifest and result contents, atomic output (no trace on failure, old output
kept until the new one is complete), overwrite, evaluation wiring and exit code 3, progress output."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from safetensors import safe_open

from merge_worker.output.adapter_writer import AdapterWriter
from merge_worker.output.result import build_result, encode_result

SPEC = {
    "baseModel": {"path": "models/tiny"},
    "adapters": [{"name": "a", "path": "adapters/a", "weight": 0.6},
                 {"name": "b", "path": "adapters/b", "weight": 0.4}],
    "method": "ties",
    "parameters": {"density": 0.5, "seed": 7},
    "output": {"path": "merged/out", "rank": 3},
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_leftovers(store: Path) -> bool:
    return not [p for p in store.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_manifest_and_result(store, adaptermerge):
    run = adaptermerge("run", SPEC, store)
    assert run.code == 0, run.err
    out = store / "merged" / "out"
    manifest = json.loads((out / "merge-manifest.json").read_text())
    assert manifest["method"] == "ties"
    assert manifest["parameters"]["density"] == 0.5 and manifest["parameters"]["seed"] == 7
    assert manifest["libraries"]["torch"] == __import__("torch").__version__
    adapters = [i for i in manifest["inputs"] if i["role"] == "adapter"]
    assert [a["name"] for a in adapters] == ["a", "b"]
    for entry in adapters:
        folder = store / "adapters" / entry["name"]
        assert entry["files"] == {
            "adapter_config.json": _sha256(folder / "adapter_config.json"),
            "adapter_model.safetensors": _sha256(folder / "adapter_model.safetensors"),
        }
    base = next(i for i in manifest["inputs"] if i["role"] == "baseModel")
    assert base["files"]["config.json"] == _sha256(store / "models" / "tiny" / "config.json")
    # Every module some adapter targets (read straight from the files) is reported, at rank <= 3.
    targeted = set()
    for name in ("a", "b"):
        with safe_open(str(store / "adapters" / name / "adapter_model.safetensors"), "pt") as f:
            targeted |= {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                         for k in f.keys() if ".lora_A" in k}
    modules = {m["name"]: m for m in manifest["modules"]}
    assert set(modules) == targeted
    assert all(1 <= m["rank"] <= 3 and 0 <= m["relativeError"] < 1 for m in modules.values())
    assert {"validate", "merge"} <= set(manifest["timings"])
    assert manifest["summary"]["modules"] == len(targeted)

    result = run.result
    assert result["reason"] == "MergeSucceeded" and result["exitCode"] == 0
    assert result["modules"] == len(targeted) and result["rank"] == 3
    assert result["maxReconstructionError"] == pytest.approx(max(m["relativeError"] for m in modules.values()),
                                                             abs=1e-6)
    assert result["output"] == {"claimName": "store", "path": "merged/out", "format": "adapter"}
    assert "retention" not in result
    # Plain log lines (not a terminal) and the summary table.
    assert "merged 1/" in run.err and f"merged {len(targeted)}/{len(targeted)}" in run.err
    assert run.out.splitlines()[0].split()[:2] == ["modules", "rank"]
    assert _no_leftovers(store)


def test_failure_mid_merge_leaves_nothing(store, adaptermerge, monkeypatch):
    calls = []
    original = AdapterWriter.add_module

    def failing(self, *args):
        calls.append(args[0])
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(self, *args)

    monkeypatch.setattr(AdapterWriter, "add_module", failing)
    run = adaptermerge("run", SPEC, store)
    assert run.code == 1 and "disk on fire" in run.err
    assert run.result["reason"] == "MergeFailed" and "disk on fire" in run.result["message"]
    assert len(calls) == 3
    assert not (store / "merged").exists(), "the output's parent was created by the run and is removed"
    assert _no_leftovers(store)


def test_failure_with_overwrite_keeps_the_old_output(store, adaptermerge, monkeypatch):
    old = store / "merged" / "out"
    old.mkdir(parents=True)
    (old / "previous.txt").write_text("old merge")
    monkeypatch.setattr(AdapterWriter, "close", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    spec = {**SPEC, "output": {**SPEC["output"], "overwrite": True}}
    assert adaptermerge("run", spec, store).code == 1
    assert [p.name for p in old.iterdir()] == ["previous.txt"]
    assert _no_leftovers(store)


def test_overwrite_replaces_the_output(store, adaptermerge):
    old = store / "merged" / "out"
    old.mkdir(parents=True)
    (old / "previous.txt").write_text("old merge")
    spec = {**SPEC, "output": {**SPEC["output"], "overwrite": True}}
    run = adaptermerge("run", spec, store)
    assert run.code == 0, run.err
    assert sorted(p.name for p in old.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "merge-manifest.json"]
    assert sorted(p.name for p in (store / "merged").iterdir()) == ["out"]


def _fake_evaluation(passed: bool, calls: list):
    def evaluate_merge(spec, volumes, merged_dir, device, log):
        # Runs on the finished output in its temp folder, before the rename.
        calls.append(sorted(p.name for p in merged_dir.iterdir()))
        assert merged_dir.name.startswith(".out.tmp-")
        log("scoring")
        return {"quantization": "none", "note": "", "seconds": 0.1, "minRetention": 0.8, "passed": passed,
                "datasets": {"python": {"adapter": "a", "examples": 2, "baseLoss": 2.0, "sourceLoss": 1.0,
                                        "mergedLoss": 1.5 if passed else 1.9,
                                        "retention": 0.5 if not passed else 0.95, "exactMatch": None}}}

    return types.SimpleNamespace(evaluate_merge=evaluate_merge)


@pytest.mark.parametrize("passed", [True, False])
def test_evaluation_result_and_exit_code(store, adaptermerge, monkeypatch, passed):
    calls: list = []
    monkeypatch.setitem(sys.modules, "merge_worker.evaluation.scoring", _fake_evaluation(passed, calls))
    (store / "eval").mkdir()
    (store / "eval" / "python.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    spec = {**SPEC, "evaluation": {"datasets": [{"name": "python", "path": "eval/python.jsonl", "adapter": "a"}],
                                   "minRetention": 0.8}}
    run = adaptermerge("run", spec, store)
    assert run.code == (0 if passed else 3), run.err
    assert calls == [["adapter_config.json", "adapter_model.safetensors"]]
    assert run.result["reason"] == ("MergeSucceeded" if passed else "RetentionBelowThreshold")
    assert run.result["retention"] == {"python": 0.95 if passed else 0.5}
    manifest = json.loads((store / "merged" / "out" / "merge-manifest.json").read_text())
    assert manifest["evaluation"]["passed"] is passed
    assert any(i["role"] == "evaluationDataset" for i in manifest["inputs"])
    assert "retention" in run.out and ("FAILED" in run.out) != passed


def test_result_summary_stays_under_4_kib():
    retention = {f"dataset-{i}": 0.5 for i in range(100)}
    result = build_result(1, "x" * 10000, seconds=1.0, modules=3, retention=retention)
    data = encode_result(result)
    assert len(data) <= 4096
    decoded = json.loads(data)
    assert decoded["reason"] == "MergeFailed" and decoded["message"].endswith("[cut]")
    small = json.loads(encode_result(build_result(0, "ok", modules=3, retention={"a": 0.9})))
    assert small == {"reason": "MergeSucceeded", "message": "ok", "exitCode": 0, "modules": 3,
                     "retention": {"a": 0.9}}


def test_cli_imports_and_prints_the_crd_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from merge_worker.cli import main\n"
            "sys.exit(main(['crd']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "kind: CustomResourceDefinition" in done.stdout and "adaptermerges.adaptermerge.io" in done.stdout


def test_progress_bar_on_a_terminal_and_tables():
    import io

    from merge_worker.progress import ModuleProgress, ModuleRecord, evaluation_summary, merge_summary

    stream = io.StringIO()
    progress = ModuleProgress(2, stream=stream, tty=True)
    progress.update(ModuleRecord("m.q_proj", 4, 0.125))
    progress.update(ModuleRecord("m.v_proj", 8, 0.5))
    progress.close()
    assert "2/2" in stream.getvalue() and "adaptermerge:" not in stream.getvalue()  # a bar, not log lines
    table = merge_summary([ModuleRecord("m.q_proj", 4, 0.125), ModuleRecord("m.v_proj", 8, 0.5)], 1.5)
    header, row = table.splitlines()
    assert header.split()[:2] == ["modules", "rank"]
    assert row.split()[:5] == ["2", "4-8", "(mean", "6.0)", "0.5"]
    evaluation = {"passed": False, "minRetention": 0.8, "datasets": {"sql": {
        "adapter": "b", "examples": 5, "baseLoss": 2.0, "sourceLoss": 1.0, "mergedLoss": 1.7,
        "retention": 0.3, "exactMatch": {"base": 0.0, "source": 0.6, "merged": 0.2}}}}
    text = evaluation_summary(evaluation)
    assert "sql" in text and "0.3" in text and "0/0.6/0.2" in text and "FAILED (minRetention 0.8)" in text


def test_sigterm_mid_merge_leaves_nothing(store, adaptermerge, monkeypatch):
    import os
    import signal

    original = AdapterWriter.add_module

    def terminated(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends a pod being deleted
        return original(self, *args)

    monkeypatch.setattr(AdapterWriter, "add_module", terminated)
    handler_before = signal.getsignal(signal.SIGTERM)
    run = adaptermerge("run", SPEC, store)
    assert run.code == 1 and "interrupted" in run.err and run.result["reason"] == "MergeFailed"
    assert not (store / "merged").exists() and _no_leftovers(store)
    assert signal.getsignal(signal.SIGTERM) == handler_before


@pytest.mark.parametrize("device, says_so", [("auto", True), ("cpu", False)])
def test_auto_device_says_when_it_falls_back_to_the_cpu(store, adaptermerge, monkeypatch, device, says_so):
    """A GPU pod without a usable GPU still merges, and its log says why it ran on the CPU."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    run = adaptermerge("run", SPEC, store, "--device", device)
    assert run.code == 0, run.err
    assert ("no CUDA device is available" in run.err + run.out) is says_so
