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
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists modules and files: megabytes at most


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


def owner_in_manifest(data: bytes) -> Owner | None:
    """The owner a manifest's bytes name; None when it names none or cannot be read (such an output is
    nobody's: only overwrite: true replaces it)."""
    try:
        owner = json.loads(data)["owner"]
        return Owner(str(owner["namespace"]), str(owner["name"]), str(owner["uid"]))
    except (ValueError, KeyError, TypeError):
        return None


def recorded_owner(output: Path) -> Owner | None:
    """The owner the manifest of an existing output folder names (see owner_in_manifest)."""
    try:
        with open(output / MANIFEST_FILE, "rb") as f:
            return owner_in_manifest(f.read(MAX_MANIFEST_BYTES))
    except OSError:
        return None


def may_replace(output: Path, display: str, *, overwrite: bool, owner: Owner | None, field: str) -> bool:
    """Whether the run may publish at `output`: False when nothing is there, True when it may replace
    what is; raises SpecError / OutputConflict when it may not. `display` names the output in messages."""
    if not output.exists():
        return False
    return decide_replace(display, recorded_owner(output) if owner is not None else None, overwrite=overwrite,
                          owner=owner, field=field)


def decide_replace(display: str, existing: Owner | None, *, overwrite: bool, owner: Owner | None, field: str) -> bool:
    """The rule for an output that exists (a folder, or objects under an s3:// prefix) whose manifest
    names `existing`: True when this run may replace it; raises SpecError / OutputConflict otherwise."""
    if existing is not None and owner is not None and existing.uid == owner.uid:
        return True  # an earlier generation of the same resource
    if existing is not None and owner is not None:
        raise OutputConflict(field, f"{display} belongs to {existing.describe()}, not to {owner.describe()}; "
                                    "an output owned by another resource is never replaced")
    if not overwrite:
        raise SpecError(field, f"{display} already exists; set spec.output.overwrite: true to replace it")
    return True
