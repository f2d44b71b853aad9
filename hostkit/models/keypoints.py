"""Keypoint R-CNN's keypoint decoding, left to the host.

torchvision decodes keypoints (`heatmaps_to_keypoints`) by resizing each detection's 17 56x56
heatmaps bicubically to that detection's box, rounded up to whole pixels, and taking each map's
maximum: a tensor shaped by each box, made in a Python loop, which torch.export cannot trace
(a data-dependent guard at torchvision/models/detection/roi_heads.py:282). While exporting
(`hostkit.models.detection.exportable`), the program returns each detection's heatmaps instead
(keypoint logits, N x 17 x 56 x 56, as `keypoints`, without `keypoints_scores`), and the host
decodes them with torchvision's own function (`decode`), before the check, as Mask R-CNN's masks
are pasted. Decoding needs only the heatmaps and the boxes: the detectors edgekit builds see the
input at its own size, so the boxes the device returns are the ones torchvision decodes at.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["decode", "values_at", "heatmaps_only", "keeping_heatmaps"]


def heatmaps_only(x: Any, boxes: list[Any]) -> tuple[list[Any], list[Any]]:
    """`keypointrcnn_inference` for export: each image's keypoint logits, undecoded; no scores
    (`keeping_heatmaps` drops their placeholder)."""
    heatmaps = x.split([b.shape[0] for b in boxes], dim=0)
    return list(heatmaps), [None] * len(boxes)


def keeping_heatmaps(postprocess: Callable[..., Any]) -> Callable[..., Any]:
    """`GeneralizedRCNNTransform.postprocess` for export: heatmaps are not coordinates, so they
    bypass its keypoint rescaling, and the scores' placeholder is dropped."""

    def wrapped(self: Any, result: list[dict[str, Any]], image_shapes: Any,
                original_image_sizes: Any) -> list[dict[str, Any]]:
        heatmaps = [r.pop("keypoints", None) for r in result]
        for r in result:
            r.pop("keypoints_scores", None)
        result = postprocess(self, result, image_shapes, original_image_sizes)
        for r, maps in zip(result, heatmaps):
            if maps is not None:
                r["keypoints"] = maps
        return result

    return wrapped


def decode(heatmaps: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (N x K x 3: x, y, visibility 1) and their scores (N x K) from per-detection
    heatmaps (N x K x 56 x 56) at their boxes, by torchvision's `heatmaps_to_keypoints`, as the
    model decodes them after the part that runs on the device."""
    import torch
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

    if not len(boxes):
        return (np.zeros((0, heatmaps.shape[1], 3), np.float32),
                np.zeros((0, heatmaps.shape[1]), np.float32))
    with torch.no_grad():
        keypoints, scores = heatmaps_to_keypoints(_tensor(heatmaps), _tensor(boxes))
    return keypoints.numpy(), scores.numpy()


def values_at(heatmaps: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Each detection's resized heatmaps (as `decode` resizes them) read at given keypoints
    (N x K x 2 or 3, image coordinates, e.g. PyTorch's): where two near-equal maxima make the
    device and PyTorch pick different places, the device's value at PyTorch's place says
    whether it was a near tie."""
    import torch
    import torch.nn.functional as F

    values = np.zeros(keypoints.shape[:2], np.float32)
    maps, rois = _tensor(heatmaps), _tensor(boxes)
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    with torch.no_grad():
        for i in range(len(rois)):
            w, h = int(widths[i].ceil().item()), int(heights[i].ceil().item())
            resized = F.interpolate(maps[i][:, None], size=(h, w), mode="bicubic",
                                    align_corners=False)[:, 0].numpy()
            # decode's x = (column + 0.5) * width / w + x1, inverted and rounded to a column
            column = (keypoints[i, :, 0] - float(rois[i, 0])) * w / float(widths[i]) - 0.5
            row = (keypoints[i, :, 1] - float(rois[i, 1])) * h / float(heights[i]) - 0.5
            column = np.clip(np.rint(column), 0, w - 1).astype(np.int64)
            row = np.clip(np.rint(row), 0, h - 1).astype(np.int64)
            values[i] = resized[np.arange(len(column)), row, column]
    return values


def _tensor(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
