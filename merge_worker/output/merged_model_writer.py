"""Writes the merge as a full model: W_base + delta for every merged module (and the merged
modules_to_save tensors), everything else copied, as sharded safetensors that transformers loads.

The output's layout is known before anything is computed (every tensor's name, dtype and shape come from
the base checkpoint's headers), so each shard's header is written first and every tensor goes straight
to its offset: no side file, no second copy of the bytes. Shards are written in parallel, one thread per
shard: a thread reads a base tensor (pread, into a reusable pinned buffer on a GPU), hands it to the
merge (one at a time, under a lock: the device runs one module's merge after another), and writes the
result (pwrite) while other threads read, merge and write theirs. The worker checks each base tensor for
NaN/Inf here, as it reads it (check_base), rather than in a scan of the whole base before: one read of
the base, not two. Base tensors the merge does not change are copied file to file (copy_file_range) when
their dtype stays and nothing needs checking. Memory stays flat in the model's size:
each thread holds one tensor (in and out) at a time. The config, tokenizer and other small files are copied
as they are (config.json's dtype updated when the output dtype differs from the base's).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch

from merge_worker.inputs.adapters import ModuleKind, weight_name
from merge_worker.inputs.base_weights import INDEX_FILE, SINGLE_FILE, BaseWeights
from merge_worker.output.finite import cast_finite
from merge_worker.inputs.safetensors_file import DTYPES, tensor_problem
from merge_worker.output.safetensors_stream import DTYPE_CODES
from merge_worker.spec import SpecError

DEFAULT_SHARD_BYTES = 2 << 30  # smaller shards: more of them are written side by side
MAX_WRITER_THREADS = 8
# Weight files of other formats that a base folder may also hold; the output has its own weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_SKIP_FILES = {INDEX_FILE, "pytorch_model.bin.index.json"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
BASE_FIELD = "spec.baseModel.path"


def apply_delta(weight: torch.Tensor, delta: torch.Tensor, kind: ModuleKind, fan_in_fan_out: bool) -> torch.Tensor:
    """W + delta in float32 on the delta's device; delta is in B @ A space (out, in), transposed where
    the weight is stored the other way round (embeddings, fan_in_fan_out Conv1D layers)."""
    if kind == "embedding" or fan_in_fan_out:
        delta = delta.T
    return weight.to(delta.device, non_blocking=True).to(torch.float32) + delta.to(torch.float32)


def to_output_dtype(tensor: torch.Tensor, dtype: torch.dtype, what: str,
                    copied_from: str | None = None) -> torch.Tensor:
    """The one place where an output tensor takes the output dtype (integer tensors keep theirs), checked
    finite after the cast (merge_worker/output/finite.py; `what` names it in the error)."""
    return cast_finite(tensor, dtype, what, copied_from=copied_from)


def write_merged_model(
    folder: Path,
    base: BaseWeights,
    modules: dict[str, ModuleKind],
    delta_for: Callable[[str], torch.Tensor],
    saved: dict[str, Callable[[], torch.Tensor]],
    *,
    dtype: torch.dtype,
    fan_in_fan_out: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    threads: int | None = None,
    pin_memory: bool = False,
    check_base: bool = False,
) -> list[Path]:
    """modules: merged module name -> kind; delta_for(module) computes its merged delta when its weight
    comes up; saved: tensor name -> a function computing its merged modules_to_save tensor (also only
    when it comes up). delta_for and saved are called one at a time. pin_memory: page-locked host
    buffers, for deltas on a GPU. check_base: every base tensor the writer reads is checked for NaN/Inf
    (SpecError naming spec.baseModel.path, as the input validation would), and unchanged tensors are
    read and written rather than copied file to file, so the base is read once. Returns the weight
    files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_weight = {weight_name(m): m for m in modules}
    sources = _SourceIndex(base, check=check_base)
    shards = _plan_shards(folder, base, sources, dtype, max_shard_bytes)
    lock = threading.Lock()  # one merge at a time: the callbacks are not thread-safe, the device is shared
    failed = threading.Event()

    def merged(name: str, buffers: _Buffers) -> torch.Tensor:
        if name in by_weight:
            module = by_weight[name]
            weight = sources.read(sources.locate(name), buffers)  # outside the lock: reads overlap merges
            with lock:
                tensor = to_output_dtype(apply_delta(weight, delta_for(module), modules[module], fan_in_fan_out),
                                         dtype, f"merged weight {name} (base + merged delta)")
                return buffers.host_copy(tensor)
        with lock:
            # The callback reads the base tensor itself; loading it here too would be waste.
            return buffers.host_copy(to_output_dtype(saved[name](), dtype, f"modules_to_save tensor {name}"))

    def write_shard(shard: _Shard) -> None:
        buffers = _Buffers(pinned=pin_memory)
        with shard:
            for entry in shard.entries:
                if failed.is_set():
                    return
                source = sources.locate(entry.name)
                if entry.name in by_weight or entry.name in saved:
                    shard.write(entry, merged(entry.name, buffers))
                elif source.dtype == entry.dtype and not check_base:
                    shard.copy(entry, source, sources.fd(source))  # unchanged bytes: file to file
                elif source.dtype == entry.dtype:
                    shard.write(entry, sources.read(source, buffers).view(-1).view(torch.uint8))
                else:
                    shard.write(entry, buffers.host_copy(to_output_dtype(
                        sources.read(source, buffers), dtype, f"base model tensor {entry.name}",
                        copied_from="spec.baseModel.path")))

    workers = min(threads or MAX_WRITER_THREADS, len(shards), os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="shard") as pool:
            futures = [pool.submit(write_shard, shard) for shard in shards]
            for future in futures:
                try:
                    future.result()
                except BaseException:
                    failed.set()
                    raise
    except BaseException:
        for shard in shards:
            shard.path.unlink(missing_ok=True)
        raise
    finally:
        sources.close()
    _write_index(folder, shards)
    _copy_other_files(base.folder, folder, dtype, base.dtype())
    return [shard.path for shard in shards]


# -- the base checkpoint's bytes ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    offset: int  # of the tensor's first byte in the file
    nbytes: int
    code: str  # safetensors' dtype code
    dtype: torch.dtype
    shape: tuple[int, ...]


class _SourceIndex:
    """Where each base tensor's bytes are (from the safetensors headers), read with pread: the reads of
    several threads run side by side, outside the GIL, straight into the caller's buffer."""

    def __init__(self, base: BaseWeights, check: bool = False):
        self._base_path = base.path
        self._check = check
        self._where: dict[str, _Source] = {}
        self._fds: dict[Path, int] = {}
        for path in base.shards:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self._where[name] = _Source(name, path, 8 + length + begin, end - begin, info["dtype"],
                                            _CODE_DTYPES[info["dtype"]], tuple(info["shape"]))
            self._fds[path] = os.open(path, os.O_RDONLY)

    def locate(self, name: str) -> _Source:
        return self._where[name]

    def fd(self, source: _Source) -> int:
        return self._fds[source.path]

    def read(self, source: _Source, buffers: _Buffers) -> torch.Tensor:
        raw = buffers.input(source.nbytes)
        view = memoryview(raw.numpy())
        done = 0
        while done < source.nbytes:
            got = os.preadv(self._fds[source.path], [view[done:]], source.offset + done)
            if got <= 0:
                raise OSError(f"{source.path}: unexpected end of file")
            done += got
        if self._check and (problem := tensor_problem(raw.numpy().view(DTYPES[source.code].storage), source.code)):
            raise SpecError(BASE_FIELD, f"{self._base_path}: tensor {source.name} holds {problem}")
        return raw.view(source.dtype).view(source.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Buffers:
    """One thread's reusable host buffers (pinned where a GPU copies to and from them)."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._in = self._out = None

    def _grow(self, current: torch.Tensor | None, nbytes: int) -> torch.Tensor:
        if current is None or current.numel() < nbytes:
            current = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
        return current

    def input(self, nbytes: int) -> torch.Tensor:
        self._in = self._grow(self._in, nbytes)
        return self._in[:nbytes]

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's bytes on the host (a view of this thread's output buffer), as uint8."""
        nbytes = tensor.numel() * tensor.element_size()
        self._out = self._grow(self._out, nbytes)
        out = self._out[:nbytes]
        out.view(tensor.dtype).view(tensor.shape).copy_(tensor)
        return out


# -- the output shards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the shard file
    nbytes: int


@dataclass
class _Shard:
    """One output file: its header is written on open, then each tensor at its offset."""

    path: Path
    entries: list[_Entry] = field(default_factory=list)
    _header: bytes = b""
    _fd: int | None = None

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def finish_layout(self) -> None:
        header = {"__metadata__": {"format": "pt"}}
        begin = 0
        for e in self.entries:
            header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [begin, begin + e.nbytes]}
            begin += e.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._header = struct.pack("<Q", len(encoded)) + encoded
        start = len(self._header)
        for i, e in enumerate(self.entries):
            self.entries[i] = _Entry(e.name, e.dtype, e.shape, start, e.nbytes)
            start += e.nbytes

    def __enter__(self) -> _Shard:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, len(self._header) + self.data_bytes)
        _pwrite_all(self._fd, memoryview(self._header), 0)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                # Flushed here, by the shard's own thread while others still write, rather than one file
                # after another when the output is published (which then finds nothing left to flush).
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def write(self, entry: _Entry, raw: torch.Tensor) -> None:
        assert raw.numel() == entry.nbytes, entry.name
        _pwrite_all(self._fd, memoryview(raw.numpy()), entry.offset)

    def copy(self, entry: _Entry, source: _Source, source_fd: int) -> None:
        _copy_range(source_fd, self._fd, source.offset, entry.offset, entry.nbytes)


def _plan_shards(folder: Path, base: BaseWeights, sources: _SourceIndex, dtype: torch.dtype,
                 max_bytes: int) -> list[_Shard]:
    """Every output tensor's place: base order, a new shard past max_bytes, transformers' file names."""
    groups: list[list[_Entry]] = [[]]
    size = 0
    for name in base.names():
        source = sources.locate(name)
        out_dtype = dtype if source.dtype.is_floating_point else source.dtype
        nbytes = prod(source.shape) * out_dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(_Entry(name, out_dtype, source.shape, 0, nbytes))
        size += nbytes
    count = len(groups)
    shards = []
    for i, entries in enumerate(groups, start=1):
        path = folder / (SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors")
        shard = _Shard(path, entries)
        shard.finish_layout()
        shards.append(shard)
    return shards


def _write_index(folder: Path, shards: list[_Shard]) -> None:
    if len(shards) < 2:
        return
    weight_map = {e.name: s.path.name for s in shards for e in s.entries}
    index = {"metadata": {"total_size": sum(s.data_bytes for s in shards)}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _copy_range(source: int, target: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copies bytes file to file in the kernel; plain reads and writes where copy_file_range is refused."""
    done = 0
    try:
        while done < nbytes:
            got = os.copy_file_range(source, target, nbytes - done, src_offset + done, dst_offset + done)
            if got == 0:
                break
            done += got
    except OSError:
        pass  # EXDEV, ENOSYS, EINVAL on some filesystems and sandboxes: the loop below copies the rest
    while done < nbytes:
        block = os.pread(source, min(64 << 20, nbytes - done), src_offset + done)
        if not block:
            raise OSError(f"unexpected end of file at byte {src_offset + done} of a base shard")
        _pwrite_all(target, memoryview(block), dst_offset + done)
        done += len(block)


def _copy_other_files(source: Path, target: Path, dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _SKIP_FILES or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.name == "config.json" and dtype != base_dtype:
            config = json.loads(path.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
            (target / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(path, target / path.name)
