"""Who may write an output: two AdapterMerges never write one output (or one inside the other).

The operator keeps an index of every resource's output (`claim(merge)`). Before creating a Job it asks
`conflict()` whether another resource holds that output: one whose merge succeeded into it, or one still
running or waiting for it that was created first. The loser gets no Job and fails with reason
OutputConflict. The worker checks the owner recorded in the output's manifest again when it publishes
(`--owner`), which also covers an output written by a resource that no longer exists.

An output is a place in a store: a path on a claim (a claim name means one PVC per namespace, so the
store is (namespace, claim)), or a key below a bucket (`uri`; a bucket is one per endpoint, whatever the
namespace, so resources of different namespaces can collide there). Two outputs overlap when they are in
the same store and one path is the other or lies inside it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from merge_worker.spec import AdapterMergeSpec, SpecError, parse_spec

FINISHED = ("Succeeded", "Failed")
DEFAULT_ENDPOINT = "the default endpoint"  # spec.storage.endpoint unset: AWS (or AWS_ENDPOINT_URL)


@dataclass(frozen=True)
class Location:
    """Where an output lives: `store` (a claim of a namespace, or a bucket of an endpoint) and the path
    or key inside it; `shown` names it in messages as the user wrote it."""

    store: str
    path: str
    shown: str

    def overlaps(self, other: Location | None) -> bool:
        return other is not None and self.store == other.store and _nested(self.path, other.path)


def _nested(a: str, b: str) -> bool:
    """One path is the other or lies inside it; "" is the whole store (an output at a bucket's root)."""
    a, b = (posixpath.normpath(p).strip("/") if p.strip("/") else "" for p in (a, b))
    return a == b or not a or not b or a.startswith(b + "/") or b.startswith(a + "/")


def _uri_location(uri: str, endpoint: str | None) -> Location:
    """scheme://authority/path: the store is the authority (an s3:// bucket, at spec.storage's endpoint,
    since one bucket name can live at several endpoints); the rest is the path inside it."""
    scheme, _, rest = uri.partition("://")
    authority, _, path = rest.partition("/")
    store = f"{scheme}://{authority}"
    if scheme == "s3":
        store += f" at {endpoint or DEFAULT_ENDPOINT}"
    elif scheme == "oci":  # the tag (or digest) is one place: a repository holds no nested outputs
        path = path.replace("@", ":", 1)
    return Location(store, path, uri)


def output_location(spec: AdapterMergeSpec, namespace: str) -> Location:
    """The location of the spec's output."""
    output = spec.output
    if output.uri is not None:
        return _uri_location(output.uri, spec.storage.endpoint if spec.storage else None)
    claim = spec.claim_of(output)
    return Location(f"claim {namespace}/{claim}", output.path or "", f"{claim}:{output.path}")


def written_location(status_output: Mapping[str, Any], spec: AdapterMergeSpec, namespace: str) -> Location | None:
    """The location status.output says a succeeded run wrote (None for a status that names none)."""
    if status_output.get("uri"):
        return _uri_location(status_output["uri"], spec.storage.endpoint if spec.storage else None)
    if "claimName" in status_output and "path" in status_output:
        claim, path = status_output["claimName"], status_output["path"]
        return Location(f"claim {namespace}/{claim}", path, f"{claim}:{path}")
    return None


def describe(spec: AdapterMergeSpec) -> str:
    """The output as the user wrote it: CLAIM:PATH or the uri."""
    return spec.output.uri or f"{spec.claim_of(spec.output)}:{spec.output.path}"


@dataclass(frozen=True)
class OutputClaim:
    """One resource's output and how far its current run got."""

    name: str
    namespace: str
    uid: str
    created: str  # creationTimestamp: the older of two unfinished resources goes first
    location: Location
    phase: str  # status.phase, "" before the operator wrote one
    written: Location | None  # status.output once a run succeeded

    def holds(self, wanted: Location, other_created: str, other_name: str) -> str:
        """Why this resource holds the output `wanted` against another, or ""."""
        if self.phase == "Succeeded" and wanted.overlaps(self.written):
            return "its merge succeeded into it"
        if (self.phase not in FINISHED and wanted.overlaps(self.location)
                and (self.created, self.name) < (other_created, other_name)):
            return "it was created first and its merge has not finished"
        return ""


def claim(merge: Mapping[str, Any]) -> OutputClaim | None:
    """The index entry of a resource; None for a spec the models reject (it never gets a Job)."""
    try:
        spec = parse_spec(dict(merge.get("spec") or {}))
    except SpecError:
        return None
    meta, status = merge["metadata"], merge.get("status") or {}
    namespace = meta.get("namespace") or ""
    return OutputClaim(
        name=meta["name"],
        namespace=namespace,
        uid=meta["uid"],
        created=meta.get("creationTimestamp") or "",
        location=output_location(spec, namespace),
        phase=status.get("phase") or "",
        written=written_location(status.get("output") or {}, spec, namespace),
    )


def everyone(index: Mapping[str, Iterable[OutputClaim]]) -> list[OutputClaim]:
    """Every indexed output, of every namespace (the index is keyed by namespace): a bucket is shared by
    all namespaces, a claim's store names its namespace."""
    return [entry for entries in index.values() for entry in entries]


def conflict(mine: OutputClaim, others: Iterable[OutputClaim]) -> str:
    """Why `mine` must not write its output, or "" when no other resource holds it."""
    for other in sorted(others, key=lambda o: (o.created, o.namespace, o.name)):
        if other.uid == mine.uid:
            continue
        why = other.holds(mine.location, mine.created, mine.name)
        if why:
            who = other.name if other.namespace == mine.namespace else f"{other.namespace}/{other.name}"
            return (f"spec.output: {mine.location.shown} is also the output of AdapterMerge {who} "
                    f"({other.location.shown}), which holds it: {why}. Two resources never write one output.")
    return ""
