"""The short JSON result summary (`--result-file`): in a pod it is the container's termination message,
which Kubernetes cuts at 4 KiB, and the operator parses it into the resource's status.

So it is always valid UTF-8 JSON under that size, whatever the message holds: text that came from
undecodable path bytes is shown as `\\xNN` escapes, optional keys are dropped first, and only then is
the message cut. `reason`, `exitCode` and `field` are never dropped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

MAX_BYTES = 4095  # "under 4 KiB": the kubelet keeps at most 4096 bytes

REASON_BY_EXIT_CODE = {0: "MergeSucceeded", 1: "MergeFailed", 2: "InvalidSpec", 3: "RetentionBelowThreshold"}
# Exit 2 because the output belongs to another resource (docs/interfaces.md #5).
OUTPUT_CONFLICT = "OutputConflict"
# Keys dropped, in this order, before the message is cut.
_OPTIONAL_KEYS = ("retention", "output", "maxReconstructionError", "rank", "modules", "seconds", "published")
_CUT = " [cut]"


def build_result(
    exit_code: int,
    message: str,
    *,
    reason: str | None = None,
    field: str | None = None,
    seconds: float | None = None,
    modules: int | None = None,
    max_reconstruction_error: float | None = None,
    rank: int | str | None = None,
    output: dict[str, str] | None = None,
    published: bool | None = None,
    retention: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """The summary of docs/interfaces.md #5; keys whose value is unknown are left out."""
    result: dict[str, Any] = {
        "reason": reason or REASON_BY_EXIT_CODE[exit_code],
        "exitCode": exit_code,
        "field": field,
        "message": message,
        "seconds": None if seconds is None else round(seconds, 3),
        "modules": modules,
        "maxReconstructionError": _finite_or_none(max_reconstruction_error),
        "rank": rank,
        "output": output,
        "published": published,
        "retention": None if retention is None else {k: _finite_or_none(v) for k, v in retention.items()},
    }
    return {k: v for k, v in result.items() if v is not None}


def encode_result(result: dict[str, Any], max_bytes: int = MAX_BYTES) -> bytes:
    """UTF-8 JSON of `result`, no longer than max_bytes."""
    result = _printable(result)
    for key in _OPTIONAL_KEYS:
        if len(_dump(result)) <= max_bytes:
            break
        result.pop(key, None)
    for key in ("message", "field"):  # a field is a short spec path; a YAML error's may be a long file name
        if len(_dump(result)) > max_bytes and key in result:
            result[key] = _cut(result, key, max_bytes)
    return _dump(result)


def write_result_file(path: Path, result: dict[str, Any]) -> None:
    with open(path, "wb") as f:  # not a rename: /dev/termination-log is a file mounted into the pod
        f.write(encode_result(result))


def _cut(result: dict[str, Any], key: str, max_bytes: int) -> str:
    """The longest start of result[key] (marked as cut) with which the whole result fits max_bytes."""
    text = result[key]

    def fits(keep: int) -> bool:
        return len(_dump({**result, key: text[:keep] + _CUT})) <= max_bytes

    low, high = 0, len(text)  # fits(low) is assumed; binary search for the largest keep that fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return text[:low] + _CUT


def printable(text: str) -> str:
    """Lone surrogates (undecodable bytes of an OS path, which Python keeps as \\udcNN) cannot be
    encoded as UTF-8: shown as \\xNN, which also tells the reader which byte it was."""
    return _SURROGATE.sub(_escape, text)


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _dump(result: dict[str, Any]) -> bytes:
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)
