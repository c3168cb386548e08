"""Triton kernels compiled ahead of time, so a fresh Job pod does not compile them.

A fresh process with an empty Triton cache compiles every kernel it launches and its C launcher (about
1.4 s of a fresh adapter merge on an H200, docs/merging.md), on the critical path of every Job pod. The image cannot run them at build time (no GPU there), but
Triton compiles for a named GPU architecture without a GPU: what it needs is each kernel's
specialization (argument types, constants, alignment attributes, options), which a GPU run records.

- `record`: runs the CLI with a hook that writes the specialization of every kernel compiled
  (on a GPU; the result is merge_worker/triton_kernels.json, kept in the repository).
- `bake`: compiles those specializations for the listed architectures into a cache folder (no GPU;
  the Dockerfile runs it). The key Triton files a kernel under is computed from the kernel's source, the
  specialization, the options, the compiler and the target, so a baked entry is found exactly when the
  running process would have compiled the same kernel; a changed kernel simply compiles again.
- `seed`: when a run picks a GPU, copies the entries baked for its architecture into the writable
  cache folder the process uses (TRITON_CACHE_DIR; the image's own folder is read-only for the pod's
  user).

    python -m merge_worker.kernel_cache record merge_worker/triton_kernels.json -- run spec.yaml --volume ...
    python -m merge_worker.kernel_cache bake /opt/adaptermerge/triton-cache --arch 80,86,89,90,100
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RECORDED = Path(__file__).with_name("triton_kernels.json")
BAKED_ENV = "ADAPTERMERGE_BAKED_TRITON_CACHE"  # the image's read-only folder of baked kernels
DEFAULT_ARCHS = (80, 86, 89, 90, 100)  # A100, A10/A40, L4/L40S, H100/H200, B200
ADAPTER_COUNTS = range(2, 9)
# Options Triton derives from the target architecture or the installation (extern_libs: libdevice's path
# on the recording machine): dropped from a record, so each arch and installation derives its own.
_DERIVED_OPTIONS = ("arch", "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes",
                    "max_num_imprecise_acc_default", "extern_libs")


def record(path: Path, cli_args: list[str]) -> int:
    """Runs `adaptermerge <cli_args>` in this process and writes every compiled kernel's specialization."""
    from triton import knobs

    from merge_worker import cli

    seen: dict[str, dict] = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 - Triton's names
        data = json.loads(compile["specialization_data"])
        seen[_identity(data)] = data
        return None

    knobs.runtime.jit_post_compile_hook = hook
    code = cli.main(cli_args)
    merged = {_identity(d): d for d in _load(path)} | seen
    path.write_text(json.dumps(sorted(merged.values(), key=lambda d: (d["name"], json.dumps(d))), indent=1) + "\n")
    print(f"{len(seen)} kernel specializations recorded, {len(merged)} in {path}", file=sys.stderr)
    return code or 0


def _identity(data: dict) -> str:
    """What makes two records the same specialization of the same kernel."""
    return json.dumps([data["name"], data["signature"], data["attrs_vals"], data["constant_vals"]], sort_keys=True)


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def jit_function(full_name: str):
    """The triton.jit object whose Python function is `module.qualname`."""
    from triton.runtime.jit import JITFunction

    module_name, _, qualname = full_name.rpartition(".")
    module = importlib.import_module(module_name)
    for value in vars(module).values():
        if isinstance(value, JITFunction) and value.fn.__qualname__ == qualname:
            return value
    raise LookupError(f"{full_name}: no triton.jit kernel of that name (recorded in {RECORDED.name})")


def bake(cache: Path, archs: tuple[int, ...] = DEFAULT_ARCHS, records: list[dict] | None = None,
         workers: int | None = None) -> int:
    """Compiles every recorded specialization (and its variants for other adapter counts) for each
    architecture into `cache`, in parallel processes; returns how many kernels it compiled."""
    jobs = [(variant, arch, str(arch_folder(cache, arch))) for data in (_load(RECORDED) if records is None else records)
            for variant in _variants(data) for arch in archs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    _libcuda_stub()  # made once, before the workers use it
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_one, jobs))
    for arch in archs:
        _use_cache(str(arch_folder(cache, arch)))
        _build_host_module(_cuda_utils)
    return len(jobs)


def arch_folder(cache: Path, arch: int) -> Path:
    """One folder per GPU architecture, each a complete Triton cache (kernels, launchers, helpers)."""
    return Path(cache) / f"sm{arch}"


def _variants(data: dict) -> list[dict]:
    """The record, and the same kernel for each other adapter count (a constexpr of the fused merge):
    the recording saw one count, users merge 2 to 8 adapters."""
    names = list(data["signature"])
    if "N_ADAPTERS" not in names:
        return [data]
    path = [names.index("N_ADAPTERS")]
    variants = []
    for count in ADAPTER_COUNTS:
        variant = json.loads(json.dumps(data))
        variant["constant_vals"] = [count if key == path else value
                                    for key, value in zip(variant["constant_keys"], variant["constant_vals"])]
        variants.append(variant)
    return variants


def _use_cache(cache: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache  # read when Triton first asks for its cache


def _compile_one(job: tuple[dict, int, str]) -> None:
    data, arch, cache = job
    _use_cache(cache)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = jit_function(data["name"])
    constexprs = {
        tuple(k): tl.dtype(v) if tl.dtype.is_dtype(v)
        else tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v
        for k, v in zip(data["constant_keys"], data["constant_vals"])
    }
    attrs = dict(zip(map(tuple, data["attrs_keys"]), data["attrs_vals"]))
    signature = {k: tuple(v) if isinstance(v, list) else v for k, v in data["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()
               if k not in _DERIVED_OPTIONS}
    target = GPUTarget("cuda", arch, 32)
    parsed = make_backend(target).parse_options(options)
    src = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=target, options=parsed.__dict__)
    _build_host_module(lambda: _launcher(src, kernel.metadata))


# Triton also compiles two small host-side C modules with the system C compiler on a GPU's first use
# (its CUDA helpers and one launcher per kernel signature), filed under the hash of their source and the
# platform. They link against the driver's libcuda.so.1, which a build machine lacks: an empty stand-in
# satisfies the linker (the pod loads the real one, which the NVIDIA container toolkit mounts).


def _build_host_module(build) -> None:
    """Builds one host module into the cache; loading it needs the real driver, so that part may fail."""
    import logging

    from triton import knobs

    # A launcher another variant already cached is loaded first, which fails here: not worth a warning.
    logging.getLogger("triton.runtime.build").setLevel(logging.ERROR)
    stub = _libcuda_stub()
    previous = knobs.nvidia.libcuda_path, os.environ.get("CC")
    knobs.nvidia.libcuda_path = str(stub)
    os.environ["CC"] = str(stub / "cc")
    try:
        build()
    except (ImportError, OSError):
        pass  # built and cached; only loading it here failed (no CUDA driver on a build machine)
    finally:
        knobs.nvidia.libcuda_path = previous[0]
        if previous[1] is None:
            os.environ.pop("CC", None)
        else:
            os.environ["CC"] = previous[1]


def _libcuda_stub() -> Path:
    """A folder with an empty libcuda.so.1 and a C compiler wrapper that links it with --no-as-needed:
    the stand-in defines no symbol, so a linker that drops unused libraries (Debian's and Ubuntu's
    default) would leave libcuda out of the module, which then fails to load next to the real driver."""
    import subprocess
    import tempfile

    folder = Path(tempfile.gettempdir()) / "adaptermerge-libcuda-stub"
    if not (folder / "cc").exists():
        folder.mkdir(exist_ok=True)
        empty = folder / "empty.c"
        empty.write_text("/* stands in for libcuda.so.1 at link time only */\n")
        subprocess.check_call(["gcc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(empty)])
        wrapper = folder / "cc.tmp"
        wrapper.write_text('#!/bin/sh\nexec gcc -Wl,--no-as-needed "$@"\n')
        wrapper.chmod(0o755)
        wrapper.rename(folder / "cc")
    return folder


def _launcher(src, metadata) -> None:
    from triton.backends.nvidia import driver
    from triton.runtime.build import compile_module_from_src

    constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in src.constants.items()}
    code = driver.make_launcher(constants, dict(src.signature), getattr(metadata, "tensordesc_meta", None))
    compile_module_from_src(src=code, name="__triton_launcher", library_dirs=driver.library_dirs(),
                            include_dirs=driver.include_dirs, libraries=driver.libraries)


def _cuda_utils() -> None:
    from triton.backends.nvidia import driver
    from triton.runtime.build import compile_module_from_src

    compile_module_from_src(src=(Path(driver.dirname) / "driver.c").read_text(), name="cuda_utils",
                            library_dirs=driver.library_dirs(), include_dirs=driver.include_dirs,
                            libraries=driver.libraries)


def seed(capability: int, cache: Path | None = None, baked: Path | None = None) -> int:
    """Copies the kernels baked for this GPU architecture (capability 90 for 9.0) into the process's
    writable Triton cache (entries it lacks); returns how many it copied. Nothing to do without a baked
    folder (a laptop, a source checkout) or for an architecture that was not baked. Copies, not links:
    Triton rewrites an entry it cannot use, and the image's folder is read-only."""
    baked = baked or (Path(os.environ[BAKED_ENV]) if os.environ.get(BAKED_ENV) else None)
    cache = cache or (Path(os.environ["TRITON_CACHE_DIR"]) if os.environ.get("TRITON_CACHE_DIR") else None)
    if baked is None or cache is None or not arch_folder(baked, capability).is_dir():
        return 0
    source = arch_folder(baked, capability)
    cache.mkdir(parents=True, exist_ok=True)
    if cache.resolve() == source.resolve():
        return 0
    copied = 0
    for entry in source.iterdir():
        target = cache / entry.name
        if entry.is_dir() and not target.exists():
            partial = cache / f".{entry.name}.partial-{os.getpid()}"
            shutil.copytree(entry, partial)
            try:
                partial.rename(target)  # whole entries only, also when two runs share the folder
                copied += 1
            except OSError:
                shutil.rmtree(partial, ignore_errors=True)
    return copied


def capability(device=None) -> int:
    """A CUDA device's compute capability as the architecture number Triton targets (90 for 9.0)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def seed_for(device) -> int:
    """seed() for a torch device: the baked kernels of its architecture, on CUDA only."""
    if getattr(device, "type", None) != "cuda":
        return 0
    try:
        return seed(capability(device))
    except OSError:  # a full or unwritable cache folder: the kernels compile at run time, as without one
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_worker.kernel_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="run the CLI and record the kernels it compiles (on a GPU)")
    rec.add_argument("file", type=Path)
    rec.add_argument("cli_args", nargs=argparse.REMAINDER, help="-- then the adaptermerge arguments")
    bk = commands.add_parser("bake", help="compile the recorded kernels for these architectures (no GPU)")
    bk.add_argument("cache", type=Path)
    bk.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                    help="compute capabilities without the dot, comma-separated (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "record":
        return record(args.file, args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args)
    count = bake(args.cache, tuple(int(a) for a in args.arch.split(",")))
    print(f"baked {count} kernels into {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
