"""A loopback HTTP proxy in front of the test registry that injects the faults a real network has: a
503 answer, or a blob stream cut off halfway (the headers promise the whole blob). Pulls only (GET,
HEAD). Each fault is used once, by the first request whose path matches, and counted."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Faults:
    unavailable: dict[str, int] = field(default_factory=dict)  # path part -> 503 answers still to give
    cut: dict[str, int] = field(default_factory=dict)  # path part -> streams still to cut
    injected: list[str] = field(default_factory=list)  # what was injected, in order

    def take(self, kind: dict[str, int], path: str) -> bool:
        for part, left in kind.items():
            if left > 0 and part in path:
                kind[part] = left - 1
                return True
        return False


@contextmanager
def flaky_proxy(upstream: str, faults: Faults) -> Iterator[str]:
    """Serves on a free loopback port; yields its host:port."""
    host, port = upstream.split(":")

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's naming
            self._forward()

        def do_GET(self):  # noqa: N802
            self._forward()

        def log_message(self, *args):
            pass

        def _forward(self):
            if faults.take(faults.unavailable, self.path):
                faults.injected.append(f"503 {self.path}")
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
            self.send_response(answer.status)
            for k, v in answer.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                if len(body) > 1 and faults.take(faults.cut, self.path):
                    faults.injected.append(f"cut {self.path}")
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)
            conn.close()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
