"""Runs a merge method over a stream of modules and yields LoRA factors of the merged deltas.

Modules are consumed lazily and merged in bounded batches, so peak memory depends on the largest module
and the batch budget, never on how many modules a model has. Low-rank methods (linear, task_arithmetic,
cat, slerp, nuslerp, model_stock) go module by module through the exact factoring of refactor.py and
never form out x in matrices. Dense
methods (the sparsifying ones and sce) build the task vectors of a batch of equal-shape modules on the
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
# On a GPU, larger batches mean fewer kernel launches and host round trips per module; peak memory is
# about 1.5 times this (the merged deltas and selection buffers come on top of the task vectors).
DEFAULT_BATCH_BYTES = {"cuda": 3 << 30, "cpu": 256 << 20}
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
            yield from _merge_dense_batch(method, _stage(batch, method.n_adapters, device, dtype), rank, energy,
                                          device)
    if batches is not None:
        for batch in batches.drain():
            yield from _merge_dense_batch(method, _stage(batch, method.n_adapters, device, dtype), rank, energy,
                                          device)


@dataclasses.dataclass
class _Staged:
    """A batch of equal-shape modules whose factors wait on the host, ready for one copy to the device."""

    names: list[str]
    b: torch.Tensor  # (adapters, modules, out, rank): s_i * B_i, zero-padded to the batch's largest rank
    a: torch.Tensor  # (adapters, modules, rank, in)


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
    method: MergeMethod, staged: _Staged, rank, energy: float, device: torch.device,
) -> Iterator[tuple[str, MergedModule]]:
    taus = _task_vectors(staged, device)
    deltas = method.combine(taus, staged.names)
    merged = factor_dense(deltas, rank, energy, out_device=torch.device("cpu"))
    del taus, deltas
    yield from zip(staged.names, merged)


def _stage(batch: list[Module], n_adapters: int, device: torch.device, dtype: torch.dtype) -> _Staged:
    """Copies a batch's factors into two host buffers (pinned for a GPU, so the copy over can overlap
    device work), scaled by s_i and zero-padded to the largest rank: padding adds exact zeros."""
    out_features, in_features = _module_shape(*batch[0])
    rank = max(f.rank for _, factors in batch for f in factors if f is not None)
    pinned = device.type == "cuda"
    b = torch.empty(n_adapters, len(batch), out_features, rank, dtype=dtype, pin_memory=pinned)
    a = torch.empty(n_adapters, len(batch), rank, in_features, dtype=dtype, pin_memory=pinned)
    for m, (_, factors) in enumerate(batch):
        for i, f in enumerate(factors):
            r = 0 if f is None else f.rank
            if r:
                b[i, m, :, :r].copy_(f.b).mul_(f.scale)  # in `dtype`, as the unstaged product would
                a[i, m, :r].copy_(f.a)
            if r < rank:  # only padding and absent adapters need zeros: no full-buffer fill
                b[i, m, :, r:].zero_()
                a[i, m, r:].zero_()
    return _Staged([name for name, _ in batch], b, a)


def _task_vectors(staged: _Staged, device: torch.device) -> torch.Tensor:
    """taus[i, m] = s_i * B_i @ A_i of adapter i on module m (zeros where it does not target it), as one
    batched product on the device."""
    n_adapters, n_modules, out_features, rank = staged.b.shape
    in_features = staged.a.shape[-1]
    b = staged.b.to(device, non_blocking=True).view(-1, out_features, rank)
    a = staged.a.to(device, non_blocking=True).view(-1, rank, in_features)
    taus = torch.empty(n_adapters, n_modules, out_features, in_features, dtype=b.dtype, device=device)
    torch.bmm(b, a, out=taus.view(-1, out_features, in_features))
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
