"""The selection/report split of each evaluation dataset.

An example belongs to the search split when a hash of (seed, prompt, completion) falls below
`selectionFraction`, else to the report split. By content, not by line number: the split does not move
when rows are reordered or added, and duplicated rows land on the same side, so the final report never
scores an example the search selected with, not even a copy of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

Part = Literal["search", "report"]


def in_search_split(row: dict[str, str], seed: int, fraction: float) -> bool:
    key = json.dumps([seed, row["prompt"], row["completion"]], ensure_ascii=False).encode()
    draw = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    return draw < fraction


def split_part(rows: list[dict[str, str]], part: Part, seed: int, fraction: float) -> list[dict[str, str]]:
    """The rows of `part`, in their file order."""
    return [r for r in rows if in_search_split(r, seed, fraction) == (part == "search")]
