"""Detectors: torchvision's detection and instance-segmentation models, built to be exported.

Three things stand between torchvision's detectors and `torch.export` on torch 2.14, and each is
met while exporting only (`exportable()`), never in the model PyTorch's reference runs:

- `batched_nms` branches on `boxes.numel() == 0` and on the box count (a data-dependent guard at
  torchvision/ops/boxes.py:86); its coordinate-offset path gives the same answer for every count,
  so the export takes that path, and `torchvision::nms` stays one operator (its registered fake
  gives the kept count an unbacked size) for the importer to map onto TVM's NMS;
- Mask R-CNN's `paste_masks_in_image` loops in Python over the detections, pasting each 28x28
  mask into the image: the exported program returns the per-detection 28x28 mask probabilities,
  and `paste_masks` pastes them on the host with torchvision's own function, before the check;
- Faster/Mask R-CNN's multi-scale RoIAlign sizes a tensor by the number of boxes and scatters
  each pyramid level's rows into it: the export pools every box at every level and selects;
- the detectors resize their input inside the model (Faster/Mask R-CNN and RetinaNet to an 800
  short side): edgekit builds them with `min_size`/`max_size` at the input's own size, so the
  network sees the input as given (an image file is decoded at its size; SSD keeps its fixed
  320 or 300 square).

Seeded random weights put few boxes above torchvision's score thresholds, and two empty lists
are no check, so a seeded detector is built with a score threshold of 0 (every box NMS keeps, up
to the model's per-image limit). With `--weights` the thresholds are torchvision's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

__all__ = ["DEFAULT_SHAPES", "detector_kwargs", "exportable", "paste_masks", "OUTPUTS"]

# SSD resizes to its fixed square; the others see the input at its own size.
DEFAULT_SHAPES = {"ssd300_vgg16": (1, 3, 300, 300)}
DEFAULT_SHAPE = (1, 3, 320, 320)
# What a detector returns for one image, in torchvision's order.
OUTPUTS = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")


def detector_kwargs(name: str, shape: tuple[int, ...], seeded: bool) -> dict[str, Any]:
    """Constructor arguments: the input's own size for the R-CNN/RetinaNet/FCOS resize, and a
    score threshold of 0 for seeded weights (so the check compares many detections)."""
    kwargs: dict[str, Any] = {}
    if not name.startswith("ssd"):
        kwargs.update(min_size=min(shape[-2:]), max_size=max(shape[-2:]))
    if seeded:
        rcnn = "rcnn" in name
        kwargs["box_score_thresh" if rcnn else "score_thresh"] = 0.0
    return kwargs


@contextlib.contextmanager
def exportable() -> Iterator[None]:
    """torchvision's detection code made exportable, for the duration of one `torch.export`."""
    from torchvision.models.detection import transform
    from torchvision.ops import boxes, poolers

    saved = boxes.batched_nms, transform.paste_masks_in_image, poolers._multiscale_roi_align
    boxes.batched_nms = _batched_nms
    transform.paste_masks_in_image = _unpasted
    poolers._multiscale_roi_align = _multiscale_roi_align
    try:
        yield
    finally:
        boxes.batched_nms, transform.paste_masks_in_image, poolers._multiscale_roi_align = saved


def _batched_nms(boxes: Any, scores: Any, idxs: Any, iou_threshold: float) -> Any:
    """torchvision's `_batched_nms_coordinate_trick` without its branches on the box count (none
    kept from no boxes either way; its per-class path above 4000 boxes keeps the same boxes)."""
    import torch

    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, iou_threshold)


def _unpasted(masks: Any, boxes: Any, img_shape: Any, padding: int = 1) -> Any:
    return masks


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Per-detection mask probabilities (N x 1 x 28 x 28) pasted into the image (N x 1 x H x W)
    at their boxes, by torchvision's `paste_masks_in_image`, as the model does after export."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    with torch.no_grad():
        pasted = paste_masks_in_image(torch.from_numpy(np.ascontiguousarray(masks)),
                                      torch.from_numpy(np.ascontiguousarray(boxes)), image_hw)
    return pasted.numpy()


def _multiscale_roi_align(x_filtered: list[Any], boxes: list[Any], output_size: list[int],
                          sampling_ratio: int, scales: list[float] | None,
                          mapper: Any) -> Any:
    """torchvision's multi-scale RoIAlign with the same result, without its per-level scatter:
    it sizes a zero tensor by `len(rois)` and writes each level's rows into it, two
    data-dependent steps; here every level pools every box and each box keeps its own level's
    pooling (a selection, so the values are the same)."""
    import torch
    from torchvision.ops import poolers, roi_align

    if scales is None or mapper is None:
        raise ValueError("scales and mapper should not be None")
    rois = poolers._convert_to_roi_format(boxes)
    if len(x_filtered) == 1:
        return roi_align(x_filtered[0], rois, output_size=output_size, spatial_scale=scales[0],
                         sampling_ratio=sampling_ratio)
    levels = mapper(boxes)[:, None, None, None]
    result = None
    for level, (features, scale) in enumerate(zip(x_filtered, scales)):
        pooled = roi_align(features, rois, output_size=output_size, spatial_scale=scale,
                           sampling_ratio=sampling_ratio)
        result = pooled if result is None else torch.where(levels == level, pooled, result)
    return result
