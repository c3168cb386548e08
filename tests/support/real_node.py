"""A real node for tests: containerd + runc + CNI, kubelet, kube-proxy and kube-scheduler on this machine,
joined to a control plane from support.control_plane, running the project's own images (docs/real-node.md).

    with running_cluster(workdir) as cluster:
        cluster.plane.kubectl("get", "nodes")

One node per machine at a time (it owns a network bridge, the host's kube-proxy rules and containerd's
persistent root under the cache): a second session waits on a lock. The scripts under scripts/real-node
install the runtime and build the images; the config templates there are filled in here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import shutil
import socket
import string
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from support.control_plane import (
    CONTROLLERS,
    REPO,
    ControlPlane,
    StartupError,
    _Process,
    _start,
    find_bin_dir,
    free_port,
    running_control_plane,
)

SCRIPTS = REPO / "scripts" / "real-node"
NODE_NAME = "adaptermerge-node"
POD_SUBNET = "10.244.0.0/24"
BRIDGE = "amnode0"
# No GPU here: the node advertises this extended resource so GPU requests schedule; the worker falls
# back to the CPU (`--device auto`) and says so in its log.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_COUNT = 2
LOCAL_STORAGE_CLASS = "adaptermerge-local"
NODE_READY_TIMEOUT_S = 180
LOCK_TIMEOUT_S = 3600

# What a real cluster's kube-controller-manager runs that the node's pods need, on top of the plain
# control plane's: Node lifecycle (marks the node Ready and removes the kubelet's registration taint
# node.kubernetes.io/not-ready), Deployments for the chart's operator, the PersistentVolume binder and the
# claim/volume protection finalizers' controllers, and EndpointSlices for Services with selectors.
NODE_CONTROLLERS = (
    *CONTROLLERS,
    "node-lifecycle-controller",
    "deployment-controller",
    "replicaset-controller",
    "persistentvolume-binder-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "endpointslice-controller",
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt: the CA in-cluster clients verify with
)


# What the node ran, for the test session's summary (tests/node/conftest.py prints it even without -s):
# the images built from the Dockerfile with their IDs, and `kubectl get pods -o wide` snapshots.
REPORT: list[str] = []


def note(text: str) -> None:
    REPORT.append(text)
    print(text, file=sys.stderr)


def show(plane: ControlPlane, *args: str) -> str:
    """kubectl's output, noted for the summary; returns stdout."""
    done = plane.kubectl(*args, check=False)
    note(f"$ kubectl {' '.join(args)}\n{done.stdout}{done.stderr}".rstrip())
    return done.stdout


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTERMERGE_CACHE", Path.home() / ".cache" / "adaptermerge")) / "real-node"


def host_address() -> str:
    """The address of the interface with the default route: pods reach the API server there (a loopback
    address is the pod's own). Connecting a UDP socket sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("203.0.113.1", 9))  # TEST-NET-3: only the routing decision matters
        except OSError as error:
            raise StartupError(f"no route to pick a non-loopback address for the node: {error}") from error
        address = sock.getsockname()[0]
    if address.startswith("127."):
        raise StartupError(f"the default route's source address is loopback ({address}); pods could not reach it")
    return address


def _run_script(script: Path, *args: str) -> str:
    """Runs a script of the repo (its stderr streams to the test output); returns its stdout."""
    done = subprocess.run(["bash", str(script), *args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise StartupError(f"{script.relative_to(REPO)} failed with exit code {done.returncode} (its stderr is above)")
    return done.stdout


@dataclass(frozen=True)
class Image:
    name: str  # pause, operator, worker
    reference: str  # localhost/adaptermerge-<name>:<content key>
    archive: Path  # docker-archive tar

    @functools.cached_property
    def image_id(self) -> str:
        """The image's config digest, which containerd reports as the container's imageID."""
        with tarfile.open(self.archive) as archive:
            [manifest] = json.load(archive.extractfile("manifest.json"))
        return "sha256:" + manifest["Config"].removesuffix(".json").removeprefix("sha256:")

    @property
    def repository(self) -> str:
        return self.reference.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.reference.rsplit(":", 1)[1]


def build_image(target: str) -> Image:
    """The pause image (scripts/real-node) or a Dockerfile target (scripts/images/build.sh), cached."""
    script = SCRIPTS / "build-pause-image.sh" if target == "pause" else REPO / "scripts" / "images" / "build.sh"
    name, reference, archive = _run_script(script, *([] if target == "pause" else [target])).splitlines()[-1].split()
    assert name == target, f"{script} built {name}, not {target}"
    return Image(name, reference, Path(archive))


def _render(template: str, path: Path, **values) -> Path:
    path.write_text(string.Template((SCRIPTS / template).read_text()).substitute(values))
    return path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _kubelet_client_ca(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA the kubelet trusts for client certificates, and the API server's client certificate signed by
    it (CN kube-apiserver-kubelet-client in system:masters, as kubeadm makes it). Returns (ca, cert, key)."""
    ca_key, ca = workdir / "kubelet-client-ca.key", workdir / "kubelet-client-ca.crt"
    key, csr, cert = workdir / "apiserver-kubelet-client.key", workdir / "apiserver-kubelet-client.csr", workdir / "apiserver-kubelet-client.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kubelet-client-ca",
             "-keyout", str(ca_key), "-out", str(ca))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client",
             "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "2", "-out", str(cert))
    return ca, cert, key


@contextlib.contextmanager
def _node_lock(timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """One real node per machine: the bridge, kube-proxy's host rules and containerd's root are shared."""
    path = cache_dir() / "node.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"real node: another test session runs the node ({path}); waiting", file=sys.stderr)
                    announced = True
                if time.monotonic() > deadline:
                    raise StartupError(f"another test session held {path} for {timeout:.0f}s") from None
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class RealNode:
    plane: ControlPlane
    images: dict[str, Image]
    workdir: Path
    tokens: dict[str, str]  # component -> API token
    client_ca: Path
    processes: list[_Process] = field(default_factory=list)
    socket: Path = Path()
    startup_seconds: float = 0.0

    # ---- runtime ----------------------------------------------------------------------------------

    def ctr(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            input=input, capture_output=True, check=check,
        )

    def _start_containerd(self) -> None:
        root = cache_dir() / "containerd"  # persistent: imported images survive between runs
        state = self.workdir / "containerd-state"
        cni_conf = self.workdir / "cni"
        for folder in (root, state, cni_conf):
            folder.mkdir(parents=True, exist_ok=True)
        self.socket = state / "containerd.sock"
        _render("cni.conflist", cni_conf / "10-adaptermerge.conflist",
                bridge=BRIDGE, pod_subnet=POD_SUBNET, ipam_dir=self.workdir / "cni-ipam")
        config = _render("containerd.toml", self.workdir / "containerd.toml", root=root, state=state,
                         socket=self.socket, pause_image=self.images["pause"].reference, cni_conf_dir=cni_conf)
        self.processes.append(_start("containerd", ["containerd", "--config", str(config)], self.workdir))
        self._wait("containerd's socket", lambda: self.ctr("version", check=False).returncode == 0, 60)

    def load_image(self, image: Image) -> None:
        """Imports the image into containerd unless its content-keyed reference is already there (the
        root persists, so a rerun imports nothing)."""
        self.images[image.name] = image
        # Shown in the test output: which images, built from the Dockerfile, the node runs.
        note(f"real node: image {image.name:8} {image.reference} id {image.image_id} ({image.archive.name})")
        if image.reference in self.ctr("images", "list", "--quiet").stdout.decode().split():
            self._prune(image)
            return
        began = time.monotonic()
        imported = subprocess.run(
            ["nice", "-n", "10", "ctr", "--address", str(self.socket), "--namespace", "k8s.io",
             "images", "import", str(image.archive)],
            capture_output=True,
        )
        if imported.returncode != 0:
            raise StartupError(f"importing {image.archive} failed:\n{imported.stderr.decode()}")
        note(f"real node: imported {image.reference} in {time.monotonic() - began:.0f}s")
        self._prune(image)

    def _prune(self, current: Image) -> None:
        """Removes the other versions of the image's repository from the persistent root (a worker
        version costs GBs twice: content and unpacked snapshot); layers shared with the current version
        stay. Also the `sha256:<id>` aliases the CRI plugin made for them."""
        rows = [line.split()[:3] for line in self.ctr("images", "list").stdout.decode().splitlines()[1:]]
        stale = {ref: digest for ref, _, digest in rows
                 if ref.rsplit(":", 1)[0] == current.repository and ref != current.reference}
        kept = {digest for ref, _, digest in rows if ref not in stale and not ref.startswith("sha256:")}
        aliases = [ref for ref, _, digest in rows if ref.startswith("sha256:") and digest in set(stale.values()) - kept]
        if stale:
            self.ctr("images", "remove", "--sync", *stale, *aliases, check=False)

    # ---- node components --------------------------------------------------------------------------

    def _kubelet(self) -> None:
        root = self.workdir / "kubelet"
        root.mkdir(exist_ok=True)
        config = _render(
            "kubelet.yaml", self.workdir / "kubelet.yaml",
            containerd_socket=self.socket, address=self.plane.address, port=free_port(self.plane.address),
            healthz_port=free_port(), client_ca_file=self.client_ca, pod_logs_dir=self.workdir / "pod-logs",
            volume_plugin_dir=root / "volume-plugins",
        )
        kubeconfig = self.plane.kubeconfig_for_token(self.tokens["kubelet"])
        self.processes.append(_start("kubelet", [
            str(self.plane.bin_dir / "kubelet"),
            f"--config={config}", f"--kubeconfig={kubeconfig}", f"--root-dir={root}",
            f"--cert-dir={root / 'pki'}", f"--hostname-override={NODE_NAME}", f"--node-ip={self.plane.address}",
            "--v=1",
        ], self.workdir))

    def _kube_proxy(self) -> None:
        config = _render(
            "kube-proxy.yaml", self.workdir / "kube-proxy.yaml", node_name=NODE_NAME, pod_subnet=POD_SUBNET,
            kubeconfig=self.plane.kubeconfig_for_token(self.tokens["kube-proxy"]), address=self.plane.address,
            healthz_port=free_port(), metrics_port=free_port(),
        )
        self.processes.append(_start("kube-proxy", [str(self.plane.bin_dir / "kube-proxy"), f"--config={config}"], self.workdir))

    def _scheduler(self) -> None:
        kubeconfig = self.plane.kubeconfig_for_token(self.tokens["kube-scheduler"])
        self.processes.append(_start("kube-scheduler", [
            str(self.plane.bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            "--secure-port=0",  # no metrics/health endpoint needed
        ], self.workdir))

    def _node(self) -> dict | None:
        status, body = self.plane.get(f"/api/v1/nodes/{NODE_NAME}")
        return json.loads(body) if status == 200 else None

    def _schedulable(self) -> bool:
        """Ready, and the not-ready registration taint removed by the node lifecycle controller."""
        node = self._node()
        if not node:
            return False
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        taints = [t["key"] for t in node["spec"].get("taints", [])]
        return ready and not taints

    def _advertise_gpus(self) -> None:
        """Adds the extended resource to the node's capacity (the kubelet copies it to allocatable)."""
        key = GPU_RESOURCE.replace("/", "~1")
        patch = [{"op": "add", "path": f"/status/capacity/{key}", "value": str(GPU_COUNT)}]
        self.plane.kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=json", "-p", json.dumps(patch))
        self._wait(f"{GPU_RESOURCE} in the node's allocatable",
                   lambda: (self._node() or {}).get("status", {}).get("allocatable", {}).get(GPU_RESOURCE) == str(GPU_COUNT), 60)

    def _storage_class(self) -> None:
        """Local PersistentVolumes, bound when a pod that uses the claim is scheduled (as for real local disks)."""
        self.plane.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": LOCAL_STORAGE_CLASS},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer",
        }))

    # ---- helpers for tests ------------------------------------------------------------------------

    def local_volume(self, name: str, path: Path, size: str = "1Gi") -> dict:
        """A local PersistentVolume on this node for a folder (created by the caller)."""
        return {
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain", "storageClassName": LOCAL_STORAGE_CLASS,
                "local": {"path": str(path)},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}]}]}},
            },
        }

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} ({p.log}) -----\n{p.log_tail()}" for p in self.processes)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.name for p in self.processes if not p.alive()]
            if dead:
                raise StartupError(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if ready():
                    return
            time.sleep(0.5)
        raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}\n{self.plane.logs()}")

    def start(self) -> "RealNode":
        began = time.monotonic()
        self._start_containerd()
        for image in list(self.images.values()):
            self.load_image(image)
        self._kube_proxy()
        self._kubelet()
        self._scheduler()
        self._wait(f"node {NODE_NAME} Ready and untainted", self._schedulable, NODE_READY_TIMEOUT_S)
        self._advertise_gpus()
        self._storage_class()
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        # The kubelet first so it starts no new containers, then the rest; containerd's shims would keep
        # pods running after containerd exits, so the pods' containers are removed through CRI first.
        for process in reversed(self.processes):
            if process.name == "containerd":
                self._remove_pods()
            process.stop()
        # kube-proxy's iptables rules live in the host's tables: remove them with it.
        subprocess.run([str(self.plane.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True)
        self._unmount()

    def _unmount(self) -> None:
        """The kubelet bind-mounts its root folder onto itself and mounts pod volumes below it; without
        this the folders could never be deleted. Deepest first; lazy, so a busy one goes once free."""
        prefix = str(self.workdir) + "/"
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True)

    def _remove_pods(self) -> None:
        crictl = shutil.which("crictl")
        if crictl:  # not required: without it the shims are killed with their process groups below
            subprocess.run([crictl, "--runtime-endpoint", f"unix://{self.socket}", "rmp", "--all", "--force"],
                           capture_output=True, timeout=60)
        tasks = self.ctr("tasks", "list", "--quiet", check=False).stdout.decode().split()
        for task in tasks:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)


@dataclass
class Cluster:
    plane: ControlPlane
    node: RealNode

    @property
    def images(self) -> dict[str, Image]:
        return self.node.images

    def image(self, target: str) -> Image:
        """The Dockerfile's target, built (cached) and loaded into the node on first use."""
        if target not in self.node.images:
            self.node.load_image(build_image(target))
        return self.node.images[target]


@contextlib.contextmanager
def running_cluster(workdir: Path, bin_dir: Path | None = None) -> Iterator[Cluster]:
    """A control plane (reachable from pods, Node authorizer, the node's controllers) plus the real node,
    after building and loading the images. Everything stops on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = bin_dir or find_bin_dir()
    missing = [b for b in ("kubelet", "kube-scheduler", "kube-proxy") if not (bin_dir / b).exists()]
    if missing:
        raise StartupError(f"{', '.join(missing)} missing in {bin_dir}: run scripts/build-control-plane.sh")
    _run_script(SCRIPTS / "install-runtime.sh")
    # The sandbox image must be there before the kubelet starts; the Dockerfile's images are built and
    # loaded on first use (Cluster.image), so a test needing only the operator never waits for torch.
    images = {"pause": build_image("pause")}
    # Each component has its own identity, as a real cluster's: the kubelet is system:node:<name> in
    # system:nodes (the Node authorizer and NodeRestriction confine it to its own node and pods); the
    # scheduler and kube-proxy are the users RBAC's default bindings grant their ClusterRoles to.
    tokens = {name: secrets.token_hex(16) for name in ("kubelet", "kube-scheduler", "kube-proxy")}
    users = (
        (tokens["kubelet"], f"system:node:{NODE_NAME}", "system:nodes"),
        (tokens["kube-scheduler"], "system:kube-scheduler", ""),
        (tokens["kube-proxy"], "system:kube-proxy", ""),
    )
    client_ca, client_cert, client_key = _kubelet_client_ca(workdir)
    with _node_lock(), running_control_plane(
        workdir / "control-plane", bin_dir, address=host_address(), authorization_mode="Node,RBAC", users=users,
        extra_apiserver_args=(
            "--enable-admission-plugins=NodeRestriction",
            # The node's name resolves nowhere: reach the kubelet (logs, exec) at its InternalIP.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={client_cert}", f"--kubelet-client-key={client_key}",
        ),
        controllers=NODE_CONTROLLERS,
    ) as plane:
        node = RealNode(plane=plane, images=images, workdir=workdir / "node", tokens=tokens, client_ca=client_ca)
        node.workdir.mkdir(exist_ok=True)
        try:
            node.start()
            yield Cluster(plane, node)
        finally:
            node.stop()
