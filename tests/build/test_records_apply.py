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


def test_kernels_no_record_covers_get_the_default_schedule(tmp_path: Any) -> None:
    """A tune stopped by its time budget leaves kernels without records; the build schedules
    them as an untuned build would (threads, vectors), never leaves them as one scalar loop."""
    import tvm
    from tvm import tirx

    from hostkit.build.compiler import import_relax
    from hostkit.build.tuning.records import apply_records, prepare_module, schedule_uncovered
    from hostkit.models import ModelSpec, load_model

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    model = load_model(ModelSpec("tinycnn", input_shape=(1, 3, 16, 16)))
    with target:
        prepared = prepare_module(import_relax(model), target)
        applied, coverage = apply_records(prepared, tmp_path)  # an empty database: no records
        # tunable: every kernel but edgekit's hand-scheduled ones (its direct convolutions)
        tunable = {gv.name_hint for gv, f in prepared.functions.items()
                   if isinstance(f, tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False)}
        before = [f.script() for gv, f in applied.functions.items() if gv.name_hint in tunable]
        done = schedule_uncovered(applied, target)
    assert coverage.tuned == 0 and coverage.total > 0
    assert not any("T.parallel" in text for text in before), "the records applied nothing here"

    def parallel(func: Any) -> bool:
        return "T.parallel" in func.script()

    kernels = {gv.name_hint: f for gv, f in done.functions.items() if gv.name_hint in tunable}
    assert len(kernels) == coverage.total
    assert all(f.attrs.get("tirx.is_scheduled", False) for f in kernels.values()), kernels.keys()
    assert all(parallel(f) for f in kernels.values()), [n for n, f in kernels.items()
                                                        if not parallel(f)]
