"""The chart rendered with `helm template` (no cluster): lint, CRDs, the Deployment, the values the
operator receives, and values.schema.json rejecting wrong types."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "adaptermerge"
CRD_FILE = "adaptermerge.io_adaptermerges.yaml"


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def container(objects: list[dict]) -> dict:
    (deployment,) = by_kind(objects, "Deployment")
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    return operator


def env(objects: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(objects)["env"]}


def test_helm_lint(helm):
    done = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_crd_is_the_generated_one():
    generated, shipped = REPO / "crds" / CRD_FILE, CHART / "crds" / CRD_FILE
    assert shipped.read_bytes() == generated.read_bytes(), (
        f"charts/adaptermerge/crds/{CRD_FILE} is out of date; run: cp crds/{CRD_FILE} charts/adaptermerge/crds/"
    )


def test_crds_ship_in_crds_folder_by_default(render):
    assert by_kind(render(), "CustomResourceDefinition") == []


def test_crds_as_templates_are_the_crds_folder_kept_on_uninstall(render):
    files = [d for p in sorted((CHART / "crds").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    rendered = {c["metadata"]["name"]: c for c in by_kind(render({"crds": {"asTemplates": True}}), "CustomResourceDefinition")}
    assert sorted(rendered) == sorted(f["metadata"]["name"] for f in files)
    for crd in files:
        templated = rendered[crd["metadata"]["name"]]
        assert templated["spec"] == crd["spec"]
        assert templated["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    no_keep = by_kind(render({"crds": {"asTemplates": True, "keep": False}}), "CustomResourceDefinition")
    assert all("helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in no_keep)


def test_default_deployment_is_one_standalone_replica_replaced_by_recreate(render):
    objects = render()
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    operator = container(objects)
    assert operator["command"] == ["adaptermerge", "operator"]
    assert "--standalone" in operator["args"] and "--all-namespaces" in operator["args"]
    assert by_kind(objects, "ClusterKopfPeering") == [] and by_kind(objects, "KopfPeering") == []


def test_liveness_probe_targets_kopfs_health_endpoint(render):
    operator = container(render({"liveness": {"port": 9090}}))
    assert "--liveness=http://0.0.0.0:9090/healthz" in operator["args"]
    probe = operator["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in operator["ports"]}[probe["port"]]
    assert (probe["path"], port) == ("/healthz", 9090)


def test_restricted_security_context(render):
    objects = render()
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(objects)
    security = operator["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert operator["resources"]["requests"] and operator["resources"]["limits"]
    tmp = {m["name"] for m in operator["volumeMounts"] if m["mountPath"] == "/tmp"}
    assert any(v["name"] in tmp and "emptyDir" in v for v in pod["volumes"])


def test_worker_defaults_reach_the_operator_as_contract_env_vars(render):
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    values = {"worker": {"image": {"repository": "registry.local/am-worker", "tag": "v9", "pullPolicy": "Always"},
                         "gpuResourceName": "amd.com/gpu", "nodeSelector": {"gpu": "a100"},
                         "tolerations": tolerations, "queueName": "gpu-queue",
                         "schedulingTimeoutSeconds": 60, "runAsUser": 2000, "runAsGroup": 3000},
              "workerServiceAccount": {"name": "merger"}}
    got = env(render(values))
    assert got["ADAPTERMERGE_WORKER_IMAGE"] == "registry.local/am-worker:v9"
    assert got["ADAPTERMERGE_WORKER_IMAGE_PULL_POLICY"] == "Always"
    assert got["ADAPTERMERGE_WORKER_SERVICE_ACCOUNT"] == "merger"
    assert got["ADAPTERMERGE_GPU_RESOURCE"] == "amd.com/gpu"
    assert json.loads(got["ADAPTERMERGE_DEFAULT_NODE_SELECTOR"]) == {"gpu": "a100"}
    assert json.loads(got["ADAPTERMERGE_DEFAULT_TOLERATIONS"]) == tolerations
    assert got["ADAPTERMERGE_DEFAULT_QUEUE_NAME"] == "gpu-queue"
    assert got["ADAPTERMERGE_SCHEDULING_TIMEOUT_SECONDS"] == "60"
    assert (got["ADAPTERMERGE_WORKER_RUN_AS_USER"], got["ADAPTERMERGE_WORKER_RUN_AS_GROUP"]) == ("2000", "3000")


def test_default_worker_settings(render):
    got = env(render())
    assert got["ADAPTERMERGE_GPU_RESOURCE"] == "nvidia.com/gpu"
    assert json.loads(got["ADAPTERMERGE_DEFAULT_NODE_SELECTOR"]) == {}
    assert json.loads(got["ADAPTERMERGE_DEFAULT_TOLERATIONS"]) == []
    assert got["ADAPTERMERGE_WORKER_IMAGE"].endswith(":0.1.0")  # the chart's appVersion


def test_worker_service_account_exists_where_jobs_run_without_a_token(render):
    accounts = by_kind(render({"watchNamespaces": ["team-a", "team-b"]}), "ServiceAccount")
    workers = [a for a in accounts if a["metadata"]["name"].endswith("-worker")]
    assert sorted(a["metadata"]["namespace"] for a in workers) == ["team-a", "team-b"]
    assert all(a["automountServiceAccountToken"] is False for a in workers)
    cluster_wide = by_kind(render({"workerServiceAccount": {"namespaces": ["ml"]}}, namespace="ops"), "ServiceAccount")
    assert sorted(a["metadata"]["namespace"] for a in cluster_wide if a["metadata"]["name"].endswith("-worker")) == ["ml", "ops"]


def run_operator_command(operator: dict, pod_name: str, tmp_path: Path) -> list[str]:
    """Runs the container's command with POD_NAME set and a stand-in `adaptermerge` that prints its
    arguments: what the operator process would receive."""
    fake = tmp_path / "adaptermerge"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    environment = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "POD_NAME": pod_name}
    done = subprocess.run(operator["command"] + operator["args"], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_ha_replicas_peer_with_distinct_priorities(render, tmp_path):
    objects = render({"replicas": 3, "watchNamespaces": ["team-a", "team-b"]})
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    peerings = by_kind(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    operator = container(objects)
    priorities = set()
    for pod in ("am-7d9f-abcde", "am-7d9f-fghij", "am-7d9f-klmno"):
        argv = run_operator_command(operator, pod, tmp_path)
        assert argv[0] == "operator"
        assert f"--peering={peerings[0]['metadata']['name']}" in argv and "--standalone" not in argv
        assert ["--namespace=team-a", "--namespace=team-b"] == [a for a in argv if a.startswith("--namespace")]
        (priority,) = [a.split("=", 1)[1] for a in argv if a.startswith("--priority=")]
        priorities.add(int(priority))
    assert len(priorities) == 3


def test_ha_cluster_wide_uses_a_cluster_peering(render):
    objects = render({"replicas": 2})
    (peering,) = by_kind(objects, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in container(objects)["args"]
    hooked = by_kind(render({"replicas": 2, "crds": {"asTemplates": True}}), "ClusterKopfPeering")
    # With templated CRDs the peering object waits for its CRD: a post-install hook.
    assert "post-install" in hooked[0]["metadata"]["annotations"]["helm.sh/hook"]


@pytest.mark.parametrize(
    "values, field",
    [
        ({"replicas": "two"}, "/replicas"),
        ({"replicas": 0}, "/replicas"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"crds": {"asTemplates": "yes"}}, "/crds/asTemplates"),
        ({"strategyType": "BlueGreen"}, "/strategyType"),
        ({"worker": {"gpuResourceName": 1}}, "/worker/gpuResourceName"),
        ({"worker": {"nodeSelector": ["gpu"]}}, "/worker/nodeSelector"),
        ({"worker": {"nodeSelector": {"gpu": 1}}}, "/worker/nodeSelector/gpu"),
        ({"worker": {"tolerations": {"key": "x"}}}, "/worker/tolerations"),
        ({"worker": {"image": {"pullPolicy": "Sometimes"}}}, "/worker/image/pullPolicy"),
        ({"liveness": {"port": 70000}}, "/liveness/port"),
        ({"worker": {"runAsUser": "nobody"}}, "/worker/runAsUser"),
        ({"serviceAccount": {"create": "true"}}, "/serviceAccount/create"),
        ({"metrics": {"port": 0}}, "/metrics/port"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
        ({"replica": 2}, "replica"),  # a typo is an error, not silently ignored
    ],
)
def test_schema_rejects_wrong_values(render_fails, values, field):
    assert field in render_fails(values)


@pytest.mark.parametrize("values", [{}, {"worker": {"nodeSelector": {"gpu": "h100"}, "queueName": "q",
                                                    "schedulingTimeoutSeconds": 0,
                                                    "tolerations": [{"key": "gpu", "operator": "Exists"}]}}])
def test_operator_accepts_the_settings_the_chart_passes(render, values):
    from adaptermerge_operator.settings import Settings

    settings = Settings.from_env(env(render(values)))
    worker = values.get("worker", {})
    assert settings.default_node_selector == worker.get("nodeSelector", {})
    assert settings.default_tolerations == worker.get("tolerations", [])
    assert settings.default_queue_name == worker.get("queueName", "")
    assert settings.scheduling_timeout == worker.get("schedulingTimeoutSeconds", 900)
    assert settings.worker_service_account.endswith("-worker")


def test_metrics_port_reaches_the_operator_and_a_service_selects_it(render):
    objects = render({"metrics": {"port": 9100}})
    operator = container(objects)
    assert env(objects)["ADAPTERMERGE_METRICS_PORT"] == "9100"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in operator["ports"]
    (service,) = by_kind(objects, "Service")
    (deployment,) = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    assert by_kind(objects, "ServiceMonitor") == []  # optional: its CRD may not exist


def test_service_monitor_scrapes_the_metrics_service(render):
    objects = render({"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}}})
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (service,) = by_kind(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_metrics_can_be_turned_off(render):
    objects = render({"metrics": {"enabled": False}})
    assert "ADAPTERMERGE_METRICS_PORT" not in env(objects)
    assert by_kind(objects, "Service") == [] and "metrics" not in {p["name"] for p in container(objects)["ports"]}
