"""spec.registry.pushLayout: adapter-image pushes the output in the layout KAITO pulls adapters from.
Checked the way KAITO's puller reads an image (every layer unpacked in order, then data/ taken), by our
own source reader, and for the owner rule (the owner is a manifest annotation)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

from support.storage_cli import cli, files_of, spec_of


def _unpacked(reg, repo: str, root):
    """As KAITO's puller reads an image: every layer unpacked in order into `root`; returns the
    manifest, its digest and the diff_ids of the layers."""
    manifest, digest = reg.manifest(repo, "v1")
    diff_ids = []
    for layer in manifest["layers"]:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        raw = gzip.decompress(reg.blob(repo, layer["digest"]))
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            tar.extractall(root, filter="data")
    return manifest, digest, diff_ids


def test_adapter_image_output_unpacks_like_kaito_reads_it(oci_registry, tiny_store, tmp_path):
    reg = oci_registry
    reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    out = f"oci://{reg.host}/kaito/merged:v1"
    spec = spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/b:v1", {"uri": out})
    spec["registry"]["pushLayout"] = "adapter-image"
    code, log, result = cli(tmp_path, spec, extra=("--owner", "team/dev/uid-1"))
    assert code == 0, log
    root = tmp_path / "rootfs"
    manifest, digest, diff_ids = _unpacked(reg, "kaito/merged", root)
    assert result["output"]["digest"] == digest
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert manifest["annotations"] == {"io.adaptermerge.owner": "team/dev/uid-1"}
    config = json.loads(reg.blob("kaito/merged", manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == diff_ids
    data = root / "data"
    assert {p.name for p in data.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "merge-manifest.json"}
    assert json.loads((data / "merge-manifest.json").read_text())["owner"]["uid"] == "uid-1"

    # Our own reader takes it as a source (the image layout), and another resource may not replace it.
    again = spec_of(out, f"oci://{reg.host}/adapters/b:v1", {"uri": f"oci://{reg.host}/kaito/merged:v1",
                                                            "overwrite": True})
    again["registry"]["pushLayout"] = "adapter-image"
    code, log, result = cli(tmp_path, again, command="validate", extra=("--owner", "team/other/uid-2"))
    assert code == 2 and "belongs to" in log, log
    again["output"]["uri"] = f"oci://{reg.host}/kaito/remerged:v1"
    code, log, result = cli(tmp_path, again)
    assert code == 0, log
    _unpacked(reg, "kaito/remerged", tmp_path / "rootfs2")
    source = json.loads((tmp_path / "rootfs2" / "data" / "merge-manifest.json").read_text())["sources"][0]
    assert (source["uri"], source["digest"], source["layout"]) == (out, digest, "image")
