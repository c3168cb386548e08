"""Pushes a finished output folder to oci://registry/repository:tag as an ORAS artifact.

One layer per file (its relative path in the org.opencontainers.image.title annotation, so `oras pull`
writes the folder back), the OCI empty config, and artifactType application/vnd.adaptermerge.<format>.v1
(docs/storage.md). Every blob is uploaded before the manifest, and the tag moves only when the manifest
is put: a reader of the tag sees the old output or the complete new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from merge_worker.output.manifest import MANIFEST_FILE
from merge_worker.output.ownership import MAX_MANIFEST_BYTES, Owner, decide_replace, owner_in_manifest
from merge_worker.spec import SpecError
from merge_worker.storage.oci_client import MANIFEST_TYPES, TITLE, OciRef, RegistryClient, unreachable

OUTPUT_FIELD = "spec.output.uri"
OCI_MANIFEST = MANIFEST_TYPES[0]
EMPTY_CONFIG = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
# Files above this are sent in chunks (oras-py's chunked upload), not read into memory at once.
CHUNKED_ABOVE = 64 << 20


def artifact_type(output_format: str) -> str:
    return f"application/vnd.adaptermerge.{output_format}.v1"


def _existing(client: RegistryClient, uri: str) -> dict | None:
    """The manifest the output's tag names now, or None when the tag does not exist."""
    ref = OciRef.parse(uri)
    response = client.request("GET", f"{ref.repository}/manifests/{ref.tag}", OUTPUT_FIELD, uri,
                              headers={"Accept": ", ".join(MANIFEST_TYPES)})
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise SpecError(OUTPUT_FIELD, f"{uri}: the registry answered HTTP {response.status_code} for the tag")
    try:
        manifest = response.json()
    except ValueError:
        manifest = {}
    return manifest if isinstance(manifest, dict) else {}


def _recorded_owner(client: RegistryClient, uri: str, manifest: dict) -> Owner | None:
    """The owner the merge-manifest.json layer of the tagged artifact names (None: no such layer, or none
    named: then the tag is nobody's)."""
    ref = OciRef.parse(uri)
    for layer in manifest.get("layers") or []:
        if isinstance(layer, dict) and (layer.get("annotations") or {}).get(TITLE) == MANIFEST_FILE:
            response = client.request("GET", f"{ref.repository}/blobs/{layer.get('digest')}", OUTPUT_FIELD, uri,
                                      stream=True)
            with response:
                if response.status_code != 200:
                    return None
                return owner_in_manifest(response.raw.read(MAX_MANIFEST_BYTES, decode_content=True))
    return None


def check_destination(client: RegistryClient, uri: str, overwrite: bool, owner: Owner | None = None) -> None:
    """Whether the run may move the tag, by the rule of a volume output (merge_worker/output/ownership.py):
    a tag whose artifact names this owner (an earlier generation) is replaced; another owner's never is
    (OutputConflict, exit 2), even with overwrite; anything else only with overwrite."""
    manifest = _existing(client, uri)
    if manifest is not None:
        existing = _recorded_owner(client, uri, manifest) if owner is not None else None
        decide_replace(uri, existing, overwrite=overwrite, owner=owner, field=OUTPUT_FIELD)


def push(client: RegistryClient, folder: Path, uri: str, output_format: str, overwrite: bool,
         owner: Owner | None) -> str:
    """Uploads every file of `folder`, then the manifest under the tag; returns the manifest's digest.
    The tag is checked again first: it may have appeared or changed hands during the merge."""
    ref = OciRef.parse(uri)
    check_destination(client, uri, overwrite, owner)
    if not (folder / MANIFEST_FILE).is_file():
        raise RuntimeError(f"{folder} has no {MANIFEST_FILE}; refusing to publish an uncommitted output")
    oras = client.authenticated(OUTPUT_FIELD, uri)
    container = client.container(ref)
    layers = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        layer = {"mediaType": "application/json" if name.endswith(".json") else "application/octet-stream",
                 "digest": _file_digest(path), "size": path.stat().st_size,
                 "annotations": {TITLE: name}}
        _upload(oras, container, path, layer, uri)
        layers.append(layer)
    with tempfile.NamedTemporaryFile(prefix="adaptermerge-oci-config-") as config:
        config.write(b"{}")
        config.flush()
        _upload(oras, container, Path(config.name), EMPTY_CONFIG, uri)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type(output_format),
                "config": EMPTY_CONFIG, "layers": layers}
    body = json.dumps(manifest, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    response = client.request("PUT", f"{ref.repository}/manifests/{ref.tag}", OUTPUT_FIELD, uri, data=body,
                              headers={"Content-Type": OCI_MANIFEST})
    if response.status_code not in (200, 201):
        raise SpecError(OUTPUT_FIELD, f"{uri}: the registry refused the manifest (HTTP {response.status_code})")
    reported = response.headers.get("Docker-Content-Digest")
    if reported is not None and reported != digest:
        raise RuntimeError(f"{uri}: the registry stored the manifest as {reported}, not {digest}")
    return digest


def _upload(oras, container, path: Path, layer: dict, uri: str) -> None:
    import requests

    try:
        response = oras.upload_blob(str(path), container, layer, do_chunked=layer["size"] > CHUNKED_ABOVE)
    except requests.RequestException as exc:
        raise unreachable(exc, OUTPUT_FIELD, uri) from None
    if response.status_code not in (200, 201, 202):
        raise SpecError(OUTPUT_FIELD, f"{uri}: the registry refused blob {layer['digest']}"
                                      f" (HTTP {response.status_code})")


def _file_digest(path: Path) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
    return "sha256:" + sha256.hexdigest()
