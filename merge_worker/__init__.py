"""adaptermerge's merge worker: merges LoRA adapters in delta-W space (docs/merging.md).

Kept import-light on purpose: the operator imports `merge_worker.spec` and must never pull in torch.
"""

__version__ = "0.1.0"
