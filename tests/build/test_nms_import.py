"""edgekit's NMS converters keep exactly torchvision's boxes at the IoU threshold itself.

torchvision suppresses a box whose IoU with a kept one is above the threshold, TVM's NMS at or
above it: `hostkit.build.relax_import` moves the threshold up one float32 step. These boxes sit
on either side of the threshold by less than a float32 rounding of a deep network's boxes
(Faster R-CNN's RPN decides a pair at IoU 0.700027 against 0.7), so a converter one step off,
or comparing the other way, keeps or drops one of them here. Both converters (torchvision's
`nms`, edgekit's `nms_by_class`) are compiled for the CPU and run in the Relax VM.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

# Pairs 20 px apart, each a box (x, 0, x + 10, 10) and a lower-scored box (x, 0, x + 10, h)
# inside it: IoU h / 10, exactly 0.5 and 0.7 in float32 (both kept: not above the threshold),
# and a hair above (suppressed) and below (kept) each.
HEIGHTS = (5, 5.001, 4.999, 7, 7.001, 6.999)
BOXES = np.array([box for g, h in enumerate(HEIGHTS)
                  for box in ([20 * g, 0, 20 * g + 10, 10], [20 * g, 0, 20 * g + 10, h])],
                 np.float32)
SCORES = np.linspace(0.9, 0.1, len(BOXES)).astype(np.float32)


def _run(module: Any, args: tuple[Any, ...]) -> np.ndarray:
    import torch
    import tvm
    from tvm import relax

    from hostkit.build.relax_import import to_relax

    program = torch.export.export(module, args)
    vm = relax.VirtualMachine(tvm.compile(to_relax(program), "llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    return (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()


@pytest.mark.parametrize("iou", [0.5, 0.7])
def test_nms_keeps_torchvisions_boxes_at_the_threshold(iou: float) -> None:
    import torch
    from torchvision.ops import nms

    class Nms(torch.nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return nms(boxes, scores, iou)

    args = (torch.from_numpy(BOXES), torch.from_numpy(SCORES))
    want = Nms()(*args).numpy()
    assert 0 < len(want) < len(BOXES)  # some suppressed, some kept at the threshold
    np.testing.assert_array_equal(_run(Nms(), args), want)


def test_nms_by_class_keeps_torchvisions_boxes_at_the_threshold() -> None:
    """Two classes of the same boxes, the second's scores reversed and one of its candidates
    invalid: NMS per class, the kept ones across both by decreasing score."""
    import torch

    from hostkit.models.detection import nms_op

    op = nms_op()

    class ByClass(torch.nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
            return op(boxes, scores, valid, 0.5)

    boxes = torch.from_numpy(np.stack([BOXES, BOXES]))
    scores = torch.from_numpy(np.stack([SCORES, SCORES[::-1] - 0.05]))
    valid = torch.ones(scores.shape, dtype=torch.bool)
    valid[1, 3] = False
    args = (boxes, scores, valid)
    want = ByClass()(*args).numpy()
    assert set(want[:, 0]) == {0, 1}
    np.testing.assert_array_equal(_run(ByClass(), args), want)
