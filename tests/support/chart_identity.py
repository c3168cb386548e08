"""The operator's identity as the Helm chart defines it, for tests that must not run as admin.

`operator_kubeconfig` renders the chart's ServiceAccounts and RBAC with `helm template`, applies them
to the test control plane and returns a kubeconfig holding a token of the operator's ServiceAccount,
so a rule missing from the chart fails the test that uses it (docs/interfaces.md #11).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[2] / "charts" / "adaptermerge"
RELEASE = "adaptermerge"
# The templates that define who the operator and the worker are and what they may do.
IDENTITY_TEMPLATES = ("templates/serviceaccounts.yaml", "templates/rbac.yaml")


def object_prefix(namespace: str) -> str:
    """The chart's fullnameOverride for a namespace: the ClusterRole and ClusterRoleBinding are
    cluster-wide, so each test namespace gets its own names instead of rebinding another test's."""
    name = f"am-{namespace}"
    if len(name) > 40:  # leaves room for suffixes the chart adds (e.g. "-worker")
        name = f"am-{namespace[:27]}-{hashlib.sha256(namespace.encode()).hexdigest()[:8]}"
    return name.rstrip("-")


def operator_service_account(namespace: str) -> str:
    return object_prefix(namespace)


def worker_service_account(namespace: str) -> str:
    return f"{object_prefix(namespace)}-worker"


def helm_template(
    helm: Path,
    namespace: str,
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    show_only: tuple[str, ...] = (),
) -> str:
    """`helm template` of the chart with `values` (types kept: written as JSON, which is YAML)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="values-") as values_file:
        json.dump(values or {}, values_file)
        values_file.flush()
        args = [str(helm), "template", release, str(CHART), "--namespace", namespace,
                "--values", values_file.name]
        for template in show_only:
            args += ["--show-only", template]
        done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"helm template failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def operator_kubeconfig(control_plane: Any, namespace: str, values: dict[str, Any] | None = None) -> Path:
    """Applies the chart's identity objects for a release in `namespace` and returns a kubeconfig
    that authenticates as the operator's ServiceAccount (a short-lived bound token)."""
    values = {"fullnameOverride": object_prefix(namespace), **(values or {})}
    manifest = helm_template(Path(control_plane.bin_dir) / "helm", namespace, values,
                             show_only=IDENTITY_TEMPLATES)
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    account = values.get("serviceAccount", {}).get("name") or operator_service_account(namespace)
    token = control_plane.kubectl(
        "create", "token", account, "--namespace", namespace, "--duration", "2h"
    ).stdout.strip()
    return Path(control_plane.kubeconfig_for_token(token))
