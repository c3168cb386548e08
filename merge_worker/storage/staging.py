"""Runs a spec whose paths may be s3:// URIs: downloads the sources into a scratch folder, hands the
worker a spec whose URIs are paths on a scratch claim (so every reader and its path rules apply
unchanged), and pushes the output when the spec's output is a URI.

Order: the sources are listed and their total size checked against spec.storage.maxDownloadBytes, the
destination is checked (overwrite), then the sources are downloaded. Any failure before the merge is exit 2
naming the `uri` field; the scratch folder is removed whatever happens.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_worker.spec import AdapterMergeSpec, PathRef, SpecError, Storage
from merge_worker.inputs.volumes import Volumes

# The claim the scratch folder is mapped as; a user's claim of this name would be shadowed: refused.
SCRATCH_CLAIM = "adaptermerge-staging"


@dataclass
class Staged:
    spec: AdapterMergeSpec
    volumes: Volumes
    provenance: dict[str, Any] | None = None  # merged into the manifest: the spec as written, sources
    client: Any = None
    output_uri: str | None = None
    owner: Any = None  # the --owner the output belongs to (merge_worker/output/ownership.py)
    uri_fields: dict[str, str] = field(default_factory=dict)  # staged "spec.X.path" -> "spec.X.uri"

    def publish(self, outcome: Any) -> None:
        """Pushes a published output to its URI and points the result at it."""
        if self.output_uri is None:
            return
        # The run's message names the scratch path the output was built at; the user knows the uri.
        if outcome.result.get("message"):
            outcome.result["message"] = outcome.result["message"].replace(self.spec.output.path, self.output_uri)
        if not outcome.result.get("published"):
            return
        from merge_worker.storage.upload import push

        push(self.client, outcome.output, self.output_uri, self.spec.output.overwrite, self.owner)
        outcome.result["output"] = {"uri": self.output_uri, "format": self.spec.output.format}

    def rename(self, exc: SpecError) -> SpecError:
        """A reader's error about a staged path, named by the spec's uri field instead."""
        if exc.field not in self.uri_fields:
            return exc
        renamed = SpecError(self.uri_fields[exc.field], exc.message)
        renamed.reason = getattr(exc, "reason", None)
        return renamed


@contextmanager
def staged(spec: AdapterMergeSpec, volumes: Volumes, owner: Any = None) -> Iterator[Staged]:
    """owner: the resource the output belongs to (--owner, an ownership.Owner), checked against the
    manifest of an s3:// output before it is replaced."""
    remote = [(where, ref) for where, ref in spec.refs() if ref.uri is not None]
    if not remote:
        yield Staged(spec, volumes)
        return
    if SCRATCH_CLAIM in volumes.mapping:
        raise SpecError("--volume", f"claim {SCRATCH_CLAIM!r} is reserved for downloaded s3:// sources")
    from merge_worker.storage.client import make_client
    from merge_worker.storage.download import Budget, download, list_source
    from merge_worker.storage.upload import check_destination

    storage = spec.storage or Storage()
    client = make_client(spec.storage)
    scratch = Path(tempfile.mkdtemp(prefix="adaptermerge-staging-"))
    try:
        replacements: dict[int, PathRef] = {}
        sources, uri_fields, output_uri = [], {}, None
        listed = []
        budget = Budget(storage.max_download_bytes)
        for where, ref in remote:
            if ref is spec.output:
                continue
            is_folder, objects = list_source(client, ref.uri, f"spec.{where}.uri")
            budget.take(sum(o.size for o in objects), f"spec.{where}.uri", ref.uri)
            listed.append((where, ref, is_folder, objects))
        if spec.output.uri is not None:
            output_uri = spec.output.uri
            check_destination(client, output_uri, spec.output.overwrite, owner)
            name = output_uri.rstrip("/").rsplit("/", 1)[-1] or "output"
            replacements[id(spec.output)] = _on_scratch(spec.output, f"output/{name}")
            uri_fields["spec.output.path"] = "spec.output.uri"
        for where, ref, is_folder, objects in listed:
            folder = f"inputs/{re.sub(r'[^A-Za-z0-9]+', '-', where).strip('-')}"
            local = folder if is_folder else f"{folder}/{objects[0].key.rsplit('/', 1)[-1]}"
            files = {}
            for obj in objects:
                target = scratch / local / obj.relative if obj.relative else scratch / local
                files[obj.relative or target.name] = download(client, ref.uri, obj, target, scratch,
                                                              f"spec.{where}.uri")
            sources.append({"field": f"spec.{where}", "uri": ref.uri, "files": files})
            replacements[id(ref)] = _on_scratch(ref, local)
            uri_fields[f"spec.{where}.path"] = f"spec.{where}.uri"
        provenance = {"spec": spec.model_dump(mode="json", by_alias=True, exclude={"job"}),
                      "output": spec.output.model_dump(mode="json", by_alias=True), "sources": sources}
        stage = Staged(_rewritten(spec, replacements), Volumes(volumes.mapping | {SCRATCH_CLAIM: scratch}),
                       provenance, client, output_uri, owner, uri_fields)
        try:
            yield stage
        except SpecError as exc:
            raise stage.rename(exc) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _on_scratch(ref: PathRef, path: str) -> PathRef:
    return ref.model_copy(update={"path": path, "uri": None, "claim_name": SCRATCH_CLAIM})


def _rewritten(spec: AdapterMergeSpec, replacements: dict[int, PathRef]) -> AdapterMergeSpec:
    def swap(ref):
        return replacements.get(id(ref), ref)

    update: dict[str, Any] = {"adapters": [swap(a) for a in spec.adapters], "output": swap(spec.output)}
    if spec.base_model is not None:
        update["base_model"] = swap(spec.base_model)
    if spec.evaluation is not None:
        update["evaluation"] = spec.evaluation.model_copy(
            update={"datasets": [swap(d) for d in spec.evaluation.datasets]})
    return spec.model_copy(update=update)
