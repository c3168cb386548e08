"""What a merge tells the person (or pod log) watching it: a progress bar per module on a terminal,
plain log lines otherwise (pod logs would be flooded by bar redraws), and summary tables at the end.
Messages go to stderr; the summary tables go to stdout.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class ModuleRecord:
    name: str
    rank: int | None  # None for a merged model's exact dense delta
    relative_error: float
    note: str = ""


def log(message: str, stream: TextIO | None = None) -> None:
    print(f"adaptermerge: {message}", file=stream or sys.stderr, flush=True)


class ModuleProgress:
    """Counts merged modules: a tqdm bar on a terminal, else a log line every 10% (and the last)."""

    def __init__(self, total: int, *, stream: TextIO | None = None, tty: bool | None = None):
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._next_log = 0
        self._bar = None
        if self._stream.isatty() if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="module", file=self._stream, dynamic_ncols=True)

    def update(self, record: ModuleRecord) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"rank {record.rank} err {record.relative_error:.2e}", refresh=False)
            self._bar.update(1)
            return
        if self.done * 10 >= self._next_log * self.total or self.done == self.total:
            self._next_log = self.done * 10 // max(self.total, 1) + 1
            seconds = time.monotonic() - self._started
            log(f"merged {self.done}/{self.total} modules ({seconds:.1f}s; last {record.name}, "
                f"rank {record.rank}, error {record.relative_error:.2e})", self._stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def merge_summary(records: list[ModuleRecord], seconds: float) -> str:
    ranks = [r.rank for r in records if r.rank is not None]
    errors = [r.relative_error for r in records]
    if not ranks:
        rank_text = "exact" if records else "-"
    elif min(ranks) == max(ranks):
        rank_text = str(ranks[0])
    else:
        rank_text = f"{min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})"
    row = [len(records), rank_text, max(errors, default=0.0), sum(errors) / max(len(errors), 1), seconds]
    return format_table(["modules", "rank", "max error", "mean error", "seconds"], [row])


def evaluation_summary(evaluation: dict[str, Any]) -> str:
    rows = []
    for name, d in evaluation.get("datasets", {}).items():
        exact = d.get("exactMatch")
        exact_text = "/".join(_cell(exact.get(k)) for k in ("base", "source", "merged")) if exact else None
        rows.append([name, d.get("adapter"), d.get("examples"), d.get("baseLoss"), d.get("sourceLoss"),
                     d.get("mergedLoss"), d.get("retention"), exact_text])
    table = format_table(
        ["dataset", "adapter", "examples", "base loss", "source loss", "merged loss", "retention",
         "exact match b/s/m"],
        rows,
    )
    verdict = "passed" if evaluation.get("passed") else "FAILED"
    threshold = evaluation.get("minRetention")
    tail = f"evaluation {verdict}" + (f" (minRetention {threshold})" if threshold is not None else "")
    quant = evaluation.get("quantization")
    if quant and quant != "none":
        tail += f"; base loaded as {quant}"
    if evaluation.get("note"):
        tail += f"; {evaluation['note']}"
    return f"{table}\n{tail}"
