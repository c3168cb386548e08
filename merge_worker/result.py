"""The short JSON result summary (`--result-file`): in a pod it is the container's termination message,
which Kubernetes cuts at 4 KiB, and the operator parses it into the resource's status. So it is kept
under that size: the message is shortened first, then per-dataset retention dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_BYTES = 4096

REASON_BY_EXIT_CODE = {0: "MergeSucceeded", 1: "MergeFailed", 2: "InvalidSpec", 3: "RetentionBelowThreshold"}


def build_result(
    exit_code: int,
    message: str,
    *,
    seconds: float | None = None,
    modules: int | None = None,
    max_reconstruction_error: float | None = None,
    rank: int | str | None = None,
    output: dict[str, str] | None = None,
    retention: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """The summary of docs/interfaces.md #5; keys whose value is unknown are left out."""
    result: dict[str, Any] = {
        "reason": REASON_BY_EXIT_CODE[exit_code],
        "message": message,
        "exitCode": exit_code,
        "seconds": None if seconds is None else round(seconds, 3),
        "modules": modules,
        "maxReconstructionError": _finite_or_none(max_reconstruction_error),
        "rank": rank,
        "output": output,
        "retention": None if retention is None else {k: _finite_or_none(v) for k, v in retention.items()},
    }
    return {k: v for k, v in result.items() if v is not None}


def encode_result(result: dict[str, Any], max_bytes: int = MAX_BYTES) -> bytes:
    """JSON of `result`, shortened to fit max_bytes."""
    result = dict(result)
    data = _dump(result)
    message = result.get("message", "")
    while len(data) > max_bytes and message:
        # Dropping as many characters as bytes overflow always frees at least that many bytes.
        message = message[: max(len(message) - (len(data) - max_bytes) - len(" [cut]"), 0)]
        result["message"] = message + " [cut]"
        data = _dump(result)
    if len(data) > max_bytes:
        result.pop("retention", None)
        data = _dump(result)
    return data


def write_result_file(path: Path, result: dict[str, Any]) -> None:
    with open(path, "wb") as f:  # not a rename: /dev/termination-log is a file mounted into the pod
        f.write(encode_result(result))


def _dump(result: dict[str, Any]) -> bytes:
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)
