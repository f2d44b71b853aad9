"""CUDA builds hold kernels compiled on the host for the device's arch, never CUDA source.

No GPU is needed: NVRTC compiles for any arch, and the library is read back from its bytes (the
packed modules behind `__tvm_ffi__library_bin`). The control case, TVM's own export, shows that
the reader sees source where there is source, so the main assertions cannot pass vacuously.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from hostkit.build.compiler import build_artifact
from hostkit.build.cuda import cubin_arch, cuda_toolkit, library_kernels
from hostkit.build.targets import check_cross_compiler, resolve_target
from hostkit.errors import CompileError
from hostkit.inventory import parse_inventory
from hostkit.models import ModelSpec, load_model

ORIN = {"kind": "cuda", "arch": "sm_87",
        "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}
INVENTORY = {"devices": {
    "orin": {"target": ORIN},
    "h100-ptx": {"target": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}},
                 "cuda_kernels": "ptx"},
    "no-arch": {"target": {"kind": "cuda", "host": {"kind": "llvm"}}},
}}


def _needs_nvrtc() -> None:
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        pytest.skip("needs cuda-bindings (NVRTC), which torch's CUDA build pulls in")
    if cuda_toolkit() is None:
        pytest.skip("needs the CUDA toolkit's headers (cuda_runtime.h, libcu++): set CUDA_PATH")


def _build(name: str) -> Any:
    device = parse_inventory(INVENTORY).get(name)
    resolved = resolve_target(device)
    return build_artifact(load_model(ModelSpec("tinycnn")), resolved, device=name,
                          cross_compiler=check_cross_compiler(device, resolved),
                          kernels=device.cuda_kernels)


def _assert_no_source(path: Path) -> None:
    data = path.read_bytes()
    assert b"__global__" not in data and b"#include" not in data, "CUDA source in the library"


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="needs gcc-aarch64-linux-gnu")
def test_orin_library_holds_an_sm87_cubin_and_no_source() -> None:
    _needs_nvrtc()
    artifact = _build("orin")
    kernels = library_kernels(artifact.path)
    assert kernels, "the library has no CUDA module"
    for fmt, code in kernels:
        assert fmt == "cubin" and code[:4] == b"\x7fELF"
        assert cubin_arch(code) == "sm_87"
    _assert_no_source(artifact.path)
    assert _build("orin").cached, "the same model and target are not compiled twice"


def test_ptx_on_request_for_forward_compatibility() -> None:
    _needs_nvrtc()
    artifact = _build("h100-ptx")
    kernels = library_kernels(artifact.path)
    assert kernels and all(fmt == "ptx" for fmt, _ in kernels)
    assert all(b".target sm_90" in code for _, code in kernels)
    _assert_no_source(artifact.path)


def test_tvm_alone_would_ship_source(tmp_path: Path) -> None:
    """The control: TVM's own export of a CUDA build on a machine without a driver keeps the CUDA
    source, compiled on the device at load; the reader above sees it."""
    import os

    import tvm

    from hostkit.build.compiler import import_relax

    mod = import_relax(load_model(ModelSpec("tinycnn")))
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"  # as on a machine without a driver
    try:
        executable = tvm.compile(mod, tvm.target.Target({"kind": "cuda", "arch": "sm_87",
                                                         "host": {"kind": "llvm"}}))
    finally:
        del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
    executable.export_library(str(tmp_path / "plain.so"))
    kernels = library_kernels(tmp_path / "plain.so")
    assert kernels and all(fmt == "cuda" for fmt, _ in kernels)
    assert b'extern "C" __global__' in kernels[0][1]


def test_cuda_target_without_arch_is_one_clear_line() -> None:
    """Without an arch TVM guesses sm_50 on a machine with no GPU; edgekit refuses to guess (the
    deploy completes it from the device's report first)."""
    from hostkit.build.targets import complete_from_device

    device = parse_inventory(INVENTORY).get("no-arch")
    resolved = resolve_target(device)
    with pytest.raises(Exception) as info:
        complete_from_device(device, resolved, {"gpus": []})
    assert "names no CUDA arch" in str(info.value) and "no-arch" in str(info.value)
    completed = complete_from_device(device, resolved, {"gpus": [
        {"name": "Orin", "arch": "sm_87", "compute_capability": "8.7", "memory_bytes": 8 << 30}]})
    assert str(completed.target.attrs["arch"]) == "sm_87"
    kept = parse_inventory(INVENTORY).get("orin")
    assert complete_from_device(kept, resolve_target(kept), {"gpus": [{"arch": "sm_90"}]}) \
        .target.attrs["arch"] == "sm_87", "an arch the inventory names wins"


def test_an_arch_nvrtc_cannot_build_for_is_one_clear_line() -> None:
    from hostkit.build.cuda import compile_kernels

    _needs_nvrtc()
    with pytest.raises(CompileError, match="NVRTC could not compile the CUDA kernels for sm_50"):
        compile_kernels('extern "C" __global__ void k() {}', "sm_50", "cubin")


def test_packed_modules_rewritten_exactly_and_refused_when_not_source() -> None:
    """The blob layout edgekit rewrites (TVM-FFI's packed imports), on hand-made bytes: the CUDA
    module's source becomes the compiled code, the function map and other modules stay as they
    are, and a CUDA module that holds no source is refused rather than shipped unchecked."""
    import struct

    from hostkit.build.cuda import replace_cuda_code

    def field(data: bytes) -> bytes:
        return struct.pack("<Q", len(data)) + data

    def blob(cuda_module: bytes) -> bytes:
        tree = struct.pack("<QQQQ", 3, 0, 1, 1) + struct.pack("<QQ", 1, 1)  # _lib imports cuda
        body = tree + field(b"_lib") + field(b"cuda") + field(cuda_module)
        return struct.pack("<Q", len(body)) + body

    source, fmap = b'extern "C" __global__ void k() {}', b"\x01\x02function-map\x03"
    compiled = replace_cuda_code(blob(field(b"cuda") + fmap + field(source)), [source],
                                 lambda src: b"\x7fELF-cubin-of-" + src[:6], "cubin")
    assert compiled == blob(field(b"cubin") + fmap + field(b'\x7fELF-cubin-of-extern'))
    with pytest.raises(CompileError, match="already holds 'cubin' kernels"):
        replace_cuda_code(compiled, [source], lambda src: src, "cubin")
    with pytest.raises(CompileError, match="cannot read the library's packed modules"):
        replace_cuda_code(compiled[:-3], [source], lambda src: src, "cubin")


def test_tuning_candidates_carry_cubins_too(tmp_path: Path) -> None:
    """What `edgekit tune` measures on a CUDA device: each candidate, built by MetaSchedule's
    builder function and exported by edgekit's, holds a cubin for the device, so a runtime-only
    board can time it."""
    import tvm
    from tvm.script import tirx as T

    from hostkit.build.cuda import kernels_from_source
    from hostkit.build.tuning.search import build_candidate, export_candidate

    _needs_nvrtc()

    @T.prim_func
    def double(A: T.Buffer((1024,), "float32"), B: T.Buffer((1024,), "float32")) -> None:
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for bx in T.thread_binding(8, thread="blockIdx.x"):
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                B[bx * 128 + tx] = A[bx * 128 + tx] * T.float32(2)

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    with kernels_from_source():
        built = build_candidate(tvm.IRModule({"main": double}), target, None)
        path = export_candidate(str(tmp_path), None, "sm_90", built)
    kernels = library_kernels(Path(path))
    assert [(fmt, cubin_arch(code)) for fmt, code in kernels] == [("cubin", "sm_90")]
    _assert_no_source(Path(path))
