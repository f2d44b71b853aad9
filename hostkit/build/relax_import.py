"""The one import seam: an ExportedProgram into Relax, with what TVM 0.27's PyTorch importer lacks
for data-dependent shapes (detectors' post-processing).

Every model goes through `to_relax`; the rest of edgekit never sees how. On top of TVM's
`ExportedProgramImporter` it adds, through the importer's own `custom_convert_map`:

- `torchvision::nms` as `relax.op.vision.all_class_non_max_suppression` on one class, whose
  output is trimmed to the boxes kept, so the count of detections comes out of the VM as it is;
- edgekit's `edgekit::nms_by_class` (`hostkit.models.detection`: NMS within each class of C x N
  candidates) as the same TVM op with one class per batch row;
- `aten.index.Tensor` with a boolean mask (`boxes[scores > t]`) as `nonzero` + `take`, where TVM's
  own converter would `take` with a bool tensor;
- `aten.topk` with a data-dependent k (`min(k, n)` after a score filter) as a descending argsort
  and a slice, where TVM's op needs k known at compile time;
- `aten.nonzero` (`torch.where(mask)`), which TVM's importer lacks, as `relax.op.nonzero`
  transposed to torch's layout (one row per element found);
- `torch.sym_min` on sizes, as a TIR `min`.

Linear layers over a data-dependent number of rows (Mask R-CNN's box head) become TOPI's dense
over rows of input and weight (`_addmm`), which an untuned build runs several times faster than
TVM's matmul by a transposed weight.

Sizes torch.export leaves data-dependent (unbacked symbols) become TIR variables bound by
`match_cast` at run time, one per symbol, so every later shape agrees with them. And every
converter's result is cast to the dtype torch.export recorded for that node when TVM's differs
(and given the shape torch.export recorded where TVM's converter lost it, e.g. a gather by
data-dependent indices, so that later ops can be lowered),
and a binary op whose result torch records as float computes in float (TVM keeps
`arange(n) + 0.5` int64 and drops the 0.5, where torch promotes it to float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch
    import tvm

__all__ = ["to_relax", "CONVERTED_OPS"]

# What edgekit converts itself, by the importer's names for the targets.
CONVERTED_OPS = ("nms.default", "nms_by_class.default", "index.Tensor", "topk.default",
                 "sym_min", "nonzero.default")


def to_relax(program: "torch.export.ExportedProgram") -> "tvm.IRModule":
    """`program` as a Relax module with its weights bound as constants."""
    importer = _importer_class()()
    converters: dict[str, Callable[..., Any]] = {
        "nms.default": _nms, "index.Tensor": _index_tensor,
        "topk.default": _topk, "sym_min": _sym_min, "nonzero.default": _nonzero,
        "nms_by_class.default": _nms_by_class}
    shaped = {name: _keeps_shape(convert) for name, convert in converters.items()}
    return importer.from_exported_program(program.run_decompositions(), False, False, False,
                                          shaped)


def _keeps_shape(convert: Callable[..., Any]) -> Callable[..., Any]:
    """An edgekit converter whose result gets torch.export's recorded shape where TVM's
    converter it calls (for indices without a mask, TVM's own) lost it."""
    import torch
    from tvm import relax

    def run(node: Any, imp: Any) -> Any:
        out = convert(node, imp)
        if isinstance(node.meta.get("val"), torch.Tensor) \
                and isinstance(getattr(out, "ty", None), relax.TensorType):
            out = _shaped(imp, out, node)
        return out

    return run


def _importer_class() -> type:
    import torch
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    class Importer(ExportedProgramImporter):
        """TVM's importer, each converter checked against the dtype torch recorded."""

        def __init__(self) -> None:
            self.symbols: dict[str, Any] = {}
            super().__init__()

        def create_convert_map(self) -> dict[str, Callable[..., Any]]:
            return {name: self._dtype_checked(f) for name, f in super().create_convert_map().items()}

        def _binary_op(self, relax_op: Any, intrinsic_op: Any) -> Callable[..., Any]:
            # TVM gives a Python scalar the tensor's dtype, so `arange(n) + 0.5` stays int64
            # and loses the 0.5 (SSD's anchor centres): an int operand of an op whose result
            # torch records as float is cast to that float first, as torch promotes it.
            convert = super()._binary_op(relax_op, intrinsic_op)

            def promoted(node: Any) -> Any:
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
                    return convert(node)
                want = self._convert_data_type(val.dtype)
                saved = {}
                for arg in node.args:
                    held = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
                    ty = getattr(held, "ty", None)
                    if isinstance(ty, relax.TensorType) and not str(ty.dtype).startswith(
                            ("float", "bfloat")):
                        saved[arg] = held
                        self.env[arg] = self.block_builder.emit(relax.op.astype(held, want))
                try:
                    return convert(node)
                finally:
                    self.env.update(saved)

            return promoted

        def _addmm(self, node: Any) -> Any:
            # A linear layer (`bias + x @ w.T`) over a data-dependent number of rows as TOPI's
            # dense over rows of x and w: an
            # untuned build loops naively, and matmul by the transposed weight walks its
            # columns, missing the cache at every step (measured 4x slower; Mask R-CNN's box
            # head multiplies up to 1000 x 12544 by 12544 x 1024).
            import tvm
            from tvm import topi

            bias, x, right = node.args[:3]
            transposed = isinstance(right, torch.fx.Node) \
                and str(right.target) == "aten.permute.default" \
                and tuple(right.args[1]) == (1, 0)  # type: ignore[arg-type]
            if not transposed or node.kwargs.get("alpha", 1) != 1 \
                    or node.kwargs.get("beta", 1) != 1:
                return super()._addmm(node)
            lhs, weight = self.env[x], self.env[right.args[0]]
            rows = self.shape_of(lhs)[0] if self.shape_of(lhs) is not None else None
            # Only rows counted at run time (detections, proposals): a static linear layer
            # stays TVM's matmul, which the int8 lowering (hostkit.build.int8) rewrites.
            if lhs.ty.ndim != 2 or str(lhs.ty.dtype) != "float32" \
                    or str(weight.ty.dtype) != "float32" or isinstance(rows, tvm.tirx.IntImm):
                return super()._addmm(node)
            dense = self.block_builder.emit_te(topi.nn.dense, lhs, weight)
            return self.block_builder.emit(relax.op.add(self.env[bias], dense))

        def _div(self, node: Any) -> Any:
            # TVM makes an int divisor an int32 constant, which an int64 tensor refuses
            # (`kept // 91`); torch takes the scalar in the tensor's dtype.
            args = self.retrieve_args(node)
            x, divisor = args[0], args[1]
            mode = args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
            if mode == "floor" and isinstance(divisor, int) \
                    and isinstance(getattr(x, "ty", None), relax.TensorType) \
                    and str(x.ty.dtype).startswith("int"):
                return self.block_builder.emit(
                    relax.op.floor_divide(x, relax.const(divisor, str(x.ty.dtype))))
            return super()._div(node)

        def _dtype_checked(self, convert: Callable[..., Any]) -> Callable[..., Any]:
            def run(node: Any) -> Any:
                out = convert(node)
                val = node.meta.get("val")
                if isinstance(out, relax.Expr) and isinstance(val, torch.Tensor) \
                        and isinstance(getattr(out, "ty", None), relax.TensorType):
                    want = self._convert_data_type(val.dtype)
                    if str(out.ty.dtype) != want:
                        out = self.block_builder.emit(relax.op.astype(out, want))
                    out = _shaped(self, out, node)
                return out

            return run

    return Importer


def _size(imp: Any, size: Any) -> Any:
    """A size of torch.export's as a TIR expression: an int as it is; a data-dependent one in
    terms of one TIR variable per unbacked symbol (bound by the first `match_cast` that meets
    it), so `min(1000, u0)` reached by two paths is the same expression and shapes agree."""
    if isinstance(size, int):
        return size
    return _tir(imp, size.node.expr)


def _tir(imp: Any, expr: Any) -> Any:
    import functools
    import operator

    import tvm

    if expr.is_Integer:
        return int(expr)
    combine = {"Add": operator.add, "Mul": operator.mul, "Min": tvm.tirx.min,
               "Max": tvm.tirx.max}.get(type(expr).__name__)
    if expr.is_Symbol or combine is None:
        key = str(expr)
        return imp.symbols.setdefault(key, tvm.tirx.Var(key, "int64"))
    return functools.reduce(combine, [_tir(imp, arg) for arg in expr.args])


def _nms(node: Any, imp: Any) -> Any:
    """torchvision's NMS: indices of the kept boxes, by decreasing score.

    TVM's NMS suppresses at IoU >= t where torchvision suppresses at IoU > t, so the threshold is
    moved up by one float32 step; and it treats scores <= 0 as already suppressed, so it gets the
    boxes sorted by score with scores n, n-1, ..., 1 (their ranks), and the kept positions are
    mapped back through the sort.
    """
    from tvm import relax

    boxes, scores, iou = imp.retrieve_args(node)
    bb = imp.block_builder
    boxes, scores = _shaped(imp, boxes, node.args[0]), _shaped(imp, scores, node.args[1])
    count = node.args[0].meta["val"].shape[0]
    n = imp.shape_of(boxes)[0]
    order = bb.emit(relax.op.argsort(scores, axis=0, descending=True, dtype="int64"))
    # n - [0, 1, ..., n-1]: Relax's arange sizes a negative step wrongly (n, 0, -1 gives n + 2
    # elements: its ceil-division assumes a positive step), which a static n refuses to reshape.
    total = bb.emit(relax.op.astype(bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([n]))),
                                    "float32"))
    ranked = bb.emit(relax.op.subtract(total, bb.emit(relax.op.arange(
        relax.prim_value(0), relax.prim_value(n), relax.prim_value(1), "float32"))))
    threshold = float(np.nextafter(np.float32(iou), np.float32(2)))
    found = bb.emit(relax.op.vision.all_class_non_max_suppression(
        bb.emit(relax.op.expand_dims(bb.emit(relax.op.take(boxes, order, axis=0)), 0)),
        bb.emit(relax.op.reshape(ranked, [1, 1, n])),
        relax.const(_upper_bound(count), "int64"), relax.const(threshold, "float32"),
        relax.const(0.0, "float32"), "onnx"))
    kept = _size(imp, node.meta["val"].shape[0])
    rows = bb.match_cast(bb.emit(relax.TupleGetItem(found, 0)),
                         relax.TensorType([kept, 3], "int64"))
    positions = bb.emit(relax.op.reshape(
        bb.emit(relax.op.strided_slice(rows, axes=[1], begin=[2], end=[3])), [kept]))
    return bb.emit(relax.op.take(order, positions, axis=0))


def _nms_by_class(node: Any, imp: Any) -> Any:
    """edgekit::nms_by_class: (class, index) rows of the kept candidates by decreasing score.

    Scores become ranks (the best valid candidate C*N, invalid ones 0), so TVM's NMS, which
    keeps scores above 0, sees exactly the valid ones in the same order; its rows come class by
    class and are put back in rank order at the end.
    """
    from tvm import relax

    boxes, scores, valid, iou = imp.retrieve_args(node)
    bb = imp.block_builder
    classes, n = imp.shape_of(scores)
    flat = bb.emit(relax.op.reshape(scores, [classes * n]))
    flat_valid = bb.emit(relax.op.reshape(valid, [classes * n]))
    lowest = relax.const(float("-inf"), "float32")
    order = bb.emit(relax.op.argsort(bb.emit(relax.op.where(flat_valid, flat, lowest)),
                                     axis=0, descending=True, dtype="int64"))
    position = bb.emit(relax.op.argsort(order, axis=0, dtype="int64"))
    total = bb.emit(relax.op.astype(bb.emit(relax.op.shape_to_tensor(
        relax.ShapeExpr([classes * n]))), "float32"))
    rank = bb.emit(relax.op.subtract(total, bb.emit(relax.op.astype(position, "float32"))))
    rank = bb.emit(relax.op.where(flat_valid, rank, relax.const(0.0, "float32")))
    threshold = float(np.nextafter(np.float32(iou), np.float32(2)))
    found = bb.emit(relax.op.vision.all_class_non_max_suppression(
        boxes, bb.emit(relax.op.reshape(rank, [classes, 1, n])),
        relax.const(_upper_bound(node.args[1].meta["val"].shape[1]), "int64"),
        relax.const(threshold, "float32"), relax.const(0.0, "float32"), "onnx"))
    kept = _size(imp, node.meta["val"].shape[0])
    rows = bb.match_cast(bb.emit(relax.TupleGetItem(found, 0)),
                         relax.TensorType([kept, 3], "int64"))
    label = bb.emit(relax.op.strided_slice(rows, axes=[1], begin=[0], end=[1]))
    index = bb.emit(relax.op.strided_slice(rows, axes=[1], begin=[2], end=[3]))
    flat_index = bb.emit(relax.op.reshape(bb.emit(relax.op.add(
        bb.emit(relax.op.multiply(label, _int64(bb, n))), index)),
        [kept]))
    by_rank = bb.emit(relax.op.argsort(bb.emit(relax.op.take(rank, flat_index, axis=0)),
                                       axis=0, descending=True, dtype="int64"))
    pairs = bb.emit(relax.op.concat([label, index], axis=1))
    return bb.emit(relax.op.take(pairs, by_rank, axis=0))


def _int64(bb: Any, size: Any) -> Any:
    """A size (int or TIR expression) as a 0-d int64 tensor."""
    from tvm import relax

    return bb.emit(relax.op.reshape(bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([size]))),
                                    []))


def _shaped(imp: Any, value: Any, source: Any) -> Any:
    """`value` with a known shape: where TVM's converters lost it (a gather by data-dependent
    indices), the shape torch.export recorded, bound at run time."""
    from tvm import relax

    val = source.meta.get("val")
    if imp.shape_of(value) is not None or val is None or len(val.shape) != value.ty.ndim:
        return value
    dims = [_size(imp, d) for d in val.shape]
    return imp.block_builder.match_cast(value, relax.TensorType(dims, str(value.ty.dtype)))


def _upper_bound(size: Any) -> int:
    """The most boxes NMS can see: TVM sizes its output by it before trimming."""
    if isinstance(size, int):
        return size
    upper = size.node.shape_env.bound_sympy(size.node.expr).upper
    if not upper.is_finite:
        raise ValueError(f"NMS over a number of boxes with no upper bound ({size.node.expr})")
    return int(upper)


def _index_tensor(node: Any, imp: Any) -> Any:
    from tvm import relax

    data, indices = imp.retrieve_args(node)
    masks = [i for i in indices if i is not None and str(i.ty.dtype) == "bool"]
    if not masks:
        return imp._index_tensor(node)
    if len(indices) != 1 or indices[0].ty.ndim != 1:
        raise ValueError("indexing with a boolean mask is supported on the first axis only "
                         f"({node.format_node()[:120]})")
    bb = imp.block_builder
    kept = _size(imp, node.meta["val"].shape[0])
    where = bb.match_cast(bb.emit(relax.op.nonzero(indices[0])),
                          relax.TensorType([1, kept], "int64"))
    return bb.emit(relax.op.take(data, bb.emit(relax.op.reshape(where, [kept])), axis=0))


def _topk(node: Any, imp: Any) -> Any:
    from tvm import relax

    args = imp.retrieve_args(node)
    x, k = args[0], args[1]
    if isinstance(k, int):
        return imp._topk(node)
    dim = args[2] if len(args) > 2 else -1
    largest = args[3] if len(args) > 3 else True
    if x.ty.ndim != 1 or dim not in (0, -1) or not largest:
        raise ValueError(f"topk with a data-dependent k on a {x.ty.ndim}-d tensor "
                         f"(dim {dim}, largest {largest}) is not supported")
    bb = imp.block_builder
    order = bb.emit(relax.op.argsort(x, axis=0, descending=True, dtype="int64"))
    first = bb.emit(relax.op.strided_slice(order, axes=[0], begin=[0], end=[k]))
    first = bb.match_cast(first, relax.TensorType([_size(imp, node.meta["val"][0].shape[0])],
                                                  "int64"))
    return bb.emit(relax.Tuple([bb.emit(relax.op.take(x, first, axis=0)), first]))


def _nonzero(node: Any, imp: Any) -> Any:
    from tvm import relax

    (x,) = imp.retrieve_args(node)[:1]
    bb = imp.block_builder
    found, rank = node.meta["val"].shape
    where = bb.match_cast(bb.emit(relax.op.nonzero(x)),
                          relax.TensorType([rank, _size(imp, found)], "int64"))
    return bb.emit(relax.op.permute_dims(where, [1, 0]))


def _sym_min(node: Any, imp: Any) -> Any:
    import tvm

    a, b = imp.retrieve_args(node)
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else tvm.tirx.min(a, b)
