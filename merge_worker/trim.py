"""trim(x, density): keep the round(density * numel) largest-magnitude entries, zero the rest.

The threshold (the k-th largest |x|) is found exactly without sorting the whole tensor: a full sort
(what torch.kthvalue does) of tens of millions of entries dominates a TIES merge on a GPU. Instead we
radix-select over the float's bit pattern: for a non-negative float the bits, read as an integer, order
exactly like the values. Each pass histograms one digit of the bits (2048 bins: small enough for fast
shared-memory histograms on a GPU), keeps only the entries whose digit holds the k-th largest, and a
final sort finishes a candidate set that has become small. Passes over the full tensor: one histogram
and one gather; later passes only touch the survivors.
"""

from __future__ import annotations

import torch

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
    """How many entries trim keeps: round(density * numel), as MERGING.md defines it."""
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
    k = keep_count(taus[0, 0].numel(), density)
    return torch.stack([
        torch.stack([_kth_largest_nonnegative(tau.abs(), k, _SORT_AT_MOST) for tau in per_adapter])
        for per_adapter in taus
    ])


def zero_below_(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Zeroes, in place, the entries of x with |x| < threshold."""
    return x.masked_fill_(x.abs() < threshold, 0)


def trim_(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zeroes, in place, all but the keep_count(x.numel(), density) largest-magnitude entries of x.

    Entries equal to the threshold are all kept (MERGING.md allows a few more at ties)."""
    if density >= 1:
        return x
    return zero_below_(x, kth_largest_magnitude(x, keep_count(x.numel(), density)))
