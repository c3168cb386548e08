"""GitOps health: what kstatus itself (sigs.k8s.io/cli-utils, the library behind Flux's health checks)
says about AdapterMerges the operator handles on the real control plane. The kstatus program is
tests/support/kstatus, built by scripts/build-gitops-tools.sh.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from support.operator_harness import apply, phase_is, resource, wait_until

pytestmark = pytest.mark.cluster


def kstatus(kstatus_tool, control_plane, namespace: str, name: str) -> dict:
    obj = control_plane.kubectl("get", "-n", namespace, "adaptermerge", name, "-o", "json").stdout
    done = subprocess.run([str(kstatus_tool)], input=obj, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_kstatus_tells_progress_success_and_failure_apart(control_plane, namespace, operator, claims, kstatus_tool):
    claim = claims.make(hold=True)
    apply(control_plane, namespace, resource("health", claim, job={"gpus": 0}))
    wait_until(phase_is(control_plane, namespace, "health", "Running"), "the merge to run", operator, control_plane)
    assert kstatus(kstatus_tool, control_plane, namespace, "health")["status"] == "InProgress"

    claims.release(claim)
    wait_until(phase_is(control_plane, namespace, "health", "Succeeded"), "the merge", operator, control_plane)
    assert kstatus(kstatus_tool, control_plane, namespace, "health")["status"] == "Current"

    # A new generation the operator has not seen yet (it is stopped): in progress, not the old verdict.
    operator.stop()
    broken = resource("health", claim, job={"gpus": 0})
    broken["spec"]["adapters"][1]["path"] = "adapters/not-there"
    apply(control_plane, namespace, broken)
    assert kstatus(kstatus_tool, control_plane, namespace, "health")["status"] == "InProgress"

    operator.start()
    wait_until(phase_is(control_plane, namespace, "health", "Failed", generation=2), "the failure", operator, control_plane)
    verdict = kstatus(kstatus_tool, control_plane, namespace, "health")
    assert verdict["status"] == "Failed" and "adapters/not-there" in verdict["message"]
    # kubectl wait on the same conditions, as a pipeline would.
    waited = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Stalled", "adaptermerge/health",
                                   "--timeout=10s", check=False)
    assert waited.returncode == 0, waited.stderr
