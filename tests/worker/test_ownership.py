"""Output ownership (--owner NAMESPACE/NAME/UID, as the operator passes it) and what happens to an output
below minRetention (spec.evaluation.publishBelowThreshold). Through the real CLI."""

from __future__ import annotations

import json
import sys
import types

import pytest

from support.merge_specs import LINEAR_TWO_ADAPTERS


SPEC = LINEAR_TWO_ADAPTERS
MINE, THEIRS = "team-a/dev-assistant/1111-aaaa", "team-b/other/2222-bbbb"


def _manifest(store):
    return json.loads((store / "merged" / "out" / "merge-manifest.json").read_text())


def test_the_manifest_records_the_owner_and_a_new_generation_replaces_its_output(store, adaptermerge):
    first = adaptermerge("run", SPEC, store, "--owner", MINE)
    assert first.code == 0, first.err
    assert _manifest(store)["owner"] == {"namespace": "team-a", "name": "dev-assistant", "uid": "1111-aaaa"}
    # A changed spec of the same resource, without overwrite: replaces it.
    second = adaptermerge("run", {**SPEC, "output": {**SPEC["output"], "rank": 2}}, store, "--owner", MINE)
    assert second.code == 0, second.err
    assert _manifest(store)["output"]["rank"] == 2
    assert sorted(p.name for p in (store / "merged").iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_another_resources_output_is_never_replaced_even_with_overwrite(store, adaptermerge, command):
    assert adaptermerge("run", SPEC, store, "--owner", THEIRS).code == 0
    before = (store / "merged" / "out" / "merge-manifest.json").read_bytes()
    spec = {**SPEC, "output": {**SPEC["output"], "overwrite": True}}
    run = adaptermerge(command, spec, store, "--owner", MINE)
    assert run.code == 2, run.err
    assert "team-b/other" in run.err and "never replaced" in run.err
    if command == "run":
        assert run.result["reason"] == "OutputConflict" and run.result["field"] == "spec.output.path"
    assert (store / "merged" / "out" / "merge-manifest.json").read_bytes() == before


def test_without_owner_the_overwrite_flag_decides_as_before(store, adaptermerge):
    assert adaptermerge("run", SPEC, store, "--owner", THEIRS).code == 0
    refused = adaptermerge("run", SPEC, store)
    assert refused.code == 2 and refused.result["reason"] == "InvalidSpec" and "already exists" in refused.err
    replaced = adaptermerge("run", {**SPEC, "output": {**SPEC["output"], "overwrite": True}}, store)
    assert replaced.code == 0 and "owner" not in _manifest(store)


def test_an_unowned_output_needs_overwrite_even_with_an_owner(store, adaptermerge):
    assert adaptermerge("run", SPEC, store).code == 0
    run = adaptermerge("run", SPEC, store, "--owner", MINE)
    assert run.code == 2 and run.result["reason"] == "InvalidSpec" and "already exists" in run.err


@pytest.mark.parametrize("owner", ["team-a/dev", "Team/x/1", "a/b/c/d", "a//1", "a/b/", "a/b/uid with space"])
def test_a_malformed_owner_is_an_input_error(store, adaptermerge, owner):
    run = adaptermerge("run", SPEC, store, "--owner", owner)
    assert run.code == 2 and run.result["field"] == "--owner", run.err
    assert not (store / "merged").exists()


def _evaluation(monkeypatch, store, passed: bool, **settings) -> dict:
    def evaluate_merge(spec, volumes, merged_dir, device, log):
        return {"quantization": "none", "note": "", "seconds": 0.1, "minRetention": 0.8, "passed": passed,
                "datasets": {"python": {"adapter": "a", "examples": 1, "baseLoss": 2.0, "sourceLoss": 1.0,
                                        "mergedLoss": 1.9, "retention": 0.1, "exactMatch": None}}}

    monkeypatch.setitem(sys.modules, "merge_worker.evaluation.scoring", types.SimpleNamespace(evaluate_merge=evaluate_merge))
    (store / "eval").mkdir(exist_ok=True)
    (store / "eval" / "python.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    return {**SPEC, "evaluation": {"datasets": [{"name": "python", "path": "eval/python.jsonl", "adapter": "a"}],
                                   "minRetention": 0.8, **settings}}


def test_below_threshold_is_published_by_default(store, adaptermerge, monkeypatch):
    run = adaptermerge("run", _evaluation(monkeypatch, store, passed=False), store)
    assert run.code == 3 and run.result["published"] is True and run.result["output"]["path"] == "merged/out"
    assert (store / "merged" / "out" / "merge-manifest.json").exists()


def test_below_threshold_is_not_published_when_asked(store, adaptermerge, monkeypatch):
    spec = _evaluation(monkeypatch, store, passed=False, publishBelowThreshold=False)
    run = adaptermerge("run", spec, store)
    assert run.code == 3 and run.result["reason"] == "RetentionBelowThreshold", run.err
    assert run.result["published"] is False and "output" not in run.result
    assert "not published" in run.result["message"] and "publishBelowThreshold" in run.result["message"]
    assert not (store / "merged").exists()  # no temp folder, no lock file, no parent it created


def test_below_threshold_keeps_the_owners_previous_output(store, adaptermerge, monkeypatch):
    assert adaptermerge("run", SPEC, store, "--owner", MINE).code == 0
    before = (store / "merged" / "out" / "merge-manifest.json").read_bytes()
    run = adaptermerge("run", _evaluation(monkeypatch, store, passed=False, publishBelowThreshold=False), store,
                       "--owner", MINE)
    assert run.code == 3 and run.result["published"] is False, run.err
    assert (store / "merged" / "out" / "merge-manifest.json").read_bytes() == before
    assert sorted(p.name for p in (store / "merged").iterdir()) == ["out"]
    passing = adaptermerge("run", _evaluation(monkeypatch, store, passed=True, publishBelowThreshold=False), store,
                           "--owner", MINE)
    assert passing.code == 0 and passing.result["published"] is True
    assert _manifest(store)["evaluation"]["passed"] is True
