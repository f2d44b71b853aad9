"""On a CPU with AVX-512 VNNI, int8 1x1 convolutions compile to `vpdpbusd` and stay exact.

The module is the float pattern a quantized model imports as (quantize, integer-valued weights,
convolution, rescale), small enough to build in seconds; the reference is numpy's integer
arithmetic. Both activation kinds are covered: edgekit's symmetric int8 (shifted into uint8 by the
kernel) and a zero-pointed uint8 one (a PT2E program's), with 24 output channels so the weights'
padding to 16-channel blocks is exercised too.
"""

from __future__ import annotations

import numpy as np
import pytest

from hostkit.build.int8 import lower_int8
from hostkit.build.vnni import has_vnni


def _host_target() -> object:
    import tvm
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})


def _module(weights: np.ndarray, scale: float, low: float, high: float,
            zero_point: float | None) -> object:
    """x -> clip(round(x / scale) [+ zp], low, high) -> 1x1 conv(weights) -> * 0.5."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, weights.shape[1], 6, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.round(relax.op.divide(x, relax.const(scale, "float32"))))
            if zero_point is not None:
                q = bb.emit(relax.op.add(q, relax.const(zero_point, "float32")))
            q = bb.emit(relax.op.clip(q, low, high))
            y = bb.emit(relax.op.nn.conv2d(q, relax.const(weights.astype("float32"))))
            out = bb.emit_output(relax.op.multiply(y, relax.const(0.5, "float32")))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("activations", ["int8", "uint8-zero-point"])
def test_1x1_convolutions_compile_to_vpdpbusd_and_match(activations: str) -> None:
    import tvm
    from tvm import relax

    target = _host_target()
    if not has_vnni(target):  # type: ignore[arg-type]
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni): the VNNI kernels are not used")
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(24, 32, 1, 1)).astype("int8")
    scale, zp = 0.05, (None if activations == "int8" else 100.0)
    low, high = (-127.0, 127.0) if zp is None else (0.0, 255.0)
    mod, report = lower_int8(_module(w, scale, low, high, zp), target)  # type: ignore[arg-type]
    assert (report.int8, report.vnni, report.fp32) == (1, 1, [])

    executable = tvm.compile(mod, target)
    lib = executable.mod.imports[0] if executable.mod.imports else executable.mod
    asm = lib.inspect_source("asm")
    assert "vpdpbusd" in asm, "the int8 1x1 convolution did not use AVX-512 VNNI"

    x = rng.normal(0, 3, size=(1, 32, 6, 5)).astype("float32")
    q = np.round(x / np.float32(scale)) + (zp or 0.0)
    q = np.clip(q, low, high).astype("int64")
    want = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype("int64"), q) * 0.5
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert np.array_equal(got, want.astype("float32")), np.abs(got - want).max()
