"""trim(x, density): keep the round(density * numel) largest-magnitude entries, zero the rest.

The threshold (the k-th largest |x|) is found exactly without sorting the whole tensor: a full sort
(what torch.kthvalue does) of tens of millions of entries dominates a TIES merge on a GPU. Instead we
radix-select over the float's bit pattern: for a non-negative float the bits, read as an integer, order
exactly like the values. Each pass histograms one digit of the bits (2048 bins: small enough for fast
shared-memory histograms on a GPU), keeps only the entries whose digit holds the k-th largest, and a
final sort finishes a candidate set that has become small. Passes over the full tensor: one histogram
and one gather; later passes only touch the survivors.

On a CUDA device (float32) a faster exact selection brackets the threshold first: the quantile of a
random sample gives a value range that holds the k-th largest with overwhelming probability; one fused
Triton pass counts the entries above and inside that range for every task vector of a batch at once, a
second copies the few inside (about 1%) out, and one sort of those finishes all of them. A row whose
bracket missed (checked exactly from the counts) falls back to the radix selection.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton uses the radix selection everywhere
    triton = None

_DIGIT_BITS = 11
_SORT_AT_MOST = 1 << 14  # candidate sets this small are finished by a plain sort
# Same-width integer views of floats, for reading their bit patterns.
_BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def keep_count(numel: int, density: float) -> int:
    """How many entries trim keeps under adaptermerge conventions: round(density * numel) (docs/merging.md)."""
    return round(density * numel)


def kth_largest_magnitude(x: torch.Tensor, k: int, *, sort_at_most: int = _SORT_AT_MOST) -> torch.Tensor:
    """The k-th largest |x| as a 0-d tensor, exactly (+inf for k <= 0: nothing reaches it).

    Radix passes run while more than `sort_at_most` candidates remain; then a sort finishes."""
    return _kth_largest_nonnegative(x.abs(), k, sort_at_most)


def _kth_largest_nonnegative(magnitudes: torch.Tensor, k: int, sort_at_most: int) -> torch.Tensor:
    if k <= 0:
        return torch.tensor(float("inf"), dtype=magnitudes.dtype, device=magnitudes.device)
    if k >= magnitudes.numel():
        return magnitudes.min()
    bits = magnitudes.reshape(-1).view(_BITS_DTYPE[magnitudes.dtype])
    # The sign bit of a magnitude is 0, so the value lives in the remaining bits.
    shift = bits.element_size() * 8 - 1
    remaining = k  # the k-th largest overall is the `remaining`-th largest among the candidates
    while bits.numel() > sort_at_most and shift > 0:
        width = min(_DIGIT_BITS, shift)
        shift -= width
        digit = (bits >> shift) & ((1 << width) - 1)
        counts = torch.bincount(digit, minlength=1 << width)
        at_or_above = counts.flip(0).cumsum(0)  # [j]: entries whose digit is >= (bins - 1 - j)
        j = int(torch.searchsorted(at_or_above, remaining))
        chosen = (1 << width) - 1 - j
        remaining -= int(at_or_above[j] - counts[chosen])
        bits = bits[digit == chosen]
    return torch.sort(bits, descending=True).values[remaining - 1].view(magnitudes.dtype)


def magnitude_thresholds(taus: torch.Tensor, density: float) -> torch.Tensor:
    """trim's threshold for each task vector taus[i, m] of (adapters, modules, ...): an (adapters, modules)
    tensor on taus' device; entries with |tau| >= threshold survive (0 keeps all: density 1)."""
    if density >= 1:
        return torch.zeros(taus.shape[:2], dtype=taus.dtype, device=taus.device)
    n = taus[0, 0].numel()
    return count_thresholds(taus, [keep_count(n, density)] * taus.shape[0])


def count_thresholds(taus: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """For each task vector taus[i, m], the counts[i]-th largest |tau| (+inf for a count <= 0): an
    (adapters, modules) tensor. One batched selection when every adapter has the same count (views only:
    per-adapter counts select adapter by adapter rather than copy the task vectors)."""
    if len(set(counts)) == 1:
        return _row_thresholds(taus.reshape(taus.shape[0] * taus.shape[1], -1), counts[0]).view(taus.shape[:2])
    return torch.stack([_row_thresholds(taus[i].reshape(taus.shape[1], -1), k) for i, k in enumerate(counts)])


def _row_thresholds(rows: torch.Tensor, k: int) -> torch.Tensor:
    if triton is not None and rows.is_cuda and rows.dtype == torch.float32:
        return bracketed_kth_largest(rows, k)
    return _radix_rows(rows, k)


def _radix_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([_kth_largest_nonnegative(row.abs(), k, _SORT_AT_MOST) for row in rows])


# A larger sample narrows the bracket (fewer candidates to gather and sort) but costs a larger sample sort;
# 2**18 balances the two for modules of 16M-45M entries.
SAMPLE = 1 << 18
MARGIN_SIGMAS = 6.0  # a sample quantile this many standard deviations off happens ~1e-9 of the time
BLOCK = 4096


def bracketed_kth_largest(
    rows: torch.Tensor, k: int, *, sample: int = SAMPLE, margin_sigmas: float = MARGIN_SIGMAS,
    kernels: tuple | None = None,
) -> torch.Tensor:
    """The k-th largest |x| of each row of a contiguous float32 (rows, n) tensor, exactly.

    `kernels` (count, gather) default to the jitted Triton kernels; the tests pass interpreted ones."""
    count_kernel, gather_kernel = kernels or (_count_kernel, _gather_kernel)
    n_rows, n = rows.shape
    if k <= 0 or k >= n:
        return _radix_rows(rows, k)
    rows = rows.contiguous()
    lo, hi = _bracket(rows, k, sample, margin_sigmas)
    grid = (triton.cdiv(n, BLOCK), n_rows)
    counts = torch.zeros(n_rows, 2, dtype=torch.int64, device=rows.device)  # [#(|x| > hi), #(|x| >= lo)]
    count_kernel[grid](rows, lo, hi, counts, n, BLOCK=BLOCK)
    above, at_least = counts.T.tolist()
    hit = [a < k <= b for a, b in zip(above, at_least)]
    sizes = [b - a if ok else 0 for a, b, ok in zip(above, at_least, hit)]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    thresholds = torch.empty(n_rows, dtype=rows.dtype, device=rows.device)
    if offsets[-1]:
        lo = torch.where(torch.tensor(hit, device=rows.device), lo, math.inf)  # missed rows gather nothing
        keys = torch.empty(offsets[-1], dtype=torch.int64, device=rows.device)
        cursor = torch.zeros(n_rows, dtype=torch.int64, device=rows.device)
        starts = torch.tensor(offsets[:-1], dtype=torch.int64, device=rows.device)
        gather_kernel[grid](rows, lo, hi, starts, cursor, keys, n, BLOCK=BLOCK)
        # Keys are (row << 31) | bits of |x|: one sort orders every row's candidates, rows apart.
        keys = torch.sort(keys).values
        picks = [offsets[r] + sizes[r] - (k - above[r]) for r in range(n_rows) if hit[r]]
        chosen = keys[torch.tensor(picks, device=rows.device)] & ((1 << 31) - 1)
        thresholds[torch.tensor(hit, device=rows.device)] = chosen.to(torch.int32).view(torch.float32)
    for r in (r for r in range(n_rows) if not hit[r]):
        thresholds[r] = _kth_largest_nonnegative(rows[r].abs(), k, _SORT_AT_MOST)
    return thresholds


def _bracket(rows: torch.Tensor, k: int, sample: int, margin_sigmas: float):
    """Per row (lo, hi) from a random sample's quantiles, so that lo <= k-th largest |x| <= hi."""
    n = rows.shape[1]
    size = min(sample, n)
    generator = torch.Generator(device=rows.device).manual_seed(0)
    picked = torch.randint(n, (size,), generator=generator, device=rows.device)
    ranked = rows[:, picked].abs().sort(dim=1, descending=True).values
    p = k / n
    spread = margin_sigmas * math.sqrt(size * p * (1 - p)) + 1
    hi_at, lo_at = math.floor(p * size - spread), math.ceil(p * size + spread)
    infinity = torch.full((rows.shape[0],), math.inf, dtype=rows.dtype, device=rows.device)
    hi = ranked[:, hi_at] if hi_at >= 0 else infinity
    lo = ranked[:, lo_at] if lo_at < size else torch.zeros_like(infinity)
    return lo.contiguous(), hi.contiguous()


def _count(rows_ptr, lo_ptr, hi_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    """Adds to counts[row] the number of |x| > hi and of |x| >= lo in one block of one row."""
    row = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    a = tl.abs(tl.load(rows_ptr + row.to(tl.int64) * n + offsets, mask=inside, other=0.0))
    above = tl.sum((inside & (a > tl.load(hi_ptr + row))).to(tl.int64), axis=0)
    at_least = tl.sum((inside & (a >= tl.load(lo_ptr + row))).to(tl.int64), axis=0)
    tl.atomic_add(counts_ptr + 2 * row, above)
    tl.atomic_add(counts_ptr + 2 * row + 1, at_least)


def _gather(rows_ptr, lo_ptr, hi_ptr, starts_ptr, cursor_ptr, keys_ptr, n, BLOCK: tl.constexpr):
    """Appends (row << 31) | bits(|x|) of the block's entries with lo <= |x| <= hi to the row's segment."""
    row = tl.program_id(1)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    a = tl.abs(tl.load(rows_ptr + row.to(tl.int64) * n + offsets, mask=inside, other=0.0))
    take = inside & (a >= tl.load(lo_ptr + row)) & (a <= tl.load(hi_ptr + row))
    # The scan runs in 32 bits (a block never holds more than 2**31 entries): half the cost of 64.
    taken = tl.sum(take.to(tl.int32), axis=0)
    if taken > 0:
        base = tl.atomic_add(cursor_ptr + row, taken.to(tl.int64)) + tl.load(starts_ptr + row)
        slots = base + (tl.cumsum(take.to(tl.int32), axis=0) - 1).to(tl.int64)
        keys = (row.to(tl.int64) << 31) | a.to(tl.int32, bitcast=True).to(tl.int64)
        tl.store(keys_ptr + slots, keys, mask=take)


_count_kernel = triton.jit(_count) if triton is not None else None
_gather_kernel = triton.jit(_gather) if triton is not None else None


def zero_below_(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Zeroes, in place, the entries of x with |x| < threshold."""
    return x.masked_fill_(x.abs() < threshold, 0)


def trim_(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zeroes, in place, all but the keep_count(x.numel(), density) largest-magnitude entries of x.

    Entries equal to the threshold are all kept (docs/merging.md: a few more at ties)."""
    if density >= 1:
        return x
    return zero_below_(x, kth_largest_magnitude(x, keep_count(x.numel(), density)))
