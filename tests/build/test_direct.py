"""fp32 convolutions on edgekit's direct kernel: which ones it takes, and that they still match.

Each case is one convolution block (conv, batch norm, ReLU, a residual add where the shapes allow)
exported from PyTorch, built untuned for the machine's CPU and for a generic x86-64 one (16 vector
registers, 256-bit vectors: smaller blocks), and compared with PyTorch on the same weights. The
shapes are ResNet's and MobileNet's (3x3 padded, with stride 2, 1x1, the 7x7 stem on 3 channels,
a row width no block divides evenly); 3x3 stride-1 convolutions with outputs of 14 or more on
Winograd's three kernels (`hostkit.build.direct_winograd`); depthwise ones on their own
(`hostkit.build.depthwise`); other grouped convolutions and output channels no vector divides
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


def _kernels(mod: Any, prefix: str = "direct_conv") -> list[str]:
    from tvm import tirx

    return [gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(prefix)]


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "size", "batch", "kind"), [
    (32, 32, 3, 1, 14, 1, "winograd"),  # a residual block's second convolution
    (32, 32, 3, 1, 15, 1, "depthwise"),  # MobileNet's, an odd row
    (48, 48, 3, 2, 14, 2, "depthwise"),  # downsampling, two images
    (16, 32, 3, 1, 16, 2, "winograd"),  # two images: tiles of both in one multiply
    (32, 32, 3, 1, 7, 1, "direct"),     # 7x7 output: a quarter of every 2x2 tile padding
    (32, 64, 3, 2, 14, 1, "direct"),    # downsampling
    (48, 96, 1, 1, 10, 1, "direct"),    # 1x1 (a block of one vector where two do not divide)
    (3, 64, 7, 2, 23, 1, "direct"),     # the stem: three input channels, an odd row of 12
    (96, 24, 1, 1, 9, 1, "direct"),     # MobileNetV2's 24 channels: three half vectors
    (16, 20, 1, 1, 8, 1, None),         # 20 output channels: the default schedule
])
def test_convolution_blocks_match_pytorch(cin: int, cout: int, kernel: int, stride: int,
                                          size: int, batch: int, kind: str | None,
                                          cpu_targets: list[Any],
                                          caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import tvm
    from tvm import relax

    from hostkit.build.cpu_schedule import compile_untuned, nhwc_convolutions
    from hostkit.build.direct import direct_convolutions

    groups = cin if kind == "depthwise" else 1
    mod, x, ref = _relax(_Block(cin, cout, kernel, stride, groups), (batch, cin, size, size))
    for target in cpu_targets:
        rewritten = direct_convolutions(nhwc_convolutions(mod, target), target)
        names = {"direct": "direct_conv", "winograd": "winograd_gemm", "depthwise": "depthwise"}
        kernels = {name: _kernels(rewritten, name) for name in names.values()}
        expected = {name: [1] if kind == k else [] for k, name in names.items()}
        assert {k: [len(v)] if v else [] for k, v in kernels.items()} == expected, str(target)
        with caplog.at_level(logging.INFO, logger="edgekit"):
            vm = relax.VirtualMachine(compile_untuned(mod, target), tvm.cpu())
        assert "did not build" not in caplog.text, "the NHWC module built, not the fallback"
        out = vm["main"](tvm.runtime.tensor(x))
        out = out[0] if not hasattr(out, "numpy") else out
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_grouped_convolutions_stay_on_the_default_schedule(cpu_targets: list[Any]) -> None:
    """Groups of several channels (not depthwise): TVM's own lowering."""
    from hostkit.build.cpu_schedule import nhwc_convolutions
    from hostkit.build.direct import direct_convolutions

    mod, _, _ = _relax(_Block(32, 32, 3, 1, groups=4), (1, 32, 14, 14))
    target = cpu_targets[0]
    rewritten = direct_convolutions(nhwc_convolutions(mod, target), target)
    assert [_kernels(rewritten, name) for name in ("direct", "winograd", "depthwise")] == \
        [[], [], []]


@pytest.mark.parametrize(("stride", "groups", "names"), [
    (2, 1, ("direct_conv",)),
    (1, 1, ("winograd_pack", "winograd_gemm", "winograd_unpack")),
    (1, 32, ("depthwise_conv",)),
])
def test_the_kernels_are_scheduled_by_hand_and_tuning_leaves_them(
        stride: int, groups: int, names: tuple[str, ...], tmp_path: Any,
        cpu_targets: list[Any]) -> None:
    """In a tuned build's preparation the direct kernel and Winograd's three come scheduled
    (threads, vectors, the epilogue fused) and marked so, which keeps MetaSchedule from
    extracting them as tasks, and applying records passes over them."""
    from tvm import tirx

    from hostkit.build.tuning.records import apply_records, prepare_module
    from hostkit.build.tuning.search import extract_tasks

    mod, _, _ = _relax(_Block(32, 32, 3, stride, groups), (1, 32, 28, 28))
    target = cpu_targets[0]
    prepared = prepare_module(mod, target)
    for name in names:
        kernels = [f for gv, f in prepared.functions.items()
                   if isinstance(f, tirx.PrimFunc) and name in gv.name_hint]
        assert len(kernels) == 1, (name, [gv.name_hint for gv in prepared.functions])
        script = kernels[0].script()
        assert kernels[0].attrs["tirx.is_scheduled"], name
        assert "T.parallel" in script and "T.vectorized" in script, name
    epilogue = [f for gv, f in prepared.functions.items() if names[-1] in gv.name_hint][0]
    assert "T.max" in epilogue.script(), "the ReLU is computed in the convolution's last kernel"
    tasks = [task.task_name for task in extract_tasks(prepared, target, "local")]
    assert not any(name in task for task in tasks for name in names), tasks
    with target:  # a tuned build of it (no records here): MetaSchedule's passes take the kernels
        applied, _ = apply_records(prepared, tmp_path)
    assert all(any(name in gv.name_hint for gv in applied.functions) for name in names)


@pytest.mark.parametrize(("m", "size", "batch"), [(2, 10, 1), (4, 14, 1), (4, 9, 2)])
def test_winograd_kernels_match_pytorch(m: int, size: int, batch: int,
                                        cpu_targets: list[Any]) -> None:
    """F(2x2) and F(4x4) alone (tiles past the edge of a row included), from the transformed
    weights to the NHWC output, against PyTorch's convolution."""
    import torch
    import tvm

    from hostkit.build import direct_winograd as winograd
    from hostkit.build.cpu_schedule import direct_schedule

    target, cin, cout, block = cpu_targets[0], 32, 64, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    _, _, rows = winograd.tiles(batch, (size, size), m)
    points = (m + 2) ** 2

    def run(func: Any, schedule: Any, *args: np.ndarray, out: tuple[int, ...]) -> np.ndarray:
        sch = schedule(func.with_attr("global_symbol", "main"), target)
        assert sch is not None
        result = tvm.runtime.tensor(np.zeros(out, np.float32))
        tvm.compile(sch.mod, target=target)["main"](*map(tvm.runtime.tensor, args), result)
        return result.numpy()

    packed = run(winograd.pack_kernel((batch, size, size, cin), (1, 1, 1, 1), m, 8),
                 lambda func, _: tvm.s_tir.Schedule(func), x, out=(points, rows, cin))
    product = run(winograd.gemm_kernel(points, rows, cin, cout, block), direct_schedule,
                  packed, winograd.transform_weights(w, block, m), out=(points, rows, cout))
    y = run(winograd.unpack_kernel(rows, (batch, size, size, cout), m),
            winograd.winograd_schedule, product, out=(batch, size, size, cout))
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                     torch.from_numpy(w).permute(3, 2, 0, 1), padding=1)
    ref_nhwc = ref.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(y, ref_nhwc, rtol=1e-4, atol=1e-4 * np.abs(ref_nhwc).max())


@pytest.mark.parametrize(("shape", "out", "by"), [
    ((1, 112, 112, 16), 96, "pixels"),   # MobileNetV2's expansion: 6 KB of weights, 800 KB of input
    ((1, 7, 7, 512), 512, "channels"),   # a last layer: 1 MB of weights, 100 KB of input
])
def test_the_cores_share_blocks_by_whichever_reads_less(shape: tuple[int, int, int, int],
                                                        out: int, by: str,
                                                        cpu_targets: list[Any]) -> None:
    """By pixels, each core's next block is the next slice of channels of the same pixels (the
    channel block is the parallel loop's fastest part); by channels, its next block is the
    next pixels of the same slice (the slowest)."""
    from hostkit.build.cpu_schedule import direct_schedule
    from hostkit.build.direct import conv_kernel

    sch = direct_schedule(conv_kernel(shape, (1, 1), (1, 1), (0, 0, 0, 0), out, 32),
                          cpu_targets[0])
    script = sch.mod.script()
    binding = next(line for line in script.splitlines()
                   if f"T.axis.spatial(T.int64({out})" in line and "_fused" in line)
    slices, pixel_blocks = out // 32, shape[1] * (shape[2] // 14 if shape[2] % 14 == 0 else 1)
    expected = f"% T.int64({slices})" if by == "pixels" else f"// T.int64({pixel_blocks})"
    assert expected in binding, binding


def test_a_first_layer_reads_the_image_as_it_came(cpu_targets: list[Any]) -> None:
    """The stem's direct kernel takes the NCHW image and transposes it as it pads it: no
    transpose of its own before it (0.03 of MobileNetV2's 3.2 ms), only the output's after."""
    import tvm
    from tvm import relax

    from hostkit.build.cpu_schedule import compile_untuned, nhwc_convolutions
    from hostkit.build.direct import direct_convolutions

    mod, x, ref = _relax(_Block(3, 32, 3, 2), (1, 3, 24, 24))
    target = cpu_targets[0]
    rewritten = direct_convolutions(nhwc_convolutions(mod, target), target)
    (kernel,) = [f for gv, f in rewritten.functions.items() if gv.name_hint.startswith("direct")]
    assert [int(d) for d in kernel.params[0].ty.shape] == [1, 3, 24, 24]
    executable = compile_untuned(mod, target)
    calls = [line.split()[1] for line in executable.as_text().splitlines()
             if line.strip().startswith("call ")]
    assert [c for c in calls if "transpose" in c] == ["transpose1"], "the output's alone"
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    out = out[0] if not hasattr(out, "numpy") else out
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
