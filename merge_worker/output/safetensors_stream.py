"""Writes .safetensors files one tensor at a time, so a writer never holds more than the tensor at hand.

safetensors' own `save_file` needs every tensor in memory at once (the header, which lists all tensors
and their offsets, comes first in the file). Here the tensors' bytes go to a side file as they arrive;
`close()` writes the header and appends the bytes. Format: an 8-byte little-endian header length, the
JSON header (padded with spaces to a multiple of 8), then the tensors' bytes in header order.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

# safetensors' dtype codes, both ways.
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
FLOAT_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items() if dtype.is_floating_point}


class SafetensorsStreamWriter:
    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors here")
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._data.write(memoryview(raw))
        self._header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + raw.nbytes],
        }
        self.nbytes += raw.nbytes

    @property
    def names(self) -> list[str]:
        return [k for k in self._header if k != "__metadata__"]

    def close(self) -> None:
        self._data.close()
        header = json.dumps(self._header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 20)
        self._data_path.unlink()

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)
