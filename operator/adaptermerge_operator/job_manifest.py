"""Renders one generation of an AdapterMerge into the ConfigMap and the Job that run its merge (docs/interfaces.md #7).

Pure functions of (resource, parsed spec, settings): the same inputs always give the same objects,
so a re-render after an operator restart describes exactly the Job that may already exist.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import yaml

from merge_worker import spec as specs
from merge_worker.spec import AdapterMergeSpec

from adaptermerge_operator import names, policy
from adaptermerge_operator.settings import Settings

CONTAINER = "worker"
SPEC_DIR = "/etc/adaptermerge"
SPEC_KEY = "adaptermerge.yaml"
CLAIMS_DIR = "/mnt/claims"
TERMINATION_LOG = "/dev/termination-log"
REGISTRY_AUTH_DIR = "/var/run/adaptermerge/registry"
# Exit codes the worker uses for outcomes a retry cannot change (API.md): invalid input (2) and
# evaluation below minRetention (3). The Job fails at once instead of re-running the same merge.
FINAL_EXIT_CODES = [2, 3]


def owner_reference(merge: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{specs.API_GROUP}/{specs.API_VERSION}",
        "kind": specs.KIND,
        "name": merge["metadata"]["name"],
        "uid": merge["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(merge: Mapping[str, Any]) -> dict[str, Any]:
    meta = merge["metadata"]
    return {
        "name": names.run_name(merge),
        "namespace": meta["namespace"],
        "labels": names.owned_labels(meta["name"], meta["uid"], meta["generation"]),
        "annotations": {names.ANNOTATION_OWNER: meta["name"]},
        "ownerReferences": [owner_reference(merge)],
    }


def render_configmap(merge: Mapping[str, Any]) -> dict[str, Any]:
    """The resource as `adaptermerge run` reads it, exactly as the user wrote its spec."""
    meta = merge["metadata"]
    document = {
        "apiVersion": f"{specs.API_GROUP}/{specs.API_VERSION}",
        "kind": specs.KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": copy.deepcopy(dict(merge["spec"])),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(merge),
        "data": {SPEC_KEY: yaml.safe_dump(document, sort_keys=False)},
    }


def claim_volumes(spec: AdapterMergeSpec) -> list[tuple[str, str, bool]]:
    """(volume name, claim name, read-only) per claim; volume names stay short whatever the claim."""
    return [
        (f"claim-{i}", claim, not writable)
        for i, (claim, writable) in enumerate(sorted(spec.claims().items()))
    ]


def owner_of(merge: Mapping[str, Any]) -> str:
    """NAMESPACE/NAME/UID: the worker records it in the output's manifest, replaces an output of the
    same owner (a new generation or a rerun) and refuses one of another (OutputConflict)."""
    meta = merge["metadata"]
    return f"{meta['namespace']}/{meta['name']}/{meta['uid']}"


def worker_command(merge: Mapping[str, Any], spec: AdapterMergeSpec) -> list[str]:
    command = ["adaptermerge", "run", f"{SPEC_DIR}/{SPEC_KEY}"]
    for _, claim, _ in claim_volumes(spec):
        command += ["--volume", f"{claim}={CLAIMS_DIR}/{claim}"]
    return command + ["--owner", owner_of(merge), "--device", "auto", "--result-file", TERMINATION_LOG]


# The keys of spec.storage.credentialsSecret, each the environment variable of boto3's credential chain
# it becomes (docs/storage.md); the session token is optional (temporary credentials only).
CREDENTIAL_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))


def storage_env(spec: AdapterMergeSpec) -> list[dict[str, Any]]:
    """The worker's S3 credentials as env from secretKeyRef: the kubelet reads the Secret, the operator
    never does (it has no RBAC on Secrets). Endpoint and region stay in the spec the worker reads."""
    secret = spec.storage.credentials_secret if spec.storage else None
    if secret is None:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
            for key, optional in CREDENTIAL_KEYS]


def _resources(spec: AdapterMergeSpec, settings: Settings) -> dict[str, Any]:
    resources = spec.job.resources_dict()
    if spec.job.gpus > 0:
        # spec.job.gpus is the one place GPUs are asked for; a request must equal the limit.
        gpus = str(spec.job.gpus)
        resources.setdefault("limits", {})[settings.gpu_resource] = gpus
        if settings.gpu_resource in resources.get("requests", {}):
            resources["requests"][settings.gpu_resource] = gpus
    return policy.memory_limit(settings.policy, resources)


def registry_auth(spec: AdapterMergeSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, mounts, env) that give the worker spec.registry.credentialsSecret: the Secret's
    .dockerconfigjson mounted read-only as config.json in DOCKER_CONFIG (docs/storage.md). The kubelet
    reads the Secret, not the operator, which needs no Secret RBAC."""
    secret = spec.registry.credentials_secret if spec.registry else None
    if secret is None:
        return [], [], []
    volume = {"name": "registry-auth", "secret": {
        "secretName": secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
        "defaultMode": 0o440}}  # owner root, group fsGroup: readable by the non-root worker only
    mount = {"name": "registry-auth", "mountPath": REGISTRY_AUTH_DIR, "readOnly": True}
    return [volume], [mount], [{"name": "DOCKER_CONFIG", "value": REGISTRY_AUTH_DIR}]


def _container(merge: Mapping[str, Any], spec: AdapterMergeSpec, settings: Settings) -> dict[str, Any]:
    mounts = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
    mounts += [
        {"name": volume, "mountPath": f"{CLAIMS_DIR}/{claim}", "readOnly": read_only}
        for volume, claim, read_only in claim_volumes(spec)
    ]
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    _, auth_mounts, auth_env = registry_auth(spec)
    container = {
        "name": CONTAINER,
        "image": settings.worker_image,
        "command": worker_command(merge, spec),
        # The root filesystem is read-only: caches, home and the downloads of s3:// and oci:// sources
        # (TMPDIR, merge_worker/storage/staging.py) go to the scratch emptyDir.
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}, *storage_env(spec),
                *auth_env],
        "resources": _resources(spec, settings),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": TERMINATION_LOG,
        # The worker writes its JSON summary there; if it dies before, the log tail explains why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts + auth_mounts,
    }
    if settings.worker_image_pull_policy:
        container["imagePullPolicy"] = settings.worker_image_pull_policy
    return container


def _pod_spec(merge: Mapping[str, Any], spec: AdapterMergeSpec, settings: Settings) -> dict[str, Any]:
    configmap = names.run_name(merge)
    volumes = [{"name": "spec", "configMap": {"name": configmap}}]
    volumes += [
        {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
        for volume, claim, read_only in claim_volumes(spec)
    ]
    volumes.append({"name": "tmp", "emptyDir": {}})
    volumes += registry_auth(spec)[0]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's (backoffLimit), not the kubelet's
        "automountServiceAccountToken": False,  # the worker talks to no API
        # The pod's pause process is PID 1, not the worker: the kernel drops signals that PID 1 has no
        # handler for, so a SIGTERM (deadline, delete) arriving before the worker installs its handler
        # was lost and the merge published its output after its Job had failed (docs/real-node.md).
        "shareProcessNamespace": True,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.worker_uid,
            "runAsGroup": settings.worker_gid,
            "fsGroup": settings.worker_gid,  # so the non-root worker can write the output claim
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(merge, spec, settings)],
        "volumes": volumes,
    }
    if settings.worker_service_account:
        pod["serviceAccountName"] = settings.worker_service_account
    node_selector = {**settings.default_node_selector, **spec.job.node_selector}
    if node_selector:
        pod["nodeSelector"] = node_selector
    tolerations = [*settings.default_tolerations, *spec.job.tolerations_list()]
    if tolerations:
        pod["tolerations"] = copy.deepcopy(tolerations)
    affinity = spec.job.affinity_dict()
    if affinity:
        pod["affinity"] = affinity
    if spec.job.priority_class_name:
        pod["priorityClassName"] = spec.job.priority_class_name
    return pod


def render_job(merge: Mapping[str, Any], spec: AdapterMergeSpec, settings: Settings) -> dict[str, Any]:
    metadata = _metadata(merge)
    queue = spec.job.queue_name or settings.default_queue_name
    if queue:
        metadata["labels"][names.LABEL_QUEUE] = queue
    pod_labels = {k: v for k, v in metadata["labels"].items() if k != names.LABEL_QUEUE}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": spec.job.backoff_limit,
            "activeDeadlineSeconds": spec.job.active_deadline_seconds,
            "ttlSecondsAfterFinished": spec.job.ttl_seconds_after_finished,
            # A replacement pod starts only once the failed one is gone: two workers never write
            # the same output at once.
            "podReplacementPolicy": "Failed",
            # With a queue, Kueue admits the Job by unsuspending it (its suspend-based integration).
            "suspend": bool(queue),
            "podFailurePolicy": {
                "rules": [
                    # Evictions, preemptions and drains are not the merge's fault: retry without
                    # using up backoffLimit.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": FINAL_EXIT_CODES,
                        },
                    }
                ]
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": dict(metadata["annotations"])},
                "spec": _pod_spec(merge, spec, settings),
            },
        },
    }
