"""Fixtures for the chart tests: helm (built beside kubectl by scripts/build-control-plane.sh) and
chart rendering."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from support.chart_identity import helm_template
from support.control_plane import find_bin_dir

CHART_CRDS = Path(__file__).resolve().parents[2] / "charts" / "adaptermerge" / "crds"


@pytest.fixture(scope="session")
def helm() -> Path:
    path = find_bin_dir() / "helm"
    assert path.is_file(), f"no helm in {path.parent}: run scripts/build-control-plane.sh"
    return path


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., list[dict[str, Any]]]:
    """render(values, namespace="adaptermerge-system") -> the chart's objects as dicts."""

    def objects(values: dict[str, Any] | None = None, namespace: str = "adaptermerge-system"):
        return [doc for doc in yaml.safe_load_all(helm_template(helm, namespace, values)) if doc]

    return objects


@pytest.fixture(scope="session")
def render_fails(helm) -> Callable[[dict[str, Any]], str]:
    """render_fails(values) -> helm's error text; fails the test if rendering succeeds."""

    def error(values: dict[str, Any]) -> str:
        with pytest.raises(RuntimeError) as failure:
            helm_template(helm, "adaptermerge-system", values)
        return str(failure.value)

    return error


@pytest.fixture
def extra_namespace(control_plane):
    """A second fresh namespace (the `namespace` fixture gives the first), deleted afterwards."""
    name = f"test-extra-{secrets.token_hex(4)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def chart_crds(control_plane):
    """The chart's crds/ applied for real, as `helm install` does before the templates."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART_CRDS))
    control_plane.wait_established("-f", str(CHART_CRDS))
