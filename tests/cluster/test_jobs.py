"""The test kubelet under the REAL Job and garbage-collector controllers: what the operator relies on."""

from __future__ import annotations

import json
import os

import pytest

from support.control_plane import wait_until

pytestmark = pytest.mark.cluster


def job(name: str, script: str, *, backoff_limit: int = 0, **spec) -> dict:
    """A Job running `sh -c script` once, in a container named like the operator's."""
    container = {"name": "worker", "image": "test-only", "command": ["sh", "-c", script],
                 "terminationMessagePolicy": spec.pop("message_policy", "File"),
                 "volumeMounts": spec.pop("mounts", [])}
    pod_spec = {"restartPolicy": "Never", "automountServiceAccountToken": False,
                "containers": [container], "volumes": spec.pop("volumes", [])}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod_spec}, **spec}}


def create(control_plane, namespace: str, manifest: dict) -> None:
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def wait_for_condition(control_plane, namespace: str, name: str, kind: str, timeout: float = 60) -> dict:
    """Waits until the Job has condition `kind` True; returns that condition."""

    def condition():
        status = control_plane.get_json("job", name, namespace=namespace).get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == kind and c["status"] == "True"), None)

    return wait_until(condition, timeout, f"Job {namespace}/{name} condition {kind}")


def pods_of(control_plane, namespace: str, name: str) -> list[dict]:
    return control_plane.get_json("pods", "-l", f"job-name={name}", namespace=namespace)["items"]


def terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_succeeding_command_completes_the_job(control_plane, test_kubelet, namespace):
    create(control_plane, namespace, job("ok", "echo done > /dev/termination-log"))

    wait_for_condition(control_plane, namespace, "ok", "Complete")
    [pod] = pods_of(control_plane, namespace, "ok")
    assert pod["spec"]["nodeName"] == "test-node"
    assert pod["status"]["phase"] == "Succeeded"
    assert terminated(pod)["exitCode"] == 0
    assert terminated(pod)["reason"] == "Completed"
    assert terminated(pod)["message"] == "done\n"


def test_pod_volumes_env_and_paths_are_mapped_to_local_folders(control_plane, test_kubelet, namespace,
                                                             claims_root):
    (claims_root / "inputs").mkdir()
    (claims_root / "inputs" / "a.txt").write_text("from the claim\n")
    control_plane.kubectl("create", "configmap", "spec", "-n", namespace, "--from-literal=spec.yaml=from the configmap")
    # Copies the ConfigMap key, the input claim's file and an env var into the output claim, via
    # the emptyDir at /tmp; the job succeeds only if every mount path was rewritten.
    script = ('cat /etc/adaptermerge/spec.yaml /mnt/claims/inputs/a.txt > /tmp/x && echo "$GREETING" >> /tmp/x'
              ' && cp /tmp/x /mnt/claims/outputs/result.txt')
    manifest = job(
        "paths", script,
        volumes=[{"name": "spec", "configMap": {"name": "spec"}},
                 {"name": "inputs", "persistentVolumeClaim": {"claimName": "inputs", "readOnly": True}},
                 {"name": "outputs", "persistentVolumeClaim": {"claimName": "outputs"}},
                 {"name": "tmp", "emptyDir": {}}],
        mounts=[{"name": "spec", "mountPath": "/etc/adaptermerge"},
                {"name": "inputs", "mountPath": "/mnt/claims/inputs", "readOnly": True},
                {"name": "outputs", "mountPath": "/mnt/claims/outputs"},
                {"name": "tmp", "mountPath": "/tmp"}],
    )
    manifest["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "GREETING", "value": "hello from $(POD_NAMESPACE)"}
    ]
    manifest["spec"]["template"]["spec"]["containers"][0]["env"].insert(
        0, {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    )
    create(control_plane, namespace, manifest)

    wait_for_condition(control_plane, namespace, "paths", "Complete")
    result = (claims_root / "outputs" / "result.txt").read_text()
    # The literal has no trailing newline, so the claim's line follows it directly.
    assert result == f"from the configmapfrom the claim\nhello from {namespace}\n"


def test_failing_command_is_retried_per_backoff_limit_then_fails_the_job(control_plane, test_kubelet, namespace):
    # backoffLimit 1: two pods. The Job controller waits ~10 s (its minimum back-off) before the retry.
    create(control_plane, namespace, job("fails", "echo bad input > /dev/termination-log; exit 3", backoff_limit=1))

    failed = wait_for_condition(control_plane, namespace, "fails", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    pods = pods_of(control_plane, namespace, "fails")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        assert terminated(pod)["exitCode"] == 3
        assert terminated(pod)["reason"] == "Error"
        assert terminated(pod)["message"] == "bad input\n"
    assert control_plane.get_json("job", "fails", namespace=namespace)["status"]["failed"] == 2


def test_fallback_to_logs_puts_the_log_tail_in_the_message(control_plane, test_kubelet, namespace):
    script = "for i in $(seq 1 100); do echo line $i; done; exit 1"
    create(control_plane, namespace, job("logs", script, message_policy="FallbackToLogsOnError"))

    wait_for_condition(control_plane, namespace, "logs", "Failed")
    [pod] = pods_of(control_plane, namespace, "logs")
    message = terminated(pod)["message"]
    # The kubelet keeps the last 80 lines: 21..100.
    assert message.splitlines() == [f"line {i}" for i in range(21, 101)]
    assert test_kubelet.logs(namespace, pod["metadata"]["name"]).startswith("line 1\n")


def test_active_deadline_fails_the_job_and_kills_its_processes(control_plane, test_kubelet, namespace, claims_root):
    pid_file = claims_root / f"{namespace}-deadline.pid"
    # A background child shows that the whole process group dies, not just the shell.
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    create(control_plane, namespace, job("slow", script, activeDeadlineSeconds=3))
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the command to start")
    pid = int(pid_file.read_text())
    assert process_exists(pid)

    failed = wait_for_condition(control_plane, namespace, "slow", "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    wait_until(lambda: not process_exists(pid), 10, f"process {pid} to be killed")


@pytest.mark.parametrize("propagation", ["Foreground", "Background"])
def test_deleting_a_job_deletes_its_pods_and_kills_them(control_plane, test_kubelet, namespace, claims_root,
                                                       propagation):
    pid_file = claims_root / f"{namespace}-gc.pid"
    create(control_plane, namespace, job("gc", f"sleep 300 & echo $! > {pid_file}; wait"))
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the command to start")
    pid = int(pid_file.read_text())
    [pod] = wait_until(lambda: pods_of(control_plane, namespace, "gc"), 10, "the pod")

    control_plane.kubectl("delete", "job", "gc", "-n", namespace, f"--cascade={propagation.lower()}", "--wait=false")

    wait_until(lambda: not pods_of(control_plane, namespace, "gc"), 30, "the garbage collector to delete the pod")
    wait_until(lambda: not process_exists(pid), 10, f"process {pid} to be killed")
    gone = control_plane.kubectl("get", "job", "gc", "-n", namespace, check=False)
    assert "NotFound" in gone.stderr


def test_unschedulable_pod_stays_pending(control_plane, test_kubelet, namespace):
    manifest = job("nowhere", "true")
    manifest["spec"]["template"]["spec"]["nodeSelector"] = {"gpu": "h100"}
    create(control_plane, namespace, manifest)

    def unschedulable():
        pods = pods_of(control_plane, namespace, "nowhere")
        conditions = pods[0]["status"].get("conditions", []) if pods else []
        return next((c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    condition = wait_until(unschedulable, 30, "PodScheduled=False")
    assert condition["reason"] == "Unschedulable"
    [pod] = pods_of(control_plane, namespace, "nowhere")
    assert "nodeName" not in pod["spec"]
    assert pod["status"]["phase"] == "Pending"


def test_on_failure_restarts_in_place_until_the_backoff_limit(control_plane, test_kubelet, namespace):
    manifest = job("restarts", "exit 4", backoff_limit=1)
    manifest["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    create(control_plane, namespace, manifest)
    restart_counts = set()

    def failed():
        for pod in pods_of(control_plane, namespace, "restarts"):
            restart_counts.update(s["restartCount"] for s in pod["status"].get("containerStatuses", []))
        status = control_plane.get_json("job", "restarts", namespace=namespace).get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == "Failed"), None)

    condition = wait_until(failed, 60, "the Job to fail")
    assert condition["reason"] == "BackoffLimitExceeded"
    # The same pod restarted in place; the Job controller counts restarts against backoffLimit.
    assert max(restart_counts) >= 1
    assert control_plane.get_json("job", "restarts", namespace=namespace)["status"].get("failed") == 1


def test_deleting_a_pod_sends_sigterm_first(control_plane, test_kubelet, namespace, claims_root):
    marker = claims_root / f"{namespace}-sigterm"
    script = f"trap 'echo terminated > {marker}; exit 0' TERM; sleep 300 & wait"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "graceful"},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "worker", "image": "test-only",
                                                             "command": ["sh", "-c", script]}]}}
    create(control_plane, namespace, pod)
    wait_until(lambda: control_plane.get_json("pod", "graceful", namespace=namespace)["status"].get("phase")
               == "Running", 30, "the pod to run")

    control_plane.kubectl("delete", "pod", "graceful", "-n", namespace, "--grace-period=5", "--wait=false")

    wait_until(lambda: marker.exists(), 10, "the command's SIGTERM handler")
    assert marker.read_text() == "terminated\n"
    wait_until(lambda: control_plane.kubectl("get", "pod", "graceful", "-n", namespace, check=False).returncode,
               10, "the pod to be removed")
