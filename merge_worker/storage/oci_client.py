"""A client for one OCI registry (the distribution API), for spec.registry, and the translation of its
failures into SpecErrors naming a field.

oras-py (a maintained OCI client) does the protocol and the auth handshake: URL building, the Bearer
token exchange (anonymous or with Basic credentials) and Basic auth. What it does not do, this module
adds: its request retry sleeps 3 to 83 s on any exception, also on refused credentials, so requests are
retried here by urllib3 (connection errors, 429 and 5xx, short backoff) instead; and credentials come
only from the Docker config file named below, never from its environment variables or a credential
helper. Credentials never reach a message: errors carry the HTTP status and the URI.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_worker.spec import SpecError
from merge_worker.spec import Registry as RegistrySettings

RETRY_ATTEMPTS = 4
_TIMEOUT = (10, 60)  # connect, read (seconds between bytes)
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
TITLE = "org.opencontainers.image.title"  # an ORAS layer's file name
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class OciRef:
    """oci://registry/repository:tag or oci://registry/repository@sha256:hex, split."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, uri: str) -> OciRef:
        # The spec has checked the URI's grammar (merge_worker.spec.OCI_URI).
        registry, _, rest = uri.removeprefix("oci://").partition("/")
        if "@" in rest:
            repository, _, digest = rest.partition("@")
            return cls(registry, repository, None, digest)
        repository, _, tag = rest.rpartition(":")
        return cls(registry, repository, tag, None)

    @property
    def reference(self) -> str:
        return self.digest or self.tag  # type: ignore[return-value]


def docker_config_path() -> Path | None:
    """The Docker config file credentials come from: REGISTRY_AUTH_FILE, else $DOCKER_CONFIG/config.json,
    else ~/.docker/config.json (the places podman, skopeo and docker look)."""
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    home = Path.home() / ".docker" / "config.json"
    return home if home.exists() else None


def _host_of(key: str) -> str:
    # Keys are "host:port", or URLs such as "https://index.docker.io/v1/".
    return re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]


def credentials_for(registry: str) -> tuple[str, str] | None:
    """(user, password) for `registry` from the Docker config file, or None."""
    path = docker_config_path()
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError("spec.registry", f"the Docker config file {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SpecError("spec.registry", f"the Docker config file {path} is not readable JSON"
                                         f" ({type(exc).__name__})") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    for key, entry in (auths or {}).items():
        if _host_of(str(key)) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
        try:
            user, sep, password = base64.b64decode(entry.get("auth", ""), validate=True).decode().partition(":")
        except (ValueError, TypeError, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise SpecError("spec.registry", f"the Docker config file {path}: the entry for {registry} has no"
                                             " valid base64 user:password in 'auth'")
        return user, password
    return None


class RegistryClient:
    """Requests to one registry host, authenticated as the registry asks (Basic or Bearer token)."""

    def __init__(self, registry: str, settings: RegistrySettings | None):
        import oras.provider
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.registry = registry
        self.settings = settings or RegistrySettings()
        self.base = f"{'http' if self.settings.insecure else 'https'}://{registry}"
        self._credentials = credentials_for(registry)
        self._oras: Any = None

        class _Registry(oras.provider.Registry):
            # oras-py wraps do_request in a retry that sleeps 3 to 83 s on any exception (refused
            # credentials too); urllib3 retries transient failures instead (self._retry below).
            do_request = oras.provider.Registry.do_request.__wrapped__

        self._make_oras = lambda backend: _Registry(registry, insecure=self.settings.insecure, auth_backend=backend)
        # Idempotent requests only: a PATCH of a chunked upload is not retried by urllib3.
        self._retry = Retry(total=RETRY_ATTEMPTS, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                            allowed_methods=frozenset({"GET", "HEAD", "PUT", "POST"}), raise_on_status=False,
                            respect_retry_after_header=True)
        self._adapter = HTTPAdapter(max_retries=self._retry)

    def authenticated(self, field: str, uri: str) -> Any:
        """The oras-py Registry, its auth backend chosen by the registry's challenge on /v2/."""
        if self._oras is not None:
            return self._oras
        import requests

        try:
            ping = requests.get(f"{self.base}/v2/", timeout=_TIMEOUT)
        except requests.RequestException as exc:
            raise unreachable(exc, field, uri) from None
        challenge = ping.headers.get("WWW-Authenticate", "") if ping.status_code == 401 else ""
        client = self._make_oras("basic" if challenge.lower().startswith("basic") else "token")
        client.session.mount("http://", self._adapter)
        client.session.mount("https://", self._adapter)
        if self._credentials is not None:
            client.auth.set_basic_auth(*self._credentials)
        elif challenge.lower().startswith("basic"):
            raise SpecError(field, f"{uri}: the registry asks for credentials and none are configured for"
                                   f" {self.registry} (spec.registry.credentialsSecret in a cluster; a Docker"
                                   " config file locally: REGISTRY_AUTH_FILE, DOCKER_CONFIG or ~/.docker)")
        self._oras = client
        return client

    def request(self, method: str, path: str, field: str, uri: str, **kwargs: Any) -> Any:
        """One request to /v2/<path> (or an absolute URL), authenticated; transport failures are SpecErrors
        naming `field` once urllib3's retries are spent."""
        import requests

        client = self.authenticated(field, uri)
        url = path if path.startswith("http") else f"{self.base}/v2/{path}"
        try:
            response = client.do_request(url, method, headers=dict(kwargs.pop("headers", {})), **kwargs)
        except requests.RequestException as exc:
            raise unreachable(exc, field, uri) from None
        except ValueError:  # oras-py: "Cannot respond to request for authentication."
            raise denied(field, uri, 401) from None
        if response.status_code in (401, 403):
            raise denied(field, uri, response.status_code)
        return response


    def container(self, ref: OciRef) -> Any:
        """oras-py's Container for `ref`, its parts set from the URI (oras-py's own parser takes a first
        component without '.' or ':' for a namespace, not a registry)."""
        import oras.container

        container = oras.container.Container(f"{ref.repository}:{ref.tag or 'latest'}", registry=self.registry)
        namespace, _, container.repository = ref.repository.rpartition("/")
        container.namespace, container.registry = namespace or None, self.registry
        container.tag, container.digest = ref.tag, ref.digest
        return container


def unreachable(exc: BaseException, field: str, uri: str) -> SpecError:
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return SpecError(field, f"{uri}: TLS with the registry failed; for a plain-HTTP registry set"
                                " spec.registry.insecure: true")
    return SpecError(field, f"{uri}: cannot reach the registry ({type(exc).__name__})")


def denied(field: str, uri: str, status: int) -> SpecError:
    return SpecError(field, f"{uri}: access denied (HTTP {status}): check the registry credentials")
