"""Plain float64 definitions of every merge method, written from docs/merging.md (and, for the mergekit
conventions, from mergekit's definitions as that page states them) for the tests.

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


def slerp(a, b, t, lam):
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return lam * ((1 - t) * a + t * b)
    cos = float((a * b).sum() / (na * nb))
    if abs(cos) > 1 - 1e-6:
        return lam * ((1 - t) * a + t * b)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return lam * (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def keep_counts(n: int, density: float, conventions: str) -> int:
    if density >= 1:
        return n
    if conventions == "mergekit":
        return int(density * n)
    return round(density * n)


def trim_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the entries of x whose magnitude reaches the k-th largest one (ties at it all kept)."""
    if k <= 0:
        return torch.zeros_like(x)
    threshold = x.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, conventions: str) -> torch.Tensor:
    """breadcrumbs: skip the top min(gamma n, n - k) magnitudes, keep the next k (k = density n)."""
    n = x.numel()
    if density >= 1:
        return x.clone()
    keep = keep_counts(n, density, conventions)
    top = min(keep_counts(n, gamma, conventions) if gamma > 0 else 0, n - keep)
    if keep == 0:
        return torch.zeros_like(x)
    ranked = x.abs().flatten().sort(descending=True).values
    hi = ranked[top - 1] if top > 0 else math.inf
    lo = ranked[top + keep - 1]
    return torch.where((x.abs() >= lo) & (x.abs() < hi), x, torch.zeros_like(x))


def della_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row, p = density - epsilon + 2 epsilon * (rank / (n - 1)), rank 0 = smallest |x| of the row
    (counted by comparisons), in float32 as mergekit computes it."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    mags = rows.abs()
    ranks = (mags.unsqueeze(-1) > mags.unsqueeze(-2)).sum(-1).to(torch.float32)
    rank_norm = ranks / max(rows.shape[-1] - 1, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(x.shape)


def l1_rescaled(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = float(original.abs().sum()), float(masked.abs().sum())
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def consensus(us, weights, lam, *, normalize: bool, conventions: str):
    """TIES sign election and (normalize) disjoint mean, with either conventions' tie rules."""
    total = sum(us)
    gamma = torch.where(total >= 0, 1.0, -1.0).double() if conventions == "mergekit" else torch.sign(total)
    num = torch.zeros_like(us[0])
    den = torch.zeros_like(us[0])
    for u, w in zip(us, weights):
        kept = (u != 0) & (torch.sign(u) == gamma)
        num = num + torch.where(kept, u, 0.0)
        den = den + kept.to(torch.float64) * w
    if not normalize:
        return lam * num
    if conventions == "mergekit":
        return lam * num / torch.where(den != 0, den, 1.0)
    return torch.where(den != 0, lam * num / torch.where(den != 0, den, 1.0), 0.0)


def nuslerp(a, b, t, lam):
    ua, ub = a / max(float(a.norm()), 1e-7), b / max(float(b.norm()), 1e-7)
    cos = max(-1.0, min(1.0, float((ua * ub).sum())))
    if 1 - cos**2 <= 1e-16:
        return lam * ((1 - t) * a + t * b)
    theta = math.acos(cos)
    return lam * (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def model_stock(taus, lam):
    n = len(taus)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = float(taus[i].norm() * taus[j].norm())
            cosines.append(max(-1.0, min(1.0, float((taus[i] * taus[j]).sum()) / max(product, 1e-6))))
    cos = sum(cosines) / len(cosines)
    t = 0.0 if abs(1 + (n - 1) * cos) < 1e-6 else n * cos / (1 + (n - 1) * cos)
    return lam * t * sum(taus) / n


def sce(taus, lam, select_topk: float, conventions: str):
    tvs = torch.stack(taus)
    if select_topk < 1:
        variance = ((tvs - tvs.mean(0)) ** 2).mean(0)
        nonzero = int((variance != 0).sum())
        k = int(nonzero * select_topk) if conventions == "mergekit" else round(nonzero * select_topk)
        tvs = tvs * (trim_k(variance, k) != 0)
    energy = [float((tv**2).mean()) for tv in tvs]
    total = sum(energy)
    weights = [1 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    ssum = tvs.sum(0)
    gamma = torch.where(ssum >= 0, 1.0, -1.0).double() if conventions == "mergekit" else torch.sign(ssum)
    num = torch.zeros_like(tvs[0])
    den = torch.zeros_like(tvs[0])
    for tv, w in zip(tvs, weights):
        kept = (tv != 0) & (torch.sign(tv) == gamma)
        num = num + torch.where(kept, w * tv, 0.0)
        den = den + kept.double() * w
    return lam * num / den.clamp(min=1e-6)


# (sparsification, elects sign, default normalize, default rescale) per conventions for the
# task-arithmetic family; mergekit's registry is the source of the mergekit column.
FAMILY = {
    "magnitude_prune": ("magnitude", False, {"adaptermerge": False, "mergekit": False}, "none"),
    "ties": ("magnitude", True, {"adaptermerge": True, "mergekit": True}, "none"),
    "dare_linear": ("random", False, {"adaptermerge": False, "mergekit": False},
                    {"adaptermerge": "inverse-probability", "mergekit": "l1"}),
    "dare_ties": ("random", True, {"adaptermerge": True, "mergekit": False},
                  {"adaptermerge": "inverse-probability", "mergekit": "l1"}),
    "breadcrumbs": ("outliers", False, {"adaptermerge": False, "mergekit": False}, "none"),
    "breadcrumbs_ties": ("outliers", True, {"adaptermerge": False, "mergekit": False}, "none"),
    "della": ("della", True, {"adaptermerge": True, "mergekit": True}, "l1"),
    "della_linear": ("della", False, {"adaptermerge": False, "mergekit": False}, "l1"),
}


def merge(method: str, taus, weights, *, density=None, lam=1.0, t=0.5, seed=0, key="", device="cpu",
          densities=None, gamma=None, gammas=None, epsilon=None, epsilons=None, normalize=None, rescale=None,
          conventions="adaptermerge", select_topk=1.0):
    """The merged delta of one module; `taus` are dense float64 task vectors (zeros where absent) on the
    CPU; `device` is where DARE's masks are drawn. Per-adapter lists override density/gamma/epsilon."""
    n = len(taus)

    def each(values, shared, default):
        values = values or [None] * n
        return [v if v is not None else shared if shared is not None else default for v in values]

    if method in ("linear", "cat", "task_arithmetic"):
        default = method == "linear" and conventions == "mergekit"
        total = sum(weights)
        divisor = (1.0 if abs(total) < 1e-8 else total) if (default if normalize is None else normalize) else 1.0
        return linear(taus, weights, lam / divisor)
    if method == "slerp":
        return slerp(taus[0], taus[1], t, lam)
    if method == "nuslerp":
        total = sum(weights)
        return nuslerp(taus[0], taus[1], 0.5 if abs(total) < 1e-6 else weights[1] / total, lam)
    if method == "model_stock":
        return model_stock(taus, lam)
    if method == "sce":
        return sce(taus, lam, select_topk, conventions)
    sparsification, elects, normalize_default, rescale_default = FAMILY[method]
    normalize = normalize_default[conventions] if normalize is None else normalize
    if rescale is None:
        rescale = rescale_default if isinstance(rescale_default, str) else rescale_default[conventions]
    ds = each(densities, density, 1.0)
    sparse = []
    for i, (x, d) in enumerate(zip(taus, ds)):
        if d >= 1:
            kept = x.clone()
        elif sparsification == "magnitude":
            k = keep_counts(x.numel(), d, conventions)
            kept = trim_k(x, max(1, k) if conventions == "mergekit" else k)
        elif sparsification == "outliers":
            kept = magnitude_outliers(x, d, each(gammas, gamma, 0.01)[i], conventions)
        elif sparsification == "random":
            mask = dare_mask(x.shape, d, seed, key, i, device)
            kept = torch.where(mask, x / d if rescale == "inverse-probability" else x, 0.0)
        else:  # della
            e = each(epsilons, epsilon, 0.15)[i]
            p = della_probabilities(x, d, e)
            digest = hashlib.sha256(f"{seed}/{key}/{i}".encode()).digest()
            generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=device).cpu()
            kept = torch.where(u < p, x / p.double() if rescale == "inverse-probability" else x, 0.0)
        if rescale == "l1":
            kept = l1_rescaled(x, kept)
        sparse.append(kept)
    if elects:
        return consensus([w * x for w, x in zip(weights, sparse)], weights, lam, normalize=normalize,
                         conventions=conventions)
    total = sum(weights)
    divisor = (1.0 if abs(total) < 1e-8 else total) if normalize else 1.0
    return linear(sparse, weights, lam / divisor)
