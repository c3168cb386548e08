"""The Argo CD health check for AdapterMerge (examples/argocd/health.lua), run by Debian's Lua 5.4
against the sample objects in examples/argocd/samples/. scripts/system-deps.sh installs lua5.4."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "examples" / "argocd"
HARNESS = Path(__file__).with_name("argocd_health_harness.lua")
HEALTH_KEY = "resource.customizations.health.adaptermerge.io_AdapterMerge"

# Sample -> (Argo CD status, text the message must contain), as the issue defines the outcomes.
EXPECTED = {
    "new": ("Progressing", "pick up"),
    "spec-changed": ("Progressing", "generation 2"),
    "job-running": ("Progressing", "dev-assistant-1"),
    "rerun-after-success": ("Progressing", "dev-assistant-2"),
    "no-verdict": ("Progressing", "Ready condition"),
    "succeeded": ("Healthy", "MergeSucceeded"),
    "retention-below": ("Degraded", "below minRetention"),
    "merge-failed": ("Degraded", "MergeFailed"),
    "invalid-spec": ("Degraded", "spec.adapters[1].path"),
    "unschedulable": ("Progressing", "Insufficient nvidia.com/gpu"),
    "job-rejected": ("Degraded", "JobRejected"),
}


def lua_literal(value: Any) -> str:
    """A Lua table constructor for a YAML-loaded value (what Argo CD hands the script as `obj`)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def run_health(lua: str, script: Path, obj: dict, tmp_path: Path) -> tuple[str, str]:
    obj_file = tmp_path / "obj.lua"
    obj_file.write_text("return " + lua_literal(obj) + "\n")
    done = subprocess.run([lua, str(HARNESS), str(script), str(obj_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.rstrip("\n").split("\n", 1)
    return status, message


def test_every_sample_has_an_expected_outcome():
    assert sorted(p.stem for p in (ARGOCD / "samples").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("sample", sorted(EXPECTED))
def test_health_of_sample(sample: str, tmp_path: Path, system_tool):
    obj = yaml.safe_load((ARGOCD / "samples" / f"{sample}.yaml").read_text())
    status, message = run_health(system_tool("lua5.4"), ARGOCD / "health.lua", obj, tmp_path)
    want_status, want_text = EXPECTED[sample]
    assert status == want_status, message
    assert want_text in message


def test_argocd_cm_carries_the_same_script(tmp_path: Path, system_tool):
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    embedded = cm["data"][HEALTH_KEY]
    assert embedded == (ARGOCD / "health.lua").read_text(), (
        "examples/argocd/argocd-cm.yaml's Lua differs from health.lua: copy health.lua into it"
    )
    # And the embedded copy runs: Argo CD executes that one, not the file.
    script = tmp_path / "embedded.lua"
    script.write_text(embedded)
    obj = yaml.safe_load((ARGOCD / "samples" / "succeeded.yaml").read_text())
    assert run_health(system_tool("lua5.4"), script, obj, tmp_path)[0] == "Healthy"
