"""The operator enforces the tenant policy itself (issue 12, defect 2), on the real control plane: with
no admission policy installed, a spec the policy refuses, or one using a claim that is not labelled for
adaptermerge, gets no Job and ends Failed with reason PolicyViolation and a Warning event; once the
claim is labelled, the rerun annotation runs it. And a Job that merely carries
a resource's labels is never taken for its Job: only the controller ownerReference counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from support.chart_identity import helm_template, object_prefix, operator_kubeconfig, worker_service_account
from support.control_plane import wait_until
from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "adaptermerge.io_adaptermerges.yaml"
ALLOWED = {"adaptermerge.io/allowed": "true"}
POLICY = {"claims": {"matchLabels": ALLOWED}, "allowedPriorityClasses": ["batch-low"]}


@pytest.fixture(scope="module")
def crd(control_plane):
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    control_plane.wait_established("crd/adaptermerges.adaptermerge.io")


def chart_env(control_plane, namespace: str, values: dict) -> dict[str, str]:
    """The operator's environment as the chart's Deployment sets it."""
    manifest = helm_template(Path(control_plane.bin_dir) / "helm", namespace,
                             {"fullnameOverride": object_prefix(namespace), **values},
                             show_only=("templates/deployment.yaml",))
    (container,) = yaml.safe_load(manifest)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e and e["name"].startswith("ADAPTERMERGE_")}


class Running:
    def __init__(self, control_plane, namespace: str, workdir: Path):
        values = {"watchNamespaces": [namespace], "policy": POLICY}
        self.kubeconfig = operator_kubeconfig(control_plane, namespace, values)
        self.env = {**chart_env(control_plane, namespace, values),
                    "ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": worker_service_account(namespace)}
        self.namespace, self.workdir, self.starts = namespace, workdir, 0
        self.process: OperatorProcess | None = None

    def start(self) -> None:
        self.starts += 1
        self.process = OperatorProcess(self.kubeconfig, self.namespace, self.workdir / f"operator-{self.starts}.log", self.env)
        self.process.wait_serving()

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@pytest.fixture
def operator(control_plane, crd, namespace, tmp_path):
    running = Running(control_plane, namespace, tmp_path)
    running.start()
    yield running
    running.stop()


def claim(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def merge(name: str, store: str, **job) -> dict:
    spec = {"volume": {"claimName": store}, "adapters": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
            "method": "linear", "output": {"path": f"out/{name}"}, "job": job}
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name}, "spec": spec}


def apply(control_plane, namespace: str, *documents: dict) -> None:
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))


def status(control_plane, namespace: str, name: str) -> dict:
    return control_plane.get_json("adaptermerge", name, namespace=namespace).get("status") or {}


def ready(control_plane, namespace: str, name: str) -> dict:
    return next((c for c in status(control_plane, namespace, name).get("conditions") or [] if c["type"] == "Ready"), {})


def job_names(control_plane, namespace: str) -> set[str]:
    return {j["metadata"]["name"] for j in control_plane.get_json("jobs", namespace=namespace)["items"]}


def test_operator_refuses_what_the_policy_forbids(control_plane, namespace, operator):
    apply(control_plane, namespace, claim("labelled", ALLOWED), claim("unlabelled"))
    apply(control_plane, namespace, merge("fine", "labelled", priorityClassName="batch-low"),
          merge("foreign-claim", "unlabelled"), merge("privileged", "labelled", priorityClassName="system-node-critical"))
    wait_until(lambda: "fine-1" in job_names(control_plane, namespace), 60, "the allowed merge's Job")
    for name, words in (("foreign-claim", "claim 'unlabelled' is not labelled for adaptermerge"),
                        ("privileged", "spec.job.priorityClassName: 'system-node-critical' is not allowed")):
        wait_until(lambda: ready(control_plane, namespace, name).get("reason") == "PolicyViolation", 60,
                   f"{name} refused\n{operator.process.log_text()[-3000:]}")
        assert status(control_plane, namespace, name)["phase"] == "Failed"
        assert words in ready(control_plane, namespace, name)["message"]
        events = control_plane.get_json("events", "--field-selector", f"involvedObject.name={name},reason=PolicyViolation",
                                        namespace=namespace)["items"]
        assert events and events[0]["type"] == "Warning"
    assert job_names(control_plane, namespace) == {"fine-1"}, "refused merges get no Job"
    job = control_plane.get_json("job", "fine-1", namespace=namespace)
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"

    # A refusal is the run's verdict, also across an operator restart (as a new policy makes one).
    operator.stop()
    operator.start()
    control_plane.kubectl("label", "pvc", "unlabelled", "-n", namespace, "adaptermerge.io/allowed=true")
    assert ready(control_plane, namespace, "foreign-claim")["reason"] == "PolicyViolation"
    # Once the claim is labelled, the user runs it again with the rerun annotation.
    control_plane.kubectl("annotate", "adaptermerge", "foreign-claim", "-n", namespace, "adaptermerge.io/rerun=1")
    wait_until(lambda: any(n.startswith("foreign-claim-1") for n in job_names(control_plane, namespace)), 60,
               f"the merge to run once its claim is labelled\n{operator.process.log_text()[-3000:]}")
    assert ready(control_plane, namespace, "privileged")["reason"] == "PolicyViolation"
    assert not any(n.startswith("privileged") for n in job_names(control_plane, namespace))


def test_a_job_that_only_carries_the_labels_is_not_adopted(control_plane, namespace, operator):
    apply(control_plane, namespace, claim("labelled", ALLOWED), merge("victim", "labelled"))
    wait_until(lambda: "victim-1" in job_names(control_plane, namespace), 60, "generation 1's Job")
    uid = control_plane.get_json("adaptermerge", "victim", namespace=namespace)["metadata"]["uid"]
    # Someone who may create Jobs prepares generation 2's Job, labelled as the operator labels its own and
    # referring to the resource as an owner, but not as its controller.
    forged = {"apiVersion": "batch/v1", "kind": "Job",
              "metadata": {"name": "victim-2", "labels": {"adaptermerge.io/uid": uid, "adaptermerge.io/generation": "2"},
                           "annotations": {"adaptermerge.io/merge-name": "victim"},
                           "ownerReferences": [{"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
                                                "name": "victim", "uid": uid}]},
              "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                              "containers": [{"name": "worker", "image": "evil:1"}]}}}}
    apply(control_plane, namespace, forged)
    control_plane.kubectl("patch", "adaptermerge", "victim", "-n", namespace, "--type=merge",
                          "-p", json.dumps({"spec": {"output": {"path": "out/victim-v2"}}}))
    wait_until(lambda: "does not belong to this AdapterMerge" in operator.process.log_text(), 60,
               f"the operator to refuse the forged Job\n{operator.process.log_text()[-3000:]}")
    current = status(control_plane, namespace, "victim")
    assert current.get("observedGeneration") == 2
    assert "suspended" not in ready(control_plane, namespace, "victim").get("message", "")  # not the forged Job's state
    assert control_plane.get_json("job", "victim-2", namespace=namespace)["spec"]["template"]["spec"]["containers"][0]["image"] == "evil:1"
