"""A small kubelet for tests: it really runs pods' commands as local processes.

It registers one Node, binds unbound pods to it through the pods/binding subresource (the job of the
scheduler, which the test control plane does not run), runs the container's command with its volumes
mapped to local folders, and reports the pod's progress through the pods/status subresource the way a
kubelet does, so the real Job controller sees Running, Succeeded and Failed pods, exit codes and
termination messages. Deleting a running pod kills its process group.

How a pod becomes a local process (docs/interfaces.md #7):
- PVC claim X -> <claims_root>/X; ConfigMap and Secret volumes -> folders holding their keys;
  emptyDir and any other volume -> an empty folder.
- Every mountPath, and the terminationMessagePath, is rewritten to its local path in the command,
  args, env values and workingDir. `$(VAR)` references are expanded like a kubelet does.
- The process inherits this process's environment (so `adaptermerge` is found on PATH; the venv's
  bin folder is put first) plus the container's env.

Like a kubelet's status manager it re-sends a pod's status every `status_sync_seconds` when the API
server's copy differs from what it last reported (someone overwrote it, or a write was lost), not once.
Like kube-scheduler it leaves a pod unbound, with condition PodScheduled=False (Unschedulable), when
its nodeSelector does not match the node or it asks for more of a resource than the node has.

Not done: images, resource limits (capacity is checked when binding, never enforced), probes,
init/sidecar containers, more than one container, tolerations (the node has no taints), volumes'
existence when binding (a pod with a missing PVC is bound and its folder made).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from support.kubelet_logs import LogServer

NODE_NAME = "test-node"
DEFAULT_CAPACITY = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "4"}
# The kubelet's own limits for termination messages (pkg/kubelet/kuberuntime).
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
# A deleted pod's process gets SIGTERM, then SIGKILL after its grace period, but at most this long.
MAX_GRACE_SECONDS = 10
# The kubelet's status manager checks every 10 s that the API server has the status it reported.
STATUS_SYNC_SECONDS = 10

log = logging.getLogger("test-kubelet")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; container runtimes report 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class _NotReady(Exception):
    """A volume's source (ConfigMap, Secret) does not exist yet: retry, like the kubelet does."""


class _ConfigError(Exception):
    """An env source (a Secret or ConfigMap, or its key) is missing: CreateContainerConfigError, retried."""


def path_rewriter(mapping: dict[str, str]):
    """Replaces each container path in `mapping` by its local path, only where it is a whole path prefix
    (so '/tmp' rewrites '/tmp/x' and 'out=/tmp' but not '/var/tmp' or '/tmpfoo')."""
    if not mapping:
        return lambda text: text
    keys = sorted(mapping, key=len, reverse=True)  # longest first: /mnt/a/b wins over /mnt/a
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, keys)) + r")(?=/|$|[^\w.-])")
    return lambda text: pattern.sub(lambda m: mapping[m.group(1)], text)


def expand_env_references(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command/args/env: unknown names stay as written, `$$` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _matches(current: dict, reported: dict) -> bool:
    """Whether the API server's pod status still says what the kubelet reported (phase, container
    states and the conditions it owns)."""
    def containers(status: dict) -> list:
        return [(c.get("name"), {k: v for k, v in (c.get("state") or {}).items() if v}) for c in status.get("containerStatuses") or []]

    def conditions(status: dict) -> dict:
        return {c["type"]: c.get("status") for c in status.get("conditions") or []}

    owned = conditions(reported)
    return (current.get("phase") == reported["phase"] and containers(current) == containers(reported)
            and {t: s for t, s in conditions(current).items() if t in owned} == owned)


def _state(kind: str, **details) -> dict:
    """A container state; the other two kinds are set to null so a strategic merge patch removes them."""
    return {k: (details if k == kind else None) for k in ("waiting", "running", "terminated")}


@dataclass
class _PodRun:
    """One pod on the node: its folder, its process and the thread that drives it."""

    kubelet: "TestKubelet"
    pod: dict
    folder: Path
    deleted: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = 0  # the deletion's grace period, once deleted
    process: subprocess.Popen | None = None
    thread: threading.Thread | None = None
    reported: dict | None = None  # the last status patch sent, re-sent while the API's copy differs
    report_lock: threading.Lock = field(default_factory=threading.Lock)  # a re-send never overtakes a report

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def container(self) -> dict:
        return self.pod["spec"]["containers"][0]

    @property
    def log_file(self) -> Path:
        return self.folder / "container.log"

    # ---- driving the pod ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a test tool must not die silently: say what broke, in the pod and the log
            log.exception("pod %s/%s", self.namespace, self.name)
            with contextlib.suppress(Exception):
                self._report("Failed", _state("terminated", exitCode=128, reason="TestKubeletError",
                                              message="test kubelet error, see the test log"))
        finally:
            if self.deleted.is_set():
                self.kubelet.finish_deletion(self.pod)

    def _run(self) -> None:
        if len(self.pod["spec"]["containers"]) != 1:
            self._report("Failed", _state("terminated", exitCode=128, reason="Unsupported",
                                          message="the test kubelet runs single-container pods only"))
            return
        argv, env, cwd, termination_file = self._prepare()
        if argv is None:
            return  # deleted while waiting for its volumes
        restart_policy = self.pod["spec"].get("restartPolicy", "Always")
        restarts, last_state = 0, None
        while True:
            termination_file.write_text("")
            started = _now()
            try:
                self.process = self._start(argv, env, cwd)
            except OSError as error:  # e.g. the command is not on PATH
                terminated = _state("terminated", exitCode=128, reason="StartError", message=str(error),
                                    startedAt=started, finishedAt=_now())
            else:
                self._report("Running", _state("running", startedAt=started), restarts=restarts,
                             last_state=last_state, ready=True)
                terminated = self._wait_for_exit(started, termination_file)
            failed = terminated["terminated"]["exitCode"] != 0
            restart = not self._ending() and (restart_policy == "Always" or
                                                     (restart_policy == "OnFailure" and failed))
            if not restart:
                phase = "Failed" if failed else "Succeeded"  # also when deleted: a kubelet does the same
                self._report(phase, terminated, restarts=restarts, last_state=last_state)
                return
            restarts, last_state = restarts + 1, terminated
            if self._ending(wait=1.0):  # the kubelet's crash-loop back-off, shortened for tests
                self._report("Failed", terminated, restarts=restarts - 1, last_state=None)
                return

    def _ending(self, wait: float = 0) -> bool:
        """True once the pod is deleted or the kubelet stops (waiting up to `wait` seconds for either)."""
        return self.deleted.wait(wait) or self.kubelet.stopping

    def _start(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        with self.log_file.open("ab") as out:
            # Its own session, so deleting the pod kills everything the command started.
            return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_for_exit(self, started: str, termination_file: Path) -> dict:
        while self.process.poll() is None:
            if self._ending(wait=0.1):
                self.kill(self.grace_seconds)
        code = _exit_code(self.process.returncode)
        return _state("terminated", exitCode=code, reason="Completed" if code == 0 else "Error",
                      startedAt=started, finishedAt=_now(), containerID=self._container_id(),
                      **self._message(termination_file, code))

    def kill(self, grace_seconds: float = 0) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period (capped: tests wait for it)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, min(grace_seconds, MAX_GRACE_SECONDS)), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait)
                return

    def _message(self, termination_file: Path, exit_code: int) -> dict:
        message = termination_file.read_bytes()[:MAX_MESSAGE_BYTES].decode(errors="replace")
        fallback = self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and fallback and exit_code != 0:
            lines = self.logs().splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines).encode()[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        return {"message": message} if message else {}

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # ---- turning the pod spec into a local command ---------------------------------------------

    def _prepare(self):
        """(argv, env, working dir, termination-message file), waiting for missing ConfigMaps/Secrets."""
        container = self.container
        termination_file = self.folder / "termination-log"
        while True:
            try:
                volumes = {v["name"]: self._volume_folder(v) for v in self.pod["spec"].get("volumes", [])}
                paths = {container.get("terminationMessagePath", "/dev/termination-log"): str(termination_file)}
                for mount in container.get("volumeMounts", []):
                    local = volumes[mount["name"]] / mount.get("subPath", "")
                    if not local.exists():  # a subPath names a file or folder inside the volume
                        local.mkdir(parents=True)
                    paths[mount["mountPath"].rstrip("/") or "/"] = str(local)
                rewrite = path_rewriter(paths)
                container_env = {}
                for var in container.get("env", []):
                    value = var["value"] if "value" in var else self._env_source(var.get("valueFrom", {}))
                    if value is not None:  # None: an optional source that is missing
                        container_env[var["name"]] = rewrite(expand_env_references(value, container_env))
                break
            except (_NotReady, _ConfigError) as missing:
                reason = "CreateContainerConfigError" if isinstance(missing, _ConfigError) else "ContainerCreating"
                self._report("Pending", _state("waiting", reason=reason, message=str(missing)))
                if self._ending(wait=1.0):
                    return None, None, None, None
        env = {**os.environ, **container_env}
        if "PATH" not in container_env:
            # The venv's console scripts (adaptermerge) stand in for what the image would provide.
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

        argv = [rewrite(expand_env_references(a, container_env))
                for a in container.get("command", []) + container.get("args", [])]
        if not container.get("command"):
            argv = ["/bin/false"]  # no image here to supply an entrypoint
            self.log_file.write_text("test kubelet: the container has no command (images are not run)\n")
        cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else self.folder
        cwd.mkdir(parents=True, exist_ok=True)
        return argv, env, cwd, termination_file

    def _volume_folder(self, volume: dict) -> Path:
        folder = self.folder / "volumes" / volume["name"]
        if "persistentVolumeClaim" in volume:
            folder = self.kubelet.claims_root / volume["persistentVolumeClaim"]["claimName"]
        elif "configMap" in volume:
            self._write_keys(folder, volume["configMap"], self._read("config_map", volume["configMap"]))
        elif "secret" in volume:
            source = {**volume["secret"], "name": volume["secret"]["secretName"]}
            data = self._read("secret", source)
            self._write_keys(folder, source, {k: base64.b64decode(v) for k, v in data.items()})
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _read(self, kind: str, source: dict) -> dict:
        read = getattr(self.kubelet.core, f"read_namespaced_{kind}")
        try:
            response = read(source["name"], self.namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404 and source.get("optional"):
                return {}
            if error.status == 404:
                raise _NotReady(f'{kind.replace("_", "")} "{source["name"]}" not found') from None
            raise
        return json.loads(response.data).get("data") or {}

    @staticmethod
    def _write_keys(folder: Path, source: dict, data: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            value = data[item["key"]]
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(value if isinstance(value, bytes) else value.encode())

    def _env_source(self, source: dict) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            values = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                      "metadata.uid": self.pod["metadata"]["uid"], "spec.nodeName": self.kubelet.node_name,
                      "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
                      "status.hostIP": "127.0.0.1", "status.podIP": "127.0.0.1"}
            return values[path]
        for key, kind in (("configMapKeyRef", "config_map"), ("secretKeyRef", "secret")):
            if key in source:
                # Like the kubelet: a missing source or key is CreateContainerConfigError (retried), unless
                # the reference is optional, which leaves the variable unset.
                ref, title = source[key], "ConfigMap" if kind == "config_map" else "Secret"
                try:
                    data = self._read(kind, {**ref, "optional": False})
                except _NotReady as missing:
                    if ref.get("optional"):
                        return None
                    raise _ConfigError(str(missing)) from None
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise _ConfigError(f"couldn't find key {ref['key']} in {title} {self.namespace}/{ref['name']}")
                value = data[ref["key"]]
                return base64.b64decode(value).decode() if kind == "secret" else value
        raise ValueError(f"test kubelet: unsupported env source {source}")

    # ---- status ----------------------------------------------------------------------------------

    def _container_id(self) -> str:
        return f"testkubelet://{self.process.pid}" if self.process else ""

    def _report(self, phase: str, state: dict, *, restarts: int = 0, last_state: dict | None = None,
                ready: bool = False) -> None:
        now = _now()
        status = "True" if ready else "False"
        container_status = {
            "name": self.container["name"], "image": self.container.get("image", ""), "imageID": "",
            "containerID": self._container_id(), "ready": ready, "started": phase == "Running",
            "restartCount": restarts, "state": state,
            "lastState": last_state or _state("none"),
        }
        conditions = [{"type": t, "status": s, "lastTransitionTime": now} for t, s in (
            ("PodReadyToStartContainers", "True" if self.process else "False"), ("Initialized", "True"),
            ("ContainersReady", status), ("Ready", status))]
        if phase in ("Succeeded", "Failed"):
            for condition in conditions[2:]:
                condition["reason"] = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        patch = {"status": {
            "phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.pod["status"].get("startTime") or now,
            "conditions": conditions, "containerStatuses": [container_status],
        }}
        self.pod["status"]["startTime"] = patch["status"]["startTime"]
        with self.report_lock:
            self.reported = patch
            self.kubelet.core.patch_namespaced_pod_status(self.name, self.namespace, patch,
                                                          _preload_content=False)

    def sync_status(self) -> None:
        """Re-sends the last reported status if the API server's copy of it differs."""
        with self.report_lock:
            if self.reported is not None:
                self._sync_status(self.reported)

    def _sync_status(self, patch: dict) -> None:
        try:
            current = json.loads(self.kubelet.core.read_namespaced_pod_status(
                self.name, self.namespace, _preload_content=False).data)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        if current["metadata"]["uid"] != self.pod["metadata"]["uid"] or _matches(current["status"], patch["status"]):
            return
        log.info("pod %s/%s: the API server's status differs from the last report; re-sending", self.namespace, self.name)
        self.kubelet.core.patch_namespaced_pod_status(self.name, self.namespace, patch, _preload_content=False)


class TestKubelet:
    """Registers node `node_name` and runs the pods bound to it until stop()."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, api_client: client.ApiClient, claims_root: Path, workdir: Path, *,
                 node_name: str = NODE_NAME, capacity: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None, status_sync_seconds: float = STATUS_SYNC_SECONDS):
        self.core = client.CoreV1Api(api_client)
        self.claims_root = Path(claims_root)
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.capacity = capacity or DEFAULT_CAPACITY
        self.labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", **(labels or {})}
        self._runs: dict[str, _PodRun] = {}  # by pod UID; kept after the pod ends so it never reruns
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_pods, name="test-kubelet-watch", daemon=True)
        self.status_sync_seconds = status_sync_seconds
        self._syncer = threading.Thread(target=self._sync_statuses, name="test-kubelet-status", daemon=True)

    def start(self) -> "TestKubelet":
        self._log_server = LogServer(self._pod_logs, self.workdir)
        self._log_port = self._log_server.start()
        self._register_node()
        self._watcher.start()
        self._syncer.start()
        return self

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.kill()
        self._watcher.join(10)
        self._syncer.join(10)
        self._log_server.stop()
        for run in runs:
            if run.thread:
                run.thread.join(10)

    def pods_run(self, namespace: str) -> list[str]:
        """Names of the pods of that namespace this kubelet started (each ran its command once)."""
        with self._lock:
            return sorted(r.name for r in self._runs.values() if r.namespace == namespace)

    def _sync_statuses(self) -> None:
        """The status manager's periodic pass: every pod the kubelet reported on gets its status checked."""
        while not self._stop.wait(self.status_sync_seconds):
            with self._lock:
                runs = list(self._runs.values())
            for run in runs:
                try:
                    run.sync_status()
                except Exception:  # keep syncing the others; the next pass retries
                    log.exception("status sync of pod %s/%s", run.namespace, run.name)

    def logs(self, namespace: str, pod_name: str) -> str:
        """The output of the pod's command (what `kubectl logs` would show with a real kubelet)."""
        return self._pod_logs(namespace, pod_name) or ""

    def _pod_logs(self, namespace: str, pod_name: str) -> str | None:
        with self._lock:
            runs = [r for r in self._runs.values() if (r.namespace, r.name) == (namespace, pod_name)]
        return runs[-1].logs() if runs else None

    # ---- the node ------------------------------------------------------------------------------

    def _register_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": self.labels}}
        try:
            self.core.create_node(node, _preload_content=False)
        except ApiException as error:
            if error.status != 409:
                raise
        now = _now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test kubelet",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
        status = {"capacity": self.capacity, "allocatable": self.capacity, "conditions": [ready],
                  # No Hostname address: the API server would prefer it for pods/log and fail to resolve it.
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": self._log_port}}}
        self.core.patch_node_status(self.node_name, {"status": status}, _preload_content=False)

    # ---- watching pods ---------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        resource_version = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._resync()
                stream = watch.Watch().stream(self.core.list_pod_for_all_namespaces, deserialize=False,
                                              resource_version=resource_version, timeout_seconds=2,
                                              allow_watch_bookmarks=True)
                for event in stream:
                    if event["type"] == "ERROR":  # e.g. 410 Gone: our resourceVersion is too old
                        resource_version = None
                        break
                    resource_version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._handle(event["type"], event["object"])
                    if self._stop.is_set():
                        break
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("pod watch failed; listing again")
                resource_version = None
                self._stop.wait(0.5)

    def _resync(self) -> str:
        listing = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)
        for pod in listing["items"]:
            self._handle("ADDED", pod)
        return listing["metadata"]["resourceVersion"]

    def _handle(self, event_type: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        with self._lock:
            run = self._runs.get(meta["uid"])
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            if run:
                run.grace_seconds = meta.get("deletionGracePeriodSeconds", 0)
                run.deleted.set()  # its thread kills the process, reports and finishes the deletion
            idle = not run or not run.thread.is_alive()
            if idle and spec.get("nodeName") == self.node_name and event_type != "DELETED":
                self.finish_deletion(pod)  # never started, or already ended
            return
        if not spec.get("nodeName"):
            self._schedule(pod)
        elif spec["nodeName"] == self.node_name and not run and pod["status"].get("phase") in (None, "Pending"):
            self._run(pod)

    def _schedule(self, pod: dict) -> None:
        """What kube-scheduler would do with one node: bind when the nodeSelector matches."""
        meta = pod["metadata"]
        selector = pod["spec"].get("nodeSelector") or {}
        mismatched = {k: v for k, v in selector.items() if self.labels.get(k) != v}
        insufficient = self._insufficient(pod)
        if mismatched or insufficient:
            why = (f"1 node(s) didn't match Pod's node affinity/selector {mismatched}" if mismatched
                   else "1 Insufficient " + ", ".join(insufficient))
            conditions = pod["status"].get("conditions") or []
            if not any(c["type"] == "PodScheduled" for c in conditions):
                condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                             "message": f"0/1 nodes are available: {why}.",
                             "lastTransitionTime": _now()}
                self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"],
                                                      {"status": {"conditions": [condition]}},
                                                      _preload_content=False)
            return
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            # The response is a Status, which the generated client cannot read as a Binding: skip parsing.
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], binding,
                                                    _preload_content=False)
        except ApiException as error:
            if error.status not in (404, 409):  # deleted meanwhile, or already bound
                raise

    def _insufficient(self, pod: dict) -> list[str]:
        """Resources the pod asks for (requests, else limits) beyond the node's allocatable amount.
        Only whole-unit resources (extended resources such as GPUs, and pods) are compared."""
        wanted: dict[str, int] = {}
        for container in pod["spec"].get("containers", []):
            resources = container.get("resources") or {}
            for name, value in {**(resources.get("limits") or {}), **(resources.get("requests") or {})}.items():
                if str(value).isdigit():
                    wanted[name] = wanted.get(name, 0) + int(value)
        return [name for name, amount in sorted(wanted.items())
                if str(self.capacity.get(name, "0")).isdigit() and amount > int(self.capacity.get(name, "0"))]

    def _run(self, pod: dict) -> None:
        meta = pod["metadata"]
        folder = self.workdir / f'{meta["namespace"]}_{meta["name"]}_{meta["uid"][:8]}'
        folder.mkdir(parents=True, exist_ok=True)
        run = _PodRun(self, pod, folder)
        run.thread = threading.Thread(target=run.run, name=f"pod-{meta['name']}", daemon=True)
        with self._lock:
            self._runs[meta["uid"]] = run
        run.thread.start()

    def finish_deletion(self, pod: dict) -> None:
        """The kubelet's last word on a deleted pod: remove it now (its processes are gone)."""
        meta = pod["metadata"]
        with contextlib.suppress(ApiException):  # already gone
            self.core.delete_namespaced_pod(
                # In the body: with a body, the API server ignores DeleteOptions given as query parameters.
                meta["name"], meta["namespace"], body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                _preload_content=False)


@contextlib.contextmanager
def running_kubelet(api_client: client.ApiClient, claims_root: Path, workdir: Path, **options):
    kubelet = TestKubelet(api_client, claims_root, workdir, **options).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
