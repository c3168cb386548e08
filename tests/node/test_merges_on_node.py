"""The product as a platform team installs it: `helm install` of the chart with the images built from the
Dockerfile, the operator Deployment as a real pod (in-cluster config through the `kubernetes` Service,
liveness probe, read-only root filesystem), and AdapterMerges run as real Job pods by the real kubelet on a
local PersistentVolume written as uid 10001 (docs/real-node.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from support.chart_identity import CHART
from support.control_plane import fresh_namespace, wait_until
from support.operator_harness import resource as merge_resource
from support.real_node import LOCAL_STORAGE_CLASS, NODE_NAME, note, show

pytestmark = pytest.mark.node

RELEASE = "adaptermerge"
CLAIM = "store"
MERGE_TIMEOUT = 600  # seconds: the first worker pod starts a multi-GB image on a busy 2-core machine


class Release:
    """The chart installed in one namespace, serving that namespace, with a local volume claim `store`."""

    def __init__(self, cluster, namespace: str, disk: Path):
        self.cluster, self.plane, self.namespace, self.disk = cluster, cluster.plane, namespace, disk

    def operator_pod(self) -> dict:
        pods = self.plane.get_json("pods", "-l", "app.kubernetes.io/component=operator", namespace=self.namespace)["items"]
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return pods[0]

    def operator_log(self) -> str:
        return self.plane.kubectl("logs", "-n", self.namespace, "deployment/adaptermerge", "--tail=200", check=False).stdout

    def diagnostics(self) -> str:
        described = self.plane.kubectl("describe", "pods", "-n", self.namespace, check=False).stdout
        return f"{described}\n--- operator log ---\n{self.operator_log()}\n{self.cluster.node.logs()}"

    def apply(self, name: str, **spec) -> None:
        document = merge_resource(name, CLAIM, **spec)
        self.plane.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(document))

    def merge(self, name: str) -> dict:
        return self.plane.get_json("adaptermerge", name, namespace=self.namespace)

    def wait_phase(self, name: str, phase: str | tuple[str, ...], timeout: float = MERGE_TIMEOUT) -> dict:
        phases = (phase,) if isinstance(phase, str) else phase

        def reached():
            merge = self.merge(name)
            return merge if (merge.get("status") or {}).get("phase") in phases else None
        try:
            return wait_until(reached, timeout, f"AdapterMerge {name} to reach {phase}", interval=1)
        except TimeoutError as error:
            pytest.fail(f"{error}\nstatus: {json.dumps(self.merge(name).get('status'), indent=1)}\n{self.diagnostics()}")

    def job_pods(self, name: str) -> list[dict]:
        return self.plane.get_json("pods", "-l", f"adaptermerge.io/name={name}", namespace=self.namespace)["items"]


def ready(merge: dict) -> dict:
    return next(c for c in merge["status"]["conditions"] if c["type"] == "Ready")


@pytest.fixture(scope="module")
def release(cluster, tmp_path_factory):
    from support.tiny_models import make_lora_adapter, make_tiny_llama

    plane, operator, worker = cluster.plane, cluster.image("operator"), cluster.image("worker")
    # The volume's folder, as an admin would prepare a local disk: owned by root, mode 0755. The worker
    # (uid 10001) can write its output only because the pod's fsGroup makes the kubelet hand the
    # volume to group 10001.
    disk = tmp_path_factory.mktemp("local-disk")
    models = tmp_path_factory.mktemp("tiny-models")
    base = make_tiny_llama(models / "base")
    for adapter, seed in (("a", 1), ("b", 2)):
        make_lora_adapter(models / adapter, base, r=4, seed=seed)
        shutil.copytree(models / adapter, disk / "adapters" / adapter)
    os.chmod(disk, 0o755)

    with fresh_namespace(plane, "merges") as namespace:
        volume = cluster.node.local_volume(f"{namespace}-store", disk)
        plane.kubectl("apply", "-f", "-", input=json.dumps(volume))
        plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
            "spec": {"storageClassName": LOCAL_STORAGE_CLASS, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}},
        }))
        values = {
            "fullnameOverride": RELEASE,
            "watchNamespaces": [namespace],
            "image": {"repository": operator.repository, "tag": operator.tag, "pullPolicy": "Never"},
            "worker": {"image": {"repository": worker.repository, "tag": worker.tag, "pullPolicy": "Never"}},
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json") as values_file:
            json.dump(values, values_file)
            values_file.flush()
            began = time.monotonic()
            installed = subprocess.run(
                [str(plane.bin_dir / "helm"), "install", RELEASE, str(CHART), "--namespace", namespace,
                 "--kubeconfig", str(plane.kubeconfig), "--values", values_file.name, "--wait", "--timeout", "5m"],
                capture_output=True, text=True,
            )
        running = Release(cluster, namespace, disk)
        assert installed.returncode == 0, f"helm install failed:\n{installed.stderr}\n{running.diagnostics()}"
        note(f"real node: helm install --wait took {time.monotonic() - began:.0f}s")
        show(plane, "get", "pods", "-n", namespace, "-o", "wide")
        try:
            yield running
        finally:
            show(plane, "get", "pods", "-n", namespace, "-o", "wide")
            plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s", check=False)
            plane.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false", check=False)


def test_the_operator_deployment_runs_as_a_real_pod_on_the_node(release):
    pod = release.operator_pod()
    assert pod["spec"]["nodeName"] == NODE_NAME
    [container] = pod["status"]["containerStatuses"]
    assert container["ready"] and "running" in container["state"], container
    operator = release.cluster.images["operator"]
    assert (container["image"], container["imageID"]) == (operator.reference, operator.image_id), "the image built here"
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["restartCount"] == 0, release.diagnostics()
    # In-cluster config reaches the API server through the `kubernetes` Service (kube-proxy): the merges
    # below prove it works; here, that nothing failed on the way.
    log = release.operator_log()
    assert "Traceback" not in log, log


def test_a_merge_runs_as_a_real_pod_to_ready_with_output_and_result(release):
    release.apply("dev")
    merge = release.wait_phase("dev", "Succeeded")
    status = merge["status"]
    assert ready(merge)["reason"] == "MergeSucceeded", ready(merge)
    assert status["output"] == {"claimName": CLAIM, "path": "merged/dev", "format": "adapter", "rank": 4}
    assert status["result"]["modules"] == 4 and status["result"]["maxReconstructionError"] >= 0

    [pod] = release.job_pods("dev")
    show(release.plane, "get", "pods", "-n", release.namespace, "-o", "wide")
    assert pod["spec"]["nodeName"] == NODE_NAME and pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    worker, [container] = release.cluster.images["worker"], pod["status"]["containerStatuses"]
    assert (container["image"], container["imageID"]) == (worker.reference, worker.image_id), "the image built here"
    # No GPU on this node: the worker chose the CPU and says so.
    log = release.plane.kubectl("logs", "-n", release.namespace, pod["metadata"]["name"]).stdout
    assert "on cpu" in log, log

    merged = release.disk / "merged" / "dev"
    assert json.loads((merged / "adapter_config.json").read_text())["r"] == 4
    weights = merged / "adapter_model.safetensors"
    assert (weights.stat().st_uid, weights.stat().st_gid) == (10001, 10001), "written by the worker user"


def test_an_invalid_input_fails_with_the_workers_message(release):
    release.apply("missing", adapters=[{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/not-there"}])
    merge = release.wait_phase("missing", "Failed")
    assert ready(merge)["reason"] == "InvalidSpec", ready(merge)
    assert "spec.adapters[1].path" in ready(merge)["message"] and "adapters/not-there" in ready(merge)["message"]
    assert merge["status"]["result"]["exitCode"] == 2
    [pod] = release.job_pods("missing")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2
    assert not (release.disk / "merged" / "missing").exists()


def test_a_missing_claim_is_named_while_the_pod_waits_for_it(release):
    # The real scheduler keeps a pod whose PVC does not exist unbound; the status must say which claim
    # (until the scheduling timeout fails the run), not "waiting for the worker pod".
    release.apply("no-claim", volume={"claimName": "not-a-claim"}, job={"gpus": 0, "activeDeadlineSeconds": 600})

    def explained():
        merge = release.merge("no-claim")
        condition = next((c for c in (merge.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})
        return merge if condition.get("reason") == "Unschedulable" else None
    merge = wait_until(explained, 180, "the status to say why the pod cannot be scheduled")
    assert merge["status"]["phase"] == "Pending" and "not-a-claim" in ready(merge)["message"], ready(merge)
    release.plane.kubectl("delete", "-n", release.namespace, "adaptermerge", "no-claim", "--wait=true", "--timeout=120s")


def test_a_merge_past_its_deadline_is_stopped_by_the_kubelet(release):
    # Two seconds: the Job controller deletes the pod while the worker is still starting; the kubelet
    # must stop it before it publishes anything.
    release.apply("late", job={"gpus": 0, "activeDeadlineSeconds": 2})
    merge = release.wait_phase("late", ("Failed", "Succeeded"), timeout=180)
    job = release.plane.get_json("job", merge["status"]["jobName"], namespace=release.namespace)
    seen: list[dict] = []

    def pod_gone():
        pods = release.job_pods("late")
        seen.extend(pods)
        return not pods
    wait_until(pod_gone, 120, "the Job controller to delete the pod and the kubelet to stop it")
    timeline = json.dumps({"job": job["status"], "pod": [p["status"] | {"deletionTimestamp": p["metadata"].get(
        "deletionTimestamp")} for p in seen[-1:]]}, indent=1)
    # The Job controller enforces the deadline asynchronously: on an idle machine with the image cached the
    # worker can import, merge and publish inside the 2 s, before the pod is stopped (seen: result
    # MergeSucceeded in 0.08 s, then exit 143). What must never happen is a publish after the Job failed
    # (a lost SIGTERM let the merge run on); the condition's time has one-second resolution.
    manifest = release.disk / "merged" / "late" / "merge-manifest.json"
    merge = release.merge("late")
    if merge["status"]["phase"] == "Succeeded":
        # The worker's own summary says it published: the status says so, and why the Job failed.
        assert manifest.exists() and "DeadlineExceeded" in ready(merge)["message"], ready(merge)
    else:
        assert ready(merge)["reason"] == "DeadlineExceeded", ready(merge)
    if manifest.exists():
        failed_at = min(datetime.fromisoformat(c["lastTransitionTime"].replace("Z", "+00:00")).timestamp()
                        for c in job["status"]["conditions"] if c["type"] in ("FailureTarget", "Failed"))
        assert manifest.stat().st_mtime <= failed_at + 1.0, f"published after its deadline:\n{timeline}"


def test_deleting_a_merge_removes_its_job_pod_and_config_but_keeps_the_output(release):
    plane, namespace = release.plane, release.namespace
    assert release.job_pods("dev"), "the finished merge's pod is there until its AdapterMerge goes"
    plane.kubectl("delete", "-n", namespace, "adaptermerge", "dev", "--wait=true", "--timeout=120s")

    def gone():
        left = [kind for kind in ("jobs", "pods", "configmaps")
                if plane.get_json(kind, "-l", "adaptermerge.io/name=dev", namespace=namespace)["items"]]
        return not left
    wait_until(gone, 120, "the Job, its pod and the ConfigMap to be garbage-collected")
    assert (release.disk / "merged" / "dev" / "adapter_model.safetensors").is_file(), "outputs are never deleted"


def test_the_operator_pod_stayed_live_throughout(release):
    """Runs last: by now the kubelet has probed the liveness endpoint many times."""
    pod = release.operator_pod()
    probe = pod["spec"]["containers"][0]["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    started = datetime.fromisoformat(pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
    # Three failed probes in a row restart the container: wait until that many could have happened.
    first_restart = probe["initialDelaySeconds"] + probe["periodSeconds"] * probe["failureThreshold"] + 5
    time.sleep(max(0.0, first_restart - (datetime.now(timezone.utc) - started).total_seconds()))
    pod = release.operator_pod()
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, release.diagnostics()
    events = release.plane.get_json("events", "--field-selector", f"involvedObject.name={pod['metadata']['name']}",
                                    namespace=release.namespace)["items"]
    assert not [e for e in events if e["reason"] in ("Unhealthy", "Killing", "BackOff")], events
