"""VNNI kernels: int8 convolutions as uint8 x int8 -> int32 matmuls on AVX-512 VNNI.

Relax legalizes a convolution into loops that neither the untuned build nor MetaSchedule's VNNI
rule turns into `vpdpbusd` (the rule finds nothing it can tensorize in an NCHW or NHWC
convolution). Here a convolution becomes a matmul: rows are output pixels, each the input's
window under the kernel (a 1x1 convolution's pixel as it is; any other's window gathered by
`im2col_kernel`, one contiguous copy per window row), against the weights packed the way the
instruction reads them (16 output channels x 4 input channels per 64 bytes). The kernel is written
unscheduled and marked fusable, so Relax fuses the requantization after it (offset, bias,
scale, ReLU, the next layer's quantize) into the same kernel; `cpu_schedule.vnni_schedule`
then tensorizes it with a 16x4 dot-product intrinsic and computes the epilogue on each block
of output while it is in registers, and the kernel is marked scheduled, so tuning leaves it as
it is and tunes the rest of the model. Measured (untuned, side by side, 2-core machine): ResNet-18 int8 with its 3x3
convolutions on the default int8 schedule 101 ms, on this kernel 47 ms (fp32 119 ms); the
epilogue fused and no per-iteration workspace allocation, MobileNetV2 int8 5.98 -> 5.37 ms.

`vpdpbusd` multiplies unsigned by signed bytes. A PT2E program's uint8 activations go in as they
are; edgekit's own symmetric int8 activations go in as x + 128, and 128 * sum(w) per output
channel is subtracted from the int32 result, so the arithmetic stays exact.

TVM 0.27 ships a VNNI intrinsic (`dot_16x4_vnni`) whose LLVM call passes int32 vectors where
LLVM 22's `llvm.x86.avx512.vpdpbusd.512` takes bytes ("Call parameter type does not match
function signature!"); the one registered here passes bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.build.direct import i64

if TYPE_CHECKING:
    import tvm

__all__ = ["INTRIN", "BLOCK", "IM2COL", "has_vnni", "pack_weights", "matmul_kernel",
           "im2col_kernel", "register_intrinsic"]

INTRIN = "edgekit_dot_16x4_u8i8i32_vnni"
BLOCK = "edgekit_vnni"  # the matmul block `cpu_schedule.vnni_schedule` recognises
IM2COL = "edgekit_im2col"  # the window gather, never a target of inlining
LANES, DEPTH = 16, 4  # int32 lanes per instruction, bytes summed into each lane
_registered = False


def has_vnni(target: "tvm.target.Target | None") -> bool:
    """Whether `target` is an x86 LLVM target whose CPU has AVX-512 VNNI."""
    if target is None or str(target.kind.name) != "llvm":
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features("avx512vnni", target))
    except Exception:  # an Arm or unknown triple: LLVM has no such feature to ask about
        return False


def pack_weights(w: np.ndarray) -> tuple[np.ndarray, int]:
    """(out, in) int8 weights as [out/16, in/4, 16, 4], out padded with zeros to a multiple of
    16; returns the packed weights and the padded output width."""
    out, depth = w.shape
    padded = -(-out // LANES) * LANES
    full = np.zeros((padded, depth), dtype="int8")
    full[:out] = w
    packed = full.reshape(padded // LANES, LANES, depth // DEPTH, DEPTH).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed), padded


def register_intrinsic() -> None:
    """Register the intrinsic: what one `vpdpbusd` computes (desc) and the call that does it.

    TVM's own description is not imported: `tvm.s_tir.tensor_intrin` parses every target's
    intrinsics on import (half a minute on a busy 2-core machine).
    """
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    # TVMScript: the annotations are buffer declarations, not types mypy can read
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
             b: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
             b: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
             c: T.Buffer((16,), "int32", offset_factor=1)) -> None:  # type: ignore[valid-type]
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            # one expression: a name bound here would be a 4-byte local buffer, allocated from
            # the workspace pool on every iteration of the parallel loop around it
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"),
                                          16), dtype="int8x64"),
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(INTRIN, desc, impl, override=True)
    _registered = True


def matmul_kernel(pixels: tuple[int, ...], taps: int, depth: int, cols: int) -> Any:
    """out[*pixels, cols] = sum over (tap, d) of x[*pixels, tap, d] (uint8) . w (int8, packed
    by `pack_weights` over the flattened taps x depth), `depth` a multiple of 4. A 1x1
    convolution reads its pixels as they are (one tap); a larger one reads `im2col_kernel`'s
    windows. Left unscheduled and marked fusable (`op_pattern` 4, an output elementwise-fusable
    reduction), so the requantization after it joins its kernel and `hostkit.build.cpu_schedule.vnni_schedule` schedules the two
    together."""
    from tvm import te

    x = te.placeholder(i64(*pixels, taps, depth), "uint8", name="x")
    w = te.placeholder(i64(cols // LANES, taps * depth // DEPTH, LANES, DEPTH), "int8", name="w")
    t = te.reduce_axis(i64(0, taps), name="t")
    d = te.reduce_axis(i64(0, depth), name="d")

    def value(*index: Any) -> Any:
        *pixel, n = index
        group = t * (depth // DEPTH) + d // DEPTH
        return te.sum(x[(*pixel, t, d)].astype("int32")
                      * w[n // LANES, group, n % LANES, d % DEPTH].astype("int32"), axis=[t, d])

    out = te.compute(i64(*pixels, cols), value, name=BLOCK)
    # no global symbol of its own ("main"): the module it joins names it
    return te.create_prim_func([x, w, out]).with_attr("op_pattern", 4).without_attr(
        "global_symbol")


def im2col_kernel(shape: tuple[int, int, int, int], kernel: tuple[int, int],
                  strides: tuple[int, int], dilation: tuple[int, int],
                  out: tuple[int, int]) -> Any:
    """Each output pixel's window of a padded NHWC uint8 input, as [n, oh, ow, kh, kw * c]:
    a window row's pixels lie side by side in NHWC, so each is one contiguous copy. Marked
    injective, so the quantize before it joins its kernel; `cpu_schedule` keeps that quantize
    out of this block (computed once per input value, not once per window it falls in)."""
    from tvm import te

    n, _, _, c = shape
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, strides, dilation, out
    x = te.placeholder(i64(*shape), "uint8", name="x")
    windows = te.compute(
        i64(n, oh, ow, kh, kw * c),
        lambda b, i, j, r, q: x[b, i * sh + r * dh, j * sw + q // c * dw, q % c], name=IM2COL)
    return te.create_prim_func([x, windows]).with_attr("op_pattern", 2).without_attr(
        "global_symbol")
