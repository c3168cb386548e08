"""s3:// through the operator (docs/storage.md): adapters from a bucket, the output pushed to it, on the
real control plane with the test kubelet running the real worker, a real S3-compatible server (versitygw
on loopback, tests/support/s3_server.py) and the operator holding the chart's identity. The worker gets
its credentials only from the Secret spec.storage.credentialsSecret names (env from secretKeyRef: the
test kubelet reads it, as a kubelet does); the tests grep everything the run leaves for them.
"""

from __future__ import annotations

import json
import secrets

import pytest
import yaml
from support.operator_harness import TIMEOUT, apply, events_of, get, jobs, phase_is, ready, resource, wait_until
from support.s3_server import running_s3_server

pytestmark = pytest.mark.cluster

SECRET = "s3-credentials"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with running_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture
def bucket(s3_server, tiny_adapters):
    """A fresh bucket holding the two tiny adapters under adapters/a and adapters/b."""
    name = "test-" + secrets.token_hex(6)
    s3_server.client().create_bucket(Bucket=name)
    for adapter in ("a", "b"):
        s3_server.upload_folder(tiny_adapters / adapter, name, f"adapters/{adapter}")
    return name


def merge(name: str, server, bucket: str, output: str, **spec) -> dict:
    """The harness's merge (tests/support/operator_harness.py) with every path a uri in the bucket."""
    uris = {
        "storage": {"endpoint": server.endpoint, "credentialsSecret": SECRET},
        "adapters": [{"name": "a", "uri": f"s3://{bucket}/adapters/a", "weight": 0.7},
                     {"name": "b", "uri": f"s3://{bucket}/adapters/b"}],
        "output": {"uri": f"s3://{bucket}/{output}", "rank": 4},
        "job": {"gpus": 0, "backoffLimit": 1, "activeDeadlineSeconds": 600},
    }
    document = resource(name, "", **{**uris, **spec})
    del document["spec"]["volume"]  # no claim at all
    return document


def create_secret(control_plane, namespace: str, server, *, keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")) -> None:
    """What a platform team does (docs/install.md): the keys the worker's env takes, from stdin."""
    values = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
              "stringData": {key: values[key] for key in keys}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(secret))


def objects(server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def manifest_of(server, bucket: str, prefix: str) -> dict:
    return json.loads(objects(server, bucket, prefix)[f"{prefix}/merge-manifest.json"])


def test_a_merge_from_a_bucket_to_a_bucket_goes_ready_and_leaks_no_credential(
        control_plane, namespace, operator, s3_server, bucket, test_kubelet):
    create_secret(control_plane, namespace, s3_server)
    apply(control_plane, namespace, merge("dev", s3_server, bucket, "merged/dev"))
    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/dev",
                                   f"--timeout={TIMEOUT}s", check=False)
    assert waited.returncode == 0, f"{waited.stderr}\n{operator.log()}\n{control_plane.logs()}"

    resource = get(control_plane, namespace, "adaptermerge", "dev")
    uri = f"s3://{bucket}/merged/dev"
    assert resource["status"]["output"] == {"uri": uri, "format": "adapter", "rank": 4}
    assert ready(resource)["message"].endswith(f"into {uri}"), ready(resource)
    written = objects(s3_server, bucket, "merged/dev/")
    assert set(written) == {f"merged/dev/{n}" for n in
                            ("adapter_config.json", "adapter_model.safetensors", "merge-manifest.json")}
    manifest = json.loads(written["merged/dev/merge-manifest.json"])
    assert manifest["owner"]["uid"] == resource["metadata"]["uid"]
    assert [s["uri"] for s in manifest["sources"]] == [f"s3://{bucket}/adapters/a", f"s3://{bucket}/adapters/b"]

    # The Job names the Secret and its keys only; no claim, a scratch emptyDir.
    [job] = jobs(control_plane, namespace)
    pod_spec = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod_spec["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == SECRET
    assert [v["name"] for v in pod_spec["volumes"]] == ["spec", "tmp"]

    # No credential anywhere the run leaves text: the operator's log, the worker's log, events, status,
    # the Job, its ConfigMap and pod (with the result file: the termination message), the manifest.
    [pod] = get(control_plane, namespace, "pods")["items"]
    result = pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    assert json.loads(result)["output"] == {"uri": uri, "format": "adapter"}
    texts = {
        "operator log": "".join(p.read_text(errors="replace") for p in operator.logs.glob("operator-*.log")),
        "pod log": test_kubelet.logs(namespace, pod["metadata"]["name"]),
        "events": json.dumps(events_of(control_plane, namespace, "dev")),
        "status": json.dumps(resource["status"]),
        "job, configmap, pod": json.dumps(get(control_plane, namespace, "jobs,configmaps,pods")),
        "manifest": written["merged/dev/merge-manifest.json"].decode(),
        "result": result,
    }
    assert "merged 2 adapters" in texts["pod log"] or "modules with ties" in texts["pod log"], texts["pod log"]
    for what, text in texts.items():
        assert s3_server.access_key not in text and s3_server.secret_key not in text, f"a credential in the {what}"

    # The operator's identity may not read the Secret it had the Job use (least privilege, tests/chart).
    answer = control_plane.kubectl("auth", "can-i", "get", f"secret/{SECRET}", "-n", namespace,
                                   kubeconfig=operator.kubeconfig, check=False)
    assert answer.stdout.strip() == "no", answer


def test_overwrite_and_a_second_resource_on_the_same_prefix(control_plane, namespace, operator, s3_server, bucket):
    create_secret(control_plane, namespace, s3_server)
    # Objects without a manifest at the prefix: nobody's output, replaced only with overwrite.
    s3_server.client().put_object(Bucket=bucket, Key="merged/shared/notes.txt", Body=b"someone's")
    apply(control_plane, namespace, merge("first", s3_server, bucket, "merged/shared"))
    first = wait_until(phase_is(control_plane, namespace, "first", "Failed"), "refused without overwrite",
                       operator, control_plane)
    assert ready(first)["reason"] == "InvalidSpec" and "spec.output.uri" in ready(first)["message"]
    assert "overwrite" in ready(first)["message"]
    assert set(objects(s3_server, bucket, "merged/shared/")) == {"merged/shared/notes.txt"}

    document = merge("first", s3_server, bucket, "merged/shared")
    document["spec"]["output"]["overwrite"] = True
    apply(control_plane, namespace, document)
    wait_until(phase_is(control_plane, namespace, "first", "Succeeded", generation=2), "the overwrite",
               operator, control_plane)
    written = objects(s3_server, bucket, "merged/shared/")
    assert "merged/shared/notes.txt" not in written and "merged/shared/merge-manifest.json" in written

    # A new generation of the same resource replaces its own output (its manifest names it), no overwrite.
    document["spec"]["output"]["overwrite"] = False
    document["spec"]["method"] = "linear"
    del document["spec"]["parameters"]
    apply(control_plane, namespace, document)
    wait_until(phase_is(control_plane, namespace, "first", "Succeeded", generation=3), "the new generation",
               operator, control_plane)
    assert manifest_of(s3_server, bucket, "merged/shared")["spec"]["method"] == "linear"
    owned = objects(s3_server, bucket, "merged/shared/")

    # A second resource on the same prefix, or one inside it: refused by the operator, no Job.
    for name, output in (("second", "merged/shared"), ("inner", "merged/shared/inner")):
        other = merge(name, s3_server, bucket, output)
        other["spec"]["output"]["overwrite"] = True
        apply(control_plane, namespace, other)
        refused = wait_until(phase_is(control_plane, namespace, name, "Failed"), f"{name}: the conflict",
                             operator, control_plane, 60)
        assert ready(refused)["reason"] == "OutputConflict", ready(refused)
        assert "AdapterMerge first" in ready(refused)["message"] and "its merge succeeded into it" in ready(refused)["message"]
    assert {j["metadata"]["name"] for j in jobs(control_plane, namespace)} == {"first-3"}

    # With the first resource gone the operator lets the second run, and the worker refuses: the output's
    # manifest names another owner (even with overwrite). Nothing is deleted.
    control_plane.kubectl("delete", "-n", namespace, "adaptermerge", "first", "inner", "--wait=true", "--timeout=60s")
    control_plane.kubectl("annotate", "-n", namespace, "adaptermerge", "second", "adaptermerge.io/rerun=1")

    def rerun_failed():
        resource = get(control_plane, namespace, "adaptermerge", "second")
        status = resource.get("status") or {}
        return resource if status.get("jobName", "").startswith("second-1-") and status.get("phase") == "Failed" else None
    second = wait_until(rerun_failed, "the worker's ownership check", operator, control_plane)
    assert ready(second)["reason"] == "OutputConflict", ready(second)
    assert f"{namespace}/first" in ready(second)["message"] and second["status"]["result"]["exitCode"] == 2
    assert objects(s3_server, bucket, "merged/shared/") == owned


def test_a_missing_secret_names_the_secret_until_it_exists(control_plane, namespace, operator, s3_server, bucket):
    apply(control_plane, namespace, merge("nosecret", s3_server, bucket, "merged/nosecret"))

    def waiting_for_the_secret():
        resource = get(control_plane, namespace, "adaptermerge", "nosecret")
        return resource if ready(resource).get("reason") == "CreateContainerConfigError" else None
    resource = wait_until(waiting_for_the_secret, "the missing Secret reported", operator, control_plane, 90)
    assert resource["status"]["phase"] == "Pending"
    message = ready(resource)["message"]
    assert f'secret "{SECRET}" not found' in message and f"credentialsSecret names Secret '{SECRET}'" in message
    assert objects(s3_server, bucket, "merged/") == {}

    # A Secret without the secret key: the kubelet's message names the key.
    create_secret(control_plane, namespace, s3_server, keys=("AWS_ACCESS_KEY_ID",))

    def waiting_for_the_key():
        resource = get(control_plane, namespace, "adaptermerge", "nosecret")
        return resource if "couldn't find key AWS_SECRET_ACCESS_KEY" in ready(resource).get("message", "") else None
    resource = wait_until(waiting_for_the_key, "the missing key reported", operator, control_plane, 90)
    assert ready(resource)["reason"] == "CreateContainerConfigError"
    assert f"Secret {namespace}/{SECRET}" in ready(resource)["message"]

    create_secret(control_plane, namespace, s3_server)  # the kubelet retries; the merge then runs
    done = wait_until(phase_is(control_plane, namespace, "nosecret", "Succeeded"), "the merge after the Secret",
                      operator, control_plane)
    assert done["status"]["output"]["uri"] == f"s3://{bucket}/merged/nosecret"
    assert "merged/nosecret/merge-manifest.json" in objects(s3_server, bucket, "merged/nosecret/")
