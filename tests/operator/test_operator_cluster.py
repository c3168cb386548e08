"""The operator end to end: real API server, Job controller and garbage collector, the test kubelet
running the real worker (`adaptermerge run`), and the operator as a subprocess holding the chart's
ServiceAccount token (docs/interfaces.md #11), so a missing RBAC rule fails here.

Slow runs without sleeping in product code: a `sitecustomize` the test puts on the worker's
PYTHONPATH (the test kubelet passes its environment on) holds the worker process at interpreter
start while a HOLD file exists in one of its claim folders. Releasing it lets the real merge run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.control_plane import wait_until as control_plane_wait_until
from support.merge_resource import merge_resource as resource

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "adaptermerge.io_adaptermerges.yaml"
CLI = Path(sys.executable).parent / "adaptermerge"
HOLD = "HOLD"
TIMEOUT = 180  # seconds for a real worker run on a busy 2-core machine

GATE = f'''
import os, time
_args = [a.decode() for a in open("/proc/self/cmdline", "rb").read().split(b"\\0") if a]
_holds = [v.split("=", 1)[1] + "/{HOLD}" for k, v in zip(_args, _args[1:]) if k == "--volume" and "=" in v]
while any(os.path.exists(h) for h in _holds):
    time.sleep(0.1)
'''


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(control_plane):
    control_plane.kubectl("apply", "-f", str(CRD_FILE))
    control_plane.kubectl("wait", "--for=condition=Established", "crd/adaptermerges.adaptermerge.io", "--timeout=60s")


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory) -> Path:
    """Two PEFT LoRA adapters for a tiny random Llama, made once: <folder>/a and <folder>/b."""
    from support.tiny_models import make_lora_adapter, make_tiny_llama

    folder = tmp_path_factory.mktemp("tiny-adapters")
    base = make_tiny_llama(folder / "base")
    make_lora_adapter(folder / "a", base, r=4, seed=1)
    make_lora_adapter(folder / "b", base, r=4, seed=2)
    return folder


@pytest.fixture
def worker_gate(tmp_path, monkeypatch) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "sitecustomize.py").write_text(GATE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(gate), os.environ.get("PYTHONPATH")])))


class Claims:
    """Claim folders of one test (the kubelet maps claim X to claims_root/X), named after its namespace."""

    def __init__(self, root: Path, namespace: str, adapters: Path):
        self.root, self.namespace, self.adapters = root, namespace, adapters

    def make(self, suffix: str = "store", *, hold: bool = False) -> str:
        name = f"{self.namespace}-{suffix}"
        for adapter in ("a", "b"):
            shutil.copytree(self.adapters / adapter, self.root / name / "adapters" / adapter)
        if hold:
            (self.root / name / HOLD).touch()
        return name

    def release(self, claim: str) -> None:
        (self.root / claim / HOLD).unlink()

    def path(self, claim: str, *parts: str) -> Path:
        return self.root.joinpath(claim, *parts)


@pytest.fixture
def claims(claims_root, namespace, tiny_adapters, worker_gate) -> Claims:
    return Claims(claims_root, namespace, tiny_adapters)


class Operator:
    """`adaptermerge operator --standalone -n NS` as a subprocess with the chart's operator identity."""

    def __init__(self, kubeconfig: Path, namespace: str, worker_account: str, logs: Path):
        self.kubeconfig, self.namespace, self.worker_account, self.logs = kubeconfig, namespace, worker_account, logs
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": self.worker_account,
               "ADAPTERMERGE_WORKER_IMAGE_PULL_POLICY": "IfNotPresent"}
        with self.log_file.open("w") as out:
            self.process = subprocess.Popen(
                [str(CLI), "operator", "--standalone", "--namespace", self.namespace, "--verbose"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def log_file(self) -> Path:
        return self.logs / f"operator-{self.starts}.log"

    def log(self) -> str:
        return "\n".join(
            f"--- operator run {i} ---\n" + (self.logs / f"operator-{i}.log").read_text(errors="replace")[-6000:]
            for i in range(1, self.starts + 1)
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_file.read_text(errors="replace"):
            assert self.process.poll() is None, f"operator exited\n{self.log()}"
            assert time.monotonic() < deadline, f"operator never logged {text!r}\n{self.log()}"
            time.sleep(0.2)


@pytest.fixture
def operator(control_plane, namespace, crd, test_kubelet, tmp_path):
    from support.chart_identity import operator_kubeconfig, worker_service_account

    kubeconfig = operator_kubeconfig(control_plane, namespace, {"watchNamespaces": [namespace]})
    running = Operator(kubeconfig, namespace, worker_service_account(namespace), tmp_path)
    running.start()
    yield running
    running.stop()


# -- helpers ---------------------------------------------------------------------------------------


def apply(control_plane, namespace: str, document: dict) -> None:
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document))


def get(control_plane, namespace: str, *what: str) -> dict:
    return control_plane.get_json(*what, namespace=namespace)


def jobs(control_plane, namespace: str) -> list[dict]:
    return get(control_plane, namespace, "jobs")["items"]


def wait_until(check, what: str, operator: Operator, control_plane, timeout: float = TIMEOUT):
    """support.control_plane.wait_until, failing with the operator's and the control plane's logs."""
    try:
        return control_plane_wait_until(check, timeout, what, interval=0.5)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{operator.log()}\n{control_plane.logs()}")


def phase_is(control_plane, namespace, name, phase, generation=1):
    def check():
        merge = get(control_plane, namespace, "adaptermerge", name)
        status = merge.get("status") or {}
        return merge if status.get("phase") == phase and status.get("observedGeneration") == generation else None
    return check


def ready(merge: dict) -> dict:
    return next(c for c in merge["status"]["conditions"] if c["type"] == "Ready")


def events_of(control_plane, namespace: str, name: str) -> list[str]:
    items = get(control_plane, namespace, "events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [e["reason"] for e in items]


# -- tests -----------------------------------------------------------------------------------------


def test_merge_runs_to_ready_and_deleting_it_keeps_the_output(control_plane, namespace, operator, claims):
    claim = claims.make()
    apply(control_plane, namespace, resource("dev", claim))

    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "adaptermerge/dev",
                                   f"--timeout={TIMEOUT}s", check=False)
    assert waited.returncode == 0, f"{waited.stderr}\n{operator.log()}\n{control_plane.logs()}"

    merge = get(control_plane, namespace, "adaptermerge", "dev")
    status = merge["status"]
    assert (status["phase"], status["observedGeneration"], status["jobName"]) == ("Succeeded", 1, "dev-1")
    assert ready(merge)["reason"] == "MergeSucceeded" and ready(merge)["observedGeneration"] == 1
    assert status["output"] == {"claimName": claim, "path": "merged/dev", "format": "adapter", "rank": 4}
    assert status["result"]["modules"] == 4 and status["result"]["maxReconstructionError"] >= 0
    assert status["startTime"] <= status["completionTime"]
    merged = claims.path(claim, "merged", "dev")
    assert (merged / "adapter_config.json").is_file() and (merged / "adapter_model.safetensors").is_file()
    assert json.loads((merged / "adapter_config.json").read_text())["r"] == 4
    assert {"JobCreated", "MergeSucceeded"} <= set(events_of(control_plane, namespace, "dev"))
    [job] = jobs(control_plane, namespace)
    assert job["metadata"]["ownerReferences"][0]["uid"] == merge["metadata"]["uid"]

    control_plane.kubectl("delete", "-n", namespace, "adaptermerge", "dev", "--wait=true", "--timeout=60s")
    wait_until(lambda: not jobs(control_plane, namespace), "the Job to be garbage-collected", operator, control_plane, 60)
    wait_until(lambda: not get(control_plane, namespace, "configmaps", "-l", "adaptermerge.io/name=dev")["items"],
               "the ConfigMap to be garbage-collected", operator, control_plane, 60)
    assert (merged / "adapter_model.safetensors").is_file(), "outputs on volumes are never deleted"


def test_missing_adapter_fails_with_the_worker_message(control_plane, namespace, operator, claims):
    claim = claims.make()
    spec = resource("missing", claim)
    spec["spec"]["adapters"][1]["path"] = "adapters/not-there"
    apply(control_plane, namespace, spec)

    merge = wait_until(phase_is(control_plane, namespace, "missing", "Failed"), "phase Failed", operator, control_plane)
    assert ready(merge)["status"] == "False" and ready(merge)["reason"] == "InvalidSpec"
    assert "adapters/not-there" in ready(merge)["message"] and "spec.adapters[1].path" in ready(merge)["message"]
    assert merge["status"]["result"]["exitCode"] == 2
    [job] = jobs(control_plane, namespace)
    assert job["status"].get("failed") == 1, "exit code 2 fails the Job without retries"
    assert "InvalidSpec" in events_of(control_plane, namespace, "missing")
    assert not claims.path(claim, "merged", "missing").exists()


def test_spec_the_crd_cannot_check_fails_without_a_job(control_plane, namespace, operator, claims):
    claim = claims.make()
    spec = resource("dupes", claim)
    spec["spec"]["adapters"][1]["name"] = "a"  # duplicate adapter names: only the models know
    apply(control_plane, namespace, spec)

    merge = wait_until(phase_is(control_plane, namespace, "dupes", "Failed"), "phase Failed", operator, control_plane, 60)
    assert ready(merge)["reason"] == "InvalidSpec" and ready(merge)["message"].startswith("spec.adapters[1].name")
    assert jobs(control_plane, namespace) == []
    assert "Traceback" not in operator.log_file.read_text()


def test_job_past_its_deadline_fails_with_deadline_exceeded(control_plane, namespace, operator, claims):
    claim = claims.make(hold=True)  # never released: the worker waits past the deadline
    apply(control_plane, namespace, resource("slow", claim, job={"gpus": 0, "activeDeadlineSeconds": 3}))

    merge = wait_until(phase_is(control_plane, namespace, "slow", "Failed"), "phase Failed", operator, control_plane, 90)
    assert ready(merge)["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=3" in ready(merge)["message"]


def test_spec_update_supersedes_the_running_job(control_plane, namespace, operator, claims):
    held, free = claims.make("held", hold=True), claims.make("free")
    apply(control_plane, namespace, resource("moving", held))
    wait_until(phase_is(control_plane, namespace, "moving", "Running"), "generation 1 running", operator, control_plane)
    [first] = jobs(control_plane, namespace)
    assert first["metadata"]["name"] == "moving-1"

    apply(control_plane, namespace, resource("moving", free))  # generation 2 writes to another claim
    merge = wait_until(phase_is(control_plane, namespace, "moving", "Succeeded", generation=2),
                       "generation 2 to succeed", operator, control_plane)
    assert merge["status"]["jobName"] == "moving-2" and merge["status"]["output"]["claimName"] == free
    assert [j["metadata"]["name"] for j in jobs(control_plane, namespace)] == ["moving-2"]
    configmaps = get(control_plane, namespace, "configmaps", "-l", "adaptermerge.io/name=moving")["items"]
    assert [c["metadata"]["name"] for c in configmaps] == ["moving-2"]
    pods = get(control_plane, namespace, "pods")["items"]
    assert {p["metadata"]["labels"]["job-name"] for p in pods} == {"moving-2"}, "the old worker was stopped"
    assert claims.path(free, "merged", "moving", "adapter_model.safetensors").is_file()
    assert not claims.path(held, "merged", "moving").exists()
    assert "Superseded" in events_of(control_plane, namespace, "moving")


def test_operator_restart_mid_merge_adopts_the_job(control_plane, namespace, operator, claims):
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("steady", claim))
    wait_until(phase_is(control_plane, namespace, "steady", "Running"), "the merge to run", operator, control_plane)
    [before] = jobs(control_plane, namespace)

    operator.stop()
    operator.start()
    operator.wait_for_log("[%s/steady] Resuming is processed" % namespace)
    claims.release(claim)
    merge = wait_until(phase_is(control_plane, namespace, "steady", "Succeeded"), "the merge to finish", operator, control_plane)

    [after] = jobs(control_plane, namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "the running Job was adopted, not replaced"
    pods = get(control_plane, namespace, "pods")["items"]
    assert len(pods) == 1, "one worker ran"
    assert merge["status"]["jobName"] == "steady-1" and merge["status"]["result"]["modules"] == 4


def test_crd_rejects_invalid_resources_at_apply_time(control_plane, namespace, crd):
    def rejected(change) -> str:
        document = resource("bad", "store")
        change(document["spec"])
        done = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document), check=False)
        assert done.returncode != 0, f"accepted: {document['spec']}"
        return done.stderr

    three = [{"name": n, "path": f"adapters/{n}"} for n in ("a", "b", "c")]
    assert "slerp needs exactly two adapters" in rejected(lambda s: s.update(method="slerp", adapters=three))
    assert "spec.parameters.density" in rejected(lambda s: s.update(parameters={"density": 1.5}))
    assert "without '..'" in rejected(lambda s: s["adapters"][0].update(path="../other/a"))
    assert "without '..'" in rejected(lambda s: s["output"].update(path="/etc/merged"))
    assert "spec.output.rank" in rejected(lambda s: s["output"].update(rank=0))
    assert "spec.method" in rejected(lambda s: s.update(method="average"))
    assert "parameters.density is required" in rejected(lambda s: s.update(parameters={}))
    assert get(control_plane, namespace, "adaptermerges")["items"] == []
