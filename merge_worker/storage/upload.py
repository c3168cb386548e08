"""Pushes a finished output folder to s3://bucket/prefix so that readers never see half an output.

The output's manifest (merge-manifest.json) is the commit mark: it is deleted first when an output is
replaced, the other files are uploaded, objects of the old output that the new one lacks are deleted,
and the manifest is uploaded last. A reader that finds the manifest object finds the complete output
it describes; without it, the prefix holds no output (docs/storage.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_worker.output.manifest import MANIFEST_FILE
from merge_worker.output.ownership import MAX_MANIFEST_BYTES, Owner, decide_replace, owner_in_manifest
from merge_worker.storage.client import is_missing, split_uri, storage_error

OUTPUT_FIELD = "spec.output.uri"


def _prefix(uri: str) -> tuple[str, str]:
    bucket, key = split_uri(uri)
    return bucket, key.rstrip("/") + "/" if key.strip("/") else ""


def existing_keys(client: Any, uri: str) -> list[str]:
    bucket, prefix = _prefix(uri)
    keys = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
    except Exception as exc:  # noqa: BLE001
        raise storage_error(exc, OUTPUT_FIELD, uri) or exc from None
    return keys


def _recorded_owner(client: Any, uri: str) -> Owner | None:
    """The owner named by the manifest object of the output at `uri` (None: no manifest, or none named)."""
    bucket, prefix = _prefix(uri)
    try:
        body = client.get_object(Bucket=bucket, Key=prefix + MANIFEST_FILE)["Body"]
        return owner_in_manifest(body.read(MAX_MANIFEST_BYTES))
    except Exception as exc:  # noqa: BLE001
        if is_missing(exc):
            return None  # objects without a manifest: no finished output, nobody's
        raise storage_error(exc, OUTPUT_FIELD, uri) or exc from None


def check_destination(client: Any, uri: str, overwrite: bool, owner: Owner | None = None) -> set[str]:
    """Whether the run may write the output at `uri`, by the rule of a volume output
    (merge_worker/output/ownership.py): objects under the prefix whose manifest names this owner (an
    earlier generation) are replaced; another owner's never are (OutputConflict, exit 2), even with
    overwrite; anything else only with overwrite. Returns the keys there now (empty: nothing)."""
    keys = set(existing_keys(client, uri))
    if keys:
        existing = _recorded_owner(client, uri) if owner is not None else None
        decide_replace(f"{uri} (it holds {len(keys)} objects)", existing, overwrite=overwrite, owner=owner,
                       field=OUTPUT_FIELD)
    return keys


def push(client: Any, folder: Path, uri: str, overwrite: bool, owner: Owner | None) -> list[str]:
    """Uploads every file of `folder` under the prefix, the manifest last; returns the keys written.
    The destination is checked again first: the output may have appeared or changed hands during the
    merge, and then nothing is deleted or uploaded."""
    bucket, prefix = _prefix(uri)
    old = check_destination(client, uri, overwrite, owner)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise RuntimeError(f"{folder} has no {MANIFEST_FILE}; refusing to publish an uncommitted output")
    try:
        if prefix + MANIFEST_FILE in old:
            client.delete_object(Bucket=bucket, Key=prefix + MANIFEST_FILE)
        written = []
        for path in files:
            if path != manifest:
                key = prefix + path.relative_to(folder).as_posix()
                client.upload_file(str(path), bucket, key)
                written.append(key)
        for key in sorted(old - set(written) - {prefix + MANIFEST_FILE}):
            client.delete_object(Bucket=bucket, Key=key)
        client.upload_file(str(manifest), bucket, prefix + MANIFEST_FILE)
    except Exception as exc:  # noqa: BLE001
        raise storage_error(exc, OUTPUT_FIELD, uri) or exc from None
    return written + [prefix + MANIFEST_FILE]
