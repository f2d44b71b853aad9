"""The Winograd preparation: which convolutions become Winograd kernels, that they match PyTorch,
and that MetaSchedule schedules their transforms with TVM's hand-written CPU rules."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hostkit.models import ModelSpec, load_model

TARGET = {"kind": "llvm", "num-cores": 2}


@pytest.fixture(scope="module")
def prepared() -> tuple[Any, Any]:
    import tvm

    from hostkit.build.compiler import import_relax
    from hostkit.build.tuning.records import WINOGRAD, prepare_module

    model = load_model(ModelSpec("tinycnn"))
    return model, prepare_module(import_relax(model), tvm.target.Target(TARGET), WINOGRAD)


def _kernels(mod: Any) -> dict[str, Any]:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def test_winograd_build_matches_pytorch(prepared: tuple[Any, Any]) -> None:
    import tvm

    from hostkit.build.winograd import KERNEL_NAME

    model, mod = prepared
    # tinycnn's first convolution (3x3, stride 1) is Winograd; its second (stride 2) is not.
    names = list(_kernels(mod))
    assert sum(KERNEL_NAME in n for n in names) == 1, names
    assert any("conv2d" in n and KERNEL_NAME not in n for n in names), names
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, tvm.target.Target(TARGET)), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in model.inputs))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    expected = model.reference()[0]
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-4


def test_winograd_transforms_take_the_cpu_rules(prepared: tuple[Any, Any]) -> None:
    """Each transform stage names a rule TVM registers for CPUs, and that rule schedules it.

    MetaSchedule's `ApplyCustomRule` calls `s_tir.meta_schedule.<target key>.<schedule_rule>`
    for a block with that annotation; the rules are called directly here because a TuneContext
    imports every tensor intrinsic first (a minute of parsing on a busy 2-core machine).
    """
    import tvm
    from tvm import s_tir

    from hostkit.build.winograd import KERNEL_NAME

    _, mod = prepared
    (func,) = (f for n, f in _kernels(mod).items() if KERNEL_NAME in n)
    kernel = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    for stage in ("data_pack", "inverse"):
        sch = s_tir.Schedule(kernel)
        rule = sch.get(sch.get_sblock(stage)).annotations.get("schedule_rule")
        assert rule == f"conv2d_nhwc_winograd_{stage}"
        (scheduled,) = tvm.get_global_func(f"s_tir.meta_schedule.cpu.{rule}")(
            sch, sch.get_sblock(stage))
        # The rule tiles the pixel and channel loops and unrolls the stage's 4 transform loops
        # with explicit `unroll` steps, which MetaSchedule's generic rules never emit.
        trace = str(scheduled.trace)
        assert trace.count("sch.unroll(") == 4 and "sample_perfect_tile" in trace, trace
