"""Shared tiny inputs for the worker tests: built once per session (peft and transformers take a few
seconds to import; each model or adapter then takes well under a second)."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from merge_worker.cli import main
from support.tiny_models import make_lora_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> Path:
    """A pristine store: models/tiny (sharded), adapters/{a,b,c,emb}. Copy it before changing anything."""
    store = tmp_path_factory.mktemp("pristine-store")
    base = make_tiny_llama(store / "models" / "tiny", max_shard_size="40KB")
    make_lora_adapter(store / "adapters" / "a", base, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                      seed=1)
    make_lora_adapter(store / "adapters" / "b", base, r=6, alpha=3, use_rslora=True,
                      target_modules=("q_proj", "o_proj", "up_proj"), rank_pattern={"layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"o_proj": 5}, seed=2)
    make_lora_adapter(store / "adapters" / "c", base, r=2, alpha=4, target_modules=("v_proj",),
                      layers_to_transform=[1], modules_to_save=["lm_head"], seed=3)
    make_lora_adapter(store / "adapters" / "emb", base, r=3, alpha=6, target_modules=("embed_tokens", "q_proj"),
                      seed=4)
    return store


@pytest.fixture
def store(tiny_inputs, tmp_path) -> Path:
    """A private copy of the pristine store, free to change."""
    copy = tmp_path / "store"
    shutil.copytree(tiny_inputs, copy)
    return copy


def merge_resource(spec: dict) -> dict:
    """A whole AdapterMerge resource around `spec` (defaults: claim `store`)."""
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
            "metadata": {"name": "test"}, "spec": {"volume": {"claimName": "store"}, **spec}}


@dataclass
class CliRun:
    code: int
    out: str
    err: str
    result: dict | None


@pytest.fixture
def adaptermerge(capsys, tmp_path):
    """Runs `adaptermerge <command> <spec file> --volume store=<store>` in-process; `spec` is a dict
    (written as YAML) or a path. Returns exit code, stdout, stderr and the parsed --result-file."""

    def run(command: str, spec, store: Path, *extra: str) -> CliRun:
        if isinstance(spec, dict):
            path = tmp_path / f"merge-{secrets.token_hex(3)}.yaml"
            path.write_text(yaml.safe_dump(merge_resource(spec)))
        else:
            path = spec
        result_file = tmp_path / f"result-{secrets.token_hex(3)}.json"
        argv = [command, str(path), "--volume", f"store={store}", *extra]
        if command == "run":
            argv += ([] if "--device" in extra else ["--device", "cpu"]) + ["--result-file", str(result_file)]
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if result is not None:
            assert len(result_file.read_bytes()) < 4096
        return CliRun(code, captured.out, captured.err, result)

    return run
