"""The last step of magnitude_prune, ties and dare_*: combine task vectors after sparsification.

`merge_kept` sees each tau_i only through `t_i = where(|tau_i| >= threshold_i, tau_i, 0)` (a threshold of
0 keeps everything, as DARE needs after its own drop) and returns either lambda * sum_i w_i t_i or the
TIES sign election with disjoint mean. On a CUDA device with float32 it runs as one fused Triton kernel:
each entry of every task vector is read once and the delta written once, instead of the dozen full-size
passes (masks, products, sums) that the same arithmetic costs as separate torch operations. Elsewhere
(CPU, float64) it is those plain torch operations, which are also the definition the kernel is tested
against (through Triton's interpreter, on the CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.base import weighted_sum
from merge_worker.trim import zero_below_

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton takes the torch path
    triton = None


def elect_and_disjoint_mean(
    taus: torch.Tensor, weights: Sequence[float], lambda_: float, *, normalize: bool = True,
    mergekit: bool = False,
) -> torch.Tensor:
    """Steps 2-4 of TIES on (adapters, ...) task vectors, overwriting `taus`.

    u_i = w_i * t_i; gamma = sign(sum_i u_i); keep u_i where it is non-zero with sign gamma;
    delta = lambda * sum(kept u_i) / sum(w_i of kept i), and 0 where nothing is kept (normalize false:
    no division). mergekit: a sum of exactly 0 elects +, and a kept weight sum of 0 divides by 1."""
    u = taus
    for ui, wi in zip(u, weights):
        ui.mul_(wi)
    total = u.sum(0)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(total.dtype) if mergekit else total.sign_()
    kept_sum = torch.zeros_like(gamma)
    kept_weight = torch.zeros_like(gamma)
    for ui, wi in zip(u, weights):
        kept = (ui * gamma) > 0  # non-zero and of the elected sign
        kept_sum.add_(ui * kept)
        kept_weight.add_(kept, alpha=wi)
    if not normalize:
        return kept_sum.mul_(lambda_)
    # Dividing by +inf where no weight was kept gives adaptermerge's 0 (kept_sum is 0 there too unless
    # weights cancel); mergekit divides by 1 there.
    kept_weight.masked_fill_(kept_weight == 0, 1.0 if mergekit else float("inf"))
    return kept_sum.div_(kept_weight).mul_(lambda_)


def weight_divisor(weights: Sequence[float]) -> float:
    """What normalize divides a linear merge by: the sum of the weights (1 when it is about 0, as
    mergekit does)."""
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total


def merge_kept(
    taus: torch.Tensor, thresholds: torch.Tensor, weights: Sequence[float], lambda_: float, *, ties: bool,
    normalize: bool | None = None, mergekit: bool = False,
) -> torch.Tensor:
    """Merges (adapters, modules, ...) task vectors, keeping entries with |tau| >= thresholds[i, m].

    normalize (default: ties) divides by the kept weights (ties) or by the sum of weights (linear);
    mergekit picks mergekit's sign tie-break (elect_and_disjoint_mean). May overwrite `taus`. Returns
    (modules, ...)."""
    normalize = ties if normalize is None else normalize
    if not ties and normalize:
        lambda_ = lambda_ / weight_divisor(weights)
        normalize = False
    if triton is not None and taus.is_cuda and taus.dtype == torch.float32:
        return launch_fused(_fused_kernel, taus, thresholds, weights, lambda_, ties=ties, normalize=normalize,
                            mergekit=mergekit)
    return merge_kept_torch(taus, thresholds, weights, lambda_, ties=ties, normalize=normalize, mergekit=mergekit)


def merge_kept_torch(
    taus: torch.Tensor, thresholds: torch.Tensor, weights: Sequence[float], lambda_: float, *, ties: bool,
    normalize: bool | None = None, mergekit: bool = False,
) -> torch.Tensor:
    """The plain-torch definition of merge_kept (overwrites `taus`)."""
    for per_adapter, per_threshold in zip(taus, thresholds):
        for tau, threshold in zip(per_adapter, per_threshold):
            zero_below_(tau, threshold)
    if ties:
        return elect_and_disjoint_mean(taus, weights, lambda_, normalize=ties if normalize is None else normalize,
                                       mergekit=mergekit)
    scale = weight_divisor(weights) if normalize else 1.0
    return weighted_sum(taus, weights, lambda_ / scale)


BLOCK = 1024


def launch_fused(
    kernel, taus: torch.Tensor, thresholds: torch.Tensor, weights: Sequence[float], lambda_: float,
    *, ties: bool, normalize: bool = True, mergekit: bool = False,
) -> torch.Tensor:
    """Runs `kernel` (the jitted one, or an interpreted copy in the tests) over contiguous taus."""
    n_adapters, n_modules = taus.shape[:2]
    numel = taus[0, 0].numel()
    taus = taus.contiguous()
    out = torch.empty(taus.shape[1:], dtype=taus.dtype, device=taus.device)
    thresholds = thresholds.to(device=taus.device, dtype=taus.dtype).contiguous()
    w = torch.tensor(list(weights), dtype=taus.dtype, device=taus.device)
    grid = (triton.cdiv(numel, BLOCK), n_modules)
    kernel[grid](taus, thresholds, w, out, numel, n_modules, float(lambda_),
                 N_ADAPTERS=n_adapters, TIES=ties, NORMALIZE=normalize, MERGEKIT=mergekit, BLOCK=BLOCK)
    return out


def _fused(taus_ptr, thresholds_ptr, weights_ptr, out_ptr, numel, n_modules, lambda_,
           N_ADAPTERS: tl.constexpr, TIES: tl.constexpr, NORMALIZE: tl.constexpr, MERGEKIT: tl.constexpr,
           BLOCK: tl.constexpr):
    """One block of BLOCK entries of one module: the sparse merge of every adapter's entries there."""
    module = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    total = tl.full([BLOCK], 0.0, tl.float32)
    for i in tl.static_range(N_ADAPTERS):
        row = (i * n_modules + module).to(tl.int64) * numel
        x = tl.load(taus_ptr + row + offsets, mask=in_range, other=0.0)
        threshold = tl.load(thresholds_ptr + i * n_modules + module)
        total += tl.where(tl.abs(x) >= threshold, x * tl.load(weights_ptr + i), 0.0)
    if TIES:
        kept_sum = tl.full([BLOCK], 0.0, tl.float32)
        kept_weight = tl.full([BLOCK], 0.0, tl.float32)
        for i in tl.static_range(N_ADAPTERS):
            # The second read of this block hits the cache: HBM traffic stays one read per entry.
            row = (i * n_modules + module).to(tl.int64) * numel
            x = tl.load(taus_ptr + row + offsets, mask=in_range, other=0.0)
            threshold = tl.load(thresholds_ptr + i * n_modules + module)
            w = tl.load(weights_ptr + i)
            u = tl.where(tl.abs(x) >= threshold, x * w, 0.0)
            if MERGEKIT:  # a sum of exactly 0 elects +
                kept = ((u > 0) & (total >= 0)) | ((u < 0) & (total < 0))
            else:
                kept = ((u > 0) & (total > 0)) | ((u < 0) & (total < 0))
            kept_sum += tl.where(kept, u, 0.0)
            kept_weight += tl.where(kept, w, 0.0)
        if not NORMALIZE:
            result = kept_sum * lambda_
        elif MERGEKIT:  # no kept weight: divide by 1
            result = tl.where(kept_weight != 0, kept_sum / kept_weight, kept_sum) * lambda_
        else:
            result = tl.where(kept_weight != 0, kept_sum / kept_weight, 0.0) * lambda_
    else:
        result = total * lambda_
    tl.store(out_ptr + module.to(tl.int64) * numel + offsets, result, mask=in_range)


_fused_kernel = triton.jit(_fused) if triton is not None else None
