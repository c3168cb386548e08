"""`adaptermerge operator [kopf run options]`: the operator process (docs/interfaces.md #6 and #9).

Every option is kopf's own `kopf run` option (-n/--namespace, -A/--all-namespaces, --standalone,
--peering, --priority, --liveness, --verbose, ...); the handlers module is loaded implicitly.
"""

from __future__ import annotations

import re
import sys
from typing import Collection

from adaptermerge_operator.settings import Settings, SettingsError

HANDLERS_MODULE = "adaptermerge_operator.handlers"
PROG = "adaptermerge operator"
_NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def serves_fixed_namespaces(namespaces: Collection[str], clusterwide: bool) -> bool:
    """Only named namespaces (no patterns): nothing to discover, so no namespace list/watch.

    Least-privilege RBAC (docs/interfaces.md #10) grants namespaces list/watch in cluster-wide mode only; without
    it kopf would retry the forbidden listing for about a minute before every start."""
    return bool(namespaces) and not clusterwide and all(_NAMESPACE_NAME.match(n) for n in namespaces)


def run_operator(argv: list[str]) -> int:
    """Runs the operator until it is stopped; returns the process exit code (API.md)."""
    try:
        Settings.from_env()  # fail before connecting to anything, naming the variable
    except SettingsError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    import click  # kopf's CLI machinery; imported late so `adaptermerge --help` stays quick
    import kopf
    from kopf.cli import CLIControls
    from kopf.cli import main as kopf_main

    run = kopf_main.commands["run"]
    try:
        with run.make_context(PROG, ["--module", HANDLERS_MODULE, *argv]) as ctx:
            settings = kopf.OperatorSettings()
            # Scanning also watches CRDs; with fixed namespaces the CRD must exist at start-up
            # (Helm installs CRDs before the operator's Deployment).
            settings.scanning.disabled = serves_fixed_namespaces(ctx.params["namespaces"], ctx.params["clusterwide"])
            ctx.obj = CLIControls(settings=settings)
            run.invoke(ctx)
    except click.exceptions.Exit as stop:  # --help
        return stop.exit_code
    except click.ClickException as error:  # unknown option, bad value
        error.show()
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
