"""Who an output belongs to, and whether this run may replace what is there.

The operator passes `--owner NAMESPACE/NAME/UID` (the AdapterMerge resource); the manifest records it.
An existing output whose manifest names the same owner UID is this resource's earlier generation and is
replaced without `overwrite: true`; an output whose manifest names another owner is never replaced, even
with `overwrite: true` (exit 2, reason OutputConflict). Without --owner (the CLI on a laptop), and for
outputs no resource owns, `overwrite` decides as it always has.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from merge_worker.output.manifest import MANIFEST_FILE
from merge_worker.output.result import OUTPUT_CONFLICT
from merge_worker.spec import SpecError

OWNER_FIELD = "--owner"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(rf"^{_LABEL}$")
_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_UID = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9]{0,127}$")
_MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists modules and files: megabytes at most


class OutputConflict(SpecError):
    """The output belongs to another resource (or another run is writing it): exit 2, OutputConflict."""

    reason = OUTPUT_CONFLICT


@dataclass(frozen=True)
class Owner:
    namespace: str
    name: str
    uid: str

    @classmethod
    def parse(cls, value: str) -> Owner:
        parts = value.split("/")
        if len(parts) != 3:
            raise SpecError(OWNER_FIELD, f"expected NAMESPACE/NAME/UID, got {value!r}")
        namespace, name, uid = parts
        for what, text, pattern, limit in (("namespace", namespace, _NAMESPACE, 63), ("name", name, _NAME, 253),
                                           ("uid", uid, _UID, 128)):
            if not pattern.match(text) or len(text) > limit:
                raise SpecError(OWNER_FIELD, f"{value!r}: {what} {text!r} is not a Kubernetes {what}")
        return cls(namespace, name, uid)

    def describe(self) -> str:
        return f"{self.namespace}/{self.name} (uid {self.uid})"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def recorded_owner(output: Path) -> Owner | None:
    """The owner the manifest of an existing output names; None when there is none or it is unreadable
    (such an output is nobody's: only overwrite: true replaces it)."""
    try:
        with open(output / MANIFEST_FILE, "rb") as f:
            manifest = json.loads(f.read(_MAX_MANIFEST_BYTES))
        owner = manifest["owner"]
        return Owner(str(owner["namespace"]), str(owner["name"]), str(owner["uid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def may_replace(output: Path, display: str, *, overwrite: bool, owner: Owner | None, field: str) -> bool:
    """Whether the run may publish at `output`: False when nothing is there, True when it may replace
    what is; raises SpecError / OutputConflict when it may not. `display` names the output in messages."""
    if not output.exists():
        return False
    existing = recorded_owner(output) if owner is not None else None
    if existing is not None and existing.uid == owner.uid:
        return True  # an earlier generation of the same resource
    if existing is not None:
        raise OutputConflict(field, f"{display} belongs to {existing.describe()}, not to {owner.describe()}; "
                                    "an output owned by another resource is never replaced")
    if not overwrite:
        raise SpecError(field, f"{display} already exists; set spec.output.overwrite: true to replace it")
    return True
