"""The control plane itself: built versions, RBAC really enforced, tokens for other identities."""

from __future__ import annotations

import json
import os
import re

import pytest

from support.control_plane import REPO

pytestmark = pytest.mark.cluster


def configured_version(variable: str) -> str:
    """The version scripts/build-control-plane.sh builds (its default, or the environment's override)."""
    script = (REPO / "scripts" / "build-control-plane.sh").read_text()
    default = re.search(rf"^{variable}=\$\{{{variable}:-(v[\d.]+)\}}", script, re.M).group(1)
    return os.environ.get(variable, default)


def test_server_and_kubectl_report_the_built_version(control_plane):
    expected = configured_version("K8S_VERSION")
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)

    assert versions["serverVersion"]["gitVersion"] == expected
    assert versions["clientVersion"]["gitVersion"] == expected
    # The minor version is what skew checks and helm's kubeVersion constraints read.
    assert versions["serverVersion"]["minor"] == expected.split(".")[1]
    status, body = control_plane.get("/version")
    assert status == 200 and json.loads(body)["gitVersion"] == expected


def test_helm_reports_the_built_version(control_plane):
    import subprocess

    helm = subprocess.run([str(control_plane.bin_dir / "helm"), "version", "--short"],
                          capture_output=True, text=True, check=True)
    assert helm.stdout.startswith(configured_version("HELM_VERSION"))


def test_rbac_is_enforced_for_a_service_account_token(control_plane, namespace):
    control_plane.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    token = control_plane.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    kubeconfig = control_plane.kubeconfig_for_token(token)

    denied = control_plane.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr

    control_plane.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=list", "--resource=pods")
    control_plane.kubectl("create", "rolebinding", "reader", "-n", namespace, "--role=pod-reader",
                          f"--serviceaccount={namespace}:reader")
    allowed = control_plane.kubectl("auth", "can-i", "list", "pods", "-n", namespace, kubeconfig=kubeconfig,
                                    check=False)
    assert allowed.stdout.strip() == "yes"
    still_denied = control_plane.kubectl("auth", "can-i", "delete", "pods", "-n", namespace,
                                         kubeconfig=kubeconfig, check=False)
    assert still_denied.stdout.strip() == "no"
