"""The chart's output is accepted by a real API server: `helm template` with default, namespaced and
HA values, applied with `kubectl apply --dry-run=server` (full validation and admission, nothing
stored). The example AdapterMerge for GitOps passes the real CRD's validation the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.chart_identity import helm_template, object_prefix
from support.control_plane import wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cluster


def server_dry_run(control_plane, helm: Path, namespace: str, values: dict) -> str:
    manifest = helm_template(helm, namespace, {"fullnameOverride": object_prefix(namespace), **values})
    done = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_default_values_apply(control_plane, helm, chart_crds, namespace):
    out = server_dry_run(control_plane, helm, namespace, {})
    for kind in ("serviceaccount", "clusterrole.rbac", "clusterrolebinding.rbac", "deployment.apps"):
        assert kind in out


def test_namespaced_values_apply(control_plane, helm, chart_crds, namespace, extra_namespace):
    out = server_dry_run(control_plane, helm, namespace, {"watchNamespaces": [namespace, extra_namespace]})
    kinds = [line.split("/")[0] for line in out.splitlines()]
    assert kinds.count("role.rbac.authorization.k8s.io") == 2
    assert kinds.count("rolebinding.rbac.authorization.k8s.io") == 2


def test_ha_values_apply(control_plane, helm, chart_crds, namespace, extra_namespace):
    out = server_dry_run(control_plane, helm, namespace, {"replicas": 3, "strategyType": "RollingUpdate"})
    assert "clusterkopfpeering.kopf.dev/" in out
    out = server_dry_run(control_plane, helm, namespace, {"replicas": 2, "watchNamespaces": [extra_namespace]})
    assert "kopfpeering.kopf.dev/" in out


def test_crds_as_templates_apply(control_plane, helm, chart_crds, namespace):
    out = server_dry_run(control_plane, helm, namespace, {"crds": {"asTemplates": True}})
    assert "customresourcedefinition.apiextensions.k8s.io/adaptermerges.adaptermerge.io" in out


def test_gitops_example_passes_the_crd(control_plane, chart_crds, namespace):
    example = REPO / "examples" / "gitops" / "adaptermerges" / "dev-assistant.yaml"
    done = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
    assert done.returncode == 0, done.stderr
    broken = example.read_text().replace("method: ties", "method: average")
    done = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=broken, check=False)
    assert done.returncode != 0 and "spec.method" in done.stderr


def test_kubectl_explain_documents_the_fields_and_their_defaults(control_plane, chart_crds):
    def explain(path: str) -> str:
        # kubectl reads the OpenAPI document the API server publishes a moment after the CRD.
        done = wait_until(lambda: (lambda d: d if d.returncode == 0 and "DESCRIPTION" in d.stdout else None)(
            control_plane.kubectl("explain", path, check=False)), 60, f"kubectl explain {path}")
        return " ".join(done.stdout.split())

    output = explain("adaptermerge.spec.output")
    assert "The merged adapter or model to write." in output
    assert "Rank of the merged adapter, or auto" in output and "Defaults to 16." in output
    assert "Defaults to \"adapter\"." in output
    assert "Taints the worker pod tolerates" in explain("adaptermerge.spec.job")
