"""Specs the worker's writing tests share: a linear merge of two adapters of the tiny store
(tests/worker/conftest.py) with a base model, written to merged/out."""

from __future__ import annotations

LINEAR_TWO_ADAPTERS = {
    "baseModel": {"path": "models/tiny"},
    "adapters": [{"name": "a", "path": "adapters/a", "weight": 0.6},
                 {"name": "b", "path": "adapters/b", "weight": 0.4}],
    "method": "linear",
    "output": {"path": "merged/out", "rank": 4},
}


def with_output(spec: dict, **output) -> dict:
    """`spec` with its output settings updated."""
    return {**spec, "output": {**spec["output"], **output}}
