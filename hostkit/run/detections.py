"""The check of a detector: the device's detections against PyTorch's, one to one.

Detections are matched by label and box overlap: every pair with the same label and an IoU of at
least `MATCH_IOU` is a candidate, and pairs are taken greedily by decreasing IoU, each detection
at most once. A box of zero area (RetinaNet clips boxes to the image and keeps those left zero
wide) has no IoU: it pairs with a same-label box whose corners are within `DEGENERATE_PX`. Order
is not compared (two boxes with equal scores may come out of NMS in either order), the count is:
a detection on one side without a partner on the other is unmatched.

A check passes when at least `MIN_DETECTIONS` detections were compared (two empty lists, or two
short ones, prove nothing), every detection is matched, the matched boxes' corners differ by at
most `BOX_PX` pixels and their scores by at most `SCORE_DIFF`, and, for instance segmentation,
every matched pair of masks (thresholded at 0.5, as torchvision's users do) overlaps with an IoU
of at least `MASK_IOU`. fp32 builds land inside these (measured: SSDlite boxes within 0.01 px
and scores 4e-5, Mask R-CNN's 0.05 px and 2.5e-4, float sums in another order through 50
layers); a device that computes something else moves boxes by pixels and scores in the second
decimal, and loses matches. Top-k and NMS decide near ties by float32 rounding, PyTorch's or the
device's; when PyTorch's disagrees, deploy compares with the model evaluated in float64
(`LoadedModel.exact_reference`), the answer both round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["DetectionCheck", "compare_detections", "MIN_DETECTIONS", "MATCH_IOU", "BOX_PX",
           "SCORE_DIFF", "MASK_IOU", "DEGENERATE_PX"]

MIN_DETECTIONS = 10
MATCH_IOU = 0.5
BOX_PX = 0.25
SCORE_DIFF = 1e-3
MASK_IOU = 0.99
DEGENERATE_PX = 1.0  # a zero-area box's partner: every corner within this many pixels


@dataclass(frozen=True)
class DetectionCheck:
    detections: int  # PyTorch's detections
    device_detections: int
    matched: int
    max_box_px: float  # largest box-corner difference among matched pairs, in pixels
    max_score_diff: float
    min_mask_iou: float | None  # instance segmentation: the worst matched pair of masks
    masks: int | None = None

    @property
    def unmatched(self) -> int:
        return self.detections - self.matched

    @property
    def device_unmatched(self) -> int:
        return self.device_detections - self.matched

    def problem(self) -> str | None:
        """Why the detections disagree, in one line; None when they agree."""
        if self.detections < MIN_DETECTIONS:
            return (f"only {self.detections} detections to compare (at least {MIN_DETECTIONS} "
                    "needed: give an input with more objects, or a lower score threshold)")
        if self.unmatched or self.device_unmatched:
            return (f"detections differ from PyTorch: {self.matched} of {self.detections} "
                    f"matched by label and IoU >= {MATCH_IOU}, {self.device_unmatched} of the "
                    f"device's {self.device_detections} without a partner")
        if not self.max_box_px <= BOX_PX:
            return (f"boxes differ from PyTorch by up to {self.max_box_px:.3g} px "
                    f"(at most {BOX_PX} allowed)")
        if not self.max_score_diff <= SCORE_DIFF:
            return (f"scores differ from PyTorch by up to {self.max_score_diff:.3g} "
                    f"(at most {SCORE_DIFF} allowed)")
        if self.min_mask_iou is not None and not self.min_mask_iou >= MASK_IOU:
            return (f"masks differ from PyTorch: a matched pair overlaps with IoU "
                    f"{self.min_mask_iou:.4f} (at least {MASK_IOU} needed)")
        return None

    def details(self) -> dict[str, object]:
        out: dict[str, object] = {
            "detections": self.detections, "device_detections": self.device_detections,
            "matched": self.matched, "unmatched": self.unmatched,
            "device_unmatched": self.device_unmatched,
            "max_box_px": _finite(self.max_box_px), "max_score_diff": _finite(self.max_score_diff)}
        if self.min_mask_iou is not None or self.masks is not None:
            out.update(masks=self.masks, min_mask_iou=self.min_mask_iou)
        return out


def compare_detections(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
                       paste: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                       ) -> DetectionCheck:
    """Match the device's detections (`boxes`, `scores`, `labels`, optional `masks`) to
    PyTorch's, by output name. Device masks of another size than PyTorch's (28 x 28 per
    detection, where PyTorch pasted them into the image) are pasted by `paste` at the matched
    PyTorch box, so the masks are compared on their own and the boxes on theirs (pasting rounds
    a box to whole pixels, and a box 0.01 px away may round the other way)."""
    boxes_got, boxes_want = got["boxes"].reshape(-1, 4), want["boxes"].reshape(-1, 4)
    labels_got, labels_want = got["labels"].ravel(), want["labels"].ravel()
    pairs = _match(boxes_want, labels_want, boxes_got, labels_got)
    masks_got = got.get("masks")
    if masks_got is not None and "masks" in want and paste is not None and pairs \
            and masks_got.shape[1:] != want["masks"].shape[1:]:
        rows = [j for _, j in pairs]
        pasted = paste(masks_got[rows], boxes_want[[i for i, _ in pairs]])
        masks_got = np.zeros((len(boxes_got), *pasted.shape[1:]), pasted.dtype)
        masks_got[rows] = pasted
        got = {**got, "masks": masks_got}
    box_px = score_diff = 0.0
    mask_iou: float | None = None
    for i, j in pairs:
        box_px = max(box_px, float(np.max(np.abs(
            boxes_want[i].astype(np.float64) - boxes_got[j]))))
        score_diff = max(score_diff, abs(float(want["scores"].ravel()[i])
                                         - float(got["scores"].ravel()[j])))
        if "masks" in want and "masks" in got and got["masks"].shape[1:] == \
                want["masks"].shape[1:]:
            iou = _mask_iou(want["masks"][i] > 0.5, got["masks"][j] > 0.5)
            mask_iou = iou if mask_iou is None else min(mask_iou, iou)
    if not pairs:
        box_px = score_diff = math.inf
    masks = len(pairs) if mask_iou is not None else None
    if "masks" in want and mask_iou is None:
        mask_iou = 0.0  # masks expected, none comparable: fail rather than skip
    return DetectionCheck(detections=len(boxes_want), device_detections=len(boxes_got),
                          matched=len(pairs), max_box_px=box_px, max_score_diff=score_diff,
                          min_mask_iou=mask_iou, masks=masks)


def _match(boxes_a: np.ndarray, labels_a: np.ndarray, boxes_b: np.ndarray,
           labels_b: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one pairs (i in a, j in b) with the same label and IoU >= MATCH_IOU, greedily by
    decreasing IoU."""
    if not len(boxes_a) or not len(boxes_b):
        return []
    iou = _box_iou(boxes_a.astype(np.float64), boxes_b.astype(np.float64))
    iou[labels_a[:, None] != labels_b[None, :]] = -1.0
    candidates = np.argwhere(iou >= MATCH_IOU)
    order = np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for i, j in candidates[order]:
        if i not in used_a and j not in used_b:
            used_a.add(int(i))
            used_b.add(int(j))
            pairs.append((int(i), int(j)))
    return pairs


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair; a pair with a box of zero area (RetinaNet clips boxes to the image
    edge, leaving some zero wide) has none, so it counts as overlapping fully when the corners
    are within `DEGENERATE_PX` and not at all otherwise."""
    def area(x: np.ndarray) -> np.ndarray:
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_a, area_b = area(a), area(b)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / np.where(union > 0, union, 1)
    degenerate = (area_a[:, None] == 0) | (area_b[None, :] == 0)
    near = np.max(np.abs(a[:, None] - b[None, :]), axis=-1) <= DEGENERATE_PX
    return np.where(degenerate, near.astype(np.float64), iou)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
