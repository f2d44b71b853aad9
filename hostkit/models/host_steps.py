"""What a detector's exported program leaves to the host, done there before the check.

Two parts of torchvision's detection post-processing loop over the detections in Python, shaping
a tensor by each box, and are left out of the exported program (`hostkit.models.detection`):
Mask R-CNN's pasting of each detection's 28x28 mask into the image, and Keypoint R-CNN's
decoding of each detection's 56x56 heatmaps into keypoints. The device returns the per-detection
masks and heatmaps; the host finishes them with torchvision's own functions, so the device's
detections are compared in the form the model returns them. The check finishes them at the
matched PyTorch box (`hostkit.run.detections`), so masks and keypoints are judged on their own
and the boxes on theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hostkit.models.detection import paste_masks
from hostkit.models.keypoints import decode, values_at

__all__ = ["HostSteps", "MADE_ON_HOST"]

# Outputs the device does not return at all: the host makes them from others.
MADE_ON_HOST = ("keypoints_scores",)


@dataclass(frozen=True)
class HostSteps:
    """The host's part of one detector's post-processing; pasting needs the image's size."""

    image_hw: tuple[int, int]

    def finish(self, outputs: dict[str, np.ndarray], boxes: np.ndarray) -> dict[str, np.ndarray]:
        """Some detections' outputs (rows of `boxes`), in the model's form: masks of another
        size than the image's pasted into it, keypoint heatmaps (rank 4) decoded into
        `keypoints` and `keypoints_scores`; outputs already in that form are kept as they are."""
        done = dict(outputs)
        masks = outputs.get("masks")
        if masks is not None and tuple(masks.shape[-2:]) != self.image_hw:
            done["masks"] = paste_masks(masks, boxes, self.image_hw)
        heatmaps = outputs.get("keypoints")
        if heatmaps is not None and heatmaps.ndim == 4:
            done["keypoints"], done["keypoints_scores"] = decode(heatmaps, boxes)
        return done

    def keypoint_values(self, heatmaps: np.ndarray, boxes: np.ndarray,
                        places: np.ndarray) -> np.ndarray:
        """The heatmaps, resized as decoding resizes them at `boxes`, read at other keypoints
        (`places`, N x K x 2 or 3): how high the device's map is where PyTorch found the
        maximum, to tell a near tie from a keypoint in the wrong place."""
        return values_at(heatmaps, boxes, places)
