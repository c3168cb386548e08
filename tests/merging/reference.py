"""Plain float64 definitions of every merge method, written from ../shared/MERGING.md for the tests.

Deliberately naive (dense matrices, full sorts, explicit per-entry rules) and independent of
merge_worker's implementation: the tests compare the real code against these.
"""

from __future__ import annotations

import hashlib
import math

import torch


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    k = round(density * x.numel())
    if k == 0:
        return torch.zeros_like(x)
    threshold = x.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def dare_mask(shape, density: float, seed: int, key: str, index: int, device="cpu") -> torch.Tensor:
    """The kept entries, keyed as documented in docs/merging.md (sha256 of 'seed/key/index'), drawn on
    `device` (the merge device: CPU and CUDA generators give different streams for one seed)."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return (torch.rand(shape, generator=generator, dtype=torch.float32, device=device) < density).cpu()


def linear(taus, weights, lam):
    return lam * sum(w * t for w, t in zip(weights, taus))


def disjoint_mean(us, weights, lam):
    gamma = torch.sign(sum(us))
    num = torch.zeros_like(us[0])
    den = torch.zeros_like(us[0])
    for u, w in zip(us, weights):
        kept = (u != 0) & (torch.sign(u) == gamma)
        num = num + torch.where(kept, u, 0.0)
        den = den + kept.to(torch.float64) * w
    return torch.where(den != 0, lam * num / torch.where(den != 0, den, 1.0), 0.0)


def slerp(a, b, t, lam):
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return lam * ((1 - t) * a + t * b)
    cos = float((a * b).sum() / (na * nb))
    if abs(cos) > 1 - 1e-6:
        return lam * ((1 - t) * a + t * b)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return lam * (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def merge(method: str, taus, weights, *, density=None, lam=1.0, t=0.5, seed=0, key="", device="cpu"):
    """The merged delta of one module; `taus` are dense float64 task vectors (zeros where absent) on the
    CPU; `device` is where DARE's masks are drawn."""
    if method in ("linear", "cat"):
        return linear(taus, weights, lam)
    if method == "magnitude_prune":
        return linear([trim(x, density) for x in taus], weights, lam)
    if method == "ties":
        return disjoint_mean([w * trim(x, density) for w, x in zip(weights, taus)], weights, lam)
    if method in ("dare_linear", "dare_ties"):
        dropped = [
            torch.where(dare_mask(x.shape, density, seed, key, i, device), x / density, 0.0)
            for i, x in enumerate(taus)
        ]
        if method == "dare_linear":
            return linear(dropped, weights, lam)
        return disjoint_mean([w * x for w, x in zip(weights, dropped)], weights, lam)
    if method == "slerp":
        return slerp(taus[0], taus[1], t, lam)
    raise ValueError(method)
