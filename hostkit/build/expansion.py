"""A MobileNet block's expansion and the strided depthwise convolution after it, as one kernel.

MobileNetV2's second block widens 16 channels to 96 at 112x112 (a 1x1 convolution, batch norm,
ReLU6) and then convolves each channel 3x3 with stride 2. Run as two kernels, the 4.8 MB of the
widened map go out to memory and come back: on the 2-core build machine the pair took 0.222 +
0.156 ms in the model, most of it moving that map. Here each core takes a few output rows of
one block of channels at a time, computes the expansion (and its batch norm and clip) for just
the input rows those need into a tile that stays in cache, and convolves the tile at once: one
row of the widened map in eight computed twice, none of it written out. The same pair then ran
in 0.25 ms (isolated, caches flushed before each call). Only where the widened map outgrows a
core's cache (`LARGE`): MobileNetV2's next such pair (24 -> 144 at 56x56, 1.8 MB) ran 0.111 ms
as two kernels and 0.127 as one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.build.direct import i64

if TYPE_CHECKING:
    import tvm

__all__ = ["BLOCK", "expansion_kernel", "expansion_schedule", "fused_expansions"]

EXPAND = "edgekit_expand"
ACTIVATION = "edgekit_expand_act"
BLOCK = "edgekit_expand_dw"
LARGE = 2 << 20  # bytes of widened map from which the pair runs as one kernel
ROWS = (4, 7, 2, 1)  # output rows per tile, the first that divides the output's height
PIXELS = (4, 7, 2, 1)  # input pixels per block of the expansion's registers
AFFINE = {"relax.subtract", "relax.add", "relax.multiply", "relax.divide"}
CLIPS = {"relax.maximum", "relax.minimum"}


def expansion_kernel(shape: tuple[int, int, int, int], channels: int,
                     bounds: tuple[float | None, float | None]) -> Any:
    """out[n, i, j, c] = sum over (r, s) of act[n, 2i + r - 1, 2j + s - 1, c] . wd[r, s, c]
    (zero outside the map), act = clip(sum over k of x[n, h, w, k] . w[k, c] + bias[c], *bounds),
    for an NHWC float32 input of `shape`, w [in, channels], bias [channels], wd [3, 3, channels].
    Marked fusable (`op_pattern` 4), so the depthwise convolution's epilogue joins it."""
    from tvm import te, tirx

    n, h, w, k = shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    x = te.placeholder(i64(n, h, w, k), "float32", name="x")
    weights = te.placeholder(i64(k, channels), "float32", name="w")
    bias = te.placeholder(i64(channels), "float32", name="bias")
    depthwise = te.placeholder(i64(3, 3, channels), "float32", name="wd")
    rk = te.reduce_axis(i64(0, k), name="rk")
    expand = te.compute(i64(n, h, w, channels),
                        lambda b, y, z, c: te.sum(x[b, y, z, rk] * weights[rk, c], axis=rk),
                        name=EXPAND)
    low, high = bounds

    def act(b: Any, y: Any, z: Any, c: Any) -> Any:
        value = expand[b, y, z, c] + bias[c]
        if low is not None:
            value = tirx.max(value, tirx.const(low, "float32"))
        if high is not None:
            value = tirx.min(value, tirx.const(high, "float32"))
        return value

    activation = te.compute(i64(n, h, w, channels), act, name=ACTIVATION)
    ri = te.reduce_axis(i64(0, 3), name="ri")
    rj = te.reduce_axis(i64(0, 3), name="rj")
    zero = tirx.const(0.0, "float32")

    def value(b: Any, i: Any, j: Any, c: Any) -> Any:
        row, col = i * 2 + ri - 1, j * 2 + rj - 1
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
        return te.sum(tirx.if_then_else(inside, activation[b, row, col, c], zero)
                      * depthwise[ri, rj, c], axis=[ri, rj])

    out = te.compute(i64(n, oh, ow, channels), value, name=BLOCK)
    return te.create_prim_func([x, weights, bias, depthwise, out]).with_attr(
        "op_pattern", 4).without_attr("global_symbol")


def expansion_schedule(func: Any, target: "tvm.target.Target") -> Any:
    """The schedule of a kernel holding `expansion_kernel`'s blocks, or None: tiles of output
    rows by a block of channels across the cores; in each, the expansion's rows it needs in
    registers (a few pixels by the block's vectors, over the input channels), clipped as they
    are written to the tile, then the depthwise convolution of the tile (up to 8 pixels of a
    row by a vector) and its epilogue."""
    from tvm import s_tir

    from hostkit.build.targets import vector_bits

    lanes = max(vector_bits(target) // 32, 4)
    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock(BLOCK)
    except Exception:  # not this kernel
        return None
    mine = {sch.get(sch.get_sblock(name)) for name in (EXPAND, ACTIVATION)} | {sch.get(block)}
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for other in blocks[:-1]:  # the epilogue's elementwise blocks into one, the output
        if not any(sch.get(other).same_as(stmt) for stmt in mine):
            sch.compute_inline(other)
    last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    write_back = (sch.cache_write(block, 0, "global") if sch.get(last).same_as(sch.get(block))
                  else last)
    n, i, j, c, ri, rj = sch.get_loops(block)
    height, width, channels = (int(sch.get(loop).extent) for loop in (i, j, c))
    rows = next(r for r in ROWS if height % r == 0)
    pixels = max(p for p in range(1, 9) if width % p == 0)
    chunk = 2 * lanes if channels % (2 * lanes) == 0 else lanes
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_inner = sch.split(j, [None, pixels])
    c_outer, c_chunk = sch.split(c, [None, chunk])
    c_vectors, c_lanes = sch.split(c_chunk, [None, lanes])
    sch.reorder(n, i_outer, c_outer, i_inner, j_outer, c_vectors, ri, rj, j_inner, c_lanes)
    outer = sch.fuse(n, i_outer, c_outer)
    sch.parallel(outer)
    sch.reverse_compute_at(write_back, c_vectors)
    sch.vectorize(sch.get_loops(write_back)[-1])
    activation, expand = sch.get_sblock(ACTIVATION), sch.get_sblock(EXPAND)
    sch.compute_at(activation, outer)
    sch.compute_at(expand, outer)
    y, z, e_channels, k = sch.get_loops(expand)[-4:]
    width_in = int(sch.get(z).extent)
    z_outer, z_inner = sch.split(z, [None, next(p for p in PIXELS if width_in % p == 0)])
    e_vectors, e_lanes = sch.split(e_channels, [None, lanes])
    sch.reorder(y, z_outer, k, z_inner, e_vectors, e_lanes)
    sch.unroll(z_inner)
    sch.unroll(e_vectors)
    sch.vectorize(e_lanes)
    accumulator = sch.cache_write(expand, 0, "local")
    sch.reverse_compute_at(accumulator, z_outer)
    sch.reverse_compute_at(activation, z_outer)
    sch.vectorize(sch.get_loops(accumulator)[-1])
    sch.vectorize(sch.get_loops(activation)[-1])
    sch.unroll(j_inner)
    sch.unroll(ri)
    sch.unroll(rj)
    sch.vectorize(c_lanes)
    sch.decompose_reduction(block, ri)
    sch.decompose_reduction(expand, k)
    return sch


def fused_expansions(mod: "tvm.IRModule", target: "tvm.target.Target") -> "tvm.IRModule":
    """`mod` with every float32 NHWC `conv2d 1x1 -> per-channel affine (batch norm) -> clip or
    ReLU -> depthwise conv2d 3x3, stride 2, padding 1` whose widened map is `LARGE` or more, with
    constant weights and nothing else reading its intermediate values, as one call of
    `expansion_kernel` (the affine folded into the expansion's weights and a bias); the rest as
    it was. For LLVM CPU targets; any other target's module comes back as it is."""
    from tvm import relax

    from hostkit.build.rewrite import rewrite_calls
    from hostkit.build.targets import vector_bits

    if str(target.kind.name) != "llvm" or not any(gv.name_hint == "main" for gv in mod.functions):
        return mod
    lanes = max(vector_bits(target) // 32, 4)
    main = mod["main"]
    bindings = {binding.var: binding.value for block in main.body.blocks
                for binding in block.bindings}
    uses = _uses(main)
    kernels: dict[tuple[Any, ...], Any] = {}

    def rewrite(call: Any, builder: Any) -> Any:
        found = _strided_depthwise(call, lanes)
        if found is None:
            return call
        source, wd = found
        chain = _chain(source, bindings, uses)
        if chain is None:
            return call
        x, weights, scale, shift, bounds = chain
        shape = tuple(int(d) for d in x.ty.shape.values)
        channels = int(weights.shape[1])
        if np.prod(shape[:3]) * channels * 4 < LARGE:
            return call
        key = (shape, channels, bounds)
        if key not in kernels:
            kernels[key] = builder.add_func(
                expansion_kernel(shape, channels, bounds),  # type: ignore[arg-type]
                f"expansion_{shape[3]}x{channels}_depthwise_{shape[1]}x{shape[2]}")
        n, h, w, _ = shape
        return relax.call_tir(
            kernels[key],
            [x, relax.const((weights * scale).astype(np.float32)),
             relax.const(shift.astype(np.float32)), relax.const(wd)],
            relax.TensorType((n, (h - 1) // 2 + 1, (w - 1) // 2 + 1, channels), "float32"))

    return rewrite_calls(mod, "relax.nn.conv2d", rewrite)


def _uses(main: Any) -> dict[Any, int]:
    """How many times each variable of `main` is read (its output counts as a read)."""
    from tvm import relax

    counts: dict[Any, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                visit(arg)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                visit(field)
        elif isinstance(expr, relax.TupleGetItem):
            visit(expr.tuple_value)

    for block in main.body.blocks:
        for binding in block.bindings:
            visit(binding.value)
    visit(main.body.body)
    return counts


def _constant(expr: Any) -> np.ndarray | None:
    from tvm.ir import GenericConst

    if isinstance(expr, GenericConst) and hasattr(expr.value, "numpy"):
        value: np.ndarray = expr.value.numpy()
        return value
    return None


def _strided_depthwise(call: Any, lanes: int) -> tuple[Any, np.ndarray] | None:
    """(input, weights [3, 3, c]) of a float32 NHWC depthwise 3x3 convolution with stride 2 and
    padding 1 whose channels a vector divides, else None."""
    from tvm import relax

    from hostkit.build.depthwise import weights_hwc

    attrs = call.attrs
    x, weight = call.args
    w = _constant(weight)
    shape = getattr(x.ty, "shape", None)
    if (w is None or w.dtype != np.float32 or str(x.ty.dtype) != "float32"
            or not isinstance(x, relax.Var) or not isinstance(shape, relax.ShapeExpr)
            or attrs.data_layout != "NHWC" or attrs.out_layout not in ("", "NHWC")
            or attrs.kernel_layout not in ("HWIO", "OHWI")
            or [int(s) for s in attrs.strides] != [2, 2]
            or [int(p) for p in attrs.padding] != [1, 1, 1, 1]
            or any(int(d) != 1 for d in attrs.dilation)):
        return None
    channels = int(shape.values[3].value) if hasattr(shape.values[3], "value") else -1
    if int(attrs.groups) != channels or channels % lanes or w.size != 9 * channels:
        return None
    hwc = weights_hwc(w, str(attrs.kernel_layout))
    return (x, hwc) if hwc.shape == (3, 3, channels) else None


def _chain(var: Any, bindings: dict[Any, Any], uses: dict[Any, int]) -> tuple[Any, ...] | None:
    """(x, weights [in, out], scale, shift, (low, high)) where `var` is clip(expansion(x) *
    scale + shift, low, high): a 1x1 float32 NHWC convolution with constant weights, then
    per-channel affine operations and clips of constants (a ReLU is one), each value read once;
    else None."""
    from tvm import relax

    ops: list[tuple[str, np.ndarray]] = []
    while True:
        value = bindings.get(var)
        if uses.get(var, 0) != 1 or not isinstance(value, relax.Call):
            return None
        name = str(getattr(value.op, "name", ""))
        if name == "relax.nn.relu" and isinstance(value.args[0], relax.Var):
            ops.append(("relax.maximum", np.zeros(1, np.float32)))
            var = value.args[0]
            continue
        if name not in AFFINE | CLIPS:
            break
        constant = _constant(value.args[1])
        if constant is None or not isinstance(value.args[0], relax.Var):
            return None
        ops.append((name, constant))
        var = value.args[0]
    if name != "relax.nn.conv2d":
        return None
    attrs, (x, weight) = value.attrs, value.args
    w = _constant(weight)
    if (w is None or w.dtype != np.float32 or w.ndim != 4 or int(attrs.groups) != 1
            or attrs.data_layout != "NHWC" or attrs.out_layout not in ("", "NHWC")
            or any(int(s) != 1 for s in attrs.strides) or any(int(p) for p in attrs.padding)
            or any(int(d) != 1 for d in attrs.dilation)
            or not isinstance(x.ty.shape, relax.ShapeExpr)
            or not all(hasattr(d, "value") for d in x.ty.shape.values)):
        return None
    if attrs.kernel_layout == "HWIO" and w.shape[:2] == (1, 1):
        weights = w[0, 0]
    elif attrs.kernel_layout == "OHWI" and w.shape[1:3] == (1, 1):
        weights = w[:, 0, 0, :].T
    else:
        return None
    return _fold(np.ascontiguousarray(weights), list(reversed(ops)), x)


def _fold(weights: np.ndarray, ops: list[tuple[str, np.ndarray]], x: Any) -> tuple[Any, ...] | None:
    """The affine operations (in order) as one scale and shift per output channel, then the
    clips as bounds; None when they do not come in that order or a constant is not one value
    per channel (or one value)."""
    channels = weights.shape[1]
    scale, shift = np.ones(channels), np.zeros(channels)
    low: float | None = None
    high: float | None = None
    for name, constant in ops:
        if constant.size not in (1, channels) or (constant.ndim
                                                  and constant.shape[-1] != constant.size):
            return None
        c = constant.reshape(-1).astype(np.float64)
        if name in CLIPS:
            if c.size != 1:
                return None
            bound = float(c[0])
            if name == "relax.maximum":
                low = bound if low is None else max(low, bound)
                high = None if high is None else max(high, bound)
            else:
                high = bound if high is None else min(high, bound)
                low = None if low is None else min(low, bound)
            continue
        if low is not None or high is not None:
            return None  # an affine operation after a clip
        if name == "relax.subtract":
            shift = shift - c
        elif name == "relax.add":
            shift = shift + c
        elif name == "relax.multiply":
            scale, shift = scale * c, shift * c
        else:
            scale, shift = scale / c, shift / c
    return x, weights, scale.astype(np.float32), shift, (low, high)
