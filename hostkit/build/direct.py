"""Direct convolutions: fp32 NHWC convolutions on a register-blocked kernel with packed weights.

A convolution that is not grouped becomes `conv_kernel`: its input padded once, then each block
of output (a few pixels of a row by two vectors of output channels) accumulated in registers
over the window and the input channels, every weight vector loaded once for all the pixels
beside it and every input value broadcast once for both vectors. The weights are packed at
build time (they are constants) as [out / block, kh, kw, in, block], so the kernel reads them
as one contiguous stream; left HWIO, the 256- and 512-channel layers read one cache line per
input channel from a 9 MB tensor and ran at half the speed. The kernel is written unscheduled
and marked fusable, so Relax fuses the epilogue after it (bias, ReLU, a residual add), and
`cpu_schedule.direct_schedule` schedules the two together: nobody tunes it.

Measured on the 2-core AVX-512 build machine, one kernel with its padding, 2 threads (the
machine's peak, timed with independent FMA chains: 490 GFLOP/s): ResNet-18's 3x3 convolutions
at 56x56x64, 28x28x128, 14x14x256 and 7x7x512 ran at 360-390, 410, 390-430 and 317-348 GFLOP/s;
the same schedule reading the HWIO weights as they were, 367, 406, 208 and 124. In the model
(layers' weights cold, the epilogue fused) untuned ResNet-18 went from 28.5 ms on the default
schedule to 12.0, PyTorch 20.5 and ONNX Runtime 10.2 on the same device. Tiles of 14 pixels by
two vectors were as fast as, or faster than, 7 x 2, 4 x 4 and 7 x 4 at every shape but one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tvm

__all__ = ["BLOCK", "i64", "output_block", "pack_weights", "conv_kernel",
           "direct_convolutions"]

BLOCK = "edgekit_conv"  # the convolution block `cpu_schedule.direct_schedule` recognises
NHWC = ("NHWC", "HWIO", "NHWC")
NHWC_OHWI = ("NHWC", "OHWI", "NHWC")


def output_block(out_channels: int, lanes: int) -> int | None:
    """The output channels one block of the kernel covers: two vectors where they divide the
    layer's, one where only that does, else three half-width vectors (MobileNetV2's 24 channels
    with 16 lanes: three 8-lane vectors, where a block of one and a half ran 10x slower than
    the default schedule); None when none of these divides them."""
    half = lanes // 2
    for block in (2 * lanes, lanes, 3 * half if half >= 4 else 0):
        if block and out_channels % block == 0:
            return block
    return None


def pack_weights(w_hwio: np.ndarray, block: int) -> np.ndarray:
    """HWIO weights as [out / block, kh, kw, in, block]: the order the kernel reads them."""
    kh, kw, c, out = w_hwio.shape
    packed = w_hwio.reshape(kh, kw, c, out // block, block).transpose(3, 0, 1, 2, 4)
    return np.ascontiguousarray(packed)


def i64(*values: int) -> tuple[Any, ...]:
    """Shapes as Relax's kernels type them (int64): FuseTIR refuses a buffer typed otherwise."""
    from tvm import tirx

    return tuple(tirx.IntImm("int64", v) for v in values)


def conv_kernel(shape: tuple[int, int, int, int], kernel: tuple[int, int],
                strides: tuple[int, int], padding: tuple[int, int, int, int],
                out_channels: int, block: int, nchw_input: bool = False) -> Any:
    """out[n, oh, ow, o] = sum over (kh, kw, c) of padded x[n, oh*sh + kh, ow*sw + kw, c] .
    w[o / block, kh, kw, c, o % block], for an NHWC float32 input of `shape` and weights packed
    by `pack_weights`; padding as (top, left, bottom, right). With `nchw_input` the kernel takes
    that input NCHW and transposes it as it pads it (a model's first convolution: one pass over
    the image instead of a transpose and then the padding). Left unscheduled and marked fusable
    (`op_pattern` 4), as `vnni.matmul_kernel`."""
    from tvm import te, tirx

    n, h, wd, c = shape
    (kh, kw), (sh, sw) = kernel, strides
    top, left, bottom, right = padding
    oh, ow = (h + top + bottom - kh) // sh + 1, (wd + left + right - kw) // sw + 1
    x = te.placeholder(i64(n, c, h, wd) if nchw_input else i64(n, h, wd, c), "float32", name="x")
    w = te.placeholder(i64(out_channels // block, kh, kw, c, block), "float32", name="w")

    def read(b: Any, i: Any, j: Any, k: Any) -> Any:
        return x[b, k, i, j] if nchw_input else x[b, i, j, k]

    source = x
    if top or left or bottom or right or nchw_input:
        zero = tirx.const(0.0, "float32")
        source = te.compute(
            i64(n, h + top + bottom, wd + left + right, c),
            lambda b, i, j, k: tirx.if_then_else(
                tirx.all(i >= top, i < h + top, j >= left, j < wd + left),
                read(b, i - top, j - left, k), zero), name="pad")
    rh = te.reduce_axis(i64(0, kh), name="rh")
    rw = te.reduce_axis(i64(0, kw), name="rw")
    rc = te.reduce_axis(i64(0, c), name="rc")
    out = te.compute(
        i64(n, oh, ow, out_channels),
        lambda b, i, j, o: te.sum(source[b, i * sh + rh, j * sw + rw, rc]
                                  * w[o // block, rh, rw, rc, o % block], axis=[rh, rw, rc]),
        name=BLOCK)
    # no global symbol of its own ("main"): the module it joins names it
    return te.create_prim_func([x, w, out]).with_attr("op_pattern", 4).without_attr(
        "global_symbol")


def direct_convolutions(mod: "tvm.IRModule", target: "tvm.target.Target") -> "tvm.IRModule":
    """`mod` with every float32 NHWC convolution that is not grouped, has constant weights (HWIO
    or OHWI) and no dilation, and whose output channels a vector divides, on `conv_kernel`, or
    on `direct_winograd`'s kernels where its `tile_size` says so; depthwise ones on
    `depthwise.depthwise_kernel`; the others as they were. For LLVM CPU targets; any other
    target's module comes back as it is."""
    from tvm import relax
    from tvm.ir import GenericConst

    from hostkit.build import direct_winograd as winograd
    from hostkit.build.rewrite import rewrite_calls
    from hostkit.build.targets import vector_bits

    if str(target.kind.name) != "llvm" or not any(gv.name_hint == "main" for gv in mod.functions):
        return mod
    lanes = max(vector_bits(target) // 32, 4)
    kernels: dict[tuple[Any, ...], Any] = {}
    transposed = _nchw_sources(mod["main"])

    def rewrite(expr: Any, builder: Any) -> Any:
        attrs = expr.attrs
        x, weight = expr.args
        shape = getattr(x.ty, "shape", None)
        layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
        if (layouts not in (NHWC, NHWC_OHWI)
                or str(x.ty.dtype) != "float32" or str(attrs.out_dtype) not in ("", "float32")
                or any(int(d) != 1 for d in attrs.dilation)
                or not isinstance(shape, relax.ShapeExpr)
                or not all(hasattr(d, "value") for d in shape.values)
                or not isinstance(weight, GenericConst) or not hasattr(weight.value, "numpy")):
            return expr
        w = weight.value.numpy()
        if w.dtype != np.float32:
            return expr
        if int(attrs.groups) != 1:
            return _depthwise(builder, kernels, expr, w, lanes)
        if layouts == NHWC_OHWI:
            w = w.transpose(1, 2, 3, 0)  # OHWI -> HWIO
        kh, kw, _, out = w.shape
        block = output_block(out, lanes)
        if block is None:
            return expr
        dims = tuple(int(d.value) for d in shape.values)
        strides = tuple(int(s) for s in attrs.strides)
        padding = tuple(int(p) for p in attrs.padding)
        n, h, wd, _ = dims
        top, left, bottom, right = padding
        oh = (h + top + bottom - kh) // strides[0] + 1
        ow = (wd + left + right - kw) // strides[1] + 1
        m = winograd.tile_size((kh, kw), (strides[0], strides[1]), (oh, ow), dims[3], lanes,
                               out)
        if m is not None:
            return _winograd(builder, kernels, x, w, dims, padding, (oh, ow), (block, lanes), m)
        nchw = next((source for var, source in transposed if var.same_as(x)), None)
        key = (dims, kh, kw, strides, padding, out, block, nchw is not None)
        if key not in kernels:
            kernels[key] = builder.add_func(
                conv_kernel(dims, (kh, kw), strides, padding, out, block,  # type: ignore[arg-type]
                            nchw_input=nchw is not None),
                f"direct_conv_{kh}x{kw}_{dims[3]}x{out}_{h}x{wd}")
        return relax.call_tir(kernels[key], [x if nchw is None else nchw,
                                             relax.const(pack_weights(w, block))],
                              relax.TensorType((n, oh, ow, out), "float32"))

    return rewrite_calls(mod, "relax.nn.conv2d", rewrite)


def _nchw_sources(main: Any) -> list[tuple[Any, Any]]:
    """(var, x) for every binding `var = permute_dims(x, [0, 2, 3, 1])` in `main`: an NCHW
    tensor (the model's input) transposed for an NHWC convolution, which the direct kernel can
    read as it was."""
    from tvm import relax
    from tvm.ir import Op

    transpose = Op.get("relax.permute_dims")
    return [(binding.var, binding.value.args[0])
            for block in main.body.blocks for binding in block.bindings
            if isinstance(binding.value, relax.Call) and binding.value.op.same_as(transpose)
            and binding.value.attrs.axes is not None
            and [int(a) for a in binding.value.attrs.axes] == [0, 2, 3, 1]]


def _winograd(builder: Any, kernels: dict[tuple[Any, ...], Any], x: Any, w: np.ndarray,
              dims: tuple[int, ...], padding: tuple[int, ...], out_hw: tuple[int, int],
              vectors: tuple[int, int], m: int) -> Any:
    """A 3x3 stride-1 convolution as `direct_winograd`'s three kernels, F(m x m, 3 x 3), the
    multiply's output channels in blocks of `vectors[0]`, vectors of `vectors[1]` lanes."""
    from tvm import relax

    from hostkit.build import direct_winograd as winograd

    n, h, wd, c = dims
    out = int(w.shape[3])
    block, lanes = vectors
    points = (m + 2) ** 2
    _, _, rows = winograd.tiles(n, out_hw, m)
    names = (f"winograd_pack_{c}_{h}x{wd}", f"winograd_gemm_{c}x{out}_{rows}",
             f"winograd_unpack_{out}_{out_hw[0]}x{out_hw[1]}")
    makers = (lambda: winograd.pack_kernel(dims, padding, m, lanes),  # type: ignore[arg-type]
              lambda: winograd.gemm_kernel(points, rows, c, out, block),
              lambda: winograd.unpack_kernel(rows, (n, *out_hw, out), m))
    funcs = []
    for name, make in zip(names, makers):
        key = ("winograd", name, dims, padding, block, m)
        if key not in kernels:
            kernels[key] = builder.add_func(make(), name)
        funcs.append(kernels[key])
    packed = relax.call_tir(funcs[0], [x], relax.TensorType((points, rows, c), "float32"))
    weights = relax.const(winograd.transform_weights(w, block, m))
    product = relax.call_tir(funcs[1], [packed, weights],
                             relax.TensorType((points, rows, out), "float32"))
    return relax.call_tir(funcs[2], [product], relax.TensorType((n, *out_hw, out), "float32"))


def _depthwise(builder: Any, kernels: dict[tuple[Any, ...], Any], expr: Any, w: np.ndarray,
               lanes: int) -> Any:
    """A float32 NHWC grouped convolution (static shape, constant weights `w`) as
    `depthwise.depthwise_kernel` when it is depthwise, else `expr` as it was."""
    from tvm import relax

    from hostkit.build import depthwise

    attrs, x = expr.attrs, expr.args[0]
    dims = tuple(int(d.value) for d in x.ty.shape.values)
    out = int(expr.ty.shape[3]) if hasattr(expr.ty, "shape") else -1
    if not depthwise.eligible(int(attrs.groups), dims[3], out, lanes):
        return expr
    w = depthwise.weights_hwc(w, str(attrs.kernel_layout))
    kh, kw, _ = w.shape
    strides = (int(attrs.strides[0]), int(attrs.strides[1]))
    top, left, bottom, right = (int(p) for p in attrs.padding)
    n, h, wd, c = dims
    oh, ow = (h + top + bottom - kh) // strides[0] + 1, (wd + left + right - kw) // strides[1] + 1
    key = ("depthwise", dims, kh, kw, strides, (top, left, bottom, right))
    if key not in kernels:
        kernels[key] = builder.add_func(
            depthwise.depthwise_kernel(dims, (kh, kw), strides,  # type: ignore[arg-type]
                                       (top, left, bottom, right)),
            f"depthwise_conv_{kh}x{kw}_{c}_{h}x{wd}")
    return relax.call_tir(kernels[key], [x, relax.const(w)],
                          relax.TensorType((n, oh, ow, c), "float32"))
