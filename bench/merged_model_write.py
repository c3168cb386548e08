"""The merged-model writer alone: how fast base + delta goes from a bf16 checkpoint to bf16 shards.

Writes a random Llama-shaped bf16 base under --root (bench/job_speed.py's generator), then runs
merge_worker.output.merged_model_writer.write_merged_model in this process with every linear module merged and
a cheap delta (one precomputed random tensor per shape, on --device), so the table shows the writer's
reading, adding, casting and writing, not the merge method. Page cache warm (the base is read once
first). Prints seconds, output GB/s and peak anonymous RSS growth for each --threads value.

    PYTHONPATH=. python bench/merged_model_write.py --root /tmp/mmw --shape 1b --threads 1,8
Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_speed import ATTENTION, GIB, MLP, SHAPES, Shape, make_base  # noqa: E402

from merge_worker.inputs.base_weights import BaseWeights  # noqa: E402
from merge_worker.output.merged_model_writer import write_merged_model  # noqa: E402

SIZES = {"1b": Shape(2048, 8192, 16, 32, 8, 32000, tied=False), **SHAPES}


def anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    def __init__(self) -> None:
        self.start = self.peak = anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anon_rss())

    def growth(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.start) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SIZES), default="1b")
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SIZES[args.shape]
    folder = args.root / f"base-{args.shape}"
    make_base(folder, shape, device)
    base = BaseWeights(folder)
    for path in base.shards:  # warm page cache, as in the fresh-process rows
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    modules = {f"model.layers.{i}.{s}": "linear" for i in range(shape.layers) for s in ATTENTION + MLP}
    deltas = {}
    for suffix in ATTENTION + MLP:
        out_f, in_f = shape.module_shape(suffix)
        deltas[suffix] = torch.randn(out_f, in_f, device=device) * 1e-4

    def delta_for(module: str) -> torch.Tensor:
        return deltas[module.split(".", 3)[3]]

    print(f"base {args.shape}: {sum(p.stat().st_size for p in base.shards) / GIB:.2f} GiB; device {device}")
    print("| threads | seconds | output GB/s | peak anon RSS growth GiB |")
    print("| --- | --- | --- | --- |")
    for threads in [int(t) for t in args.threads.split(",")]:
        out = args.root / "out"
        shutil.rmtree(out, ignore_errors=True)
        peak = PeakAnon()
        start = time.perf_counter()
        files = write_merged_model(out, base, modules, delta_for, {}, dtype=torch.bfloat16, threads=threads,
                                   pin_memory=device.type == "cuda")
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in files)
        print(f"| {threads} | {seconds:.2f} | {size / seconds / 1e9:.2f} | {peak.growth():.2f} |", flush=True)


if __name__ == "__main__":
    main()
