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
