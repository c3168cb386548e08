"""Both images, built from the Dockerfile by scripts/images/build.sh (cached: minutes the first time,
seconds after), run here with buildah as a smoke test: the user, the CLI, the operator's entrypoint, and
the worker's one CUDA stack (torch's own CUDA 13 libraries; Triton can build its launcher)."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "images" / "build.sh"
RUN = REPO / "scripts" / "images" / "run.sh"


@cache
def built() -> dict[str, tuple[str, Path]]:
    """target -> (image, docker-archive), from the build script's last lines."""
    done = subprocess.run([str(BUILD), "operator", "worker"], capture_output=True, text=True)
    assert done.returncode == 0, f"scripts/images/build.sh failed:\n{done.stderr[-6000:]}"
    lines = done.stdout.strip().splitlines()[-2:]
    images = {target: (image, Path(archive)) for target, image, archive in (line.split() for line in lines)}
    assert set(images) == {"operator", "worker"}, lines
    return images


def in_image(target: str, *command: str) -> subprocess.CompletedProcess:
    image, _ = built()[target]
    return subprocess.run([str(RUN), image, *command], capture_output=True, text=True)


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_archive_holds_the_image(target: str):
    """What `ctr -n k8s.io images import` reads: a docker-archive whose manifest names the image."""
    image, archive = built()[target]
    listing = subprocess.run(["tar", "-xOf", str(archive), "manifest.json"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert f'"{image}"' in listing.stdout


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_runs_as_uid_10001_and_prints_the_version(target: str):
    assert in_image(target, "id", "-u").stdout.strip() == "10001"
    version = in_image(target, "adaptermerge", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("adaptermerge ")


def test_operator_entrypoint_runs_and_has_no_torch():
    done = in_image("operator", "adaptermerge", "operator", "--help")
    assert done.returncode == 0, done.stderr
    assert "--liveness" in done.stdout  # kopf run's options: the chart passes --liveness
    no_torch = in_image("operator", "python3", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


def test_worker_has_one_cuda_stack():
    """torch reports the CUDA of its own nvidia-* wheels, and no other CUDA runtime is in the image."""
    done = in_image("worker", "python3", "-c",
                    "import torch, glob; print(torch.__version__, torch.version.cuda); "
                    "print(len(glob.glob('/usr/local/cuda*') + glob.glob('/usr/lib/x86_64-linux-gnu/libcudart*')))")
    assert done.returncode == 0, done.stderr
    version, extra_cuda = done.stdout.split("\n")[:2]
    assert version.endswith(" 13.0") and "+cu130" in version, version
    assert extra_cuda == "0"


def test_worker_triton_can_build_its_launcher():
    """Triton compiles a C launcher with gcc and the Python headers on its first GPU kernel; without
    them every fused merge kernel fails on a GPU node. Built here as the image's user into /tmp."""
    probe = ("from triton.runtime.build import compile_module_from_src\n"
             "src = '#include <Python.h>\\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"probe\"};\\n"
             "PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\\n'\n"
             "print(compile_module_from_src(src, 'probe').__name__)\n")
    done = in_image("worker", "python3", "-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "probe"


def test_worker_copies_its_baked_kernels_into_the_run_cache():
    """The image holds the merge's Triton kernels compiled for each listed GPU architecture and adapter
    count, with their C launchers (merge_worker/kernel_cache.py); a run on an H100/H200, as the image's
    user, copies that architecture's into its writable cache under /tmp."""
    probe = ("import json, os, pathlib\n"
             "from merge_worker import kernel_cache as k\n"
             "baked = pathlib.Path(os.environ[k.BAKED_ENV])\n"
             "files = [p.name for p in baked.rglob('*') if p.is_file()]\n"
             "kernels = sum(len(k._variants(r)) for r in json.loads(k.RECORDED.read_text()))\n"
             "print(sum(f.endswith('.cubin') for f in files) == kernels * len(k.DEFAULT_ARCHS),\n"
             "      any(f.startswith('__triton_launcher') for f in files), any(f.startswith('cuda_utils') for f in files))\n"
             "copied = k.seed(90)\n"
             "cache = pathlib.Path(os.environ['TRITON_CACHE_DIR'])\n"
             "print(copied == len(list(k.arch_folder(baked, 90).iterdir())) > 0,\n"
             "      not any(p.is_symlink() for p in cache.iterdir()))\n")
    done = in_image("worker", "python3", "-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True"] * 5, done.stdout


def test_worker_imports_from_compiled_bytecode():
    """pip compiled every module at install time, so a fresh pod does not compile torch's Python (about
    two seconds a process where the .pyc files are missing; the root filesystem is read-only, so it could
    not keep them either)."""
    probe = ("import importlib.util, os, torch, transformers, merge_worker.run\n"
             "mods = (torch, transformers, merge_worker.run)\n"
             "print([os.path.exists(importlib.util.cache_from_source(m.__file__)) for m in mods])\n")
    done = in_image("worker", "python3", "-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[True, True, True]", done.stdout
