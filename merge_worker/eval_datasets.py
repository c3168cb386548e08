"""Reads an evaluation dataset (JSONL lines {"prompt", "completion"}), checking every row it keeps.

Apart from evaluation.py (torch, transformers) so the runner can check datasets with the other inputs,
before anything is merged or written, and `validate` catches a bad line too.
"""

from __future__ import annotations

import json
from pathlib import Path

from merge_worker.spec import SpecError


def read_jsonl(path: Path, field: str, max_examples: int | None = None) -> list[dict[str, str]]:
    """The first `max_examples` {"prompt", "completion"} rows; a bad line is a SpecError naming it."""
    rows: list[dict[str, str]] = []
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if max_examples is not None and len(rows) >= max_examples:
                    break
                if line.strip():
                    rows.append(_parse_row(line, f"{path.name} line {number}", field))
    except UnicodeDecodeError as exc:  # a binary or otherwise encoded file is bad input, not a crash
        raise SpecError(field, f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise SpecError(field, f"{path.name} holds no examples")
    return rows


def _parse_row(line: str, where: str, field: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SpecError(field, f"{where}: not JSON ({exc.msg})") from None
    if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str) and row["completion"]):
        raise SpecError(field, f"{where}: expected {{\"prompt\": str, \"completion\": non-empty str}}")
    return {"prompt": row["prompt"], "completion": row["completion"]}
