"""Where the time of one merge goes: torch.profiler over the merge compute, cProfile over the end to end.

Uses merge_speed.py's synthetic Llama-2-7B-shaped adapters (written under --root on first use).

    python bench/profile_merge.py --layers 32 --root /tmp/msb [--method ties] [--out folder]
Prints the top operators by device time and by host time, the share of the wall time the device was
busy, and the top Python functions of the end-to-end run; --out also keeps a Chrome trace.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import merge_speed
from merge_worker.merge_engine import merge_modules
from merge_worker.run import merge_params
from merge_worker.spec import parse_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="folder for trace.json")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = merge_speed.make_adapters(args.root, args.layers, device)
    spec = merge_speed.spec_for(args.method, paths, f"out/profile-{args.method}")
    modules = merge_speed.loaded_modules(args.root, spec)
    params = merge_params(parse_spec(spec))
    merge_speed.merge_compute(modules, spec, device)  # warm-up: kernels compiled, allocator primed

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in merge_modules(iter(modules), params, rank=merge_speed.RANK, energy=0.99, device=device):
            pass
        merge_speed.sync(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e6
        print(f"merge compute under the profiler: {wall:.3f} s wall, device busy {busy:.3f} s "
              f"({100 * busy / wall:.0f}%)")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.out / "trace.json"))

    merge_speed.end_to_end(args.root, spec, device)  # warm page cache
    profiler = cProfile.Profile()
    profiler.enable()
    seconds, _, _ = merge_speed.end_to_end(args.root, spec, device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.rows * 2)
    print(f"end to end under cProfile: {seconds:.3f} s")
    print(text.getvalue())


if __name__ == "__main__":
    main()
