"""The test kubelet behaves like a kubelet where the operator's tests rely on it: it re-sends a pod's
status when the API server's copy differs (its status manager's periodic sync), not once."""

from __future__ import annotations

import pytest
from support.control_plane import wait_until
from support.kubelet import STATUS_SYNC_SECONDS

pytestmark = pytest.mark.cluster


def test_overwritten_pod_status_is_sent_again(control_plane, namespace, test_kubelet):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": namespace},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "none", "command": ["sleep", "120"]}]}}
    import json

    control_plane.kubectl("create", "-f", "-", input=json.dumps(pod))

    def phase() -> str:
        return control_plane.get_json("pod", "sleeper", namespace=namespace)["status"].get("phase", "")
    wait_until(lambda: phase() == "Running", 60, "the pod to run")

    # Someone (a lost write, another client) leaves the API server with a stale status.
    stale = {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "main", "image": "none", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ContainerCreating"}, "running": None}}]}}
    control_plane.kubectl("patch", "pod", "sleeper", "-n", namespace, "--subresource=status", "--type=strategic",
                          "-p", json.dumps(stale))
    assert phase() == "Pending"
    wait_until(lambda: phase() == "Running", 3 * STATUS_SYNC_SECONDS, "the kubelet to send its status again")
    statuses = control_plane.get_json("pod", "sleeper", namespace=namespace)["status"]["containerStatuses"]
    assert "running" in statuses[0]["state"] and "waiting" not in statuses[0]["state"]
    control_plane.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
