"""finite_check: the bulk NaN/Inf scan of a safetensors file finds every bad entry, whatever chunk or
dtype run it falls in, and narrows the suspects to the tensors of the failing chunk."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from merge_worker.finite_check import suspect_tensors

TENSORS = {  # mixed dtypes and an integer tensor between float runs
    "a": (torch.float32, (40, 3)),
    "b": (torch.float32, (7,)),
    "c": (torch.bfloat16, (5, 9)),
    "d": (torch.int64, (6,)),
    "e": (torch.float16, (33,)),
    "f": (torch.float32, (0,)),
    "g": (torch.float32, (64, 2)),
}


def write(path, poison: tuple[str, int, float] | None = None):
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for key, (dtype, shape) in TENSORS.items():
        if dtype.is_floating_point:
            tensors[key] = torch.randn(shape, generator=generator).to(dtype)
        else:
            tensors[key] = torch.arange(shape[0], dtype=dtype)
    if poison:
        key, index, value = poison
        tensors[key].view(-1)[index] = value
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("chunk_bytes", [8, 64, 1 << 20])
def test_a_clean_file_has_no_suspects(tmp_path, chunk_bytes):
    assert suspect_tensors(write(tmp_path / "x.safetensors"), chunk_bytes) == []


@pytest.mark.parametrize("chunk_bytes", [8, 64, 1 << 20])
@pytest.mark.parametrize("key,index", [("a", 0), ("a", 119), ("b", 6), ("c", 44), ("e", 17), ("g", 127)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_bad_entry_is_found_and_its_tensor_is_a_suspect(tmp_path, chunk_bytes, key, index, value):
    suspects = suspect_tensors(write(tmp_path / "x.safetensors", (key, index, value)), chunk_bytes)
    assert key in suspects
    if chunk_bytes == 8:  # a chunk this small spans at most two tensors
        assert len(suspects) <= 2
