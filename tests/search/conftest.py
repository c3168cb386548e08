"""A store for search tests: the tiny Llama, two adapters trained on twelve examples of a skill each,
and those examples as evaluation datasets (enough rows that both splits hold several)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from evaluation.tiny_lm import train_lora, write_jsonl
from support.tiny_models import make_tiny_llama
from worker.conftest import adaptermerge, merge_resource  # noqa: F401 - the CLI fixture, shared

NUMBERS = ["one", "two", "three", "four", "five", "six"]
CODE = [(f"question add {n}", f"return {n} + one") for n in NUMBERS] + \
       [(f"question print {n}", f"print {n} world") for n in NUMBERS]
SQL = [(f"question count {n}", f"select count ( {n} ) from table") for n in NUMBERS] + \
      [(f"question name {n}", f"select name from table where id = {n}") for n in NUMBERS]


def write_search_store(root: Path) -> Path:
    """models/tiny, adapters/{code,sql} trained on CODE and SQL, eval/{code,sql}.jsonl (also bench/search_speed.py)."""
    make_tiny_llama(root / "models" / "tiny")
    write_jsonl(root / "eval" / "code.jsonl", CODE)
    write_jsonl(root / "eval" / "sql.jsonl", SQL)
    for name, pairs in (("code", CODE), ("sql", SQL)):
        train_lora(root / "models" / "tiny", pairs, root / "adapters" / name, rank=4,
                   targets=["q_proj", "v_proj", "up_proj", "down_proj"], steps=80)
    return root


@pytest.fixture(scope="session")
def search_inputs(tmp_path_factory) -> Path:
    return write_search_store(tmp_path_factory.mktemp("search-store"))


@pytest.fixture
def search_store(search_inputs, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(search_inputs, copy)
    return copy


def search_spec(search: dict | None, **changes) -> dict:
    """A merge of the two skills scored on both datasets, with `search` (None: a plain merge)."""
    spec = {
        "baseModel": {"path": "models/tiny"},
        "adapters": [{"name": "code", "path": "adapters/code"}, {"name": "sql", "path": "adapters/sql"}],
        "method": "linear",
        "output": {"path": "merged/out", "rank": 8},
        "evaluation": {"datasets": [{"name": "code", "path": "eval/code.jsonl", "adapter": "code"},
                                    {"name": "sql", "path": "eval/sql.jsonl", "adapter": "sql"}],
                       "batchSize": 4},
    }
    if search is not None:
        spec["search"] = search
    spec.update(changes)
    return spec
