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
    if k <= 0:
        return torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    if k >= x.numel():
        return x.abs().min()
    bits = x.reshape(-1).abs().view(_BITS_DTYPE[x.dtype])
    # The sign bit of |x| is 0, so the magnitude lives in the remaining bits.
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
    return torch.sort(bits, descending=True).values[remaining - 1].view(x.dtype)


def trim_(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zeroes, in place, all but the keep_count(x.numel(), density) largest-magnitude entries of x.

    Entries equal to the threshold are all kept (MERGING.md allows a few more at ties)."""
    if density >= 1:
        return x
    threshold = kth_largest_magnitude(x, keep_count(x.numel(), density))
    return x.masked_fill_(x.abs() < threshold, 0)
