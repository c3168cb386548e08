"""Slim copies of Jobs and pods for the operator's in-memory indexes.

Only what status.py reads is kept, in the objects' own shape: with hundreds of merges the indexes
would otherwise hold every pod's full spec.
"""

from __future__ import annotations

from typing import Any, Mapping

_META = ("name", "namespace", "uid", "labels", "ownerReferences", "creationTimestamp", "deletionTimestamp", "finalizers")
# Pod conditions status.py reads: why a pod waits for a node, and whether the cluster stopped it.
_POD_CONDITIONS = ("PodScheduled", "DisruptionTarget")


def _pick(source: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    source = source or {}
    return {key: source[key] for key in keys if key in source}


def slim_job(job: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "metadata": _pick(job.get("metadata"), _META),
        "spec": _pick(job.get("spec"), ("suspend", "activeDeadlineSeconds")),
        "status": _pick(job.get("status"), ("conditions", "startTime", "completionTime", "active", "failed")),
    }


def slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    status = pod.get("status") or {}
    return {
        "metadata": _pick(pod.get("metadata"), _META),
        "status": {
            "phase": status.get("phase"),
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") in _POD_CONDITIONS],
            "containerStatuses": [
                {"name": c.get("name"), "state": c.get("state") or {}} for c in status.get("containerStatuses") or []
            ],
        },
    }
