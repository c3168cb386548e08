"""evaluate_merge (docs/interfaces.md #4) on the tiny model: the three losses per dataset, retention, exact match,
minRetention, the merged-model path and the quantization fallback without CUDA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from evaluation.tiny_lm import CODE, SQL

from merge_worker.evaluation.scoring import completion_loss, encode, evaluate_merge
from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer
from merge_worker.spec import SpecError, parse_spec
from merge_worker.inputs.volumes import Volumes

CPU = torch.device("cpu")


def spec_for(output_format="adapter", quantization="none", min_retention=None, exact=False, max_examples=None):
    datasets = [
        {"name": "code", "path": "eval/code.jsonl", "adapter": "code", "exactMatch": exact},
        {"name": "sql", "path": "eval/sql.jsonl", "adapter": "sql", "maxExamples": max_examples},
    ]
    return parse_spec({
        "volume": {"claimName": "store"},
        "baseModel": {"path": "models/tiny", "quantization": quantization},
        "adapters": [{"name": "code", "path": "adapters/code"}, {"name": "sql", "path": "adapters/sql"}],
        "method": "linear",
        "output": {"path": "out", "format": output_format},
        "evaluation": {"datasets": datasets, "minRetention": min_retention, "batchSize": 3},
    })


def losses_by_hand(store: Path, adapter: str | None, pairs) -> float:
    """The loss of base (+ one adapter), each model loaded on its own, no switching."""
    from peft import PeftModel

    model = load_causal_lm(store / "models" / "tiny", "none", CPU).model
    if adapter:
        model = PeftModel.from_pretrained(model, store / "adapters" / adapter)
    tokenizer = load_tokenizer(store / "models" / "tiny")
    examples = [encode(tokenizer, p, c) for p, c in pairs]
    return completion_loss(model, examples, batch_size=1, pad_id=tokenizer.pad_token_id, device=CPU)


def run(store, spec, merged_dir, logs=None):
    return evaluate_merge(spec, Volumes({"store": store}), merged_dir, CPU, (logs if logs is not None else []).append)


def test_merged_equal_to_one_source_keeps_that_skill_fully(tiny_store, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_store / "adapters" / "code", merged)
    result = run(tiny_store, spec_for(), merged)

    code, sql = result["datasets"]["code"], result["datasets"]["sql"]
    assert code["adapter"] == "code" and code["examples"] == len(CODE)
    assert code["baseLoss"] == pytest.approx(losses_by_hand(tiny_store, None, CODE), rel=1e-5)
    assert code["sourceLoss"] == pytest.approx(losses_by_hand(tiny_store, "code", CODE), rel=1e-5)
    assert code["mergedLoss"] == pytest.approx(code["sourceLoss"], rel=1e-6)
    assert code["retention"] == pytest.approx(1.0, abs=1e-5)
    # On sql the "merge" is the code adapter: its loss is that adapter's, not the sql one's.
    assert sql["sourceLoss"] == pytest.approx(losses_by_hand(tiny_store, "sql", SQL), rel=1e-5)
    assert sql["mergedLoss"] == pytest.approx(losses_by_hand(tiny_store, "code", SQL), rel=1e-5)
    expected = (sql["baseLoss"] - sql["mergedLoss"]) / (sql["baseLoss"] - sql["sourceLoss"])
    assert sql["retention"] == pytest.approx(expected)
    assert result["quantization"] == "none" and result["passed"] is True and result["minRetention"] is None
    assert code["exactMatch"] is None
    json.dumps(result)  # goes into the manifest as is


def test_retention_below_min_fails_and_says_where(tiny_store, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_store / "adapters" / "code", merged)
    result = run(tiny_store, spec_for(min_retention=0.9), merged)
    sql_retention = result["datasets"]["sql"]["retention"]
    assert sql_retention is not None and sql_retention < 0.9  # code' adapter knows no sql
    assert result["passed"] is False and result["minRetention"] == 0.9
    assert "sql" in result["note"] and "code" not in result["note"]


def test_max_examples_and_exact_match(tiny_store, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_store / "adapters" / "code", merged)
    result = run(tiny_store, spec_for(exact=True, max_examples=2), merged)
    assert result["datasets"]["sql"]["examples"] == 2
    exact = result["datasets"]["code"]["exactMatch"]
    # The adapter memorised its four answers; the random base knows none of them.
    assert exact == {"base": 0.0, "source": 1.0, "merged": 1.0}


def test_merged_model_output_is_loaded_and_scored(tiny_store, tmp_path):
    from peft import PeftModel

    merged = tmp_path / "merged-model"
    base = load_causal_lm(tiny_store / "models" / "tiny", "none", CPU).model
    PeftModel.from_pretrained(base, tiny_store / "adapters" / "sql").merge_and_unload().save_pretrained(merged)
    load_tokenizer(tiny_store / "models" / "tiny").save_pretrained(merged)
    result = run(tiny_store, spec_for(output_format="merged-model"), merged)
    sql = result["datasets"]["sql"]
    assert sql["mergedLoss"] == pytest.approx(sql["sourceLoss"], rel=1e-4)
    assert sql["retention"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_nf4_without_cuda_says_so_once_and_evaluates_unquantized(tiny_store, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_store / "adapters" / "code", merged)
    logs: list[str] = []
    result = run(tiny_store, spec_for(quantization="nf4"), merged, logs)
    assert result["quantization"] == "none"
    assert "nf4 needs CUDA" in result["note"]
    assert sum("needs CUDA" in line for line in logs) == 1
    unquantized = run(tiny_store, spec_for(), merged)
    assert result["datasets"]["code"]["baseLoss"] == pytest.approx(unquantized["datasets"]["code"]["baseLoss"])


def test_bad_jsonl_names_the_dataset_field_and_line(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    (store / "eval" / "sql.jsonl").write_text('{"prompt": "question", "completion": "select"}\n{"prompt": 3}\n')
    with pytest.raises(SpecError) as error:
        run(store, spec_for(), store / "adapters" / "code")
    assert error.value.field == "spec.evaluation.datasets[1].path"
    assert "line 2" in error.value.message


@pytest.mark.parametrize(("min_retention", "exit_code", "reason"),
                         [(None, 0, "MergeSucceeded"), (1.5, 3, "RetentionBelowThreshold")])
def test_real_cli_reports_retention_and_exits_3_below_min(tiny_store, tmp_path, min_retention, exit_code, reason):
    import yaml

    from merge_worker.cli import main as adaptermerge

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    spec = spec_for(min_retention=min_retention).model_dump(by_alias=True, exclude_none=True)
    spec_file, result_file = tmp_path / "merge.yaml", tmp_path / "result.json"
    spec_file.write_text(yaml.safe_dump({"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
                                         "metadata": {"name": "tiny"}, "spec": spec}))
    code = adaptermerge(["run", str(spec_file), "--volume", f"store={store}", "--device", "cpu",
                         "--result-file", str(result_file)])
    result = json.loads(result_file.read_text())
    assert (code, result["reason"]) == (exit_code, reason)
    manifest = json.loads((store / "out" / "merge-manifest.json").read_text())
    assert manifest["evaluation"]["passed"] is (exit_code == 0)  # the output is written either way
    assert result["retention"] == pytest.approx({n: d["retention"] for n, d in manifest["evaluation"]["datasets"].items()},
                                                abs=1e-5)
    assert all(0 < r < 1.5 for r in result["retention"].values())  # linear keeps part of both skills
