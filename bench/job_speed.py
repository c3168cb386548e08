"""Issue 16 benchmark: what a Job pod waits for, in fresh `adaptermerge run` processes.

Builds, under --root, a random Llama-3.1-8B-shaped bf16 base (safetensors shards, config, a word-level
tokenizer) and three PEFT adapters (r8 and r16 on every linear module, r4 on attention only), then times
fresh worker processes (`python -m merge_worker.cli run`, what the image's `adaptermerge` entry point
runs) from process start to exit:
- cold adapter: TIES d=0.5 to a rank-32 adapter, no evaluation (the first run also compiles the Triton
  kernels into an empty cache; the later ones find them cached, as an image with a baked cache would);
- merged model: the same merge written as a full bf16 model (base + exact delta), with output GB/s and
  peak host memory (anonymous RSS, sampled) and peak GPU memory (nvidia-smi, sampled), on the 8B and on a
  3B shape, so "flat in the model size" is measured;
- evaluation: nf4 base (bf16 on a CPU), 3 datasets x 32 examples with exact match, where each dataset's
  completions are the base model's own greedy continuation of its prompt (the eos row of lm_head is zero,
  so nothing stops early): generation really runs to maxNewTokens for every row that stays on track;
- mergekit `ties` (mergekit-yaml with base+adapter references, --cuda --read-to-gpu --async-write) on
  the same 3B-shaped inputs in the same run, cold (empty LoRA cache) and warm, and the accuracy of both
  outputs against the exact TIES result (float64, on sampled modules), beside the bf16 rounding floor;
- warm merge compute: bench/merge_speed.py's ties row (4 x r16 Llama-2-7B shapes) in a subprocess;
- search (issue 15): a random ties search on the evaluation inputs, its trials per minute.

    PYTHONPATH=. python bench/job_speed.py --root /tmp/js            # the GPU table (8B + 3B)
    PYTHONPATH=. python bench/job_speed.py --root /tmp/js --scale tiny  # a minute on a CPU
Not a test: it prints a table against issue 16's targets (and --json writes the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # merge_worker, when run as a script from anywhere
CLAIM = "bench"
GIB = 1 << 30
SPECIAL = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}  # token ids; their lm_head rows are zero
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INIT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def module_shape(self, suffix: str) -> tuple[int, int]:
        """(out, in) of a linear module's weight."""
        kv = self.hidden // self.heads * self.kv_heads
        return {
            "self_attn.q_proj": (self.hidden, self.hidden), "self_attn.k_proj": (kv, self.hidden),
            "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, self.hidden),
            "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }[suffix]


SHAPES = {
    "8b": Shape(4096, 14336, 32, 32, 8, 128256, tied=False),  # Llama-3.1-8B
    "3b": Shape(3072, 8192, 28, 24, 8, 128256, tied=True),  # Llama-3.2-3B
    "tiny": Shape(256, 512, 2, 4, 2, 2048, tied=False),
    "tiny3": Shape(192, 384, 2, 4, 2, 2048, tied=True),
}
# name, rank, modules. make_adapters' `relative` (rms(B @ A) / rms(W)) is tiny for the 8B set (5e-5), so
# the adapters keep greedy generation on the base's continuation, and realistic (5%) for the 3B set, where
# the accuracy comparison needs deltas well above bf16 rounding.
ADAPTERS = (("r8", 8, ATTENTION + MLP), ("r16", 16, ATTENTION + MLP), ("r4attn", 4, ATTENTION))


# -- inputs ----------------------------------------------------------------------------------------------


def make_base(folder: Path, shape: Shape, device: torch.device, shard_bytes: int = 5 << 30) -> None:
    """A random bf16 Llama checkpoint in transformers' layout (cached: skipped when already complete)."""
    if (folder / "config.json").exists():
        return
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * INIT_STD).to(
            torch.bfloat16)

    def tensors():
        embed = normal(shape.vocab, shape.hidden)
        if shape.tied:  # the embedding is the output layer too
            embed[list(SPECIAL.values())] = 0
        yield "model.embed_tokens.weight", embed
        for layer in range(shape.layers):
            prefix = f"model.layers.{layer}."
            yield prefix + "input_layernorm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16)
            yield prefix + "post_attention_layernorm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16)
            for suffix in ATTENTION + MLP:
                yield f"{prefix}{suffix}.weight", normal(*shape.module_shape(suffix))
        yield "model.norm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16)
        if not shape.tied:
            head = normal(shape.vocab, shape.hidden)
            head[list(SPECIAL.values())] = 0  # eos (and the other specials) never win a greedy step
            yield "lm_head.weight", head

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        shards.append(list(current))
        save_file({k: v.cpu().contiguous() for k, v in current.items()},
                  str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
        current.clear()

    for name, tensor in tensors():
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
            size = 0
        current[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"part-{i}.safetensors").rename(tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=shape.tied, bos_token_id=SPECIAL["bos"],
        eos_token_id=SPECIAL["eos"], pad_token_id=SPECIAL["pad"], rope_theta=500000.0,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp)
    _write_tokenizer(tmp, shape.vocab)
    tmp.rename(folder)


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer: ids 0-3 are <unk> <s> </s> <pad>, the rest the words w4..w{vocab-1}, so
    text and ids map one to one (special tokens get names no word contains: they are matched inside text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {"<unk>": SPECIAL["unk"], "<s>": SPECIAL["bos"], "</s>": SPECIAL["eos"], "<pad>": SPECIAL["pad"]}
    words = names | {f"w{i}": i for i in range(len(SPECIAL), vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def make_adapters(root: Path, tag: str, shape: Shape, relative: float, device: torch.device) -> list[str]:
    """The three PEFT adapters (bf16, lora_alpha == r); delta rms = relative x the base weights' rms."""
    from merge_worker.output.adapter_writer import AdapterWriter
    from merge_worker.factors import MergedModule

    paths = []
    for k, (name, rank, suffixes) in enumerate(ADAPTERS):
        rel = f"adapters-{tag}/{name}"
        paths.append(rel)
        folder = root / rel
        if (folder / "adapter_config.json").exists():
            continue
        writer = AdapterWriter(folder, dtype=torch.bfloat16, inputs_config={
            "base_model_name_or_path": f"synthetic/{tag}", "task_type": "CAUSAL_LM"})
        generator = torch.Generator(device=device).manual_seed(100 + k)
        for layer in range(shape.layers):
            for suffix in suffixes:
                out_f, in_f = shape.module_shape(suffix)
                # rms(B @ A) = relative x INIT_STD, the base weights' rms
                a = torch.randn(rank, in_f, generator=generator, device=device)
                b = torch.randn(out_f, rank, generator=generator, device=device) * (relative * INIT_STD / rank**0.5)
                writer.add_module(f"model.layers.{layer}.{suffix}", "linear",
                                  MergedModule(b=b.cpu(), a=a.cpu(), relative_error=0.0))
        writer.close()
    return paths


def make_datasets(root: Path, base: str, device: torch.device, *, examples: int, prompt_tokens: int,
                  new_tokens: int, quantization: str) -> list[str]:
    """One JSONL per adapter: random prompts, completions = the base's own greedy continuation, generated
    exactly as the evaluation will (same quantization, one batch per dataset, equal-length prompts)."""
    from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

    rels = [f"eval-{Path(base).name}/{name}.jsonl" for name, _, _ in ADAPTERS]
    if all((root / rel).exists() for rel in rels):
        return rels
    tokenizer = load_tokenizer(root / base)
    model = load_causal_lm(root / base, quantization, device).model
    generator = torch.Generator().manual_seed(7)
    for rel in rels:
        prompts = torch.randint(len(SPECIAL), tokenizer.vocab_size, (examples, prompt_tokens), generator=generator)
        with torch.no_grad():
            out = model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=SPECIAL["pad"],
                                 eos_token_id=SPECIAL["eos"])
        lines = []
        for prompt, row in zip(prompts, out[:, prompt_tokens:].cpu()):
            lines.append(json.dumps({"prompt": tokenizer.decode(prompt.tolist()),
                                     "completion": tokenizer.decode(row.tolist(), skip_special_tokens=True)}))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(lines) + "\n")
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return rels


def write_spec(root: Path, name: str, *, base: str, adapters: list[str], output: str, fmt: str,
               datasets: list[str] | None = None, new_tokens: int = 64, quantization: str = "none",
               search: dict | None = None) -> Path:
    import yaml

    spec: dict = {
        "volume": {"claimName": CLAIM},
        "baseModel": {"path": base, "quantization": quantization},
        "adapters": [{"name": Path(p).name, "path": p} for p in adapters],
        "method": "ties",
        "parameters": {"density": 0.5},
        "output": {"path": output, "format": fmt, "overwrite": True,
                   **({"rank": 32} if fmt == "adapter" else {"dtype": "bfloat16"})},
    }
    if datasets:
        spec["evaluation"] = {"datasets": [
            {"name": Path(d).stem, "path": d, "adapter": Path(d).stem, "exactMatch": True, "maxExamples": 32}
            for d in datasets], "maxNewTokens": new_tokens}
    if search:
        spec["search"] = search
    path = root / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
                                    "metadata": {"name": name}, "spec": spec}))
    return path


# -- measuring a fresh process ---------------------------------------------------------------------------


class Sampler:
    """Peak anonymous RSS of a process tree (the process and its children) and GPU memory in use, sampled."""

    def __init__(self, pid: int, gpu: bool, interval: float = 0.05):
        self.pid, self.gpu, self.interval = pid, gpu, interval
        self.peak_anon = self.peak_rss = 0
        self.gpu_base = self.peak_gpu = None
        if gpu:
            self.gpu_base = _gpu_used_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            anon, rss = _tree_memory(self.pid)
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            if self.gpu and ticks % 4 == 0:  # nvidia-smi is slower to ask
                used = _gpu_used_mib()
                if used is not None:
                    self.peak_gpu = max(self.peak_gpu or 0, used)
            ticks += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        gpu = None
        if self.peak_gpu is not None and self.gpu_base is not None:
            gpu = (self.peak_gpu - self.gpu_base) / 1024
        return {"host_anon_gib": self.peak_anon / GIB, "host_rss_gib": self.peak_rss / GIB, "gpu_gib": gpu}


def _tree_memory(pid: int) -> tuple[int, int]:
    anon = rss = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return anon, rss


def _children(pid: int) -> list[int]:
    try:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
        return found + [g for c in found for g in _children(c)]
    except OSError:
        return []


def _gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def fresh(command: list[str], *, gpu: bool, env: dict | None = None, log: Path | None = None) -> dict:
    """Runs `command` as a new process; its wall seconds from start to exit, exit code and peak memory."""
    start = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = Sampler(process.pid, gpu)
        code = process.wait()
    seconds = time.perf_counter() - start
    memory = sampler.stop()
    if code != 0 and log is not None:
        print(log.read_text()[-3000:], file=sys.stderr)
    return {"seconds": seconds, "exit": code, **memory}


def worker(root: Path, spec: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "merge_worker.cli", "run", str(spec), "--volume", f"{CLAIM}={root}",
            "--device", device]


def env_with(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def manifest_of(root: Path, output: str) -> dict:
    return json.loads((root / output / "merge-manifest.json").read_text())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


# -- the rows ---------------------------------------------------------------------------------------------


def floor_row(device: str, env: dict) -> dict:
    """A fresh python that only imports torch (and makes a CUDA context): what no worker can go under."""
    code = "import torch" + ("; torch.zeros(1, device='cuda'); torch.cuda.synchronize()" if device == "cuda" else "")
    runs = [fresh([sys.executable, "-c", code], gpu=False, env=env)["seconds"] for _ in range(3)]
    return {"row": "floor: fresh python, import torch" + (" + CUDA context" if device == "cuda" else ""),
            "seconds": statistics.median(runs)}


def cold_rows(root: Path, base: str, adapters: list[str], device: str, env: dict, logs: Path, repeats: int) -> list[dict]:
    """Fresh adapter runs: the first with an empty Triton cache; then, where kernels are recorded
    (merge_worker/triton_kernels.json), each with an empty cache seeded from kernels baked ahead of time,
    as every pod of the image starts; then runs that find the first run's cache."""
    from merge_worker import kernel_cache

    spec = write_spec(root, "cold-adapter", base=base, adapters=adapters, output="out/cold-adapter", fmt="adapter")

    def one(label: str, run_env: dict) -> dict:
        run = fresh(worker(root, spec, device), gpu=device == "cuda", env=run_env, log=logs / f"{label}.log")
        timings = manifest_of(root, "out/cold-adapter")["timings"] if run["exit"] == 0 else {}
        run.update({f"t_{k}": v for k, v in timings.items()})
        print(f"cold adapter {label}: {run}", flush=True)
        return run

    first = one("cold-empty", env)
    rows = [{"row": "fresh process, adapter output, no evaluation (empty Triton cache)", **first, "target": 3.0}]
    if device == "cuda" and kernel_cache.RECORDED.exists():
        baked = root / "triton-baked"
        shutil.rmtree(baked, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "merge_worker.kernel_cache", "bake", str(baked),
                        "--arch", str(kernel_cache.capability())],
                       env=env, cwd=REPO, check=True)
        seeded = []
        for i in range(max(1, repeats - 1)):
            cache = root / f"triton-seeded-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            seeded.append(one(f"cold-baked-{i}", {**env, "TRITON_CACHE_DIR": str(cache),
                                                   kernel_cache.BAKED_ENV: str(baked)}))
        rows.append({"row": f"fresh process, adapter output, no evaluation (image: baked kernels, median of "
                            f"{len(seeded)})", **seeded[0],
                     "seconds": statistics.median(r["seconds"] for r in seeded), "target": 3.0})
    later = [one(f"cold-cached-{i}", env) for i in range(max(1, repeats - 1))]
    rows.append({"row": f"fresh process, adapter output, no evaluation (cache of the first run, median of "
                        f"{len(later)})", **later[0], "seconds": statistics.median(r["seconds"] for r in later),
                 "target": 3.0})
    return rows


def merged_model_row(root: Path, tag: str, base: str, adapters: list[str], device: str, env: dict,
                     logs: Path) -> dict:
    output = f"out/merged-{tag}"
    spec = write_spec(root, f"merged-{tag}", base=base, adapters=adapters, output=output, fmt="merged-model")
    run = fresh(worker(root, spec, device), gpu=device == "cuda", env=env, log=logs / f"merged-{tag}.log")
    row = {"row": f"merged model, {tag} bf16, fresh process", **run}
    if run["exit"] == 0:
        size = folder_bytes(root / output)
        row.update(output_gib=size / GIB, gbps=size / run["seconds"] / 1e9,
                   **{f"t_{k}": v for k, v in manifest_of(root, output)["timings"].items()})
    print(f"{row}", flush=True)
    return row


def evaluation_row(root: Path, base: str, adapters: list[str], datasets: list[str], device: str, env: dict,
                   logs: Path, quantization: str, new_tokens: int) -> dict:
    spec = write_spec(root, "evaluate", base=base, adapters=adapters, output="out/evaluate", fmt="adapter",
                      datasets=datasets, new_tokens=new_tokens, quantization=quantization)
    run = fresh(worker(root, spec, device), gpu=device == "cuda", env=env, log=logs / "evaluate.log")
    row = {"row": f"evaluation {quantization}, 3 x 32 examples, exact match to {new_tokens} tokens", **run}
    if run["exit"] in (0, 3):
        manifest = manifest_of(root, "out/evaluate")
        evaluation = manifest["evaluation"]
        row.update(eval_seconds=evaluation["seconds"], quantization=evaluation["quantization"],
                   **{f"eval_{k}": v for k, v in evaluation.get("phaseSeconds", {}).items()},
                   exact={n: d["exactMatch"] for n, d in evaluation["datasets"].items()},
                   **{f"t_{k}": v for k, v in manifest["timings"].items()})
    print(f"{row}", flush=True)
    return row


def search_row(root: Path, base: str, adapters: list[str], datasets: list[str], device: str, env: dict,
               logs: Path, quantization: str, new_tokens: int, trials: int) -> dict:
    """Issue 15 on the GPU: a random search over ties density and weights on the evaluation inputs (each
    dataset split in half: search and report), one fresh process; trials per minute from the manifest."""
    search = {"strategy": "random", "trials": trials, "seed": 0, "objective": "worst",
              "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9}, "weights": {"min": 0.5, "max": 1.5}}]}
    spec = write_spec(root, "search", base=base, adapters=adapters, output="out/search", fmt="adapter",
                      datasets=datasets, new_tokens=new_tokens, quantization=quantization, search=search)
    run = fresh(worker(root, spec, device), gpu=device == "cuda", env=env, log=logs / "search.log")
    row = {"row": f"search, {trials} trials (random ties), {quantization}, 3 datasets x 16 search rows to "
                  f"{new_tokens} tokens", **run}
    if run["exit"] in (0, 3):
        record = manifest_of(root, "out/search")["search"]
        trial_seconds = sum(t["seconds"] for t in record["trials"])
        row.update(trials_per_minute=60 * len(record["trials"]) / trial_seconds,
                   one_off=run["seconds"] - trial_seconds)
    print(f"{row}", flush=True)
    return row


def mergekit_rows(root: Path, tag: str, base: str, adapters: list[str], device: str, env: dict, logs: Path
                  ) -> list[dict]:
    """mergekit-yaml ties on base+adapter references, cold (empty LoRA cache) then warm."""
    import yaml

    config = {
        "merge_method": "ties",
        "base_model": str(root / base),
        "models": [{"model": f"{root / base}+{root / a}", "parameters": {"weight": 1.0, "density": 0.5}}
                   for a in adapters],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    path = root / "specs" / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    cache = root / "mergekit-lora-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for label in ("cold LoRA cache", "warm LoRA cache"):
        out = root / "out" / "mergekit"
        shutil.rmtree(out, ignore_errors=True)
        flags = ["--lora-merge-cache", str(cache), "--allow-crimes", "--quiet"]
        if device == "cuda":
            flags += ["--cuda", "--read-to-gpu", "--async-write"]
        command = [sys.executable, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())",
                   str(path), str(out), *flags]
        run = fresh(command, gpu=device == "cuda", env=env, log=logs / f"mergekit-{label.split()[0]}.log")
        rows.append({"row": f"mergekit ties, {tag} bf16, {label}", **run})
        print(f"{rows[-1]}", flush=True)
        if run["exit"] != 0:
            break
    return rows


def accuracy(root: Path, base: str, adapters: list[str], outputs: dict[str, Path], device: torch.device,
             shape: Shape) -> dict[str, float]:
    """||W_out - (W + delta)|| / ||delta|| over sampled modules, delta the exact TIES merge in float64;
    'bf16 floor' is the same for bf16(W + delta), the best a bf16 output can do."""
    from merge_worker.inputs.adapters import read_adapter
    from merge_worker.inputs.base_weights import BaseWeights
    from merge_worker.factors import MergeParams
    from merge_worker.merge_engine import merge_dense

    params = MergeParams(method="ties", weights=(1.0,) * len(adapters), density=0.5, lambda_=1.0, t=0.5, seed=0)
    read = [read_adapter(root / a) for a in adapters]
    weights = BaseWeights(root / base)
    opened = {label: BaseWeights(folder) for label, folder in outputs.items()}
    errors = {label: 0.0 for label in [*outputs, "bf16 floor"]}
    norm = 0.0
    for layer in sorted({0, shape.layers // 2, shape.layers - 1}):
        for suffix in ATTENTION + MLP:
            module = f"model.layers.{layer}.{suffix}"
            taus = []
            for adapter in read:
                if module not in adapter.modules:
                    taus.append(None)
                    continue
                f = adapter.factors(module)
                taus.append(f.scale * (f.b.to(device, torch.float64) @ f.a.to(device, torch.float64)))
            delta = merge_dense(taus, params, key=module)
            w = weights.get(f"{module}.weight").to(device, torch.float64)
            exact = w + delta
            norm += float(delta.norm()) ** 2
            errors["bf16 floor"] += float((exact.to(torch.bfloat16).double() - exact).norm()) ** 2
            for label, out in opened.items():
                got = out.get(f"{module}.weight").to(device, torch.float64)
                errors[label] += float((got - exact).norm()) ** 2
    return {label: (e / norm) ** 0.5 for label, e in errors.items()}


def warm_row(root: Path, env: dict, layers: int) -> dict:
    """bench/merge_speed.py's ties row: merge compute of 4 x r16 Llama-2-7B shapes, warm process."""
    out = root / "merge_speed.json"
    command = [sys.executable, str(REPO / "bench" / "merge_speed.py"), "--layers", str(layers), "--methods", "ties",
               "--skip-peft", "--skip-cpu", "--memory-layers", "2", "--root", str(root / "msb"), "--json", str(out)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
        return {"row": "warm merge compute, ties 4 x r16 7B shapes", "exit": done.returncode}
    ties = next(r for r in json.loads(out.read_text()) if r["row"] == "ties" and r["layers"] == layers)
    return {"row": f"warm merge compute, ties 4 x r16 Llama-2-7B shapes ({layers} layers)", "seconds": ties["compute"],
            "e2e": ties["e2e"], "target": 0.5}


# -- the table ----------------------------------------------------------------------------------------------


def fmt(value, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def table(rows: list[dict]) -> str:
    lines = ["| measure | seconds | target s | GB/s out | host anon GiB (RSS) | GPU GiB | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        notes = []
        for key in ("t_startup", "t_validate", "t_cuda_init", "t_merge", "t_digests_wait", "t_evaluate",
                    "eval_seconds", "e2e"):
            if r.get(key) is not None:
                notes.append(f"{key.removeprefix('t_')} {r[key]:.2f}")
        phases = [f"{k.removeprefix('eval_')} {r[k]:.2f}" for k in ("eval_load", "eval_loss", "eval_generate")
                  if r.get(k) is not None]
        if phases:
            notes.append("evaluation: " + ", ".join(phases))
        if r.get("exact"):
            notes.append("exact match " + ", ".join(f"{n} {d['base']:.2f}/{d['source']:.2f}/{d['merged']:.2f}"
                                                    for n, d in r["exact"].items() if d))
        if r.get("trials_per_minute"):
            notes.append(f"{r['trials_per_minute']:.1f} trials/min, one-off {r['one_off']:.1f} s")
        if r.get("ratio"):
            notes.append(f"mergekit / ours {r['ratio']:.1f}x (target >= 5x)")
        if r.get("error") is not None:
            notes.append(f"error {100 * r['error']:.2f}% of the delta")
        if r.get("exit") not in (None, 0):
            notes.append(f"exit {r['exit']}")
        host = None if r.get("host_anon_gib") is None else f"{r['host_anon_gib']:.2f} ({r['host_rss_gib']:.2f})"
        lines.append(f"| {r['row']} | {fmt(r.get('seconds'))} | {fmt(r.get('target'), '{:g}')} | "
                     f"{fmt(r.get('gbps'))} | {host or '-'} | {fmt(r.get('gpu_gib'))} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="work folder (inputs are cached there)")
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--repeats", type=int, default=3, help="fresh adapter runs (the first has no kernel cache)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", default="floor,cold,merged,eval,mergekit,warm,search")
    parser.add_argument("--search-trials", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tdev = torch.device(device)
    big, small = (SHAPES["8b"], SHAPES["3b"]) if args.scale == "full" else (SHAPES["tiny"], SHAPES["tiny3"])
    tags = ("8b", "3b") if args.scale == "full" else ("tiny", "tiny3")
    root = args.root.resolve()
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # An empty Triton cache for the first fresh run, kept for the later ones (as an image would bake it).
    triton_cache = root / "triton-cache"
    shutil.rmtree(triton_cache, ignore_errors=True)
    env = env_with(TRITON_CACHE_DIR=str(triton_cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    only = set(args.only.split(","))
    rows: list[dict] = []
    quantization = "nf4" if cuda else "none"
    started = time.perf_counter()

    def step(name: str, fn):
        if name not in only:
            return
        try:
            got = fn()
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others' numbers
            import traceback

            traceback.print_exc()
            rows.append({"row": f"{name}: failed ({type(exc).__name__}: {exc})"[:200]})
        print(f"[{time.perf_counter() - started:.0f} s] {name} done", flush=True)

    base_big = f"base-{tags[0]}"
    t = time.perf_counter()
    make_base(root / base_big, big, tdev)
    adapters_big = make_adapters(root, tags[0], big, relative=5e-5, device=tdev)
    print(f"[{time.perf_counter() - started:.0f} s] inputs {tags[0]} ready ({time.perf_counter() - t:.1f} s)", flush=True)

    step("floor", lambda: floor_row(device, env))
    step("cold", lambda: cold_rows(root, base_big, adapters_big, device, env, logs, args.repeats))
    step("merged", lambda: merged_model_row(root, tags[0], base_big, adapters_big, device, env, logs))
    shutil.rmtree(root / "out" / f"merged-{tags[0]}", ignore_errors=True)  # disk: the 3B part needs room
    datasets: list[str] = []
    if "eval" in only or "search" in only:
        datasets = make_datasets(root, base_big, tdev, examples=32, prompt_tokens=96, new_tokens=args.new_tokens,
                                 quantization=quantization)
        step("eval", lambda: evaluation_row(root, base_big, adapters_big, datasets, device, env, logs,
                                            quantization, args.new_tokens))
    if "mergekit" in only or "merged" in only:
        base_small = f"base-{tags[1]}"
        make_base(root / base_small, small, tdev)
        adapters_small = make_adapters(root, tags[1], small, relative=0.05, device=tdev)
        ours: list[dict] = []
        step("merged", lambda: ours.append(merged_model_row(root, tags[1], base_small, adapters_small, device,
                                                            env, logs)) or ours)
        if "mergekit" in only:
            theirs: list[dict] = []
            step("mergekit", lambda: theirs.extend(mergekit_rows(root, tags[1], base_small, adapters_small, device, env,
                                                                 logs)) or theirs)
            outputs = {"ours": root / "out" / f"merged-{tags[1]}"}
            if theirs and theirs[-1].get("exit") == 0:
                outputs["mergekit"] = root / "out" / "mergekit"
            try:
                errors = accuracy(root, base_small, adapters_small, outputs, tdev, small)
                print(f"accuracy (relative to the exact delta): {errors}", flush=True)
                if ours and ours[0].get("exit") == 0:
                    ours[0]["error"] = errors["ours"]
                for row in theirs:
                    row["error"] = errors.get("mergekit")
                    if ours and ours[0].get("seconds") and row.get("exit") == 0:
                        row["ratio"] = row["seconds"] / ours[0]["seconds"]
                rows.append({"row": "bf16 rounding floor (exact TIES result stored in bf16)",
                             "error": errors["bf16 floor"]})
            except Exception:  # noqa: BLE001
                import traceback

                traceback.print_exc()
    step("warm", lambda: warm_row(root, env, 32 if args.scale == "full" else 2))
    step("search", lambda: search_row(root, base_big, adapters_big, datasets, device, env, logs, quantization,
                                      args.new_tokens, args.search_trials))

    print()
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; {os.cpu_count()} CPUs; total "
          f"{time.perf_counter() - started:.0f} s")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
