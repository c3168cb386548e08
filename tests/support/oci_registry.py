"""A real OCI registry for the tests: the CNCF distribution registry (built by scripts/build-oci-registry.sh)
serving a temporary folder over plain HTTP on a free loopback port, optionally behind htpasswd auth with
random credentials.

The helpers that put content into it (push_blob, push_manifest, push_artifact, push_image) speak the
distribution API with plain `requests`, not through the worker's own client, so a bug in the worker's
client cannot hide itself in the test data.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.local_server import free_port, serving

REPO = Path(__file__).resolve().parents[2]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def registry_binary() -> Path:
    """$ADAPTERMERGE_OCI_REGISTRY, else the cached build (built on first use)."""
    if os.environ.get("ADAPTERMERGE_OCI_REGISTRY"):
        return Path(os.environ["ADAPTERMERGE_OCI_REGISTRY"])
    out = subprocess.run([str(REPO / "scripts" / "build-oci-registry.sh")], check=True, text=True,
                         stdout=subprocess.PIPE).stdout
    return Path(out.strip().splitlines()[-1])


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class OciRegistry:
    host: str  # 127.0.0.1:PORT, what an oci:// URI names
    data: Path  # the filesystem storage driver's root
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _auth(self):
        return (self.username, self.password) if self.username else None

    def docker_config(self, path: Path, *, password: str | None = None) -> Path:
        """Writes a Docker config file (what REGISTRY_AUTH_FILE or DOCKER_CONFIG point at) for this
        registry; `password` overrides the right one (to test a wrong one)."""
        token = base64.b64encode(f"{self.username}:{password or self.password}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path

    def push_blob(self, repo: str, data: bytes) -> dict:
        import requests

        digest = digest_of(data)
        start = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", auth=self._auth(), timeout=30)
        start.raise_for_status()
        location = start.headers["Location"]
        location = location if location.startswith("http") else self.url + location
        done = requests.put(location, params={"digest": digest}, data=data, auth=self._auth(), timeout=60,
                            headers={"Content-Type": "application/octet-stream"})
        done.raise_for_status()
        return {"digest": digest, "size": len(data)}

    def push_manifest(self, repo: str, reference: str, manifest: dict,
                      media_type: str = OCI_MANIFEST) -> str:
        import requests

        body = json.dumps(manifest).encode()
        put = requests.put(f"{self.url}/v2/{repo}/manifests/{reference}", data=body, auth=self._auth(),
                           headers={"Content-Type": media_type}, timeout=30)
        put.raise_for_status()
        return digest_of(body)

    def push_artifact(self, repo: str, tag: str, files: dict[str, bytes],
                      artifact_type: str = "application/vnd.example.adapter") -> str:
        """An ORAS artifact: one layer per file, its name in the title annotation; returns the digest."""
        config = self.push_blob(repo, b"{}")
        layers = [{"mediaType": "application/octet-stream", **self.push_blob(repo, content),
                   "annotations": {"org.opencontainers.image.title": name}} for name, content in files.items()]
        return self.push_manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                              "artifactType": artifact_type,
                                              "config": {"mediaType": OCI_EMPTY, **config}, "layers": layers})

    def push_image(self, repo: str, tag: str, layer_tars: list[bytes]) -> str:
        """An OCI image whose layers are the given tar archives (gzipped here), in order."""
        layers = [{"mediaType": TAR_GZIP, **self.push_blob(repo, gzip.compress(t, mtime=0))} for t in layer_tars]
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [digest_of(t) for t in layer_tars]}}).encode()
        return self.push_manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                              "config": {"mediaType": OCI_IMAGE_CONFIG,
                                                         **self.push_blob(repo, config)},
                                              "layers": layers})

    def manifest(self, repo: str, reference: str) -> tuple[dict, str]:
        """(the manifest, its digest as the registry reports it)."""
        import requests

        got = requests.get(f"{self.url}/v2/{repo}/manifests/{reference}", auth=self._auth(), timeout=30,
                           headers={"Accept": OCI_MANIFEST})
        got.raise_for_status()
        return got.json(), got.headers["Docker-Content-Digest"]

    def blob(self, repo: str, digest: str) -> bytes:
        import requests

        got = requests.get(f"{self.url}/v2/{repo}/blobs/{digest}", auth=self._auth(), timeout=60)
        got.raise_for_status()
        return got.content


def tar_of(members: dict[str, bytes]) -> bytes:
    """A tar archive of regular files (name -> content), as an image layer holds them."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _htpasswd_line(user: str, password: str) -> str:
    helper = registry_binary().with_name("htpasswd")
    return subprocess.run([str(helper)], input=f"{user}\n{password}\n", text=True, check=True,
                          stdout=subprocess.PIPE).stdout


@contextmanager
def running_oci_registry(folder: Path, *, auth: bool = False, startup_timeout: float = 30.0) -> Iterator[OciRegistry]:
    data, log_path, config_path = folder / "data", folder / "registry.log", folder / "config.yml"
    data.mkdir()
    port = free_port()
    # Random per run: the tests grep logs and outputs for exactly these strings.
    registry = OciRegistry(f"127.0.0.1:{port}", data)
    config = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(data)}, "delete": {"enabled": True}},
              "http": {"addr": registry.host, "secret": secrets.token_hex(16)}}
    if auth:
        registry.username, registry.password = "u" + secrets.token_hex(6), secrets.token_urlsafe(24)
        (folder / "htpasswd").write_text(_htpasswd_line(registry.username, registry.password))
        config["auth"] = {"htpasswd": {"realm": "adaptermerge-tests", "path": str(folder / "htpasswd")}}
    config_path.write_text(json.dumps(config))  # JSON is YAML
    argv = [str(registry_binary()), "serve", str(config_path)]
    with serving("registry", argv, port, log_path, {"PATH": os.environ.get("PATH", "")},
                 startup_timeout=startup_timeout):
        yield registry
