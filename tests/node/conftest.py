"""Fixtures for the real-node tests (docs/real-node.md): a control plane, kube-scheduler and one real node
(kubelet, containerd, kube-proxy) running the images built from the project's Dockerfile.

Nothing here skips: if the runtime cannot be installed or the node cannot start, every test here errors
with the reason.
"""

from __future__ import annotations

import pytest

from support.control_plane import fresh_namespace
from support.real_node import REPORT, note, running_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("real-node")) as cluster:
        note(f"real node: started in {cluster.node.startup_seconds:.0f}s "
             f"(control plane {cluster.plane.startup_seconds:.0f}s)")
        yield cluster


@pytest.fixture
def namespace(cluster):
    """A fresh namespace on the real cluster, ready for pods, deleted afterwards (overrides tests/conftest.py's)."""
    with fresh_namespace(cluster.plane, "node") as name:
        yield name


def pytest_terminal_summary(terminalreporter):
    """Shows, in every run's output, the images (built from the Dockerfile) the node ran and the pods the
    real kubelet ran them in."""
    if REPORT:
        terminalreporter.section("real node: images and pods")
        for text in REPORT:
            terminalreporter.write_line(text)
