"""kopf handlers: the AdapterMerge lifecycle, and the Job/pod events that drive its status.

- create / update of spec or of the rerun annotation / resume (operator start): retire older runs'
  Jobs, then make sure the current run's Job exists (or adopt it).
- any event of a Job or pod the operator owns: recompute the owner's status; a deleted Job is let go
  (its finalizer removed) once its verdict is in the status.
- a timer on unfinished merges: pods that cannot be created or scheduled, and the scheduling timeout.
- a timer on running searches: their progress from the worker pod's log (search_progress.py).
Jobs, pods and every resource's output are kept in in-memory indexes (kopf fills them before any
handler runs), so adoption after a restart and status computation need no extra API reads.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from typing import Any

import kopf

from merge_worker import spec as specs

from adaptermerge_operator import metrics, names, outputs, reconcile, search_progress
from adaptermerge_operator.kube import KubeApi, load_client_config
from adaptermerge_operator.settings import Settings
from adaptermerge_operator.status import FINISHED_PHASES
from adaptermerge_operator.slim import slim_job, slim_pod

MERGES = (specs.API_GROUP, specs.API_VERSION, specs.PLURAL)
WATCHED_BY_LABEL = (("batch", "v1", "jobs"), ("", "v1", "pods"))
OWNED = {names.LABEL_UID: kopf.PRESENT}
HAS_OWNER = {names.ANNOTATION_OWNER: kopf.PRESENT}
# How often unfinished merges are checked for pods that cannot be created or scheduled.
STUCK_CHECK_SECONDS = 5


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, merge_verdicts: kopf.Index, **_: Any
) -> None:
    # kopf posts an event per handler run at INFO; only our own transition events are worth keeping.
    settings.posting.level = logging.WARNING
    # Events say who wrote them: `kubectl describe` shows "From adaptermerge", not kopf's defaults.
    settings.posting.reporting_component = names.EVENT_COMPONENT
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.posting.event_name_prefix = f"{names.EVENT_COMPONENT}-"
    # The API server sends only our Jobs and pods: kopf's `labels=` filters are client-side, so
    # without this every pod and Job of the cluster would be streamed to (and parsed by) the operator.
    for resource in WATCHED_BY_LABEL:
        settings.watching.label_selectors[resource] = names.LABEL_UID
    settings.execution.max_workers = 2  # all handlers are async; API calls use KubeApi's own pool
    memo.settings = Settings.from_env()
    memo.api = KubeApi(load_client_config())
    if memo.settings.metrics_port:
        metrics.serve(memo.settings.metrics_port, merge_verdicts)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    memo.api.close()


@kopf.index(*MERGES)
def merge_verdicts(body: kopf.Body, namespace: str, uid: str, **_: Any) -> dict[Any, str]:
    """(namespace, phase, reason) -> uids: what adaptermerge_merges counts at scrape time."""
    return {metrics.verdict_key(namespace, body.get("status")): uid}


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def merge_jobs(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
    # Labels can be copied by anyone who may create Jobs; the controller reference is set by us.
    uid = labels[names.LABEL_UID]
    return {uid: slim_job(body)} if names.controller_uid(body) == uid else {}


@kopf.index("", "v1", "pods", labels=OWNED)
def merge_pods(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
    return {labels[names.LABEL_UID]: slim_pod(body)}


@kopf.index(*MERGES)
def merge_outputs(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Any] | None:
    claim = outputs.claim(body)
    return {namespace: claim} if claim else None


def _context(memo: kopf.Memo, merge_jobs: kopf.Index, merge_pods: kopf.Index, merge_outputs: kopf.Index) -> reconcile.Context:
    return reconcile.Context(api=memo.api, settings=memo.settings, jobs=merge_jobs, pods=merge_pods,
                             outputs=merge_outputs)


def _owner_of(body: kopf.Body) -> tuple[str, str, str]:
    """(namespace, name, uid) of the AdapterMerge that a Job or pod belongs to."""
    meta = body.metadata
    return meta.namespace, meta.annotations[names.ANNOTATION_OWNER], meta.labels[names.LABEL_UID]


def _plain(body: kopf.Body) -> dict[str, Any]:
    """A mutable copy of kopf's read-only body view."""
    return copy.deepcopy(dict(body))


@kopf.on.resume(*MERGES)
@kopf.on.create(*MERGES)
@kopf.on.update(*MERGES, field="spec")
@kopf.on.update(*MERGES, field=("metadata", "annotations", names.ANNOTATION_RERUN))
@metrics.timed("merge")
async def reconcile_merge(
    body: kopf.Body, memo: kopf.Memo, merge_jobs: kopf.Index, merge_pods: kopf.Index, merge_outputs: kopf.Index,
    **_: Any,
) -> None:
    ctx = _context(memo, merge_jobs, merge_pods, merge_outputs)
    merge = _plain(body)
    await reconcile.retire_superseded(ctx, merge)
    if not await reconcile.ensure_job(ctx, merge):
        # Invalid specs and finished merges get no Job event to trigger their status: write it here.
        meta = merge["metadata"]
        await reconcile.refresh_status(ctx, meta["namespace"], meta["name"], meta["uid"])


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in FINISHED_PHASES


@kopf.timer(*MERGES, interval=STUCK_CHECK_SECONDS, when=_unfinished)
async def check_stuck(
    body: kopf.Body, memo: kopf.Memo, merge_jobs: kopf.Index, merge_pods: kopf.Index, merge_outputs: kopf.Index,
    **_: Any,
) -> None:
    await reconcile.check_stuck_run(_context(memo, merge_jobs, merge_pods, merge_outputs), _plain(body))


@kopf.timer(*MERGES, interval=search_progress.INTERVAL_SECONDS, when=search_progress.wanted)
async def search_progress_timer(
    body: kopf.Body, memo: kopf.Memo, merge_jobs: kopf.Index, merge_pods: kopf.Index, merge_outputs: kopf.Index,
    **_: Any,
) -> None:
    await search_progress.refresh(_context(memo, merge_jobs, merge_pods, merge_outputs), _plain(body))


@kopf.on.event("batch", "v1", "jobs", labels=OWNED, annotations=HAS_OWNER)
@metrics.timed("job")
async def job_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, merge_jobs: kopf.Index, merge_pods: kopf.Index,
    merge_outputs: kopf.Index, **_: Any,
) -> None:
    ctx = _context(memo, merge_jobs, merge_pods, merge_outputs)
    namespace, owner, uid = _owner_of(body)
    if body.metadata.deletion_timestamp and names.FINALIZER in (body.metadata.get("finalizers") or []):
        await reconcile.release_job(ctx, _plain(body))
        return
    if type == "DELETED":
        # Someone deleted the current run's Job before its verdict: run it again.
        merge = await ctx.api.run(ctx.api.get_merge, namespace, owner)
        if merge is not None and merge["metadata"]["uid"] == uid:
            await reconcile.ensure_job(ctx, merge)
    await reconcile.refresh_status(ctx, namespace, owner, uid)


@kopf.on.event("", "v1", "pods", labels=OWNED, annotations=HAS_OWNER)
@metrics.timed("pod")
async def pod_event(
    body: kopf.Body, memo: kopf.Memo, merge_jobs: kopf.Index, merge_pods: kopf.Index, merge_outputs: kopf.Index,
    **_: Any,
) -> None:
    await reconcile.refresh_status(_context(memo, merge_jobs, merge_pods, merge_outputs), *_owner_of(body))
