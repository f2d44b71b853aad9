"""int8 kernels: lower the quantized layers' float graph to int8 x int8 -> int32 arithmetic.

A model quantized by `hostkit.models.quantize` imports into Relax as float operations on integer
values: `clip(round(x / s), -127, 127)` feeding a convolution (or a matmul) whose constant weights
are integers in [-127, 127], then a multiply and an add. Here each such convolution and matmul
takes its input and weights as int8 and accumulates in int32, with one cast back to float before
the requantization multiply; fusion then puts the next layer's quantize into the same kernel. The
arithmetic is exact on both sides (integer products, int32 sums), so the device computes what
PyTorch's quantized model computed. Layers that do not have the pattern stay in fp32 and are
counted, never silently.
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
    fp32: list[str] = field(default_factory=list)  # those left in float, as "op(shape)"


def lower_int8(mod: "tvm.IRModule") -> tuple["tvm.IRModule", Int8Lowering]:
    """`mod` with every quantized convolution and matmul computing on int8."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

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

    def integer_input(matches: Any) -> Any:
        """The layer's input cast to the integer type its clip bounds fit (uint8 or int8)."""
        clip = matches[data]
        low, high = (float(arg.value) for arg in clip.args[1:3])
        dtype = "uint8" if low >= 0 and high <= 255 else "int8"
        if dtype == "int8" and (low < -128 or high > 127):
            return None
        source = matches[padded] if padded in matches else clip
        return relax.op.astype(source, dtype)

    def lower_conv(expr: Any, matches: Any) -> Any:
        w, x = integral(matches), integer_input(matches)
        if w is None or x is None:
            return expr
        report.int8 += 1
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
