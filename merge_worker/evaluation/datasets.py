"""Reads an evaluation dataset (JSONL lines {"prompt", "completion"}), checking every row it keeps.

Apart from evaluation.py (torch, transformers) so the runner can check datasets with the other inputs,
before anything is merged or written, and `validate` catches a bad line too.
"""

from __future__ import annotations

import json
import io
from pathlib import Path

from merge_worker.inputs.volume_files import InputFile, PathRefused, VolumeRoot
from merge_worker.spec import SpecError

MAX_LINE_BYTES = 1 << 20  # one example; a longer line is refused instead of read whole


def read_jsonl(file: InputFile | Path, field: str, max_examples: int | None = None) -> list[dict[str, str]]:
    """The first `max_examples` {"prompt", "completion"} rows; a bad line is a SpecError naming it.
    A plain path (scripts, tests) is opened within its own folder."""
    if not isinstance(file, InputFile):
        try:
            file = VolumeRoot(Path(file).parent).open_file(Path(file).name, Path(file))
        except PathRefused as exc:
            raise SpecError(field, f"{file} {exc}") from None
    rows: list[dict[str, str]] = []
    name = file.name
    lines = io.BufferedReader(_FileReader(file), buffer_size=1 << 16)
    for number in range(1, 1 << 62):
        if max_examples is not None and len(rows) >= max_examples:
            break
        raw = lines.readline(MAX_LINE_BYTES + 1)
        if not raw:
            break
        if len(raw) > MAX_LINE_BYTES:
            raise SpecError(field, f"{name} line {number}: longer than {MAX_LINE_BYTES} bytes")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # a binary or otherwise encoded file is bad input, not a crash
            raise SpecError(field, f"{name} is not UTF-8 text ({exc.reason} on line {number})") from None
        if line.strip():
            rows.append(_parse_row(line, f"{name} line {number}", field))
    if not rows:
        raise SpecError(field, f"{name} holds no examples")
    return rows


class _FileReader(io.RawIOBase):
    """Sequential reads of an opened input file (by offset: the fd may be shared)."""

    def __init__(self, file: InputFile):
        self._file, self._offset = file, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self._file.size - self._offset)
        if size <= 0:
            return 0
        self._file.readinto(memoryview(buffer)[:size], self._offset)
        self._offset += size
        return size


def _parse_row(line: str, where: str, field: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SpecError(field, f"{where}: not JSON ({exc.msg})") from None
    except RecursionError:
        raise SpecError(field, f"{where}: nested too deeply") from None
    if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str) and row["completion"]):
        raise SpecError(field, f"{where}: expected {{\"prompt\": str, \"completion\": non-empty str}}")
    return {"prompt": row["prompt"], "completion": row["completion"]}
