"""The Job gives the worker spec.registry.credentialsSecret as a read-only Docker config (DOCKER_CONFIG),
through a Secret volume the kubelet fills: the operator never reads the Secret."""

from __future__ import annotations

from merge_worker.spec import parse_spec

from adaptermerge_operator import job_manifest
from adaptermerge_operator.settings import Settings

SPEC = {"adapters": [{"name": "a", "uri": "oci://reg.example.com/adapters/a:v1"}], "method": "linear",
        "output": {"uri": "oci://reg.example.com/merged/a:v1"}}
MERGE = {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
         "metadata": {"name": "dev", "namespace": "team", "uid": "uid-1", "generation": 1}, "spec": SPEC}


def _pod(spec: dict) -> dict:
    job = job_manifest.render_job({**MERGE, "spec": spec}, parse_spec(spec), Settings())
    return job["spec"]["template"]["spec"]


def test_credentials_secret_is_mounted_read_only_as_docker_config():
    pod = _pod({**SPEC, "registry": {"credentialsSecret": "regcred"}})
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "regcred"
    assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    [worker] = pod["containers"]
    [mount] = [m for m in worker["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert {"name": "DOCKER_CONFIG", "value": mount["mountPath"]} in worker["env"]


def test_no_secret_no_volume():
    pod = _pod({**SPEC, "registry": {"insecure": True}})
    assert not [v for v in pod["volumes"] if "secret" in v]
    assert "DOCKER_CONFIG" not in {e["name"] for e in pod["containers"][0]["env"]}
