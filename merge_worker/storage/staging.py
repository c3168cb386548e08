"""Runs a spec whose paths may be s3:// or oci:// URIs: downloads the sources into a scratch folder, hands
the worker a spec whose URIs are paths on a scratch claim (so every reader and its path rules apply
unchanged), and pushes the output when the spec's output is a URI.

Order: the sources are listed (an S3 listing, an OCI manifest) and their total size checked against
spec.storage.maxDownloadBytes, the destination is checked (overwrite), then the sources are downloaded.
Any failure before the merge is exit 2 naming the `uri` field; the scratch folder is removed whatever
happens. Each scheme is one small class below with the same three steps (list, fetch, and for the output
check and push).
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
    destination: Any = None  # _S3 or _Oci for a uri output
    owner: Any = None  # the --owner the output belongs to (merge_worker/output/ownership.py)
    uri_fields: dict[str, str] = field(default_factory=dict)  # staged "spec.X.path" -> "spec.X.uri"

    def publish(self, outcome: Any) -> None:
        """Pushes a published output to its URI and points the result at it."""
        if self.destination is None:
            return
        uri = self.destination.uri
        # The run's message names the scratch path the output was built at; the user knows the uri.
        if outcome.result.get("message"):
            outcome.result["message"] = outcome.result["message"].replace(self.spec.output.path, uri)
        if not outcome.result.get("published"):
            return
        pushed = self.destination.push(outcome.output, self.spec.output.format, self.spec.output.overwrite,
                                       self.owner)
        outcome.result["output"] = {"uri": uri, "format": self.spec.output.format, **pushed}

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
    manifest of an s3:// or oci:// output before it is replaced."""
    remote = [(where, ref) for where, ref in spec.refs() if ref.uri is not None]
    if not remote:
        yield Staged(spec, volumes)
        return
    if SCRATCH_CLAIM in volumes.mapping:
        raise SpecError("--volume", f"claim {SCRATCH_CLAIM!r} is reserved for downloaded s3:// and oci:// sources")
    from merge_worker.storage.download import Budget

    storage = spec.storage or Storage()
    clients = _Clients(spec)
    scratch = Path(tempfile.mkdtemp(prefix="adaptermerge-staging-"))
    try:
        replacements: dict[int, PathRef] = {}
        sources, uri_fields, destination = [], {}, None
        listed = []
        budget = Budget(storage.max_download_bytes)
        for where, ref in remote:
            if ref is spec.output:
                continue
            source = clients.source(ref.uri, f"spec.{where}.uri")
            budget.take(source.size, f"spec.{where}.uri", ref.uri)
            listed.append((where, ref, source))
        if spec.output.uri is not None:
            destination = clients.source(spec.output.uri, "spec.output.uri", output=True)
            destination.check(spec.output.overwrite, owner)
            replacements[id(spec.output)] = _on_scratch(spec.output, f"output/{destination.name or 'output'}")
            uri_fields["spec.output.path"] = "spec.output.uri"
        for where, ref, source in listed:
            folder = f"inputs/{re.sub(r'[^A-Za-z0-9]+', '-', where).strip('-')}"
            local, entry = source.fetch(scratch, folder, budget, single_file=where.startswith("evaluation."))
            sources.append({"field": f"spec.{where}", "uri": ref.uri, **entry})
            replacements[id(ref)] = _on_scratch(ref, local)
            uri_fields[f"spec.{where}.path"] = f"spec.{where}.uri"
        provenance = {"spec": spec.model_dump(mode="json", by_alias=True, exclude={"job"}),
                      "output": spec.output.model_dump(mode="json", by_alias=True), "sources": sources}
        stage = Staged(_rewritten(spec, replacements), Volumes(volumes.mapping | {SCRATCH_CLAIM: scratch}),
                       provenance, destination, owner, uri_fields)
        try:
            yield stage
        except SpecError as exc:
            raise stage.rename(exc) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Clients:
    """One S3 client and one client per registry host, made when a URI first needs them."""

    def __init__(self, spec: AdapterMergeSpec):
        self.spec = spec
        self._s3: Any = None
        self._registries: dict[str, Any] = {}

    def source(self, uri: str, field: str, *, output: bool = False) -> Any:
        if uri.startswith("oci://"):
            from merge_worker.storage.oci_client import OciRef, RegistryClient

            host = OciRef.parse(uri).registry
            if host not in self._registries:
                self._registries[host] = RegistryClient(host, self.spec.registry)
            return _Oci(self._registries[host], uri, field, output)
        if self._s3 is None:
            from merge_worker.storage.client import make_client

            self._s3 = make_client(self.spec.storage)
        return _S3(self._s3, uri, field, output)


class _S3:
    """An s3:// prefix (a folder) or object (a file); as an output, a prefix (merge_worker/storage/upload.py)."""

    def __init__(self, client: Any, uri: str, field: str, output: bool):
        from merge_worker.storage.download import list_source

        self.client, self.uri, self.field = client, uri, field
        self.name = uri.rstrip("/").rsplit("/", 1)[-1]
        if not output:
            self.is_folder, self.objects = list_source(client, uri, field)
            self.size = sum(o.size for o in self.objects)

    def fetch(self, scratch: Path, folder: str, budget: Any, *, single_file: bool) -> tuple[str, dict]:
        from merge_worker.storage.download import download

        local = folder if self.is_folder else f"{folder}/{self.objects[0].key.rsplit('/', 1)[-1]}"
        files = {}
        for obj in self.objects:
            target = scratch / local / obj.relative if obj.relative else scratch / local
            files[obj.relative or target.name] = download(self.client, self.uri, obj, target, scratch, self.field)
        return local, {"files": files}

    def check(self, overwrite: bool, owner: Any) -> None:
        from merge_worker.storage.upload import check_destination

        check_destination(self.client, self.uri, overwrite, owner)

    def push(self, folder: Path, output_format: str, overwrite: bool, owner: Any) -> dict:
        from merge_worker.storage.upload import push

        push(self.client, folder, self.uri, overwrite, owner)
        return {}


class _Oci:
    """An oci:// artifact or adapter image (merge_worker/storage/oci_pull.py); as an output, a tag
    (merge_worker/storage/oci_push.py)."""

    def __init__(self, client: Any, uri: str, field: str, output: bool):
        from merge_worker.storage.oci_pull import resolve

        from merge_worker.storage.oci_client import OciRef

        self.client, self.uri, self.field = client, uri, field
        self.name = OciRef.parse(uri).repository.rsplit("/", 1)[-1]
        if not output:
            self.resolved = resolve(client, uri, field)
            self.size = self.resolved.size

    def fetch(self, scratch: Path, folder: str, budget: Any, *, single_file: bool) -> tuple[str, dict]:
        from merge_worker.storage.oci_pull import fetch

        files = fetch(self.client, self.resolved, scratch / folder, scratch, budget, self.field)
        local = folder
        if single_file:  # an evaluation dataset: the artifact's one file
            if len(files) != 1:
                raise SpecError(self.field, f"{self.uri}: a dataset artifact must hold exactly one file,"
                                            f" it holds {len(files)}")
            local = f"{folder}/{next(iter(files))}"
        return local, {"digest": self.resolved.digest, "mediaType": self.resolved.media_type,
                       "layout": self.resolved.layout, "files": files}

    def check(self, overwrite: bool, owner: Any) -> None:
        from merge_worker.storage.oci_push import check_destination

        check_destination(self.client, self.uri, overwrite, owner)

    def push(self, folder: Path, output_format: str, overwrite: bool, owner: Any) -> dict:
        from merge_worker.storage.oci_push import push

        return {"digest": push(self.client, folder, self.uri, output_format, overwrite, owner,
                               self.client.settings.push_layout)}


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
