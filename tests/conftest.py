"""Fixtures for tests that need the real Kubernetes control plane (docs/interfaces.md #8).

All are session-scoped except `namespace`, and pytest only builds a fixture when a test asks for it:
a run that selects no cluster test starts no etcd, API server or kubelet.
"""

from __future__ import annotations

import pytest

from support.control_plane import fresh_namespace, running_control_plane


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    with running_control_plane(tmp_path_factory.mktemp("control-plane")) as plane:
        yield plane


@pytest.fixture(scope="session")
def claims_root(tmp_path_factory):
    """Where the test kubelet finds PersistentVolumeClaim X: the folder <claims_root>/X."""
    return tmp_path_factory.mktemp("claims")


@pytest.fixture(scope="session")
def test_kubelet(control_plane, claims_root, tmp_path_factory):
    from support.kubelet import running_kubelet  # imports `kubernetes`: only when a test needs it

    with running_kubelet(control_plane.api_client(), claims_root, tmp_path_factory.mktemp("kubelet")) as kubelet:
        yield kubelet


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace, ready for pods (its 'default' ServiceAccount exists), deleted afterwards."""
    with fresh_namespace(control_plane) as name:
        yield name
