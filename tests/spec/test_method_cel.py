"""The CRD's CEL rules for the merge methods, on a real API server (server-side dry runs)."""

import copy

import pytest
import yaml

from merge_worker.crd import crd_yaml

pytestmark = pytest.mark.cluster

RESOURCE = {
    "apiVersion": "adaptermerge.io/v1alpha1",
    "kind": "AdapterMerge",
    "metadata": {"name": "m"},
    "spec": {
        "volume": {"claimName": "store"},
        "adapters": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
        "method": "ties",
        "output": {"path": "out"},
    },
}


@pytest.fixture(scope="module")
def crd(control_plane):
    control_plane.kubectl("apply", "-f", "-", input=crd_yaml())
    control_plane.wait_established("crd/adaptermerges.adaptermerge.io")


def dry_run(control_plane, namespace, **spec_changes):
    document = copy.deepcopy(RESOURCE)
    document["spec"].update(spec_changes)
    return control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(document), check=False)


@pytest.mark.parametrize(
    "changes",
    [
        {"parameters": {"conventions": "mergekit"}},
        {"adapters": [{"name": "a", "path": "a", "density": 0.3}, {"name": "b", "path": "b", "density": 0.6}]},
        {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.1, "rescale": "inverse-probability"}},
        {"method": "breadcrumbs", "adapters": [{"name": "a", "path": "a", "gamma": 0.05}, {"name": "b", "path": "b"}]},
        {"method": "sce", "parameters": {"selectTopk": 0.5}},
        {"method": "model_stock"},
        {"method": "nuslerp"},
    ],
)
def test_accepted(control_plane, namespace, crd, changes):
    done = dry_run(control_plane, namespace, **changes)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "parameters.density is required"),
        ({"adapters": [{"name": "a", "path": "a", "density": 0.3}, {"name": "b", "path": "b"}]},
         "parameters.density is required"),
        ({"method": "nuslerp", "adapters": [{"name": n, "path": n} for n in "abc"]}, "nuslerp needs exactly two"),
        ({"method": "model_stock", "adapters": [{"name": "a", "path": "a"}]}, "model_stock needs two adapters"),
        ({"parameters": {"density": 0.5, "rescale": "l2"}}, "spec.parameters.rescale"),
        ({"parameters": {"density": 0.5, "conventions": "peft"}}, "spec.parameters.conventions"),
    ],
)
def test_rejected(control_plane, namespace, crd, changes, message):
    done = dry_run(control_plane, namespace, **changes)
    assert done.returncode != 0
    assert message in done.stderr


def test_kubectl_get_shows_a_path_or_a_uri_output(control_plane, namespace, crd):
    """`kubectl get adaptermerges` names the output of either kind: a claim path or an s3:// / oci:// uri."""
    for name, output in (("to-path", {"path": "merged/out"}), ("to-uri", {"uri": "s3://bucket/merged/out"})):
        document = copy.deepcopy(RESOURCE)
        document["metadata"]["name"] = name
        document["spec"].update(method="linear", output=output)
        if "uri" in output:
            document["spec"]["adapters"] = [{"name": "a", "uri": "s3://bucket/a"}, {"name": "b", "uri": "s3://bucket/b"}]
            del document["spec"]["volume"]
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document))
    table = control_plane.kubectl("get", "adaptermerges", "-n", namespace).stdout.splitlines()
    header = table[0].split()
    assert header[:5] == ["NAME", "METHOD", "PHASE", "OUTPUT", "URI"], table[0]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "merged/out" in rows["to-path"] and "s3://" not in rows["to-path"]
    assert "s3://bucket/merged/out" in rows["to-uri"]
