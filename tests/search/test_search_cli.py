"""`adaptermerge run` with spec.search on the tiny models: the better candidate wins, the output equals
a plain merge of it, the final evaluation only sees the report split, the budget holds, bad search specs
exit 2 naming the field with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from search.conftest import CODE, SQL, search_spec

from merge_worker.search.split import split_part


def manifest(store: Path) -> dict:
    return json.loads((store / "merged" / "out" / "merge-manifest.json").read_text())


def test_search_picks_the_clearly_better_candidate_and_writes_it_like_a_plain_merge(
        search_store, adaptermerge, tmp_path):
    # lambda 0 merges nothing (retention 0 everywhere); lambda 1 keeps part of both skills.
    search = {"strategy": "grid", "space": [{"method": "linear", "lambda": {"values": [0.0, 1.0]}}]}
    run = adaptermerge("run", search_spec(search, parameters={"lambda": 0.0}), search_store)
    assert run.code == 0, run.err
    assert run.result["search"] == {"best": {"trial": 3, "method": "linear", "parameters": {"lambda": 1.0}},
                                    "score": pytest.approx(run.result["search"]["score"]), "trials": 3}
    record = manifest(search_store)["search"]
    others = [t["score"] for t in record["trials"] if t["parameters"] != {"lambda": 1.0}]
    assert run.result["search"]["score"] > max(others) + 0.1
    assert [t["parameters"] for t in record["trials"]] == [{}, {"lambda": 0.0}, {"lambda": 1.0}]
    assert all(set(t) >= {"retention", "score", "seconds", "method"} for t in record["trials"])
    assert record["trials"][0]["score"] == pytest.approx(0.0, abs=1e-4)  # the spec's own lambda 0
    assert manifest(search_store)["parameters"]["lambda"] == 1.0
    assert "search: trial 3 of 3" in run.err and "best so far" in run.err

    # The same merge run plainly writes the same tensors.
    plain = tmp_path / "plain-store"
    import shutil
    shutil.copytree(search_store, plain)
    shutil.rmtree(plain / "merged")
    assert adaptermerge("run", search_spec(None, parameters={"lambda": 1.0}), plain).code == 0
    ours = load_file(search_store / "merged" / "out" / "adapter_model.safetensors")
    theirs = load_file(plain / "merged" / "out" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_final_report_scores_only_the_report_split(search_store, adaptermerge):
    search = {"strategy": "random", "trials": 2, "seed": 4, "selectionFraction": 0.5,
              "space": [{"method": "linear", "weights": {"min": 0.5, "max": 1.5}}]}
    run = adaptermerge("run", search_spec(search), search_store)
    assert run.code == 0, run.err
    m = manifest(search_store)
    for name, pairs in (("code", CODE), ("sql", SQL)):
        rows = [{"prompt": p, "completion": c} for p, c in pairs]
        report, chosen = split_part(rows, "report", 4, 0.5), split_part(rows, "search", 4, 0.5)
        assert report and chosen
        assert m["evaluation"]["datasets"][name]["examples"] == len(report)
        assert m["search"]["split"][name] == {"search": len(chosen), "report": len(report)}
    assert len(m["search"]["trials"]) == 2
    best = m["search"]["best"]
    assert max(t["score"] for t in m["search"]["trials"]) == best["score"]
    assert m["parameters"].get("weights") == best["parameters"].get("weights")


def _swap_side(store: Path, part: str, seed: int, fraction: float) -> None:
    """Replaces every row of `part` in both eval files by rows no file had, that land on the same side
    (so the other split's rows, and their order, stay exactly as they were)."""
    from merge_worker.search.split import in_search_split

    for name, pairs in (("code", CODE), ("sql", SQL)):
        fresh = [(p, c.replace("one", "two").replace("table", "rows")) for p, c in pairs] + \
                [(p + " again", c) for p, c in pairs]
        on_side = lambda p, c: in_search_split({"prompt": p, "completion": c}, seed, fraction) == (part == "search")  # noqa: E731
        replacements = [pc for pc in fresh if on_side(*pc) and pc not in pairs]
        assert replacements, "no fresh rows on that side"
        rows = [pc for pc in pairs if not on_side(*pc)] + replacements
        (store / "eval" / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                                             for p, c in rows))


def test_what_the_run_scored_depends_on_its_own_split_only(search_store, adaptermerge, tmp_path):
    """Disjoint in what the run actually scored, not only in the split helper: replacing every report row
    leaves every trial's score unchanged and changes the final report; replacing every search row changes
    the trials and leaves the final report (the same merge, lambda 1.0) unchanged to the last bit."""
    import shutil

    seed, fraction = 4, 0.5
    search = {"strategy": "grid", "seed": seed, "selectionFraction": fraction,
              "space": [{"method": "linear", "lambda": {"values": [1.0]}}]}
    spec = search_spec(search, parameters={"lambda": 1.0})
    runs = {}
    for variant in ("original", "report", "search"):
        store = tmp_path / variant
        shutil.copytree(search_store, store)
        if variant != "original":
            _swap_side(store, variant, seed, fraction)
        run = adaptermerge("run", spec, store)
        assert run.code == 0, run.err
        m = manifest(store)
        runs[variant] = ([t["retention"] for t in m["search"]["trials"]],
                         {n: (d["baseLoss"], d["sourceLoss"], d["mergedLoss"]) for n, d in m["evaluation"]["datasets"].items()})
    trials, report = runs["original"]
    assert runs["report"][0] == trials, "the search scored report rows"
    assert all(runs["report"][1][n] != report[n] for n in report), "the final report did not score the report rows"
    assert runs["search"][1] == report, "the final report scored search rows"
    assert all(a[n] != b[n] for a, b in zip(runs["search"][0], trials) for n in a), "the search did not score its rows"


@pytest.mark.parametrize("budget,expected", [({"trials": 3}, 3), ({"trials": 50, "seconds": 0.001}, 1)])
def test_budget_is_respected(search_store, adaptermerge, budget, expected):
    search = {"strategy": "random", **budget,
              "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9}}]}
    run = adaptermerge("run", search_spec(search, method="ties", parameters={"density": 0.5}), search_store)
    assert run.code == 0, run.err
    assert len(manifest(search_store)["search"]["trials"]) == expected == run.result["search"]["trials"]


def test_grid_is_capped_by_the_trials_budget(search_store, adaptermerge):
    search = {"strategy": "grid", "trials": 2, "space": [
        {"method": "ties", "density": {"min": 0.2, "max": 0.8, "steps": 4}}]}
    run = adaptermerge("run", search_spec(search, method="ties", parameters={"density": 0.5}), search_store)
    assert run.code == 0, run.err
    assert [t["parameters"] for t in manifest(search_store)["search"]["trials"]] == [{}, {"density": 0.2}]


@pytest.mark.parametrize("change,field", [
    (lambda s: s.pop("evaluation"), "spec.search"),
    (lambda s: s["search"]["space"][0].update(density={"values": [0.5]}), "spec.search.space[0].density"),
    (lambda s: s["search"]["space"][0].update(lambda_={"values": [1.0], "min": 0, "max": 1}), "spec.search.space[0].lambda"),
    (lambda s: s["search"]["space"].append({"method": "ties", "density": {"min": 0.0, "max": 0.5}}),
     "spec.search.space[1].density"),
    (lambda s: s["search"]["space"].append({"method": "slerp", "t": {"min": 0.5, "max": 1.5}}),
     "spec.search.space[1].t"),
    (lambda s: s["search"]["space"].append({"method": "della", "density": {"values": [0.1, 0.5]}}),
     "spec.search.space[1]"),
    (lambda s: s["search"]["space"].append({"method": "ties"}), "spec.search.space[1]"),
    (lambda s: s["search"].update(objective="mean", datasetWeights={"nope": 1.0}), "spec.search.datasetWeights.nope"),
    (lambda s: s["search"].update(datasetWeights={"code": 1.0}), "spec.search.datasetWeights"),
    (lambda s: s["search"].update(strategy="anneal"), "spec.search.strategy"),
    (lambda s: s["search"].update(trials=0), "spec.search.trials"),
    (lambda s: s["search"].update(selectionFraction=1.0), "spec.search.selectionFraction"),
    (lambda s: s["search"].update(selectionFraction=0.0001), "spec.search.selectionFraction"),
    (lambda s: s["output"].update(format="merged-model"), "spec.search"),
])
def test_bad_search_specs_exit_2_naming_the_field(search_store, adaptermerge, change, field):
    spec = search_spec({"space": [{"method": "linear", "lambda": {"values": [1.0]}}]})
    change(spec)
    if "lambda_" in spec.get("search", {}).get("space", [{}])[0]:
        spec["search"]["space"][0]["lambda"] = spec["search"]["space"][0].pop("lambda_")
    run = adaptermerge("run", spec, search_store)
    assert run.code == 2, run.err
    assert f"{field}:" in run.err, run.err
    assert not (search_store / "merged").exists()


def test_tpe_is_optunas_seeded_sampler_told_every_score(search_store, adaptermerge, tmp_path):
    """optuna is in the worker's dependencies (the lock), so tpe must really run: the candidates after
    trial 1 are exactly what Optuna's TPESampler with the spec's seed proposes when told each score, and
    the same seed gives the same trials again. (Five trials are within TPE's ten startup draws: a test
    of the model's own choices would need more trials than a test should take.)"""
    import shutil

    import optuna

    search = {"strategy": "tpe", "trials": 5, "seed": 2,
              "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9}},
                        {"method": "linear", "lambda": {"values": [0.5, 1.0]}}]}
    spec = search_spec(search, method="ties", parameters={"density": 0.5})
    again = tmp_path / "again"
    shutil.copytree(search_store, again)
    run = adaptermerge("run", spec, search_store)
    assert run.code == 0, run.err
    trials = manifest(search_store)["search"]["trials"]
    assert len(trials) == 5 and run.result["search"]["score"] == max(t["score"] for t in trials)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=2))
    expected = []
    for recorded in trials[1:]:
        trial = study.ask()
        entry = trial.suggest_categorical("space", [0, 1])
        if entry == 0:
            expected.append(("ties", {"density": round(trial.suggest_float("0.density", 0.2, 0.9), 6)}))
        else:
            expected.append(("linear", {"lambda": trial.suggest_categorical("1.lambda", [0.5, 1.0])}))
        study.tell(trial, recorded["score"])
    assert [(t["method"], t["parameters"]) for t in trials[1:]] == expected

    assert adaptermerge("run", spec, again).code == 0
    assert [t["parameters"] for t in manifest(again)["search"]["trials"]] == [t["parameters"] for t in trials]
