"""Operator settings from the environment (docs/interfaces.md #9) and the `adaptermerge operator` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptermerge_operator.cli import run_operator
from adaptermerge_operator.settings import Settings, SettingsError

CLI = Path(sys.executable).parent / "adaptermerge"


def test_settings_come_from_the_chart_variables():
    settings = Settings.from_env({
        "ADAPTERMERGE_WORKER_IMAGE": "registry.example/worker:2",
        "ADAPTERMERGE_WORKER_IMAGE_PULL_POLICY": "Always",
        "ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": "am-worker",
        "ADAPTERMERGE_GPU_RESOURCE": "amd.com/gpu",
        "ADAPTERMERGE_DEFAULT_NODE_SELECTOR": '{"pool": "gpu"}',
        "ADAPTERMERGE_DEFAULT_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
        "ADAPTERMERGE_DEFAULT_QUEUE_NAME": "shared",
    })
    assert settings.worker_image == "registry.example/worker:2"
    assert settings.worker_image_pull_policy == "Always"
    assert settings.worker_service_account == "am-worker"
    assert settings.gpu_resource == "amd.com/gpu"
    assert settings.default_node_selector == {"pool": "gpu"}
    assert settings.default_tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert settings.default_queue_name == "shared"


def test_defaults_without_any_variable():
    settings = Settings.from_env({})
    assert settings.gpu_resource == "nvidia.com/gpu"
    assert settings.default_node_selector == {} and settings.default_tolerations == []
    assert settings.worker_image.startswith("ghcr.io/adaptermerge/adaptermerge-worker:")
    # The chart renders empty maps and lists as JSON; `null` means the same.
    assert Settings.from_env({"ADAPTERMERGE_DEFAULT_NODE_SELECTOR": "null",
                              "ADAPTERMERGE_DEFAULT_TOLERATIONS": "[]"}).default_tolerations == []


@pytest.mark.parametrize("name, value", [
    ("ADAPTERMERGE_DEFAULT_NODE_SELECTOR", "{pool: gpu}"),
    ("ADAPTERMERGE_DEFAULT_NODE_SELECTOR", '["gpu"]'),
    ("ADAPTERMERGE_DEFAULT_NODE_SELECTOR", '{"gpus": 4}'),
    ("ADAPTERMERGE_DEFAULT_TOLERATIONS", '{"key": "gpu"}'),
    ("ADAPTERMERGE_WORKER_IMAGE_PULL_POLICY", "Sometimes"),
    ("ADAPTERMERGE_WORKER_RUN_AS_USER", "0"),
    ("ADAPTERMERGE_METRICS_PORT", "70000"),
    ("ADAPTERMERGE_METRICS_PORT", "http"),
])
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_operator_refuses_to_start_with_bad_settings(monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERMERGE_DEFAULT_TOLERATIONS", "not json")
    assert run_operator(["--standalone"]) == 2
    assert "ADAPTERMERGE_DEFAULT_TOLERATIONS" in capsys.readouterr().err


def test_operator_cli_passes_kopf_options_and_rejects_unknown_ones():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERMERGE_")}
    helped = subprocess.run([str(CLI), "operator", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for option in ("--namespace", "--all-namespaces", "--standalone", "--peering", "--priority", "--liveness"):
        assert option in helped.stdout
    wrong = subprocess.run([str(CLI), "operator", "--no-such-flag"], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2 and "--no-such-flag" in wrong.stderr


def test_operator_never_imports_torch():
    code = ("import sys, adaptermerge_operator.handlers, adaptermerge_operator.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_fixed_namespaces_need_no_namespace_discovery():
    from adaptermerge_operator.cli import serves_fixed_namespaces

    assert serves_fixed_namespaces(["team-a", "team-b"], clusterwide=False)
    assert not serves_fixed_namespaces([], clusterwide=True)
    assert not serves_fixed_namespaces([], clusterwide=False)  # kopf's default: every namespace
    for pattern in ("team-*", "!kube-system", "a,b", "team-?"):
        assert not serves_fixed_namespaces(["team-a", pattern], clusterwide=False), pattern
