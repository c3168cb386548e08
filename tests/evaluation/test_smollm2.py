"""The shipped example adapters on the real SmolLM2-135M-Instruct (scripts/prepare-smollm2.py): each one
learned its skill, and a TIES merge of all three through the real CLI keeps part of every skill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SKILLS = ["python", "sql", "extract"]
EXAMPLES = 16  # per skill: enough to separate the losses clearly, small enough for a 2-core CI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    model = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare-smollm2.py")], check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    folder = tmp_path_factory.mktemp("smollm2") / "store"
    subprocess.run([str(REPO / "examples" / "demo" / "make-store.sh"), str(folder), model], check=True)
    return folder


def test_each_source_adapter_beats_the_base_on_its_own_skill(store):
    from merge_worker.evaluation.scoring import Scorer, encode, read_jsonl
    from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

    cpu = torch.device("cpu")
    model_dir = store / "models" / "smollm2-135m-instruct"
    tokenizer = load_tokenizer(model_dir)
    scorer = Scorer(load_causal_lm(model_dir, "none", cpu).model, tokenizer, cpu)
    for skill in SKILLS:
        scorer.attach(skill, store / "adapters" / skill)
    for skill in SKILLS:
        rows = read_jsonl(store / "eval" / f"{skill}.jsonl", skill, EXAMPLES)
        examples = [encode(tokenizer, r["prompt"], r["completion"]) for r in rows]
        base, source = scorer.loss(examples), scorer.loss(examples, skill)
        print(f"{skill}: base {base:.4f} source {source:.4f}")
        assert source < 0.5 * base, f"{skill}: the adapter barely beats the base ({source:.4f} vs {base:.4f})"


def test_ties_merge_through_the_cli_keeps_positive_retention_on_every_skill(store, tmp_path):
    resource = yaml.safe_load((REPO / "examples" / "demo" / "dev-assistant.yaml").read_text())
    resource["spec"]["output"]["path"] = "merged/slow-test"
    evaluation = resource["spec"]["evaluation"]
    evaluation["minRetention"] = None
    for dataset in evaluation["datasets"]:
        dataset.update(maxExamples=EXAMPLES, exactMatch=False)
    spec_file = tmp_path / "merge.yaml"
    spec_file.write_text(yaml.safe_dump(resource))
    result_file = tmp_path / "result.json"

    adaptermerge = Path(sys.executable).parent / "adaptermerge"
    run = subprocess.run([str(adaptermerge), "run", str(spec_file), "--volume", f"store={store}",
                          "--device", "cpu", "--result-file", str(result_file)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout, whatever the venv holds
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:]

    result = json.loads(result_file.read_text())
    assert result["reason"] == "MergeSucceeded"
    assert set(result["retention"]) == set(SKILLS)
    for skill, kept in result["retention"].items():
        assert kept is not None and kept > 0, f"{skill}: retention {kept}"
    manifest = json.loads((store / "merged" / "slow-test" / "merge-manifest.json").read_text())
    for skill, d in manifest["evaluation"]["datasets"].items():
        assert d["examples"] == EXAMPLES
        assert d["mergedLoss"] < d["baseLoss"], skill
