"""What the handlers do: make the current run's Job exist (once), retire older runs, keep the
resource's status in step with what its Job and pods report, and keep each Job until its verdict is in
the status.

Never a second Job for one run: the Job's name is fixed by (name, generation, rerun token); it is
looked up in the index before creating, and AlreadyExists on create means "adopt it" (after checking it
is ours). Never a second run after a verdict: each Job carries the finalizer names.FINALIZER, which the
operator removes only once the Job's outcome is in the status, so a Job that finishes and is deleted
(TTL, kubectl) while the operator is away is still there, with its verdict, when it comes back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import kopf

from merge_worker.spec import SpecError, parse_spec

from adaptermerge_operator import job_manifest, metrics, names, outputs, policy, status
from adaptermerge_operator.kube import AlreadyExists, Conflict, Forbidden, KubeApi, Rejected
from adaptermerge_operator.settings import Settings

# Status updates retried on a conflicting write before giving up until the next event.
MAX_CONFLICTS = 8
# Seconds between attempts to create a Job the API server forbids for now (e.g. a full ResourceQuota).
FORBIDDEN_RETRY_SECONDS = 15

log = logging.getLogger(__name__)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Context:
    """What every action needs: the API, the settings and a view of the indexes (uid -> Jobs and pods,
    namespace -> output claims)."""

    api: KubeApi
    settings: Settings
    jobs: Mapping[str, Iterable[Mapping[str, Any]]]
    pods: Mapping[str, Iterable[Mapping[str, Any]]]
    outputs: Mapping[str, Iterable[outputs.OutputClaim]] = field(default_factory=dict)

    def jobs_of(self, merge: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The resource's Jobs: indexed by the uid they name, kept only in the resource's namespace."""
        return self._in_namespace(self.jobs, merge)

    def pods_of(self, merge: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return self._in_namespace(self.pods, merge)

    @staticmethod
    def _in_namespace(index: Mapping[str, Iterable[Mapping[str, Any]]], merge: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        meta = merge["metadata"]
        return [o for o in index.get(meta["uid"], ()) if o["metadata"].get("namespace") == meta["namespace"]]

    def run_job(self, merge: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The current run's Job, if the index has it."""
        run = names.run_name(merge)
        return next((j for j in self.jobs_of(merge) if j["metadata"]["name"] == run), None)


async def _create_owned(ctx: Context, obj: dict[str, Any], uid: str) -> bool:
    """Creates obj; True if created, False if it already existed and is ours (adopted)."""
    try:
        await ctx.api.run(ctx.api.create, obj)
        return True
    except AlreadyExists:
        meta = obj["metadata"]
        existing = await ctx.api.run(ctx.api.get, obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted in between (a superseded one finishing its deletion)
            raise kopf.TemporaryError(f"{obj['kind']} {meta['name']} is being deleted; retrying", delay=2)
        if names.controller_uid(existing) != uid:  # an owner reference without controller is not enough
            raise kopf.TemporaryError(
                f"{obj['kind']} {meta['name']} exists and does not belong to this AdapterMerge", delay=30
            ) from None
        return False


async def retire_superseded(ctx: Context, merge: Mapping[str, Any]) -> None:
    """Deletes the Jobs (and their pods and ConfigMaps) of every run but the current one."""
    meta = merge["metadata"]
    run = names.run_name(merge)
    for job in ctx.jobs_of(merge):
        name = job["metadata"]["name"]
        if name == run or job["metadata"].get("deletionTimestamp"):
            continue
        deleted = await ctx.api.run(ctx.api.delete, "Job", meta["namespace"], name)
        await ctx.api.run(ctx.api.delete, "ConfigMap", meta["namespace"], name)
        if deleted:
            kopf.event(
                merge, type="Normal", reason="Superseded",
                message=f"deleted Job {name}: run {run} (generation {meta['generation']}) replaces it",
            )


async def _policy_refusal(ctx: Context, merge: Mapping[str, Any], spec: Any) -> str:
    """Why the tenant policy refuses this spec (docs/install.md "Tenant policy"), or ""."""
    meta, rules = merge["metadata"], ctx.settings.policy
    labels = {}
    if rules.enabled and rules.claims.match_labels:
        for claim in spec.claims():
            labels[claim] = await ctx.api.run(ctx.api.claim_labels, meta["namespace"], claim)
    return "; ".join(policy.violations(rules, spec, labels))


async def ensure_job(ctx: Context, merge: dict[str, Any]) -> bool:
    """Makes the current run's ConfigMap and Job exist (created here, or adopted), unless the spec is
    invalid, the output is another resource's, the tenant policy refuses it, or this run already has
    its verdict (its Job may be gone since: TTL). True when the Job exists, so its own events keep the status up to date."""
    meta = merge["metadata"]
    run = names.run_name(merge)
    if meta.get("deletionTimestamp") or status.is_finished(merge.get("status"), run):
        return False
    try:
        spec = parse_spec(dict(merge["spec"]))
    except SpecError:
        return False  # refresh_status reports it; retrying cannot fix a spec
    adopted = ctx.run_job(merge)
    if adopted is not None:  # it already runs (e.g. the operator restarted mid-merge)
        job_meta = adopted["metadata"]
        if names.FINALIZER not in (job_meta.get("finalizers") or []) and not job_meta.get("deletionTimestamp"):
            # A Job made before the operator used finalizers (an upgrade): hold it like the others.
            await ctx.api.run(ctx.api.add_job_finalizer, meta["namespace"], job_meta["name"], names.FINALIZER)
        return True
    mine = outputs.claim(merge)
    conflict = outputs.conflict(mine, outputs.everyone(ctx.outputs)) if mine else ""
    if conflict:
        await refresh_status(ctx, meta["namespace"], meta["name"], meta["uid"], status.Facts(output_conflict=conflict))
        return False
    refusal = await _policy_refusal(ctx, merge, spec)
    if refusal:
        await refresh_status(ctx, meta["namespace"], meta["name"], meta["uid"], status.Facts(policy_refusal=refusal))
        return False
    job = job_manifest.render_job(merge, spec, ctx.settings)
    job["metadata"]["finalizers"] = [names.FINALIZER]
    try:
        await _create_owned(ctx, job_manifest.render_configmap(merge), meta["uid"])
        created = await _create_owned(ctx, job, meta["uid"])
    except Rejected as refused:
        # The spec passed the CRD but the Job does not pass the API (a quantity, a label, a toleration):
        # final, like an invalid spec. No ConfigMap is left behind.
        await ctx.api.run(ctx.api.delete, "ConfigMap", meta["namespace"], run)
        facts = status.Facts(job_rejected=str(refused))
        await refresh_status(ctx, meta["namespace"], meta["name"], meta["uid"], facts)
        return False
    except Forbidden as forbidden:
        # Not final (a quota may free up): say so in the status and let kopf retry the handler.
        facts = status.Facts(job_forbidden=str(forbidden))
        await refresh_status(ctx, meta["namespace"], meta["name"], meta["uid"], facts)
        raise kopf.TemporaryError(f"creating Job {run}: {forbidden}", delay=FORBIDDEN_RETRY_SECONDS) from None
    if created:
        metrics.count_job_created(meta["namespace"])
        kopf.event(merge, type="Normal", reason="JobCreated", message=f"created Job {run}")
    return True


async def refresh_status(
    ctx: Context, namespace: str, name: str, uid: str, facts: status.Facts | None = None
) -> bool:
    """Writes the status that the resource's current Job and pods call for, if it differs. True once
    the status is current (or the resource is gone), False if every write conflicted.

    Read-compute-write with the resourceVersion as precondition. The indexes are read after the
    resource, so a writer that wrote in between makes our write conflict and we start over; one that
    wrote before saw an older index than ours. Either way the last write reflects the newest facts.
    """
    facts = dataclasses.replace(facts or status.Facts(), scheduling_timeout=ctx.settings.scheduling_timeout)
    for _ in range(MAX_CONFLICTS):
        merge = await ctx.api.run(ctx.api.get_merge, namespace, name)
        if merge is None or merge["metadata"]["uid"] != uid:
            return True  # deleted (or replaced by a new resource of that name, which has its own events)
        observed_at = now()
        desired = status.desired_status(merge, ctx.jobs_of(merge), ctx.pods_of(merge), observed_at, facts)
        previous = status.own_status(merge.get("status"))
        if desired != previous:
            kept = {k: v for k, v in (merge.get("status") or {}).items() if k not in status.OWN_KEYS}
            merge["status"] = {**kept, **desired}
            try:
                await ctx.api.run(ctx.api.replace_merge_status, merge)
            except Conflict:
                continue
            _announce(merge, previous, desired)
            metrics.observe_status_change(previous, desired, ctx.run_job(merge), observed_at)
        await _stop_after_verdict(ctx, merge, desired)
        return True
    log.warning("status of %s/%s: gave up after %d conflicting writes", namespace, name, MAX_CONFLICTS)
    return False


async def _stop_after_verdict(ctx: Context, merge: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
    """A run the operator failed itself (a pod that never got a node, or was never created) must not
    start later: its Job is deleted."""
    job = ctx.run_job(merge)
    if desired.get("phase") != "Failed" or job is None or job["metadata"].get("deletionTimestamp"):
        return
    if status.judge_job_finished(job):
        return
    if await ctx.api.run(ctx.api.delete, "Job", merge["metadata"]["namespace"], job["metadata"]["name"]):
        log.info("deleted Job %s: its run failed before a worker started", job["metadata"]["name"])


async def release_job(ctx: Context, job: Mapping[str, Any]) -> None:
    """Lets a deleted Job go once its owner's status holds its verdict (or it has no owner left)."""
    meta = job["metadata"]
    namespace, owner, uid = meta["namespace"], meta["annotations"][names.ANNOTATION_OWNER], meta["labels"][names.LABEL_UID]
    if await refresh_status(ctx, namespace, owner, uid):
        await ctx.api.run(ctx.api.remove_job_finalizer, namespace, meta["name"], names.FINALIZER)


async def check_stuck_run(ctx: Context, merge: Mapping[str, Any]) -> None:
    """Periodic check of a run that has not finished: a Job that cannot create its pod reports it only
    in FailedCreate events, and a pod waiting for a node (or whose container cannot be created: a missing
    Secret) fails only when time passes."""
    job = ctx.run_job(merge)
    if job is None or (job.get("spec") or {}).get("suspend") or status.judge_job_finished(job):
        return
    meta = merge["metadata"]
    job_pods = status.pods_of(job, ctx.pods_of(merge))
    facts = status.Facts()
    if not job_pods and job["metadata"].get("uid"):
        events = await ctx.api.run(ctx.api.pod_creation_failures, meta["namespace"], job["metadata"]["uid"])
        if events:
            since = min(e.get("firstTimestamp") or e.get("eventTime") or e["metadata"]["creationTimestamp"] for e in events)
            latest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            facts = status.Facts(pod_creation_failure=(latest.get("message") or "FailedCreate", since))
    elif not any(status.waits_for_node(p) or status.cannot_start(p) for p in job_pods[-1:]):
        return  # a pod that runs or starts: its own events drive the status
    await refresh_status(ctx, meta["namespace"], meta["name"], meta["uid"], facts)


def _ready(status_: Mapping[str, Any]) -> Mapping[str, Any]:
    return next((c for c in status_.get("conditions") or [] if c.get("type") == status.READY), {})


def _announce(merge: Mapping[str, Any], previous: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
    """A Kubernetes event for each transition (phase or reason) and each retry, not for every status write."""
    before, after = _ready(previous), _ready(desired)
    same_run = previous.get("jobName") == desired.get("jobName")
    if same_run and desired.get("attempt", 0) > max(previous.get("attempt", 0), 1):
        kopf.event(merge, type="Normal", reason="Retrying",
                   message=f"attempt {desired['attempt']} of Job {desired.get('jobName')}: {after.get('message', '')}")
    if (previous.get("phase"), before.get("reason")) == (desired.get("phase"), after.get("reason")):
        return
    kind = "Warning" if desired.get("phase") == "Failed" else "Normal"
    kopf.event(merge, type=kind, reason=after.get("reason", ""), message=after.get("message", ""))
