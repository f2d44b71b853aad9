"""int8 kernels: lower the quantized layers' float graph to int8 x int8 -> int32 arithmetic.

A model quantized by `hostkit.models.quantize` imports into Relax as float operations on integer
values: `clip(round(x / s), -127, 127)` feeding a convolution (or a matmul) whose constant weights
are integers in [-127, 127], then a multiply and an add. Here each such convolution and matmul
takes its input and weights as int8 and accumulates in int32, with one cast back to float before
the requantization multiply; fusion then puts the next layer's quantize into the same kernel. The
arithmetic is exact on both sides (integer products, int32 sums), so the device computes what
PyTorch's quantized model computed. Layers that do not have the pattern stay in fp32 and are
counted, never silently. On a target with AVX-512 VNNI the 1x1 convolutions go to the
hand-scheduled `vpdpbusd` kernels of `hostkit.build.vnni` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tvm

__all__ = ["Int8Lowering", "lower_int8", "int8_kernels"]

QMAX = 127


@dataclass
class Int8Lowering:
    int8: int = 0  # convolutions and matmuls now computing in int8
    vnni: int = 0  # of those, 1x1 convolutions on the VNNI matmul kernel
    fp32: list[str] = field(default_factory=list)  # those left in float, as "op(shape)"


def lower_int8(mod: "tvm.IRModule",
               target: "tvm.target.Target | None" = None) -> tuple["tvm.IRModule", Int8Lowering]:
    """`mod` with every quantized convolution and matmul computing on int8; with VNNI kernels for
    the 1x1 convolutions when `target` has AVX-512 VNNI."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    from hostkit.build import vnni

    report = Int8Lowering()
    rounded = is_op("relax.round")(wildcard())
    # clip(round(x / s)) for edgekit's own symmetric int8; clip(round(x / s) + zp) for a
    # zero point (a PT2E program's uint8 activations), padded with zp where the layer pads.
    data = is_op("relax.clip")(rounded | is_op("relax.add")(rounded, is_const()), wildcard(),
                               wildcard())
    padded = is_op("relax.nn.pad")(data)
    weight = is_const()
    conv = is_op("relax.nn.conv2d")(padded | data, weight)
    matmul = is_op("relax.matmul")(data, is_op("relax.permute_dims")(weight))

    def integral(matches: Any) -> np.ndarray | None:
        w = matches[weight].value.numpy()
        ok = w.size and np.all(w >= -QMAX - 1) and np.all(w <= QMAX) and np.all(w == np.round(w))
        return w.astype("int8") if ok else None

    def input_dtype(matches: Any) -> str | None:
        """The integer type the layer's input clip bounds fit (uint8 or int8), or None."""
        low, high = (float(arg.value) for arg in matches[data].args[1:3])
        if low >= 0 and high <= 255:
            return "uint8"
        return "int8" if low >= -128 and high <= 127 else None

    def integer_input(matches: Any) -> Any:
        """The layer's input cast to the integer type its clip bounds fit."""
        dtype = input_dtype(matches)
        if dtype is None:
            return None
        source = matches[padded] if padded in matches else matches[data]
        return relax.op.astype(source, dtype)

    use_vnni = vnni.has_vnni(target)
    builder = relax.BlockBuilder(mod)  # gives the kernels typed global vars to call
    kernels: dict[tuple[int, int, int], Any] = {}

    def vnni_conv(expr: Any, matches: Any, w: np.ndarray) -> Any:
        """A 1x1 convolution as pixels x channels . w on the VNNI kernel, or None."""
        attrs = expr.attrs
        shape = matches[data].ty.shape
        if (padded in matches or w.shape[2:] != (1, 1) or w.shape[1] % vnni.DEPTH
                or int(attrs.groups) != 1 or attrs.data_layout != "NCHW"
                or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW"
                or any(int(v) != 1 for v in (*attrs.strides, *attrs.dilation))
                or any(int(v) != 0 for v in attrs.padding)
                or not all(hasattr(d, "value") for d in shape)):
            return None
        n, c, h, wd = (int(d.value) for d in shape)
        out, rows = w.shape[0], n * h * wd
        packed, cols = vnni.pack_weights(w[:, :, 0, 0])
        x = matches[data]
        if input_dtype(matches) == "int8":  # vpdpbusd wants unsigned data: x + 128 ...
            x = relax.op.add(x, relax.const(128.0, "float32"))
        pixels = relax.op.reshape(relax.op.permute_dims(relax.op.astype(x, "uint8"),
                                                        [0, 2, 3, 1]), (rows, c))
        key = (rows, cols, c)
        if key not in kernels:
            kernels[key] = builder.add_func(vnni.matmul_kernel(rows, cols, c),
                                            f"vnni_matmul_{rows}x{cols}x{c}")
        y = relax.call_tir(kernels[key], [pixels, relax.const(packed)],
                           relax.TensorType((rows, cols), "int32"))
        if input_dtype(matches) == "int8":  # ... and 128 * sum(w) comes off the result
            shift = np.zeros(cols, dtype="int32")
            shift[:out] = 128 * w[:, :, 0, 0].astype("int32").sum(axis=1)
            y = relax.op.subtract(y, relax.const(shift))
        if cols != out:
            y = relax.op.strided_slice(y, axes=[1], begin=[0], end=[out])
        return relax.op.permute_dims(relax.op.reshape(y, (n, h, wd, out)), [0, 3, 1, 2])

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
        out = relax.op.matmul(x, relax.const(w.T.copy()),
                              out_dtype="int32")
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


def int8_kernels(mod: "tvm.IRModule") -> dict[str, list[str]]:
    """For each TIR kernel that holds a convolution or matmul, the dtypes of its buffers' loads
    in the reduction (what a test checks: int8 inputs, int32 accumulation)."""
    from tvm import tirx

    found: dict[str, list[str]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        if "conv" not in name and "matmul" not in name:
            continue
        dtypes = sorted({str(buf.dtype) for buf in func.buffer_map.values()})
        found[name] = dtypes
    return found
