"""Builders for AdapterMerge resources, Jobs and pods as the API server would hand them to the operator.

Offered as the `objects` fixture (tests/operator is no importable package: `operator` is stdlib's).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from merge_worker.output.result import build_result

from adaptermerge_operator import names
from adaptermerge_operator.settings import Settings

SPEC = {
    "volume": {"claimName": "store"},
    "adapters": [
        {"name": "coder", "path": "adapters/coder", "weight": 0.6},
        {"name": "sql", "path": "adapters/sql", "claimName": "other-store"},
    ],
    "method": "ties",
    "parameters": {"density": 0.5},
    "output": {"path": "merged/out", "rank": 8},
}


def merge_resource(spec: dict | None = None, *, name: str = "dev", generation: int = 1,
                   status: dict | None = None) -> dict[str, Any]:
    resource = {
        "apiVersion": "adaptermerge.io/v1alpha1",
        "kind": "AdapterMerge",
        "metadata": {"name": name, "namespace": "team", "uid": "uid-1234", "generation": generation,
                     "resourceVersion": "7"},
        "spec": copy.deepcopy(SPEC if spec is None else spec),
    }
    if status is not None:
        resource["status"] = status
    return resource


def job_object(name: str = "dev-1", *, conditions: list[dict] | None = None, suspend: bool = False,
               labels: dict | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "uid": f"job-uid-{name}",
                     "labels": {names.LABEL_GENERATION: name.rsplit("-", 1)[-1], **(labels or {})}},
        "spec": {"suspend": suspend, "activeDeadlineSeconds": 60},
        "status": {"conditions": conditions or [], **status},
    }


def condition(type_: str, reason: str = "", message: str = "", at: str = "2030-01-01T00:00:10Z") -> dict:
    return {"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": at}


def pod_object(job: str = "dev-1", *, name: str = "dev-1-abcde", phase: str = "Pending", created: str = "2030-01-01T00:00:00Z",
               state: dict | None = None, conditions: list[dict] | None = None,
               namespace: str = "team", controller_uid: str | None = None) -> dict[str, Any]:
    """A pod the Job controller made for Job `job` (its controller reference names the Job's uid)."""
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": controller_uid or f"job-uid-{job}",
             "controller": True}
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"job-name": job}, "creationTimestamp": created,
                     "ownerReferences": [owner]},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "worker", "state": state or {}}],
        },
    }


def terminated(exit_code: int, message: str) -> dict:
    return {"terminated": {"exitCode": exit_code, "message": message}}


def worker_summary(exit_code: int, message: str, **details: Any) -> str:
    """The termination message the real worker writes (merge_worker.output.result's builder, docs/interfaces.md #5)."""
    return json.dumps(build_result(exit_code, message, **details))


class Objects:
    SPEC = SPEC
    merge = staticmethod(merge_resource)
    job = staticmethod(job_object)
    pod = staticmethod(pod_object)
    condition = staticmethod(condition)
    terminated = staticmethod(terminated)
    summary = staticmethod(worker_summary)


@pytest.fixture
def objects() -> type[Objects]:
    return Objects


@pytest.fixture
def settings() -> Settings:
    return Settings(
        worker_image="registry.example/worker:1",
        worker_image_pull_policy="IfNotPresent",
        worker_service_account="merge-worker",
        gpu_resource="example.com/gpu",
        default_node_selector={"pool": "gpu", "zone": "a"},
        default_tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        default_queue_name="",
    )


# -- the operator end to end (cluster tests; the harness is tests/support/operator_harness.py) --------

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "adaptermerge.io_adaptermerges.yaml"


@pytest.fixture(scope="module")
def crd(control_plane):
    control_plane.kubectl("apply", "-f", str(CRD_FILE))
    control_plane.wait_established("crd/adaptermerges.adaptermerge.io")


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
    from support.operator_harness import GATE

    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "sitecustomize.py").write_text(GATE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(gate), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def claims(claims_root, namespace, tiny_adapters, worker_gate):
    from support.operator_harness import Claims

    return Claims(claims_root, namespace, tiny_adapters)


@pytest.fixture
def operator(control_plane, namespace, crd, test_kubelet, tmp_path):
    from support.chart_identity import operator_kubeconfig, worker_service_account
    from support.operator_harness import Operator

    kubeconfig = operator_kubeconfig(control_plane, namespace, {"watchNamespaces": [namespace]})
    running = Operator(kubeconfig, namespace, worker_service_account(namespace), tmp_path)
    running.start()
    yield running
    running.stop()


def build_gitops_tool(tool: str) -> Path:
    """The folder of a tool scripts/build-gitops-tools.sh builds from Go modules (cached)."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "build-gitops-tools.sh"
    done = subprocess.run(["bash", str(script), tool], stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def kstatus_tool() -> Path:
    """sigs.k8s.io/cli-utils' kstatus around tests/support/kstatus: <folder>/kstatus."""
    return build_gitops_tool("kstatus") / "kstatus"


@pytest.fixture(scope="session")
def kueue_tool() -> Path:
    """The Kueue controller manager and its CRDs: <folder>/kueue, <folder>/crds/."""
    return build_gitops_tool("kueue")
