"""Winograd F(2x2, 3x3) on the direct kernel: 3x3 stride-1 convolutions with 2.25x fewer multiplies.

A 3x3 convolution over 2x2 output tiles is, in Winograd's form, 16 independent matrix
multiplies (one per point of the 4x4 transformed tile) between the transformed input tiles and
the transformed weights, with cheap transforms around them. Here each is its own kernel:

- `pack`: the padded input's 4x4 tiles transformed (B^T d B: additions only), as
  [16, tiles, in]; the 16 points of a tile read the same 16 input vectors, loaded once.
- `gemm`: [16, tiles, in] x [16, out / b, in, b]: in the direct kernel's form (scheduled by `cpu_schedule.direct_schedule`: 14 tiles by two vectors of
  output channels in registers), the weights transformed (G g G^T) and packed at build time.
- `unpack`: A^T m A back to NHWC (additions only), marked injective so that Relax fuses the
  epilogue after it (bias, ReLU, the residual add); `unpack_schedule` computes a 2x2 output
  tile per step so the choice between the four expressions is made at build time.

The transforms are written out term by term (the matrices hold 0 and +-1, and 1/2 in G at
build time), so no multiply by zero is left for LLVM, which may not drop them from float code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.build.direct import i64

if TYPE_CHECKING:
    import tvm

__all__ = ["GEMM", "UNPACK", "find_block", "transform_weights", "pack_kernel", "gemm_kernel",
           "unpack_kernel", "tile_size", "tiles", "winograd_schedule"]

PACK = "edgekit_wino_pack"
GEMM = "edgekit_wino_gemm"  # scheduled as the direct kernel's block
UNPACK = "edgekit_wino_unpack"
ROWS = 14  # tiles per block of the multiply at most (`cpu_schedule.direct_schedule`'s)


def _matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (alpha x m), B (alpha x alpha) and G (alpha x 3) of F(m x m, 3 x 3), alpha = m + 2,
    at the points TVM's own Winograd uses: output = A^T [(G g G^T) * (B^T d B)] A."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + 1), m, 3)
    return (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
            np.asarray(g, dtype=np.float64))


# Multiply-adds (2 FLOPs) the kernels do in the time they read one byte of weights from memory,
# on the 2-core build machine: layers whose weights outgrow the caches stream them (ResNet-18's
# 7x7x512 convolutions ran at half their in-cache speed in the model), and F(4x4)'s weights
# are 4x the direct kernel's (36 points to 9), F(2x2)'s 1.8x.
FLOPS_PER_BYTE = 40


def tile_size(kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int],
              channels: int, lanes: int, out_channels: int | None = None) -> int | None:
    """m of the F(m x m, 3 x 3) a convolution runs as, or None (the direct kernel): 3x3,
    stride 1, input channels a vector divides (the input transform writes whole vectors),
    outputs of at least 14 (on ResNet's 7x7 its 4 tiles, padded to a block of 8, lost to the
    direct kernel). F(4x4) multiplies 4x less than the direct kernel and F(2x2) 2.25x, at
    the price of weights 4x and 1.8x as large: of the three, the one that takes least time
    counting either its multiplies or its weights' bytes, whichever bounds it."""
    if kernel != (3, 3) or strides != (1, 1) or channels % lanes or min(out_hw) < 14:
        return None
    out_channels = out_channels or channels

    def cost(points: int, pixels: int) -> float:
        flops = 2 * points * pixels * channels * out_channels
        return max(flops / FLOPS_PER_BYTE, 4 * points * channels * out_channels)

    costs = {m: cost((m + 2) ** 2, tiles(1, out_hw, m)[2]) for m in (4, 2)}
    best = min(costs, key=lambda m: costs[m])
    return best if costs[best] < cost(9, out_hw[0] * out_hw[1]) else None


def transform_weights(w_hwio: np.ndarray, block: int, m: int) -> np.ndarray:
    """HWIO 3x3 weights as G g G^T, packed [alpha^2, out / block, 1, in, block] (the direct
    kernel's weight order, its window one point), computed in float64."""
    _, _, g = _matrices(m)
    u = np.einsum("ah,hwio,bw->abio", g, w_hwio.astype(np.float64), g)  # [alpha, alpha, in, out]
    alpha, _, c, out = u.shape
    packed = u.reshape(alpha * alpha, c, out // block, block).transpose(0, 2, 1, 3)[:, :, None]
    return np.ascontiguousarray(packed.astype(w_hwio.dtype))


def tiles(n: int, out_hw: tuple[int, int], m: int) -> tuple[int, int, int]:
    """(tile rows, tile columns of an image, tiles of the batch padded to a multiple of the
    multiply's block of 8 to 14 tiles, the block that pads fewest, the larger on a tie)."""
    th, tw = -(-out_hw[0] // m), -(-out_hw[1] // m)
    count = n * th * tw
    padded = min((-(-count // rows) * rows, -rows) for rows in range(8, ROWS + 1))[0]
    return th, tw, padded


def _combine(terms: list[tuple[float, Any]]) -> Any:
    """sum of coefficient * value, zero coefficients dropped and +-1 not multiplied."""
    total = None
    for coefficient, value in terms:
        if coefficient == 0:
            continue
        term = value if coefficient == 1 else (-value if coefficient == -1
                                                else value * float(coefficient))
        total = term if total is None else total + term
    return total


def _transform(left: np.ndarray, right: np.ndarray, values: Any) -> list[Any]:
    """left^T X right for X[i][j] = values(i, j), as one expression per output point, row
    first: the row sums each point shares are the same expressions, which LLVM computes once
    when the points are unrolled side by side (2 alpha^3 multiply-adds, not alpha^4)."""
    rows = [[_combine([(left[i, a], values(i, j)) for i in range(left.shape[0])])
             for j in range(right.shape[0])] for a in range(left.shape[1])]
    return [_combine([(right[j, b], rows[a][j]) for j in range(right.shape[0])])
            for a in range(left.shape[1]) for b in range(right.shape[1])]


def _chain(index: Any, values: list[Any]) -> Any:
    """values[index] for a loop variable `index`: a chain of selects, each folded away once
    the loop over `index` is unrolled."""
    from tvm import tirx

    result = values[-1]
    for i in range(len(values) - 2, -1, -1):
        result = tirx.Select(index == i, values[i], result)
    return result


def pack_kernel(shape: tuple[int, int, int, int], padding: tuple[int, int, int, int],
                m: int, lanes: int) -> Any:
    """NHWC float32 input of `shape` -> [alpha^2, tiles (padded), in]: B^T d B of every
    alpha x alpha tile of the padded input (tiles past the batch's are zero).

    Written scheduled, as loops: tiles and vectors of channels across the cores, and for each
    the alpha^2 input vectors loaded once, their row sums (B^T d) computed once, and the alpha^2
    points stored. (Written as a tensor expression, the point a loop iteration stores is a
    select among all alpha^2 expressions, which took LLVM 47 s to fold for F(4x4).)"""
    from tvm import s_tir, tirx
    from tvm.ir import Range

    n, h, w, c = shape
    top, left, bottom, right = padding
    _, b_mat, _ = _matrices(m)
    alpha = m + 2
    th, tw, padded = tiles(n, (h + top + bottom - 2, w + left + right - 2), m)
    x = tirx.decl_buffer(i64(n, h, w, c), "float32", name="x")
    v = tirx.decl_buffer(i64(alpha * alpha, padded, c), "float32", name="v")
    outer = tirx.Var("outer", "int64")
    inner = tirx.Var("inner", "int64")
    int64 = lambda value: tirx.IntImm("int64", value)  # noqa: E731
    p = tirx.floordiv(outer, int64(c // lanes))
    k = tirx.floormod(outer, int64(c // lanes)) * int64(lanes) + inner
    image, t = tirx.floordiv(p, int64(th * tw)), tirx.floormod(p, int64(th * tw))
    y0 = tirx.floordiv(t, int64(tw)) * int64(m) - int64(top)
    x0 = tirx.floormod(t, int64(tw)) * int64(m) - int64(left)
    loaded = {(i, j): tirx.Var(f"d{i}{j}", "float32") for i in range(alpha) for j in range(alpha)}
    rows = {(a, j): tirx.Var(f"r{a}{j}", "float32") for a in range(alpha) for j in range(alpha)}
    zero = tirx.const(0.0, "float32")
    steps: list[Any] = []
    for (i, j), var in loaded.items():
        y, xx = y0 + int64(i), x0 + int64(j)
        inside = tirx.all(p < int64(n * th * tw), y >= int64(0), y < int64(h), xx >= int64(0),
                          xx < int64(w))
        load = tirx.BufferLoad(x, [tirx.min(image, int64(n - 1)), y, xx, k])
        steps.append(tirx.Bind(var, tirx.if_then_else(inside, load, zero)))
    for (a, j), var in rows.items():
        steps.append(tirx.Bind(var, _combine([(b_mat[i, a], loaded[i, j])
                                              for i in range(alpha)])))
    steps += [tirx.BufferStore(v, _combine([(b_mat[j, b], rows[a, j]) for j in range(alpha)]),
                               [int64(a * alpha + b), p, k])
              for a in range(alpha) for b in range(alpha)]
    body: Any = tirx.SeqStmt(steps)
    body = tirx.For(inner, int64(0), int64(lanes), tirx.ForKind.VECTORIZED, body)
    body = tirx.For(outer, int64(0), int64(padded * (c // lanes)), tirx.ForKind.PARALLEL, body)
    # one opaque block under the root, as TVM's Relax passes expect of a kernel
    whole = [tirx.BufferRegion(buffer, [Range.from_min_extent(int64(0), extent)
                                        for extent in buffer.shape]) for buffer in (x, v)]
    body = s_tir.SBlockRealize([], True, s_tir.SBlock([], whole[:1], whole[1:], PACK, body))
    body = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body))
    func = tirx.PrimFunc([x, v], body)
    return func.with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True).with_attr(
        "tirx.noalias", True)


def gemm_kernel(points: int, rows: int, channels: int, out_channels: int, block: int) -> Any:
    """[points, rows, in] x weights from `transform_weights` -> [points, rows, out], in the
    direct kernel's form, which `cpu_schedule.direct_schedule` schedules. Opaque: nothing fuses
    into it."""
    from tvm import te

    v = te.placeholder(i64(points, rows, channels), "float32", name="v")
    u = te.placeholder(i64(points, out_channels // block, 1, channels, block), "float32",
                       name="u")
    rc = te.reduce_axis(i64(0, channels), name="rc")
    out = te.compute(
        i64(points, rows, out_channels),
        lambda e, p, o: te.sum(v[e, p, rc] * u[e, o // block, 0, rc, o % block], axis=[rc]),
        name=GEMM)
    return te.create_prim_func([v, u, out]).with_attr("op_pattern", 8).without_attr(
        "global_symbol")


def unpack_kernel(rows: int, out_shape: tuple[int, int, int, int], m: int) -> Any:
    """[alpha^2, rows, out] -> NHWC output: A^T M A of every tile. Injective, so the epilogue
    fuses after it."""
    from tvm import te

    n, oh, ow, k = out_shape
    a_mat, _, _ = _matrices(m)
    alpha = m + 2
    th, tw, _ = tiles(n, (oh, ow), m)
    product = te.placeholder(i64(alpha * alpha, rows, k), "float32", name="m")

    def value(b: Any, y: Any, xx: Any, o: Any) -> Any:
        p = b * (th * tw) + (y // m) * tw + xx // m
        pixels = _transform(a_mat, a_mat, lambda i, j: product[i * alpha + j, p, o])
        return _chain((y % m) * m + xx % m, pixels)

    out = te.compute(i64(n, oh, ow, k), value, name=UNPACK)
    return te.create_prim_func([product, out]).with_attr("op_pattern", 2).without_attr(
        "global_symbol")


def find_block(sch: Any, names: tuple[str, ...]) -> Any:
    """The first of the blocks `names` in the schedule's function, or None."""
    for name in names:
        try:
            return sch.get_sblock(name)
        except Exception:  # no block of that name
            continue
    return None


def winograd_schedule(func: Any, target: "tvm.target.Target") -> Any:
    """The schedule of a kernel holding `unpack_kernel`'s block (with its fused epilogue), or
    None when it holds none: one m x m output tile per step over a vector of channels,
    unrolled, so each of its pixels is the one expression it needs, the tiles across the
    cores. (`pack_kernel` comes scheduled.)"""
    from tvm import s_tir

    from hostkit.build.targets import vector_bits

    lanes = max(vector_bits(target) // 32, 4)
    sch = s_tir.Schedule(func)
    unpack = find_block(sch, (UNPACK,))
    if unpack is None:
        return None
    points = int(sch.get(unpack).reads[0].source.shape[0])  # alpha^2
    return _unpack_schedule(sch, lanes, round(points ** 0.5) - 2)


def _unpack_schedule(sch: Any, lanes: int, m: int) -> Any:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    # everything into the last block (the epilogue's output): one pass over the output
    for block in blocks[:-1]:
        sch.compute_inline(block)
    *batch, y, x, o = sch.get_loops(blocks[-1])
    y_outer, y_inner = sch.split(y, [None, m])
    x_outer, x_inner = sch.split(x, [None, m])
    o_outer, o_inner = sch.split(o, [None, lanes])
    sch.reorder(*batch, y_outer, x_outer, o_outer, y_inner, x_inner, o_inner)
    sch.parallel(sch.fuse(*batch, y_outer))
    sch.unroll(y_inner)
    sch.unroll(x_inner)
    sch.vectorize(o_inner)
    return sch
