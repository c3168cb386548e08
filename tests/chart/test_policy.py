"""The tenant policy (issue 12, defect 2): one table of specs, judged by both enforcers the chart sets up.

- the operator: the policy exactly as the chart passes it (ADAPTERMERGE_POLICY of the rendered
  Deployment, read by Settings.from_env), checked by adaptermerge_operator.policy;
- admission: the chart's ValidatingAdmissionPolicy and binding applied to the real API server, each
  spec sent with `kubectl create --dry-run=server`.
Both must allow and refuse the same specs, naming the same field.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from merge_worker.spec import parse_spec
from support.chart_identity import helm_template, object_prefix
from support.control_plane import wait_until

from adaptermerge_operator import policy
from adaptermerge_operator.settings import Settings

POLICY = {
    "allowedPriorityClasses": ["batch-low"],
    "allowedTolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
                           {"key": "pool", "value": "merges"}],
    "allowedNodeSelectors": {"pool": ["gpu-a", "gpu-b"]},
    "maxGpus": 2,
    "maxMemory": "64Gi",
    "claims": {"names": ["store", "shared"]},
}
SPEC = {
    "volume": {"claimName": "store"},
    "adapters": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
    "method": "linear",
    "output": {"path": "out"},
}
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}]}}}

ALLOWED = [
    {},
    {"job": {"priorityClassName": "batch-low"}},
    {"job": {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
    {"job": {"tolerations": [{"key": "gpu", "value": "a100", "effect": "NoSchedule"}]}},
    {"job": {"tolerations": [{"key": "pool", "value": "merges", "effect": "NoExecute"}]}},
    {"job": {"nodeSelector": {"pool": "gpu-b"}}},
    {"job": {"gpus": 2}},
    {"job": {"resources": {"limits": {"memory": "64Gi", "cpu": 8}, "requests": {"memory": "32Gi"}}}},
    {"output": {"path": "out", "claimName": "shared"}},
]
REFUSED = [
    ({"job": {"priorityClassName": "system-node-critical"}}, "spec.job.priorityClassName"),
    ({"job": {"tolerations": [{"operator": "Exists"}]}}, "spec.job.tolerations"),
    ({"job": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}}, "spec.job.tolerations"),
    ({"job": {"tolerations": [{"key": "pool", "operator": "Exists"}]}}, "spec.job.tolerations"),
    ({"job": {"tolerations": [{"key": "pool", "value": "other"}]}}, "spec.job.tolerations"),
    ({"job": {"nodeSelector": {"pool": "cpu"}}}, "spec.job.nodeSelector"),
    ({"job": {"nodeSelector": {"kubernetes.io/hostname": "n1"}}}, "spec.job.nodeSelector"),
    ({"job": {"affinity": AFFINITY}}, "spec.job.affinity"),
    ({"job": {"gpus": 3}}, "spec.job.gpus"),
    ({"job": {"resources": {"limits": {"memory": "65Gi"}}}}, "spec.job.resources.limits.memory"),
    ({"job": {"resources": {"requests": {"memory": "0.1Ti"}}}}, "spec.job.resources.requests.memory"),
    ({"job": {"resources": {"limits": {"example.com/fpga": 1}, "requests": {"example.com/fpga": 1}}}},
     "spec.job.resources"),
    ({"output": {"path": "out", "claimName": "other"}}, "claim"),
    ({"volume": {"claimName": "other"}}, "claim"),
]


def spec_with(change: dict) -> dict:
    return {**copy.deepcopy(SPEC), **copy.deepcopy(change)}


@pytest.fixture(scope="module")
def chart_policy(render) -> policy.Policy:
    """The policy as the operator receives it from the chart rendered with POLICY."""
    (deployment,) = [o for o in render({"policy": POLICY}) if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    return Settings.from_env(env).policy


# -- the operator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ALLOWED)
def test_operator_allows(chart_policy, change):
    assert policy.violations(chart_policy, parse_spec(spec_with(change)), {}) == []


@pytest.mark.parametrize("change, field", REFUSED)
def test_operator_refuses_naming_the_field(chart_policy, change, field):
    found = policy.violations(chart_policy, parse_spec(spec_with(change)), {})
    assert found and all(field in message for message in found), found


def test_operator_checks_claim_labels():
    rules = policy.Policy(claims={"matchLabels": {"adaptermerge.io/allowed": "true"}})
    spec = parse_spec(spec_with({"output": {"path": "out", "claimName": "out-store"}}))
    labelled = {"adaptermerge.io/allowed": "true", "team": "a"}
    assert policy.violations(rules, spec, {"store": labelled, "out-store": labelled}) == []
    (unlabelled,) = policy.violations(rules, spec, {"store": labelled, "out-store": {"team": "a"}})
    assert "out-store" in unlabelled and "adaptermerge.io/allowed=true" in unlabelled
    (missing,) = policy.violations(rules, spec, {"store": labelled, "out-store": None})
    assert "no such PersistentVolumeClaim" in missing


def test_memory_limit_is_added_only_where_none_is_set():
    rules = policy.Policy(max_memory="64Gi")
    assert policy.memory_limit(rules, {"requests": {"cpu": "2"}}) == {"requests": {"cpu": "2"}, "limits": {"memory": "64Gi"}}
    assert policy.memory_limit(rules, {"limits": {"memory": "8Gi"}}) == {"limits": {"memory": "8Gi"}}
    assert policy.memory_limit(policy.Policy(), {}) == {}


def test_the_jobs_of_merges_without_a_memory_limit_get_the_policys(chart_policy):
    from adaptermerge_operator import job_manifest

    merge = {"metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec_with({})}
    job = job_manifest.render_job(merge, parse_spec(merge["spec"]), Settings(policy=chart_policy))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "64Gi"


def test_disabled_policy_refuses_nothing(render):
    (deployment,) = [o for o in render({"policy": {**POLICY, "enabled": False}}) if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    rules = Settings.from_env(env).policy
    assert policy.violations(rules, parse_spec(spec_with(REFUSED[0][0])), {}) == []
    assert [o for o in render({"policy": {"enabled": False}}) if o["kind"].startswith("ValidatingAdmission")] == []


def test_binding_is_limited_to_the_watched_namespaces(render):
    objects = render({"watchNamespaces": ["team-a", "team-b"]})
    (binding,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    (selector,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert selector == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
    assert binding["spec"]["validationActions"] == ["Deny"]


# -- admission, on the real API server ------------------------------------------------------------------


def merge(change: dict, name: str = "policy-case") -> dict:
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name},
            "spec": spec_with(change)}


def dry_run(control_plane, namespace: str, change: dict):
    return control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(merge(change)), check=False)


@pytest.fixture
def admission_policy(control_plane, helm, chart_crds, namespace):
    """The chart's policy for a release serving only `namespace` (so other tests never meet it)."""
    values = {"fullnameOverride": object_prefix(namespace), "watchNamespaces": [namespace], "policy": POLICY}
    manifest = helm_template(helm, namespace, values, show_only=("templates/policy.yaml",))
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    # A new policy takes effect a moment later; a refused spec shows it is in force.
    wait_until(lambda: dry_run(control_plane, namespace, REFUSED[0][0]).returncode != 0, 30, "the policy in force")
    yield
    control_plane.kubectl("delete", "-f", "-", input=manifest, check=False)


@pytest.mark.cluster
def test_admission_allows_and_refuses_what_the_operator_does(control_plane, namespace, admission_policy):
    for change in ALLOWED:
        done = dry_run(control_plane, namespace, change)
        assert done.returncode == 0, f"{change}: {done.stderr}"
    for change, field in REFUSED:
        done = dry_run(control_plane, namespace, change)
        assert done.returncode != 0 and field.removeprefix("spec.") in done.stderr, f"{change}: {done.stderr}"
        assert "ValidatingAdmissionPolicy" in done.stderr, done.stderr


@pytest.mark.cluster
def test_admission_leaves_writes_that_keep_the_spec_alone(control_plane, namespace, admission_policy):
    """A resource admitted before the policy keeps working: the operator's metadata patches
    (finalizers, annotations) do not change the spec; a spec change is judged."""
    refused = merge(REFUSED[0][0], name="older")
    # Create it through the binding's blind spot: with the binding gone, then put the binding back.
    binding = f"{object_prefix(namespace)}-tenant-policy"
    saved = control_plane.kubectl("get", "validatingadmissionpolicybinding", binding, "-o", "yaml").stdout
    control_plane.kubectl("delete", "validatingadmissionpolicybinding", binding)
    wait_until(lambda: control_plane.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(refused),
                                             check=False).returncode == 0, 30, "the binding to be gone")
    control_plane.kubectl("apply", "-f", "-", input=saved)
    wait_until(lambda: dry_run(control_plane, namespace, REFUSED[0][0]).returncode != 0, 30, "the policy in force")
    done = control_plane.kubectl("annotate", "adaptermerge", "older", "-n", namespace, "example.com/note=x", check=False)
    assert done.returncode == 0, done.stderr
    done = control_plane.kubectl("patch", "adaptermerge", "older", "-n", namespace, "--type=merge",
                                 "-p", '{"spec": {"job": {"gpus": 1}}}', check=False)
    assert done.returncode != 0 and "priorityClassName" in done.stderr, done.stderr


@pytest.mark.cluster
def test_cluster_wide_merges_only_where_the_worker_service_account_exists(control_plane, helm, chart_crds, namespace,
                                                                          extra_namespace):
    values = {"fullnameOverride": object_prefix(namespace), "policy": POLICY}  # cluster-wide: no watchNamespaces
    documents = list(yaml.safe_load_all(helm_template(helm, namespace, values, show_only=("templates/policy.yaml",))))
    # Cluster-wide, the binding covers every namespace; here only these two, so other tests never meet it.
    binding = next(d for d in documents if d["kind"] == "ValidatingAdmissionPolicyBinding")
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace, extra_namespace]}]}}
    manifest = yaml.safe_dump_all(documents)
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    try:
        wait_until(lambda: dry_run(control_plane, extra_namespace, {}).returncode != 0, 30, "the policy in force")
        assert "worker's ServiceAccount" in dry_run(control_plane, extra_namespace, {}).stderr
        done = dry_run(control_plane, namespace, {})  # the release namespace has the worker's account
        assert done.returncode == 0, done.stderr
    finally:
        control_plane.kubectl("delete", "-f", "-", input=manifest, check=False)
