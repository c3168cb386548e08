"""The real node itself: a kubelet on containerd that the real scheduler places pods on, running the
worker image built from the Dockerfile, with the extended GPU resource, pod networking, `kubectl logs`
through the kubelet's API, and local PersistentVolumes the non-root worker user can write (fsGroup)."""

from __future__ import annotations

import ipaddress
import json
import os

import yaml
import pytest

from support.control_plane import wait_until
from support.real_node import GPU_COUNT, GPU_RESOURCE, LOCAL_STORAGE_CLASS, NODE_NAME, POD_SUBNET, show

pytestmark = pytest.mark.node

POD_TIMEOUT = 180  # seconds: the first start of a multi-GB image on a busy 2-core machine


def pod(name: str, image: str, script: str, *, gpus: int = 0, volumes: dict[str, str] | None = None) -> dict:
    """A pod running `python -c script` as the worker user under the chart's restricted securityContext."""
    container = {
        "name": "main", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": claim, "mountPath": path} for claim, path in (volumes or {}).items()],
    }
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in (volumes or {})],
        },
    }


def create(plane, namespace: str, *documents: dict) -> None:
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))


def finished(plane, namespace: str, name: str, node) -> dict:
    def done():
        current = plane.get_json("pod", name, namespace=namespace)
        return current if current["status"].get("phase") in ("Succeeded", "Failed") else None
    try:
        return wait_until(done, POD_TIMEOUT, f"pod {name} to finish")
    except TimeoutError as error:
        described = plane.kubectl("describe", "pod", "-n", namespace, name, check=False).stdout
        pytest.fail(f"{error}\n{described}\n{node.logs()}")


def test_the_node_is_a_ready_kubelet_on_containerd_advertising_gpus(cluster):
    show(cluster.plane, "get", "nodes", "-o", "wide")
    node = cluster.plane.get_json("node", NODE_NAME)
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://1.6"), info
    assert info["kubeletVersion"] == "v1.36.3"
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True", conditions
    assert not node["spec"].get("taints"), "the node lifecycle controller removes the not-ready taint"
    assert node["status"]["allocatable"][GPU_RESOURCE] == str(GPU_COUNT)


def test_the_scheduler_places_the_worker_image_which_runs_as_the_worker_user(cluster, namespace):
    plane, worker = cluster.plane, cluster.image("worker")
    script = ("import os, sys; print('hello from the worker image', flush=True); "
              "open('/dev/termination-log', 'w').write(f'{os.getuid()}:{os.getgid()}:{sys.prefix}')")
    create(plane, namespace, pod("hello", worker.reference, script, gpus=1))

    done = finished(plane, namespace, "hello", cluster.node)
    show(plane, "get", "pods", "-n", namespace, "-o", "wide")
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    assert done["spec"]["nodeName"] == NODE_NAME, "bound by the scheduler (the pod named no node)"
    [state] = done["status"]["containerStatuses"]
    assert (state["image"], state["imageID"]) == (worker.reference, worker.image_id), "the image built here"
    assert state["state"]["terminated"]["message"] == "10001:10001:/opt/venv"
    assert ipaddress.ip_address(done["status"]["podIP"]) in ipaddress.ip_network(POD_SUBNET), "an address from the CNI bridge"
    scheduled = plane.get_json("events", "--field-selector", "involvedObject.name=hello,reason=Scheduled", namespace=namespace)
    assert [e.get("reportingComponent") or e["source"].get("component") for e in scheduled["items"]] == ["default-scheduler"]
    # kubectl logs goes API server -> kubelet (client certificate, SubjectAccessReview).
    assert show(plane, "logs", "-n", namespace, "hello").strip() == "hello from the worker image"


def test_more_gpus_than_the_node_has_leave_the_pod_unschedulable(cluster, namespace):
    plane = cluster.plane
    create(plane, namespace, pod("greedy", cluster.image("operator").reference, "pass", gpus=GPU_COUNT + 1))

    def unschedulable():
        conditions = plane.get_json("pod", "greedy", namespace=namespace)["status"].get("conditions", [])
        return next((c for c in conditions if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"), None)
    condition = wait_until(unschedulable, 60, "the scheduler to report Unschedulable")
    assert f"Insufficient {GPU_RESOURCE}" in condition["message"]


def test_a_local_volume_is_bound_and_written_by_the_worker_user(cluster, namespace, tmp_path):
    plane = cluster.plane
    folder = tmp_path / "disk"
    folder.mkdir()  # owned by root, mode 0755: only fsGroup lets uid 10001 write here
    volume = cluster.node.local_volume(f"{namespace}-disk", folder)
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "disk"},
             "spec": {"storageClassName": LOCAL_STORAGE_CLASS, "accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "1Gi"}}}}
    plane.kubectl("apply", "-f", "-", input=json.dumps(volume))
    try:
        script = "open('/data/written', 'w').write('by the worker user')"
        create(plane, namespace, claim, pod("writer", cluster.image("worker").reference, script, volumes={"disk": "/data"}))
        done = finished(plane, namespace, "writer", cluster.node)
        assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
        bound = plane.get_json("pvc", "disk", namespace=namespace)
        assert (bound["status"]["phase"], bound["spec"]["volumeName"]) == ("Bound", volume["metadata"]["name"])
        written = folder / "written"
        assert written.read_text() == "by the worker user"
        assert (os.stat(written).st_uid, os.stat(written).st_gid) == (10001, 10001)
    finally:
        plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)
        plane.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false", check=False)
