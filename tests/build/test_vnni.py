"""On a CPU with AVX-512 VNNI, int8 convolutions compile to `vpdpbusd` and stay exact.

The module is the float pattern a quantized model imports as (quantize, integer-valued weights,
convolution, rescale), small enough to build in seconds; the reference is numpy's integer
arithmetic. Both activation kinds are covered: edgekit's symmetric int8 (shifted into uint8 by the
kernel, its padding too) and a zero-pointed uint8 one (a PT2E program's), with 24 output channels
so the weights' padding to 16-channel blocks is exercised; and the window shapes ResNet and
MobileNet have (1x1, 3x3 padded, 3x3 and 1x1 with stride 2, the 7x7 stem on 3 channels, whose
147-deep windows are padded to a multiple of 4).
"""

from __future__ import annotations

import numpy as np
import pytest

from hostkit.build.cpu_schedule import compile_untuned
from hostkit.build.int8 import lower_int8
from hostkit.build.vnni import has_vnni


def _host_target() -> object:
    import tvm
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})


SIZE = (9, 10)


def _module(weights: np.ndarray, scale: float, low: float, high: float,
            zero_point: float | None, stride: int = 1, pad: int = 0) -> object:
    """x -> clip(round(x / scale) [+ zp], low, high) -> conv(weights) -> * 0.5."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, weights.shape[1], *SIZE), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.round(relax.op.divide(x, relax.const(scale, "float32"))))
            if zero_point is not None:
                q = bb.emit(relax.op.add(q, relax.const(zero_point, "float32")))
            q = bb.emit(relax.op.clip(q, low, high))
            y = bb.emit(relax.op.nn.conv2d(q, relax.const(weights.astype("float32")),
                                           strides=stride, padding=pad))
            out = bb.emit_output(relax.op.multiply(y, relax.const(0.5, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _conv(q: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Integer convolution, one window position at a time."""
    q = np.pad(q, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    kh, kw = w.shape[2:]
    oh, ow = (q.shape[2] - kh) // stride + 1, (q.shape[3] - kw) // stride + 1
    out = np.zeros((q.shape[0], w.shape[0], oh, ow), dtype="int64")
    for i in range(kh):
        for j in range(kw):
            window = q[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += np.einsum("oc,nchw->nohw", w[:, :, i, j].astype("int64"), window)
    return out


@pytest.mark.parametrize("activations", ["int8", "uint8-zero-point"])
@pytest.mark.parametrize(("channels", "kernel", "stride", "pad"),
                         [(32, 1, 1, 0), (32, 3, 1, 1), (32, 3, 2, 1), (32, 1, 2, 0),
                          (3, 7, 2, 3)])
def test_convolutions_compile_to_vpdpbusd_and_match(activations: str, channels: int, kernel: int,
                                                     stride: int, pad: int) -> None:
    import tvm
    from tvm import relax

    target = _host_target()
    if not has_vnni(target):  # type: ignore[arg-type]
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni): the VNNI kernels are not used")
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(24, channels, kernel, kernel)).astype("int8")
    scale, zp = 0.05, (None if activations == "int8" else 100.0)
    low, high = (-127.0, 127.0) if zp is None else (0.0, 255.0)
    mod, report = lower_int8(_module(w, scale, low, high, zp, stride, pad),  # type: ignore[arg-type]
                             target)
    assert (report.int8, report.vnni, report.fp32) == (1, 1, [])

    executable = compile_untuned(mod, target, exact=True)  # type: ignore[arg-type]
    lib = executable.mod.imports[0] if executable.mod.imports else executable.mod
    asm = lib.inspect_source("asm")
    assert "vpdpbusd" in asm, "the int8 convolution did not use AVX-512 VNNI"

    x = rng.normal(0, 3, size=(1, channels, *SIZE)).astype("float32")
    q = np.round(x / np.float32(scale)) + (zp or 0.0)
    q = np.clip(q, low, high).astype("int64")
    want = _conv(q, w, stride, pad) * 0.5
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert np.array_equal(got, want.astype("float32")), np.abs(got - want).max()


@pytest.mark.parametrize("activations", ["int8", "uint8-zero-point"])
def test_linear_layers_compile_to_vpdpbusd_and_match(activations: str) -> None:
    """A classifier: quantize -> matmul(q, W.T) -> * 0.5, 1000 outputs (padded to 1008)."""
    import tvm
    from tvm import relax

    target = _host_target()
    if not has_vnni(target):  # type: ignore[arg-type]
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni): the VNNI kernels are not used")
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, size=(1000, 96)).astype("int8")
    scale, zp = 0.05, (None if activations == "int8" else 100.0)
    low, high = (-127.0, 127.0) if zp is None else (0.0, 255.0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 96), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.round(relax.op.divide(x, relax.const(scale, "float32"))))
            if zp is not None:
                q = bb.emit(relax.op.add(q, relax.const(zp, "float32")))
            q = bb.emit(relax.op.clip(q, low, high))
            t = bb.emit(relax.op.permute_dims(relax.const(w.astype("float32"))))
            y = bb.emit(relax.op.matmul(q, t))
            out = bb.emit_output(relax.op.multiply(y, relax.const(0.5, "float32")))
        bb.emit_func_output(out)
    mod, report = lower_int8(bb.get(), target)  # type: ignore[arg-type]
    assert (report.int8, report.vnni, report.fp32) == (1, 1, [])
    executable = compile_untuned(mod, target, exact=True)  # type: ignore[arg-type]

    data = rng.normal(0, 3, size=(2, 96)).astype("float32")
    q_np = np.clip(np.round(data / np.float32(scale)) + (zp or 0.0), low, high).astype("int64")
    want = (q_np @ w.T.astype("int64")) * 0.5
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    assert np.array_equal(got, want.astype("float32")), np.abs(got - want).max()
