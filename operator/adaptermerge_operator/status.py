"""What an AdapterMerge's status should say, computed from what is observed (API.md, "status").

Pure functions: the resource, its Jobs and their pods go in, the status comes out. Jobs and pods may
be full Kubernetes objects or the slimmed copies the operator's indexes keep (same shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from merge_worker.spec import AdapterMergeSpec, SpecError, parse_spec

from adaptermerge_operator import names
from adaptermerge_operator.job_manifest import CONTAINER

READY = "Ready"
FINISHED_PHASES = ("Succeeded", "Failed")
# The status keys the operator owns; everything else in status (kopf's bookkeeping) is left alone.
OWN_KEYS = ("phase", "observedGeneration", "jobName", "startTime", "completionTime", "output", "result", "conditions")
# Result-summary keys (docs/interfaces.md #5) that go to status.result; message and output go elsewhere.
RESULT_KEYS = ("seconds", "modules", "maxReconstructionError", "rank", "retention", "exitCode")
# Worker reasons kept as the condition's reason; any other failure reads JobFailed.
POLICY_REASON = "PolicyViolation"  # the tenant policy refused the spec: no Job
WORKER_REASONS = ("InvalidSpec", "RetentionBelowThreshold")


@dataclass(frozen=True)
class Verdict:
    phase: str
    reason: str
    message: str


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The worker's JSON result summary (docs/interfaces.md #5), or None for anything else (e.g. a log tail)."""
    if not text:
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _true_condition(job: Mapping[str, Any], *types: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def _worker_state(pod: Mapping[str, Any]) -> dict[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == CONTAINER:
            return container.get("state") or {}
    return {}


def pods_of(job_name: str, pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Job's pods, oldest first."""
    def job_of(pod: Mapping[str, Any]) -> str | None:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        return labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")

    mine = [p for p in pods if job_of(p) == job_name]
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
    if failed.get("reason") == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Verdict("Failed", "DeadlineExceeded", f"the merge ran longer than activeDeadlineSeconds={deadline}")
    if report and report.get("message"):
        reason = report.get("reason") if report.get("reason") in WORKER_REASONS else "JobFailed"
        return Verdict("Failed", reason, report["message"])
    # No summary: the worker died early; its log tail (FallbackToLogsOnError) says why.
    why = _last_line(raw) or failed.get("message") or "the merge Job failed"
    return Verdict("Failed", "JobFailed", why)


def _waiting(job: Mapping[str, Any], job_pods: list[Mapping[str, Any]]) -> Verdict:
    if (job.get("spec") or {}).get("suspend") or _true_condition(job, "Suspended"):
        queue = (job.get("metadata") or {}).get("labels", {}).get(names.LABEL_QUEUE)
        where = f" in queue {queue}" if queue else ""
        return Verdict("Pending", "JobPending", f"Job is suspended, waiting for admission{where}")
    live = [p for p in job_pods if not p["metadata"].get("deletionTimestamp")]
    attempt = len(job_pods)
    retry = f" (attempt {attempt})" if attempt > 1 else ""
    for pod in reversed(live):
        status = pod.get("status") or {}
        if status.get("phase") == "Running":
            return Verdict("Running", "JobRunning", f"worker pod {pod['metadata']['name']} is running{retry}")
        waiting = _worker_state(pod).get("waiting") or {}
        if waiting.get("reason"):
            return Verdict("Pending", "JobPending", f"{waiting['reason']}: {waiting.get('message', '')}".strip(": "))
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return Verdict("Pending", "JobPending", condition.get("message") or condition.get("reason", ""))
    return Verdict("Pending", "JobPending", "waiting for the worker pod to start")


def judge(
    job: Mapping[str, Any] | None,
    job_pods: list[Mapping[str, Any]],
    spec: AdapterMergeSpec,
    report: dict[str, Any] | None,
    raw: str,
) -> Verdict:
    """Phase, reason and message for the current generation's Job; (report, raw) is worker_report's."""
    if job is None:
        return Verdict("Pending", "JobPending", "creating the merge Job")
    if _true_condition(job, "Complete", "SuccessCriteriaMet"):
        message = (report or {}).get("message") or (
            f"merged {len(spec.adapters)} adapters with {spec.method} into "
            f"{spec.claim_of(spec.output)}:{spec.output.path}"
        )
        return Verdict("Succeeded", "MergeSucceeded", message)
    # FailureTarget comes first and is already final; Failed follows once every pod has stopped.
    failed = _true_condition(job, "FailureTarget", "Failed")
    if failed:
        return _failure(job, failed, report, raw)
    return _waiting(job, job_pods)


def _ready_condition(verdict: Verdict, generation: int, previous: list[dict], now: str) -> dict[str, Any]:
    status = "True" if verdict.phase == "Succeeded" else "False"
    before = next((c for c in previous if c.get("type") == READY), None)
    # lastTransitionTime moves only when the condition's status does (metav1.Condition).
    since = before["lastTransitionTime"] if before and before.get("status") == status and before.get("lastTransitionTime") else now
    return {
        "type": READY,
        "status": status,
        "reason": verdict.reason,
        "message": verdict.message[:1024],
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _result(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    result = {key: report[key] for key in RESULT_KEYS if key in report}
    return result or None


def _output(spec: AdapterMergeSpec, report: dict[str, Any] | None) -> dict[str, Any]:
    output = {
        "claimName": spec.claim_of(spec.output),
        "path": spec.output.path,
        "format": spec.output.format,
        "rank": spec.output.rank,
    }
    if report and isinstance(report.get("rank"), int):
        output["rank"] = report["rank"]  # what was written, when the spec said "auto"
    return output


def own_status(status: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: status[key] for key in OWN_KEYS if status and key in status}


def is_refused(status: Mapping[str, Any] | None) -> bool:
    """Whether the verdict is a tenant-policy refusal (looked at again: the policy may change)."""
    conditions = (status or {}).get("conditions") or []
    return any(c.get("type") == READY and c.get("reason") == POLICY_REASON for c in conditions)


def is_finished(status: Mapping[str, Any] | None, generation: int) -> bool:
    """Whether this generation's merge already has its verdict (its Job may since be gone: TTL)."""
    status = status or {}
    return status.get("observedGeneration") == generation and status.get("phase") in FINISHED_PHASES


def _no_job(verdict: Verdict, generation: int, conditions: list[dict], now: str) -> dict[str, Any]:
    """The status of a generation that gets no Job (invalid spec, refused by the tenant policy)."""
    return {
        "phase": verdict.phase,
        "observedGeneration": generation,
        "conditions": [_ready_condition(verdict, generation, conditions, now)],
    }


def desired_status(
    merge: Mapping[str, Any],
    jobs: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    now: str,
    refusal: str | None = None,
) -> dict[str, Any]:
    """The operator's part of the resource's status, given its current Jobs and their pods, and why
    the tenant policy refuses the spec (refusal; it matters only while no Job exists)."""
    meta = merge["metadata"]
    generation = meta["generation"]
    previous = own_status(merge.get("status"))
    conditions = previous.get("conditions") or []
    try:
        spec = parse_spec(dict(merge["spec"]))
    except SpecError as error:
        return _no_job(Verdict("Failed", "InvalidSpec", f"{error.field}: {error.message}"), generation, conditions, now)
    job_name = names.job_name(meta["name"], generation)
    job = next((j for j in jobs if j["metadata"]["name"] == job_name), None)
    if refusal is not None and job is None:
        return _no_job(Verdict("Failed", POLICY_REASON, refusal), generation, conditions, now)
    job_pods = pods_of(job_name, pods)
    report, raw = worker_report(job_pods)
    late_result = report is not None and job is not None and not previous.get("result")
    if is_finished(previous, generation) and previous.get("jobName") == job_name and not late_result:
        # A verdict is final: the Job's TTL or a deleted pod must not turn it back. Only a worker
        # summary that arrives after it (pod and Job events race) is taken in, by judging again.
        return previous
    verdict = judge(job, job_pods, spec, report, raw)
    status: dict[str, Any] = {
        "phase": verdict.phase,
        "observedGeneration": generation,
        "jobName": job_name,
        "output": _output(spec, report),
        "conditions": [_ready_condition(verdict, generation, conditions, now)],
    }
    job_status = (job or {}).get("status") or {}
    if job_status.get("startTime"):
        status["startTime"] = job_status["startTime"]
    if verdict.phase in FINISHED_PHASES:
        finished = _true_condition(job, "Complete", "SuccessCriteriaMet", "FailureTarget", "Failed") or {}
        completion = job_status.get("completionTime") or finished.get("lastTransitionTime") or now
        status["completionTime"] = completion
        result = _result(report)
        if result:
            status["result"] = result
    return status
