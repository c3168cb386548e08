"""Issue 15 benchmark: merge-search trials per minute on this machine's CPU (or --device cuda).

Rows:
- tiny: the tests' tiny Llama (tests/support/tiny_models.py) with two trained adapters (tests/search);
- smollm2: SmolLM2-135M-Instruct with the three example skills (examples/skills) laid out by
  examples/demo/make-store.sh, when the converted model exists (--model, default under ~/.cache).
Each row runs the real search (`adaptermerge run` path: merge_worker.search.runner.run_search) with a
random strategy over ties density and per-adapter weights, then prints the trials per minute (from the
manifest's per-trial seconds: merge + write + attach + score on the search split), the one-off seconds
(load, base/source scoring, final write and report evaluation) and the best candidate against the spec's
own plain merge (trial 1), on the search split and on the report split.

    python bench/search_speed.py --trials 6
Not a test: it prints a table (and --json writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny models the tests build

from merge_worker.search.runner import run_search  # noqa: E402
from merge_worker.spec import parse_spec  # noqa: E402
from merge_worker.inputs.volumes import Volumes  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "adaptermerge" / "models" / "smollm2-135m-instruct"


def tiny_store(root: Path) -> tuple[Path, dict]:
    from search.conftest import search_spec, write_search_store

    return write_search_store(root), search_spec(None, method="ties", parameters={"density": 0.5})


def smollm2_store(root: Path, model: Path, examples: int) -> tuple[Path, dict]:
    store = root / "store"
    subprocess.run([str(REPO / "examples" / "demo" / "make-store.sh"), str(store), str(model)], check=True)
    spec = {
        "baseModel": {"path": "models/smollm2-135m-instruct"},
        "adapters": [{"name": s, "path": f"adapters/{s}"} for s in ("python", "sql", "extract")],
        "method": "ties", "parameters": {"density": 0.5, "lambda": 1.0},
        "output": {"path": "merged/out", "rank": 32},
        "evaluation": {"datasets": [{"name": s, "path": f"eval/{s}.jsonl", "adapter": s, "maxExamples": examples}
                                    for s in ("python", "sql", "extract")], "batchSize": 16},
    }
    return store, spec


def run_row(name: str, store: Path, spec: dict, trials: int, device: str) -> dict:
    spec = {**spec, "volume": {"claimName": "store"}, "search": {
        "strategy": "random", "trials": trials, "seed": 0, "objective": "worst",
        "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9},
                   "weights": {"min": 0.5, "max": 1.5}}]}}
    started = time.monotonic()
    outcome = run_search(parse_spec(spec), Volumes({"store": store}), device=device, print_out=lambda _: None)
    total = time.monotonic() - started
    record = outcome.manifest["search"]
    trial_seconds = sum(t["seconds"] for t in record["trials"])
    report = {k: v["retention"] for k, v in outcome.manifest["evaluation"]["datasets"].items()}
    return {"row": name, "trials": len(record["trials"]), "trialsPerMinute": 60 * len(record["trials"]) / trial_seconds,
            "secondsPerTrial": trial_seconds / len(record["trials"]), "oneOffSeconds": total - trial_seconds,
            "plainSearchScore": record["trials"][0]["score"], "bestSearchScore": record["best"]["score"],
            "best": record["best"]["parameters"], "bestReportRetention": report, "split": record["split"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--examples", type=int, default=32, help="rows read per SmolLM2 dataset (then split)")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tiny:
            rows.append(run_row("tiny", *tiny_store(Path(tmp) / "tiny"), args.trials, args.device))
        if (args.model / "config.json").exists():
            rows.append(run_row("smollm2", *smollm2_store(Path(tmp), args.model, args.examples), args.trials,
                                args.device))
        else:
            print(f"no converted SmolLM2 at {args.model}: smollm2 row skipped", file=sys.stderr)
    print(f"{'row':8} {'trials':>6} {'trials/min':>10} {'s/trial':>8} {'one-off s':>9} {'plain':>7} {'best':>7}"
          "  best parameters / report-split retention of the best")
    for r in rows:
        print(f"{r['row']:8} {r['trials']:>6} {r['trialsPerMinute']:>10.2f} {r['secondsPerTrial']:>8.2f}"
              f" {r['oneOffSeconds']:>9.1f} {r['plainSearchScore']:>7.3f} {r['bestSearchScore']:>7.3f}"
              f"  {json.dumps(r['best'])} / {json.dumps({k: round(v, 3) if v is not None else None for k, v in r['bestReportRetention'].items()})}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
