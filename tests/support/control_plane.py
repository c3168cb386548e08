"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager.

There is no kubelet and no scheduler: tests that need pods to run use support.kubelet.TestKubelet.
Everything listens on loopback on free ports and keeps its data in one temporary folder, so several
test sessions can run side by side. Binaries come from scripts/build-control-plane.sh.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Only the controllers the tests rely on, which keeps the controller-manager light on 2 cores.
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",  # ownerReferences: deleting a Job deletes its pods
    "namespace-controller",  # deleting a namespace deletes its contents
    "serviceaccount-controller",  # creates the 'default' ServiceAccount the admission plugin requires
    "ttl-after-finished-controller",  # Job.spec.ttlSecondsAfterFinished
    "clusterrole-aggregation-controller",  # fills the admin/edit/view ClusterRoles that RBAC setups bind
)


class StartupError(RuntimeError):
    """The control plane did not come up; the message carries the logs."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message includes kubectl's stderr (CalledProcessError's does not)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


def find_bin_dir() -> Path:
    """The folder holding etcd, kube-apiserver, kube-controller-manager, kubectl and helm.

    scripts/test.sh exports it; otherwise the (cached, usually instant) build script is asked.
    """
    env = os.environ.get("ADAPTERMERGE_CONTROL_PLANE_BIN")
    if env:
        return Path(env)
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-control-plane.sh")],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return Path(build.stdout.strip().splitlines()[-1])


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the whole process group, SIGKILL it if it lingers."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the test process dies, even by SIGKILL (a CI
    timeout), so no etcd or API server outlives its test run. Linux-only; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _start(name: str, argv: list[str], workdir: Path) -> _Process:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        # A new session per component, so stop() can kill the component and anything it spawned.
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return _Process(name, popen, log)


def _write_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> Path:
    # JSON is valid YAML, so no YAML library is needed here.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path
    server: str = ""
    kubeconfig: Path = Path()
    ca_file: Path = Path()
    admin_token: str = ""
    startup_seconds: float = 0.0
    processes: list[_Process] = field(default_factory=list)
    # The real node (support.real_node) needs an API server that pods can reach through the `kubernetes`
    # Service (a non-loopback address, whose endpoint the API server then publishes), identities for the
    # kubelet, scheduler and kube-proxy (extra token rows: token, user, comma-separated groups), the Node
    # authorizer, and more controllers. The defaults are the plain control plane's.
    address: str = "127.0.0.1"
    authorization_mode: str = "RBAC"
    users: tuple[tuple[str, str, str], ...] = ()
    extra_apiserver_args: tuple[str, ...] = ()
    controllers: tuple[str, ...] = CONTROLLERS

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        done = subprocess.run(argv, input=input, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def get_json(self, *args: str, namespace: str | None = None) -> dict:
        """`kubectl get ARGS -o json`, parsed."""
        scope = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl("get", *args, *scope, "-o", "json").stdout)

    def wait_established(self, *targets: str, timeout: float = 60.0) -> None:
        """Polls until every CRD named (`crd/NAME`, or `-f PATH`) is Established. Not `kubectl wait`,
        which fails outright while a new CRD's status.conditions is still null (seen under load:
        ".status.conditions accessor error: <nil>")."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.kubectl("get", *targets, "-o", "json", check=False)
            if done.returncode == 0:
                listed = json.loads(done.stdout)
                crds = listed.get("items", [listed])
                if crds and all(any(c.get("type") == "Established" and c.get("status") == "True"
                                    for c in (crd.get("status") or {}).get("conditions") or []) for crd in crds):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(targets)} not Established within {timeout:.0f} s: {done.stderr}")
            time.sleep(0.2)

    def kubeconfig_for_token(self, token: str) -> Path:
        name = hashlib.sha256(token.encode()).hexdigest()[:12]
        return _write_kubeconfig(self.workdir / f"kubeconfig-{name}.json", self.server, self.ca_file, token)

    def api_client(self, kubeconfig: Path | None = None):
        """A `kubernetes` ApiClient for the admin (or the given) kubeconfig."""
        from kubernetes import config

        return config.new_client_from_config(str(kubeconfig or self.kubeconfig))

    def get(self, path: str) -> tuple[int, str]:
        """GET an API path as admin; returns (HTTP status, body). Used before kubectl can be trusted."""
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"})
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} ({p.log}) -----\n{p.log_tail()}" for p in self.processes)

    def stop(self) -> None:
        # Reverse order: controllers first, etcd last, so nothing logs a storm of connection errors.
        for process in reversed(self.processes):
            process.stop()

    # ---- start-up -------------------------------------------------------------------------------

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        self.processes.append(
            _start(
                "etcd",
                [
                    str(self.bin_dir / "etcd"),
                    "--data-dir", str(self.workdir / "etcd-data"),
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", f"default={peer_url}",
                    "--unsafe-no-fsync",  # test data: durability costs seconds per write on slow disks
                    "--log-level", "warn",
                ],
                self.workdir,
            )
        )
        return url

    def _write_credentials(self) -> tuple[Path, Path]:
        """The service-account signing key (openssl: `cryptography` is not in the venv) and the admin token."""
        key = self.workdir / "service-account.key"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
            check=True,
            capture_output=True,
        )
        self.admin_token = secrets.token_hex(16)
        tokens = self.workdir / "tokens.csv"
        rows = [(self.admin_token, "admin", "system:masters"), *self.users]
        tokens.write_text("".join(f"{token},{user},{user}" + (f',"{groups}"' if groups else "") + "\n" for token, user, groups in rows))
        return key, tokens

    def _start_apiserver(self, etcd_url: str) -> None:
        key, tokens = self._write_credentials()
        port = free_port(self.address)
        cert_dir = self.workdir / "apiserver-certs"
        self.server = f"https://{self.address}:{port}"
        # The self-signed serving certificate is written with its CA appended, so it verifies itself.
        self.ca_file = cert_dir / "apiserver.crt"
        self.processes.append(
            _start(
                "kube-apiserver",
                [
                    str(self.bin_dir / "kube-apiserver"),
                    "--etcd-servers", etcd_url,
                    f"--bind-address={self.address}",
                    f"--advertise-address={self.address}",  # else it fails on hosts without a default route
                    f"--secure-port={port}",
                    f"--cert-dir={cert_dir}",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={key}",
                    f"--service-account-signing-key-file={key}",
                    f"--token-auth-file={tokens}",
                    # RBAC: so missing RBAC rules fail tests as in production
                    f"--authorization-mode={self.authorization_mode}",
                    # A loopback address cannot be a Service endpoint: then there is nothing to publish.
                    "--endpoint-reconciler-type=" + ("none" if self.address.startswith("127.") else "lease"),
                    "--profiling=false",
                    *self.extra_apiserver_args,
                ],
                self.workdir,
            )
        )
        self._wait("kube-apiserver /readyz", lambda: self.ca_file.exists() and self.get("/readyz")[0] == 200)
        self.kubeconfig = _write_kubeconfig(self.workdir / "admin.kubeconfig", self.server, self.ca_file, self.admin_token)

    def _start_controller_manager(self) -> None:
        self.processes.append(
            _start(
                "kube-controller-manager",
                [
                    str(self.bin_dir / "kube-controller-manager"),
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",  # no metrics/health endpoint needed: one port fewer to pick
                    "--controllers=" + ",".join(self.controllers),
                    # The CA that pods' in-cluster clients verify the API server with (kube-root-ca.crt).
                    f"--root-ca-file={self.ca_file}",
                ],
                self.workdir,
            )
        )
        self._wait(
            "the 'default' ServiceAccount",
            lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        )

    def _wait(self, what: str, ready, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.name for p in self.processes if not p.alive()]
            if dead:
                raise StartupError(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            with contextlib.suppress(OSError):
                if ready():
                    return
            time.sleep(0.2)
        raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def start(self) -> "ControlPlane":
        began = time.monotonic()
        try:
            self._start_apiserver(self._start_etcd())
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Polls condition() until it returns something truthy (returned) or fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def fresh_namespace(plane: ControlPlane, prefix: str = "test") -> Iterator[str]:
    """A new namespace `<prefix>-<8 hex>`, yielded once its 'default' ServiceAccount exists (pods are
    refused before the serviceaccount controller creates it), deleted afterwards without waiting (the
    namespace controller deletes the contents in the background)."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    plane.kubectl("create", "namespace", name)
    wait_until(lambda: plane.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200, 30,
               f"the 'default' ServiceAccount in {name}", interval=0.1)
    try:
        yield name
    finally:
        plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@contextlib.contextmanager
def running_control_plane(workdir: Path, bin_dir: Path | None = None, **options) -> Iterator[ControlPlane]:
    """Starts etcd, kube-apiserver and kube-controller-manager in workdir; stops them on exit.
    options: ControlPlane's fields (address, users, controllers... as support.real_node sets them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(bin_dir=bin_dir or find_bin_dir(), workdir=workdir, **options).start()
    try:
        yield plane
    finally:
        plane.stop()
