"""Issue 6 benchmark: merge speed with Llama-2-7B shapes, against PEFT's add_weighted_adapter(ties_svd).

Writes synthetic PEFT adapter folders (4 adapters, rank 16, random non-zero A and B on q/k/v/o/gate/up/
down of hidden 4096 / intermediate 11008) with the project's own AdapterWriter, then for each method:
- end to end: the project's real runner (read + validate + merge + refactor to rank 16 + write +
  manifest), from a warm page cache, with peak GPU memory;
- merge compute: merge_modules alone on factors already in memory;
- GB/s per pass: the bytes of one read of every adapter's dense task vector (N x sum(out*in) x 4 B)
  over the merge-compute seconds, and how many such passes the device's copy bandwidth would allow;
- error vs optimal: max over sampled modules of (error of the written rank-16 factors) / (error of the
  optimal rank-16 truncated SVD of the exact merged delta);
- PEFT ties_svd on a slice of layers, scaled to the full layer count, and the ratio to it.
A CPU section runs the project's CPU path on a 2-layer slice in a subprocess (peak RSS) and PEFT on CPU.

    python bench/merge_speed.py                      # 32 layers, GPU rows + 8-layer memory row + CPU rows
    python bench/merge_speed.py --layers 4 --skip-cpu
Not a test: it prints a table (and --json writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from merge_worker.inputs.adapters import iter_module_factors, plan_modules, read_adapter
from merge_worker.output.adapter_writer import AdapterWriter
from merge_worker.factors import MergedModule
from merge_worker.merge_engine import merge_dense, merge_modules
from merge_worker.run import merge_params, run_merge
from merge_worker.spec import parse_spec
from merge_worker.inputs.volumes import Volumes

SHAPES = {  # Llama-2-7B: module -> (out_features, in_features)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
METHODS = ("ties", "dare_ties", "magnitude_prune", "linear", "slerp")
N_ADAPTERS, RANK, DENSITY = 4, 16, 0.5
CLAIM = "bench"
GIB = 1 << 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_adapters(root: Path, layers: int, device: torch.device) -> list[str]:
    """Synthetic PEFT folders (cached under root); returns their paths relative to root."""
    paths = []
    for i in range(N_ADAPTERS):
        rel = f"adapters-{layers}L/adapter{i}"
        paths.append(rel)
        folder = root / rel
        if (folder / "adapter_config.json").exists():
            continue
        writer = AdapterWriter(folder, dtype=torch.float32, inputs_config={
            "base_model_name_or_path": "synthetic/llama-2-7b-shapes", "task_type": "CAUSAL_LM"})
        generator = torch.Generator(device=device).manual_seed(1000 + i)
        for layer in range(layers):
            for suffix, (out_f, in_f) in SHAPES.items():
                a = torch.randn(RANK, in_f, generator=generator, device=device) / in_f**0.5
                b = torch.randn(out_f, RANK, generator=generator, device=device) / RANK**0.5
                writer.add_module(f"model.layers.{layer}.{suffix}", "linear",
                                  MergedModule(b=b.cpu(), a=a.cpu(), relative_error=0.0))
        writer.close()
    return paths


def spec_for(method: str, adapter_paths: list[str], output: str) -> dict:
    paths = adapter_paths[:2] if method == "slerp" else adapter_paths
    parameters = {"density": DENSITY} if method in ("ties", "dare_ties", "magnitude_prune") else {}
    return {
        "volume": {"claimName": CLAIM},
        "adapters": [{"name": f"a{i}", "path": p, "weight": 1 / len(paths)} for i, p in enumerate(paths)],
        "method": method,
        "parameters": parameters,
        "output": {"path": output, "rank": RANK, "overwrite": True},
    }


def end_to_end(root: Path, spec: dict, device: torch.device) -> tuple[float, float, dict]:
    """Seconds and peak GPU GiB of the real runner, and its manifest."""
    parsed = parse_spec(spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    outcome = run_merge(parsed, Volumes({CLAIM: root}), device=device.type, print_out=lambda _: None,
                        tty=False)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return seconds, peak, outcome.manifest


def loaded_modules(root: Path, spec: dict) -> list:
    adapters = [read_adapter(root / a["path"]) for a in spec["adapters"]]
    return list(iter_module_factors(adapters, plan_modules(adapters)))


def merge_compute(modules: list, spec: dict, device: torch.device) -> float:
    """Seconds of merge_modules alone (factors already in host memory)."""
    params = merge_params(parse_spec(spec))
    sync(device)
    start = time.perf_counter()
    for _ in merge_modules(iter(modules), params, rank=RANK, energy=0.99, device=device):
        pass
    sync(device)
    return time.perf_counter() - start


def stage_seconds(modules: list, spec: dict, device: torch.device) -> dict[str, float]:
    """Where ties' merge compute goes: the engine's stages timed one module at a time."""
    from merge_worker.merge_engine import _stage, _task_vectors
    from merge_worker.methods import make_method
    from merge_worker.methods.sparse_merge import merge_kept
    from merge_worker.refactor import factor_dense
    from merge_worker.trim import magnitude_thresholds

    params = merge_params(parse_spec(spec))
    method = make_method(params, len(spec["adapters"]))
    stages = dict.fromkeys(
        ("stage factors (host)", "task vectors", "trim thresholds", "sparse merge", "rank-16 refactor"), 0.0)

    def timed(stage, fn, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        sync(device)
        stages[stage] += time.perf_counter() - start
        return value

    for module in modules:
        staged = timed("stage factors (host)", _stage, [module], method.n_adapters, device, torch.float32)
        taus = timed("task vectors", _task_vectors, staged, device)
        thresholds = timed("trim thresholds", magnitude_thresholds, taus, params.density)
        delta = timed("sparse merge", merge_kept, taus, thresholds, params.weights, params.lambda_, ties=True)
        timed("rank-16 refactor", factor_dense, delta, RANK, 0.99)
    return stages


def error_vs_optimal(root: Path, spec: dict, modules: list, device: torch.device, sample: list[str]) -> float:
    """Max over `sample` of (error of the written factors) / (optimal rank-RANK error)."""
    params = merge_params(parse_spec(spec))
    written = read_adapter(root / spec["output"]["path"])
    by_name = dict(modules)
    worst = 0.0
    for name in sample:
        taus = [None if f is None else f.scale * (f.b.to(device) @ f.a.to(device)) for f in by_name[name]]
        delta = merge_dense(taus, params, key=name)
        s = torch.linalg.svdvals(delta.double())
        optimal = float(s[RANK:].norm() / s.norm())
        got = written.factors(name)
        ours = float((delta - got.scale * (got.b.to(device) @ got.a.to(device))).norm() / delta.norm())
        worst = max(worst, ours / optimal)
    return worst


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (bytes read + written)."""
    x = torch.empty(512 << 20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 5 * 2 * x.numel() * 4 / (time.perf_counter() - start) / 1e9


def pass_bytes(layers: int, n_adapters: int) -> int:
    return n_adapters * layers * sum(o * i for o, i in SHAPES.values()) * 4


def peft_ties_svd_seconds(root: Path, adapter_paths: list[str], layers: int, suffixes: list[str],
                          device: torch.device) -> float:
    """PEFT add_weighted_adapter(ties_svd) on the first `layers` layers, `suffixes` modules only."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=SHAPES["self_attn.q_proj"][1], intermediate_size=SHAPES["mlp.up_proj"][0],
                         num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=256)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    targets = [s.split(".")[1] for s in suffixes]
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets)
    names = [f"a{i}" for i in range(len(adapter_paths))]
    model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    for name, rel in zip(names, adapter_paths):
        ours = read_adapter(root / rel)
        for layer in range(layers):
            for suffix in suffixes:
                f = ours.factors(f"model.layers.{layer}.{suffix}")
                module = model.get_submodule(f"base_model.model.model.layers.{layer}.{suffix}")
                module.lora_A[name].weight.data.copy_(f.a)
                module.lora_B[name].weight.data.copy_(f.b)
    sync(device)
    start = time.perf_counter()
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged",
                               combination_type="ties_svd", density=DENSITY, svd_rank=RANK)
    sync(device)
    return time.perf_counter() - start


def peft_per_layer_seconds(root: Path, adapter_paths: list[str], device: torch.device, layers: int,
                           by_type: bool) -> float:
    """PEFT seconds per layer: measured on `layers` layers, or (by_type, for slow CPUs) from one
    4096x4096 and one 4096x11008 module, weighted 4:3 as in a Llama layer."""
    if not by_type:
        return peft_ties_svd_seconds(root, adapter_paths, layers, list(SHAPES), device) / layers
    square = peft_ties_svd_seconds(root, adapter_paths, 1, ["self_attn.q_proj"], device)
    wide = peft_ties_svd_seconds(root, adapter_paths, 1, ["mlp.down_proj"], device)
    return 4 * square + 3 * wide


def cpu_row(root: Path, adapter_paths: list[str]) -> dict:
    """Runs in a subprocess: the CPU end to end on the given adapters, with this process's peak RSS."""
    spec = spec_for("ties", adapter_paths, "out/cpu-ties")
    seconds, _, manifest = end_to_end(root, spec, torch.device("cpu"))
    return {"seconds": seconds, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
            "modules": len(manifest["modules"])}


def run_cpu_subprocess(root: Path, layers: int) -> dict:
    command = [sys.executable, __file__, "--cpu-row", "--root", str(root), "--layers", str(layers)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    header = " | ".join(title for title, _, _ in columns)
    lines = [header, " | ".join("---" for _ in columns)]
    for row in rows:
        lines.append(" | ".join(
            (fmt.format(row[key]) if row.get(key) is not None else "-") for _, key, fmt in columns))
    return "\n".join(lines)


COLUMNS = [
    ("row", "row", "{}"), ("layers", "layers", "{}"), ("end to end s", "e2e", "{:.2f}"),
    ("merge compute s", "compute", "{:.2f}"), ("GB/s per pass", "gbps", "{:.0f}"),
    ("passes", "passes", "{:.0f}"), ("peak GPU GiB", "peak", "{:.2f}"),
    ("error / optimal", "err_ratio", "{:.4f}"), ("PEFT s (scaled)", "peft", "{:.1f}"),
    ("x PEFT (compute)", "x_peft", "{:.0f}"), ("x PEFT (end to end)", "x_peft_e2e", "{:.0f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--memory-layers", type=int, default=8, help="second layer count for the memory check")
    parser.add_argument("--peft-layers", type=int, default=1, help="layers PEFT runs on the GPU (scaled up)")
    parser.add_argument("--cpu-layers", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--stages", action="store_true", help="also time ties' stages separately")
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cpu-row", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cpu_row:  # the subprocess of run_cpu_subprocess
        print(json.dumps(cpu_row(args.root, make_adapters(args.root, args.layers, torch.device("cpu")))))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="merge-speed-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"copy bandwidth {bandwidth or 0:.0f} GB/s; work folder {root}", flush=True)
    full = make_adapters(root, args.layers, device)
    small = make_adapters(root, args.memory_layers, device)
    end_to_end(root, spec_for("ties", small, "out/warmup"), device)  # CUDA context, kernels, handles

    sample = [f"model.layers.0.{s}" for s in ("self_attn.q_proj", "mlp.down_proj")]
    for method in args.methods.split(","):
        spec = spec_for(method, full, f"out/{method}")
        e2e, peak, manifest = end_to_end(root, spec, device)
        modules = loaded_modules(root, spec)
        compute = merge_compute(modules, spec, device)
        n = len(spec["adapters"])
        gbps = pass_bytes(args.layers, n) / compute / 1e9
        rows.append({
            "row": method, "layers": args.layers, "e2e": e2e, "compute": compute, "gbps": gbps,
            "passes": bandwidth / gbps if bandwidth else None, "peak": peak,
            "err_ratio": error_vs_optimal(root, spec, modules, device, sample),
            "max_error": max(m["relativeError"] for m in manifest["modules"]),
        })
        print(f"{method}: {rows[-1]}", flush=True)
        if method == "ties" and args.stages:
            print(f"ties stages, one module at a time: {stage_seconds(modules, spec, device)}", flush=True)
    e2e, peak, _ = end_to_end(root, spec_for("ties", small, "out/ties-small"), device)
    rows.append({"row": "ties", "layers": args.memory_layers, "e2e": e2e, "peak": peak})

    if not args.skip_peft:
        peft = peft_per_layer_seconds(root, full, device, args.peft_layers, by_type=False) * args.layers
        for row in rows:
            if row["row"] == "ties" and row["layers"] == args.layers:
                row.update(peft=peft, x_peft=peft / row["compute"], x_peft_e2e=peft / row["e2e"])
    if not args.skip_cpu:
        cpu_paths = make_adapters(root, args.cpu_layers, torch.device("cpu"))
        ours = run_cpu_subprocess(root, args.cpu_layers)
        row = {"row": f"ties CPU (peak RSS {ours['rss_gib']:.2f} GiB)", "layers": args.cpu_layers,
               "e2e": ours["seconds"]}
        if not args.skip_peft:
            peft = peft_per_layer_seconds(root, cpu_paths, torch.device("cpu"), 1, by_type=True)
            row.update(peft=peft * args.cpu_layers, x_peft_e2e=peft * args.cpu_layers / ours["seconds"])
        rows.append(row)
    print()
    print(fmt_table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
