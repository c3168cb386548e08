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
from merge_worker.spec import SpecError
from merge_worker.storage.oci_client import MANIFEST_TYPES, OciRef, RegistryClient, unreachable

OUTPUT_FIELD = "spec.output.uri"
OCI_MANIFEST = MANIFEST_TYPES[0]
EMPTY_CONFIG = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
# Files above this are sent in chunks (oras-py's chunked upload), not read into memory at once.
CHUNKED_ABOVE = 64 << 20


def artifact_type(output_format: str) -> str:
    return f"application/vnd.adaptermerge.{output_format}.v1"


def tag_exists(client: RegistryClient, uri: str) -> bool:
    ref = OciRef.parse(uri)
    response = client.request("HEAD", f"{ref.repository}/manifests/{ref.tag}", OUTPUT_FIELD, uri,
                              headers={"Accept": ", ".join(MANIFEST_TYPES)})
    if response.status_code == 404:
        return False
    if response.status_code == 200:
        return True
    raise SpecError(OUTPUT_FIELD, f"{uri}: the registry answered HTTP {response.status_code} for the tag")


def check_destination(client: RegistryClient, uri: str, overwrite: bool) -> None:
    """Before anything is merged: an existing tag is replaced only with overwrite (exit 2 otherwise)."""
    if tag_exists(client, uri) and not overwrite:
        raise SpecError(OUTPUT_FIELD, f"{uri} already exists; set spec.output.overwrite: true to move the tag"
                                      " to the new output")


def push(client: RegistryClient, folder: Path, uri: str, output_format: str) -> str:
    """Uploads every file of `folder`, then the manifest under the tag; returns the manifest's digest."""
    ref = OciRef.parse(uri)
    if not (folder / MANIFEST_FILE).is_file():
        raise RuntimeError(f"{folder} has no {MANIFEST_FILE}; refusing to publish an uncommitted output")
    oras = client.authenticated(OUTPUT_FIELD, uri)
    container = client.container(ref)
    layers = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        layer = {"mediaType": "application/json" if name.endswith(".json") else "application/octet-stream",
                 "digest": _file_digest(path), "size": path.stat().st_size,
                 "annotations": {"org.opencontainers.image.title": name}}
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
