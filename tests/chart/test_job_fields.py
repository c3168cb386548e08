"""spec.job is validated as the API server validates the Job made from it (issue 12, defect 3).

One table of cases, three checks each: the spec models refuse the value naming the field (CLI and
operator), the chart's CRD refuses it at `kubectl apply` (real API server), and the same value put
straight into a Job is refused by the API server too (so the models are not stricter than Kubernetes
without saying so). Valid fields give a Job the API server accepts.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from merge_worker.spec import SpecError, parse_spec

from adaptermerge_operator import job_manifest
from adaptermerge_operator.settings import Settings

SPEC = {
    "volume": {"claimName": "store"},
    "adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
    "method": "linear",
    "output": {"path": "merged/out"},
}
TERM = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
NODE_REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"

# (spec.job, the field the models name); a Job holding the raw value is refused by the API server too
BAD = [
    ({"resources": {"limits": {"memory": "64GB"}}}, "job.resources.limits.memory"),
    ({"resources": {"limits": {"memory": "-1Gi"}}}, "job.resources.limits.memory"),
    ({"resources": {"limits": {"cpu": "two"}}}, "job.resources.limits.cpu"),
    ({"resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}}, "job.resources"),
    ({"resources": {"requests": {"example.com/fpga": 1}}}, "job.resources"),
    ({"resources": {"limits": {"gpu": 1}}}, "job.resources"),
    ({"resources": {"limits": {"bad name!": 1}}}, "job.resources.limits"),
    ({"tolerations": [{"key": "gpu", "operator": "Exist"}]}, "job.tolerations[0].operator"),
    ({"tolerations": [{"key": "gpu", "effect": "NoSchedul"}]}, "job.tolerations[0].effect"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}, "job.tolerations[0]"),
    ({"tolerations": [{"operator": "Equal", "value": "x"}]}, "job.tolerations[0]"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "tolerationSeconds": 5}]}, "job.tolerations[0]"),
    ({"tolerations": [{"key": "bad key", "operator": "Exists"}]}, "job.tolerations[0].key"),
    ({"nodeSelector": {"bad key!": "x"}}, "job.nodeSelector"),
    ({"nodeSelector": {"x" * 64: "a"}}, "job.nodeSelector"),
    ({"nodeSelector": {"zone": "not a value"}}, "job.nodeSelector.zone"),
    ({"nodeSelector": {"zone": "v" * 64}}, "job.nodeSelector.zone"),
    ({"priorityClassName": "System_Critical"}, "job.priorityClassName"),
    ({"queueName": "Team Queue"}, "job.queueName"),
    ({"gpus": -1}, "job.gpus"),
    ({"affinity": {"nodeAffinity": {NODE_REQUIRED: {"nodeSelectorTerms": []}}}},
     "job.affinity.nodeAffinity"),
    ({"affinity": {"nodeAffinity": {NODE_REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}}}, "job.affinity.nodeAffinity"),
    ({"affinity": {"nodeAffinity": {NODE_REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "Exists", "values": ["a"]}]}]}}}},
     "job.affinity.nodeAffinity"),
    ({"affinity": {"nodeAffinity": {NODE_REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}]}}}},
     "job.affinity.nodeAffinity"),
    ({"affinity": {"podAffinity": {NODE_REQUIRED: [{"labelSelector": {"matchLabels": {"app": "x"}}}]}}},
     "job.affinity.podAffinity"),
    ({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}]}}}, "job.affinity.podAntiAffinity"),
    ({"affinity": {"nodeAfinity": {}}}, "job.affinity.nodeAfinity"),  # a typo
]
BAD_IDS = [json.dumps(case[0])[:60] for case in BAD]

GOOD = {
    "gpus": 2,
    "resources": {"requests": {"cpu": "4", "memory": "32Gi", "ephemeral-storage": 1073741824},
                  "limits": {"memory": "64Gi", "example.com/fpga": "1"}},
    "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge", "zone": "a"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "spot", "value": "true"},
                    {"key": "maintenance", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
                    {"operator": "Exists"}],
    "affinity": {
        "nodeAffinity": {
            NODE_REQUIRED: {"nodeSelectorTerms": [TERM, {"matchExpressions": [
                {"key": "gpu-memory", "operator": "Gt", "values": ["40"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": TERM}],
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "adaptermerge"}}}}]},
    },
    "priorityClassName": "batch.low-priority",
    "queueName": "team-a",
}


def resource(job: dict, name: str = "fields") -> dict:
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name},
            "spec": {**copy.deepcopy(SPEC), "job": job}}


def rendered_job(job_fields: dict, namespace: str) -> dict:
    merge = {**resource(job_fields), "metadata": {"name": "fields", "namespace": namespace, "uid": "0", "generation": 1}}
    job = job_manifest.render_job(merge, parse_spec(merge["spec"]), Settings())
    del job["metadata"]["ownerReferences"]  # no such owner exists in this dry run
    return job


def raw_job(job_fields: dict, namespace: str) -> dict:
    """A Job as the operator would render it with job_fields copied in unchecked."""
    job = rendered_job({}, namespace)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for key, value in job_fields.items():
        if key == "resources":
            container["resources"] = value
        elif key == "gpus":
            container["resources"] = {"limits": {"nvidia.com/gpu": value}}
        elif key == "queueName":
            job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = value
        else:
            pod[key] = value
    return job


# -- the models ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("job, field", BAD, ids=BAD_IDS)
def test_models_refuse_naming_the_field(job, field):
    with pytest.raises(SpecError) as refused:
        parse_spec(resource(job)["spec"])
    assert refused.value.field.startswith(f"spec.{field}"), refused.value


def test_models_accept_valid_fields_and_render_them_as_written():
    spec = parse_spec(resource(GOOD)["spec"])
    pod = rendered_job(GOOD, "ns")["spec"]["template"]["spec"]
    assert pod["affinity"] == GOOD["affinity"]
    assert pod["tolerations"] == GOOD["tolerations"]
    assert pod["containers"][0]["resources"]["requests"] == GOOD["resources"]["requests"]
    assert spec.job.gpus == 2


# -- the real API server -----------------------------------------------------------------------------

cluster = pytest.mark.cluster


def dry_run(control_plane, namespace: str, obj: dict):
    return control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(obj), check=False)


@cluster
@pytest.mark.parametrize("job, field", BAD, ids=BAD_IDS)
def test_crd_refuses_what_the_api_would_refuse_later(control_plane, chart_crds, namespace, job, field):
    done = dry_run(control_plane, namespace, resource(job))
    assert done.returncode != 0 and "spec.job" in done.stderr, done.stdout + done.stderr
    refused = dry_run(control_plane, namespace, raw_job(job, namespace))
    assert refused.returncode != 0, f"the API server accepts a Job with {job}: the models are too strict"


@cluster
def test_valid_fields_pass_the_crd_and_make_a_job_the_api_accepts(control_plane, chart_crds, namespace):
    done = dry_run(control_plane, namespace, resource(GOOD))
    assert done.returncode == 0, done.stderr
    done = dry_run(control_plane, namespace, rendered_job(GOOD, namespace))
    assert done.returncode == 0, done.stderr


@cluster
def test_duplicate_adapter_names_are_refused_at_admission(control_plane, chart_crds, namespace):
    duplicate = resource({})
    duplicate["spec"]["adapters"][1]["name"] = "a"
    done = dry_run(control_plane, namespace, duplicate)
    assert done.returncode != 0 and "adapter names must be unique" in done.stderr, done.stderr
