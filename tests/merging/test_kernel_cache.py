"""Triton kernels baked ahead of time (merge_worker/kernel_cache.py): the recorded specializations still
name the repository's kernels, baking them needs no GPU and files every kernel and its host launcher
in the cache, and a worker's start copies the baked entries into its writable cache without touching
what is already there. That the running process then compiles nothing is measured on a GPU
(bench/job_speed.py's "image: baked kernels" row, docs/merging.md)."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess

import pytest

from merge_worker import kernel_cache


def test_seed_copies_the_architectures_entries_and_keeps_existing(tmp_path, monkeypatch):
    baked, cache = tmp_path / "baked", tmp_path / "cache"
    for arch, names in ((90, ("AAA", "BBB")), (80, ("CCC",))):
        for name in names:
            (kernel_cache.arch_folder(baked, arch) / name).mkdir(parents=True)
            (kernel_cache.arch_folder(baked, arch) / name / "k.cubin").write_bytes(b"baked " + name.encode())
    (cache / "BBB").mkdir(parents=True)
    (cache / "BBB" / "k.cubin").write_bytes(b"compiled here")
    monkeypatch.setenv(kernel_cache.BAKED_ENV, str(baked))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))

    assert kernel_cache.seed(90) == 1
    assert (cache / "AAA" / "k.cubin").read_bytes() == b"baked AAA"
    assert (cache / "BBB" / "k.cubin").read_bytes() == b"compiled here"
    assert not (cache / "CCC").exists(), "another architecture's kernels stay behind"
    # a copy, not a link: Triton may rewrite an entry, and the image's folder is read-only
    assert not (cache / "AAA").is_symlink()
    (cache / "AAA" / "k.cubin").write_bytes(b"rewritten")
    assert (kernel_cache.arch_folder(baked, 90) / "AAA" / "k.cubin").read_bytes() == b"baked AAA"
    assert kernel_cache.seed(90) == 0  # a second start copies nothing again
    assert sorted(p.name for p in cache.iterdir()) == ["AAA", "BBB"]  # no partial copies left
    assert kernel_cache.seed(75) == 0  # an architecture that was not baked compiles at run time


def test_seed_without_a_baked_folder_or_a_gpu_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(kernel_cache.BAKED_ENV, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert kernel_cache.seed(90) == 0
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv(kernel_cache.BAKED_ENV, str(tmp_path / "missing"))
    assert kernel_cache.seed(90) == 0
    import torch

    assert kernel_cache.seed_for(torch.device("cpu")) == 0


def _recorded() -> list[dict]:
    return json.loads(kernel_cache.RECORDED.read_text())


def test_recorded_kernels_are_the_repository_kernels():
    pytest.importorskip("triton")
    records = _recorded()
    names = {r["name"] for r in records}
    # every jitted kernel of the merge has a recorded specialization
    assert {"merge_worker.trim._count", "merge_worker.trim._gather", "merge_worker.methods.sparse_merge._fused"} <= names
    for record in records:
        fn = kernel_cache.jit_function(record["name"])
        assert list(record["signature"]) == list(inspect.signature(fn.fn).parameters), record["name"]


def test_unknown_kernel_name_is_refused():
    pytest.importorskip("triton")
    with pytest.raises(LookupError, match="merge_worker.trim._nope"):
        kernel_cache.jit_function("merge_worker.trim._nope")


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("readelf") is None,
                    reason="Triton's host modules need a C compiler (readelf reads what they link)")
def test_bake_files_every_kernel_and_launcher_without_a_gpu(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))
    records = _recorded()
    expected = sum(len(kernel_cache._variants(r)) for r in records)
    assert expected > len(records)  # the fused merge for every adapter count
    assert kernel_cache.bake(tmp_path / "baked", (90,), records, workers=2) == expected
    files = [p for p in kernel_cache.arch_folder(tmp_path / "baked", 90).rglob("*") if p.is_file()]
    assert sum(p.suffix == ".cubin" for p in files) == expected
    for record in records:
        short = record["name"].rpartition(".")[2]
        assert any(p.name == f"{short}.cubin" for p in files), short
    modules = [p for p in files if p.suffix == ".so"]
    assert any(p.name.startswith("cuda_utils") for p in modules)
    assert any(p.name.startswith("__triton_launcher") for p in modules)
    for module in modules:  # linked against libcuda.so.1 although the build machine has no driver
        needed = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True).stdout
        assert "[libcuda.so.1]" in needed, module.name
