"""Progress of a running search in `status.search` (docs/operator.md, "Search"): trial k of n and the
best candidate so far, while the Job runs.

The worker pod has no API token (it writes volumes, nothing else), so it cannot report to the API
itself; it prints one strict single-line JSON marker per trial instead (merge_worker/search/progress.py).
On a timer the operator reads the last lines of the current run's worker pod log (pods/log with
tailLines and limitBytes: one bounded read, no watch held open) and writes the last valid marker into
status.search. What it trusts: the pod is the run's Job's own (controller reference by uid, as for the
termination message), and only a whole line that parses as the bounded marker model counts; anything
else in the log is ignored. The final status.search comes from the worker's summary (search_status.py).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from merge_worker.search.progress import MAX_LINE, last_progress

from adaptermerge_operator import names, search_status, status
from adaptermerge_operator.job_manifest import CONTAINER
from adaptermerge_operator.kube import Conflict

INTERVAL_SECONDS = 5
TAIL_LINES = 40  # a trial prints two lines; after the search the final merge prints a dozen more
LIMIT_BYTES = TAIL_LINES * MAX_LINE

log = logging.getLogger(__name__)


def wanted(spec: Mapping[str, Any], status: Mapping[str, Any], **_: Any) -> bool:
    """The timer's filter: a search whose run has a worker under way."""
    return bool((spec or {}).get("search")) and (status or {}).get("phase") == "Running"


async def refresh(ctx: Any, merge: Mapping[str, Any]) -> None:
    """Reads the current worker pod's log tail and writes its last progress marker, if newer."""
    job = ctx.run_job(merge)
    if job is None or status.judge_job_finished(job):
        return
    pods = status.pods_of(job, ctx.pods_of(merge))
    if not pods or (pods[-1].get("status") or {}).get("phase") != "Running":
        return
    meta, pod = merge["metadata"], pods[-1]["metadata"]["name"]
    tail = await ctx.api.run(ctx.api.pod_log_tail, meta["namespace"], pod, CONTAINER, TAIL_LINES, LIMIT_BYTES)
    progress = last_progress(tail)
    if progress is None:
        return
    wanted_search = search_status.from_progress(progress)
    current = await ctx.api.run(ctx.api.get_merge, meta["namespace"], meta["name"])
    if current is None or current["metadata"]["uid"] != meta["uid"]:
        return
    now = current.get("status") or {}
    if (now.get("jobName") != job["metadata"]["name"] or names.run_name(current) != job["metadata"]["name"]
            or now.get("phase") != "Running" or now.get(search_status.KEY) == wanted_search):
        return  # another run, a verdict already in, or nothing new
    current["status"] = {**now, search_status.KEY: wanted_search}
    try:  # conditional on the resourceVersion just read: a verdict written meanwhile wins
        await ctx.api.run(ctx.api.replace_merge_status, current)
    except Conflict:
        log.debug("progress of %s/%s: the status changed meanwhile; the next tick retries", meta["namespace"], meta["name"])
