"""Through the operator: an AdapterMerge whose adapters are pulled from a real registry behind htpasswd
auth, with the credentials in a kubernetes.io/dockerconfigjson Secret the Job mounts (the test kubelet
fills the volume; the operator, holding the chart's identity, cannot read Secrets), goes Ready; the
password appears in no status, event, Job or operator log. The output goes to a claim: reporting a
`uri` output in status is the operator's storage work (docs/storage.md, "Not done yet")."""

from __future__ import annotations

import base64
import json
import time

import pytest
from support.storage_cli import files_of
from support.operator_harness import TIMEOUT, Operator, apply, get, jobs, ready, resource

pytestmark = pytest.mark.cluster

CRD_FILE = "crds/adaptermerge.io_adaptermerges.yaml"


@pytest.fixture
def operator(control_plane, namespace, test_kubelet, tmp_path):
    from support.chart_identity import operator_kubeconfig, worker_service_account

    control_plane.kubectl("apply", "-f", CRD_FILE)
    # `kubectl wait` right after the apply was seen to fail once (the CRD not visible yet): poll instead.
    deadline = time.monotonic() + 60
    while not any(c["type"] == "Established" and c["status"] == "True" for c in control_plane.get_json(
            "crd", "adaptermerges.adaptermerge.io").get("status", {}).get("conditions") or []):
        assert time.monotonic() < deadline, "the CRD was not Established in 60 s"
        time.sleep(0.2)
    running = Operator(operator_kubeconfig(control_plane, namespace, {"watchNamespaces": [namespace]}), namespace,
                       worker_service_account(namespace), tmp_path)
    running.start()
    yield running
    running.stop()


def test_adapters_from_a_private_registry_through_the_operator(control_plane, namespace, operator, claims_root,
                                                                oci_registry_auth, tiny_store):
    reg = oci_registry_auth
    a_digest = reg.push_artifact("cluster/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("cluster/b", "v1", files_of(tiny_store / "adapters" / "b"))
    control_plane.kubectl("create", "secret", "docker-registry", "regcred", "-n", namespace,
                          f"--docker-server={reg.host}", f"--docker-username={reg.username}",
                          f"--docker-password={reg.password}")
    claim = f"{namespace}-out"
    (claims_root / claim).mkdir()
    document = resource("pulled", claim, method="linear", parameters={},
                        registry={"credentialsSecret": "regcred", "insecure": True},
                        adapters=[{"name": "a", "uri": f"oci://{reg.host}/cluster/a@{a_digest}"},
                                  {"name": "b", "uri": f"oci://{reg.host}/cluster/b:v1"}])
    apply(control_plane, namespace, document)

    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/pulled",
                                   f"--timeout={TIMEOUT}s", check=False)
    merge = get(control_plane, namespace, "adaptermerge", "pulled")
    assert waited.returncode == 0, f"{merge.get('status')}\n{operator.log()}\n{control_plane.logs()}"
    assert ready(merge)["reason"] == "MergeSucceeded"
    manifest = json.loads((claims_root / claim / "merged" / "pulled" / "merge-manifest.json").read_text())
    assert [(s["uri"], s["digest"]) for s in manifest["sources"]][0] == (
        f"oci://{reg.host}/cluster/a@{a_digest}", a_digest)
    assert manifest["sources"][1]["digest"] == reg.manifest("cluster/b", "v1")[1]

    [job] = jobs(control_plane, namespace)
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "regcred"}.items() <= next(v["secret"] for v in volumes if "secret" in v).items()
    events = get(control_plane, namespace, "events")
    secrets = [reg.password, base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()]
    for text in (json.dumps(merge), json.dumps(job), json.dumps(events), operator.log()):
        for secret in secrets:
            assert secret not in text
    # The operator's identity cannot read the Secret (the kubelet did).
    denied = control_plane.kubectl("--kubeconfig", str(operator.kubeconfig), "get", "secret", "regcred", "-n",
                                   namespace, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_an_oci_output_through_the_operator_reports_its_digest(control_plane, namespace, operator,
                                                                oci_registry_auth, tiny_store):
    """No claim at all: adapters pulled and the output pushed to the private registry; status.output
    carries the uri and the digest of the pushed manifest, which is what the registry's tag names."""
    reg = oci_registry_auth
    reg.push_artifact("cluster/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("cluster/b", "v1", files_of(tiny_store / "adapters" / "b"))
    control_plane.kubectl("create", "secret", "docker-registry", "regcred", "-n", namespace,
                          f"--docker-server={reg.host}", f"--docker-username={reg.username}",
                          f"--docker-password={reg.password}")
    out = f"oci://{reg.host}/cluster/merged-{namespace}:v1"
    document = resource("pushed", "unused", method="linear", parameters={},
                        registry={"credentialsSecret": "regcred", "insecure": True},
                        adapters=[{"name": "a", "uri": f"oci://{reg.host}/cluster/a:v1"},
                                  {"name": "b", "uri": f"oci://{reg.host}/cluster/b:v1"}],
                        output={"uri": out, "rank": 4})
    del document["spec"]["volume"]
    apply(control_plane, namespace, document)

    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/pushed",
                                   f"--timeout={TIMEOUT}s", check=False)
    merge = get(control_plane, namespace, "adaptermerge", "pushed")
    assert waited.returncode == 0, f"{merge.get('status')}\n{operator.log()}\n{control_plane.logs()}"
    _, digest = reg.manifest(f"cluster/merged-{namespace}", "v1")
    assert merge["status"]["output"] == {"uri": out, "format": "adapter", "rank": 4, "digest": digest}
    secrets = [reg.password, base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()]
    for text in (json.dumps(merge), operator.log()):
        for secret in secrets:
            assert secret not in text
