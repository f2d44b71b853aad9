"""edgekit's own PyTorch operators, registered in whichever process meets a program using them.

A detector is exported with `edgekit::nms_by_class` (`hostkit.models.detection`) in its graph;
the host registers it to export and run the program, and the device's PyTorch baseline
(`devicekit.baselines`) registers it before loading the same `.pt2`, which cannot be read
without it. It lives here, imported lazily, because devicekit must not need hostkit; torch (and
torchvision, whose NMS runs it) only where a program uses it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["nms_by_class_op", "register_ops"]


def nms_by_class_op() -> Any:
    """`edgekit::nms_by_class`, registered with torch on first use: NMS per class over C x N
    candidates (boxes C x N x 4, scores and valid C x N), returning (class, index) rows of the
    kept ones by decreasing score. PyTorch runs it with torchvision's `batched_nms`; its fake
    gives the count an unbacked size, and edgekit's Relax importer maps it onto TVM's all-class
    NMS, one class per batch row."""
    import torch

    if not hasattr(torch.ops.edgekit, "nms_by_class"):
        @torch.library.custom_op("edgekit::nms_by_class", mutates_args=(), schema=(
            "(Tensor boxes, Tensor scores, Tensor valid, float iou_threshold) -> Tensor"))
        def nms_by_class(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                         iou_threshold: float) -> torch.Tensor:
            from torchvision.ops import boxes as box_ops

            where = torch.nonzero(valid)
            keep = box_ops.batched_nms(boxes[where[:, 0], where[:, 1]],
                                       scores[where[:, 0], where[:, 1]], where[:, 0],
                                       iou_threshold)
            return where[keep]

        @nms_by_class.register_fake
        def _(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
              iou_threshold: float) -> torch.Tensor:
            most = scores.numel()
            count = torch.library.get_ctx().new_dynamic_size(
                max=most if isinstance(most, int) else None)
            return scores.new_empty((count, 2), dtype=torch.int64)

    return torch.ops.edgekit.nms_by_class


def register_ops() -> None:
    """Register every operator a program exported by edgekit may hold, before loading one:
    edgekit's NMS, and torchvision's own (`torchvision::roi_align`, `nms`: a Faster/Mask R-CNN
    program holds them), which torchvision registers when it is imported. A board without
    torchvision still loads classifiers, which need neither."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    nms_by_class_op()
