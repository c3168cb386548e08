"""The operator end to end, for tests/operator's cluster tests: the operator as a subprocess holding the
chart's ServiceAccount token (docs/interfaces.md #11), claim folders with tiny adapters, and a worker
gate.

The gate makes slow runs deterministic without sleeping in product code: a `sitecustomize` put on the
worker's PYTHONPATH (the test kubelet passes its environment on) holds the worker process at
interpreter start while a HOLD file exists in one of its claim folders, and makes it exit 1 once if a
FAIL_ONCE file is there (it removes the file: the next attempt runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.control_plane import wait_until as control_plane_wait_until
from support.operator_process import stop_operator

CLI = Path(sys.executable).parent / "adaptermerge"
HOLD = "HOLD"
FAIL_ONCE = "FAIL_ONCE"
TIMEOUT = 180  # seconds for a real worker run on a busy 2-core machine

GATE = f'''
import os, sys, time
_args = [a.decode() for a in open("/proc/self/cmdline", "rb").read().split(b"\\0") if a]
_claims = [v.split("=", 1)[1] for k, v in zip(_args, _args[1:]) if k == "--volume" and "=" in v]
for _failing in [c + "/{FAIL_ONCE}" for c in _claims]:
    if os.path.exists(_failing):
        os.remove(_failing)
        sys.stderr.write("test gate: failing this attempt on purpose\\n")
        os._exit(1)
while any(os.path.exists(c + "/{HOLD}") for c in _claims):
    time.sleep(0.1)
'''


class Claims:
    """Claim folders of one test (the kubelet maps claim X to claims_root/X), named after its namespace."""

    def __init__(self, root: Path, namespace: str, adapters: Path):
        self.root, self.namespace, self.adapters = root, namespace, adapters

    def make(self, suffix: str = "store", *, hold: bool = False, fail_once: bool = False) -> str:
        name = f"{self.namespace}-{suffix}"
        for adapter in ("a", "b"):
            shutil.copytree(self.adapters / adapter, self.root / name / "adapters" / adapter)
        if hold:
            (self.root / name / HOLD).touch()
        if fail_once:
            (self.root / name / FAIL_ONCE).touch()
        return name

    def release(self, claim: str) -> None:
        (self.root / claim / HOLD).unlink()

    def path(self, claim: str, *parts: str) -> Path:
        return self.root.joinpath(claim, *parts)


class Operator:
    """`adaptermerge operator --standalone -n NS` as a subprocess with the chart's operator identity.
    `env` holds extra operator settings (docs/operator.md, "Settings")."""

    def __init__(self, kubeconfig: Path, namespace: str, worker_account: str, logs: Path):
        self.kubeconfig, self.namespace, self.worker_account, self.logs = kubeconfig, namespace, worker_account, logs
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.env: dict[str, str] = {}

    def start(self, **env: str) -> None:
        self.env.update(env)
        self.starts += 1
        full_env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                    "ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": self.worker_account,
                    "ADAPTERMERGE_WORKER_IMAGE_PULL_POLICY": "IfNotPresent", **self.env}
        with self.log_file.open("w") as out:
            self.process = subprocess.Popen(
                [str(CLI), "operator", "--standalone", "--namespace", self.namespace, "--verbose"],
                env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def restart(self, **env: str) -> None:
        self.stop()
        self.start(**env)

    @property
    def log_file(self) -> Path:
        return self.logs / f"operator-{self.starts}.log"

    def log(self) -> str:
        return "\n".join(
            f"--- operator run {i} ---\n" + (self.logs / f"operator-{i}.log").read_text(errors="replace")[-6000:]
            for i in range(1, self.starts + 1)
        )

    def stop(self) -> None:
        if self.process:
            stop_operator(self.process)

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_file.read_text(errors="replace"):
            assert self.process.poll() is None, f"operator exited\n{self.log()}"
            assert time.monotonic() < deadline, f"operator never logged {text!r}\n{self.log()}"
            time.sleep(0.2)


def resource(name: str, claim: str, **spec) -> dict:
    base = {
        "volume": {"claimName": claim},
        "adapters": [{"name": "a", "path": "adapters/a", "weight": 0.7}, {"name": "b", "path": "adapters/b"}],
        "method": "ties",
        "parameters": {"density": 0.5},
        "output": {"path": f"merged/{name}", "rank": 4},
        "job": {"gpus": 1, "backoffLimit": 1, "activeDeadlineSeconds": 600},
    }
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name},
            "spec": {**base, **spec}}


def apply(control_plane, namespace: str, document: dict, check: bool = True):
    return control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document), check=check)


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


def phase_is(control_plane, namespace, name, phase, generation=1, reason=None):
    def check():
        merge = get(control_plane, namespace, "adaptermerge", name)
        status = merge.get("status") or {}
        if reason is not None and condition(merge, "Ready").get("reason") != reason:
            return None
        return merge if status.get("phase") == phase and status.get("observedGeneration") == generation else None
    return check


def condition(merge: dict, type_: str) -> dict:
    return next((c for c in (merge.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def ready(merge: dict) -> dict:
    return condition(merge, "Ready")


def events_of(control_plane, namespace: str, name: str) -> list[dict]:
    return get(control_plane, namespace, "events", "--field-selector", f"involvedObject.name={name}")["items"]


def event_reasons(control_plane, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events_of(control_plane, namespace, name)]
