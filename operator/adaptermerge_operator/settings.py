"""The operator's own settings (docs/interfaces.md #9): environment variables the Helm chart sets.

Namespaces, peering, priority and liveness are kopf's `run` flags, not settings here. A malformed
value stops the operator at start-up with the variable's name, instead of failing on every Job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from merge_worker import __version__

from adaptermerge_operator.policy import Policy

DEFAULT_WORKER_IMAGE = f"ghcr.io/adaptermerge/adaptermerge-worker:{__version__}"
# The unprivileged user the Dockerfile's worker image creates.
DEFAULT_WORKER_UID = 10001
DEFAULT_SCHEDULING_TIMEOUT = 900


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    worker_image: str = DEFAULT_WORKER_IMAGE
    worker_image_pull_policy: str = ""  # empty: Kubernetes' default for the image's tag
    worker_service_account: str = ""  # empty: the namespace's default ServiceAccount
    gpu_resource: str = "nvidia.com/gpu"
    default_node_selector: dict[str, str] = field(default_factory=dict)
    default_tolerations: list[dict[str, Any]] = field(default_factory=list)
    default_queue_name: str = ""
    worker_uid: int = DEFAULT_WORKER_UID
    worker_gid: int = DEFAULT_WORKER_UID
    # How long a worker pod may wait for a node, or fail to be created, before the merge fails (0: forever).
    scheduling_timeout: int = DEFAULT_SCHEDULING_TIMEOUT
    metrics_port: int = 0  # 0: no /metrics endpoint (the chart turns it on)
    policy: Policy = field(default_factory=Policy)  # the tenant policy; the default restricts nothing

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            worker_image=env.get("ADAPTERMERGE_WORKER_IMAGE") or defaults.worker_image,
            worker_image_pull_policy=_choice(
                env, "ADAPTERMERGE_WORKER_IMAGE_PULL_POLICY", ("", "Always", "IfNotPresent", "Never")
            ),
            worker_service_account=env.get("ADAPTERMERGE_WORKER_SERVICE_ACCOUNT", ""),
            gpu_resource=env.get("ADAPTERMERGE_GPU_RESOURCE") or defaults.gpu_resource,
            default_node_selector=_json(env, "ADAPTERMERGE_DEFAULT_NODE_SELECTOR", dict),
            default_tolerations=_json(env, "ADAPTERMERGE_DEFAULT_TOLERATIONS", list),
            default_queue_name=env.get("ADAPTERMERGE_DEFAULT_QUEUE_NAME", ""),
            worker_uid=_int(env, "ADAPTERMERGE_WORKER_RUN_AS_USER", defaults.worker_uid),
            worker_gid=_int(env, "ADAPTERMERGE_WORKER_RUN_AS_GROUP", defaults.worker_gid),
            scheduling_timeout=_int(env, "ADAPTERMERGE_SCHEDULING_TIMEOUT_SECONDS", defaults.scheduling_timeout,
                                    minimum=0),
            metrics_port=_port(env, "ADAPTERMERGE_METRICS_PORT"),
            policy=_policy(env, "ADAPTERMERGE_POLICY"),
        )


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, "")
    if value not in allowed:
        raise SettingsError(f"{name}={value!r}: expected one of {', '.join(a for a in allowed if a)}")
    return value


def _json(env: Mapping[str, str], name: str, kind: type) -> Any:
    text = env.get(name, "").strip()
    if not text or text == "null":  # the chart renders an unset map as null
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{name}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, kind):
        raise SettingsError(f"{name}: expected a JSON {'object' if kind is dict else 'list'}")
    if kind is dict and not all(isinstance(v, str) for v in value.values()):
        raise SettingsError(f"{name}: node selector values must be strings")
    if kind is list and not all(isinstance(v, dict) for v in value):
        raise SettingsError(f"{name}: every toleration must be a JSON object")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    text = env.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"{name}={text!r}: expected an integer") from None
    if value < minimum:
        why = "the worker must not run as root" if minimum == 1 else f"expected at least {minimum}"
        raise SettingsError(f"{name}={text!r}: {why}")
    return value


def _policy(env: Mapping[str, str], name: str) -> Policy:
    try:
        return Policy.from_json(name, env.get(name, ""))
    except ValueError as error:
        raise SettingsError(str(error)) from None


def _port(env: Mapping[str, str], name: str) -> int:
    value = _int(env, name, 0, minimum=0)
    if value > 65535:
        raise SettingsError(f"{name}={value}: expected a port number, or 0 for none")
    return value
