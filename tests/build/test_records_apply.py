"""Tuning preparation: what MetaSchedule may rewrite in a kernel, and what it must not."""

from __future__ import annotations

from typing import Any

import numpy as np


def _sliced_offsets_module() -> Any:
    """The int8 VNNI matmul's follower: subtract 32 per-channel offsets, keep 24 channels."""
    from tvm import relax

    offsets = np.arange(32, dtype=np.int32) * 100
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 32), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            shifted = bb.emit(relax.op.subtract(x, relax.const(offsets)))
            kept = bb.emit(relax.op.strided_slice(shifted, axes=[1], begin=[0], end=[24]))
            out = bb.emit_output(relax.op.astype(kept, "float32"))
        bb.emit_func_output(out)
    return bb.get()


def test_a_sliced_per_channel_constant_keeps_its_layout() -> None:
    """MetaSchedule's layout rewrite of a constant the kernel slices copied entry i to i % 24,
    so offsets 24..31 overwrote 0..7 (tuned int8 MobileNetV2: rel_err 0.54). A kernel without
    a reduction (no weights) keeps every layout."""
    import tvm
    from tvm import s_tir, tirx
    from tvm.s_tir import meta_schedule as ms

    from hostkit.build.tuning.records import prepare_module

    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    prepared = prepare_module(_sliced_offsets_module(), target)
    (kernel,) = [tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
                 for f in prepared.functions.values() if isinstance(f, tirx.PrimFunc)]
    sch = s_tir.Schedule(kernel)
    for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        sch.compute_inline(block)  # as MetaSchedule's auto-inline does
    assert ms.postproc.RewriteLayout().apply(sch)  # what every tuned candidate goes through

    rng = np.random.default_rng(0)
    x = rng.integers(-2000, 2000, size=(64, 32), dtype=np.int32)
    offsets = np.arange(32, dtype=np.int32) * 100

    def run(mod: Any) -> Any:
        lib = tvm.compile(mod, target)
        buffers = [tvm.runtime.tensor(x), tvm.runtime.tensor(offsets),
                   tvm.runtime.tensor(np.zeros((64, 24), dtype=np.float32))]
        lib["main"](*buffers)
        return buffers[-1].numpy()

    expected = (x - offsets)[:, :24].astype(np.float32)
    np.testing.assert_array_equal(run(kernel), expected)
    np.testing.assert_array_equal(run(sch.mod), expected)
