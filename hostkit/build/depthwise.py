"""Depthwise convolutions (MobileNet's 3x3s): NHWC, the padding read in place, pixels in registers.

TVM's default lowering pads the input into a copy first and then convolves it: two passes over
activations that outgrow the cache (MobileNetV2's 112x112x96 floats are 4.8 MB). Here each
output vector of channels is accumulated in a register over the window, reading the input where
it is and zero outside it, a row's pixels side by side so each weight vector is loaded once for
all of them; the epilogue (batch norm, the clip of ReLU6) is applied as each block is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.build.direct import i64

if TYPE_CHECKING:
    import tvm

__all__ = ["BLOCK", "depthwise_kernel", "depthwise_schedule", "eligible"]

BLOCK = "edgekit_depthwise"
PIXELS = 8  # output pixels of a row per block, at most


def eligible(groups: int, channels: int, out_channels: int, lanes: int) -> bool:
    """A depthwise convolution (one filter per channel) whose channels a vector divides."""
    return groups == channels == out_channels and channels % lanes == 0


def depthwise_kernel(shape: tuple[int, int, int, int], kernel: tuple[int, int],
                     strides: tuple[int, int], padding: tuple[int, int, int, int]) -> Any:
    """out[n, y, x, c] = sum over (i, j) of x[n, y*sh + i - top, x*sw + j - left, c] . w[i, j, c]
    (zero outside the input), for an NHWC float32 input of `shape` and weights [kh, kw, c].
    Marked fusable (`op_pattern` 4) so the epilogue joins its kernel."""
    from tvm import te, tirx

    n, h, w, c = shape
    (kh, kw), (sh, sw) = kernel, strides
    top, left, bottom, right = padding
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    x = te.placeholder(i64(n, h, w, c), "float32", name="x")
    weights = te.placeholder(i64(kh, kw, c), "float32", name="w")
    ri = te.reduce_axis(i64(0, kh), name="ri")
    rj = te.reduce_axis(i64(0, kw), name="rj")
    zero = tirx.const(0.0, "float32")

    def value(b: Any, y: Any, xx: Any, k: Any) -> Any:
        row, col = y * sh + ri - top, xx * sw + rj - left
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
        return te.sum(tirx.if_then_else(inside, x[b, row, col, k], zero) * weights[ri, rj, k],
                      axis=[ri, rj])

    out = te.compute(i64(n, oh, ow, c), value, name=BLOCK)
    return te.create_prim_func([x, weights, out]).with_attr("op_pattern", 4).without_attr(
        "global_symbol")


def weights_hwc(w: np.ndarray, kernel_layout: str) -> np.ndarray:
    """A depthwise convolution's constant weights (HWIO [kh, kw, 1, c] or OHWI [c, kh, kw, 1])
    as [kh, kw, c]."""
    if kernel_layout == "OHWI":
        w = w.transpose(1, 2, 3, 0)
    return np.ascontiguousarray(w[:, :, 0, :])


def depthwise_schedule(func: Any, target: "tvm.target.Target") -> Any:
    """The schedule of a kernel holding `depthwise_kernel`'s block, or None: rows of the output
    across the cores, blocks of up to PIXELS pixels by one vector of channels accumulated in
    registers over the window (unrolled), the epilogue inlined into the write-back."""
    from tvm import s_tir

    from hostkit.build.targets import vector_bits

    lanes = max(vector_bits(target) // 32, 4)
    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock(BLOCK)
    except Exception:  # not a depthwise convolution
        return None
    # the epilogue's elementwise blocks into one, the kernel's output
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for other in blocks[:-1]:
        if not sch.get(other).same_as(sch.get(block)):
            sch.compute_inline(other)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    n, y, x, c, ri, rj = sch.get_loops(block)
    width = int(sch.get(x).extent)
    pixels = max(p for p in range(1, PIXELS + 1) if width % p == 0)
    x_outer, x_inner = sch.split(x, [None, pixels])
    c_outer, c_inner = sch.split(c, [None, lanes])
    sch.reorder(n, y, c_outer, x_outer, ri, rj, x_inner, c_inner)
    outer = sch.fuse(n, y)
    sch.parallel(outer)
    sch.unroll(ri)
    sch.unroll(rj)
    sch.unroll(x_inner)
    sch.vectorize(c_inner)
    if len(blocks) > 1:
        write_back = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    else:
        write_back = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(write_back, x_outer)
    sch.vectorize(sch.get_loops(write_back)[-1])
    init = sch.decompose_reduction(block, ri)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch
