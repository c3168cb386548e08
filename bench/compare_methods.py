#!/usr/bin/env python3
"""Merges the example skill adapters (examples/skills: python r8, sql r16, extract r4 attention-only) on
SmolLM2-135M-Instruct with every adaptermerge method and a few densities, and with PEFT's own
`add_weighted_adapter` (ties, ties_svd, dare_ties_svd, cat; and, on the adapters zero-padded to one rank,
its factor-space ties and linear) on the same adapters, then scores each merge
by its completion-token loss on the held-out eval sets: retention per skill, as the worker reports it.

Prints a markdown table and writes a PNG (retention per skill per method). CPU, ~10 minutes on 2 cores.
Usage (bootstrap venv): bench/compare_methods.py [--max-examples N] [--png PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SKILLS = ["python", "sql", "extract"]
RANK = 32  # output rank of the adaptermerge merges and of PEFT's *_svd merges (input ranks sum to 28)
CPU = torch.device("cpu")

# (label, method, density): every method of MERGING.md; slerp needs exactly two adapters, so it is absent.
OURS = [
    ("linear", "linear", None),
    ("cat", "cat", None),
    ("magnitude_prune d=0.5", "magnitude_prune", 0.5),
    ("ties d=0.2", "ties", 0.2),
    ("ties d=0.5", "ties", 0.5),
    ("ties d=0.8", "ties", 0.8),
    ("dare_linear d=0.5", "dare_linear", 0.5),
    ("dare_ties d=0.5", "dare_ties", 0.5),
    ("dare_ties d=0.8", "dare_ties", 0.8),
]
PEFT = [("peft ties d=0.5", "ties", 0.5), ("peft ties_svd d=0.5", "ties_svd", 0.5),
        ("peft dare_ties_svd d=0.5", "dare_ties_svd", 0.5), ("peft cat", "cat", None)]
# PEFT's factor-space methods refuse adapters of different ranks; zero-padding every adapter to one rank
# (alpha scaled to keep alpha/r) changes no task vector, and lets them run on the very same deltas.
PADDED_RANK = 16
PEFT_PADDED = [("peft ties d=0.5, ranks padded", "ties", 0.5), ("peft linear, ranks padded", "linear", None)]


def merge_spec(method: str, density: float | None, output: str) -> dict:
    parameters = {"lambda": 1.0, "seed": 0} | ({"density": density} if density is not None else {})
    return {
        "apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": "compare"},
        "spec": {
            "volume": {"claimName": "store"},
            "adapters": [{"name": s, "path": f"adapters/{s}"} for s in SKILLS],
            "method": method, "parameters": parameters,
            "output": {"path": output, "format": "adapter", "rank": RANK},
        },
    }


def run_merge(store: Path, work: Path, label: str, method: str, density: float | None) -> tuple[Path, float]:
    """Merges through the real CLI (in-process); returns the adapter folder and the seconds it took."""
    from merge_worker.cli import main as adaptermerge

    output = f"merged/{label.replace(' ', '_').replace('=', '')}"
    spec_file = work / f"{output.split('/')[1]}.yaml"
    spec_file.write_text(yaml.safe_dump(merge_spec(method, density, output)))
    started = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):  # its summary table; ours comes at the end
        code = adaptermerge(["run", str(spec_file), "--volume", f"store={store}", "--device", "cpu"])
    if code != 0:
        raise RuntimeError(f"adaptermerge run for {label} exited {code}")
    return store / output, time.monotonic() - started


def pad_adapter(source: Path, target: Path, rank: int) -> None:
    """The same adapter at a higher rank: zero rows in A, zero columns in B, alpha scaled with r."""
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    extra = rank - config["r"]
    padded = {}
    for key, value in tensors.items():
        if "lora_A" in key:
            value = torch.cat([value, value.new_zeros(extra, value.shape[1])])
        elif "lora_B" in key:
            value = torch.cat([value, value.new_zeros(value.shape[0], extra)], dim=1)
        padded[key] = value.contiguous()
    config |= {"r": rank, "lora_alpha": config["lora_alpha"] * rank / config["r"]}
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text(json.dumps(config))
    save_file(padded, target / "adapter_model.safetensors", metadata={"format": "pt"})


def peft_merge(scorer, examples: dict, sources: list[str], label: str, combination: str,
               density: float | None, base: dict, source: dict) -> dict:
    started = time.monotonic()
    try:
        scorer.model.add_weighted_adapter(sources, [1.0] * len(sources), "candidate", combination_type=combination,
                                          density=density, svd_rank=RANK if "svd" in combination else None)
    except ValueError as exc:  # e.g. plain ties: "All adapters must have the same r value ..."
        print(f"compare: {label}: refused: {exc}", file=sys.stderr, flush=True)
        return row(label, None, base, source, None, note="refused: " + str(exc).split(" when ")[0])
    seconds = time.monotonic() - started
    result = row(label, score(scorer, examples, "candidate"), base, source, seconds)
    scorer.detach("candidate")
    print(f"compare: {label}: {result['retention']}", file=sys.stderr, flush=True)
    return result


def score(scorer, examples: dict, adapter: str | None) -> dict[str, float]:
    return {skill: scorer.loss(examples[skill], adapter) for skill in SKILLS}


def row(label: str, losses: dict[str, float] | None, base: dict, source: dict, seconds: float | None,
        note: str = "") -> dict:
    from merge_worker.evaluation.scoring import retention

    if losses is None:
        return {"label": label, "retention": None, "losses": None, "seconds": seconds, "note": note}
    kept = {s: retention(base[s], source[s], losses[s]) for s in SKILLS}
    return {"label": label, "retention": kept, "losses": losses, "seconds": seconds, "note": note}


def compare(max_examples: int, work: Path) -> dict:
    from merge_worker.evaluation.scoring import Scorer, encode, read_jsonl, source_adapter_name
    from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

    model_dir = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare-smollm2.py")], check=True,
                               stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    store = work / "store"
    subprocess.run([str(REPO / "examples" / "demo" / "make-store.sh"), str(store), model_dir], check=True)

    tokenizer = load_tokenizer(store / "models" / "smollm2-135m-instruct")
    examples = {
        s: [encode(tokenizer, r["prompt"], r["completion"])
            for r in read_jsonl(store / "eval" / f"{s}.jsonl", s, max_examples)]
        for s in SKILLS
    }
    scorer = Scorer(load_causal_lm(store / "models" / "smollm2-135m-instruct", "none", CPU).model, tokenizer, CPU)
    for s in SKILLS:
        scorer.attach(source_adapter_name(s), store / "adapters" / s)
    base = score(scorer, examples, None)
    source = {s: scorer.loss(examples[s], source_adapter_name(s)) for s in SKILLS}
    rows = []
    for label, method, density in OURS:
        folder, seconds = run_merge(store, work, label, method, density)
        scorer.attach("candidate", folder)
        rows.append(row(label, score(scorer, examples, "candidate"), base, source, seconds))
        scorer.detach("candidate")
        print(f"compare: {label}: {rows[-1]['retention']}", file=sys.stderr, flush=True)
    sources = [source_adapter_name(s) for s in SKILLS]
    for label, combination, density in PEFT:
        rows.append(peft_merge(scorer, examples, sources, label, combination, density, base, source))
    padded = []
    for s in SKILLS:
        pad_adapter(store / "adapters" / s, work / "padded" / s, PADDED_RANK)
        scorer.attach(f"padded-{s}", work / "padded" / s)
        padded.append(f"padded-{s}")
        same = scorer.loss(examples[s], f"padded-{s}")
        if abs(same - source[s]) > 1e-3 * source[s] + 1e-5:
            raise RuntimeError(f"padding changed the {s} adapter: loss {same} vs {source[s]}")
    for label, combination, density in PEFT_PADDED:
        rows.append(peft_merge(scorer, examples, padded, label, combination, density, base, source))
    return {"examples": max_examples, "rank": RANK, "base": base, "source": source, "rows": rows}


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    head = "| merge | " + " | ".join(f"retention {s}" for s in SKILLS) + " | mean | merge time (s) | note |"
    lines = [head, "|" + " --- |" * (len(SKILLS) + 4)]
    for r in result["rows"]:
        kept = r["retention"] or {}
        values = [kept.get(s) for s in SKILLS]
        mean = None if None in values else sum(values) / len(values)
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['label']} | " + " | ".join(cell(v) for v in values)
                     + f" | {cell(mean)} | {seconds} | {r['note']} |")
    losses = " · ".join(f"{s}: base {result['base'][s]:.3f}, source {result['source'][s]:.3f}" for s in SKILLS)
    return "\n".join(lines) + f"\n\nLosses per completion token ({result['examples']} held-out examples per skill): {losses}\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / len(SKILLS)
    for i, skill in enumerate(SKILLS):
        xs = [j + (i - (len(SKILLS) - 1) / 2) * width for j in range(len(rows))]
        ys = [(r["retention"] or {}).get(skill) for r in rows]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width, label=skill)
    for j, r in enumerate(rows):
        if r["retention"] is None:
            ax.text(j, 0.05, "refused", ha="center", rotation=90, fontsize=8)
    ax.axvline(len(OURS) - 0.5, color="grey", linewidth=0.8)  # adaptermerge | PEFT
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("retention (1 = all the skill kept)")
    ax.set_title("Merging three SmolLM2-135M LoRA skills: retention per skill (adaptermerge vs PEFT)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=32)
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "method-comparison.png")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="redraw and reprint a --json result only")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(args.replot.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="adaptermerge-compare.") as work:
            result = compare(args.max_examples, Path(work))
    plot(result, args.png)
    if args.json and not args.replot:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
