"""Turning a merged delta back into LoRA factors B' (out, k) and A' (k, in) with scale 1.

Every path reduces the delta to `left @ core @ right^T` with orthonormal `left`/`right` columns and a
small `core`, takes the SVD of the core on the CPU in float64 (cheap, and exact to rounding), keeps the
top k singular triplets and splits each singular value as sqrt on both sides (balanced factors survive a
cast to bfloat16 better than all the scale on one side).

- Low-rank results (linear, slerp): the delta is sum_i c_i B_i A_i = [c_i B_i] @ [A_i]; QR of both
  stacked factors gives left, right and core = R_B R_A^T, so no out x in matrix is ever formed and the
  error is exact: sqrt(sum of the dropped singular values squared).
- cat: the scaled factors side by side, exactly (rank = sum of ranks).
- Dense results (ties, dare_*, magnitude_prune): a randomized range finder with power iterations
  (Halko, Martinsson and Tropp, 2011) gives left; right and core come from a QR of D^T @ left. Small
  modules, or ranks near min(out, in), take the exact path (QR of the whole delta).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch

from merge_worker.factors import MergedModule

Rank = int | Literal["auto"]

OVERSAMPLE = 8
POWER_ITERATIONS = 2
# Randomized SVD only pays off when its sketch is much thinner than the matrix.
EXACT_WHEN_SKETCH_REACHES = 0.5  # fraction of min(out, in)
AUTO_FIRST_SKETCH = 64
# Below this relative error the estimate ||D||^2 - sum(s_k^2) loses to cancellation: measure directly.
DIRECT_ERROR_BELOW = 1e-2


def choose_rank(
    singular_values: torch.Tensor, rank: Rank, energy: float, total_sq: float, cap: int, cap_reason: str
) -> tuple[int, str]:
    """How many singular triplets to keep, and a note when the requested rank had to be clamped.

    `rank: auto` keeps the fewest whose squares reach `energy * total_sq`."""
    if rank == "auto":
        cumulative = torch.cumsum(singular_values.double() ** 2, 0)
        reached = int(torch.searchsorted(cumulative, energy * total_sq)) + 1
        return max(1, min(reached, cap, len(singular_values))), ""
    if rank > cap:
        return cap, f"rank clamped from {rank} to {cap} ({cap_reason})"
    return rank, ""


def zero_module(out_features: int, in_features: int, like: torch.Tensor, note: str = "") -> MergedModule:
    """A rank-1 all-zero adapter for a module whose merged delta is exactly zero."""
    b = torch.zeros(out_features, 1, dtype=like.dtype, device=like.device)
    a = torch.zeros(1, in_features, dtype=like.dtype, device=like.device)
    return MergedModule(b=b, a=a, relative_error=0.0, note=note or "the merged delta is zero")


def _core_svd(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of small (..., p, q) cores on the CPU in float64; U and Vh return in core's dtype and device."""
    u, s, vh = torch.linalg.svd(core.detach().to("cpu", torch.float64), full_matrices=False)
    return u.to(core.device, core.dtype), s, vh.to(core.device, core.dtype)


def _assemble(
    left: torch.Tensor | None, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
    right: torch.Tensor | None, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B' = left @ U_k sqrt(S_k), A' = sqrt(S_k) Vh_k @ right^T (None stands for the identity).

    Works on one module or on a batch (leading dimensions)."""
    root = s[..., :k].sqrt().to(u.device, u.dtype)
    b = u[..., :k] * root[..., None, :]
    a = root[..., :, None] * vh[..., :k, :]
    if left is not None:
        b = left @ b
    if right is not None:
        a = a @ right.mT
    return b.contiguous(), a.contiguous()


def concatenate(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coeffs: Sequence[float], rank: Rank
) -> MergedModule:
    """cat: B' = [sqrt|c_i| sign(c_i) B_i], A' = [sqrt|c_i| A_i]; B' @ A' = sum_i c_i B_i A_i exactly."""
    terms = [(c, b, a) for c, b, a in zip(coeffs, bs, as_) if c != 0]
    if not terms:
        return zero_module(bs[0].shape[0], as_[0].shape[1], bs[0])
    b = torch.cat([math.copysign(math.sqrt(abs(c)), c) * b for c, b, _ in terms], dim=1)
    a = torch.cat([math.sqrt(abs(c)) * a for c, _, a in terms], dim=0)
    total = b.shape[1]
    note = "" if rank == total else (
        f"cat stores the exact concatenation (rank {total}); output.rank {rank} not applied"
    )
    return MergedModule(b=b.contiguous(), a=a.contiguous(), relative_error=0.0, note=note)


def factor_low_rank(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coeffs: Sequence[float],
    rank: Rank, energy: float,
) -> MergedModule:
    """Factors sum_i coeffs[i] * bs[i] @ as_[i] exactly, never forming an out x in matrix."""
    out_features, in_features = bs[0].shape[0], as_[0].shape[1]
    terms = [(c, b, a) for c, b, a in zip(coeffs, bs, as_) if c != 0]
    if not terms:
        return zero_module(out_features, in_features, bs[0])
    stacked_b = torch.cat([c * b for c, b, _ in terms], dim=1)
    stacked_a = torch.cat([a for _, _, a in terms], dim=0)
    left, r_left = torch.linalg.qr(stacked_b)
    right, r_right = torch.linalg.qr(stacked_a.T)
    u, s, vh = _core_svd(r_left @ r_right.T)
    if s[0] == 0:
        return zero_module(out_features, in_features, bs[0])
    # Singular values under this are rounding noise of the stacked factors, not rank.
    tolerance = float(s[0]) * max(out_features, in_features) * torch.finfo(stacked_b.dtype).eps
    exact_rank = int((s > tolerance).sum())
    total_sq = float((s**2).sum())
    k, note = choose_rank(s, rank, energy, total_sq, exact_rank, "the exact rank of the merged delta")
    b, a = _assemble(left, u, s, vh, right, k)
    error = math.sqrt(float((s[k:] ** 2).sum()) / total_sq)
    return MergedModule(b=b, a=a, relative_error=error, note=note)


def _exact_core(delta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """delta = left @ core @ right^T from one QR of the delta's thinner side."""
    if delta.shape[0] <= delta.shape[1]:
        q, r = torch.linalg.qr(delta.T)  # delta = r^T q^T
        return None, r.T, q
    q, r = torch.linalg.qr(delta)
    return q, r, None


def _sketch_core(
    deltas: torch.Tensor, width: int, power_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder on (M, out, in) deltas: deltas ~= left @ core @ right^T, `width` columns."""
    # One fixed probe for every module: the output bytes depend neither on chance nor on batching.
    generator = torch.Generator(device=deltas.device).manual_seed(0)
    probe = torch.randn(deltas.shape[2], width, generator=generator, dtype=deltas.dtype, device=deltas.device)
    for orthonormalize in (_cholesky_qr, _householder_q):
        left = orthonormalize(deltas @ probe)
        for _ in range(power_iterations):
            left = orthonormalize(deltas @ orthonormalize(deltas.mT @ left))
        projected = deltas.mT @ left  # = deltas^T left, so left^T deltas = projected^T
        right = orthonormalize(projected)
        if orthonormalize is _householder_q or _orthonormal(left, right):
            return left, projected.mT @ right, right  # left^T deltas = core @ right^T
    raise AssertionError("unreachable")


def _householder_q(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _cholesky_qr(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning y's, by Cholesky QR applied twice: two small Gram matrices instead of
    a Householder QR of a tall matrix, which is far slower on a GPU. Loses orthogonality (NaNs included)
    when y is near rank-deficient; the caller checks and falls back to Householder."""
    for _ in range(2):
        chol = torch.linalg.cholesky_ex(y.mT @ y).L
        y = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)  # y @ inv(L^T)
    return y


def _orthonormal(*qs: torch.Tensor) -> bool:
    """Whether every q has orthonormal columns (one host round trip for all of them)."""
    deviations = []
    for q in qs:
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        deviations.append((q.mT @ q - eye).abs().amax())
    return bool((torch.stack(deviations) < 1e-3).all())  # False for NaN as well


def _measured_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, norm: float) -> float:
    return float(torch.linalg.matrix_norm(torch.addmm(delta, b, a, alpha=-1))) / norm


def _relative_error(
    delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: torch.Tensor, k: int, sketched: bool, norm: float
) -> float:
    """||delta - b @ a|| / ||delta|| from the core's singular values `s` (host float64)."""
    if sketched:  # the sketch may miss part of the delta: what the kept values do not hold is the error
        error_sq = max(norm**2 - float((s[:k] ** 2).sum()), 0.0) / norm**2
    else:  # the exact core holds all of the delta: the error is its dropped singular values
        error_sq = float((s[k:] ** 2).sum() / (s**2).sum())
    error = math.sqrt(error_sq)
    if sketched and error < DIRECT_ERROR_BELOW:
        error = _measured_error(delta, b, a, norm)
    return error


def _dense_module(
    delta: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, note: str, sketched: bool, norm: float,
) -> MergedModule:
    b, a = _assemble(left, u, s, vh, right, k)
    return MergedModule(b=b, a=a, relative_error=_relative_error(delta, b, a, s, k, sketched, norm), note=note)


def _sketch_width(k: int, smaller_side: int) -> int:
    return min(k + OVERSAMPLE, smaller_side)


def _use_exact(width: int, smaller_side: int) -> bool:
    return width >= EXACT_WHEN_SKETCH_REACHES * smaller_side


def factor_dense(
    deltas: torch.Tensor, rank: Rank, energy: float, *,
    exact: bool | None = None, power_iterations: int = POWER_ITERATIONS, out_device: torch.device | None = None,
) -> list[MergedModule]:
    """Truncated-SVD factors of each of the (M, out, in) dense deltas.

    `exact` forces (True) or forbids (False) the exact path; None picks by size. The factors come back
    on `out_device` (default: the deltas' device)."""
    out_device = deltas.device if out_device is None else torch.device(out_device)
    smaller_side = min(deltas.shape[1:])
    norms = torch.linalg.matrix_norm(deltas).tolist()
    if rank == "auto":
        return [
            _moved(_auto_rank_module(delta, norm, energy, exact, power_iterations), out_device)
            for delta, norm in zip(deltas, norms)
        ]
    k, note = choose_rank(torch.empty(0), rank, energy, 0.0, smaller_side, "min(out, in)")
    width = _sketch_width(k, smaller_side)
    if not (exact if exact is not None else _use_exact(width, smaller_side)):
        return _sketched_modules(deltas, norms, k, note, width, power_iterations, out_device)
    results = []
    for delta, norm in zip(deltas, norms):
        if norm == 0:
            results.append(zero_module(*delta.shape, delta.new_empty(0, device=out_device)))
            continue
        left, core, right = _exact_core(delta)
        u, s, vh = _core_svd(core)
        results.append(_moved(_dense_module(delta, left, right, u, s, vh, k, note, False, norm), out_device))
    return results


def _sketched_modules(
    deltas: torch.Tensor, norms: list[float], k: int, note: str, width: int, power_iterations: int,
    out_device: torch.device,
) -> list[MergedModule]:
    """The whole batch through one sketch, one core SVD and one copy of the factors to `out_device`."""
    left, core, right = _sketch_core(deltas, width, power_iterations)
    u, s, vh = _core_svd(core)
    b, a = _assemble(left, u, s, vh, right, k)
    b_out, a_out = b.to(out_device), a.to(out_device)
    results = []
    for m, norm in enumerate(norms):
        if norm == 0:
            results.append(zero_module(*deltas.shape[1:], b_out))
            continue
        error = _relative_error(deltas[m], b[m], a[m], s[m], k, True, norm)
        results.append(MergedModule(b=b_out[m], a=a_out[m], relative_error=error, note=note))
    return results


def _moved(module: MergedModule, device: torch.device) -> MergedModule:
    return dataclasses.replace(module, b=module.b.to(device), a=module.a.to(device))


def _auto_rank_module(
    delta: torch.Tensor, norm: float, energy: float, exact: bool | None, power_iterations: int
) -> MergedModule:
    """rank auto on a dense delta: widen the sketch until it holds `energy` of ||delta||^2."""
    if norm == 0:
        return zero_module(*delta.shape, delta)
    smaller_side = min(delta.shape)
    width = _sketch_width(AUTO_FIRST_SKETCH, smaller_side)
    while exact is not True and not (exact is None and _use_exact(width, smaller_side)):
        left, core, right = _sketch_core(delta[None], width, power_iterations)
        u, s, vh = _core_svd(core[0])
        # The sketch's own energy only ever under-counts: reaching the target here is a guarantee.
        if float((s**2).sum()) >= energy * norm**2:
            k, _ = choose_rank(s, "auto", energy, norm**2, len(s), "")
            return _dense_module(delta, left[0], right[0], u, s, vh, k, "", True, norm)
        if width >= smaller_side:
            break
        width = min(2 * width, smaller_side)
    left, core, right = _exact_core(delta)
    u, s, vh = _core_svd(core)
    k, _ = choose_rank(s, "auto", energy, float((s**2).sum()), len(s), "")
    return _dense_module(delta, left, right, u, s, vh, k, "", False, norm)
