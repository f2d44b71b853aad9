"""Keypoint R-CNN's check: the device returns each detection's heatmaps, the host decodes them
with torchvision's `heatmaps_to_keypoints` at the matched PyTorch box, and the keypoints are
compared pair by pair (distance, score), a near tie between two maxima told apart from a
keypoint in the wrong place. The heatmaps here are made by hand, and a small Keypoint R-CNN is
exported and decoded beside the original model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

from hostkit.models.host_steps import HostSteps
from hostkit.run.check import compare_outputs
from hostkit.run.detections import KEYPOINT_SCORE_DIFF

NAMES = ["boxes", "labels", "scores", "keypoints", "keypoints_scores"]
STEPS = HostSteps(image_hw=(256, 256))


def _detections(n: int, size: float | None = None, seed: int = 0) -> list[np.ndarray]:
    """The device's form: boxes, labels, scores and 17 heatmaps (56x56 logits) per detection.
    Boxes of `size` px square resize the heatmaps to themselves, value for value."""
    rng = np.random.default_rng(seed)
    corner = rng.integers(0, 150, (n, 2)).astype(np.float64)
    extent = np.full((n, 2), size) if size else rng.uniform(20, 90, (n, 2))
    boxes = np.concatenate([corner, corner + extent], 1).astype(np.float32)
    heatmaps = rng.standard_normal((n, 17, 56, 56)).astype(np.float32)
    return [boxes, rng.integers(1, 3, n), rng.uniform(0, 1, n).astype(np.float32), heatmaps]


def _torchvision(device: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch's form: the same detections decoded by torchvision itself."""
    keypoints, scores = heatmaps_to_keypoints(torch.from_numpy(device[3]),
                                              torch.from_numpy(device[0]))
    return [*device[:3], keypoints.numpy(), scores.numpy()]


def test_heatmaps_are_decoded_on_the_host_and_compared_in_any_order() -> None:
    device = _detections(12)
    want = _torchvision(device)
    order = np.random.default_rng(1).permutation(12)
    got = [x[order] for x in device]
    got[0] = got[0] + np.float32(0.01)  # decoded at PyTorch's box all the same
    check = compare_outputs(got, want, "detection", NAMES, steps=STEPS)
    assert check.passed(), check.reason()
    details = check.details()
    assert details["matched"] == 12 and details["keypoints"] == 12 * 17
    assert details["max_keypoint_px"] == 0 and details["max_keypoint_score_diff"] == 0
    assert details["keypoint_ties"] == 0


def test_a_keypoint_elsewhere_or_scored_otherwise_fails() -> None:
    device = _detections(12)
    want = _torchvision(device)
    moved = [x.copy() for x in device]
    detection, keypoint = 4, 9
    peak = np.unravel_index(np.argmax(moved[3][detection, keypoint]), (56, 56))
    row, column = (peak[0] + 28) % 56, (peak[1] + 28) % 56
    moved[3][detection, keypoint][max(row - 2, 0):row + 3, max(column - 2, 0):column + 3] += 10.0
    check = compare_outputs(moved, want, "detection", NAMES, steps=STEPS)
    assert not check.passed()
    assert check.reason().startswith("keypoints differ from PyTorch by up to")
    assert check.details()["max_keypoint_px"] > 5

    scaled = [x.copy() for x in device]
    scaled[3][detection] *= 1 + 4 * KEYPOINT_SCORE_DIFF  # same places, higher scores
    check = compare_outputs(scaled, want, "detection", NAMES, steps=STEPS)
    assert check.details()["max_keypoint_px"] == 0
    assert check.reason().startswith("keypoint scores differ from PyTorch by up to")

    undecodable = device[:3] + [device[3][:, :, 0, :3]]  # keypoints' shape, no scores
    check = compare_outputs(undecodable, want, "detection", NAMES, steps=STEPS)
    assert not check.passed() and check.details()["max_keypoint_px"] is None


def _two_peaks(device: list[np.ndarray], lead: float) -> list[np.ndarray]:
    """Detection 0's keypoint 0 with two maxima 30 px apart: PyTorch's at (10, 10), the
    device's at (40, 40) higher by `lead` (56 px boxes: a resized map is the heatmap itself)."""
    changed = [x.copy() for x in device]
    base = float(device[3][0, 0].max()) + 1.0
    changed[3][0, 0][10, 10] = base
    changed[3][0, 0][40, 40] = base + lead
    return changed


def test_a_near_tie_between_two_maxima_is_told_from_a_wrong_place() -> None:
    """Float rounding may order two near-equal maxima either way: the device's keypoint at the
    other one passes, counted as a near tie, when its map at PyTorch's place is within
    KEYPOINT_SCORE_DIFF of its maximum, and fails when it is clearly higher elsewhere."""
    device = _detections(12, size=56.0)
    want = _torchvision(_two_peaks(device, -KEYPOINT_SCORE_DIFF / 4))  # PyTorch: (10, 10)
    tie = _two_peaks(device, KEYPOINT_SCORE_DIFF / 4)  # the device: (40, 40), just higher
    check = compare_outputs(tie, want, "detection", NAMES, steps=STEPS)
    assert check.passed(), check.reason()
    assert check.details()["keypoint_ties"] == 1 and check.details()["max_keypoint_px"] == 0

    wrong = _two_peaks(device, 4 * KEYPOINT_SCORE_DIFF)
    wrong[3][0, 0][10, 10] -= 3 * KEYPOINT_SCORE_DIFF  # and lower at PyTorch's place
    check = compare_outputs(wrong, want, "detection", NAMES, steps=STEPS)
    assert check.reason().startswith("keypoints differ from PyTorch by up to 42.4 px")
    assert check.details()["keypoint_ties"] == 0


def test_device_outputs_without_keypoint_scores_are_named_as_the_models() -> None:
    """The device returns four outputs (no keypoint scores); any other count is a problem."""
    device = _detections(12)
    want = _torchvision(device)
    check = compare_outputs(device[:2], want, "detection", NAMES, steps=STEPS)
    assert check.reason() == "the device returned 2 outputs, PyTorch 5"


def _tiny_keypoint_rcnn() -> Any:
    """torchvision's Keypoint R-CNN with a one-convolution backbone and a small keypoint head:
    the same detection and keypoint code as keypointrcnn_resnet50_fpn, in seconds."""
    from torch import nn
    from torchvision.models.detection import KeypointRCNN
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    return KeypointRCNN(
        backbone, num_classes=3, min_size=96, max_size=96,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        keypoint_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
        keypoint_head=KeypointRCNNHeads(8, (16, 16)),
        keypoint_predictor=KeypointRCNNPredictor(16, 17), box_score_thresh=0.0,
        rpn_post_nms_top_n_test=100, box_detections_per_img=30).eval()


def test_the_exported_program_returns_heatmaps_the_host_decodes_as_torchvision() -> None:
    """Exported through `exportable()`, Keypoint R-CNN returns four outputs, its keypoints as
    N x 17 x 56 x 56 heatmaps; decoded on the host they are the original model's keypoints."""
    from hostkit.models import LoadedModel

    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96), dtype=np.float32)
    model = LoadedModel(name="tiny-keypoint-rcnn", program=None, inputs=[x], identity="tiny",
                        _module=_tiny_keypoint_rcnn(), family="detection")
    reference = model.reference()
    assert model.output_names == NAMES
    with torch.no_grad():
        (exported,) = model.exported().module()(torch.from_numpy(x))
    assert list(exported) == NAMES[:4] and exported["keypoints"].shape[1:] == (17, 56, 56)
    device = [value.numpy() for value in exported.values()]
    check = compare_outputs(device, reference, "detection", model.output_names,
                            steps=model.host_steps())
    assert check.passed(), check.reason()
    details = check.details()
    assert details["matched"] == 30 and details["keypoints"] == 30 * 17
    assert details["max_keypoint_px"] == 0 and details["max_keypoint_score_diff"] == 0
