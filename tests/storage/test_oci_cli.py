"""Merges through the real `adaptermerge` CLI whose adapters come from, and whose output is pushed to, a
real OCI registry (the CNCF distribution registry, tests/support/oci_registry.py): ORAS artifacts and the
adapter image layout (files under /data), checked blobs, safe tar extraction, tag overwrite rules."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from support.storage_cli import TITLE, cli, files_of, pulled, spec_of
from support.oci_registry import digest_of, tar_of


def test_artifacts_merge_into_a_pushed_artifact(oci_registry, tiny_store, tmp_path):
    reg = oci_registry
    a_digest = reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    out = f"oci://{reg.host}/merged/ab:v1"
    spec = spec_of(f"oci://{reg.host}/adapters/a@{a_digest}", f"oci://{reg.host}/adapters/b:v1", {"uri": out})
    code, log, result = cli(tmp_path, spec)
    assert code == 0, log

    manifest, digest, files = pulled(reg, "merged/ab", "v1")
    assert result["output"] == {"uri": out, "format": "adapter", "digest": digest}
    assert manifest["artifactType"] == "application/vnd.adaptermerge.adapter.v1"
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "merge-manifest.json"}
    for layer in manifest["layers"]:  # each layer is exactly the file it names
        assert digest_of(files[layer["annotations"][TITLE]]) == layer["digest"]
    merge_manifest = json.loads(files["merge-manifest.json"])
    sources = {s["uri"]: s for s in merge_manifest["sources"]}
    a = sources[f"oci://{reg.host}/adapters/a@{a_digest}"]
    assert a["digest"] == a_digest and a["layout"] == "oras"
    local = (tiny_store / "adapters" / "a" / "adapter_model.safetensors").read_bytes()
    assert a["files"]["adapter_model.safetensors"]["sha256"] == hashlib.sha256(local).hexdigest()
    assert sources[f"oci://{reg.host}/adapters/b:v1"]["digest"] == reg.manifest("adapters/b", "v1")[1]

    # The tag exists now: refused before merging, unless overwrite is set; then the tag moves.
    code, log, result = cli(tmp_path, spec)
    assert code == 2 and result["field"] == "spec.output.uri" and "already exists" in result["message"], log
    assert reg.manifest("merged/ab", "v1")[1] == digest
    spec["output"]["overwrite"] = True
    spec["method"] = "cat"
    del spec["output"]["rank"]
    code, log, result = cli(tmp_path, spec)
    assert code == 0, log
    new_manifest, new_digest, new_files = pulled(reg, "merged/ab", "v1")
    assert new_digest != digest and result["output"]["digest"] == new_digest
    assert new_files["adapter_model.safetensors"] != files["adapter_model.safetensors"]


def test_adapter_image_layout_and_output_to_a_volume(oci_registry, tiny_store, tmp_path):
    """The layout KAITO builds and pulls: a tar layer with the adapter under data/, here on top of a base
    layer whose links and devices outside data/ are skipped, never written."""
    reg = oci_registry
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w") as tar:
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        device = tarfile.TarInfo("dev/null")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
    adapter = {f"data/{n}": c for n, c in files_of(tiny_store / "adapters" / "a").items()}
    image_digest = reg.push_image("kaito/a", "v1", [base.getvalue(), tar_of(adapter)])
    reg.push_artifact("adapters/b", "img", files_of(tiny_store / "adapters" / "b"))
    out = tmp_path / "out"
    out.mkdir()
    spec = spec_of(f"oci://{reg.host}/kaito/a:v1", f"oci://{reg.host}/adapters/b:img",
                 {"path": "merged", "claimName": "out"})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code, log, _ = cli(tmp_path, spec, {"TMPDIR": str(scratch)}, extra=("--volume", f"out={out}"))
    assert code == 0, log
    manifest = json.loads((out / "merged" / "merge-manifest.json").read_text())
    a = manifest["sources"][0]
    assert a["digest"] == image_digest and a["layout"] == "image"
    assert set(a["files"]) == set(files_of(tiny_store / "adapters" / "a"))
    assert manifest["inputs"][0]["files"]["adapter_model.safetensors"] == a["files"]["adapter_model.safetensors"]["sha256"]
    assert list(scratch.iterdir()) == []  # the downloads are removed after the run


def _hostile_layer(kind: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        member = tarfile.TarInfo({"dotdot": "data/../../escaped", "absolute": "/data/adapter_config.json"}
                                 .get(kind, "data/adapter_config.json"))
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            member.type, member.linkname = tarfile.LNKTYPE, "etc/passwd"
        elif kind == "device":
            member.type, member.devmajor, member.devminor = tarfile.BLKTYPE, 8, 0
        else:
            member.size = 2
        tar.addfile(member, io.BytesIO(b"{}") if member.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize(("kind", "words"), [("dotdot", "climbs with '..'"), ("absolute", "is absolute"),
                                             ("symlink", "a link or a device"), ("hardlink", "a link or a device"),
                                             ("device", "a link or a device")])
def test_hostile_tar_entries_are_refused(oci_registry, tiny_store, tmp_path, kind, words):
    reg = oci_registry
    reg.push_image("hostile/a", kind, [_hostile_layer(kind)])
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spec = spec_of(f"oci://{reg.host}/hostile/a:{kind}", f"oci://{reg.host}/adapters/b:v1",
                 {"uri": f"oci://{reg.host}/merged/hostile:{kind}"})
    code, log, result = cli(tmp_path, spec, {"TMPDIR": str(scratch)}, command="validate")
    assert code == 2 and "spec.adapters[0].uri" in log and words in log, log
    assert list(scratch.iterdir()) == [] and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize(("case", "field", "words"), [
    ("missing-tag", "spec.adapters[1].uri", "not found"),
    ("missing-repo", "spec.adapters[0].uri", "not found"),
    ("missing-digest", "spec.adapters[0].uri", "not found"),
    ("closed-port", "spec.adapters[0].uri", "cannot reach"),
    ("https-to-http", "spec.adapters[0].uri", "insecure"),
    ("digest-output", "spec.output.uri", "tag"),
    ("not-an-adapter", "spec.adapters[0].uri", "/data"),
])
def test_bad_references_exit_2_naming_the_field(oci_registry, tiny_store, tmp_path, case, field, words):
    reg = oci_registry
    reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    a, b = f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/a:v1"
    spec = spec_of(a, b, {"uri": f"oci://{reg.host}/merged/bad:{case}"})
    if case == "missing-tag":
        spec["adapters"][1]["uri"] = f"oci://{reg.host}/adapters/a:no-such-tag"
    elif case == "missing-repo":
        spec["adapters"][0]["uri"] = f"oci://{reg.host}/no/such/repo:v1"
    elif case == "missing-digest":
        spec["adapters"][0]["uri"] = f"oci://{reg.host}/adapters/a@sha256:{'0' * 64}"
    elif case == "closed-port":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec["adapters"][0]["uri"] = f"oci://127.0.0.1:{port}/adapters/a:v1"
    elif case == "https-to-http":
        del spec["registry"]
    elif case == "digest-output":
        spec["output"]["uri"] = f"oci://{reg.host}/merged/bad@sha256:{'0' * 64}"
    elif case == "not-an-adapter":
        reg.push_image("images/plain", "v1", [tar_of({"etc/os-release": b"x"})])
        spec["adapters"][0]["uri"] = f"oci://{reg.host}/images/plain:v1"
    code, log, result = cli(tmp_path, spec)
    assert code == 2, log
    assert result["field"] == field, result
    assert words in result["message"], result
    with pytest.raises(Exception):  # nothing was pushed
        reg.manifest("merged/bad", case)


def _blob_file(registry, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return registry.data / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


def test_a_blob_that_does_not_match_its_digest_is_refused(oci_registry, tiny_store, tmp_path):
    reg = oci_registry
    files = files_of(tiny_store / "adapters" / "a")
    files["adapter_model.safetensors"] += b"unique-to-this-test"  # a blob no other test shares
    reg.push_artifact("damaged/a", "v1", files)
    manifest, _ = reg.manifest("damaged/a", "v1")
    layer = next(lay for lay in manifest["layers"] if lay["annotations"][TITLE] == "adapter_model.safetensors")
    stored = _blob_file(reg, layer["digest"])
    content = bytearray(stored.read_bytes())
    content[-1] ^= 0xFF  # same size, other bytes, behind the registry's back
    stored.write_bytes(bytes(content))
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    spec = spec_of(f"oci://{reg.host}/damaged/a:v1", f"oci://{reg.host}/adapters/b:v1",
                 {"uri": f"oci://{reg.host}/merged/damaged:v1"})
    code, log, result = cli(tmp_path, spec)
    assert code == 2 and result["field"] == "spec.adapters[0].uri", log
    assert "does not match its digest" in result["message"]


def test_download_bound_counts_blobs_and_unpacked_layers(oci_registry, tiny_store, tmp_path):
    reg = oci_registry
    reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    # 8 MiB of zeros: a small gzip layer that unpacks far beyond the bound below.
    reg.push_image("bomb/a", "v1", [tar_of({"data/adapter_model.safetensors": bytes(8 << 20)})])
    spec = spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/a:v1",
                 {"uri": f"oci://{reg.host}/merged/bound:v1"}, storage={"maxDownloadBytes": 1000})
    code, log, _ = cli(tmp_path, spec, command="validate")
    assert code == 2 and "spec.adapters[0].uri" in log and "maxDownloadBytes" in log, log
    spec["storage"]["maxDownloadBytes"] = 1 << 20
    spec["adapters"][1]["uri"] = f"oci://{reg.host}/bomb/a:v1"
    code, log, _ = cli(tmp_path, spec, command="validate")
    assert code == 2 and "spec.adapters[1].uri" in log and "maxDownloadBytes" in log, log
    spec["adapters"][1]["uri"] = f"oci://{reg.host}/adapters/a:v1"
    code, log, _ = cli(tmp_path, spec, command="validate")
    assert code == 0 and f"output adapter at oci://{reg.host}/merged/bound:v1" in log, log


def test_base_model_and_dataset_from_the_registry(oci_registry, tiny_store, tmp_path):
    reg = oci_registry
    reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    reg.push_artifact("models/tiny", "v1", files_of(tiny_store / "models" / "tiny"))
    reg.push_artifact("datasets/a", "bad", {"a.jsonl": b'{"prompt": "x", "completion": "y"}\n{"prompt": 3}\n'})
    spec = spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/b:v1",
                 {"uri": f"oci://{reg.host}/merged/eval:v1"}, baseModel={"uri": f"oci://{reg.host}/models/tiny:v1"},
                 evaluation={"datasets": [{"name": "a", "adapter": "a", "uri": f"oci://{reg.host}/datasets/a:bad"}]})
    # The reader's own error about the downloaded file names the spec's uri field, not the scratch path.
    code, log, _ = cli(tmp_path, spec, command="validate")
    assert code == 2 and "spec.evaluation.datasets[0].uri" in log and "line 2" in log, log
    reg.push_artifact("datasets/a", "good", {"a.jsonl": b'{"prompt": "x", "completion": "y"}\n'})
    spec["evaluation"]["datasets"][0]["uri"] = f"oci://{reg.host}/datasets/a:good"
    code, log, _ = cli(tmp_path, spec, command="validate")
    assert code == 0, log


def test_the_tag_owner_decides_like_a_volume_output(oci_registry, tiny_store, tmp_path):
    """--owner on an oci:// output: the owner recorded in the tagged artifact's merge-manifest.json is
    checked as for a volume output (docs/cli.md, "Who may replace an output")."""
    reg = oci_registry
    reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    spec = spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/b:v1",
                   {"uri": f"oci://{reg.host}/merged/owned:v1"})
    code, log, _ = cli(tmp_path, spec, extra=("--owner", "team/dev/uid-1"))
    assert code == 0, log
    first = reg.manifest("merged/owned", "v1")[1]
    spec["output"]["overwrite"] = True  # even so, another resource's output is never replaced
    code, log, result = cli(tmp_path, spec, extra=("--owner", "team/other/uid-2"))
    assert code == 2 and result["reason"] == "OutputConflict" and result["field"] == "spec.output.uri", log
    assert reg.manifest("merged/owned", "v1")[1] == first
    del spec["output"]["overwrite"]  # a new generation of the owner replaces its own output
    spec["method"] = "cat"
    del spec["output"]["rank"]
    code, log, result = cli(tmp_path, spec, extra=("--owner", "team/dev/uid-1"))
    assert code == 0, log
    assert reg.manifest("merged/owned", "v1")[1] == result["output"]["digest"] != first
