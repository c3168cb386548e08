"""An AdapterMerge of the two tiny adapters `adapters/a` and `adapters/b` on one claim, as the cluster
tests apply it (tests/operator on the test kubelet, tests/node on the real node)."""

from __future__ import annotations


def merge_resource(name: str, claim: str, **spec) -> dict:
    """TIES of a (weight 0.7) and b into merged/<name>, rank 4, one GPU; `spec` replaces top-level fields."""
    base = {
        "volume": {"claimName": claim},
        "adapters": [{"name": "a", "path": "adapters/a", "weight": 0.7}, {"name": "b", "path": "adapters/b"}],
        "method": "ties",
        "parameters": {"density": 0.5},
        "output": {"path": f"merged/{name}", "rank": 4},
        "job": {"gpus": 1, "backoffLimit": 1, "activeDeadlineSeconds": 600},
    }
    return {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": name},
            "spec": {**base, **spec}}
