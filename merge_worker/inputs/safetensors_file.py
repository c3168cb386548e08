"""Reads a .safetensors file through an opened input file, with numpy only (no torch needed).

Our own reader rather than the `safetensors` library: the library opens files by path (we must read
through the fd that merge_worker.inputs.volume_files checked), and its numpy side has no bfloat16 or
float8, which the NaN/Inf scan must cover. The header is validated as safetensors itself does: a typed
entry per tensor, offsets that tile the data exactly, each tensor's byte size equal to its shape times
its dtype's size. So no declared shape can exceed what the file holds.

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}, then the tensors' bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from merge_worker.inputs.json_files import describe_validation_error
from merge_worker.inputs.volume_files import InputFile

MAX_HEADER_BYTES = 100 << 20  # as the safetensors library
CHUNK_BYTES = 64 << 20  # the NaN/Inf scan reads this much at a time (a multiple of every dtype's size)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class DType:
    itemsize: int
    storage: str  # the numpy dtype the bytes are read as
    torch_name: str
    exponent_mask: int | None = None  # float types: bits that are all ones exactly for NaN (and Inf)
    inf_possible: bool = True

    @property
    def is_float(self) -> bool:
        return self.exponent_mask is not None


# safetensors' dtype codes. Non-finite values are found by bit pattern, so every float width works the
# same way: a value is NaN or Inf when all of its mask's bits are set (for float8 e4m3fn only NaN exists:
# S.1111.111; e8m0 has only NaN: 0xff).
DTYPES: dict[str, DType] = {
    "F64": DType(8, "<u8", "float64", 0x7FF0000000000000),
    "F32": DType(4, "<u4", "float32", 0x7F800000),
    "F16": DType(2, "<u2", "float16", 0x7C00),
    "BF16": DType(2, "<u2", "bfloat16", 0x7F80),
    "F8_E5M2": DType(1, "u1", "float8_e5m2", 0x7C),
    "F8_E4M3": DType(1, "u1", "float8_e4m3fn", 0x7F, inf_possible=False),
    "F8_E8M0": DType(1, "u1", "float8_e8m0fnu", 0xFF, inf_possible=False),
    "I64": DType(8, "<i8", "int64"),
    "I32": DType(4, "<i4", "int32"),
    "I16": DType(2, "<i2", "int16"),
    "I8": DType(1, "i1", "int8"),
    "U64": DType(8, "<u8", "uint64"),
    "U32": DType(4, "<u4", "uint32"),
    "U16": DType(2, "<u2", "uint16"),
    "U8": DType(1, "u1", "uint8"),
    "BOOL": DType(1, "u1", "bool"),
}
_MANTISSA = {"F64": (1 << 52) - 1, "F32": (1 << 23) - 1, "F16": 0x3FF, "BF16": 0x7F, "F8_E5M2": 0x3}

TensorName = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f]+$")]


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    dtype: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    data_offsets: list[Annotated[int, Field(ge=0)]] = Field(min_length=2, max_length=2)  # [begin, end)


_HEADER = TypeAdapter(dict[TensorName, TensorEntry])
_METADATA = TypeAdapter(dict[str, str])


class SafetensorsError(ValueError):
    """A malformed file; the message names the field (or tensor) at fault, never a value from it."""


class SafetensorsFile:
    def __init__(self, file: InputFile):
        self.file = file
        self.entries, self.data_start = _read_header(file)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].shape)

    def dtype(self, key: str) -> str:
        return self.entries[key].dtype

    def array(self, key: str) -> np.ndarray:
        """The tensor's elements as stored (bfloat16 and float8 as unsigned integers of their width)."""
        entry = self.entries[key]
        begin, end = entry.data_offsets
        data = np.empty(end - begin, dtype=np.uint8)
        self.file.readinto(memoryview(data), self.data_start + begin)
        return data.view(DTYPES[entry.dtype].storage).reshape(entry.shape)

    def tensor(self, key: str):
        """The tensor as torch reads it (the worker's merge path; needs torch)."""
        import torch

        entry = self.entries[key]
        begin, end = entry.data_offsets
        data = torch.empty(end - begin, dtype=torch.uint8)
        self.file.readinto(memoryview(data.numpy()), self.data_start + begin)
        return data.view(getattr(torch, DTYPES[entry.dtype].torch_name)).reshape(entry.shape)

    def first_unusable(self, keys: list[str] | None = None, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, str] | None:
        """(tensor, problem) for the first float tensor (of `keys`, default all) in file order holding NaN
        or Inf, or (float64) a value beyond float32's range, which the float32 merge would turn into Inf;
        None if all are fine. Reads runs of back-to-back tensors of one dtype in large chunks into one
        reused buffer."""
        runs = _float_runs(self.entries if keys is None else {k: self.entries[k] for k in keys})
        buffer = np.empty(min(chunk_bytes, max((end - begin for _, begin, end, _ in runs), default=0)), np.uint8)
        for code, begin, end, keys in runs:
            dtype = DTYPES[code]
            for offset in range(begin, end, chunk_bytes):
                size = min(chunk_bytes, end - offset)
                self.file.readinto(memoryview(buffer)[:size], self.data_start + offset)
                values = buffer[:size].view(dtype.storage)
                if _any_all_ones(values, dtype.exponent_mask) or (
                    code == "F64" and size and float(np.abs(values.view(np.float64)).max()) > FLOAT32_MAX
                ):
                    for key, (b, e) in keys:
                        if b < offset + size and e > offset:
                            problem = self._problem(key)
                            if problem:
                                return key, problem
        return None

    def _problem(self, key: str) -> str | None:
        return tensor_problem(self.array(key), self.entries[key].dtype)


def tensor_problem(values: np.ndarray, code: str) -> str | None:
    """What makes one tensor unusable, from its bytes read as `code`'s storage integers (any shape):
    "NaN", "Inf", a float64 value beyond float32's range, or None (also for integer dtypes). The check
    the scan above makes, for a reader that holds the tensor anyway (the merged-model writer)."""
    dtype = DTYPES[code]
    if not dtype.is_float:
        return None
    values = values.reshape(-1)
    if _any_all_ones(values, dtype.exponent_mask):  # one pass; the slower look below only when it hits
        special = (values & dtype.exponent_mask) == dtype.exponent_mask
        mantissa = _MANTISSA.get(code)
        if not dtype.inf_possible or mantissa is None or bool((values[special] & mantissa).any()):
            return "NaN"
        return "Inf"
    if code == "F64" and values.size and float(np.abs(values.view(np.float64)).max()) > FLOAT32_MAX:
        return "a value beyond float32's range (it would become Inf)"
    return None


def _any_all_ones(values: np.ndarray, mask: int) -> bool:
    """Whether some element has every bit of `mask` set: max(v & mask) reaches mask exactly then."""
    if values.size == 0:
        return False
    return int(np.bitwise_and(values, values.dtype.type(mask)).max()) == mask


def _read_header(file: InputFile) -> tuple[dict[str, TensorEntry], int]:
    if file.size < 8:
        raise SafetensorsError(f"is {file.size} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", file.pread(0, 8))
    if length > MAX_HEADER_BYTES or 8 + length > file.size:
        raise SafetensorsError(f"header length {length} exceeds the file or {MAX_HEADER_BYTES} bytes")
    try:
        raw = json.loads(file.pread(8, length))
    except RecursionError:
        raise SafetensorsError("header: nested too deeply") from None
    except ValueError as exc:
        raise SafetensorsError(f"header is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise SafetensorsError("header must be a JSON object")
    metadata = raw.pop("__metadata__", None)
    try:
        if metadata is not None:
            try:
                _METADATA.validate_python(metadata)
            except ValidationError as exc:
                raise SafetensorsError(f"header: {describe_validation_error(exc, '__metadata__')}") from None
        entries = _HEADER.validate_python(raw)
    except ValidationError as exc:
        raise SafetensorsError(f"header: {describe_validation_error(exc)}") from None
    data_bytes = file.size - 8 - length
    _check_layout(entries, data_bytes)
    return entries, 8 + length


def _check_layout(entries: dict[str, TensorEntry], data_bytes: int) -> None:
    expected = 0
    for key, entry in sorted(entries.items(), key=lambda item: item[1].data_offsets):
        where = f"header: tensor {_quote(key)}"
        dtype = DTYPES.get(entry.dtype)
        if dtype is None:
            raise SafetensorsError(f"{where}: dtype {_quote(entry.dtype)} is not supported "
                                   f"(one of {', '.join(DTYPES)})")
        begin, end = entry.data_offsets
        if begin != expected or end < begin:
            raise SafetensorsError(f"{where}: data_offsets do not follow the previous tensor's end")
        if (end - begin) != math.prod(entry.shape) * dtype.itemsize:
            raise SafetensorsError(f"{where}: shape {entry.shape} and dtype {entry.dtype} do not match its "
                                   f"{end - begin} bytes")
        expected = end
    if expected != data_bytes:
        raise SafetensorsError(f"header: the tensors cover {expected} bytes but the file holds {data_bytes}")


def _float_runs(entries: dict[str, TensorEntry]) -> list[tuple[str, int, int, list[tuple[str, tuple[int, int]]]]]:
    """Maximal runs of back-to-back float tensors of one dtype: (dtype, begin, end, [(key, span)])."""
    runs: list[Any] = []
    ordered = sorted((tuple(e.data_offsets), key, e.dtype) for key, e in entries.items())
    for (begin, end), key, code in ordered:
        if not DTYPES[code].is_float or end == begin:
            continue
        if runs and runs[-1][0] == code and runs[-1][2] == begin:
            runs[-1][2] = end
            runs[-1][3].append((key, (begin, end)))
        else:
            runs.append([code, begin, end, [(key, (begin, end))]])
    return [tuple(run) for run in runs]


def _quote(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
