"""Winograd convolution for the tuned CPU build: 3x3 stride-1 convolutions as F(m x m, 3 x 3).

A 3x3 convolution computed as Winograd's F(4x4, 3x3) multiplies 4x less than the direct one
(F(2x2, 3x3): 2.25x less), at the price of an input transform (`data_pack`) and an output
transform (`inverse`) around a batched matrix multiply (`bgemm`). The weight transform is done
here, once, at build time: the weights are constants, so each eligible convolution becomes a
kernel that takes the already transformed weights (`alpha x alpha x CO x CI`).

The kernel's stages mirror topi's NHWC Winograd compute (`topi.nn.conv2d_winograd_nhwc`) and
carry the same `schedule_rule` attributes, which make MetaSchedule schedule the data-pack and
inverse stages with TVM's hand-written CPU rules (`s_tir.meta_schedule.cpu.conv2d_nhwc_winograd_
data_pack` and `..._inverse`: tiles the pixel and channel loops, unrolls the transform loops,
computes the padding and tile gathering inside) instead of the generic ones, which scheduled them
poorly. topi's own NHWC compute cannot take pre-transformed weights in TVM 0.27 (that path raises
"LEGACY-FLOW triggered"), and its weight transform inside the kernel would redo the transform at
every inference (as much work as the convolution itself on ResNet-18's 7x7 layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from tvm import relax, te

__all__ = ["TILE_SIZE", "winograd_legalize_map", "eligible", "transform_weight",
           "conv2d_winograd_nhwc", "KERNEL_NAME"]

# Output tile edge m of F(m x m, 3 x 3): 4 is what topi's CPU Winograd uses.
TILE_SIZE = 4
# The PrimFunc name hint of a Winograd kernel (tests and the kernel profile look for it).
KERNEL_NAME = "conv2d_winograd"


def _matrices(tile: int) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """A, B and G as numbers: the same points topi's `winograd_transform_matrices` uses."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(tile + 1), tile, 3)


def transform_weight(weight_ohwi: "np.ndarray", tile: int = TILE_SIZE) -> "np.ndarray":
    """OHWI 3x3 weights -> Winograd's G w G^T, laid out (alpha, alpha, CO, CI), in float64 math."""
    import numpy as np

    _, _, g = _matrices(tile)
    packed = np.einsum("eh,ohwi,nw->enoi", g, weight_ohwi.astype(np.float64), g)
    return packed.astype(weight_ohwi.dtype)


def conv2d_winograd_nhwc(data: "te.Tensor", kernel_pack: "te.Tensor",
                         padding: tuple[int, int, int, int], tile: int) -> "te.Tensor":
    """NHWC data and pre-transformed weights -> NHWC output, in topi's stages and rule names."""
    from tvm import te
    from tvm.topi.nn.pad import pad
    from tvm.topi.nn.winograd_util import winograd_transform_matrices
    from tvm.topi.utils import get_const_tuple

    n, h, w, ci = get_const_tuple(data.shape)
    alpha, _, co, _ = get_const_tuple(kernel_pack.shape)
    m = tile
    pad_t, pad_l, pad_b, pad_r = padding
    out_h, out_w = h + pad_t + pad_b - 2, w + pad_l + pad_r - 2
    n_h, n_w = -(-out_h // m), -(-out_w // m)
    tiles = n * n_h * n_w
    dtype = str(data.dtype)
    a_mat, b_mat, _ = winograd_transform_matrices(m, 3, dtype)

    # Padded so that every tile, the last one included, reads alpha x alpha valid elements.
    extra_h = (n_h - 1) * m + alpha - (h + pad_t + pad_b)
    extra_w = (n_w - 1) * m + alpha - (w + pad_l + pad_r)
    data_pad = pad(data, (0, pad_t, pad_l, 0), (0, pad_b + extra_h, pad_r + extra_w, 0),
                   name="data_pad", attrs={"schedule_rule": "None"})
    input_tile = te.compute(
        (alpha, alpha, tiles, ci),
        lambda eps, nu, p, c: data_pad[p // (n_h * n_w), ((p // n_w) % n_h) * m + eps,
                                       (p % n_w) * m + nu, c],
        name="input_tile", attrs={"schedule_rule": "None"})
    r_a = te.reduce_axis((0, alpha), "r_a")
    r_b = te.reduce_axis((0, alpha), "r_b")
    data_pack = te.compute(
        (alpha, alpha, tiles, ci),
        lambda eps, nu, p, c: te.sum(input_tile[r_a, r_b, p, c] * b_mat[r_a, eps]
                                     * b_mat[r_b, nu], axis=[r_a, r_b]),
        name="data_pack", attrs={"schedule_rule": "conv2d_nhwc_winograd_data_pack"})
    r_c = te.reduce_axis((0, ci), name="ci")
    bgemm = te.compute(
        (alpha, alpha, tiles, co),
        lambda eps, nu, p, o: te.sum(data_pack[eps, nu, p, r_c] * kernel_pack[eps, nu, o, r_c],
                                     axis=[r_c]),
        name="bgemm", attrs={"layout_free_placeholders": [kernel_pack]})
    r_a = te.reduce_axis((0, alpha), "r_a")
    r_b = te.reduce_axis((0, alpha), "r_b")
    inverse = te.compute(
        (m, m, tiles, co),
        lambda vh, vw, p, o: te.sum(bgemm[r_a, r_b, p, o] * a_mat[r_a, vh] * a_mat[r_b, vw],
                                    axis=[r_a, r_b]),
        name="inverse", attrs={"schedule_rule": "conv2d_nhwc_winograd_inverse"})
    return te.compute(
        (n, out_h, out_w, co),
        lambda b, y, x, o: inverse[y % m, x % m, b * n_h * n_w + (y // m) * n_w + x // m, o],
        name=KERNEL_NAME)


def eligible(call: "relax.Call") -> bool:
    """A float32 NHWC/OHWI 3x3 stride-1 undilated dense convolution with constant weights."""
    from tvm.ir import GenericConst

    attrs = call.attrs
    weight = call.args[1]
    if not isinstance(weight, GenericConst) or not hasattr(weight.value, "numpy"):
        return False
    shape = [int(d) for d in weight.value.shape]
    return (str(attrs.data_layout) == "NHWC" and str(attrs.kernel_layout) == "OHWI"
            and str(attrs.out_layout) == "NHWC" and int(attrs.groups) == 1
            and [int(s) for s in attrs.strides] == [1, 1]
            and [int(d) for d in attrs.dilation] == [1, 1]
            and len(shape) == 4 and shape[1:3] == [3, 3]
            and str(weight.value.dtype) == "float32"
            and str(attrs.out_dtype) in ("", "float32"))


def winograd_legalize_map(tile: int = TILE_SIZE) -> dict[str, Any]:
    """LegalizeOps' override for conv2d: eligible convolutions as Winograd, the rest as usual."""
    from tvm import relax
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    def legalize(bb: "relax.BlockBuilder", call: "relax.Call") -> "relax.Expr":
        if not eligible(call):
            return _nn_conv2d(bb, call)
        packed = relax.const(transform_weight(call.args[1].value.numpy(), tile))
        padding = tuple(int(p) for p in call.attrs.padding)
        if len(padding) == 2:
            padding = (padding[0], padding[1], padding[0], padding[1])
        return bb.call_te(conv2d_winograd_nhwc, call.args[0], packed, padding, tile,
                          primfunc_name_hint=KERNEL_NAME)

    return {"relax.nn.conv2d": legalize}
