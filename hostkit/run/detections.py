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
of at least `MASK_IOU`, and, for keypoints, every matched pair's keypoints are within
`KEYPOINT_PX` of each other, their scores within `KEYPOINT_SCORE_DIFF`. Decoding places a
keypoint at the maximum of a heatmap resized to the box: at the same box, the same maximum
gives the same place to the last bit, and another one is a whole resized-map pixel away (at
least half an image pixel); where two maxima are within `KEYPOINT_SCORE_DIFF` the device's
rounding may pick either, and the pair is a near tie, counted apart, when the device's map at
PyTorch's place is within `KEYPOINT_SCORE_DIFF` of its maximum. fp32 builds land inside these
(measured: SSDlite boxes within 0.01 px and scores 4e-5, Mask R-CNN's 0.05 px and 2.5e-4, float
sums in another order through 50 layers); a device that computes something else moves boxes by
pixels and scores in the second decimal, and loses matches. Top-k and NMS decide near ties by float32 rounding, PyTorch's or the
device's; when PyTorch's disagrees, deploy compares with the model evaluated in float64
(`LoadedModel.exact_reference`), the answer both round.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hostkit.models.host_steps import HostSteps

__all__ = ["DetectionCheck", "compare_detections", "MIN_DETECTIONS", "MATCH_IOU", "BOX_PX",
           "SCORE_DIFF", "MASK_IOU", "DEGENERATE_PX", "KEYPOINT_PX", "KEYPOINT_SCORE_DIFF"]

MIN_DETECTIONS = 10
MATCH_IOU = 0.5
BOX_PX = 0.25
SCORE_DIFF = 1e-3
MASK_IOU = 0.99
DEGENERATE_PX = 1.0  # a zero-area box's partner: every corner within this many pixels
KEYPOINT_PX = 0.25
# Keypoint scores are heatmap logits (seeded: up to about 4), computed from features pooled at the
# device's own boxes, so they move with the boxes. keypointrcnn_resnet50_fpn, fp32: 9.2e-3 apart
# with boxes 0.1 px apart (256x256, before seeded R-CNNs regressed at the targets' spread), 1.5e-3
# at most over 1,700 keypoints (median 4.8e-5) with boxes 0.0095 px apart (320x320, since); its one
# near tie's two maxima were 1.5e-4 apart on the device's map.
KEYPOINT_SCORE_DIFF = 5e-3
# Outputs with one row per detection, compared pair by pair.
PER_DETECTION = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")


@dataclass(frozen=True)
class DetectionCheck:
    detections: int  # PyTorch's detections
    device_detections: int
    matched: int
    max_box_px: float  # largest box-corner difference among matched pairs, in pixels
    max_score_diff: float
    min_mask_iou: float | None  # instance segmentation: the worst matched pair of masks
    masks: int | None = None
    keypoints: int | None = None  # keypoints compared: matched pairs x keypoints per detection
    max_keypoint_px: float | None = None  # the farthest apart, near ties left out
    max_keypoint_score_diff: float | None = None
    keypoint_ties: int | None = None  # keypoints placed at another of two near-equal maxima

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
        if self.max_keypoint_px is not None and not self.max_keypoint_px <= KEYPOINT_PX:
            return (f"keypoints differ from PyTorch by up to {self.max_keypoint_px:.3g} px, "
                    f"not at a near tie (at most {KEYPOINT_PX} allowed)")
        if self.max_keypoint_score_diff is not None \
                and not self.max_keypoint_score_diff <= KEYPOINT_SCORE_DIFF:
            return (f"keypoint scores differ from PyTorch by up to "
                    f"{self.max_keypoint_score_diff:.3g} (at most {KEYPOINT_SCORE_DIFF} allowed)")
        return None

    def details(self) -> dict[str, object]:
        out: dict[str, object] = {
            "detections": self.detections, "device_detections": self.device_detections,
            "matched": self.matched, "unmatched": self.unmatched,
            "device_unmatched": self.device_unmatched,
            "max_box_px": _finite(self.max_box_px), "max_score_diff": _finite(self.max_score_diff)}
        if self.min_mask_iou is not None or self.masks is not None:
            out.update(masks=self.masks, min_mask_iou=self.min_mask_iou)
        if self.max_keypoint_px is not None:
            out.update(keypoints=self.keypoints,
                       max_keypoint_px=_finite(self.max_keypoint_px),
                       max_keypoint_score_diff=self.max_keypoint_score_diff,
                       keypoint_ties=self.keypoint_ties)
        return out


def compare_detections(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
                       steps: HostSteps | None = None) -> DetectionCheck:
    """Match the device's detections (`boxes`, `scores`, `labels`, optional `masks`,
    `keypoints`) to PyTorch's, by output name. What the device leaves to the host (28x28
    masks, keypoint heatmaps) is finished by `steps` at the matched PyTorch box, so masks and
    keypoints are compared on their own and the boxes on theirs (pasting rounds a box to whole
    pixels and decoding rounds its size up, and a box 0.01 px away may round the other way)."""
    got, want = _rows(got), _rows(want)
    boxes_got, boxes_want = got["boxes"], want["boxes"]
    pairs = _match(boxes_want, want["labels"], boxes_got, got["labels"])
    common = dict(detections=len(boxes_want), device_detections=len(boxes_got),
                  matched=len(pairs))
    if not pairs:
        return DetectionCheck(**common, max_box_px=math.inf, max_score_diff=math.inf,
                              min_mask_iou=0.0 if "masks" in want else None,
                              max_keypoint_px=math.inf if "keypoints" in want else None)
    rows_want, rows_got = [i for i, _ in pairs], [j for _, j in pairs]
    at = boxes_want[rows_want]
    a = {k: v[rows_want] for k, v in want.items()}
    b = {k: v[rows_got] for k, v in got.items()}
    heatmaps = b.get("keypoints") if b.get("keypoints", np.zeros(0)).ndim == 4 else None
    if steps is not None:
        a, b = steps.finish(a, at), steps.finish(b, at)
    box_px = float(np.max(np.abs(a["boxes"].astype(np.float64) - b["boxes"])))
    score_diff = float(np.max(np.abs(a["scores"].astype(np.float64) - b["scores"])))
    mask_iou, masks = None, None
    if "masks" in want:
        comparable = "masks" in b and a["masks"].shape == b["masks"].shape
        mask_iou = min(_mask_iou(x > 0.5, y > 0.5) for x, y in zip(a["masks"], b["masks"])) \
            if comparable else 0.0  # masks expected, none comparable: fail rather than skip
        masks = len(pairs) if comparable else None
    found = DetectionCheck(**common, max_box_px=box_px, max_score_diff=score_diff,
                           min_mask_iou=mask_iou, masks=masks)
    if "keypoints" in want:
        found = _compare_keypoints(found, a, b, at, heatmaps, steps)
    return found


def _compare_keypoints(found: DetectionCheck, a: dict[str, np.ndarray],
                       b: dict[str, np.ndarray], at: np.ndarray, heatmaps: np.ndarray | None,
                       steps: HostSteps | None) -> DetectionCheck:
    """Matched pairs' keypoints (`a` PyTorch's, `b` the device's, decoded at the boxes `at`):
    the farthest apart and the largest score difference. Decoding takes each resized heatmap's
    maximum, and two near-equal maxima may be ordered either way by float rounding: a keypoint
    more than `KEYPOINT_PX` away is a near tie, counted apart from the distances, when the
    device's own map is within `KEYPOINT_SCORE_DIFF` of its maximum at PyTorch's place."""
    if "keypoints" not in b or "keypoints_scores" not in b \
            or a["keypoints"].shape != b["keypoints"].shape:
        return dataclasses.replace(found, max_keypoint_px=math.inf)  # none comparable: fail
    distance = np.hypot(*(a["keypoints"][..., :2].astype(np.float64)
                          - b["keypoints"][..., :2]).transpose(2, 0, 1))
    scores_a = a["keypoints_scores"].astype(np.float64)
    scores_b = b["keypoints_scores"].astype(np.float64)
    far = distance > KEYPOINT_PX
    ties = np.zeros_like(far)
    if far.any() and heatmaps is not None and steps is not None:
        there = steps.keypoint_values(heatmaps, at, a["keypoints"]).astype(np.float64)
        ties = far & (scores_b - there <= KEYPOINT_SCORE_DIFF)
    return dataclasses.replace(
        found, keypoints=int(distance.size), keypoint_ties=int(ties.sum()),
        max_keypoint_px=float(np.max(distance, where=~ties, initial=0.0)),
        max_keypoint_score_diff=float(np.max(np.abs(scores_a - scores_b))))


def _rows(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-detection outputs, one row per detection (a saved program may keep a batch
    axis of one)."""
    rows = {k: v for k, v in outputs.items() if k in PER_DETECTION}
    rows.update(boxes=rows["boxes"].reshape(-1, 4), scores=rows["scores"].ravel(),
                labels=rows["labels"].ravel())
    return rows


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
