"""The int8 build computes in int8: the lowered module's convolutions and matmuls take int8 and
accumulate in int32, and the compiled kernels' buffers say so."""

from __future__ import annotations

import re

import numpy as np

from hostkit.build.compiler import import_with_report
from hostkit.models import ModelSpec, load_model


def _calls(mod: object) -> list[tuple[str, str, str]]:
    from tvm import relax

    found: list[tuple[str, str, str]] = []

    def visit(expr: object) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in (
                "relax.nn.conv2d", "relax.matmul"):
            found.append((expr.op.name, str(expr.args[0].ty.dtype), str(expr.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)  # type: ignore[index]
    return found


def test_convolutions_and_dense_take_int8_and_accumulate_int32() -> None:
    model = load_model(ModelSpec("tinycnn", input_shape=(1, 3, 16, 16), quantize="int8",
                                 calibration="4"))
    mod, report = import_with_report(model)
    assert report == {"int8_layers": 3, "vnni_layers": 0, "fp32_layers": []}
    calls = _calls(mod)
    assert [op for op, _, _ in calls] == ["relax.nn.conv2d", "relax.nn.conv2d", "relax.matmul"]
    assert all(data == "int8" and out == "int32" for _, data, out in calls), calls


def _param_dtypes(script: str) -> set[str]:
    """The dtypes of a TIR kernel's parameters, from its signature line."""
    signature = next(line for line in script.splitlines() if line.startswith("def "))
    return set(re.findall(r'T\.Buffer\(\(.*?\), "(\w+)"\)', signature))


def test_compiled_kernels_read_int8_and_match_pytorch() -> None:
    import tvm
    from tvm import relax, tirx

    model = load_model(ModelSpec("tinycnn", input_shape=(1, 3, 16, 16), quantize="int8",
                                 calibration="4"))
    mod, _ = import_with_report(model)
    lowered = relax.transform.LegalizeOps()(mod)
    kernels = {gv.name_hint: _param_dtypes(f.script())
               for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)
               and ("conv2d" in gv.name_hint or "matmul" in gv.name_hint)}
    assert len(kernels) == 3 and all("int8" in d and "int32" in d for d in kernels.values()), \
        kernels
    assert not any("float32" in d for d in kernels.values()), "no float inside the int8 kernels"
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(model.inputs[0]))
    got = (out[0] if not hasattr(out, "numpy") else out).numpy()
    assert np.abs(got - model.reference()[0]).max() < 1e-4
