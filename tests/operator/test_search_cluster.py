"""A merge search through the operator (issue 15, docs/search.md and docs/operator.md "Search"): the real
worker searches on the tests' tiny Llama with two trained adapters, the resource goes Ready with the
chosen candidate, its score and the trial count in status.search, equal to what the worker wrote in the
output's manifest. Harness as in test_operator_cluster.py."""

from __future__ import annotations

import json
import shutil

import pytest
from search.conftest import search_spec, write_search_store
from support.operator_harness import TIMEOUT, apply, get, ready, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory):
    return write_search_store(tmp_path_factory.mktemp("search-store"))


def search_resource(name: str, claim: str, search: dict, **changes) -> dict:
    spec = search_spec(search, **changes)
    spec.update(volume={"claimName": claim}, output={"path": f"merged/{name}", "rank": 8},
                job={"backoffLimit": 0, "activeDeadlineSeconds": 600})
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name}, "spec": spec}


def test_search_goes_ready_with_the_chosen_candidate_in_its_status(
        control_plane, namespace, operator, claims_root, search_inputs, worker_gate):
    claim = f"{namespace}-search"
    shutil.copytree(search_inputs, claims_root / claim)
    # lambda 0 (the spec's own, trial 1) merges nothing; lambda 1 keeps part of both skills: it must win.
    search = {"strategy": "grid", "space": [{"method": "linear", "lambda": {"values": [0.0, 1.0]}}]}
    apply(control_plane, namespace, search_resource("search", claim, search, parameters={"lambda": 0.0}))

    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/search",
                                   f"--timeout={TIMEOUT}s", check=False)
    assert waited.returncode == 0, f"{waited.stderr}\n{operator.log()}\n{control_plane.logs()}"
    merge = get(control_plane, namespace, "adaptermerge", "search")
    assert ready(merge)["reason"] == "MergeSucceeded"
    record = json.loads((claims_root / claim / "merged" / "search" / "merge-manifest.json").read_text())["search"]
    assert record["best"]["parameters"] == {"lambda": 1.0} and len(record["trials"]) == 3
    assert merge["status"]["search"] == {
        "trials": 3, "bestScore": record["best"]["score"],
        "best": {"trial": record["best"]["trial"], "method": "linear", "parameters": {"lambda": 1.0}},
    }
    # The final report (status.result.retention) is the report split's, the search score the search split's.
    assert set(merge["status"]["result"]["retention"]) == {"code", "sql"}


def test_a_running_search_shows_trial_k_of_n_and_the_best_so_far(
        control_plane, namespace, operator, claims_root, search_inputs, worker_gate):
    claim = f"{namespace}-progress"
    shutil.copytree(search_inputs, claims_root / claim)
    search = {"strategy": "random", "trials": 12, "seed": 1,
              "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9}}]}
    apply(control_plane, namespace, search_resource("progress", claim, search, method="ties",
                                                    parameters={"density": 0.5}))
    seen = []

    def progress_while_running():
        merge = get(control_plane, namespace, "adaptermerge", "progress")
        status = merge.get("status") or {}
        if status.get("phase") == "Running" and "budget" in (status.get("search") or {}):
            seen.append(status["search"])
        return status.get("phase") in ("Succeeded", "Failed") and merge

    merge = wait_until(progress_while_running, "the search to finish", operator, control_plane)
    assert ready(merge)["reason"] == "MergeSucceeded", ready(merge)
    assert seen, f"no progress in status.search while the Job ran\n{operator.log()}"
    for progress in seen:  # what the worker's marker said: trial k of 12, the best so far
        assert progress["budget"] == 12 and 1 <= progress["trials"] <= 12
        assert progress["best"]["method"] == "ties" and 1 <= progress["best"]["trial"] <= progress["trials"]
        assert set(progress["best"]["parameters"]) <= {"density"} and progress["bestScore"] is not None
    assert [p["trials"] for p in seen] == sorted(p["trials"] for p in seen)
    final = merge["status"]["search"]
    assert final["trials"] == 12 and "budget" not in final and final["bestScore"] >= seen[-1]["bestScore"]

    pod = merge["status"]["podName"]
    logs = control_plane.kubectl("logs", "-n", namespace, pod).stdout  # through the API server's pods/log
    assert "search: trial 12 of 12" in logs and "best so far" in logs
    assert logs.count("\nadaptermerge-search-progress {") == 12
