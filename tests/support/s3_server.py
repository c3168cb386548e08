"""A real S3-compatible server for the tests: versitygw (built by scripts/build-s3-server.sh) serving a
temporary folder through its posix backend, on a free loopback port, with its own root credentials."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.local_server import free_port, serving

REPO = Path(__file__).resolve().parents[2]


def server_binary() -> Path:
    """$ADAPTERMERGE_S3_SERVER, else the cached build (built on first use)."""
    if os.environ.get("ADAPTERMERGE_S3_SERVER"):
        return Path(os.environ["ADAPTERMERGE_S3_SERVER"])
    out = subprocess.run([str(REPO / "scripts" / "build-s3-server.sh")], check=True, text=True,
                         stdout=subprocess.PIPE).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    data: Path  # the posix backend's folder: <data>/<bucket>/<key> is the object's content
    region: str = "us-east-1"

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment a CLI run gets its credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, **overrides}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}))

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@contextmanager
def running_s3_server(folder: Path, *, startup_timeout: float = 30.0) -> Iterator[S3Server]:
    data, log_path = folder / "data", folder / "versitygw.log"
    data.mkdir()
    (folder / "meta").mkdir()
    port = free_port()
    # Random per run: the tests grep logs and outputs for exactly these strings.
    server = S3Server(f"http://127.0.0.1:{port}", "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30),
                      data)
    argv = [str(server_binary()), "--port", f"127.0.0.1:{port}", "--health", "/healthz", "posix",
            "--sidecar", str(folder / "meta"), str(data)]
    env = {"PATH": os.environ.get("PATH", ""), "ROOT_ACCESS_KEY_ID": server.access_key,
           "ROOT_SECRET_ACCESS_KEY": server.secret_key}
    with serving("versitygw", argv, port, log_path, env, startup_timeout=startup_timeout):
        yield server
