"""The operator end to end: real API server, Job controller and garbage collector, the test kubelet
running the real worker (`adaptermerge run`), and the operator as a subprocess holding the chart's
ServiceAccount token (docs/interfaces.md #11), so a missing RBAC rule fails here. The harness
(operator, claims, worker gate) is in tests/support/operator_harness.py, its fixtures in conftest.py.
"""

from __future__ import annotations

import json

import pytest
import yaml
from support.operator_harness import TIMEOUT, apply, get, jobs, phase_is, ready, resource, wait_until
from support.operator_harness import event_reasons as events_of

pytestmark = pytest.mark.cluster


# -- tests -----------------------------------------------------------------------------------------


def test_merge_runs_to_ready_and_deleting_it_keeps_the_output(control_plane, namespace, operator, claims):
    claim = claims.make()
    apply(control_plane, namespace, resource("dev", claim))

    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/dev",
                                   f"--timeout={TIMEOUT}s", check=False)
    assert waited.returncode == 0, f"{waited.stderr}\n{operator.log()}\n{control_plane.logs()}"

    merge = get(control_plane, namespace, "adaptermerge", "dev")
    status = merge["status"]
    assert (status["phase"], status["observedGeneration"], status["jobName"]) == ("Succeeded", 1, "dev-1")
    assert ready(merge)["reason"] == "MergeSucceeded" and ready(merge)["observedGeneration"] == 1
    assert status["output"] == {"claimName": claim, "path": "merged/dev", "format": "adapter", "rank": 4}
    assert status["result"]["modules"] == 4 and status["result"]["maxReconstructionError"] >= 0
    assert status["startTime"] <= status["completionTime"]
    merged = claims.path(claim, "merged", "dev")
    assert (merged / "adapter_config.json").is_file() and (merged / "adapter_model.safetensors").is_file()
    assert json.loads((merged / "adapter_config.json").read_text())["r"] == 4
    assert {"JobCreated", "MergeSucceeded"} <= set(events_of(control_plane, namespace, "dev"))
    [job] = jobs(control_plane, namespace)
    assert job["metadata"]["ownerReferences"][0]["uid"] == merge["metadata"]["uid"]

    control_plane.kubectl("delete", "-n", namespace, "adaptermerge", "dev", "--wait=true", "--timeout=60s")
    wait_until(lambda: not jobs(control_plane, namespace), "the Job to be garbage-collected", operator, control_plane, 60)
    wait_until(lambda: not get(control_plane, namespace, "configmaps", "-l", "adaptermerge.io/name=dev")["items"],
               "the ConfigMap to be garbage-collected", operator, control_plane, 60)
    assert (merged / "adapter_model.safetensors").is_file(), "outputs on volumes are never deleted"


def test_missing_adapter_fails_with_the_worker_message(control_plane, namespace, operator, claims):
    claim = claims.make()
    spec = resource("missing", claim)
    spec["spec"]["adapters"][1]["path"] = "adapters/not-there"
    apply(control_plane, namespace, spec)

    merge = wait_until(phase_is(control_plane, namespace, "missing", "Failed"), "phase Failed", operator, control_plane)
    assert ready(merge)["status"] == "False" and ready(merge)["reason"] == "InvalidSpec"
    assert "adapters/not-there" in ready(merge)["message"] and "spec.adapters[1].path" in ready(merge)["message"]
    assert merge["status"]["result"]["exitCode"] == 2
    [job] = jobs(control_plane, namespace)
    assert job["status"].get("failed") == 1, "exit code 2 fails the Job without retries"
    assert "InvalidSpec" in events_of(control_plane, namespace, "missing")
    assert not claims.path(claim, "merged", "missing").exists()


def test_spec_the_crd_cannot_check_fails_without_a_job(control_plane, namespace, operator, claims):
    claim = claims.make()
    spec = resource("both", claim)
    # Weights per adapter (adapter a has one) and in parameters.weights at once: only the models know.
    spec["spec"]["parameters"]["weights"] = [0.5, 0.5]
    apply(control_plane, namespace, spec)

    merge = wait_until(phase_is(control_plane, namespace, "both", "Failed"), "phase Failed", operator, control_plane, 60)
    assert ready(merge)["reason"] == "InvalidSpec" and ready(merge)["message"].startswith("spec.adapters[0].weight")
    assert jobs(control_plane, namespace) == []
    assert "Traceback" not in operator.log_file.read_text()


def test_job_past_its_deadline_fails_with_deadline_exceeded(control_plane, namespace, operator, claims):
    claim = claims.make(hold=True)  # never released: the worker waits past the deadline
    apply(control_plane, namespace, resource("slow", claim, job={"gpus": 0, "activeDeadlineSeconds": 3}))

    merge = wait_until(phase_is(control_plane, namespace, "slow", "Failed"), "phase Failed", operator, control_plane, 90)
    assert ready(merge)["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=3" in ready(merge)["message"]


def test_spec_update_supersedes_the_running_job(control_plane, namespace, operator, claims):
    held, free = claims.make("held", hold=True), claims.make("free")
    apply(control_plane, namespace, resource("moving", held))
    wait_until(phase_is(control_plane, namespace, "moving", "Running"), "generation 1 running", operator, control_plane)
    [first] = jobs(control_plane, namespace)
    assert first["metadata"]["name"] == "moving-1"

    apply(control_plane, namespace, resource("moving", free))  # generation 2 writes to another claim
    merge = wait_until(phase_is(control_plane, namespace, "moving", "Succeeded", generation=2),
                       "generation 2 to succeed", operator, control_plane)
    assert merge["status"]["jobName"] == "moving-2" and merge["status"]["output"]["claimName"] == free
    assert [j["metadata"]["name"] for j in jobs(control_plane, namespace)] == ["moving-2"]
    configmaps = get(control_plane, namespace, "configmaps", "-l", "adaptermerge.io/name=moving")["items"]
    assert [c["metadata"]["name"] for c in configmaps] == ["moving-2"]
    pods = get(control_plane, namespace, "pods")["items"]
    assert {p["metadata"]["labels"]["job-name"] for p in pods} == {"moving-2"}, "the old worker was stopped"
    assert claims.path(free, "merged", "moving", "adapter_model.safetensors").is_file()
    assert not claims.path(held, "merged", "moving").exists()
    assert "Superseded" in events_of(control_plane, namespace, "moving")


def test_operator_restart_mid_merge_adopts_the_job(control_plane, namespace, operator, claims):
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("steady", claim))
    wait_until(phase_is(control_plane, namespace, "steady", "Running"), "the merge to run", operator, control_plane)
    [before] = jobs(control_plane, namespace)

    operator.stop()
    operator.start()
    operator.wait_for_log("[%s/steady] Resuming is processed" % namespace)
    claims.release(claim)
    merge = wait_until(phase_is(control_plane, namespace, "steady", "Succeeded"), "the merge to finish", operator, control_plane)

    [after] = jobs(control_plane, namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "the running Job was adopted, not replaced"
    pods = get(control_plane, namespace, "pods")["items"]
    assert len(pods) == 1, "one worker ran"
    assert merge["status"]["jobName"] == "steady-1" and merge["status"]["result"]["modules"] == 4


def test_crd_rejects_invalid_resources_at_apply_time(control_plane, namespace, crd):
    def rejected(change) -> str:
        document = resource("bad", "store")
        change(document["spec"])
        done = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document), check=False)
        assert done.returncode != 0, f"accepted: {document['spec']}"
        return done.stderr

    three = [{"name": n, "path": f"adapters/{n}"} for n in ("a", "b", "c")]
    assert "slerp needs exactly two adapters" in rejected(lambda s: s.update(method="slerp", adapters=three))
    assert "spec.parameters.density" in rejected(lambda s: s.update(parameters={"density": 1.5}))
    assert "without '..'" in rejected(lambda s: s["adapters"][0].update(path="../other/a"))
    assert "without '..'" in rejected(lambda s: s["output"].update(path="/etc/merged"))
    assert "spec.output.rank" in rejected(lambda s: s["output"].update(rank=0))
    assert "spec.method" in rejected(lambda s: s.update(method="average"))
    assert "parameters.density is required" in rejected(lambda s: s.update(parameters={}))
    assert get(control_plane, namespace, "adaptermerges")["items"] == []
