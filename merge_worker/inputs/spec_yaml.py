"""Loads the AdapterMerge YAML file into plain data, refusing what YAML allows but a spec never needs:
aliases (`*name`, the tool of "billion laughs" bombs: a few lines that expand to gigabytes when
validated or dumped), nesting deeper than MAX_SPEC_DEPTH (recursion in the parser and validators), NUL
and other control characters in strings (line breaks too, outside metadata), and files over
MAX_SPEC_BYTES. Each refusal is a SpecError
naming the file (and line, where YAML knows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merge_worker.spec import SpecError

MAX_SPEC_BYTES = 1 << 20  # Kubernetes objects are at most ~1.5 MB; a spec is a few hundred bytes
MAX_SPEC_DEPTH = 32


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting while composing (before anything is built)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a spec",
                                              event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_spec_document(path: Path) -> Any:
    """The one YAML document of `path`, as plain data."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(str(path), f"cannot read the file: {exc.strerror}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(path), f"larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), f"not UTF-8 text (at byte {exc.start})") from None
    try:
        documents = [d for d in yaml.load_all(text, Loader=_SpecLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or _first_line(str(exc))
        context = getattr(exc, "context", None)
        raise SpecError(where, f"malformed YAML: {problem}" + (f" ({context})" if context else "")) from None
    except RecursionError:
        raise SpecError(str(path), "malformed YAML: nested too deeply") from None
    if len(documents) != 1:
        raise SpecError(str(path), f"expected one YAML document (an AdapterMerge), found {len(documents)}")
    _check_strings(documents[0], str(path))
    return documents[0]


def _check_strings(value: Any, path: str, where: str = "", whitespace: str = "") -> None:
    """NUL and other control characters in any key or value are refused: they would end up in paths,
    names and messages. Only metadata (annotations may hold text) keeps tab, newline and return."""
    if isinstance(value, str):
        if any((ord(c) < 32 or c == "\x7f") and c not in whitespace for c in value):
            raise SpecError(where or path, "holds a control character (such as NUL or a line break)")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            text = whitespace or ("\t\n\r" if not where and key in ("metadata", "status") else "")
            _check_strings(key, path, where or path, whitespace)
            _check_strings(item, path, name if str(key).isprintable() else where or path, text)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, path, f"{where}[{i}]", whitespace)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unreadable"
