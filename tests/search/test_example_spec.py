"""examples/search/dev-assistant-search.yaml (docs/search.md, "Example") stays a valid search of the
demo's merge: the same inputs, trial 1 the demo's own TIES d=0.5, the same rows read per skill."""

from __future__ import annotations

from pathlib import Path

import yaml

from merge_worker.spec import parse_resource

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_search_is_the_demo_merge_with_a_search():
    search = parse_resource(yaml.safe_load((EXAMPLES / "search" / "dev-assistant-search.yaml").read_text())).spec
    demo = parse_resource(yaml.safe_load((EXAMPLES / "demo" / "dev-assistant.yaml").read_text())).spec
    assert search.search is not None and search.search.strategy == "tpe" and demo.search is None
    assert (search.method, search.parameters, search.adapters, search.base_model) == \
           (demo.method, demo.parameters, demo.adapters, demo.base_model)
    assert [(d.name, d.path, d.max_examples) for d in search.evaluation.datasets] == \
           [(d.name, d.path, d.max_examples) for d in demo.evaluation.datasets]
