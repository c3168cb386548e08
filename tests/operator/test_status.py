"""From a resource, its Job and pods to the status API.md describes, without a cluster."""

from __future__ import annotations

from adaptermerge_operator import names, status

NOW = "2030-01-01T00:01:00Z"
EARLIER = "2030-01-01T00:00:30Z"


def ready(result):
    [condition] = [c for c in result["conditions"] if c["type"] == "Ready"]
    return condition


def test_termination_message_parsing(objects):
    summary = objects.summary(0, "merged", seconds=1.5, modules=4)
    assert status.parse_termination_message(summary)["modules"] == 4
    for text in (None, "", "Traceback (most recent call last):\n  boom", "[1, 2]", "{broken"):
        assert status.parse_termination_message(text) is None


def test_job_created_but_no_pod_yet_is_pending(objects):
    result = status.desired_status(objects.merge(), [objects.job(startTime=EARLIER)], [], NOW)
    assert (result["phase"], ready(result)["reason"], ready(result)["status"]) == ("Pending", "JobPending", "False")
    assert result["jobName"] == "dev-1" and result["observedGeneration"] == 1
    assert result["startTime"] == EARLIER
    assert result["output"] == {"claimName": "store", "path": "merged/out", "format": "adapter", "rank": 8}


def test_unschedulable_pod_explains_why(objects):
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    pod = objects.pod(conditions=[scheduled])
    result = status.desired_status(objects.merge(), [objects.job()], [pod], NOW)
    assert result["phase"] == "Pending" and "Insufficient nvidia.com/gpu" in ready(result)["message"]


def test_suspended_job_waits_for_its_queue(objects):
    job = objects.job(suspend=True, labels={"kueue.x-k8s.io/queue-name": "team-a"})
    result = status.desired_status(objects.merge(), [job], [], NOW)
    assert result["phase"] == "Pending" and "team-a" in ready(result)["message"]


def test_running_pod_makes_the_merge_running(objects):
    pod = objects.pod(phase="Running", state={"running": {"startedAt": EARLIER}})
    result = status.desired_status(objects.merge(), [objects.job()], [pod], NOW)
    assert (result["phase"], ready(result)["reason"]) == ("Running", "JobRunning")
    assert "dev-1-abcde" in ready(result)["message"]


def test_pods_of_other_jobs_are_ignored(objects):
    stale = objects.pod(job="dev-0", name="dev-0-zzzzz", phase="Running")
    result = status.desired_status(objects.merge(), [objects.job()], [stale], NOW)
    assert result["phase"] == "Pending"


def test_forged_pods_cannot_speak_for_the_job(objects):
    """Anyone who may create pods can copy a worker pod's labels; only a pod whose controller is this
    Job (by uid), in its namespace, is read."""
    lie = objects.summary(0, "merged by a forger", retention={"python": 1.0})
    job = objects.job(conditions=[objects.condition("Complete")])
    honest = objects.pod(phase="Succeeded", state=objects.terminated(0, objects.summary(0, "merged")))
    forged = [
        objects.pod(name="dev-1-other-ns", namespace="attacker", created="2030-01-01T00:00:05Z",
                    phase="Succeeded", state=objects.terminated(0, lie)),
        objects.pod(name="dev-1-wrong-uid", controller_uid="some-other-job", created="2030-01-01T00:00:05Z",
                    phase="Succeeded", state=objects.terminated(0, lie)),
    ]
    no_owner = objects.pod(name="dev-1-no-owner", created="2030-01-01T00:00:05Z", phase="Succeeded",
                           state=objects.terminated(0, lie))
    no_owner["metadata"]["ownerReferences"] = []
    result = status.desired_status(objects.merge(), [job], [honest, *forged, no_owner], NOW)
    assert ready(result)["message"] == "merged" and "retention" not in result.get("result", {})
    assert result["podName"] == "dev-1-abcde"


def test_a_job_in_another_namespace_is_not_this_resources_run(objects):
    job = objects.job(conditions=[objects.condition("Complete")])
    job["metadata"]["namespace"] = "attacker"
    result = status.desired_status(objects.merge(), [job], [], NOW)
    assert result["phase"] == "Pending"


def test_worker_that_published_before_the_deadline_is_a_success(objects):
    """The worker finished (its summary says so) and the Job controller enforced activeDeadlineSeconds
    during the pod's exit: the output exists, so the status must not say the merge failed."""
    summary = objects.summary(0, "merged 2 adapters into store:merged/out", published=True)
    job = objects.job(conditions=[objects.condition("FailureTarget", "DeadlineExceeded")])
    pod = objects.pod(phase="Failed", state=objects.terminated(143, summary))
    result = status.desired_status(objects.merge(), [job], [pod], NOW)
    assert (result["phase"], ready(result)["reason"], ready(result)["status"]) == ("Succeeded", "MergeSucceeded", "True")
    assert "DeadlineExceeded" in ready(result)["message"]
    killed = objects.pod(phase="Failed", state=objects.terminated(143, "Terminated"))
    result = status.desired_status(objects.merge(), [job], [killed], NOW)
    assert (result["phase"], ready(result)["reason"]) == ("Failed", "DeadlineExceeded")


def test_completed_job_is_ready_with_the_worker_result(objects):
    summary = objects.summary(0, "merged 2 adapters into store:merged/out", seconds=2.4, modules=224,
                              max_reconstruction_error=0.08, rank=8, retention={"python": 0.94, "sql": None},
                              output={"claimName": "store", "path": "merged/out", "format": "adapter"})
    job = objects.job(conditions=[objects.condition("Complete")], startTime=EARLIER, completionTime=NOW)
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, summary))
    result = status.desired_status(objects.merge(), [job], [pod], NOW)
    assert result["phase"] == "Succeeded"
    assert (ready(result)["status"], ready(result)["reason"]) == ("True", "MergeSucceeded")
    assert ready(result)["message"] == "merged 2 adapters into store:merged/out"
    assert result["result"] == {"seconds": 2.4, "modules": 224, "maxReconstructionError": 0.08, "rank": 8,
                                "retention": {"python": 0.94, "sql": None}, "exitCode": 0}
    assert (result["startTime"], result["completionTime"]) == (EARLIER, NOW)


def test_auto_rank_reports_the_rank_written(objects):
    spec = {**objects.SPEC, "output": {"path": "merged/out", "rank": "auto"}}
    job = objects.job(conditions=[objects.condition("Complete")])
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, objects.summary(0, "ok", rank=12)))
    assert status.desired_status(objects.merge(spec), [job], [pod], NOW)["output"]["rank"] == 12
    pod_without_rank = objects.pod(phase="Succeeded", state=objects.terminated(0, objects.summary(0, "ok")))
    assert status.desired_status(objects.merge(spec), [job], [pod_without_rank], NOW)["output"]["rank"] == "auto"


def test_worker_failure_keeps_the_worker_reason_and_message(objects):
    for exit_code, reason in ((2, "InvalidSpec"), (3, "RetentionBelowThreshold"), (1, "JobFailed")):
        message = f"failure with exit code {exit_code}: spec.adapters[1].path: adapters/sql does not exist"
        job = objects.job(conditions=[objects.condition("Failed", "PodFailurePolicy")])
        pod = objects.pod(phase="Failed", state=objects.terminated(exit_code, objects.summary(exit_code, message)))
        result = status.desired_status(objects.merge(), [job], [pod], NOW)
        assert (result["phase"], ready(result)["reason"], ready(result)["message"]) == ("Failed", reason, message)
        assert result["result"]["exitCode"] == exit_code


def test_failure_target_is_already_final(objects):
    job = objects.job(conditions=[objects.condition("FailureTarget", "BackoffLimitExceeded")])
    pod = objects.pod(phase="Failed", state=objects.terminated(1, objects.summary(1, "CUDA out of memory")))
    result = status.desired_status(objects.merge(), [job], [pod], NOW)
    assert (result["phase"], ready(result)["reason"]) == ("Failed", "JobFailed")
    assert ready(result)["message"] == "CUDA out of memory"


def test_deadline_exceeded(objects):
    job = objects.job(conditions=[objects.condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")])
    pod = objects.pod(phase="Running")  # the deadline killed a running worker: no summary
    result = status.desired_status(objects.merge(), [job], [pod], NOW)
    assert (result["phase"], ready(result)["reason"]) == ("Failed", "DeadlineExceeded")
    assert "activeDeadlineSeconds=60" in ready(result)["message"]
    assert result["completionTime"] == "2030-01-01T00:00:10Z"


def test_worker_that_died_before_its_summary_reports_its_last_log_line(objects):
    log_tail = "loading adapters\nTraceback (most recent call last):\nMemoryError: cannot allocate\n"
    job = objects.job(conditions=[objects.condition("Failed", "BackoffLimitExceeded")])
    pod = objects.pod(phase="Failed", state=objects.terminated(137, log_tail))
    result = status.desired_status(objects.merge(), [job], [pod], NOW)
    assert (ready(result)["reason"], ready(result)["message"]) == ("JobFailed", "MemoryError: cannot allocate")
    assert "result" not in result


def test_the_newest_attempt_speaks(objects):
    first = objects.pod(name="dev-1-first", phase="Failed", created="2030-01-01T00:00:00Z",
                        state=objects.terminated(1, objects.summary(1, "first attempt")))
    second = objects.pod(name="dev-1-second", phase="Failed", created="2030-01-01T00:00:20Z",
                         state=objects.terminated(1, objects.summary(1, "second attempt")))
    job = objects.job(conditions=[objects.condition("Failed", "BackoffLimitExceeded")])
    result = status.desired_status(objects.merge(), [job], [second, first], NOW)
    assert ready(result)["message"] == "second attempt"


def test_invalid_spec_names_the_field_and_has_no_job(objects):
    spec = {**objects.SPEC, "adapters": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}
    result = status.desired_status(objects.merge(spec, generation=3), [], [], NOW)
    assert result["phase"] == "Failed" and result["observedGeneration"] == 3
    assert ready(result)["reason"] == "InvalidSpec"
    assert ready(result)["message"].startswith("spec.adapters[1].name")
    assert "jobName" not in result


def test_status_follows_the_newest_generation(objects):
    old_job = objects.job("dev-1", conditions=[objects.condition("Complete")])
    result = status.desired_status(objects.merge(generation=2), [old_job], [], NOW)
    assert (result["jobName"], result["phase"], result["observedGeneration"]) == ("dev-2", "Pending", 2)


def test_last_transition_time_moves_only_when_the_condition_status_does(objects):
    pending = status.desired_status(objects.merge(), [objects.job()], [], EARLIER)
    running_pod = objects.pod(phase="Running")
    running = status.desired_status(objects.merge(status=pending), [objects.job()], [running_pod], NOW)
    assert ready(running)["reason"] == "JobRunning"
    assert ready(running)["lastTransitionTime"] == EARLIER  # False -> False: no transition
    done = objects.job(conditions=[objects.condition("Complete")])
    succeeded = status.desired_status(objects.merge(status=running), [done], [], NOW)
    assert (ready(succeeded)["status"], ready(succeeded)["lastTransitionTime"]) == ("True", NOW)


def test_a_verdict_survives_the_job_being_cleaned_up(objects):
    done = objects.job(conditions=[objects.condition("Complete")])
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, objects.summary(0, "ok", modules=3)))
    succeeded = status.desired_status(objects.merge(), [done], [pod], EARLIER)
    after_ttl = status.desired_status(objects.merge(status=succeeded), [], [], NOW)
    assert after_ttl == succeeded


def test_a_result_that_arrives_after_the_verdict_is_filled_in(objects):
    done = objects.job(conditions=[objects.condition("Complete")])
    without = status.desired_status(objects.merge(), [done], [], EARLIER)
    assert without["phase"] == "Succeeded" and "result" not in without
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, objects.summary(0, "merged well", modules=3)))
    later = status.desired_status(objects.merge(status=without), [done], [pod], NOW)
    assert later["result"]["modules"] == 3 and ready(later)["message"] == "merged well"


def test_kopf_bookkeeping_is_not_the_operators_status(objects):
    kept = status.own_status({"phase": "Running", "kopf": {"progress": {}}, "reconcile_merge": {"x": 1}})
    assert kept == {"phase": "Running"}


def test_is_finished_only_for_the_same_run(objects):
    """A run is (generation, rerun token): its Job's name."""
    rerun = objects.merge(generation=2)
    rerun["metadata"]["annotations"] = {names.ANNOTATION_RERUN: "again"}
    assert names.run_name(objects.merge(generation=2)) == "dev-2" and names.run_name(rerun).startswith("dev-2-")
    assert status.is_finished({"phase": "Succeeded", "jobName": "dev-2"}, "dev-2")
    assert status.is_finished({"phase": "Failed", "jobName": "dev-2"}, "dev-2")
    assert not status.is_finished({"phase": "Succeeded", "jobName": "dev-1"}, "dev-2")
    assert not status.is_finished({"phase": "Succeeded", "jobName": "dev-2"}, names.run_name(rerun))
    assert not status.is_finished({"phase": "Running", "jobName": "dev-2"}, "dev-2")
    assert not status.is_finished(None, "dev-1")


def test_kstatus_conditions_follow_the_phase(objects):
    """Reconciling while a run is under way, Stalled once it failed, Ready once merged (kstatus' rules;
    tests/operator/test_kstatus_cluster.py asks kstatus itself)."""
    def truths(result):
        return {c["type"]: c["status"] for c in result["conditions"]}

    pending = status.desired_status(objects.merge(), [objects.job()], [], NOW)
    assert truths(pending) == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    failed = objects.job(conditions=[objects.condition("Failed", "BackoffLimitExceeded")])
    pod = objects.pod(phase="Failed", state=objects.terminated(1, objects.summary(1, "boom")))
    assert truths(status.desired_status(objects.merge(), [failed], [pod], NOW)) == {
        "Ready": "False", "Reconciling": "False", "Stalled": "True"}
    done = objects.job(conditions=[objects.condition("Complete")])
    assert truths(status.desired_status(objects.merge(), [done], [], NOW)) == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False"}


def test_attempts_count_pods_and_never_shrink(objects):
    """A new pod is a new attempt, also when the one before is gone (an evicted pod is deleted)."""
    merge = objects.merge()
    first = objects.pod(name="dev-1-aaaaa", phase="Failed", state=objects.terminated(1, "boom"))
    failed_job = objects.job(failed=1)
    merge["status"] = status.desired_status(merge, [failed_job], [first], NOW)
    assert (merge["status"]["attempt"], merge["status"]["podName"]) == (1, "dev-1-aaaaa")
    assert merge["status"]["phase"] == "Running", "a failed attempt with a retry to come is not Pending"
    second = objects.pod(name="dev-1-bbbbb", created="2030-01-01T00:00:20Z", phase="Running")
    merge["status"] = status.desired_status(merge, [failed_job], [first, second], NOW)
    assert merge["status"]["attempt"] == 2 and "exit code 1" in ready(merge["status"])["message"]
    merge["status"] = status.desired_status(merge, [failed_job], [second], NOW)  # the first pod is gone
    assert merge["status"]["attempt"] == 2


def test_a_worker_that_exited_0_is_not_pending_again(objects):
    merge = objects.merge()
    running = objects.pod(phase="Running", state={"running": {"startedAt": EARLIER}})
    merge["status"] = status.desired_status(merge, [objects.job()], [running], NOW)
    finished = objects.pod(phase="Succeeded", state=objects.terminated(0, objects.summary(0, "merged")))
    result = status.desired_status(merge, [objects.job()], [finished], NOW)  # the Job is not Complete yet
    assert result["phase"] == "Running" and "finished" in ready(result)["message"]


S3_SPEC = {
    "adapters": [{"name": "a", "uri": "s3://adapters/a"}, {"name": "b", "uri": "s3://adapters/b"}],
    "method": "linear",
    "output": {"uri": "s3://merged/dev", "rank": "auto"},
}


def test_a_uri_output_is_reported_by_its_uri(objects):
    """No volume, no claim: status.output names the uri; the worker's digest, when it gives one, too."""
    pending = status.desired_status(objects.merge(S3_SPEC), [objects.job(startTime=EARLIER)], [], NOW)
    assert pending["output"] == {"uri": "s3://merged/dev", "format": "adapter", "rank": "auto"}
    job = objects.job(conditions=[objects.condition("Complete")])
    summary = objects.summary(0, "merged 4 modules with linear into s3://merged/dev", rank=6,
                              output={"uri": "s3://merged/dev", "format": "adapter"})
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, summary))
    done = status.desired_status(objects.merge(S3_SPEC), [job], [pod], NOW)
    assert done["output"] == {"uri": "s3://merged/dev", "format": "adapter", "rank": 6}
    assert ready(done)["reason"] == "MergeSucceeded"
    pushed = objects.summary(0, "pushed", rank=6, output={"uri": "s3://merged/dev", "format": "adapter",
                                                          "digest": "sha256:" + "ab" * 32})
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, pushed))
    assert status.desired_status(objects.merge(S3_SPEC), [job], [pod], NOW)["output"]["digest"] == "sha256:" + "ab" * 32
    # Without the worker's summary the message names the uri (a Job completed, its pod gone).
    gone = status.desired_status(objects.merge(S3_SPEC), [job], [], NOW)
    assert ready(gone)["message"] == "merged 2 adapters with linear into s3://merged/dev"


def test_the_status_model_and_crd_take_a_uri_output(objects):
    from merge_worker import crd
    from merge_worker.spec import AdapterMergeStatus

    output = {"uri": "s3://merged/dev", "format": "adapter", "rank": 6, "digest": "sha256:" + "ab" * 32}
    assert AdapterMergeStatus.model_validate({"output": output}).output.uri == "s3://merged/dev"
    schema = crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert set(schema["properties"]["output"]["properties"]) >= {"uri", "digest", "claimName", "path"}
    assert set(schema["properties"]["output"].get("required", [])) <= {"format"}


def test_a_missing_credentials_secret_names_the_secret_then_fails(objects):
    """The kubelet cannot build the worker's env (CreateContainerConfigError): the verdict names the
    Secret from the spec (the operator never reads it), and the run fails after the scheduling timeout."""
    spec = {**S3_SPEC, "storage": {"credentialsSecret": "s3-credentials"}}
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}}
    pod = objects.pod(state=waiting)
    pod["status"]["startTime"] = EARLIER
    job = objects.job()
    result = status.desired_status(objects.merge(spec), [job], [pod], NOW, status.Facts(scheduling_timeout=900))
    assert (result["phase"], ready(result)["reason"]) == ("Pending", "CreateContainerConfigError")
    message = ready(result)["message"]
    assert 'secret "s3-credentials" not found' in message
    assert "spec.storage.credentialsSecret names Secret 's3-credentials'" in message
    assert status.cannot_start(pod) and not status.cannot_start(objects.pod(phase="Running"))
    failed = status.desired_status(objects.merge(spec), [job], [pod], NOW, status.Facts(scheduling_timeout=30))
    assert (failed["phase"], ready(failed)["reason"]) == ("Failed", "CreateContainerConfigError")
    assert "(for 30s; the Job was stopped)" in ready(failed)["message"]
