"""The operator's Kubernetes API calls, and nothing beyond the list of docs/interfaces.md #10.

Blocking calls of the `kubernetes` client with raw JSON in and out (no model classes: they cost
memory and time per object for nothing here); handlers run them in a thread pool via `KubeApi.run`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from adaptermerge_operator import metrics

from merge_worker import spec as specs

T = TypeVar("T")
# Threads (and pooled connections) for API calls: enough to create a burst of Jobs in parallel.
WORKERS = 16


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on an update): read it again."""


class AlreadyExists(Exception):
    """An object of that name exists (HTTP 409 on a create)."""


class Rejected(Exception):
    """The API server refused the object as invalid (HTTP 400 or 422): retrying cannot help.
    The message is the API server's own."""


class Forbidden(Exception):
    """The API server refused the request for now (HTTP 403: a ResourceQuota, an admission policy,
    RBAC). The message is the API server's own; a retry may succeed once that changes."""


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def load_client_config() -> client.Configuration:
    """In-cluster credentials in a pod, else the current kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = WORKERS
    return configuration


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


class KubeApi:
    def __init__(self, configuration: client.Configuration):
        api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="kube-api")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs one blocking call off the event loop; failures count in adaptermerge_api_errors_total."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))
        except ApiException as exc:
            metrics.count_api_error(fn.__name__, exc.status)
            raise
        except HTTPError:
            metrics.count_api_error(fn.__name__, "connection")
            raise

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- AdapterMerges -------------------------------------------------------------------------

    def get_merge(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.custom.get_namespaced_custom_object(
                specs.API_GROUP, specs.API_VERSION, namespace, specs.PLURAL, name, _preload_content=False
            ))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def replace_merge_status(self, merge: dict[str, Any]) -> dict[str, Any]:
        """PUT of the status subresource: the resourceVersion in `merge` makes it conditional."""
        meta = merge["metadata"]
        try:
            return _json(self.custom.replace_namespaced_custom_object_status(
                specs.API_GROUP, specs.API_VERSION, meta["namespace"], specs.PLURAL, meta["name"], merge,
                _preload_content=False,
            ))
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(meta["name"]) from None
            raise

    # -- PersistentVolumeClaims (only with a tenant policy on claim labels) -------------------------

    def claim_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """The claim's labels ({} if none); None when there is no such claim."""
        try:
            claim = _json(self.core.read_namespaced_persistent_volume_claim(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return claim["metadata"].get("labels") or {}

    # -- Jobs and ConfigMaps ---------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates a Job or a ConfigMap."""
        create = self.batch.create_namespaced_job if obj["kind"] == "Job" else self.core.create_namespaced_config_map
        try:
            return _json(create(obj["metadata"]["namespace"], obj, _preload_content=False))
        except ApiException as exc:
            if exc.status == 409:
                raise AlreadyExists(obj["metadata"]["name"]) from None
            if exc.status in (400, 403, 422):  # answered here, so KubeApi.run does not see them
                metrics.count_api_error("create", exc.status)
            if exc.status in (400, 422):
                raise Rejected(_api_message(exc)) from None
            if exc.status == 403:
                raise Forbidden(_api_message(exc)) from None
            raise

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read = self.batch.read_namespaced_job if kind == "Job" else self.core.read_namespaced_config_map
        try:
            return _json(read(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Deletes a Job (its pods with it, in the background) or a ConfigMap; False if already gone."""
        delete = self.batch.delete_namespaced_job if kind == "Job" else self.core.delete_namespaced_config_map
        try:
            delete(name, namespace, propagation_policy="Background", _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def add_job_finalizer(self, namespace: str, name: str, finalizer: str) -> None:
        """Adds `finalizer` to the Job (a strategic merge patch: finalizers merge as a set)."""
        patch = {"metadata": {"finalizers": [finalizer]}}
        try:
            self.batch.patch_namespaced_job(name, namespace, patch, _content_type="application/strategic-merge-patch+json",
                                            _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def remove_job_finalizer(self, namespace: str, name: str, finalizer: str) -> None:
        """Takes `finalizer` off the Job, leaving any other finalizer (e.g. foregroundDeletion) alone.

        A JSON patch that tests the entry it removes, so a concurrent change of the list fails it
        (422) instead of removing the wrong entry; then the list is read again."""
        for _ in range(5):
            job = self.get("Job", namespace, name)
            finalizers = (job or {}).get("metadata", {}).get("finalizers") or []
            if finalizer not in finalizers:
                return
            index = finalizers.index(finalizer)
            patch = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
                     {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
            try:
                self.batch.patch_namespaced_job(name, namespace, patch, _content_type="application/json-patch+json",
                                                _preload_content=False)
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 422:
                    raise
        raise Conflict(f"finalizers of Job {name} keep changing")

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int, limit_bytes: int) -> str:
        """The last `lines` lines of a container's log, at most `limit_bytes` (pods/log get); "" when
        the pod or its log is gone or not there yet."""
        try:
            response = self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=lines,
                                                         limit_bytes=limit_bytes, _preload_content=False)
        except ApiException as exc:
            if exc.status in (400, 404):  # 400: the container has not started
                return ""
            raise
        return response.data.decode("utf-8", errors="replace")

    def pod_creation_failures(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        """The Job controller's FailedCreate events on that Job (e.g. a missing PriorityClass or
        ServiceAccount): the only place where a pod that cannot be created says why."""
        selector = f"involvedObject.uid={job_uid},reason=FailedCreate"
        events = _json(self.core.list_namespaced_event(namespace, field_selector=selector, _preload_content=False))
        return events.get("items") or []
