"""The default schedule of untuned CPU builds: parallel, vectorized, and computing the same."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


def _loop_kinds(func: Any) -> set[Any]:
    import tvm_ffi
    from tvm import tirx

    kinds: set[Any] = set()

    def visit(node: Any) -> None:
        kinds.add(tirx.ForKind(int(node.kind)))

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)], order="post")
    return kinds


def _run(func: Any, target: Any, args: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    import tvm

    lib = tvm.compile(func, target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype="float32"))
    lib(*tensors, out)
    return out.numpy()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_convolution_gets_threads_vectors_and_the_same_result(layout: str) -> None:
    import tvm
    from tvm import te, tirx, topi

    from hostkit.build.cpu_schedule import default_schedule

    target = tvm.target.Target({"kind": "llvm"})
    if layout == "NCHW":
        data, weight = te.placeholder((1, 8, 12, 16)), te.placeholder((16, 8, 3, 3))
        conv = topi.nn.conv2d_nchw(data, weight, 1, 1, 1)
    else:
        data, weight = te.placeholder((1, 12, 16, 8)), te.placeholder((3, 3, 8, 16))
        conv = topi.nn.conv2d_nhwc(data, weight, 1, 1, 1)
    relu = topi.nn.relu(conv)
    func = te.create_prim_func([data, weight, relu])

    scheduled = default_schedule().apply(func, target, False)
    assert scheduled is not None, "the rule fits a plain convolution"
    kinds = _loop_kinds(scheduled.mod["main"])
    assert {tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED} <= kinds, kinds

    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in t.shape]).astype("float32")
            for t in (data, weight)]
    shape = tuple(int(d) for d in relu.shape)
    plain = _run(func, target, args, shape)
    fast = _run(scheduled.mod["main"], target, args, shape)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    assert np.abs(plain).max() > 0


def test_a_kernel_the_rule_cannot_fit_is_left_as_it_was() -> None:
    """A loop nest with an opaque (non-affine) write is no block the rule understands: None."""
    import tvm
    from tvm.script import tirx as T

    from hostkit.build.cpu_schedule import default_schedule

    @T.prim_func(s_tir=True)
    def scatter(a: T.Buffer((16,), "int32"), b: T.Buffer((16,), "float32")) -> None:
        for i in range(16):
            with T.sblock("scatter"):
                vi = T.axis.opaque(16, i)
                b[a[vi] % 16] = T.float32(1)

    assert default_schedule().apply(scatter, tvm.target.Target({"kind": "llvm"}), False) is None


def test_exact_builds_keep_float_multiplies_out_of_adds() -> None:
    """An int8 model's requantize, x * s + b: inlined, LLVM fuses it into one FMA (one rounding
    where PyTorch has two); an exact build keeps the multiply in a block of its own."""
    import tvm
    from tvm import te

    from hostkit.build.cpu_schedule import default_schedule

    x = te.placeholder((4, 64))
    scaled = te.compute(x.shape, lambda i, j: x[i, j] * 0.1, name="scaled")
    shifted = te.compute(x.shape, lambda i, j: scaled[i, j] + 0.5, name="shifted")
    func = te.create_prim_func([x, shifted])
    target = tvm.target.Target({"kind": "llvm"})

    def blocks(exact: bool) -> int:
        scheduled = default_schedule(exact).apply(func, target, False)
        assert scheduled is not None
        return scheduled.mod["main"].script().count("with T.sblock(") - 1  # less the root

    assert blocks(exact=False) == 1, "elementwise neighbours are inlined"
    assert blocks(exact=True) == 2, "the multiply keeps its own block"


def test_exact_builds_inline_a_multiply_that_feeds_no_add() -> None:
    """int8's requantize, (acc + b) * s, then ReLU and the next layer's x / s': no multiply
    under an add, nothing to fuse into an FMA, so an exact build inlines it all into one block."""
    import tvm
    from tvm import te, tirx

    from hostkit.build.cpu_schedule import default_schedule

    acc = te.placeholder((4, 64))
    biased = te.compute(acc.shape, lambda i, j: acc[i, j] + 3.0, name="biased")
    scaled = te.compute(acc.shape, lambda i, j: biased[i, j] * 0.1, name="scaled")
    relu = te.compute(acc.shape, lambda i, j: tirx.max(scaled[i, j], 0.0), name="relu")
    quant = te.compute(acc.shape, lambda i, j: relu[i, j] / 0.3, name="quant")
    func = te.create_prim_func([acc, quant])
    scheduled = default_schedule(exact=True).apply(func, tvm.target.Target({"kind": "llvm"}),
                                                   False)
    assert scheduled is not None
    assert scheduled.mod["main"].script().count("with T.sblock(") - 1 == 1


def test_relu6_between_convolutions_needs_no_transposes() -> None:
    """conv -> clip(0, 6) -> conv in NHWC: TVM's layout conversion keeps a clip NCHW (two
    transposes around every ReLU6); as minimum(maximum()) it converts, with the same values."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.normal(size=(8, 8, 3, 3))
                                                          .astype("float32")), padding=1))
            y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            out = bb.emit_output(relax.op.nn.conv2d(
                y, relax.const(rng.normal(size=(4, 8, 1, 1)).astype("float32"))))
        bb.emit_func_output(out)
    mod = bb.get()
    from hostkit.build.cpu_schedule import compile_untuned, nhwc_convolutions

    target = tvm.target.Target({"kind": "llvm"})
    script = nhwc_convolutions(mod, target)["main"].script()
    assert script.count("R.nn.conv2d(") == 2 and 'data_layout="NHWC"' in script
    assert script.count("R.permute_dims(") == 2, "one transpose in, one out: none around clip"
    assert "R.clip(" in mod["main"].script(), "the caller's module is left as it was"

    data = rng.normal(size=(1, 8, 6, 6)).astype("float32")
    want = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](
        tvm.runtime.tensor(data)).numpy()
    got = relax.VirtualMachine(compile_untuned(mod, target), tvm.cpu())["main"](
        tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batch_norm_and_relu6_run_in_the_convolutions_kernel() -> None:
    """conv -> batch norm -> ReLU6: one kernel, the epilogue applied as the output is written
    (batch norm decomposes to a tuple whose first field is taken; left so, fusion stopped at it
    and each ReLU6 was a pass of its own over the feature map: MobileNetV2 4.5 -> 6.1 ms), its
    divide by a constant a multiply (`vdivps` costs as much as 16 multiply-adds)."""
    import tvm
    from tvm import relax

    from hostkit.build.cpu_schedule import compile_untuned

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    stats = [relax.const(rng.uniform(0.5, 1.5, 32).astype("float32")) for _ in range(4)]
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.normal(size=(32, 16, 1, 1))
                                                          .astype("float32"))))
            norm = bb.emit(relax.op.nn.batch_norm(y, *stats, axis=1, training=False))
            y = bb.emit(relax.TupleGetItem(norm, 0))
            out = bb.emit_output(relax.op.clip(y, 0.0, 6.0))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(compile_untuned(mod, target), tvm.cpu())
    called: list[str] = []

    def instrument(_func: object, symbol: str, before: bool, *_: object) -> int:
        if before:
            called.append(symbol)
        return 0

    vm.set_instrument(instrument)
    data = rng.normal(size=(1, 16, 8, 8)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    kernels = [s for s in called if "." not in s and "transpose" not in s]
    assert len(kernels) == 1 and "maximum" in kernels[0] and "conv" in kernels[0], called
    assert "divide" not in kernels[0], "batch norm divides by a constant: multiplied instead"
    want = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](
        tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_clips_become_min_max_and_every_other_binding_stays() -> None:
    """A detector binds its count of kept boxes with a `match_cast` after NMS's padded output;
    rewriting the ReLU6 clips must keep it (TVM's `rewrite_call` dropped it, and SSDlite's
    post-processing then took all 27000 padded rows as kept)."""
    import tvm
    from tvm import relax, tirx

    from hostkit.build.rewrite import clips_as_min_max

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    rows = relax.Var("rows", relax.TensorType((10, 3), "int64"))
    kept = tirx.Var("kept", "int64")
    with bb.function("main", [x, rows]):
        with bb.dataflow():
            y = bb.emit(relax.op.clip(x, 0.0, 6.0))
            found = bb.match_cast(rows, relax.TensorType([kept, 3], "int64"))
            first = bb.emit(relax.op.strided_slice(found, axes=[1], begin=[0], end=[1]))
            out = bb.emit_output(relax.Tuple([y, first]))
        bb.emit_func_output(out)
    script = clips_as_min_max(bb.get())["main"].script()
    assert "R.clip(" not in script and "R.minimum(" in script and "R.maximum(" in script
    assert "R.match_cast(" in script and "R.Tensor((kept, 1)" in script, script

    rng = np.random.default_rng(0)
    data, boxes = rng.normal(size=(1, 8, 6, 6)).astype("float32") * 8, np.arange(30).reshape(10, 3)
    vm = relax.VirtualMachine(tvm.compile(clips_as_min_max(bb.get()), "llvm"), tvm.cpu())
    clipped, column = vm["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(boxes))
    np.testing.assert_array_equal(clipped.numpy(), data.clip(0, 6))
    np.testing.assert_array_equal(column.numpy(), boxes[:, :1])


def test_wide_vectors_only_where_the_cpu_has_avx512_and_the_target_does_not_say() -> None:
    """AVX-512 CPUs get LLVM's full 512-bit vectors; others, and targets that choose, stay."""
    import tvm

    from hostkit.build.targets import wide_vectors

    def mattr(spec: dict[str, object]) -> list[str]:
        return [str(m) for m in wide_vectors(tvm.target.Target(spec)).attrs.get("mattr", [])]

    assert mattr({"kind": "llvm", "mcpu": "rocketlake"}) == ["-prefer-256-bit"]
    assert mattr({"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512f"]}) == [
        "+avx512f", "-prefer-256-bit"]
    assert mattr({"kind": "llvm", "mcpu": "rocketlake", "mattr": ["+prefer-256-bit"]}) == [
        "+prefer-256-bit"]
    assert mattr({"kind": "llvm"}) == []  # generic x86-64: no AVX-512
    assert mattr({"kind": "llvm", "mcpu": "haswell"}) == []
    assert mattr({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) == ["+neon"]
