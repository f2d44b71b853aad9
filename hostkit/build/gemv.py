"""Matrix-vector products (a classifier on one image): every output a dot product along a row.

A linear layer on one row of input reads its whole weight matrix for two flops per weight
(MobileNetV2's 1280 x 1000 floats: 5 MB, never in a core's cache by the time the layer runs),
so it runs at the speed the weights stream in. Relax folds those weights transposed ([in,
out]), and the default schedule gave each core columns of eight outputs to walk down all 1280
rows: 32 bytes from each 4 KB row, every cache line fetched twice and a page per row. Here the
weights are kept [out, in] and each output's row is read front to back in vectors, a few
outputs at a time, each vector of partial sums held in a register and summed across its lanes
at the end. Measured on the 2-core build machine, caches flushed by a 40 MB pass before each
call: 0.135 -> 0.115 ms in isolation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.build.direct import i64

if TYPE_CHECKING:
    import tvm

__all__ = ["BLOCK", "gemv_kernel", "gemv_schedule", "matrix_vector_products"]

BLOCK = "edgekit_gemv"
OUTPUTS = (4, 5, 2, 1)  # outputs per block of registers, the first that divides the layer's


def gemv_kernel(terms: int, outputs: int, lanes: int) -> Any:
    """out[0, o] = sum over t of x[0, t] . w[o, t], for float32 x [1, terms] and w [outputs,
    terms], as `lanes` partial sums per output (t = step * lanes + lane) added up at the end.
    Marked fusable (`op_pattern` 4) so the bias joins its kernel."""
    from tvm import te

    x = te.placeholder(i64(1, terms), "float32", name="x")
    w = te.placeholder(i64(outputs, terms), "float32", name="w")
    step = te.reduce_axis(i64(0, terms // lanes), name="step")
    partial = te.compute(
        i64(outputs, lanes),
        lambda o, lane: te.sum(x[0, step * lanes + lane] * w[o, step * lanes + lane], axis=step),
        name=BLOCK)
    lane = te.reduce_axis(i64(0, lanes), name="lane")
    out = te.compute(i64(1, outputs), lambda _, o: te.sum(partial[o, lane], axis=lane),
                     name="lanes_sum")
    return te.create_prim_func([x, w, out]).with_attr("op_pattern", 4).without_attr(
        "global_symbol")


def gemv_schedule(func: Any, target: "tvm.target.Target") -> Any:
    """The schedule of a kernel holding `gemv_kernel`'s block, or None: blocks of outputs
    across the cores, each block's partial sums in registers over the whole row, then summed
    and the epilogue applied to the block before the next."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock(BLOCK)
    except Exception:  # not a matrix-vector product
        return None
    outputs, lane, step = sch.get_loops(block)
    count = int(sch.get(outputs).extent)
    group = next(g for g in OUTPUTS if count % g == 0)
    blocks, inner = sch.split(outputs, [None, group])
    sch.reorder(blocks, step, inner, lane)
    sch.parallel(blocks)
    sch.unroll(inner)
    sch.vectorize(lane)
    accumulator = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(accumulator, blocks)
    sch.vectorize(sch.get_loops(accumulator)[-1])
    later = sch.get_child_blocks(sch.get_sblock("root"))
    position = next(i for i, b in enumerate(later) if sch.get(b).same_as(sch.get(accumulator)))
    for consumer in later[position + 1:]:  # the sum across lanes, then the epilogue
        sch.reverse_compute_at(consumer, blocks)
    init = sch.decompose_reduction(block, step)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


def matrix_vector_products(mod: "tvm.IRModule", target: "tvm.target.Target") -> "tvm.IRModule":
    """`mod` with every float32 `matmul(x, w)` of one row `x` [1, in] by constant weights `w`
    [in, out] on `gemv_kernel`, where a vector divides `in`; the others as they were. For LLVM
    CPU targets; any other target's module comes back as it is."""
    from tvm import relax
    from tvm.ir import GenericConst

    from hostkit.build.rewrite import rewrite_calls
    from hostkit.build.targets import vector_bits

    if str(target.kind.name) != "llvm" or not any(gv.name_hint == "main" for gv in mod.functions):
        return mod
    lanes = max(vector_bits(target) // 32, 4)
    kernels: dict[tuple[int, int], Any] = {}

    def rewrite(call: Any, builder: Any) -> Any:
        x, weight = call.args
        shape = getattr(x.ty, "shape", None)
        if (not isinstance(weight, GenericConst) or not hasattr(weight.value, "numpy")
                or not isinstance(shape, relax.ShapeExpr) or len(shape.values) != 2
                or not all(hasattr(d, "value") for d in shape.values)
                or int(shape.values[0].value) != 1 or str(x.ty.dtype) != "float32"
                or str(getattr(call.attrs, "out_dtype", None) or "float32") != "float32"):
            return call
        w = weight.value.numpy()
        if w.dtype != np.float32 or w.ndim != 2 or w.shape[0] % lanes:
            return call
        terms, outputs = (int(d) for d in w.shape)
        if (terms, outputs) not in kernels:
            kernels[terms, outputs] = builder.add_func(gemv_kernel(terms, outputs, lanes),
                                                      f"gemv_{terms}x{outputs}")
        return relax.call_tir(kernels[terms, outputs],
                              [x, relax.const(np.ascontiguousarray(w.T))],
                              relax.TensorType((1, outputs), "float32"))

    return rewrite_calls(mod, "relax.matmul", rewrite)
