"""`adaptermerge operator [kopf run options]`: the operator process (contract 6 and 9).

Every option is kopf's own `kopf run` option (-n/--namespace, -A/--all-namespaces, --standalone,
--peering, --priority, --liveness, --verbose, ...); the handlers module is loaded implicitly.
"""

from __future__ import annotations

import sys

from adaptermerge_operator.settings import Settings, SettingsError

HANDLERS_MODULE = "adaptermerge_operator.handlers"


def run_operator(argv: list[str]) -> int:
    """Runs the operator until it is stopped; returns the process exit code (API.md)."""
    try:
        Settings.from_env()  # fail before connecting to anything, naming the variable
    except SettingsError as error:
        print(f"adaptermerge operator: {error}", file=sys.stderr)
        return 2
    from kopf.cli import main as kopf_main  # imported late: `adaptermerge --help` stays quick

    try:
        kopf_main.main(
            args=["run", "--module", HANDLERS_MODULE, *argv],
            prog_name="adaptermerge operator",
            standalone_mode=True,
        )
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0
