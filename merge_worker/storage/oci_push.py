"""Pushes a finished output folder to oci://registry/repository:tag, in one of two layouts
(spec.registry.pushLayout, docs/storage.md):

- `artifact` (the default): an ORAS artifact, one layer per file (its relative path in the
  org.opencontainers.image.title annotation, so `oras pull` writes the folder back), the OCI empty
  config, and artifactType application/vnd.adaptermerge.<format>.v1;
- `adapter-image`: the image layout KAITO pulls adapters from, one tar+gzip layer holding the files
  under data/ and an OCI image config listing the layer's diff_id.

The owner (--owner) is recorded in the manifest's annotations. Every blob is uploaded before the
manifest, and the tag moves only when the manifest is put: a reader of the tag sees the old output or
the complete new one, never a mix.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from merge_worker.output.manifest import MANIFEST_FILE
from merge_worker.output.ownership import MAX_MANIFEST_BYTES, Owner, decide_replace, owner_in_manifest
from merge_worker.spec import SpecError
from merge_worker.storage.oci_client import MANIFEST_TYPES, TITLE, OciRef, RegistryClient, unreachable

OUTPUT_FIELD = "spec.output.uri"
OCI_MANIFEST = MANIFEST_TYPES[0]
OWNER_ANNOTATION = "io.adaptermerge.owner"  # NAMESPACE/NAME/UID of the resource the output belongs to
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
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
    """The owner the tagged manifest's annotation names, else the one its merge-manifest.json layer names
    (None: neither names one: then the tag is nobody's)."""
    annotation = (manifest.get("annotations") or {}).get(OWNER_ANNOTATION)
    if isinstance(annotation, str):
        try:
            return Owner.parse(annotation)
        except SpecError:
            return None
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
         owner: Owner | None, layout: str = "artifact") -> str:
    """Uploads the output in `folder`, then the manifest under the tag; returns the manifest's digest.
    The tag is checked again first: it may have appeared or changed hands during the merge."""
    ref = OciRef.parse(uri)
    check_destination(client, uri, overwrite, owner)
    if not (folder / MANIFEST_FILE).is_file():
        raise RuntimeError(f"{folder} has no {MANIFEST_FILE}; refusing to publish an uncommitted output")
    oras = client.authenticated(OUTPUT_FIELD, uri)
    container = client.container(ref)
    with tempfile.TemporaryDirectory(prefix="adaptermerge-oci-push-") as work:
        if layout == "adapter-image":
            blobs, config, manifest = _adapter_image(folder, Path(work))
        else:
            blobs, config, manifest = _artifact(folder, Path(work), output_format)
        for path, descriptor in [*blobs, config]:
            _upload(oras, container, path, descriptor, uri)
    if owner is not None:
        manifest["annotations"] = {OWNER_ANNOTATION: f"{owner.namespace}/{owner.name}/{owner.uid}"}
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


def _artifact(folder: Path, work: Path, output_format: str) -> tuple[list, tuple, dict]:
    """(file blobs, config blob, manifest) of the ORAS artifact layout."""
    blobs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        media_type = "application/json" if name.endswith(".json") else "application/octet-stream"
        blobs.append((path, {"mediaType": media_type, "digest": _file_digest(path), "size": path.stat().st_size,
                             "annotations": {TITLE: name}}))
    config = work / "config.json"
    config.write_bytes(b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type(output_format),
                "config": EMPTY_CONFIG, "layers": [d for _, d in blobs]}
    return blobs, (config, EMPTY_CONFIG), manifest


def _adapter_image(folder: Path, work: Path) -> tuple[list, tuple, dict]:
    """(layer blob, config blob, manifest) of the adapter image layout: the files under data/ in one
    tar+gzip layer, written reproducibly (sorted, owner 0, mode 0644/0755, time 0)."""
    tar_path, layer_path = work / "layer.tar", work / "layer.tar.gz"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        paths = sorted(folder.rglob("*"))
        for path in [folder, *paths]:
            info = tar.gettarinfo(str(path), arcname="/".join(("data", *path.relative_to(folder).parts)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif path.is_dir():
                tar.addfile(info)
    with open(tar_path, "rb") as raw, gzip.GzipFile(layer_path, "wb", mtime=0) as packed:
        shutil.copyfileobj(raw, packed, 1 << 20)
    layer = {"mediaType": TAR_GZIP, "digest": _file_digest(layer_path), "size": layer_path.stat().st_size}
    config_path = work / "config.json"
    config_path.write_text(json.dumps({"architecture": "amd64", "os": "linux",
                                       "rootfs": {"type": "layers", "diff_ids": [_file_digest(tar_path)]}},
                                      separators=(",", ":")))
    config = {"mediaType": IMAGE_CONFIG, "digest": _file_digest(config_path), "size": config_path.stat().st_size}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
    return [(layer_path, layer)], (config_path, config), manifest


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
