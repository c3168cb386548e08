"""The base of errors about an unusable input file or folder (an adapter, the base model's weights)."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """The message names the path at fault; the runner turns it into a SpecError naming the spec field."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
