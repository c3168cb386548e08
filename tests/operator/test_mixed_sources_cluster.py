"""One AdapterMerge whose adapters come from two kinds of store at once, an S3 bucket (versitygw) and an
OCI registry behind htpasswd auth (distribution), and whose output is pushed to the registry: through
the operator on the real control plane, with each store's credentials only in its own Secret
(docs/storage.md). The status names the pushed digest; the merge manifest inside the artifact records
both sources; no credential appears in the status, the events or the operator's log."""

from __future__ import annotations

import base64
import json
import secrets

import pytest
import yaml
from support.oci_registry import running_oci_registry
from support.operator_harness import TIMEOUT, apply, get, ready, resource
from support.s3_server import running_s3_server
from support.storage_cli import files_of

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    with running_s3_server(tmp_path_factory.mktemp("s3")) as s3, \
            running_oci_registry(tmp_path_factory.mktemp("registry"), auth=True) as registry:
        yield s3, registry


def test_adapters_from_a_bucket_and_a_registry_into_the_registry(control_plane, namespace, operator, stores,
                                                                 tiny_adapters):
    s3, registry = stores
    bucket = "mixed-" + secrets.token_hex(4)
    s3.client().create_bucket(Bucket=bucket)
    s3.upload_folder(tiny_adapters / "a", bucket, "adapters/a")
    b_digest = registry.push_artifact("mixed/b", "v1", files_of(tiny_adapters / "b"))
    credentials = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"}, "type": "Opaque",
                   "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(credentials))
    control_plane.kubectl("create", "secret", "docker-registry", "regcred", "-n", namespace,
                          f"--docker-server={registry.host}", f"--docker-username={registry.username}",
                          f"--docker-password={registry.password}")

    a_uri, b_uri = f"s3://{bucket}/adapters/a", f"oci://{registry.host}/mixed/b:v1"
    out = f"oci://{registry.host}/mixed/merged-{namespace}:v1"
    document = resource("mixed", "", method="ties", parameters={"density": 0.5},
                        storage={"endpoint": s3.endpoint, "credentialsSecret": "s3-credentials"},
                        registry={"credentialsSecret": "regcred", "insecure": True},
                        adapters=[{"name": "a", "uri": a_uri, "weight": 0.7}, {"name": "b", "uri": b_uri}],
                        output={"uri": out, "rank": 4},
                        job={"gpus": 0, "backoffLimit": 1, "activeDeadlineSeconds": 600})
    del document["spec"]["volume"]  # no claim at all
    apply(control_plane, namespace, document)

    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/mixed",
                                   f"--timeout={TIMEOUT}s", check=False)
    merge = get(control_plane, namespace, "adaptermerge", "mixed")
    assert waited.returncode == 0, f"{merge.get('status')}\n{operator.log()}\n{control_plane.logs()}"
    assert ready(merge)["reason"] == "MergeSucceeded"
    pushed, digest = registry.manifest(f"mixed/merged-{namespace}", "v1")
    assert merge["status"]["output"] == {"uri": out, "format": "adapter", "rank": 4, "digest": digest}

    # The merge manifest travels in the artifact: both sources, each with what pins it.
    layer = next(l for l in pushed["layers"]
                 if l.get("annotations", {}).get("org.opencontainers.image.title") == "merge-manifest.json")
    manifest = json.loads(registry.blob(f"mixed/merged-{namespace}", layer["digest"]))
    sources = {s["uri"]: s for s in manifest["sources"]}
    assert set(sources) == {a_uri, b_uri}
    assert sources[b_uri]["digest"] == b_digest

    leaks = [s3.secret_key, s3.access_key, registry.password,
             base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()]
    events = get(control_plane, namespace, "events")
    for text in (json.dumps(merge), json.dumps(events), json.dumps(manifest), operator.log()):
        for leak in leaks:
            assert leak not in text
