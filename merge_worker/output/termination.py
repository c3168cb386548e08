"""SIGTERM (a deleted pod) and Ctrl-C unwind the run like an exception until the output is published,
so the temporary folder is removed on the way out and "nothing was written" is true. From the moment the
rename starts, they are only noted: the output is there, and the run finishes its last steps (removing
the replaced output, writing the result) instead of reporting a failure that did not happen.
"""

from __future__ import annotations

import signal

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _State:
    committing = False  # the rename has started: interrupts are noted, not raised
    noted: int | None = None


def install() -> dict[int, object] | None:
    """Installs the handlers; returns the previous ones for restore() (None off the main thread, where
    Python cannot set handlers)."""
    _State.committing, _State.noted = False, None

    def interrupt(signum, frame):
        if _State.committing:
            _State.noted = signum
            return
        raise KeyboardInterrupt

    try:
        return {sig: signal.signal(sig, interrupt) for sig in _SIGNALS}
    except ValueError:
        return None


def restore(previous: dict[int, object] | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)
    _State.committing = False


def begin_commit() -> None:
    """Called just before the rename that publishes the output: from here on, interrupts are noted."""
    _State.committing = True


def abort_commit() -> None:
    """The rename failed (nothing was published): interrupts raise again."""
    _State.committing = False


def noted_signal() -> str | None:
    """The name of a signal that arrived after publishing began, if any."""
    return None if _State.noted is None else signal.Signals(_State.noted).name
