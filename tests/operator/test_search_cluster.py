"""A merge search through the operator (issue 15, docs/search.md and docs/operator.md "Search"): the real
worker searches on the tests' tiny Llama with two trained adapters, the resource goes Ready with the
chosen candidate, its score and the trial count in status.search, equal to what the worker wrote in the
output's manifest. Harness as in test_operator_cluster.py."""

from __future__ import annotations

import json
import shutil

import pytest
from search.conftest import search_spec, write_search_store
from support.operator_harness import TIMEOUT, apply, get, ready

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
