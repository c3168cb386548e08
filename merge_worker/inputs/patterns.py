"""PEFT's rank_pattern / alpha_pattern lookup, bounded in time.

PEFT matches a key as a regular expression against a module's name or a suffix of it that starts
after a '.': `re.match(rf"(.*\\.)?({key})$", name)`, the first key (in the file's order) that matches
wins. Python's `re` backtracks, so a key like `(a|a)*x` takes exponential time, and `re` cannot be
interrupted (it holds the GIL). So keys that are plain names (letters, digits, '_', '-': no regex
syntax) are matched by comparing strings, and the others are matched in a forked child process that is
killed when it runs over MATCH_SECONDS. The key count and length are bounded by the config model.
"""

from __future__ import annotations

import os
import re
import select
import signal
import struct
import time

MAX_PATTERN_KEYS = 2048
MAX_KEY_LENGTH = 256
MATCH_SECONDS = 10.0
_PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")


class PatternError(ValueError):
    """A key that cannot be matched in time; the message starts with the module being matched."""


def compile_key(key: str) -> re.Pattern[str]:
    """The key as PEFT applies it; raises ValueError (re.error) for an invalid regular expression."""
    return re.compile(rf"(.*\.)?({key})$")


def first_matches(keys: list[str], modules: list[str]) -> dict[str, int | None]:
    """For each module, the index of the first key matching it (PEFT's rule), or None."""
    plain = {}
    for index, key in enumerate(keys):
        if _PLAIN.match(key):
            plain.setdefault(key, index)
    regex = [(index, key) for index, key in enumerate(keys) if not _PLAIN.match(key)]
    found: dict[str, int | None] = {}
    for module in modules:
        # A plain key has no '.', so only the name's last part can equal it.
        found[module] = plain.get(module.rpartition(".")[2])
    if regex:
        for module, index in zip(modules, _match_in_child(regex, modules, MATCH_SECONDS)):
            if index is not None and (found[module] is None or index < found[module]):
                found[module] = index
    return found


def _match_in_child(regex: list[tuple[int, str]], modules: list[str], seconds: float) -> list[int | None]:
    """Matches in a forked child that reports one 4-byte index per module (-1: none) through a pipe."""
    compiled = [(index, compile_key(key)) for index, key in regex]  # here: the child only matches
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: match, report, and leave without running any cleanup of the parent's
        try:
            os.close(read_end)
            for module in modules:
                index = next((i for i, pattern in compiled if pattern.match(module)), -1)
                os.write(write_end, struct.pack("<i", index))
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + seconds
    poll = select.poll()  # not select(): with many inputs open, the pipe's fd may exceed FD_SETSIZE
    poll.register(read_end, select.POLLIN)
    try:
        while len(data) < 4 * len(modules):
            left = deadline - time.monotonic()
            if left <= 0 or not poll.poll(left * 1000):
                module = modules[len(data) // 4]
                raise PatternError(f"matching module {module} against the keys did not finish within "
                                   f"{seconds:g} s (a regular expression that backtracks catastrophically?)")
            chunk = os.read(read_end, 65536)
            if not chunk:
                raise PatternError("the keys could not be matched (the matching process ended early)")
            data += chunk
    finally:
        os.close(read_end)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    return [None if i < 0 else i for i in struct.unpack(f"<{len(modules)}i", data)]
