"""examples/gitops/: the AdapterMerges it declares are valid, and the Argo CD Application and the Flux
Kustomization point at the folder that holds them."""

from __future__ import annotations

from pathlib import Path

import yaml

from merge_worker.spec import parse_resource

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "examples" / "gitops"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization_resources() -> list[Path]:
    kustomization = yaml.safe_load((GITOPS / "adaptermerges" / "kustomization.yaml").read_text())
    return [GITOPS / "adaptermerges" / name for name in kustomization["resources"]]


def test_kustomization_lists_valid_adaptermerges():
    resources = kustomization_resources()
    assert resources
    for path in resources:
        for doc in load_all(path):
            assert parse_resource(doc).kind == "AdapterMerge"


def test_every_adaptermerge_file_is_in_the_kustomization():
    listed = set(kustomization_resources())
    on_disk = {p for p in (GITOPS / "adaptermerges").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == listed


def test_argocd_application_syncs_the_adaptermerges_folder():
    (app,) = load_all(GITOPS / "argocd-application.yaml")
    assert app["kind"] == "Application" and app["apiVersion"] == "argoproj.io/v1alpha1"
    assert REPO / app["spec"]["source"]["path"] == GITOPS / "adaptermerges"


def test_flux_kustomization_applies_the_adaptermerges_folder_from_its_source():
    docs = {doc["kind"]: doc for doc in load_all(GITOPS / "flux-kustomization.yaml")}
    kustomization, source = docs["Kustomization"], docs["GitRepository"]
    assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert (REPO / kustomization["spec"]["path"]).resolve() == GITOPS / "adaptermerges"
