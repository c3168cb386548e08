"""What the operator shows and what it asks of the API server, on the real control plane (issue 12):
its Prometheus /metrics scraped while it works, its Events under the component `adaptermerge`, and a
watch that receives only its own Jobs and pods (label selectors sent to the API server, seen through a
logging `kubectl proxy` holding the chart's operator identity).

No kubelet: the test sets the worker pod's status itself, as a kubelet would, to move a merge to
Running and Succeeded.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from support.chart_identity import operator_kubeconfig, worker_service_account
from support.control_plane import wait_until
from support.operator_process import OperatorProcess, RequestLog

pytestmark = pytest.mark.cluster

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "adaptermerge.io_adaptermerges.yaml"
UNRELATED = 20


def merge(name: str, **spec) -> dict:
    # No node has this label: a test kubelet of the same session never takes the pod, this test acts for it.
    base = {"volume": {"claimName": "store"}, "adapters": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
            "method": "linear", "output": {"path": f"out/{name}"},
            "job": {"nodeSelector": {"example.com/no-such-node": "true"}}}
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name},
            "spec": {**base, **spec}}


def unrelated_objects(count: int) -> str:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "spec": {"containers": [{"name": "c", "image": "example.invalid/app:1"}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", **pod["spec"]}}}}
    return yaml.safe_dump_all(
        [{**pod, "metadata": {"name": f"other-{i}", "labels": {"app": "other"}}} for i in range(count)]
        + [{**job, "metadata": {"name": f"other-{i}"}} for i in range(count)]
    )


@pytest.fixture(scope="module")
def crd(control_plane):
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    control_plane.wait_established("crd/adaptermerges.adaptermerge.io")


@pytest.fixture
def observed(control_plane, crd, namespace, tmp_path):
    """(operator, request log): the operator, with the chart's namespaced identity, behind a logging proxy."""
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=unrelated_objects(UNRELATED))
    identity = operator_kubeconfig(control_plane, namespace, {"watchNamespaces": [namespace]})
    proxy = RequestLog(Path(control_plane.bin_dir) / "kubectl", identity, tmp_path)
    operator = OperatorProcess(proxy.kubeconfig, namespace, tmp_path / "operator.log",
                               {"ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": worker_service_account(namespace)})
    operator.wait_serving()
    yield operator, proxy
    operator.stop()
    proxy.stop()


def apply(control_plane, namespace: str, *documents: dict) -> None:
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))


def owned_jobs(control_plane, namespace: str) -> list[dict]:
    return control_plane.get_json("jobs", "-l", "adaptermerge.io/uid", namespace=namespace)["items"]


@contextlib.contextmanager
def refusing_jobs_named(control_plane, namespace: str, name: str):
    """A ValidatingAdmissionPolicy (and binding) that refuses creating one Job, removed afterwards."""
    policy = f"refuse-{namespace}"
    documents = [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": policy},
         "spec": {"failurePolicy": "Fail",
                  "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                          "operations": ["CREATE"], "resources": ["jobs"]}]},
                  "validations": [{"expression": f"object.metadata.name != '{name}'", "message": "refused by the test"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": policy},
         "spec": {"policyName": policy, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}}},
    ]
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
             "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}
    # policies take effect a moment after they are created
    wait_until(lambda: control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                             input=yaml.safe_dump(probe), check=False).returncode != 0, 30, "the policy")
    try:
        yield
    finally:
        control_plane.kubectl("delete", "-f", "-", input=yaml.safe_dump_all(documents), check=False)


def act_as_kubelet(control_plane, namespace: str, job: str, phase: str) -> None:
    """Writes the worker pod's status the way a kubelet would report it."""
    (pod,) = control_plane.get_json("pods", "-l", f"job-name={job}", namespace=namespace)["items"]
    now = "2030-01-01T00:00:00Z"
    state = {"running": {"startedAt": now}} if phase == "Running" else {
        "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now,
                       "message": json.dumps({"reason": "MergeSucceeded", "message": "merged", "exitCode": 0})}}
    status = {"phase": phase, "containerStatuses": [
        {"name": "worker", "image": "w", "imageID": "", "ready": phase == "Running", "restartCount": 0, "state": state}]}
    control_plane.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", json.dumps({"status": status}))


def test_watches_of_pods_and_jobs_select_the_operators_own_server_side(control_plane, namespace, observed):
    operator, proxy = observed
    apply(control_plane, namespace, merge("one"))
    wait_until(lambda: owned_jobs(control_plane, namespace), 60, "the merge's Job")
    reads = [urlparse(url) for method, url in proxy.requests() if method == "GET"]
    pod_and_job_reads = [u for u in reads if u.path.endswith(("/pods", "/jobs"))]
    assert {u.path.rsplit("/", 1)[1] for u in pod_and_job_reads} == {"pods", "jobs"}, proxy.requests()
    for url in pod_and_job_reads:
        assert parse_qs(url.query).get("labelSelector") == ["adaptermerge.io/uid"], url.geturl()


def test_metrics_count_merges_jobs_errors_and_durations(control_plane, namespace, observed):
    operator, _ = observed
    invalid = merge("invalid", evaluation={"datasets": [{"name": "d", "adapter": "a", "path": "d.jsonl"}]})
    apply(control_plane, namespace, merge("one"), merge("two"), invalid)  # evaluation needs a baseModel
    wait_until(lambda: len(owned_jobs(control_plane, namespace)) == 2, 60, "two Jobs")

    def merges(phase: str, reason: str | None = None) -> float:
        """AdapterMerges in this namespace with that phase (and reason, if given)."""
        return sum(value for (name, labels), value in operator.metrics().items()
                   if name == "adaptermerge_merges" and ("namespace", namespace) in labels
                   and ("phase", phase) in labels and (reason is None or ("reason", reason) in labels))

    wait_until(lambda: merges("Pending") == 2 and merges("Failed", "InvalidSpec") == 1, 30,
               f"merges by phase in /metrics:\n{operator.metrics()}")
    assert operator.sample("adaptermerge_jobs_created_total", namespace=namespace) == 2
    assert operator.sample("adaptermerge_reconcile_seconds_count", handler="merge") >= 3

    # one merge runs and succeeds: queue and run durations are observed once each
    job = next(j["metadata"]["name"] for j in owned_jobs(control_plane, namespace) if j["metadata"]["name"].startswith("one"))
    wait_until(lambda: control_plane.get_json("pods", "-l", f"job-name={job}", namespace=namespace)["items"], 60, "the pod")
    act_as_kubelet(control_plane, namespace, job, "Running")
    wait_until(lambda: operator.sample("adaptermerge_merge_queue_seconds_count") == 1, 30, "a queue duration")
    act_as_kubelet(control_plane, namespace, job, "Succeeded")
    wait_until(lambda: merges("Succeeded", "MergeSucceeded") == 1, 60, f"a success in /metrics\n{operator.log_text()[-3000:]}")
    assert operator.sample("adaptermerge_merge_run_seconds_count", phase="Succeeded") == 1
    assert merges("Pending") == 1

    # a Job the API server refuses (here: an admission policy) is an API error
    with refusing_jobs_named(control_plane, namespace, "three-1"):
        apply(control_plane, namespace, merge("three"))
        wait_until(lambda: sum(v for (name, labels), v in operator.metrics().items()
                               if name == "adaptermerge_api_errors_total" and ("operation", "create") in labels) >= 1,
                   60, f"an API error in /metrics\n{operator.log_text()[-3000:]}")
    # deleting resources takes them out of the gauge
    control_plane.kubectl("delete", "adaptermerge", "invalid", "-n", namespace)
    wait_until(lambda: merges("Failed", "InvalidSpec") == 0, 30, "the deleted merge to leave the gauge")


def test_events_are_reported_by_the_adaptermerge_component(control_plane, namespace, observed):
    apply(control_plane, namespace, merge("one"))

    def job_created():
        events = control_plane.get_json("events", "--field-selector", "involvedObject.name=one,reason=JobCreated",
                                        namespace=namespace)["items"]
        return events[0] if events else None

    event = wait_until(job_created, 60, "the JobCreated event")
    assert event["reportingComponent"] == "adaptermerge"
    assert event["source"]["component"] == "adaptermerge"
    assert event["metadata"]["name"].startswith("adaptermerge-")
    described = control_plane.kubectl("describe", "adaptermerge", "one", "-n", namespace).stdout
    assert "adaptermerge" in next(line for line in described.splitlines() if "JobCreated" in line)
