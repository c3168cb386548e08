"""Runs the example merge search (dev-assistant-search.yaml) on the CPU and compares its best candidate
with the demo's plain TIES merge (density 0.5) on the same held-out rows: the report split of each
evaluation set (docs/search.md). Prints the table docs/search.md shows, writes the numbers as JSON
and draws the trials (docs/search-example-trials.png).

    python examples/search/compare.py NEW_DIR [--model DIR] [--plot docs/search-example-trials.png]

NEW_DIR must not exist: the store (examples/demo/make-store.sh), both outputs, their result summaries
and compare.json go there. Needs the converted SmolLM2 (scripts/prepare-smollm2.py) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from merge_worker.search.split import split_part  # noqa: E402

SEARCH_SPEC = REPO / "examples" / "search" / "dev-assistant-search.yaml"
DEFAULT_MODEL = Path.home() / ".cache" / "adaptermerge" / "models" / "smollm2-135m-instruct"


def run(spec: Path, store: Path, result: Path) -> tuple[dict, float]:
    """`adaptermerge run` as a user would; exit 3 (a skill below minRetention) still wrote the output."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "merge_worker.cli", "run", str(spec), "--volume", f"store={store}",
                           "--device", "cpu", "--result-file", str(result)], cwd=REPO)
    if proc.returncode not in (0, 3):
        sys.exit(f"compare: {spec.name} exited {proc.returncode}")
    return json.loads(result.read_text()), time.monotonic() - started


def report_split_files(search: dict, store: Path) -> list[dict]:
    """The report rows of every dataset as their own files (maxExamples first, then the split, as the
    search reads them), so the plain merge is scored on exactly the rows the search never selected with."""
    datasets = []
    for d in search["spec"]["evaluation"]["datasets"]:
        rows = [json.loads(line) for line in (store / d["path"]).read_text().splitlines() if line.strip()]
        rows = rows[: d.get("maxExamples", len(rows))]
        held_out = split_part(rows, "report", search["spec"]["search"]["seed"],
                              search["spec"]["search"]["selectionFraction"])
        path = Path("eval-report") / f"{d['name']}.jsonl"
        (store / path).parent.mkdir(exist_ok=True)
        (store / path).write_text("".join(json.dumps(r) + "\n" for r in held_out))
        datasets.append({"name": d["name"], "path": str(path), "adapter": d["adapter"]})
    return datasets


def plot(manifest: dict, plain_report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = manifest["search"]["trials"]
    numbers = [t["trial"] for t in trials]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in trials[0]["retention"]:
        ax.plot(numbers, [t["retention"][name] for t in trials], "o", alpha=0.6, label=f"{name} retention")
    ax.plot(numbers, [t["score"] for t in trials], "k-", label="score (worst retention)")
    best = manifest["search"]["best"]
    ax.plot([best["trial"]], [best["score"]], "r*", markersize=16, label=f"chosen: trial {best['trial']}")
    ax.axhline(trials[0]["score"], color="grey", linestyle="--", label="plain TIES d=0.5 (trial 1)")
    ax.set_xlabel("trial")
    ax.set_ylabel("retention on the search split")
    ax.set_title(f"{manifest['search']['strategy']} search, TIES density and per-adapter weights, SmolLM2-135M")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a new folder")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"compare: {args.out} already exists; give a new folder")
    store = args.out / "store"
    args.out.mkdir(parents=True)
    subprocess.run([str(REPO / "examples" / "demo" / "make-store.sh"), str(store), str(args.model)], check=True)

    search_result, search_seconds = run(SEARCH_SPEC, store, args.out / "search-result.json")
    search_spec = yaml.safe_load(SEARCH_SPEC.read_text())
    manifest = json.loads((store / search_spec["spec"]["output"]["path"] / "merge-manifest.json").read_text())

    plain = yaml.safe_load((REPO / "examples" / "demo" / "dev-assistant.yaml").read_text())
    plain["spec"]["output"]["path"] = "merged/plain-ties"
    plain["spec"]["evaluation"] = {**plain["spec"]["evaluation"], "datasets": report_split_files(search_spec, store)}
    plain_file = args.out / "plain-ties-report-split.yaml"
    plain_file.write_text(yaml.safe_dump(plain, sort_keys=False))
    plain_result, plain_seconds = run(plain_file, store, args.out / "plain-result.json")

    best = manifest["search"]["best"]
    rows = {name: {"plain": plain_result["retention"][name], "best": search_result["retention"][name],
                   "rows": manifest["search"]["split"][name]["report"]} for name in plain_result["retention"]}
    numbers = {"best": best, "trials": len(manifest["search"]["trials"]), "searchSeconds": round(search_seconds, 1),
               "plainSeconds": round(plain_seconds, 1), "split": manifest["search"]["split"],
               "plainSearchScore": manifest["search"]["trials"][0]["score"], "reportRetention": rows,
               "trialRecords": manifest["search"]["trials"]}
    (args.out / "compare.json").write_text(json.dumps(numbers, indent=2))
    print(f"\nsearch: {numbers['trials']} trials, {search_seconds:.0f} s in all; chosen trial {best['trial']}:"
          f" {best['method']} {json.dumps(best['parameters'])}, search-split score {best['score']}"
          f" (plain TIES d=0.5: {numbers['plainSearchScore']})")
    print("| skill | report rows | plain TIES d=0.5 | best found |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['rows']} | {r['plain']:.3f} | {r['best']:.3f} |")
    if args.plot:
        plot(manifest, rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
