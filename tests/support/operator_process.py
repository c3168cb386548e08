"""`adaptermerge operator` as a subprocess for cluster tests and benchmarks, plus what they observe of
it: its /metrics (parsed with prometheus_client's own parser) and the API requests it sends (through a
`kubectl proxy` that logs each request URL, holding the operator's credentials)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from support.control_plane import free_port

CLI = Path(sys.executable).parent / "adaptermerge"


def stop_operator(process: subprocess.Popen) -> None:
    """SIGTERM (kopf's graceful stop), then SIGKILL of its session after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class OperatorProcess:
    """`adaptermerge operator --standalone -n NAMESPACE [args]` with the given kubeconfig and env
    (namespace None: pass --all-namespaces or -n in args)."""

    def __init__(self, kubeconfig: Path, namespace: str | None, log: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()):
        self.metrics_port = free_port()
        self.log = log
        environment = {**os.environ, **(env or {}), "KUBECONFIG": str(kubeconfig),
                       "ADAPTERMERGE_METRICS_PORT": str(self.metrics_port)}  # a free port: tests run in parallel
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [str(CLI), "operator", "--standalone", *(["--namespace", namespace] if namespace else []), *args],
                env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} from /metrics; raises OSError until it serves."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent) from a fresh scrape."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"operator exited\n{self.log_text()[-4000:]}"
            try:
                self.metrics()
                return
            except OSError:
                assert time.monotonic() < deadline, f"no /metrics after {timeout:.0f}s\n{self.log_text()[-4000:]}"
                time.sleep(0.2)

    def stop(self) -> None:
        stop_operator(self.process)


class RequestLog:
    """A `kubectl proxy` in front of the API server, authenticating with `kubeconfig`; it logs every
    request it forwards (-v=6), so a test sees exactly which lists and watches a client sends."""

    def __init__(self, kubectl: Path, kubeconfig: Path, workdir: Path):
        self.port = free_port()
        self.log = workdir / "proxy.log"
        self.kubeconfig = workdir / "via-proxy.kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: proxy\n"
            f"clusters: [{{name: proxy, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: proxy, user: {}}]\n"
            "contexts: [{name: proxy, context: {cluster: proxy, user: proxy}}]\n"
        )
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [str(kubectl), "--kubeconfig", str(kubeconfig), "proxy", f"--port={self.port}", "-v=6"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while "Starting to serve" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def requests(self) -> list[str]:
        """[(verb, url)] of each request forwarded (and answered), in order."""
        return re.findall(r'"Response" verb="(\w+)" url="([^"]+)"', self.log.read_text())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
