"""What an AdapterMerge's status should say, computed from what is observed (docs/operator.md, "Status").

Pure functions: the resource, its Jobs and their pods (and the few facts the operator learns from the
API itself, `Facts`) go in, the status comes out. Jobs and pods may be full Kubernetes objects or the
slimmed copies the operator's indexes keep (same shape).

One run of a merge is one Job, named after (name, generation, rerun token): `status.jobName` says
which run the status describes, and a run's verdict (Succeeded or Failed) is final.
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from merge_worker.spec import AdapterMergeSpec, SpecError, parse_spec

from adaptermerge_operator import names, outputs, search_status
from adaptermerge_operator.job_manifest import CONTAINER

READY = "Ready"
# kstatus' abnormal-true conditions (sigs.k8s.io/cli-utils): Reconciling while a run is under way,
# Stalled once it failed. With Ready they make Flux, `kubectl wait` and kstatus tell success from failure.
RECONCILING = "Reconciling"
STALLED = "Stalled"
FINISHED_PHASES = ("Succeeded", "Failed")
# The status keys the operator owns; everything else in status (kopf's bookkeeping) is left alone.
OWN_KEYS = (
    "phase", "observedGeneration", "jobName", "attempt", "podName", "startTime", "completionTime", "output", "result",
    "conditions", "search",
)
# Result-summary keys (docs/interfaces.md #5) that go to status.result; message and output go elsewhere.
RESULT_KEYS = ("seconds", "modules", "maxReconstructionError", "rank", "retention", "exitCode")
# Worker reasons kept as the condition's reason; any other failure reads JobFailed.
WORKER_REASONS = ("InvalidSpec", "RetentionBelowThreshold", "OutputConflict")
POLICY_REASON = "PolicyViolation"  # the tenant policy refused the spec: no Job
# Pod conditions set when a pod is stopped by the cluster (eviction, preemption, drain), not by a fault.
DISRUPTION = "DisruptionTarget"


@dataclass(frozen=True)
class Verdict:
    phase: str
    reason: str
    message: str


@dataclass(frozen=True)
class Facts:
    """What the operator learned from the API besides the Job and its pods."""

    job_rejected: str = ""  # the API server's message when it refused to create the Job
    job_forbidden: str = ""  # its message when it forbade the Job for now (a quota): retried
    output_conflict: str = ""  # why another resource holds this output
    policy_refusal: str = ""  # what the tenant policy does not allow (no Job was created)
    pod_creation_failure: tuple[str, str] | None = None  # (message, since) of the Job's FailedCreate events
    scheduling_timeout: int = 0  # seconds a pod may wait for a node (or to be created); 0: forever


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The worker's JSON result summary (docs/interfaces.md #5), or None for anything else (e.g. a log tail)."""
    if not text:
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _true_condition(obj: Mapping[str, Any], *types: str) -> dict[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def _worker_state(pod: Mapping[str, Any]) -> dict[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == CONTAINER:
            return container.get("state") or {}
    return {}


def _seconds(timestamp: str) -> float:
    return calendar.timegm(time.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S"))


def pods_of(job: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Job's pods, oldest first. Labels can be copied onto any pod by anyone who may create pods (in
    any namespace), so a pod counts only when the Job is its controller (by uid) in the Job's namespace:
    a forged pod cannot put its termination message into someone's status."""
    if job is None:
        return []
    meta = job.get("metadata") or {}

    def belongs(pod: Mapping[str, Any]) -> bool:
        pod_meta = pod.get("metadata") or {}
        labels = pod_meta.get("labels") or {}
        job_name = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        return (job_name == meta.get("name") and pod_meta.get("namespace") == meta.get("namespace")
                and meta.get("uid") is not None and names.controller_uid(pod) == meta.get("uid"))

    mine = [p for p in pods if belongs(p)]
    return sorted(mine, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))


def worker_report(job_pods: list[Mapping[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """(parsed summary, raw message) of the newest pod whose worker has terminated."""
    for pod in reversed(job_pods):
        terminated = _worker_state(pod).get("terminated")
        if terminated:
            message = (terminated.get("message") or "").strip()
            return parse_termination_message(message), message
    return None, ""


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _failure(job: Mapping[str, Any], failed: Mapping[str, Any], report: dict | None, raw: str) -> Verdict:
    if report and report.get("exitCode") == 0 and report.get("published") is not False:
        # The worker finished and published before the Job controller stopped it (a deadline that
        # ran out during the pod's exit): the output is there, so the merge did succeed.
        why = failed.get("reason") or "Failed"
        return Verdict("Succeeded", "MergeSucceeded",
                       f"{report.get('message') or 'merged'} (the Job was then marked {why}, after the worker had finished)")
    if failed.get("reason") == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Verdict("Failed", "DeadlineExceeded", f"the merge ran longer than activeDeadlineSeconds={deadline}")
    if report and report.get("message"):
        reason = report.get("reason") if report.get("reason") in WORKER_REASONS else "JobFailed"
        return Verdict("Failed", reason, report["message"])
    # No summary: the worker died early; its log tail (FallbackToLogsOnError) says why.
    why = _last_line(raw) or failed.get("message") or "the merge Job failed"
    return Verdict("Failed", "JobFailed", why)


def judge_job_finished(job: Mapping[str, Any]) -> bool:
    """Whether the Job controller has given the Job its outcome (no new pod will start)."""
    return _true_condition(job, "Complete", "SuccessCriteriaMet", "FailureTarget", "Failed") is not None


def waits_for_node(pod: Mapping[str, Any]) -> bool:
    """A pod the scheduler could not place (yet)."""
    return any(c.get("type") == "PodScheduled" and c.get("status") == "False"
               for c in (pod.get("status") or {}).get("conditions") or [])


# The kubelet cannot build the worker's container: in a merge Job, a Secret its env names (spec.storage.
# credentialsSecret) or a key of it is missing. The kubelet retries; the run fails after the timeout.
CONFIG_ERROR = "CreateContainerConfigError"


def cannot_start(pod: Mapping[str, Any]) -> bool:
    """A pod whose worker container the kubelet cannot create (CreateContainerConfigError)."""
    return (_worker_state(pod).get("waiting") or {}).get("reason") == CONFIG_ERROR


def _config_error_hint(spec: AdapterMergeSpec) -> str:
    """Which Secret the Job's env names (from the spec: the operator never reads Secrets)."""
    secret = spec.storage.credentials_secret if spec.storage else None
    if secret is None:
        return ""
    return (f" (spec.storage.credentialsSecret names Secret {secret!r}: it must exist in the resource's namespace"
            " with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, docs/storage.md)")


def _timed_out(since: str | None, now: str, timeout: int) -> bool:
    return bool(timeout and since) and _seconds(now) - _seconds(since) >= timeout


def _stuck(reason: str, message: str, since: str | None, now: str, facts: Facts) -> Verdict:
    """A pod that cannot be scheduled or created: said at once, Failed after the scheduling timeout."""
    if _timed_out(since, now, facts.scheduling_timeout):
        return Verdict("Failed", reason, f"{message} (for {facts.scheduling_timeout}s; the Job was stopped)")
    return Verdict("Pending", reason, message)


def _ended_attempt(pod: Mapping[str, Any]) -> str:
    """How an ended attempt ended, for the message of the next one."""
    if _true_condition(pod, DISRUPTION):
        condition = _true_condition(pod, DISRUPTION) or {}
        return f"disrupted ({condition.get('reason') or 'evicted'}), not counted as a failure"
    terminated = _worker_state(pod).get("terminated") or {}
    report = parse_termination_message(terminated.get("message"))
    why = (report or {}).get("message") or _last_line(terminated.get("message") or "")
    return f"failed with exit code {terminated.get('exitCode')}" + (f": {why}" if why else "")


def _waiting(job: Mapping[str, Any], job_pods: list[Mapping[str, Any]], spec: AdapterMergeSpec, facts: Facts,
             now: str) -> Verdict:
    """The Job has no verdict yet: where is its current attempt?"""
    if (job.get("spec") or {}).get("suspend") or _true_condition(job, "Suspended"):
        queue = (job.get("metadata") or {}).get("labels", {}).get(names.LABEL_QUEUE)
        where = f" in queue {queue}" if queue else ""
        return Verdict("Pending", "JobPending", f"Job is suspended, waiting for admission{where}")
    if not job_pods and facts.pod_creation_failure:
        message, since = facts.pod_creation_failure
        return _stuck("PodCreationFailed", f"the worker pod cannot be created: {message}", since, now, facts)
    current = job_pods[-1] if job_pods else None
    ended = [p for p in job_pods[:-1]]
    retry = f" (the attempt before {_ended_attempt(ended[-1])})" if ended else ""
    if current is None:
        return Verdict("Pending", "JobPending", "waiting for the worker pod to be created")
    name = current["metadata"]["name"]
    state = _worker_state(current)
    phase = (current.get("status") or {}).get("phase")
    if phase == "Succeeded" or (state.get("terminated") or {}).get("exitCode") == 0:
        # The worker is done; the Job controller has not marked the Job Complete yet.
        return Verdict("Running", "JobRunning", f"worker pod {name} finished, waiting for the Job to complete{retry}")
    if phase == "Failed" or state.get("terminated"):
        return Verdict("Running", "JobRunning", f"worker pod {name} {_ended_attempt(current)}; a retry follows")
    if phase == "Running":
        return Verdict("Running", "JobRunning", f"worker pod {name} is running{retry}")
    waiting = state.get("waiting") or {}
    if waiting.get("reason") == CONFIG_ERROR:
        since = (current.get("status") or {}).get("startTime") or current["metadata"].get("creationTimestamp")
        message = f"worker pod {name} cannot start: {waiting.get('message') or CONFIG_ERROR}{_config_error_hint(spec)}"
        return _stuck(CONFIG_ERROR, message + retry, since, now, facts)
    if waiting.get("reason"):
        text = f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
        return Verdict("Pending", "JobPending", f"worker pod {name}: {text}{retry}")
    for condition in (current.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            why = condition.get("message") or condition.get("reason") or "no node fits"
            message = f"worker pod {name} cannot be scheduled: {why}{retry}"
            return _stuck("Unschedulable", message, condition.get("lastTransitionTime"), now, facts)
    return Verdict("Pending", "JobPending", f"waiting for worker pod {name} to start{retry}")


def judge(
    job: Mapping[str, Any] | None,
    job_pods: list[Mapping[str, Any]],
    spec: AdapterMergeSpec,
    report: dict[str, Any] | None,
    raw: str,
    facts: Facts = Facts(),
    now: str = "",
) -> Verdict:
    """Phase, reason and message for the current run's Job; (report, raw) is worker_report's."""
    if facts.job_rejected:
        return Verdict("Failed", "JobRejected", f"the API server refused the merge Job: {facts.job_rejected}")
    if facts.output_conflict:
        return Verdict("Failed", "OutputConflict", facts.output_conflict)
    if job is None and facts.policy_refusal:
        return Verdict("Failed", POLICY_REASON, facts.policy_refusal)
    if job is None and facts.job_forbidden:
        return Verdict("Pending", "JobForbidden", f"the API server does not allow the merge Job yet, retrying: "
                                                  f"{facts.job_forbidden}")
    if job is None:
        return Verdict("Pending", "JobPending", "creating the merge Job")
    if _true_condition(job, "Complete", "SuccessCriteriaMet"):
        message = (report or {}).get("message") or (
            f"merged {len(spec.adapters)} adapters with {spec.method} into {outputs.describe(spec)}"
        )
        return Verdict("Succeeded", "MergeSucceeded", message)
    # FailureTarget comes first and is already final; Failed follows once every pod has stopped.
    failed = _true_condition(job, "FailureTarget", "Failed")
    if failed:
        return _failure(job, failed, report, raw)
    return _waiting(job, job_pods, spec, facts, now)


def _condition(type_: str, true: bool, verdict: Verdict, generation: int, previous: list[dict], now: str) -> dict:
    status = "True" if true else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    # lastTransitionTime moves only when the condition's status does (metav1.Condition).
    kept = before and before.get("status") == status and before.get("lastTransitionTime")
    return {
        "type": type_,
        "status": status,
        "reason": verdict.reason,
        "message": verdict.message[:1024],
        "lastTransitionTime": before["lastTransitionTime"] if kept else now,
        "observedGeneration": generation,
    }


def conditions(verdict: Verdict, generation: int, previous: list[dict], now: str) -> list[dict[str, Any]]:
    """Ready (True once merged), Reconciling (a run under way), Stalled (the run failed: no retry helps)."""
    return [
        _condition(READY, verdict.phase == "Succeeded", verdict, generation, previous, now),
        _condition(RECONCILING, verdict.phase not in FINISHED_PHASES, verdict, generation, previous, now),
        _condition(STALLED, verdict.phase == "Failed", verdict, generation, previous, now),
    ]


def _result(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    result = {key: report[key] for key in RESULT_KEYS if key in report}
    return result or None


def _output(spec: AdapterMergeSpec, report: dict[str, Any] | None) -> dict[str, Any]:
    """Where the output goes (claimName and path, or uri), its format and rank, and the digest the
    worker reports for an output it pushed (a registry's manifest digest, docs/interfaces.md #5)."""
    if spec.output.uri is not None:
        output: dict[str, Any] = {"uri": spec.output.uri}
    else:
        output = {"claimName": spec.claim_of(spec.output), "path": spec.output.path}
    output |= {"format": spec.output.format, "rank": spec.output.rank}
    if report and isinstance(report.get("rank"), int):
        output["rank"] = report["rank"]  # what was written, when the spec said "auto"
    published = (report or {}).get("output")
    if isinstance(published, dict) and isinstance(published.get("digest"), str):
        output["digest"] = published["digest"]
    return output


def own_status(status: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: status[key] for key in OWN_KEYS if status and key in status}


def is_finished(status: Mapping[str, Any] | None, run: str) -> bool:
    """Whether the run named `run` (names.run_name) already has its verdict (its Job may be gone: TTL)."""
    status = status or {}
    return status.get("jobName") == run and status.get("phase") in FINISHED_PHASES


def _attempt(job_pods: list, previous: Mapping[str, Any], run: str) -> tuple[int, str]:
    """(attempt number, pod name) of the run's newest pod. Counted from the status before, since the
    pods of ended attempts may be gone (an evicted pod is deleted): a new pod name is a new attempt."""
    same_run = previous.get("jobName") == run
    before, before_pod = (previous.get("attempt", 0), previous.get("podName", "")) if same_run else (0, "")
    if not job_pods:
        return before, before_pod
    pod = job_pods[-1]["metadata"]["name"]
    return max(before + (1 if pod != before_pod else 0), len(job_pods)), pod


def desired_status(
    merge: Mapping[str, Any],
    jobs: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    now: str,
    facts: Facts = Facts(),
) -> dict[str, Any]:
    """The operator's part of the resource's status, given its current Jobs and their pods."""
    meta = merge["metadata"]
    generation = meta["generation"]
    previous = own_status(merge.get("status"))
    before = previous.get("conditions") or []
    try:
        spec = parse_spec(dict(merge["spec"]))
    except SpecError as error:
        verdict = Verdict("Failed", "InvalidSpec", f"{error.field}: {error.message}")
        return {
            "phase": verdict.phase,
            "observedGeneration": generation,
            "conditions": conditions(verdict, generation, before, now),
        }
    run = names.run_name(merge)
    # A Job counts only in the resource's own namespace (an owner reference can name any uid).
    job = next((j for j in jobs if j["metadata"]["name"] == run
                and j["metadata"].get("namespace") == meta["namespace"]), None)
    job_pods = pods_of(job, pods)
    report, raw = worker_report(job_pods)
    late_result = report is not None and job is not None and not previous.get("result")
    if is_finished(previous, run) and not late_result:
        # A verdict is final: the Job's TTL or a deleted pod must not turn it back. Only a worker
        # summary that arrives after it (pod and Job events race) is taken in, by judging again.
        return previous
    verdict = judge(job, job_pods, spec, report, raw, facts, now)
    if verdict.phase == "Pending" and previous.get("jobName") == run and previous.get("phase") == "Running":
        # Once a worker started, the run is under way until its verdict: no flapping back to Pending.
        verdict = Verdict("Running", verdict.reason, verdict.message)
    status: dict[str, Any] = {
        "phase": verdict.phase,
        "observedGeneration": generation,
        "jobName": run,
        "output": _output(spec, report),
        "conditions": conditions(verdict, generation, before, now),
    }
    attempt, pod = _attempt(job_pods, previous, run)
    if attempt:
        status["attempt"], status["podName"] = attempt, pod
    job_status = (job or {}).get("status") or {}
    if job_status.get("startTime"):
        status["startTime"] = job_status["startTime"]
    elif previous.get("jobName") == run and previous.get("startTime"):
        status["startTime"] = previous["startTime"]
    if verdict.phase in FINISHED_PHASES:
        finished = _true_condition(job or {}, "Complete", "SuccessCriteriaMet", "FailureTarget", "Failed") or {}
        status["completionTime"] = job_status.get("completionTime") or finished.get("lastTransitionTime") or now
        result = _result(report)
        if result:
            status["result"] = result
    if spec.search is not None:  # progress while the Job runs, then what the search chose
        search = search_status.desired(previous, run, report, verdict.phase in FINISHED_PHASES)
        if search:
            status[search_status.KEY] = search
    return status
