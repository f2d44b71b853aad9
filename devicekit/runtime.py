"""TVM's runtime on the device: which libraries are loaded, the GPUs they can see.

A device may carry TVM's runtime alone (`TVM_USE_RUNTIME_LIB=1`, or an install without
`libtvm_compiler.so`): loading and running a compiled library needs nothing more. TVM then loads
no accelerator runtime by itself (its backends load them as part of the compiler's start-up), so
the daemon loads `libtvm_runtime_cuda.so` when a session is about to run CUDA kernels.

Loading it only maps the library; CUDA itself is initialised by the first call that asks the
driver something (counting GPUs included), which happens in a session, never in the daemon whose
forks the sessions are (a fork cannot use a CUDA context its parent made).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["runtime_only", "load_device_runtime", "gpus", "strip_compiler", "RUNTIME_LIBRARIES"]

# Target kinds whose kernels need a runtime library of TVM's besides libtvm_runtime.
RUNTIME_LIBRARIES = {"cuda": "tvm_runtime_cuda"}
_MAX_GPUS = 16


def runtime_only() -> bool:
    """Whether this process runs TVM's runtime without its compiler."""
    import tvm

    return bool(getattr(tvm.base, "_RUNTIME_ONLY", False))


def load_device_runtime(kind: str) -> str | None:
    """Load TVM's runtime library for a target kind unless it is loaded; None when the kind can
    run here (or needs nothing), else why it cannot, in one line."""
    import tvm_ffi

    library = RUNTIME_LIBRARIES.get(kind)
    if library is None or tvm_ffi.get_global_func(f"ffi.Module.load_from_bytes.{kind}",
                                                  allow_missing=True) is not None:
        return None
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    folder = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS[library] = load_lib_ctypes(package="tvm", target_name=library,
                                                extra_lib_paths=[folder], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        advice = " (is the NVIDIA driver installed?)" if "libcuda" in reason else ""
        return f"this device cannot run {kind} kernels: lib{library}.so did not load: " \
               f"{reason[:200]}{advice}"
    return None


def gpus() -> list[dict[str, Any]]:
    """The CUDA GPUs this process can use: name, `sm_XX`, compute capability and memory.

    Empty where TVM's CUDA runtime cannot load (no driver) or sees no GPU. Initialises CUDA in
    this process.
    """
    if load_device_runtime("cuda") is not None:
        return []
    import tvm

    found: list[dict[str, Any]] = []
    for index in range(_MAX_GPUS):
        try:
            dev = tvm.cuda(index)
            if not dev.exist:
                break
            capability = str(dev.compute_version)
            found.append({"index": index, "name": str(dev.device_name),
                          "arch": "sm_" + capability.replace(".", ""),
                          "compute_capability": capability,
                          "memory_bytes": int(dev.total_global_memory or 0),
                          # What MetaSchedule's GPU rules need in a CUDA target.
                          "max_threads_per_block": int(dev.max_threads_per_block or 0),
                          "max_shared_memory_per_block":
                              int(dev.max_shared_memory_per_block or 0),
                          "warp_size": int(dev.warp_size or 0)})
        except Exception:  # a driver that answers one question and not the next: stop there
            break
    return found


def strip_compiler(dry_run: bool = False, package: Path | None = None,
                   prefix: Path | None = None) -> dict[str, Any]:
    """Make a TVM runtime-only: remove `libtvm_compiler.so` (about 250 MB of the 300 MB package),
    which loading and running compiled libraries never use; TVM then starts runtime-only by
    itself. By default this Python's TVM, found without importing it (an import would map the
    compiler it is about to lose), measured over this Python's environment (`sys.prefix`).

    Returns the files found, the environment's size before and after, and its size with the
    compiler (`full_bytes`, from the wheel's RECORD once the file is gone), in bytes.
    """
    import importlib.util
    import sys

    if package is None:
        spec = importlib.util.find_spec("tvm")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("no TVM installed in this Python")
        package = Path(list(spec.submodule_search_locations)[0])
    root = prefix or Path(sys.prefix)
    compiler = sorted(package.glob("lib/libtvm_compiler.so*"))
    before = _tree_bytes(root)
    present = sum(path.stat().st_size for path in compiler)
    if not dry_run:
        for path in compiler:
            path.unlink()
    after = before if dry_run else before - present
    return {"prefix": str(root), "tvm_package": str(package),
            "compiler": [path.name for path in compiler], "removed": bool(compiler) and not dry_run,
            "before_bytes": before, "after_bytes": after,
            "full_bytes": after + (present if not dry_run else 0) + (
                0 if compiler else _recorded_compiler_bytes(package))}


def _recorded_compiler_bytes(package: Path) -> int:
    """The compiler's size as the installed wheel's RECORD lists it (0 when unknown)."""
    for record in package.parent.glob("apache_tvm-*.dist-info/RECORD"):
        for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, rest = line.partition(",")
            if name.startswith("tvm/lib/libtvm_compiler.so"):
                size = rest.rpartition(",")[2]
                return int(size) if size.isdigit() else 0
    return 0


def _tree_bytes(folder: Path) -> int:
    import os

    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total
