"""The test kubelet's log endpoint: GET /containerLogs/{namespace}/{pod}/{container}?tailLines=&limitBytes=
over HTTPS on 127.0.0.1, as a kubelet serves it on its port, so the API server's pods/log subresource
(`kubectl logs`, the operator's log reads) works against the test kubelet's pods.

The API server checks a kubelet's serving certificate only with --kubelet-certificate-authority, which
the test control plane does not set, so a fresh self-signed one (openssl: `cryptography` is not in the
venv) does. No authentication here: the port is on loopback, and the API server's RBAC decides who
may read pods/log before it proxies the request.
"""

from __future__ import annotations

import http.server
import re
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlparse

PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$")


class LogServer:
    """Serves `logs(namespace, pod)` (the whole output of the pod's command) with the kubelet's
    tailLines and limitBytes options."""

    def __init__(self, logs: Callable[[str, str], str | None], workdir: Path):
        self.logs, self.workdir = logs, Path(workdir)
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> int:
        """Starts serving; returns the port."""
        cert, key = self.workdir / "kubelet-serving.crt", self.workdir / "kubelet-serving.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=test-kubelet", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        logs = self.logs

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                match = PATH.match(url.path)
                text = logs(match.group(1), match.group(2)) if match else None
                if text is None:
                    self.send_error(404, "no such pod on this node")
                    return
                query = parse_qs(url.query)
                lines = text.splitlines(keepends=True)
                if "tailLines" in query:
                    tail = int(query["tailLines"][0])
                    lines = lines[-tail:] if tail > 0 else []
                body = "".join(lines).encode()
                if "limitBytes" in query:
                    body = body[: int(query["limitBytes"][0])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet: the test log is the kubelet's
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, name="test-kubelet-logs", daemon=True).start()
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
