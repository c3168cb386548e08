"""Names and labels of the objects the operator owns.

A Job's name is a function of the resource's name and generation only: looking it up before
creating, and treating AlreadyExists as "already mine", is what makes a restarted operator adopt
a running Job instead of starting a second one.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

# Job names become the pods' `job-name` label, whose values are limited to 63 characters.
MAX_NAME = 63
HASH_LENGTH = 8

LABEL_UID = "adaptermerge.io/uid"  # exact owner: names are reused after deletion, uids never
LABEL_NAME = "adaptermerge.io/name"  # for people selecting with kubectl (shortened when too long)
LABEL_GENERATION = "adaptermerge.io/generation"
ANNOTATION_OWNER = "adaptermerge.io/merge-name"  # full resource name (labels may be shortened)
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
# Set or change this annotation to run an unchanged spec again (a new run of the same generation).
ANNOTATION_RERUN = "adaptermerge.io/rerun"
# On every Job the operator creates: the Job stays (e.g. past its TTL) until its verdict is in the status.
FINALIZER = "adaptermerge.io/verdict"
# The reporting component of the operator's Kubernetes events ("From" in `kubectl describe`).
EVENT_COMPONENT = "adaptermerge"
COMMON_LABELS = {
    "app.kubernetes.io/name": "adaptermerge",
    "app.kubernetes.io/component": "merge-worker",
    "app.kubernetes.io/managed-by": "adaptermerge-operator",
}

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def shorten(name: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """`name + suffix` if it fits in `limit`, else a prefix of name, a hash of the full name, and suffix.

    The hash keeps two long names with the same prefix apart; the prefix keeps it readable.
    """
    if len(name) + len(suffix) <= limit:
        return name + suffix
    room = limit - len(suffix) - HASH_LENGTH - 1
    prefix = name[:room].rstrip("-.")
    return f"{prefix}-{_digest(name)}{suffix}"


def job_name(merge_name: str, generation: int, rerun: str = "") -> str:
    """The Job (and ConfigMap) of one run of an AdapterMerge: `<name>-<generation>`, and a hash of the
    rerun annotation's value when it is set (`<name>-<generation>-<hash>`)."""
    return shorten(merge_name, f"-{generation}" + (f"-{_digest(rerun)}" if rerun else ""))


def run_name(merge: Mapping[str, Any]) -> str:
    """The Job name of the resource's current run: its generation and rerun token."""
    meta = merge["metadata"]
    return job_name(meta["name"], meta["generation"], (meta.get("annotations") or {}).get(ANNOTATION_RERUN, ""))


def label_value(text: str) -> str:
    """A valid label value standing for `text` (itself when it already is one)."""
    if len(text) <= MAX_NAME and _LABEL_VALUE.match(text):
        return text
    return shorten(text.strip("-._"), limit=MAX_NAME)


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its ownerReference with controller: true), if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref.get("uid") for ref in refs if ref.get("controller")), None)


def owned_labels(merge_name: str, uid: str, generation: int) -> dict[str, str]:
    return {
        **COMMON_LABELS,
        LABEL_NAME: label_value(merge_name),
        LABEL_UID: uid,
        LABEL_GENERATION: str(generation),
    }
