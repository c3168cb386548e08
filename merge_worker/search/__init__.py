"""The merge search (docs/search.md): many candidate merges of the same adapters, each scored on the
search split of the evaluation datasets, and the best one written like a plain merge.

Only the modules the spec validation needs (validation, space, split) stay importable without torch;
the runner imports torch.
"""
