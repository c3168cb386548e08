"""A merge search through the operator (issue 15, docs/search.md and docs/operator.md "Search"): the real
worker searches on the tests' tiny Llama with two trained adapters, the resource goes Ready with the
chosen candidate, its score and the trial count in status.search, equal to what the worker wrote in the
output's manifest. Harness as in test_operator_cluster.py."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from search.conftest import search_spec, write_search_store
from support.operator_harness import GATE, TIMEOUT, apply, get, ready, wait_until

from merge_worker.search.progress import MARKER, parse_progress_line

from adaptermerge_operator import search_progress, search_status

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory):
    return write_search_store(tmp_path_factory.mktemp("search-store"))


SEARCH_HOLD, SEARCH_HELD = "SEARCH_HOLD", "SEARCH_HELD"

# Added to the worker gate (support.operator_harness.GATE, which it keeps): in a worker process (one with
# claim folders), sys.stderr passes everything on, and after a whole progress marker line for trial k
# (flushed first, so the log has it) holds the process while a claim's SEARCH_HOLD file names a trial
# <= k, saying so in that claim's SEARCH_HELD (k). The worker itself is unchanged.
SEARCH_GATE = GATE + f'''
import json as _json

def _holding(claim, trial):
    try:
        with open(claim + "/{SEARCH_HOLD}") as _file:
            return int(_file.read()) <= trial
    except FileNotFoundError:
        return False
    except ValueError:  # being rewritten: look again
        return True

def _hold(trial):
    held = [c for c in _claims if _holding(c, trial)]
    for claim in held:
        with open(claim + "/{SEARCH_HELD}", "w") as _file:
            _file.write(str(trial))
    while any(_holding(c, trial) for c in held):
        time.sleep(0.1)
    for claim in held:
        os.remove(claim + "/{SEARCH_HELD}")

class _SearchGate:
    def __init__(self, stream):
        self._stream, self._line = stream, ""

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text):
        written = self._stream.write(text)
        *lines, self._line = (self._line + text)[-65536:].split("\\n")
        for line in lines:
            if line.startswith({MARKER!r}):
                self._stream.flush()
                _hold(_json.loads(line[len({MARKER!r}):])["trial"])
        return written

if _claims:
    sys.stderr = _SearchGate(sys.stderr)
'''


class SearchGate:
    """The test's side of SEARCH_GATE, for claims under `root`."""

    def __init__(self, root):
        self.root = root

    def hold_after(self, claim: str, trial: int) -> None:
        """From now on the worker stops after printing the marker of trial `trial` or a later one."""
        hold = self.root / claim / SEARCH_HOLD
        hold.with_suffix(".new").write_text(str(trial))
        os.replace(hold.with_suffix(".new"), hold)

    def release(self, claim: str) -> None:
        (self.root / claim / SEARCH_HOLD).unlink()

    def held(self, claim: str, trial: int) -> bool:
        """Whether the worker is held right after printing trial `trial`'s marker."""
        held = self.root / claim / SEARCH_HELD
        return held.exists() and held.read_text() == str(trial)


@pytest.fixture
def search_gate(worker_gate, claims_root, tmp_path, monkeypatch) -> SearchGate:
    gate = tmp_path / "search-gate"
    gate.mkdir()
    (gate / "sitecustomize.py").write_text(SEARCH_GATE)  # first on the path: Python imports only one
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(gate), os.environ["PYTHONPATH"]]))
    return SearchGate(claims_root)


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
        control_plane, namespace, operator, claims_root, search_inputs, search_gate):
    # On the tiny model the 12 trials take about a second and the operator reads the log every 5 s: left
    # alone, the search would often end between two reads. The gate holds the worker right after it
    # printed trial 1's marker, then trial 6's, until status.search has shown each (docs/operator.md).
    claim = f"{namespace}-progress"
    shutil.copytree(search_inputs, claims_root / claim)
    search_gate.hold_after(claim, 1)
    search = {"strategy": "random", "trials": 12, "seed": 1,
              "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9}}]}
    apply(control_plane, namespace, search_resource("progress", claim, search, method="ties",
                                                    parameters={"density": 0.5}))
    seen = []

    def progress_while_running():
        merge = get(control_plane, namespace, "adaptermerge", "progress")
        status = merge.get("status") or {}
        if status.get("phase") == "Running" and "budget" in (status.get("search") or {}):
            if not seen or seen[-1] != status["search"]:
                seen.append(status["search"])
        return merge

    def held_at(trial: int):
        def check():
            merge = progress_while_running()
            return merge if seen and seen[-1]["trials"] == trial else None
        # The worker is held after printing the marker: within a few timer intervals it must be in status.
        wait_until(lambda: search_gate.held(claim, trial), f"the worker to print trial {trial}'s marker",
                   operator, control_plane)
        merge = wait_until(check, f"status.search to show trial {trial} of 12", operator, control_plane,
                           timeout=6 * search_progress.INTERVAL_SECONDS)
        assert merge["status"]["phase"] == "Running" and search_gate.held(claim, trial)
        return seen[-1]

    first = held_at(1)
    search_gate.hold_after(claim, 6)
    sixth = held_at(6)
    search_gate.release(claim)

    def finished():
        merge = progress_while_running()
        return (merge.get("status") or {}).get("phase") in ("Succeeded", "Failed") and merge

    merge = wait_until(finished, "the search to finish", operator, control_plane)
    assert ready(merge)["reason"] == "MergeSucceeded", ready(merge)

    for progress in seen:  # what the worker's marker said: trial k of 12, the best so far
        assert progress["budget"] == 12 and 1 <= progress["trials"] <= 12
        assert progress["best"]["method"] == "ties" and 1 <= progress["best"]["trial"] <= progress["trials"]
        assert set(progress["best"]["parameters"]) <= {"density"} and progress["bestScore"] is not None
    assert [p["trials"] for p in seen] == sorted(p["trials"] for p in seen)
    assert first["best"]["trial"] == 1 and sixth["bestScore"] >= first["bestScore"]
    final = merge["status"]["search"]
    assert final["trials"] == 12 and "budget" not in final and final["bestScore"] >= seen[-1]["bestScore"]

    pod = merge["status"]["podName"]
    logs = control_plane.kubectl("logs", "-n", namespace, pod).stdout  # through the API server's pods/log
    assert "search: trial 12 of 12" in logs and "best so far" in logs
    assert logs.count("\nadaptermerge-search-progress {") == 12
    markers = {p.trial: search_status.from_progress(p) for p in map(parse_progress_line, logs.splitlines()) if p}
    assert (first, sixth) == (markers[1], markers[6])  # the status showed exactly what the worker printed
