"""Who may write an output: two AdapterMerges never write one output (or one inside the other).

The operator keeps an index of every resource's output (`claim(merge)`), per namespace (a claim name
means one PVC per namespace). Before creating a Job it asks `conflict()` whether another resource holds
that output: one whose merge succeeded into it, or one still running or waiting for it that was created
first. The loser gets no Job and fails with reason OutputConflict. The worker checks the owner recorded
in the output's manifest again when it publishes (`--owner`), which also covers an output written by a
resource that no longer exists.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from merge_worker.spec import SpecError, parse_spec

FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class OutputClaim:
    """One resource's output and how far its current run got."""

    name: str
    uid: str
    created: str  # creationTimestamp: the older of two unfinished resources goes first
    claim: str
    path: str
    phase: str  # status.phase, "" before the operator wrote one
    written: tuple[str, str] | None  # (claim, path) of status.output once a run succeeded

    def overlaps(self, claim: str, path: str) -> bool:
        return self.claim == claim and _nested(self.path, path)

    def holds(self, claim: str, path: str, other_created: str, other_name: str) -> str:
        """Why this resource holds the output (claim, path) against another, or ""."""
        if self.phase == "Succeeded" and self.written and self.written[0] == claim and _nested(self.written[1], path):
            return "its merge succeeded into it"
        if self.phase not in FINISHED and self.overlaps(claim, path) and (self.created, self.name) < (other_created, other_name):
            return "it was created first and its merge has not finished"
        return ""


def _nested(a: str, b: str) -> bool:
    a, b = posixpath.normpath(a), posixpath.normpath(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def claim(merge: Mapping[str, Any]) -> OutputClaim | None:
    """The index entry of a resource; None for a spec the models reject (it never gets a Job)."""
    try:
        spec = parse_spec(dict(merge.get("spec") or {}))
    except SpecError:
        return None
    meta, status = merge["metadata"], merge.get("status") or {}
    written = status.get("output") or {}
    return OutputClaim(
        name=meta["name"],
        uid=meta["uid"],
        created=meta.get("creationTimestamp") or "",
        claim=spec.claim_of(spec.output),
        path=spec.output.path,
        phase=status.get("phase") or "",
        written=(written["claimName"], written["path"]) if "claimName" in written and "path" in written else None,
    )


def conflict(mine: OutputClaim, others: Iterable[OutputClaim]) -> str:
    """Why `mine` must not write its output, or "" when no other resource holds it."""
    for other in sorted(others, key=lambda o: (o.created, o.name)):
        if other.uid == mine.uid:
            continue
        why = other.holds(mine.claim, mine.path, mine.created, mine.name)
        if why:
            return (f"spec.output: {mine.claim}:{mine.path} is also the output of AdapterMerge {other.name} "
                    f"({other.claim}:{other.path}), which holds it: {why}. Two resources never write one output.")
    return ""
