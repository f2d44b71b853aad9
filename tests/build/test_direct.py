"""fp32 convolutions on edgekit's direct kernel: which ones it takes, and that they still match.

Each case is one convolution block (conv, batch norm, ReLU, a residual add where the shapes allow)
exported from PyTorch, built untuned for the machine's CPU and for a generic x86-64 one (16 vector
registers, 256-bit vectors: smaller blocks), and compared with PyTorch on the same weights. The
shapes are ResNet's and MobileNet's (3x3 padded, with stride 2, 1x1, the 7x7 stem on 3 channels,
a row width no block divides evenly); grouped convolutions and output channels no vector divides
stay on the default schedule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


class _Block:
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> None:
        from torch import nn

        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups),
            nn.BatchNorm2d(cout), nn.ReLU())
        self.residual = stride == 1 and cin == cout

    def module(self) -> Any:
        import torch
        from torch import nn

        conv, residual = self.conv, self.residual

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = conv

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.conv(x)
                return y + x if residual else y

        return Block().eval()


def _relax(block: _Block, shape: tuple[int, ...]) -> tuple[Any, np.ndarray, np.ndarray]:
    import torch

    from hostkit.build.relax_import import to_relax

    torch.manual_seed(0)
    model = block.module()
    for m in model.modules():  # batch norm with statistics of its own, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x).numpy()
    return to_relax(torch.export.export(model, (x,))), x.numpy(), ref


def _targets() -> list[Any]:
    import tvm
    from tvm.target import codegen

    return [tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()),
                               "num-cores": 2}),
            tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})]


def _direct_kernels(mod: Any) -> list[str]:
    from tvm import tirx

    return [gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("direct_conv")]


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "size", "direct"), [
    (32, 32, 3, 1, 14, True),    # a residual block's second convolution
    (32, 64, 3, 2, 14, True),    # downsampling
    (48, 96, 1, 1, 10, True),    # 1x1 (a block of one vector where two do not divide)
    (3, 64, 7, 2, 23, True),     # the stem: three input channels, an odd row of 12
    (16, 24, 1, 1, 8, False),    # 24 output channels: the default schedule
])
def test_convolution_blocks_match_pytorch(cin: int, cout: int, kernel: int, stride: int,
                                          size: int, direct: bool) -> None:
    import tvm
    from tvm import relax

    from hostkit.build.cpu_schedule import compile_untuned, nhwc_convolutions
    from hostkit.build.direct import direct_convolutions

    mod, x, ref = _relax(_Block(cin, cout, kernel, stride), (1, cin, size, size))
    for target in _targets():
        kernels = _direct_kernels(direct_convolutions(nhwc_convolutions(mod, target), target))
        assert len(kernels) == (1 if direct else 0), (str(target), kernels)
        vm = relax.VirtualMachine(compile_untuned(mod, target), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x))
        out = out[0] if not hasattr(out, "numpy") else out
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_grouped_convolutions_stay_on_the_default_schedule() -> None:
    from hostkit.build.cpu_schedule import nhwc_convolutions
    from hostkit.build.direct import direct_convolutions

    mod, _, _ = _relax(_Block(32, 32, 3, 1, groups=32), (1, 32, 14, 14))
    target = _targets()[0]
    assert _direct_kernels(direct_convolutions(nhwc_convolutions(mod, target), target)) == []


def test_the_kernel_is_scheduled_by_hand_and_tuning_leaves_it() -> None:
    """In a tuned build's preparation the direct kernel comes scheduled (threads, vectors, the
    epilogue fused) and marked so, which keeps MetaSchedule from extracting it as a task."""
    from tvm import tirx

    from hostkit.build.tuning.records import prepare_module
    from hostkit.build.tuning.search import extract_tasks

    mod, _, _ = _relax(_Block(32, 32, 3, 1), (1, 32, 14, 14))
    target = _targets()[0]
    prepared = prepare_module(mod, target)
    direct = [f for gv, f in prepared.functions.items()
              if isinstance(f, tirx.PrimFunc) and "direct_conv" in gv.name_hint]
    assert len(direct) == 1
    script = direct[0].script()
    assert direct[0].attrs["tirx.is_scheduled"]
    assert "T.parallel" in script and "T.vectorized" in script and "T.unroll" in script
    assert "T.max" in script, "the ReLU is computed in the convolution's kernel"
    names = [task.task_name for task in extract_tasks(prepared, target, "local")]
    assert names and not any("direct_conv" in name for name in names), names
