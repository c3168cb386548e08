"""The torch-free safetensors reader: the NaN/Inf scan finds every bad entry in every float dtype
(float64 to float8), whatever chunk or dtype run it falls in; float64 values beyond float32's range are
refused; the tensors it reads equal what the safetensors library reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_worker.inputs.safetensors_file import SafetensorsFile
from merge_worker.inputs.volume_files import VolumeRoot

TENSORS = {  # mixed dtypes and an integer tensor between float runs
    "a": (torch.float32, (40, 3)),
    "b": (torch.float32, (7,)),
    "c": (torch.bfloat16, (5, 9)),
    "d": (torch.int64, (6,)),
    "e": (torch.float16, (33,)),
    "f": (torch.float32, (0,)),
    "g": (torch.float32, (64, 2)),
    "h": (torch.float64, (10,)),
    "i": (torch.float8_e4m3fn, (12,)),
    "j": (torch.float8_e5m2, (12,)),
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


def open_file(path) -> SafetensorsFile:
    return SafetensorsFile(VolumeRoot(path.parent).open_file(path.name, path))


@pytest.mark.parametrize("chunk_bytes", [8, 64, 1 << 20])
def test_a_clean_file_is_fine(tmp_path, chunk_bytes):
    assert open_file(write(tmp_path / "x.safetensors")).first_unusable(chunk_bytes=chunk_bytes) is None


@pytest.mark.parametrize("chunk_bytes", [8, 64, 1 << 20])
@pytest.mark.parametrize("key,index", [("a", 0), ("a", 119), ("b", 6), ("c", 44), ("e", 17), ("g", 127),
                                       ("h", 9), ("i", 3), ("j", 11)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_bad_entry_is_found_and_named(tmp_path, chunk_bytes, key, index, value):
    bad = open_file(write(tmp_path / "x.safetensors", (key, index, value))).first_unusable(chunk_bytes=chunk_bytes)
    # float8 e4m3fn has no Inf: torch stores an infinite value as NaN there.
    expected = "NaN" if value != value or TENSORS[key][0] == torch.float8_e4m3fn else "Inf"
    assert bad == (key, expected)


def test_float64_beyond_float32_is_refused(tmp_path):
    bad = open_file(write(tmp_path / "x.safetensors", ("h", 2, 1e39))).first_unusable()
    assert bad is not None and bad[0] == "h" and "float32" in bad[1]


def test_tensors_equal_the_library_s(tmp_path):
    path = write(tmp_path / "x.safetensors")
    ours, theirs = open_file(path), load_file(str(path))
    assert ours.keys() == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours.tensor(key).dtype == tensor.dtype
        assert torch.equal(ours.tensor(key).view(torch.uint8), tensor.view(torch.uint8))
