"""int8 kernels: lower the quantized layers' float graph to int8 x int8 -> int32 arithmetic.

A model quantized by `hostkit.models.quantize` imports into Relax as float operations on integer
values: `clip(round(x / s), -127, 127)` feeding a convolution (or a matmul) whose constant weights
are integers in [-127, 127], then a multiply and an add. Here each such convolution and matmul
takes its input and weights as int8 and accumulates in int32, with one cast back to float before
the requantization multiply; fusion then puts the next layer's quantize into the same kernel. The
arithmetic is exact on both sides (integer products, int32 sums), so the device computes what
PyTorch's quantized model computed. Layers that do not have the pattern stay in fp32 and are
counted, never silently. On a target with AVX-512 VNNI every convolution that is not grouped
goes to the hand-scheduled `vpdpbusd` matmul of `hostkit.build.vnni` instead: a 1x1 one over its
pixels, any other over its windows gathered into rows (im2col).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tvm

__all__ = ["Int8Lowering", "lower_int8"]

QMAX = 127
NCHW, NHWC = ("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC")  # data, kernel, output layouts


@dataclass
class Int8Lowering:
    int8: int = 0  # convolutions and matmuls now computing in int8
    vnni: int = 0  # of those, convolutions and linear layers on the VNNI matmul kernel
    fp32: list[str] = field(default_factory=list)  # those left in float, as "op(shape)"


def lower_int8(mod: "tvm.IRModule",
               target: "tvm.target.Target | None" = None) -> tuple["tvm.IRModule", Int8Lowering]:
    """`mod` with every quantized convolution and matmul computing on int8; with VNNI kernels for
    the convolutions that are not grouped when `target` has AVX-512 VNNI."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    from hostkit.build import vnni

    report = Int8Lowering()
    rounded = is_op("relax.round")(wildcard())
    # clip(round(x / s)) for edgekit's own symmetric int8; clip(round(x / s) + zp) for a
    # zero point (a PT2E program's uint8 activations), padded with zp where the layer pads.
    # In an NHWC module the clip is min(max(...)) and the first layer's input is transposed.
    quantized = rounded | is_op("relax.add")(rounded, is_const())
    low, high = is_const(), is_const()
    clipped = is_op("relax.clip")(quantized, wildcard(), wildcard())
    data = clipped | is_op("relax.minimum")(is_op("relax.maximum")(quantized, low), high)
    unpadded = data | is_op("relax.permute_dims")(data)
    padded = is_op("relax.nn.pad")(unpadded)
    padded_first = is_op("relax.permute_dims")(padded)
    weight = is_const()
    conv = is_op("relax.nn.conv2d")(padded_first | padded | unpadded, weight)
    # a linear layer's weights transposed, or (NHWC modules fold constants) already folded
    transposed = is_op("relax.permute_dims")(weight)
    matmul = is_op("relax.matmul")(data, transposed | weight)

    def weights(matches: Any) -> np.ndarray:
        """The layer's weights as its operation reads them (a matmul's as (in, out))."""
        w = matches[weight].value.numpy()
        return w.T if transposed in matches else w

    def integral(matches: Any) -> np.ndarray | None:
        w = weights(matches)
        ok = w.size and np.all(w >= -QMAX - 1) and np.all(w <= QMAX) and np.all(w == np.round(w))
        return w.astype("int8") if ok else None

    def input_dtype(matches: Any) -> str | None:
        """The integer type the layer's input clip bounds fit (uint8 or int8), or None."""
        if clipped in matches:
            bottom, top = (float(arg.value) for arg in matches[clipped].args[1:3])
        else:
            bottom, top = (float(matches[c].value.numpy()) for c in (low, high))
        if bottom >= 0 and top <= 255:
            return "uint8"
        return "int8" if bottom >= -128 and top <= 127 else None

    def operand(matches: Any) -> Any:
        """What the layer reads: its quantized input, transposed or padded where it is."""
        return next(matches[p] for p in (padded_first, padded, unpadded, data) if p in matches)

    def integer_input(matches: Any) -> Any:
        """The layer's input cast to the integer type its clip bounds fit."""
        dtype = input_dtype(matches)
        if dtype is None:
            return None
        source = operand(matches)
        return relax.op.astype(source, dtype)

    use_vnni = vnni.has_vnni(target)
    if use_vnni and target is not None:
        # NHWC before lowering: the VNNI matmul reads and writes NHWC, so the layers between
        # two convolutions need no transposes (ResNet-18 int8: 47 -> 40 ms)
        from hostkit.build.cpu_schedule import nhwc_convolutions

        mod = nhwc_convolutions(mod, target)
    builder = relax.BlockBuilder(mod)  # gives the kernels typed global vars to call
    kernels: dict[tuple[Any, ...], Any] = {}

    def vnni_conv(expr: Any, matches: Any, w: np.ndarray) -> Any:
        """A convolution as windows . w on the VNNI kernel, or None: a 1x1 one reads its pixels
        as they are, any other gathers each output pixel's window first (im2col, in the order
        the weights are flattened). Channels are padded to a multiple of 4 (the instruction
        sums 4 bytes), with weights of 0."""
        attrs = expr.attrs
        source = operand(matches)
        shape = source.ty.shape
        layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
        if (int(attrs.groups) != 1 or layouts not in (NCHW, NHWC)
                or not all(hasattr(d, "value") for d in shape)):
            return None
        nhwc = layouts == NHWC
        if nhwc:
            n, h, wd, c = (int(d.value) for d in shape)
            w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        else:
            n, c, h, wd = (int(d.value) for d in shape)
        out, _, kh, kw = w.shape
        (sh, sw), (dh, dw) = ([int(v) for v in attrs.strides], [int(v) for v in attrs.dilation])
        top, left, bottom, right = (int(v) for v in attrs.padding)
        oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
        wide = -(-c // vnni.DEPTH) * vnni.DEPTH
        w = np.pad(w, [(0, 0), (0, wide - c), (0, 0), (0, 0)])
        flat = w.transpose(0, 2, 3, 1).reshape(out, kh * kw * wide)  # (kh, kw, c), as gathered
        shifted = input_dtype(matches) == "int8"  # vpdpbusd wants unsigned data: x + 128
        x = source
        if shifted:
            x = relax.op.add(x, relax.const(128.0, "float32"))
        if not nhwc:
            x = relax.op.permute_dims(x, [0, 2, 3, 1])
        if top or left or bottom or right or wide != c:  # the convolution's own padding, of
            # integer 0, and the channels' (their weights are 0)
            x = relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, wide - c],
                                pad_value=128.0 if shifted else 0.0)
        x = relax.op.astype(x, "uint8")
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            windows = relax.op.reshape(x, (n, oh, ow, 1, wide))
        else:
            padded = (n, h + top + bottom, wd + left + right, wide)
            key = ("im2col", padded, kh, kw, sh, sw, dh, dw)
            if key not in kernels:
                kernels[key] = builder.add_func(vnni.im2col_kernel(
                    padded, (kh, kw), (sh, sw), (dh, dw), (oh, ow)), f"im2col_{kh}x{kw}_{wide}")
            windows = relax.call_tir(kernels[key], [x],
                                     relax.TensorType((n, oh, ow, kh, kw * wide), "uint8"))
        y = vnni_matmul(windows, (n, oh, ow), flat, shifted, taps=1 if kh * kw == 1 else kh)
        return y if nhwc else relax.op.permute_dims(y, [0, 3, 1, 2])

    def vnni_matmul(windows: Any, pixels: tuple[int, ...], w: np.ndarray, shifted: bool,
                    taps: int = 1) -> Any:
        """windows (uint8, [*pixels, taps, depth]) . w.T (w: int8, [out, taps * depth]) in
        int32 on the VNNI kernel, shaped (*pixels, out); `shifted` windows hold int8 values
        + 128, and 128 * sum(w) comes off their result."""
        out, depth = w.shape[0], w.shape[1] // taps
        packed, cols = vnni.pack_weights(w)
        key = ("vnni", pixels, taps, depth, cols)
        if key not in kernels:
            kernels[key] = builder.add_func(vnni.matmul_kernel(pixels, taps, depth, cols),
                                            f"vnni_matmul_{'x'.join(map(str, pixels))}_"
                                            f"{cols}x{taps * depth}")
        y = relax.call_tir(kernels[key], [windows, relax.const(packed)],
                           relax.TensorType((*pixels, cols), "int32"))
        if shifted:
            correction = np.zeros(cols, dtype="int32")
            correction[:out] = 128 * w.astype("int32").sum(axis=1)
            y = relax.op.subtract(y, relax.const(correction))
        if cols == out:
            return y
        return relax.op.strided_slice(y, axes=[len(pixels)], begin=[0], end=[out])

    def unsigned(x: Any, shifted: bool) -> Any:
        """The layer's integer-valued float input as uint8 (shifted by 128 when int8)."""
        if shifted:
            x = relax.op.add(x, relax.const(128.0, "float32"))
        return relax.op.astype(x, "uint8")

    def lower_conv(expr: Any, matches: Any) -> Any:
        w, x = integral(matches), integer_input(matches)
        if w is None or x is None:
            return expr
        report.int8 += 1
        if use_vnni:
            out = vnni_conv(expr, matches, w)
            if out is not None:
                report.vnni += 1
                return relax.op.astype(out, "float32")
        attrs = expr.attrs
        out = relax.op.nn.conv2d(x, relax.const(w),
                                 strides=attrs.strides, padding=attrs.padding,
                                 dilation=attrs.dilation, groups=attrs.groups,
                                 data_layout=attrs.data_layout, kernel_layout=attrs.kernel_layout,
                                 out_layout=attrs.out_layout, out_dtype="int32")
        return relax.op.astype(out, "float32")

    def lower_matmul(expr: Any, matches: Any) -> Any:
        w, x = integral(matches), integer_input(matches)
        if w is None or x is None:
            return expr
        report.int8 += 1
        shape = matches[data].ty.shape
        if use_vnni and len(shape) == 2 and all(hasattr(d, "value") for d in shape):
            report.vnni += 1
            shifted = input_dtype(matches) == "int8"
            m, c = (int(d.value) for d in shape)
            wide = -(-c // vnni.DEPTH) * vnni.DEPTH
            rows = unsigned(matches[data], shifted)
            if wide != c:  # the instruction sums 4 bytes: weights of 0 for the padding
                rows = relax.op.nn.pad(rows, [0, 0, 0, wide - c], pad_value=0.0)
            out = vnni_matmul(relax.op.reshape(rows, (m, 1, wide)), (m,),
                              np.pad(np.ascontiguousarray(w.T), [(0, 0), (0, wide - c)]),
                              shifted)
        else:
            out = relax.op.matmul(x, relax.const(np.ascontiguousarray(w)), out_dtype="int32")
        return relax.op.astype(out, "float32")

    main = rewrite_call(conv, lower_conv, mod["main"])
    main = rewrite_call(matmul, lower_matmul, main)
    mod = builder.get()
    mod["main"] = main
    report.fp32 = _float_layers(mod)
    return mod, report


def _float_layers(mod: "tvm.IRModule") -> list[str]:
    """Convolutions and matmuls of `main` that still compute in float."""
    from tvm import relax

    left: list[str] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in (
                "relax.nn.conv2d", "relax.matmul"):
            dtype = expr.args[0].ty.dtype
            if dtype not in ("int8", "uint8"):
                shape = [int(d) for d in expr.args[1].ty.shape]
                left.append(f"{expr.op.name.removeprefix('relax.')}({'x'.join(map(str, shape))})")

    relax.analysis.post_order_visit(mod["main"], visit)
    return left
