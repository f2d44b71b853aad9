"""Relax rewrites of one operator at a time, every other binding kept as it was: ReLU6's clips
as min/max (which TVM's layout conversion knows), divides by constants as multiplies.

TVM's `rewrite_call` also rebuilds the bindings around what it rewrites, and it drops a
`match_cast` whose value's static type already fits the cast: a detector binds its count of kept
boxes that way after NMS, whose padded output TVM types as if every box were kept (SSDlite:
27000 rows, of which NMS keeps a few hundred). Without the cast, the post-processing was built
for 27000 rows and its build failed. `rewrite_calls` is a mutator that changes only the calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import tvm

__all__ = ["clips_as_min_max", "divides_as_multiplies", "rewrite_calls"]


def rewrite_calls(mod: "tvm.IRModule", op_name: str,
                  rewrite: Callable[[Any, Any], Any]) -> "tvm.IRModule":
    """`mod` with every call of `op_name` in `main` replaced by `rewrite(call, builder)`, which
    returns the call itself to keep it, and may add functions to the module with `builder`
    (a Relax BlockBuilder). The caller's module is left as it was."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = tvm.ir.Op.get(op_name)

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if isinstance(call, relax.Call) and call.op == op:  # typed, as its arguments may be new
                return rewrite(self.builder_.normalize(call), self.builder_)
            return call

    rewriter = Rewriter(mod.clone())  # its builder adds to, and returns, the module it is given
    main = rewriter.visit_expr(mod["main"])
    rewritten: tvm.IRModule = rewriter.builder_.get()
    rewritten["main"] = main
    return rewritten


def divides_as_multiplies(mod: "tvm.IRModule") -> "tvm.IRModule":
    """Every float32 `x / c` in `main` by a constant `c` as `x * (1 / c)`, within a rounding.

    Inference's batch norm is `(x - mean) / sqrt(var + eps) * gamma + beta`: in each convolution's
    epilogue the divide was a `vdivps` per output vector, many times a multiply's cost, which
    weighs most after convolutions with little work per output (a MobileNet's depthwise ones and
    its 1x1s over 16-24 channels; MobileNetV2 a few percent faster). Not for int8 models, whose
    quantize must round as PyTorch's divide does."""
    import numpy as np
    from tvm import relax
    from tvm.ir import GenericConst

    def rewrite(call: Any, _builder: Any) -> Any:
        x, divisor = call.args
        if (not isinstance(divisor, GenericConst) or not hasattr(divisor.value, "numpy")
                or str(x.ty.dtype) != "float32" or str(divisor.ty.dtype) != "float32"):
            return call
        divisors = divisor.value.numpy()
        if not np.all(np.isfinite(divisors)) or np.any(divisors == 0):
            return call
        return relax.op.multiply(x, relax.const((1.0 / divisors.astype(np.float64))
                                                .astype(np.float32)))

    return rewrite_calls(mod, "relax.divide", rewrite)


def clips_as_min_max(mod: "tvm.IRModule") -> "tvm.IRModule":
    """Every `clip(x, lo, hi)` of `main` on a feature map as `minimum(maximum(x, lo), hi)`, the
    same values.

    TVM's layout conversion knows no layout for `clip` and leaves it NCHW, with a transpose on
    each side: every ReLU6 of a MobileNet, and every int8 model's quantize, cost two. It knows
    the elementwise maximum and minimum."""
    from tvm import relax

    def rewrite(call: Any, builder: Any) -> Any:
        x, *bounds = call.args
        values = [getattr(b, "value", None) for b in bounds]  # FloatImm, or a PrimValue's
        values = [getattr(v, "value", v) for v in values]
        shape = getattr(x.ty, "shape", None)
        if (not all(isinstance(v, (int, float)) for v in values)
                or not isinstance(shape, relax.ShapeExpr) or len(shape.values) != 4):
            # feature maps only: a detector's box clamps stay clips (TVM's layout conversion
            # crashed on FCOS's with them rewritten; an unknown shape cannot legalize)
            return call
        dtype = str(x.ty.dtype)
        low = builder.emit(relax.op.maximum(x, relax.const(values[0], dtype)))
        return relax.op.minimum(low, relax.const(values[1], dtype))

    return rewrite_calls(mod, "relax.clip", rewrite)
