"""Runs a merge method over a stream of modules and yields LoRA factors of the merged deltas.

Modules are consumed lazily and merged in bounded batches, so peak memory depends on the largest module
and the batch budget, never on how many modules a model has. Low-rank methods (linear, cat, slerp) go
module by module through the exact factoring of refactor.py and never form out x in matrices. Dense
methods (ties, dare_*, magnitude_prune) build the task vectors of a batch of equal-shape modules on the
device, merge them with one set of kernel launches, and re-factor with a truncated SVD. Results are
handed back on the CPU, so a consumer that collects them does not hold device memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch

from merge_worker.factors import LoraFactors, MergedModule, MergeParams
from merge_worker.methods import LowRankMethod, MergeMethod, make_method
from merge_worker.refactor import concatenate, factor_dense, factor_low_rank

Module = tuple[str, list[LoraFactors | None]]

# Bytes of stacked task vectors one dense batch may hold (merge temporaries add about as much again).
DEFAULT_BATCH_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
MAX_BATCH_MODULES = 64  # also bounds how many modules wait, unmerged, for others of their shape


def merge_modules(
    modules: Iterable[Module], params: MergeParams, *, rank: int | Literal["auto"], energy: float,
    device: torch.device, dtype: torch.dtype = torch.float32, batch_bytes: int | None = None,
) -> Iterator[tuple[str, MergedModule]]:
    """Merges each (module name, per-adapter factors) pair; None means the adapter skips the module.

    Yields (name, MergedModule) once per module; dense methods may yield in a different order than
    the input (modules wait to be batched with others of their shape)."""
    device = torch.device(device)
    method: MergeMethod | None = None
    batches: _ShapeBatches | None = None
    for name, factors in modules:
        shape = _module_shape(name, factors)
        if method is None:
            method = make_method(params, len(factors))
            budget = batch_bytes or DEFAULT_BATCH_BYTES.get(device.type, DEFAULT_BATCH_BYTES["cpu"])
            batches = _ShapeBatches(len(factors), budget // dtype.itemsize)
        if len(factors) != method.n_adapters:
            raise ValueError(f"{name}: {len(factors)} adapters, expected {method.n_adapters}")
        if isinstance(method, LowRankMethod):
            yield name, _to_host(_merge_low_rank(method, factors, rank, energy, device, dtype))
            continue
        for batch in batches.add(name, factors, shape):
            yield from _merge_dense_batch(method, batch, rank, energy, device, dtype)
    if batches is not None:
        for batch in batches.drain():
            yield from _merge_dense_batch(method, batch, rank, energy, device, dtype)


def merge_dense(
    taus: list[torch.Tensor | None], params: MergeParams, *, key: str
) -> torch.Tensor:
    """The same method on dense task vectors (e.g. modules_to_save deltas); None = absent (zero).

    Computes in float32 (float64 inputs stay float64) on the inputs' device; `key` names the tensor
    for DARE's randomness."""
    present = [t for t in taus if t is not None]
    if not present:
        raise ValueError(f"{key}: no adapter provides this tensor")
    shape = present[0].shape
    if any(t.shape != shape for t in present):
        raise ValueError(f"{key}: adapters give different shapes {sorted({tuple(t.shape) for t in present})}")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
    stacked = torch.zeros((len(taus), 1, *shape), dtype=dtype, device=present[0].device)
    for slot, tau in zip(stacked, taus):
        if tau is not None:
            slot[0].copy_(tau)
    return make_method(params, len(taus)).combine(stacked, [key])[0]


def _module_shape(name: str, factors: Sequence[LoraFactors | None]) -> tuple[int, int]:
    shapes = {f.shape for f in factors if f is not None}
    if not shapes:
        raise ValueError(f"{name}: no adapter targets this module")
    if len(shapes) > 1:
        raise ValueError(f"{name}: adapters give this module different shapes {sorted(shapes)}")
    return shapes.pop()


def _to_device(f: LoraFactors, device: torch.device, dtype: torch.dtype) -> LoraFactors:
    return LoraFactors(a=f.a.to(device, dtype), b=f.b.to(device, dtype), scale=f.scale)


def _to_host(merged: MergedModule) -> MergedModule:
    return dataclasses.replace(merged, b=merged.b.cpu(), a=merged.a.cpu())


def _merge_low_rank(
    method: LowRankMethod, factors: Sequence[LoraFactors | None], rank, energy: float,
    device: torch.device, dtype: torch.dtype,
) -> MergedModule:
    on_device = [None if f is None else _to_device(f, device, dtype) for f in factors]
    coeffs = method.coefficients(on_device)
    present = [(c, f) for c, f in zip(coeffs, on_device) if f is not None]
    bs = [f.b for _, f in present]
    as_ = [f.a for _, f in present]
    cs = [c for c, _ in present]
    if method.stores_concatenation:
        return concatenate(bs, as_, cs, rank)
    return factor_low_rank(bs, as_, cs, rank, energy)


def _merge_dense_batch(
    method: MergeMethod, batch: list[Module], rank, energy: float,
    device: torch.device, dtype: torch.dtype,
) -> Iterator[tuple[str, MergedModule]]:
    names = [name for name, _ in batch]
    taus = _task_vectors(batch, method.n_adapters, device, dtype)
    deltas = method.combine(taus, names)
    merged = factor_dense(deltas, rank, energy)
    del taus, deltas
    for name, module in zip(names, merged):
        yield name, _to_host(module)


def _task_vectors(
    batch: list[Module], n_adapters: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """taus[i, m] = s_i * B_i @ A_i of adapter i on module m (zeros where it does not target it)."""
    out_features, in_features = _module_shape(*batch[0])
    taus = torch.empty(n_adapters, len(batch), out_features, in_features, dtype=dtype, device=device)
    for m, (_, factors) in enumerate(batch):
        for i, f in enumerate(factors):
            if f is None:
                taus[i, m].zero_()
            else:
                f = _to_device(f, device, dtype)
                torch.matmul(f.b * f.scale, f.a, out=taus[i, m])
    return taus


class _ShapeBatches:
    """Collects modules of equal shape into batches of bounded size (in elements of stacked taus)."""

    def __init__(self, n_adapters: int, budget_elements: int) -> None:
        self.n_adapters = n_adapters
        self.budget_elements = budget_elements
        self.pending: dict[tuple[int, int], list[Module]] = {}

    def _capacity(self, shape: tuple[int, int]) -> int:
        per_module = self.n_adapters * shape[0] * shape[1]
        return max(1, min(MAX_BATCH_MODULES, self.budget_elements // per_module))

    def add(self, name: str, factors: list[LoraFactors | None], shape: tuple[int, int]) -> list[list[Module]]:
        """Adds a module; returns the batches that are now ready."""
        bucket = self.pending.setdefault(shape, [])
        bucket.append((name, factors))
        ready = []
        if len(bucket) >= self._capacity(shape):
            ready.append(self.pending.pop(shape))
        if sum(len(b) for b in self.pending.values()) >= MAX_BATCH_MODULES:
            fullest = max(self.pending, key=lambda s: len(self.pending[s]))
            ready.append(self.pending.pop(fullest))
        return ready

    def drain(self) -> list[list[Module]]:
        ready = list(self.pending.values())
        self.pending.clear()
        return ready
