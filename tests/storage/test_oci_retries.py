"""Transient registry failures are retried: a 503 answer (urllib3's retry) and a blob stream cut off
halfway (fetched again from the start); a registry that keeps failing ends in exit 2 naming the field.
The faults come from a proxy in front of the real registry (tests/support/flaky_proxy.py)."""

from __future__ import annotations

import hashlib
import json

from support.flaky_proxy import Faults, flaky_proxy
from support.storage_cli import cli, files_of, spec_of


def _merge_through(proxy: str, tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    spec = spec_of(f"oci://{proxy}/retry/a:v1", f"oci://{proxy}/retry/b:v1", {"path": "merged", "claimName": "out"})
    return cli(tmp_path, spec, extra=("--volume", f"out={out}")), out / "merged"


def test_unavailable_answers_and_cut_streams_are_retried(oci_registry, tiny_store, tmp_path):
    oci_registry.push_artifact("retry/a", "v1", files_of(tiny_store / "adapters" / "a"))
    oci_registry.push_artifact("retry/b", "v1", files_of(tiny_store / "adapters" / "b"))
    faults = Faults(unavailable={"/retry/a/manifests/": 2, "/retry/a/blobs/": 1}, cut={"/retry/b/blobs/": 2})
    with flaky_proxy(oci_registry.host, faults) as proxy:
        (code, log, _), merged = _merge_through(proxy, tmp_path)
    assert code == 0, log
    assert [f.split()[0] for f in faults.injected].count("503") == 3
    assert [f.split()[0] for f in faults.injected].count("cut") == 2
    manifest = json.loads((merged / "merge-manifest.json").read_text())
    for source, name in zip(manifest["sources"], ("a", "b"), strict=True):
        local = (tiny_store / "adapters" / name / "adapter_model.safetensors").read_bytes()
        assert source["files"]["adapter_model.safetensors"]["sha256"] == hashlib.sha256(local).hexdigest()


def test_a_registry_that_keeps_failing_exits_2(oci_registry, tiny_store, tmp_path):
    oci_registry.push_artifact("retry/a", "v1", files_of(tiny_store / "adapters" / "a"))
    oci_registry.push_artifact("retry/b", "v1", files_of(tiny_store / "adapters" / "b"))
    faults = Faults(cut={"/retry/b/blobs/": 1000})
    with flaky_proxy(oci_registry.host, faults) as proxy:
        (code, log, result), _ = _merge_through(proxy, tmp_path)
    assert code == 2 and result["field"] == "spec.adapters[1].uri", log
    assert "broke off (3 attempts)" in result["message"]
    assert len(faults.injected) == 3  # exactly the attempts promised, then it gives up
