"""A real Kueue controller manager (sigs.k8s.io/kueue, built by scripts/build-gitops-tools.sh kueue)
against the test control plane, with its batch/Job integration only.

Without webhooks in the loop: the test API server cannot call a webhook Service (no kube-proxy, no
Service routing), so no webhook configuration is installed and Kueue's own certificate management is
off. Kueue still serves its webhook port, with a self-signed certificate made here. Its metrics server
reads a certificate from the fixed path /etc/kueue/metrics/certs when its certificate management is
off; the process runs in its own mount namespace where a copy of /etc holding that certificate is
mounted over /etc, so the machine's /etc is never touched. Jobs reach Kueue suspended (the operator
creates them so, as Kueue's mutating webhook would otherwise do).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

from support.control_plane import free_port

KUEUE_NAMESPACE = "kueue-system"


def _self_signed(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt")],
        check=True, capture_output=True,
    )


def _config(workdir: Path, health_port: int, webhook_port: int) -> Path:
    config = workdir / "kueue-config.yaml"
    config.write_text(f"""\
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: {KUEUE_NAMESPACE}
health:
  healthProbeBindAddress: 127.0.0.1:{health_port}
metrics:
  bindAddress: "0"
webhook:
  host: 127.0.0.1
  port: {webhook_port}
  certDir: {workdir / "webhook-certs"}
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
integrations:
  frameworks: ["batch/job"]
""")
    return config


@contextlib.contextmanager
def running_kueue(control_plane, tool_dir: Path, workdir: Path) -> Iterator[subprocess.Popen]:
    """Installs Kueue's CRDs, starts its controller manager, and stops it on exit."""
    control_plane.kubectl("apply", "--server-side", "-f", str(tool_dir / "crds"))
    control_plane.wait_established("-f", str(tool_dir / "crds"))
    control_plane.kubectl("create", "namespace", KUEUE_NAMESPACE, check=False)
    workdir.mkdir(parents=True, exist_ok=True)
    _self_signed(workdir / "webhook-certs")
    etc = workdir / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("shadow*", "gshadow*", "ssl/private"))
    _self_signed(etc / "kueue" / "metrics" / "certs")
    health_port, webhook_port = free_port(), free_port()
    config = _config(workdir, health_port, webhook_port)
    command = (f'mount --bind "{etc}" /etc && exec "{tool_dir / "kueue"}" --config="{config}" '
               f'--kubeconfig="{control_plane.kubeconfig}" --feature-gates=VisibilityOnDemand=false')
    log = workdir / "kueue.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while control_plane.kubectl("get", "--raw", "/", check=False).returncode != 0 or not _healthy(health_port):
            if process.poll() is not None:
                raise RuntimeError(f"kueue exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kueue not healthy after 90 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def log_tail(workdir: Path, lines: int = 60) -> str:
    log = workdir / "kueue.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""
