"""Linear layers on one row of input on edgekit's matrix-vector kernel (`hostkit.build.gemv`):
which ones it takes, that they still match PyTorch, and that tuning leaves them scheduled.

Each case is a small classifier head (a linear layer, its bias, a ReLU after it) exported from
PyTorch, built untuned for the machine's CPU and for a generic x86-64 one (`cpu_targets`), and
compared with PyTorch on the same weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


def _relax(rows: int, terms: int, outputs: int) -> tuple[Any, np.ndarray, np.ndarray]:
    import torch

    from hostkit.build.relax_import import to_relax

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(terms, outputs), torch.nn.ReLU()).eval()
    x = torch.randn(rows, terms)
    with torch.no_grad():
        ref = model(x).numpy()
    return to_relax(torch.export.export(model, (x,))), x.numpy(), ref


def _gemv_kernels(mod: Any) -> list[str]:
    from tvm import tirx

    return [gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and "gemv" in gv.name_hint]


@pytest.mark.parametrize(("rows", "terms", "outputs", "taken"), [
    (1, 1280, 1000, True),  # MobileNetV2's classifier: blocks of four outputs
    (1, 64, 10, True),      # ten outputs: blocks of five
    (1, 48, 7, True),       # seven: one at a time; 48 terms: three 16-lane steps, six 8-lane
    (2, 64, 10, False),     # two rows: a matrix product, TVM's own
    (1, 20, 10, False),     # 20 terms, which no vector divides
])
def test_linear_layers_match_pytorch(rows: int, terms: int, outputs: int, taken: bool,
                                     cpu_targets: list[Any]) -> None:
    import tvm
    from tvm import relax

    from hostkit.build.cpu_schedule import compile_untuned
    from hostkit.build.gemv import matrix_vector_products

    mod, x, ref = _relax(rows, terms, outputs)
    for target in cpu_targets:
        with target:
            folded = relax.transform.FoldConstant()(mod)
        rewritten = matrix_vector_products(folded, target)
        assert bool(_gemv_kernels(rewritten)) == taken, (str(target), _gemv_kernels(rewritten))
        executable = compile_untuned(mod, target)
        assert ("gemv" in executable.as_text()) == taken, "the build calls the kernel it made"
        out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
        out = out[0] if not hasattr(out, "numpy") else out
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_kernel_is_scheduled_by_hand_and_tuning_leaves_it(prepared_kernel: Any,
                                                              cpu_targets: list[Any]) -> None:
    """In a tuned build's preparation the kernel comes scheduled, the bias and ReLU fused, and
    marked so: MetaSchedule finds nothing left to tune in the head."""
    from hostkit.build.tuning.search import extract_tasks
    from hostkit.errors import TuneError

    mod, _, _ = _relax(1, 256, 100)
    prepared, script = prepared_kernel(mod, "gemv")
    assert "T.max" in script
    with pytest.raises(TuneError, match="no kernel MetaSchedule can tune"):
        extract_tasks(prepared, cpu_targets[0], "local")
