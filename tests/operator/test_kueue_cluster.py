"""Kueue for real: the operator's Jobs go through a real Kueue controller manager (tests/support/kueue.py)
on the real control plane. A ClusterQueue with quota for one GPU admits one merge at a time: the second
waits suspended in its queue, and runs once the first has finished.
"""

from __future__ import annotations

import time

import pytest
import yaml
from support.operator_harness import apply, get, jobs, phase_is, ready, resource, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def kueue(control_plane, kueue_tool, tmp_path_factory):
    from support.kueue import running_kueue

    workdir = tmp_path_factory.mktemp("kueue")
    with running_kueue(control_plane, kueue_tool, workdir) as process:
        yield workdir


def queues(control_plane, namespace: str, gpus: int) -> str:
    """A ResourceFlavor, a ClusterQueue with quota for `gpus` GPUs for this namespace, a LocalQueue."""
    documents = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": f"{namespace}-flavor"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": f"{namespace}-cq"},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                  "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                      {"name": f"{namespace}-flavor", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "team-queue", "namespace": namespace},
         "spec": {"clusterQueue": f"{namespace}-cq"}},
    ]
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
    return "team-queue"


def test_kueue_admits_one_merge_at_a_time(control_plane, namespace, operator, claims, kueue, test_kubelet):
    from support.kueue import log_tail

    queue = queues(control_plane, namespace, gpus=1)
    held, free = claims.make("held", hold=True), claims.make("free")
    apply(control_plane, namespace, resource("first", held, job={"gpus": 1, "queueName": queue}))
    try:
        wait_until(phase_is(control_plane, namespace, "first", "Running"), "Kueue to admit the first merge",
                   operator, control_plane, 90)
    except BaseException:
        print(log_tail(kueue))
        raise
    apply(control_plane, namespace, resource("second", free, job={"gpus": 1, "queueName": queue}))

    second = wait_until(phase_is(control_plane, namespace, "second", "Pending"), "the second merge to queue",
                        operator, control_plane, 60)
    time.sleep(5)  # time for a wrong admission to happen: the quota is the first merge's
    [job] = [j for j in jobs(control_plane, namespace) if j["metadata"]["name"] == "second-1"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    second = get(control_plane, namespace, "adaptermerge", "second")
    assert second["status"]["phase"] == "Pending" and "waiting for admission in queue team-queue" in ready(second)["message"]
    assert not [p for p in test_kubelet.pods_run(namespace) if p.startswith("second-")]
    workloads = get(control_plane, namespace, "workloads.kueue.x-k8s.io")["items"]
    assert len(workloads) == 2, "Kueue made a Workload for each Job"

    claims.release(held)
    wait_until(phase_is(control_plane, namespace, "first", "Succeeded"), "the first merge", operator, control_plane)
    wait_until(phase_is(control_plane, namespace, "second", "Succeeded"), "Kueue to admit the second merge",
               operator, control_plane)
    assert len(test_kubelet.pods_run(namespace)) == 2
