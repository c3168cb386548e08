"""Downloads one oci:// source into a folder beneath the scratch folder (docs/storage.md, "OCI registries").

Two layouts are accepted:
- an ORAS artifact: every layer carries an org.opencontainers.image.title annotation, which is the
  file's name (a plain relative path); a layer that ORAS packed from a folder (tar+gzip with
  io.deis.oras.content.unpack) is unpacked into that folder;
- an image whose layers are tar archives holding the files under /data (the layout KAITO builds for
  adapters and its puller copies out of the image): the layers are applied in order and only what is
  under data/ is kept; everything else in the image (a base image's files, links, devices) is skipped.

Every blob is checked against the manifest: the bytes received must be exactly the descriptor's size and
hash to its digest (fetched again up to 3 times, then exit 2). The manifest itself must hash to the
digest the URI names. Sizes count against spec.storage.maxDownloadBytes, and so do the bytes a tar layer
unpacks to (a small compressed layer cannot fill the disk). A tar member that is kept must be a regular
file or folder with a plain relative name; it passes Python's tarfile data filter too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from merge_worker.spec import SpecError
from merge_worker.storage.download import Budget, check_relative_key
from merge_worker.storage.oci_client import INDEX_TYPES, MANIFEST_TYPES, TITLE, OciRef, RegistryClient

MAX_MANIFEST_BYTES = 4 << 20  # the distribution registry's own limit
BLOB_ATTEMPTS = 3
ORAS_UNPACK = "io.deis.oras.content.unpack"
KAITO_FOLDER = "data"
_TAR_TYPES = {"application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
              "application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.docker.image.rootfs.diff.tar"}
_BLOCK = 1 << 20


@dataclass
class Layer:
    digest: str
    size: int
    media_type: str
    title: str | None
    unpack: bool


@dataclass
class Resolved:
    uri: str
    ref: OciRef
    digest: str  # of the manifest the layers come from
    media_type: str
    layout: str  # "oras" or "image"
    layers: list[Layer]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def resolve(client: RegistryClient, uri: str, field: str) -> Resolved:
    """The manifest `uri` names (an index resolves to its one non-attestation image), checked."""
    ref = OciRef.parse(uri)
    body, media_type = _get_manifest(client, ref, ref.reference, field, uri)
    if ref.digest and _sha256(body) != ref.digest:
        raise SpecError(field, f"{uri}: the registry sent a manifest that does not hash to the digest named")
    manifest = _json(body, field, uri)
    if media_type in INDEX_TYPES or manifest.get("manifests") is not None:
        digest = _pick_from_index(manifest, field, uri)
        body, media_type = _get_manifest(client, ref, digest, field, uri)
        if _sha256(body) != digest:
            raise SpecError(field, f"{uri}: the manifest {digest} of its index does not hash to its digest")
        manifest = _json(body, field, uri)
    layers = [_layer(d, field, uri) for d in _list(manifest, "layers", field, uri)]
    if not layers:
        raise SpecError(field, f"{uri}: the manifest has no layers")
    titled = [layer.title is not None for layer in layers]
    if all(titled):
        for layer in layers:
            check_relative_key(layer.title, field, uri)  # type: ignore[arg-type]
            if layer.unpack and layer.media_type not in _TAR_TYPES:
                raise SpecError(field, f"{uri}: layer {layer.title!r} asks to be unpacked but is not a tar archive")
        layout = "oras"
    elif not any(titled) and all(layer.media_type in _TAR_TYPES for layer in layers):
        layout = "image"
    else:
        kinds = sorted({layer.media_type for layer in layers})
        raise SpecError(field, f"{uri}: neither an ORAS artifact (every layer with a title annotation) nor an"
                               f" image of tar layers holding /data (layer media types: {', '.join(kinds)[:300]})")
    return Resolved(uri, ref, _sha256(body), media_type, layout, layers)


def fetch(client: RegistryClient, resolved: Resolved, folder: Path, scratch: Path, budget: Budget,
          field: str) -> dict[str, dict]:
    """Writes the source's files under `folder` (beneath `scratch`); returns {relative path: entry}."""
    if not folder.resolve().is_relative_to(scratch.resolve()):
        raise SpecError(field, f"{resolved.uri}: would land outside the scratch folder")
    folder.mkdir(parents=True)
    blobs = scratch / ".blobs"
    blobs.mkdir(exist_ok=True)
    files: dict[str, dict] = {}
    for layer in resolved.layers:
        blob = blobs / layer.digest.replace(":", "-")
        _download(client, resolved, layer, blob, field)
        if resolved.layout == "oras" and not layer.unpack:
            target = folder / layer.title  # type: ignore[operator]
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.replace(target)
            files[layer.title] = {"layer": layer.digest, "size": layer.size,  # type: ignore[index]
                                  "sha256": layer.digest.removeprefix("sha256:")}
            continue
        keep = layer.title if resolved.layout == "oras" else KAITO_FOLDER
        for name, entry in _unpack(blob, folder, keep, resolved.layout == "image", budget, field,
                                   resolved.uri).items():
            files[name] = {"layer": layer.digest, **entry}
        blob.unlink()
    if resolved.layout == "image" and not files:
        raise SpecError(field, f"{resolved.uri}: the image holds no files under /{KAITO_FOLDER} (the adapter"
                               " image layout: the adapter's files in /data)")
    return dict(sorted(files.items()))


def _get_manifest(client: RegistryClient, ref: OciRef, reference: str, field: str, uri: str) -> tuple[bytes, str]:
    response = client.request("GET", f"{ref.repository}/manifests/{reference}", field, uri, stream=True,
                              headers={"Accept": ", ".join(MANIFEST_TYPES + INDEX_TYPES)})
    with response:
        if response.status_code == 404:
            raise SpecError(field, f"{uri}: not found (no such repository, tag or digest)")
        if response.status_code != 200:
            raise SpecError(field, f"{uri}: the registry answered HTTP {response.status_code} for the manifest")
        body = response.raw.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
    if len(body) > MAX_MANIFEST_BYTES:
        raise SpecError(field, f"{uri}: the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    return body, response.headers.get("Content-Type", "").split(";")[0].strip()


def _pick_from_index(index: dict, field: str, uri: str) -> str:
    # Adapter files do not depend on the platform: take the one image that is not an attestation
    # (buildx adds those with platform unknown/unknown), preferring linux/amd64 among several.
    entries = [m for m in _list(index, "manifests", field, uri) if isinstance(m, dict)
               and (m.get("platform") or {}).get("os") != "unknown" and m.get("mediaType") in MANIFEST_TYPES]
    if not entries:
        raise SpecError(field, f"{uri}: the index lists no image manifest")
    amd64 = [m for m in entries if (m.get("platform") or {}).get("architecture") == "amd64"]
    digest = (amd64 or entries)[0].get("digest")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise SpecError(field, f"{uri}: the index names a manifest without a sha256 digest")
    return digest


def _layer(descriptor: Any, field: str, uri: str) -> Layer:
    if not isinstance(descriptor, dict):
        raise SpecError(field, f"{uri}: a layer descriptor is not an object")
    digest, size, media_type = descriptor.get("digest"), descriptor.get("size"), descriptor.get("mediaType")
    if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71
            and all(c in "0123456789abcdef" for c in digest[7:])):
        raise SpecError(field, f"{uri}: a layer has no sha256 digest (only sha256 is accepted)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SpecError(field, f"{uri}: layer {digest} has no valid size")
    annotations = descriptor.get("annotations") or {}
    title = annotations.get(TITLE) if isinstance(annotations, dict) else None
    if title is not None and not isinstance(title, str):
        raise SpecError(field, f"{uri}: layer {digest} has a title annotation that is not a string")
    return Layer(digest, size, str(media_type or ""), title,
                 isinstance(annotations, dict) and annotations.get(ORAS_UNPACK) == "true")


def _download(client: RegistryClient, resolved: Resolved, layer: Layer, target: Path, field: str) -> None:
    """Streams the blob to `target`, checking its size and digest; refetched on a broken stream or a
    mismatch, up to BLOB_ATTEMPTS times."""
    import requests
    import urllib3

    uri = resolved.uri
    for attempt in range(1, BLOB_ATTEMPTS + 1):
        try:
            response = client.request("GET", f"{resolved.ref.repository}/blobs/{layer.digest}", field, uri,
                                      stream=True)
            with response:
                if response.status_code == 404:
                    raise SpecError(field, f"{uri}: blob {layer.digest} named by the manifest is missing")
                if response.status_code != 200:
                    raise SpecError(field, f"{uri}: the registry answered HTTP {response.status_code} for"
                                           f" blob {layer.digest}")
                sha256, received = hashlib.sha256(), 0
                with open(target, "wb") as out:
                    # One byte more than declared is read, so a blob that is too long is caught.
                    while block := response.raw.read(min(_BLOCK, layer.size + 1 - received), decode_content=False):
                        received += len(block)
                        if received > layer.size:
                            break
                        sha256.update(block)
                        out.write(block)
        except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError):
            if attempt == BLOB_ATTEMPTS:
                raise SpecError(field, f"{uri}: blob {layer.digest}: the transfer broke off"
                                       f" ({BLOB_ATTEMPTS} attempts)") from None
            continue
        if received == layer.size and "sha256:" + sha256.hexdigest() == layer.digest:
            return
        if attempt == BLOB_ATTEMPTS:
            what = (f"sent {received if received <= layer.size else 'more than'} bytes, the manifest says"
                    f" {layer.size}" if received != layer.size else "does not match its digest")
            raise SpecError(field, f"{uri}: blob {layer.digest} {what} ({BLOB_ATTEMPTS} attempts)")


def _unpack(blob: Path, folder: Path, keep: str | None, strip: bool, budget: Budget, field: str,
            uri: str) -> dict[str, dict]:
    """Extracts the members under `keep`/ of the tar `blob` into `folder` (without the `keep/` prefix
    when `strip`); returns {relative path: {"size", "sha256"}}."""
    written: dict[str, dict] = {}
    unpacked = 0
    try:
        with tarfile.open(blob, mode="r:*") as tar:
            for member in tar:
                unpacked += max(member.size, 0)
                # Bounds the work of a layer whose members are skipped too (a tar bomb need not be kept).
                if unpacked > budget.limit:
                    raise SpecError(field, f"{uri}: a layer unpacks to more than spec.storage.maxDownloadBytes")
                name = member.name.removeprefix("./")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise SpecError(field, f"{uri}: layer entry {name[:200]!r} is absolute or climbs with '..'")
                if not parts or parts[0] != keep:
                    continue
                relative = "/".join(parts[1:]) if strip else "/".join(parts)
                if parts[-1].startswith(".wh."):
                    raise SpecError(field, f"{uri}: whiteout entry {name[:200]!r}: deleting files across layers"
                                           f" under /{keep} is not supported")
                if member.isdir():
                    if relative:
                        check_relative_key(relative, field, uri)
                        (folder / relative).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise SpecError(field, f"{uri}: layer entry {name[:200]!r} is a link or a device, not a"
                                           " regular file")
                check_relative_key(relative, field, uri)
                try:
                    tarfile.data_filter(member, str(folder))
                except tarfile.FilterError as exc:
                    raise SpecError(field, f"{uri}: layer entry {name[:200]!r} refused ({type(exc).__name__})") from None
                budget.take(member.size, field, uri)
                target = folder / relative
                if not target.resolve().is_relative_to(folder.resolve()):
                    raise SpecError(field, f"{uri}: layer entry {name[:200]!r} would land outside the scratch folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                written[relative] = _copy_member(tar, member, target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise SpecError(field, f"{uri}: a layer is not a readable tar archive ({type(exc).__name__})") from None
    return written


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> dict:
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    sha256 = hashlib.sha256()
    target.unlink(missing_ok=True)  # a later layer replaces the file an earlier one wrote
    with source, open(target, "wb") as out:
        while block := source.read(_BLOCK):
            sha256.update(block)
            out.write(block)
    return {"size": member.size, "sha256": sha256.hexdigest()}


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(body: bytes, field: str, uri: str) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SpecError(field, f"{uri}: the manifest is not JSON") from None
    if not isinstance(value, dict):
        raise SpecError(field, f"{uri}: the manifest is not a JSON object")
    return value


def _list(value: dict, key: str, field: str, uri: str) -> list:
    items = value.get(key)
    if not isinstance(items, list):
        raise SpecError(field, f"{uri}: the manifest's {key!r} is not a list")
    return items


def remove_blobs(scratch: Path) -> None:
    shutil.rmtree(scratch / ".blobs", ignore_errors=True)
