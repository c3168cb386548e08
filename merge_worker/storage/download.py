"""Downloads one s3:// source (a prefix = a folder, or one object = a file) beneath a scratch folder.

Every object is checked: its key below the prefix must be a plain relative path (no '..', no empty or
absolute part) so it lands under the scratch folder and nowhere else; the bytes received must equal the
listed size; a single-part ETag (the object's MD5) must match, and so must a stored CRC the server
sends (botocore checks it). A mismatch is fetched again before the object is called damaged. A broken
stream is retried from the start with If-Match on the ETag, so a retry never mixes two versions of an
object. The sha256 of every file is
returned for the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_worker.spec import SpecError
from merge_worker.storage.client import split_uri, storage_error

STREAM_ATTEMPTS = 3
_BLOCK = 1 << 20


@dataclass
class RemoteObject:
    key: str
    relative: str  # path below the source's folder ("" for a single-object source)
    size: int
    etag: str


class Budget:
    """The bytes left of spec.storage.maxDownloadBytes, shared by every source of a run."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def take(self, size: int, field: str, uri: str) -> None:
        if size > self.left:
            raise SpecError(field, f"{uri}: downloading it would exceed spec.storage.maxDownloadBytes")
        self.left -= size


def list_source(client: Any, uri: str, field: str) -> tuple[bool, list[RemoteObject]]:
    """(is_folder, objects): the objects under `uri/`, or else the one object named `uri`."""
    bucket, key = split_uri(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                if relative.endswith("/") and item["Size"] == 0:
                    continue  # a "folder marker" some tools create
                check_relative_key(relative, field, uri)
                objects.append(RemoteObject(item["Key"], relative, item["Size"], item["ETag"].strip('"')))
        if objects:
            return True, objects
        if key and not key.endswith("/"):
            head = client.head_object(Bucket=bucket, Key=key)
            return False, [RemoteObject(key, "", head["ContentLength"], head["ETag"].strip('"'))]
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors that are bad input become SpecErrors
        raise storage_error(exc, field, uri) or exc from None
    raise SpecError(field, f"{uri}: no objects under this prefix")


def check_relative_key(relative: str, field: str, uri: str) -> None:
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in relative:
        raise SpecError(field, f"{uri}: object key below the prefix {relative[:200]!r} is not a plain relative"
                               " path; it would land outside the scratch folder")


def download(client: Any, uri: str, obj: RemoteObject, target: Path, scratch: Path, field: str) -> dict:
    """Writes `obj` to `target` (which must be beneath `scratch`); returns its manifest entry."""
    if not target.resolve().is_relative_to(scratch.resolve()):
        raise SpecError(field, f"{uri}: object {obj.relative!r} would land outside the scratch folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    bucket = split_uri(uri)[0]
    for attempt in range(1, STREAM_ATTEMPTS + 1):
        try:
            sha256 = _fetch(client, bucket, obj, target, field, uri)
            break
        except SpecError:
            raise
        except Exception as exc:  # noqa: BLE001
            bad_input = storage_error(exc, field, uri)
            if bad_input is not None:
                raise bad_input from None
            if attempt < STREAM_ATTEMPTS and (_transient(exc) or _corrupt(exc)):
                continue
            if _corrupt(exc):  # the same every time: the stored object is damaged, not the transfer
                raise SpecError(field, f"{uri}: object {obj.key!r} does not match its ETag or checksum "
                                       f"({STREAM_ATTEMPTS} attempts)") from None
            raise
    return {"key": obj.key, "size": obj.size, "etag": obj.etag, "sha256": sha256}


def _fetch(client: Any, bucket: str, obj: RemoteObject, target: Path, field: str, uri: str) -> str:
    body = client.get_object(Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"')["Body"]
    sha256, md5, received = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    try:
        with open(target, "wb") as out:
            # One byte more than listed is read, so an object that grew is caught without reading it all.
            while block := body.read(min(_BLOCK, obj.size + 1 - received)):
                received += len(block)
                if received > obj.size:
                    break
                sha256.update(block)
                md5.update(block)
                out.write(block)
    finally:
        body.close()
    if received != obj.size:
        raise SpecError(field, f"{uri}: object {obj.key!r} sent {received} bytes, listed as {obj.size}")
    # A multipart ETag ("<md5 of md5s>-<parts>") is not the content's MD5 and cannot be checked here.
    if "-" not in obj.etag and len(obj.etag) == 32 and md5.hexdigest() != obj.etag:
        raise _Mismatch(obj.key)
    return sha256.hexdigest()


class _Mismatch(Exception):
    """The bytes received do not hash to the object's single-part ETag."""


def _corrupt(exc: BaseException) -> bool:
    # botocore checks a stored CRC itself when the server sends one (FlexibleChecksumError).
    from botocore.exceptions import FlexibleChecksumError

    return isinstance(exc, (_Mismatch, FlexibleChecksumError))


def _transient(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return isinstance(exc, (ConnectionClosedError, ReadTimeoutError, ResponseStreamingError, ProtocolError,
                            ConnectionError))
