"""Rendering an AdapterMerge into its ConfigMap and Job (docs/interfaces.md #7), without a cluster."""

from __future__ import annotations

import dataclasses

import yaml

from merge_worker.spec import parse_resource, parse_spec

from adaptermerge_operator import job_manifest, names


def render(objects, settings, spec=None, **meta):
    merge = objects.merge(spec, **meta)
    return merge, job_manifest.render_job(merge, parse_spec(merge["spec"]), settings)


def pod_spec(job):
    return job["spec"]["template"]["spec"]


def worker(job):
    [container] = pod_spec(job)["containers"]
    return container


def test_configmap_carries_the_resource_the_worker_reads(objects):
    merge = objects.merge()
    configmap = job_manifest.render_configmap(merge)
    document = yaml.safe_load(configmap["data"]["adaptermerge.yaml"])
    assert parse_resource(document).spec == parse_spec(objects.SPEC)
    assert document["metadata"] == {"name": "dev", "namespace": "team"}
    assert configmap["metadata"]["name"] == "dev-1"


def test_command_mounts_each_claim_and_only_the_output_claim_is_writable(objects, settings):
    _, job = render(objects, settings)
    command = worker(job)["command"]
    assert command[:3] == ["adaptermerge", "run", "/etc/adaptermerge/adaptermerge.yaml"]
    assert command[-6:] == ["--owner", "team/dev/uid-1234", "--device", "auto", "--result-file", "/dev/termination-log"]
    volume_args = {command[i + 1] for i, arg in enumerate(command) if arg == "--volume"}
    assert volume_args == {"store=/mnt/claims/store", "other-store=/mnt/claims/other-store"}

    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in worker(job)["volumeMounts"]}
    for claim, writable in (("store", True), ("other-store", False)):
        mount = mounts[f"/mnt/claims/{claim}"]
        source = volumes[mount["name"]]["persistentVolumeClaim"]
        assert source["claimName"] == claim
        assert mount["readOnly"] is (not writable) and source["readOnly"] is (not writable)
    assert volumes[mounts["/etc/adaptermerge"]["name"]]["configMap"]["name"] == "dev-1"
    assert mounts["/etc/adaptermerge"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_restricted_security_context(objects, settings):
    _, job = render(objects, settings)
    pod = pod_spec(job)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == settings.worker_uid > 0
    assert pod["securityContext"]["runAsGroup"] == settings.worker_gid > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["shareProcessNamespace"] is True  # the worker is not PID 1: an early SIGTERM still stops it
    context = worker(job)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert worker(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["restartPolicy"] == "Never"


def test_worker_settings_are_applied(objects, settings):
    _, job = render(objects, settings)
    assert worker(job)["image"] == "registry.example/worker:1"
    assert worker(job)["imagePullPolicy"] == "IfNotPresent"
    assert pod_spec(job)["serviceAccountName"] == "merge-worker"


def test_gpus_use_the_configured_resource_name_and_merge_with_extra_resources(objects, settings):
    spec = {**objects.SPEC, "job": {"gpus": 2, "resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi"}}}}
    _, job = render(objects, settings, spec)
    resources = worker(job)["resources"]
    assert resources["limits"] == {"memory": "16Gi", "example.com/gpu": "2"}
    assert resources["requests"] == {"memory": "8Gi"}

    spec = {**objects.SPEC, "job": {"gpus": 0}}
    _, job = render(objects, settings, spec)
    assert "example.com/gpu" not in str(worker(job)["resources"])


def test_scheduling_fields_pass_through_merged_with_the_operator_defaults(objects, settings):
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu-type", "operator": "In", "values": ["a100"]}]}]}}}
    toleration = {"key": "dedicated", "operator": "Equal", "value": "merges", "effect": "NoSchedule"}
    spec = {**objects.SPEC, "job": {"nodeSelector": {"zone": "b"}, "tolerations": [toleration],
                                    "affinity": affinity, "priorityClassName": "batch-low"}}
    _, job = render(objects, settings, spec)
    pod = pod_spec(job)
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "b"}  # the resource's own value wins
    assert pod["tolerations"] == [*settings.default_tolerations, toleration]
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "batch-low"


def test_unset_scheduling_fields_are_left_out(objects, settings):
    plain = dataclasses.replace(settings, default_node_selector={}, default_tolerations=[], worker_service_account="")
    _, job = render(objects, plain)
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName"} & pod_spec(job).keys()


def test_job_limits_and_retries(objects, settings):
    spec = {**objects.SPEC, "job": {"backoffLimit": 5, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 30}}
    _, job = render(objects, settings, spec)
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"], job["spec"]["ttlSecondsAfterFinished"]) == (5, 600, 30)
    # Invalid input (2) and low retention (3) do not change on a retry: the Job fails at once.
    # Evictions, preemptions and drains come first and cost no retry.
    disruption, rule = job["spec"]["podFailurePolicy"]["rules"]
    assert disruption == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2, 3]
    assert rule["onExitCodes"]["containerName"] == worker(job)["name"] == "worker"


def test_kueue_label_from_the_resource_or_the_default(objects, settings):
    _, job = render(objects, settings)
    assert names.LABEL_QUEUE not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is False

    with_default = dataclasses.replace(settings, default_queue_name="shared")
    _, job = render(objects, with_default)
    assert job["metadata"]["labels"][names.LABEL_QUEUE] == "shared"

    spec = {**objects.SPEC, "job": {"queueName": "team-a"}}
    _, job = render(objects, with_default, spec)
    assert job["metadata"]["labels"][names.LABEL_QUEUE] == "team-a"
    # Kueue's contract for batch Jobs: created suspended, admitted by unsuspending.
    assert job["spec"]["suspend"] is True


def test_owned_by_the_resource_with_selectable_labels(objects, settings):
    merge, job = render(objects, settings, generation=4)
    configmap = job_manifest.render_configmap(merge)
    for obj in (job, configmap):
        [owner] = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "name": "dev",
                         "uid": "uid-1234", "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["name"] == "dev-4"
        labels = obj["metadata"]["labels"]
        assert (labels[names.LABEL_UID], labels[names.LABEL_GENERATION], labels[names.LABEL_NAME]) == ("uid-1234", "4", "dev")
        assert obj["metadata"]["annotations"][names.ANNOTATION_OWNER] == "dev"
    template = job["spec"]["template"]["metadata"]
    assert template["labels"][names.LABEL_UID] == "uid-1234"
    assert template["annotations"][names.ANNOTATION_OWNER] == "dev"


def test_rendering_is_deterministic(objects, settings):
    assert render(objects, settings) == render(objects, settings)


def test_long_names_are_shortened_within_kubernetes_limits(objects, settings):
    long_name = "team.merge-" + "x" * 200
    merge, job = render(objects, settings, name=long_name, generation=12)
    name = job["metadata"]["name"]
    assert len(name) <= 63 and name.endswith("-12") and name.startswith("team.merge-x")
    assert len(job["metadata"]["labels"][names.LABEL_NAME]) <= 63
    assert job["metadata"]["annotations"][names.ANNOTATION_OWNER] == long_name
    assert job_manifest.render_configmap(merge)["metadata"]["name"] == name


S3_SPEC = {
    "storage": {"endpoint": "http://s3.example:9000", "region": "eu-west-1", "credentialsSecret": "s3-credentials"},
    "adapters": [{"name": "a", "uri": "s3://adapters/a"}, {"name": "b", "uri": "s3://adapters/b"}],
    "method": "linear",
    "output": {"uri": "s3://merged/dev", "rank": 4},
}


def test_credentials_secret_reaches_the_worker_as_env_from_secret_key_refs(objects, settings):
    """The Job references the Secret by name and key: the operator never reads its data."""
    merge, job = render(objects, settings, S3_SPEC)
    env = {e["name"]: e for e in worker(job)["env"]}
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID", "optional": False},
        "AWS_SECRET_ACCESS_KEY": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY", "optional": False},
        "AWS_SESSION_TOKEN": {"name": "s3-credentials", "key": "AWS_SESSION_TOKEN", "optional": True},
    }
    # Endpoint and region reach the worker through the spec it reads, not through the Job.
    document = yaml.safe_load(job_manifest.render_configmap(merge)["data"]["adaptermerge.yaml"])
    assert document["spec"]["storage"] == S3_SPEC["storage"]
    # No Secret is mounted, and nothing but env names it.
    assert not any("secret" in v for v in pod_spec(job)["volumes"])
    assert "s3-credentials" not in yaml.safe_dump(job["metadata"]) + " ".join(worker(job)["command"])


def test_a_spec_of_uris_only_needs_no_claim_but_gets_its_scratch_space(objects, settings):
    _, job = render(objects, settings, S3_SPEC)
    assert not any("persistentVolumeClaim" in v for v in pod_spec(job)["volumes"])
    assert "--volume" not in worker(job)["command"]
    [tmp] = [v for v in pod_spec(job)["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in worker(job)["volumeMounts"]
    env = {e["name"]: e.get("value") for e in worker(job)["env"]}
    assert env["TMPDIR"] == "/tmp", "the downloads land in the scratch emptyDir"


def test_no_credentials_secret_no_credential_env(objects, settings):
    spec = {**S3_SPEC, "storage": {"endpoint": "http://s3.example:9000"}}
    _, job = render(objects, settings, spec)
    assert not [e for e in worker(job)["env"] if e["name"].startswith("AWS_")]


def test_claims_of_sources_stay_read_only_when_the_output_is_a_uri(objects, settings):
    spec = {**objects.SPEC, "output": {"uri": "s3://merged/dev", "rank": 8}}
    _, job = render(objects, settings, spec)
    claims = [v["persistentVolumeClaim"] for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    assert sorted(c["claimName"] for c in claims) == ["other-store", "store"]
    assert all(c["readOnly"] for c in claims)
    assert all(m.get("readOnly") for m in worker(job)["volumeMounts"] if m["mountPath"].startswith("/mnt/claims/"))
