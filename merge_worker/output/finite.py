"""Every floating-point tensor the worker writes is finite after the cast to the output dtype.

Inputs are checked for NaN/Inf when read, but finite values can still overflow on the way out: a
merged delta or a base weight beyond float16's range (65504) becomes Inf when cast. That is an input
error (exit 2, naming spec.output.dtype and the module): the inputs' values do not fit the dtype asked
for. A tensor that is already non-finite before the cast came out of the merge itself (finite inputs,
float32 arithmetic): a failure (exit 1) naming the module, never Inf in the file.
"""

from __future__ import annotations

import math

import torch

from merge_worker.spec import SpecError

DTYPE_FIELD = "spec.output.dtype"


class NonFiniteOutput(RuntimeError):
    """The merge produced NaN or Inf from finite inputs (exit 1)."""


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return True
    # min and max propagate NaN and reach +-Inf: one pass, no boolean temporary as big as the tensor.
    low, high = torch.aminmax(tensor.detach().reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))


def cast_finite(tensor: torch.Tensor, dtype: torch.dtype, what: str, *, copied_from: str | None = None) -> torch.Tensor:
    """`tensor` cast to `dtype` (floating-point tensors only; others are returned as they are), checked
    finite. `what` names the tensor for the user, e.g. "module model.layers.0.q_proj (lora_B)";
    copied_from: the spec field of the input it is copied from unchanged (its NaN/Inf is that input's)."""
    if not tensor.is_floating_point():
        return tensor
    cast = tensor.to(dtype)
    if _finite(cast):
        return cast
    if not _finite(tensor) and copied_from is not None:
        raise SpecError(copied_from, f"{what} holds NaN or Inf")
    if not _finite(tensor):
        raise NonFiniteOutput(f"{what}: the merge produced NaN or Inf from finite inputs; nothing was written")
    largest = float(tensor.detach().abs().max())
    raise SpecError(
        DTYPE_FIELD,
        f"{what}: its values reach {largest:.4g}, beyond the range of {str(dtype).removeprefix('torch.')} "
        f"(largest {torch.finfo(dtype).max:.4g}); this follows from the inputs' values (adapter factors or "
        "base weights this large), so choose output.dtype float32 or bfloat16, or scale the inputs down",
    )
