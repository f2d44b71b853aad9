"""Detectors: torchvision's detection and instance-segmentation models, built to be exported.

Three things stand between torchvision's detectors and `torch.export` on torch 2.14, and each is
met while exporting only (`exportable()`), never in the model PyTorch's reference runs:

- `batched_nms` branches on `boxes.numel() == 0` and on the box count (a data-dependent guard at
  torchvision/ops/boxes.py:86); its coordinate-offset path gives the same answer for every count,
  so the export takes that path, and `torchvision::nms` stays one operator (its registered fake
  gives the kept count an unbacked size) for the importer to map onto TVM's NMS;
- Keypoint R-CNN's `heatmaps_to_keypoints` resizes each detection's heatmaps to its own box in
  a Python loop: the exported program returns the per-detection heatmaps, and the host decodes
  them with torchvision's own function (`hostkit.models.keypoints`), before the check;
- Mask R-CNN's `paste_masks_in_image` loops in Python over the detections, pasting each 28x28
  mask into the image: the exported program returns the per-detection 28x28 mask probabilities,
  and `paste_masks` pastes them on the host with torchvision's own function, before the check;
- Faster/Mask R-CNN's multi-scale RoIAlign sizes a tensor by the number of boxes and scatters
  each pyramid level's rows into it: the export pools every box at every level and selects;
- SSD's post-processing loops over its 90 classes (a score filter and a top-k of data-dependent
  size each), and Faster/Mask R-CNN's runs one NMS over every (proposal, class) pair, 90 times
  the proposals, which TVM's NMS (quadratic in its input) cannot finish: the export keeps the
  candidates class by class and calls `edgekit::nms_by_class` (`nms_op`), NMS within each
  class, which PyTorch runs with torchvision's `batched_nms` and TVM with its all-class NMS;
- Mask R-CNN v2's mask head normalises with batch norm over one row per detection, a count
  only NMS knows: `torch.batch_norm` asks first whether its input is empty (a shortcut with the
  same, empty, result), which torch.export cannot answer; the export calls the inference kernel
  the model runs (`_mask_head`);
- the detectors resize their input inside the model (Faster/Mask R-CNN and RetinaNet to an 800
  short side): edgekit builds them with `min_size`/`max_size` at the input's own size, so the
  network sees the input as given (an image file is decoded at its size; SSD keeps its fixed
  320 or 300 square).

Seeded random weights put few boxes above torchvision's score thresholds, and two empty lists
are no check, so a seeded detector is built with a score threshold of 0 (every box NMS keeps, up
to the model's per-image limit). With `--weights` the thresholds are torchvision's. A seeded
R-CNN's box regressors are scaled to the spread of the targets they would learn
(`seeded_regression`), where `hostkit.models.init` leaves every layer at unit spread.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

__all__ = ["DEFAULT_SHAPES", "detector_kwargs", "exportable", "paste_masks", "OUTPUTS",
           "seeded_regression", "TARGET_SPREAD"]

# SSD resizes to its fixed square; the others see the input at its own size.
DEFAULT_SHAPES = {"ssd300_vgg16": (1, 3, 300, 300)}
DEFAULT_SHAPE = (1, 3, 320, 320)
# What a detector returns for one image, in torchvision's order.
OUTPUTS = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")
# The spread of Fast R-CNN's box regression targets (dx, dy, dw, dh) of proposals matched to
# objects, before a box coder's weights, which are chosen to bring them to unit spread: the RoI
# heads' coder (10, 10, 5, 5) does, the RPN's (1, 1, 1, 1) keeps them as they are.
TARGET_SPREAD = (0.1, 0.1, 0.2, 0.2)


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


def seeded_regression(module: Any) -> None:
    """A seeded R-CNN's box regressors at the spread of the targets they would learn
    (`TARGET_SPREAD` times their box coder's weights); other detectors are left as they are.

    `hostkit.models.init` gives every layer outputs of unit spread; for the RPN, whose coder
    weights are 1, that means size deltas of spread 1, exponentiated: proposals up to e^4 times
    their anchors, most of them clipped to the whole image. Then float32's relative error of
    1e-4 at the end of the backbone moves proposals by up to 0.1 px, RoIAlign samples the
    random features elsewhere, and the class scores move by 2e-3 (float32 against float64
    PyTorch, fasterrcnn_resnet50_fpn_v2 at 256x256; 5e-5 for the same proposals), past the
    check's 1e-3, on the device and in PyTorch alike. At the targets' spread, 0.004 px and 1e-4.
    The RoI heads' coder (10, 10, 5, 5) already makes unit spread right for them.
    """
    import torch

    rpn, heads = getattr(module, "rpn", None), getattr(module, "roi_heads", None)
    if rpn is None or heads is None:
        return
    spread = torch.tensor(TARGET_SPREAD)
    with torch.no_grad():
        for layer, coder in ((rpn.head.bbox_pred, rpn.box_coder),
                             (heads.box_predictor.bbox_pred, heads.box_coder)):
            # Outputs are (box, coordinate) pairs, coordinates fastest, in both heads.
            factor = (spread * torch.tensor(coder.weights)).repeat(layer.weight.shape[0] // 4)
            layer.weight.mul_(factor.view(-1, *[1] * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.mul_(factor)


@contextlib.contextmanager
def exportable() -> Iterator[None]:
    """torchvision's detection code made exportable, for the duration of one `torch.export`."""
    from torchvision.models.detection import mask_rcnn, roi_heads, ssd, transform
    from torchvision.ops import boxes, poolers

    from hostkit.models.keypoints import heatmaps_only, keeping_heatmaps

    nms_op()
    saved = (boxes.batched_nms, transform.paste_masks_in_image, poolers._multiscale_roi_align,
             ssd.SSD.postprocess_detections, roi_heads.RoIHeads.postprocess_detections)
    saved_mask_head = mask_rcnn.MaskRCNNHeads.forward
    saved_keypoints = (roi_heads.keypointrcnn_inference,
                       transform.GeneralizedRCNNTransform.postprocess)
    roi_heads.keypointrcnn_inference = heatmaps_only
    transform.GeneralizedRCNNTransform.postprocess = keeping_heatmaps(
        saved_keypoints[1])
    boxes.batched_nms = _batched_nms
    transform.paste_masks_in_image = _unpasted
    poolers._multiscale_roi_align = _multiscale_roi_align
    ssd.SSD.postprocess_detections = _ssd_postprocess
    roi_heads.RoIHeads.postprocess_detections = _roi_postprocess
    mask_rcnn.MaskRCNNHeads.forward = _mask_head
    try:
        yield
    finally:
        (boxes.batched_nms, transform.paste_masks_in_image, poolers._multiscale_roi_align,
         ssd.SSD.postprocess_detections,
         roi_heads.RoIHeads.postprocess_detections) = saved
        mask_rcnn.MaskRCNNHeads.forward = saved_mask_head
        roi_heads.keypointrcnn_inference, transform.GeneralizedRCNNTransform.postprocess = \
            saved_keypoints


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


def _mask_head(self: Any, x: Any) -> Any:
    """torchvision's mask head (convolutions, with batch norm in v2) with the same result, bit
    for bit: its evaluation-mode batch norms call the kernel they run,
    `_native_batch_norm_legit_no_training`, directly. `torch.batch_norm` first asks whether its
    input is empty (a shortcut with the same, empty, result): here the input has a row per
    detection, a count `edgekit::nms_by_class` decides, so torch.export cannot answer
    (`Eq(50176*Min(100, u3), 0)`); the kernel never asks. The exported graph holds that kernel
    either way (`run_decompositions` lowers `batch_norm` to it). v2's box head is not stopped
    there only because torchvision's fake NMS declares its count at least 2."""
    import torch

    for layer in _sequence(self):
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and not layer.training \
                and layer.running_mean is not None:
            x = torch.ops.aten._native_batch_norm_legit_no_training(
                x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                layer.momentum or 0.0, layer.eps)[0]
        else:
            x = layer(x)
    return x


def _sequence(module: Any) -> Iterator[Any]:
    """The layers a Sequential runs, nested Sequentials (Conv2dNormActivation) opened."""
    import torch

    for layer in module:
        if type(layer).forward is torch.nn.Sequential.forward:
            yield from _sequence(layer)
        else:
            yield layer


def _ssd_postprocess(self: Any, head_outputs: dict[str, Any], image_anchors: list[Any],
                     image_shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """SSD's `postprocess_detections` with the same detections, in one pass over the classes
    instead of a Python loop of 90 (each a score filter and a top-k of data-dependent size):
    the top k of the scores above the threshold are those above it among the top k of all, so
    each class takes its top k first and filters after."""
    import torch
    from torchvision.ops import boxes as box_ops

    scores_all = torch.nn.functional.softmax(head_outputs["cls_logits"], dim=-1)
    detections = []
    for regression, scores, anchors, image_shape in zip(head_outputs["bbox_regression"],
                                                       scores_all, image_anchors, image_shapes):
        boxes = box_ops.clip_boxes_to_image(self.box_coder.decode_single(regression, anchors),
                                            image_shape)
        per_class = scores[:, 1:].t()
        k = min(self.topk_candidates, per_class.shape[1])
        top_scores, top_anchors = per_class.topk(k, dim=1)
        detections.append(_nms_by_class(boxes[top_anchors], top_scores,
                                        top_scores > self.score_thresh, self.nms_thresh,
                                        self.detections_per_img))
    return detections


def _roi_postprocess(self: Any, class_logits: Any, box_regression: Any, proposals: list[Any],
                     image_shapes: list[tuple[int, int]]) -> tuple[list[Any], list[Any], list[Any]]:
    """Faster/Mask R-CNN's `postprocess_detections` with the same detections, class by class
    where torchvision flattens the (proposal, class) pairs into one list: NMS then runs per
    class (torchvision runs it per class too, above 4000 boxes), not once over 90 times the
    proposals."""
    import torch
    from torchvision.ops import boxes as box_ops

    counts = [p.shape[0] for p in proposals]
    decoded = self.box_coder.decode(box_regression, proposals).split(counts, 0)
    probabilities = torch.nn.functional.softmax(class_logits, -1).split(counts, 0)
    found: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    for boxes, scores, image_shape in zip(decoded, probabilities, image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)[:, 1:].transpose(0, 1)
        scores = scores[:, 1:].t()
        valid = ((scores > self.score_thresh) & (boxes[..., 2] - boxes[..., 0] >= 1e-2)
                 & (boxes[..., 3] - boxes[..., 1] >= 1e-2))
        kept = _nms_by_class(boxes, scores, valid, self.nms_thresh, self.detections_per_img)
        for out, key in zip(found, ("boxes", "scores", "labels")):
            out.append(kept[key])
    return found


def _nms_by_class(boxes: Any, scores: Any, valid: Any, iou_threshold: float,
                  limit: int) -> dict[str, Any]:
    """Detections from per-class candidates (boxes C x N x 4, scores and valid C x N, class c
    being label c + 1): NMS within each class, the kept ones by decreasing score, at most
    `limit`, as torchvision's `batched_nms` and `keep[:limit]` give them."""

    kept = nms_op()(boxes, scores, valid, iou_threshold)[:limit]
    label, index = kept[:, 0], kept[:, 1]
    return {"boxes": boxes[label, index], "scores": scores[label, index], "labels": label + 1}


def nms_op() -> Any:
    """`edgekit::nms_by_class`, NMS within each class of C x N candidates, registered with torch
    on first use (`devicekit.torch_ops`: the device's PyTorch baseline loads the same program)."""
    from devicekit.torch_ops import nms_by_class_op

    return nms_by_class_op()
