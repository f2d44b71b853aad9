"""A MobileNet block's expansion and strided depthwise convolution as one kernel
(`hostkit.build.expansion`): which pairs it takes, that they still match PyTorch, and that tuning
leaves the kernel scheduled.

Each case is the pair as MobileNetV2 has it (1x1 convolution, batch norm with statistics of its
own, ReLU6, ReLU or none, depthwise 3x3 convolution, batch norm, ReLU6) exported from PyTorch, built
untuned for the machine's CPU and for a generic x86-64 one, and compared with PyTorch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


def _relax(cin: int, cout: int, size: int, stride: int = 2, batch: int = 1,
           act: str | None = "relu6", shared: bool = False) -> tuple[Any, np.ndarray, np.ndarray]:
    """`shared`: the widened map is also an output of the model, so it must be written."""
    import torch
    from torch import nn

    from hostkit.build.relax_import import to_relax

    torch.manual_seed(0)
    activation = {"relu6": [nn.ReLU6()], "relu": [nn.ReLU()], None: []}[act]
    expand = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), *activation)
    depthwise = nn.Sequential(nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, bias=False),
                              nn.BatchNorm2d(cout), nn.ReLU6())

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.depthwise = expand, depthwise

        def forward(self, x: torch.Tensor) -> Any:
            wide = self.expand(x)
            out = self.depthwise(wide)
            return (out, wide) if shared else out

    model = Pair().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(batch, cin, size, size)
    with torch.no_grad():
        ref = model(x)
    ref = ref[0] if shared else ref
    return to_relax(torch.export.export(model, (x,))), x.numpy(), ref.numpy()


@pytest.mark.parametrize(("cin", "cout", "size", "stride", "batch", "act", "shared", "large",
                          "taken"), [
    (16, 96, 112, 2, 1, "relu6", False, True, True),   # MobileNetV2's: 4.8 MB widened
    (24, 144, 56, 2, 1, "relu6", False, True, False),  # its next: 1.8 MB, under `LARGE`
    (8, 32, 15, 2, 2, "relu6", False, False, True),    # odd rows, two images
    (8, 32, 14, 2, 1, "relu", False, False, True),     # MobileNetV3's and MnasNet's ReLU
    (8, 48, 14, 2, 1, None, False, False, True),       # no clip; 48 channels: 16-lane chunks
    (8, 32, 16, 1, 1, "relu6", False, False, False),   # stride 1: each tile would redo a third
    (8, 32, 16, 2, 1, "relu6", True, False, False),    # the widened map is read elsewhere too
])
def test_pairs_match_pytorch(cin: int, cout: int, size: int, stride: int, batch: int,
                             act: str | None,
                             shared: bool, large: bool, taken: bool, cpu_targets: list[Any],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`large` False: the pair is small, and `LARGE` is lowered to 0 to see what the rewrite
    would do with it."""
    import tvm
    from tvm import relax

    from hostkit.build import expansion
    from hostkit.build.cpu_schedule import compile_untuned

    if not large:
        monkeypatch.setattr(expansion, "LARGE", 0)
    mod, x, ref = _relax(cin, cout, size, stride, batch, act, shared)
    for target in cpu_targets:
        executable = compile_untuned(mod, target)
        calls = executable.as_text()
        assert ("expansion_" in calls) == taken, str(target)
        out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
        out = out[0] if not hasattr(out, "numpy") else out
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_kernel_is_scheduled_by_hand_and_tuning_leaves_it(
        prepared_kernel: Any, cpu_targets: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a tuned build's preparation (batch norm folded into the weights, OHWI) the pair
    comes as one kernel, scheduled and marked so: MetaSchedule extracts no task from it."""
    from hostkit.build import expansion
    from hostkit.build.tuning.search import extract_tasks

    monkeypatch.setattr(expansion, "LARGE", 0)
    mod, _, _ = _relax(8, 32, 16)
    prepared, _ = prepared_kernel(mod, "expansion")
    tasks = [task.task_name for task in extract_tasks(prepared, cpu_targets[0], "local")]
    assert not any("expansion" in task for task in tasks), tasks
