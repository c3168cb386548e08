"""What the handlers do: make the current generation's Job exist (once), retire older ones, and keep
the resource's status in step with what its Job and pods report.

Never a second Job: the Job's name is fixed by (name, generation); it is looked up in the index
before creating, and AlreadyExists on create means "adopt it" (after checking it is ours).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import kopf

from merge_worker.spec import SpecError, parse_spec

from adaptermerge_operator import job_manifest, metrics, names, policy, status
from adaptermerge_operator.kube import AlreadyExists, Conflict, KubeApi
from adaptermerge_operator.settings import Settings

# Status updates retried on a conflicting write before giving up until the next event.
MAX_CONFLICTS = 8

log = logging.getLogger(__name__)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Context:
    """What every action needs: the API, the settings and a view of the indexes (uid -> objects)."""

    api: KubeApi
    settings: Settings
    jobs: Mapping[str, Iterable[Mapping[str, Any]]]
    pods: Mapping[str, Iterable[Mapping[str, Any]]]
    # uid -> (generation, why the tenant policy refuses it, or None); kept across handler calls.
    refusals: dict[str, tuple[int, str | None]] = field(default_factory=dict)

    def jobs_of(self, uid: str) -> list[Mapping[str, Any]]:
        return list(self.jobs.get(uid, ()))

    def refusal_of(self, uid: str, generation: int) -> str | None:
        refused_generation, why = self.refusals.get(uid, (None, None))
        return why if refused_generation == generation else None

    def pods_of(self, uid: str) -> list[Mapping[str, Any]]:
        return list(self.pods.get(uid, ()))


def _generation_of(obj: Mapping[str, Any]) -> int | None:
    value = obj["metadata"].get("labels", {}).get(names.LABEL_GENERATION, "")
    return int(value) if value.isdigit() else None


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
    """Deletes the Jobs (and their pods and ConfigMaps) of every generation but the current one."""
    meta = merge["metadata"]
    for job in ctx.jobs_of(meta["uid"]):
        generation = _generation_of(job)
        if generation == meta["generation"] or job["metadata"].get("deletionTimestamp"):
            continue
        name = job["metadata"]["name"]
        deleted = await ctx.api.run(ctx.api.delete, "Job", meta["namespace"], name)
        await ctx.api.run(ctx.api.delete, "ConfigMap", meta["namespace"], name)
        if deleted:
            kopf.event(
                merge, type="Normal", reason="Superseded",
                message=f"deleted Job {name} of generation {generation}: generation {meta['generation']} replaces it",
            )


async def _policy_refusal(ctx: Context, merge: Mapping[str, Any], spec: Any) -> str | None:
    """Why the tenant policy refuses this spec (docs/install.md "Tenant policy"), or None."""
    meta, rules = merge["metadata"], ctx.settings.policy
    labels = {}
    if rules.enabled and rules.claims.match_labels:
        for claim in spec.claims():
            labels[claim] = await ctx.api.run(ctx.api.claim_labels, meta["namespace"], claim)
    found = policy.violations(rules, spec, labels)
    return "; ".join(found) if found else None


async def ensure_job(ctx: Context, merge: dict[str, Any]) -> bool:
    """Makes the current generation's ConfigMap and Job exist (created here, or adopted), unless the
    spec is invalid, the tenant policy refuses it, or this generation already has its verdict (its
    Job may be gone since: TTL). A policy refusal is looked at again (the policy may have changed).
    True when the Job exists, so its own events will keep the status up to date."""
    meta = merge["metadata"]
    finished = status.is_finished(merge.get("status"), meta["generation"])
    if meta.get("deletionTimestamp") or (finished and not status.is_refused(merge.get("status"))):
        return False
    try:
        spec = parse_spec(dict(merge["spec"]))
    except SpecError:
        return False  # refresh_status reports it; retrying cannot fix a spec
    job = job_manifest.render_job(merge, spec, ctx.settings)
    if any(j["metadata"]["name"] == job["metadata"]["name"] for j in ctx.jobs_of(meta["uid"])):
        return True  # adopted: it already runs (e.g. the operator restarted mid-merge)
    refusal = await _policy_refusal(ctx, merge, spec)
    ctx.refusals[meta["uid"]] = (meta["generation"], refusal)
    if refusal:
        return False  # refresh_status reports it
    await _create_owned(ctx, job_manifest.render_configmap(merge), meta["uid"])
    if await _create_owned(ctx, job, meta["uid"]):
        metrics.count_job_created(meta["namespace"])
        kopf.event(merge, type="Normal", reason="JobCreated", message=f"created Job {job['metadata']['name']}")
    return True


async def refresh_status(ctx: Context, namespace: str, name: str, uid: str) -> None:
    """Writes the status that the resource's current Job and pods call for, if it differs.

    Read-compute-write with the resourceVersion as precondition. The indexes are read after the
    resource, so a writer that wrote in between makes our write conflict and we start over; one that
    wrote before saw an older index than ours. Either way the last write reflects the newest facts.
    """
    for _ in range(MAX_CONFLICTS):
        merge = await ctx.api.run(ctx.api.get_merge, namespace, name)
        if merge is None or merge["metadata"]["uid"] != uid:
            return  # deleted (or replaced by a new resource of that name, which has its own events)
        observed_at = now()
        refusal = ctx.refusal_of(uid, merge["metadata"]["generation"])
        desired = status.desired_status(merge, ctx.jobs_of(uid), ctx.pods_of(uid), observed_at, refusal=refusal)
        previous = status.own_status(merge.get("status"))
        if desired == previous:
            return
        kept = {k: v for k, v in (merge.get("status") or {}).items() if k not in status.OWN_KEYS}
        merge["status"] = {**kept, **desired}
        try:
            await ctx.api.run(ctx.api.replace_merge_status, merge)
        except Conflict:
            continue
        _announce(merge, previous, desired)
        job = next((j for j in ctx.jobs_of(uid) if j["metadata"]["name"] == desired.get("jobName")), None)
        metrics.observe_status_change(previous, desired, job, observed_at)
        return
    log.warning("status of %s/%s: gave up after %d conflicting writes", namespace, name, MAX_CONFLICTS)


def _ready(status_: Mapping[str, Any]) -> Mapping[str, Any]:
    return next((c for c in status_.get("conditions") or [] if c.get("type") == status.READY), {})


def _announce(merge: Mapping[str, Any], previous: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
    """A Kubernetes event for each transition (phase or reason), not for every status write."""
    before, after = _ready(previous), _ready(desired)
    if (previous.get("phase"), before.get("reason")) == (desired.get("phase"), after.get("reason")):
        return
    kind = "Warning" if desired.get("phase") == "Failed" else "Normal"
    kopf.event(merge, type=kind, reason=after.get("reason", ""), message=after.get("message", ""))
