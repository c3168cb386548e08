"""The operator's lifecycle on the real control plane (issue 12): a verdict survives its Job, every
failure reaches the status, conflicts are conflicts, retries are retries, disruptions are free, and
reruns are asked for. Harness: tests/support/operator_harness.py; fixtures: conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from support.operator_harness import (
    TIMEOUT, apply, condition, event_reasons, events_of, get, jobs, phase_is, ready, resource, wait_until,
)

pytestmark = pytest.mark.cluster


def _configmaps(control_plane, namespace: str, name: str) -> list[str]:
    items = get(control_plane, namespace, "configmaps", "-l", f"adaptermerge.io/name={name}")["items"]
    return [c["metadata"]["name"] for c in items]


def _pods(control_plane, namespace: str) -> list[dict]:
    return get(control_plane, namespace, "pods")["items"]


def test_a_finished_merge_is_not_run_again_after_its_job_is_gone(control_plane, namespace, operator, claims,
                                                                  test_kubelet):
    """The Job finishes and its TTL removes it while the operator is down: no second run."""
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("once", claim, job={"gpus": 0, "ttlSecondsAfterFinished": 0}))
    wait_until(phase_is(control_plane, namespace, "once", "Running"), "the merge to run", operator, control_plane)

    operator.stop()
    claims.release(claim)

    def job_finished_and_deleted():
        remaining = jobs(control_plane, namespace)
        # TTL deleted it: gone, or held by the operator's finalizer (deletionTimestamp set) until it is back.
        return all(j["metadata"].get("deletionTimestamp") for j in remaining) and not _pods(control_plane, namespace)
    wait_until(job_finished_and_deleted, "the Job to finish and be deleted by its TTL", operator, control_plane)

    operator.start()
    merge = wait_until(phase_is(control_plane, namespace, "once", "Succeeded"), "the verdict", operator, control_plane)
    assert merge["status"]["jobName"] == "once-1"
    wait_until(lambda: not jobs(control_plane, namespace), "the Job to be let go", operator, control_plane, 60)
    assert test_kubelet.pods_run(namespace) == [p for p in test_kubelet.pods_run(namespace) if p.startswith("once-1-")]
    assert len(test_kubelet.pods_run(namespace)) == 1, "the merge ran once"
    assert condition(merge, "Reconciling")["status"] == "False"


@pytest.mark.parametrize("job, api_says, crd_may_refuse", [
    # The spec models check these at apply time now; if they did not, the API would refuse the Job.
    ({"tolerations": [{"key": "gpu", "operator": "Sometimes"}]}, "Unsupported value", True),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}},
     "nodeSelectorTerms", True),
    # Only the API server knows these: an extended resource in fractions, hugepages without cpu or memory.
    ({"resources": {"requests": {"example.com/fpga": "500m"}, "limits": {"example.com/fpga": "500m"}}},
     "must be an integer", False),
    ({"resources": {"requests": {"hugepages-2Mi": "2Mi"}, "limits": {"hugepages-2Mi": "2Mi"}}},
     "HugePages require cpu or memory", False),
], ids=["toleration", "affinity", "fractional-extended-resource", "hugepages-alone"])
def test_a_job_the_api_refuses_fails_at_once_with_its_message(control_plane, namespace, operator, claims, job,
                                                               api_says, crd_may_refuse):
    claim = claims.make()
    applied = apply(control_plane, namespace, resource("refused", claim, job={"gpus": 0, **job}), check=False)
    if crd_may_refuse and applied.returncode != 0:  # caught at apply time: as good, and it names the field
        assert "spec.job" in applied.stderr, applied.stderr
        return
    assert applied.returncode == 0, applied.stderr
    merge = wait_until(phase_is(control_plane, namespace, "refused", "Failed"), "phase Failed", operator, control_plane, 60)
    assert ready(merge)["reason"] == "JobRejected" and api_says in ready(merge)["message"]
    assert condition(merge, "Stalled")["status"] == "True"
    warnings = [e for e in events_of(control_plane, namespace, "refused") if e["reason"] == "JobRejected"]
    assert warnings and warnings[0]["type"] == "Warning" and api_says in warnings[0]["message"]
    assert jobs(control_plane, namespace) == [] and _configmaps(control_plane, namespace, "refused") == []
    assert "Traceback" not in operator.log_file.read_text(), operator.log()


@pytest.mark.parametrize("job, settings, why", [
    ({"priorityClassName": "not-there"}, {}, "no PriorityClass with name not-there"),
    ({}, {"ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": "not-there"}, 'serviceaccount "not-there" not found'),
], ids=["priority-class", "service-account"])
def test_a_pod_that_cannot_be_created_says_why_then_fails(control_plane, namespace, operator, claims, job, settings, why):
    """The Job exists but its pod is refused (the Job controller's FailedCreate events say why)."""
    operator.restart(ADAPTERMERGE_SCHEDULING_TIMEOUT_SECONDS="20", **settings)
    claim = claims.make()
    apply(control_plane, namespace, resource("uncreatable", claim, job={"gpus": 0, **job}))

    merge = wait_until(phase_is(control_plane, namespace, "uncreatable", "Pending", reason="PodCreationFailed"),
                       "the status to say the pod cannot be created", operator, control_plane, 30)
    assert why in ready(merge)["message"]
    merge = wait_until(phase_is(control_plane, namespace, "uncreatable", "Failed"), "the scheduling timeout",
                       operator, control_plane, 60)
    assert ready(merge)["reason"] == "PodCreationFailed" and why in ready(merge)["message"]
    wait_until(lambda: not jobs(control_plane, namespace), "the Job to be stopped", operator, control_plane, 30)
    assert "PodCreationFailed" in event_reasons(control_plane, namespace, "uncreatable")


def test_a_pod_no_node_fits_says_why_then_fails(control_plane, namespace, operator, claims, test_kubelet):
    operator.restart(ADAPTERMERGE_SCHEDULING_TIMEOUT_SECONDS="15")
    claim = claims.make()
    apply(control_plane, namespace, resource("toobig", claim, job={"gpus": 64}))  # the node has 4

    merge = wait_until(phase_is(control_plane, namespace, "toobig", "Pending", reason="Unschedulable"),
                       "the status to say no node fits", operator, control_plane, 30)
    assert "Insufficient nvidia.com/gpu" in ready(merge)["message"]
    merge = wait_until(phase_is(control_plane, namespace, "toobig", "Failed"), "the scheduling timeout",
                       operator, control_plane, 60)
    assert ready(merge)["reason"] == "Unschedulable" and "15s" in ready(merge)["message"]
    wait_until(lambda: not jobs(control_plane, namespace), "the Job to be stopped", operator, control_plane, 30)
    assert test_kubelet.pods_run(namespace) == []


def test_two_resources_writing_one_output_is_a_conflict(control_plane, namespace, operator, claims):
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("first", claim, output={"path": "merged/shared", "rank": 4}))
    wait_until(phase_is(control_plane, namespace, "first", "Running"), "the first merge to run", operator, control_plane)
    apply(control_plane, namespace, resource("second", claim, output={"path": "merged/shared", "rank": 4}))

    second = wait_until(phase_is(control_plane, namespace, "second", "Failed"), "the conflict", operator, control_plane, 60)
    assert ready(second)["reason"] == "OutputConflict"
    assert "first" in ready(second)["message"] and "merged/shared" in ready(second)["message"]
    claims.release(claim)
    first = wait_until(phase_is(control_plane, namespace, "first", "Succeeded"), "the first merge", operator, control_plane)
    assert ready(first)["reason"] == "MergeSucceeded"
    assert [j["metadata"]["name"] for j in jobs(control_plane, namespace)] == ["first-1"]
    # Nested outputs are one output too, and a succeeded merge keeps holding its output.
    apply(control_plane, namespace, resource("third", claim, output={"path": "merged/shared/inner", "rank": 4}))
    third = wait_until(phase_is(control_plane, namespace, "third", "Failed"), "the nested conflict", operator, control_plane, 60)
    assert ready(third)["reason"] == "OutputConflict" and "succeeded" in ready(third)["message"]


def test_a_retry_is_shown_as_a_retry_and_the_status_never_goes_back(control_plane, namespace, operator, claims):
    claim = claims.make(fail_once=True)  # attempt 1 exits 1, attempt 2 merges
    apply(control_plane, namespace, resource("retried", claim, job={"gpus": 0, "backoffLimit": 2}))
    # Every status the API server stores, in order (the worker needs seconds to start: nothing is missed).
    watcher = subprocess.Popen(
        [str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(control_plane.kubeconfig), "-n", namespace,
         "get", "adaptermerge", "retried", "--watch", "-o",
         "jsonpath={.status.phase} {.status.attempt}{\"\\n\"}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        merge = wait_until(phase_is(control_plane, namespace, "retried", "Succeeded"), "the merge", operator, control_plane)
        time.sleep(2)  # the watch prints the last status
    finally:
        watcher.terminate()
    seen = [line.split() for line in watcher.communicate(timeout=10)[0].splitlines() if line.strip()]
    phases = [s[0] for s in seen]
    assert "Running" in phases and phases[-1] == "Succeeded", seen
    assert "Pending" not in phases[phases.index("Running"):], f"went back to Pending: {seen}"
    attempts = [int(s[1]) for s in seen if len(s) > 1]
    assert attempts == sorted(attempts) and attempts[-1] == 2, f"attempts vanished: {seen}"
    assert merge["status"]["attempt"] == 2
    retrying = [e for e in events_of(control_plane, namespace, "retried") if e["reason"] == "Retrying"]
    assert retrying and "exit code 1" in retrying[0]["message"]


def test_an_eviction_does_not_use_up_the_backoff_limit(control_plane, namespace, operator, claims):
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("evicted", claim, job={"gpus": 0, "backoffLimit": 0}))
    wait_until(phase_is(control_plane, namespace, "evicted", "Running"), "the merge to run", operator, control_plane)
    [pod] = _pods(control_plane, namespace)

    from kubernetes import client

    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod["metadata"]["name"], "namespace": namespace}}
    client.CoreV1Api(control_plane.api_client()).create_namespaced_pod_eviction(
        pod["metadata"]["name"], namespace, eviction, _preload_content=False)
    wait_until(lambda: [p for p in _pods(control_plane, namespace) if p["metadata"]["uid"] != pod["metadata"]["uid"]],
               "a replacement pod", operator, control_plane, 60)
    claims.release(claim)
    merge = wait_until(phase_is(control_plane, namespace, "evicted", "Succeeded"), "the merge", operator, control_plane)
    [job] = jobs(control_plane, namespace)
    assert not job["status"].get("failed"), "the eviction did not count as a failure"
    assert merge["status"]["attempt"] == 2


def test_the_rerun_annotation_runs_an_unchanged_spec_again(control_plane, namespace, operator, claims, test_kubelet):
    claim = claims.make()
    document = resource("again", claim, output={"path": "merged/again", "rank": 4, "overwrite": True})
    apply(control_plane, namespace, document)
    first = wait_until(phase_is(control_plane, namespace, "again", "Succeeded"), "the first run", operator, control_plane)
    manifest = claims.path(claim, "merged", "again", "adapter_config.json")
    written = manifest.stat().st_mtime_ns

    control_plane.kubectl("annotate", "-n", namespace, "adaptermerge", "again", "adaptermerge.io/rerun=1")

    def rerun_succeeded():
        merge = get(control_plane, namespace, "adaptermerge", "again")
        status = merge.get("status") or {}
        return merge if status.get("jobName") != first["status"]["jobName"] and status.get("phase") == "Succeeded" else None
    second = wait_until(rerun_succeeded, "the rerun", operator, control_plane)
    assert second["status"]["jobName"].startswith("again-1-") and second["status"]["observedGeneration"] == 1
    assert manifest.stat().st_mtime_ns != written, "the output was written again"
    assert len(test_kubelet.pods_run(namespace)) == 2
    wait_until(lambda: [j["metadata"]["name"] for j in jobs(control_plane, namespace)] == [second["status"]["jobName"]],
               "the first run's Job to be retired", operator, control_plane, 60)
    assert json.loads(manifest.read_text())["r"] == 4


def test_an_adopted_job_without_the_finalizer_gets_it(control_plane, namespace, operator, claims):
    """A Job made by an operator version without finalizers (an upgrade) is held like the others."""
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("upgraded", claim, job={"gpus": 0}))
    wait_until(phase_is(control_plane, namespace, "upgraded", "Running"), "the merge to run", operator, control_plane)
    operator.stop()
    control_plane.kubectl("patch", "job", "upgraded-1", "-n", namespace, "--type=json",
                          "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')

    operator.start()
    wait_until(lambda: "adaptermerge.io/verdict" in (get(control_plane, namespace, "job", "upgraded-1")["metadata"]
                                                     .get("finalizers") or []),
               "the finalizer on the adopted Job", operator, control_plane, 60)
    claims.release(claim)
    wait_until(phase_is(control_plane, namespace, "upgraded", "Succeeded"), "the merge", operator, control_plane)


def test_a_job_a_quota_forbids_is_reported_and_retried(control_plane, namespace, operator, claims):
    """A 403 on create (here a ResourceQuota on Jobs) may pass later: Pending with the API's message,
    retried, and the merge runs once the quota allows it."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
             "spec": {"hard": {"count/jobs.batch": "0"}}}
    apply(control_plane, namespace, quota)
    # The quota controller does not run here: its usage is written by hand, as that controller would.
    usage = {"status": {"hard": {"count/jobs.batch": "0"}, "used": {"count/jobs.batch": "0"}}}
    control_plane.kubectl("patch", "resourcequota", "no-jobs", "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", json.dumps(usage))
    claim = claims.make()
    apply(control_plane, namespace, resource("quota", claim, job={"gpus": 0}))
    merge = wait_until(phase_is(control_plane, namespace, "quota", "Pending", reason="JobForbidden"),
                       "the status to say the Job is forbidden", operator, control_plane, 60)
    assert "quota" in ready(merge)["message"] and jobs(control_plane, namespace) == []

    control_plane.kubectl("delete", "resourcequota", "no-jobs", "-n", namespace)
    wait_until(phase_is(control_plane, namespace, "quota", "Succeeded"), "the merge", operator, control_plane)


def test_a_spec_edit_replaces_the_output_its_earlier_generation_wrote(control_plane, namespace, operator, claims):
    """GitOps: generation 2 writes where generation 1 did; the worker knows the output is its own
    resource's (--owner, recorded in the output's manifest) and replaces it."""
    claim = claims.make()
    apply(control_plane, namespace, resource("edited", claim))
    wait_until(phase_is(control_plane, namespace, "edited", "Succeeded"), "generation 1", operator, control_plane)
    weights = claims.path(claim, "merged", "edited", "adapter_model.safetensors")
    first = weights.read_bytes()

    edited = resource("edited", claim)
    edited["spec"]["adapters"][0]["weight"] = 0.2
    apply(control_plane, namespace, edited)
    merge = wait_until(phase_is(control_plane, namespace, "edited", "Succeeded", generation=2), "generation 2",
                       operator, control_plane)
    assert ready(merge)["reason"] == "MergeSucceeded"
    assert weights.read_bytes() != first, "generation 2's merge replaced generation 1's"


def test_an_output_written_by_another_resource_is_never_touched(control_plane, namespace, operator, claims):
    """The first resource is gone, so the operator's index no longer knows the output: the worker
    finds another owner in the output's manifest and refuses (OutputConflict, not InvalidSpec)."""
    claim = claims.make()
    apply(control_plane, namespace, resource("writer", claim, output={"path": "merged/kept", "rank": 4}))
    wait_until(phase_is(control_plane, namespace, "writer", "Succeeded"), "the first merge", operator, control_plane)
    weights = claims.path(claim, "merged", "kept", "adapter_model.safetensors")
    written = weights.read_bytes()
    control_plane.kubectl("delete", "-n", namespace, "adaptermerge", "writer", "--wait=true", "--timeout=60s")

    intruder = resource("intruder", claim, output={"path": "merged/kept", "rank": 4})
    intruder["spec"]["adapters"][0]["weight"] = 0.2
    apply(control_plane, namespace, intruder)
    merge = wait_until(phase_is(control_plane, namespace, "intruder", "Failed"), "the refusal", operator, control_plane)
    assert ready(merge)["reason"] == "OutputConflict"
    assert weights.read_bytes() == written
