"""The check against PyTorch: does what the device computed match the host's reference?

A deploy passes when the relative error, the largest absolute difference over the largest
magnitude in PyTorch's outputs, is at most `RTOL` (`--rtol`). Relative, because an absolute
tolerance passes any device on a model whose outputs are near zero: MobileNetV2 with dead seeded
weights once "matched" at 2.9e-15 whatever ran. fp32 builds land near 1e-6 (float rounding in
another summation order), so 1e-4 leaves room for tuned kernels and still fails a device that
computes something else. Beside it the check reports the absolute difference, the reference's
magnitude (so a reader sees what was compared), the cosine similarity, and what fits the model's
family: top-1/top-5 agreement for a classifier's logits; for a segmenter (first output N x C x H x
W), the share of pixels whose class (argmax over C) agrees, which must be at least
`PIXEL_AGREEMENT`, since a relative error on logits can hide a few flipped classes near ties; for
a detector, its detections matched one to one (`hostkit.run.detections`), which replaces the
relative error, since the device's count of detections may differ from PyTorch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hostkit.defaults import CHECK_RTOL
from hostkit.models.host_steps import MADE_ON_HOST
from hostkit.run.detections import DetectionCheck, compare_detections

if TYPE_CHECKING:
    from hostkit.models.host_steps import HostSteps

__all__ = ["RTOL", "PIXEL_AGREEMENT", "Check", "compare_outputs"]

RTOL = CHECK_RTOL
PIXEL_AGREEMENT = 0.999


@dataclass(frozen=True)
class Check:
    max_abs_diff: float
    ref_max: float  # the largest |value| in PyTorch's outputs
    rel_err: float  # max_abs_diff / ref_max
    cosine: float | None
    top1_match: bool | None
    top5_match: bool | None
    problem: str | None = None  # why the outputs cannot be compared value by value
    family: str = "classification"
    top3_match: bool | None = None  # the label set int8 checks compare (top-3, as is customary)
    pixels: int | None = None  # segmentation: pixels compared
    pixel_agreement: float | None = None  # segmentation: share of pixels with the same class
    detection: DetectionCheck | None = None  # detection: detections matched one to one

    def passed(self, rtol: float = RTOL) -> bool:
        if self.detection is not None:
            return self.problem is None and self.detection.problem() is None
        if self.pixel_agreement is not None and self.pixel_agreement < PIXEL_AGREEMENT:
            return False
        return self.problem is None and self.rel_err <= rtol

    def details(self) -> dict[str, object]:
        """What was compared, for the summary and `--json` (`check`)."""
        out: dict[str, object] = {"family": self.family, "outputs_ref_max": self.ref_max}
        if self.detection is not None:
            out.update(self.detection.details())
        elif self.family == "segmentation":
            out.update(pixels=self.pixels, pixel_agreement=self.pixel_agreement)
        else:
            out.update(top1=self.top1_match, top3=self.top3_match, top5=self.top5_match)
        return out

    def reason(self, rtol: float = RTOL) -> str:
        """One line saying why the check failed."""
        if self.problem is not None:
            return self.problem
        if self.detection is not None and self.detection.problem() is not None:
            return str(self.detection.problem())
        if self.pixel_agreement is not None and self.pixel_agreement < PIXEL_AGREEMENT:
            return (f"segmentation differs from PyTorch: {self.pixel_agreement:.4%} of "
                    f"{self.pixels} pixels have the same class (at least {PIXEL_AGREEMENT:.1%} "
                    "needed)")
        return (f"outputs differ from PyTorch: relative error {self.rel_err:.3g} > rtol "
                f"{rtol:g} (max abs diff {self.max_abs_diff:.3g}, PyTorch's outputs up to "
                f"{self.ref_max:.3g})")


def compare_outputs(got: list[np.ndarray], want: list[np.ndarray],
                    family: str = "classification", names: list[str] | None = None,
                    steps: HostSteps | None = None) -> Check:
    """Compare every output; a different count or shape is a problem named in words.

    A first output of rank 4 (N x C x H x W, C > 1) is compared as a segmentation map whatever
    `family` says, so a saved program of a segmenter gets the pixel check too; outputs named
    `boxes`, `scores` and `labels` (a detector's, or a saved program of one) are compared as
    detections (`hostkit.run.detections`), whose count may differ, after `steps` finished
    what the device leaves to the host (`LoadedModel.host_steps`).
    """
    if names is not None and {"boxes", "scores", "labels"} <= set(names) \
            and len(want) == len(names):
        # the device returns keypoint heatmaps and no keypoint scores: the host makes them
        got_names = names if len(got) == len(names) else \
            [name for name in names if name not in MADE_ON_HOST]
        if len(got) == len(got_names):
            return _detections(dict(zip(got_names, got)), dict(zip(names, want)), steps)
    if len(got) != len(want):
        return _unmatched(f"the device returned {len(got)} outputs, PyTorch {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return _unmatched(f"output {i} has shape {_dims(g.shape)} on the device, "
                              f"{_dims(w.shape)} in PyTorch")
    flat_got = np.concatenate([g.astype(np.float64).ravel() for g in got])
    flat_want = np.concatenate([w.astype(np.float64).ravel() for w in want])
    if flat_want.size == 0:
        return _unmatched("the model has no output values to compare")
    diff = float(np.max(np.abs(flat_got - flat_want)))
    ref_max = float(np.max(np.abs(flat_want)))
    rel = diff / ref_max if ref_max > 0 else (0.0 if diff == 0 else math.inf)
    if math.isnan(diff):
        rel = math.inf
    norms = float(np.linalg.norm(flat_got) * np.linalg.norm(flat_want))
    cosine = float(flat_got @ flat_want / norms) if norms > 0 else None
    if family == "segmentation" or (want[0].ndim == 4 and want[0].shape[1] > 1):
        classes_got, classes_want = got[0].argmax(axis=1), want[0].argmax(axis=1)
        agreement = float(np.mean(classes_got == classes_want))
        return Check(diff, ref_max, rel, cosine, None, None, family="segmentation",
                     pixels=int(classes_want.size), pixel_agreement=agreement)
    top1, top3, top5 = _topk(got[0], want[0])
    return Check(diff, ref_max, rel, cosine, top1, top5, family=family, top3_match=top3)


def _detections(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
                steps: HostSteps | None) -> Check:
    """A detector's outputs: matched one to one; the summary's differences are the matched
    boxes' (in pixels, against the largest coordinate) and scores'."""
    found = compare_detections(got, want, steps)
    ref_max = float(np.max(np.abs(want["boxes"]))) if want["boxes"].size else 0.0
    diff = max(found.max_box_px, found.max_score_diff)
    rel = diff / ref_max if ref_max > 0 and math.isfinite(diff) else math.inf
    return Check(diff, ref_max, rel, None, None, None, family="detection", detection=found)


def _topk(got: np.ndarray, want: np.ndarray) -> tuple[bool | None, bool | None, bool | None]:
    """Top-1, top-3 and top-5 agreement of the first output, as one row of logits per sample."""
    if got.ndim == 0 or got.size == 0:
        return None, None, None
    first_got, first_want = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
    if first_got.shape[-1] < 2:
        return None, None, None
    top1 = bool(np.array_equal(first_got.argmax(-1), first_want.argmax(-1)))

    def same_set(k: int) -> bool:
        k = min(k, first_got.shape[-1])
        a = np.sort(np.argsort(-first_got, axis=-1)[:, :k], axis=-1)
        b = np.sort(np.argsort(-first_want, axis=-1)[:, :k], axis=-1)
        return bool(np.array_equal(a, b))

    return top1, same_set(3), same_set(5)


def _unmatched(problem: str) -> Check:
    return Check(math.inf, math.nan, math.inf, None, False, False, problem)


def _dims(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
