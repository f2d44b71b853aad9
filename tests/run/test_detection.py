"""Detectors through the Relax VM, checked detection by detection against PyTorch.

The matching itself is tested on hand-made detections (a moved box, a dropped detection, too few
to compare each fail); the detectors run end to end on a real daemon, their number of
detections coming out of the device's VM as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploying import daemon_inventory, deploy_json

from hostkit.cli import main
from hostkit.models import LoadedModel
from hostkit.run.check import RTOL, compare_outputs
from hostkit.run.deploy import _detections_exactly
from hostkit.run.detections import BOX_PX, DEGENERATE_PX, MIN_DETECTIONS, SCORE_DIFF

NAMES = ["boxes", "scores", "labels"]


def _detections(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 60, (n, 2))], 1).astype(np.float32)
    return [boxes, rng.uniform(0, 1, n).astype(np.float32), rng.integers(1, 91, n)]


def test_detections_are_matched_one_to_one_in_any_order() -> None:
    want = _detections(30)
    order = np.random.default_rng(1).permutation(30)
    got = [x[order] for x in want]
    got[0] = got[0] + np.float32(0.01)
    check = compare_outputs(got, want, "detection", NAMES)
    assert check.passed(), check.reason()
    details = check.details()
    assert (details["detections"], details["matched"], details["unmatched"]) == (30, 30, 0)
    assert 0.009 < details["max_box_px"] < 0.011 and details["max_score_diff"] == 0


def test_zero_area_boxes_are_matched_by_their_corners() -> None:
    """RetinaNet keeps boxes clipped to zero width at the image edge: they have no IoU, so
    they pair by corners (a device's 1e-5 px away matches, one moved by pixels does not)."""
    want = _detections(30)
    want[0][:5, 0] = want[0][:5, 2] = 256.0
    got = [x.copy() for x in want]
    got[0][:5, 1] += np.float32(1e-4)
    check = compare_outputs(got, want, "detection", NAMES)
    assert check.passed(), check.reason()
    assert check.details()["matched"] == 30
    got[0][0, 1] += DEGENERATE_PX + 1.0
    check = compare_outputs(got, want, "detection", NAMES)
    assert check.reason().startswith("detections differ from PyTorch: 29 of 30 matched")


def test_detection_check_fails_when_the_device_differs() -> None:
    want = _detections(30)
    moved = [x.copy() for x in want]
    moved[0][3] += 2 * BOX_PX + 1.0
    check = compare_outputs(moved, want, "detection", NAMES)
    assert not check.passed() and check.reason().startswith("boxes differ from PyTorch by up to")

    dropped = [x[1:] for x in want]
    check = compare_outputs(dropped, want, "detection", NAMES)
    assert not check.passed()
    assert check.reason().startswith("detections differ from PyTorch: 29 of 30 matched")

    relabelled = [x.copy() for x in want]
    relabelled[2][5] = relabelled[2][5] % 90 + 1
    assert not compare_outputs(relabelled, want, "detection", NAMES).passed()

    few = _detections(MIN_DETECTIONS - 1)
    check = compare_outputs(few, few, "detection", NAMES)
    assert not check.passed() and check.reason().startswith(
        f"only {MIN_DETECTIONS - 1} detections to compare")
    empty = [x[:0] for x in want]
    assert not compare_outputs(empty, empty, "detection", NAMES).passed()


def _near_tie() -> Any:
    """A detector whose float32 rounding keeps another box than exact arithmetic: box A's score
    is `(0.5 + 2**24) - 2**24`, 0.5 exactly and 0 in float32 (2**24 + 0.5 rounds to 2**24),
    box B, 1 px beside it, scores 0.25, and NMS keeps A or B; ten clear boxes elsewhere."""
    import torch
    from torchvision.ops import nms

    class NearTie(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            big = torch.tensor(2.0**24, dtype=x.dtype)
            clear = torch.arange(10, dtype=x.dtype)
            boxes = torch.stack([clear * 30, clear * 0, clear * 30 + 20, clear * 0 + 20], 1)
            boxes = torch.cat([boxes, x.new_tensor([[0, 40, 20, 60], [1, 40, 21, 60]])])
            scores = torch.cat([0.9 - clear / 100, (x[:1] * 0 + 0.5 + big) - big,
                                x.new_tensor([0.25])])
            keep = nms(boxes, scores, 0.5)
            return {"boxes": boxes[keep], "scores": scores[keep], "labels": torch.ones_like(keep)}

    return NearTie()


def test_a_near_tie_is_settled_against_float64_pytorch() -> None:
    """float32 PyTorch keeps box B, the exact answer box A: a device that keeps A matches the
    model evaluated in float64 and passes, saying so; a device that drops a box fails both."""
    model = LoadedModel(name="near-tie", program=None, inputs=[np.ones(1, np.float32)],
                        identity="near-tie", _module=_near_tie(), family="detection")
    reference = model.reference()
    exact = [x.astype(np.float32) if x.dtype == np.float64 else x
             for x in model.exact_reference() or []]
    assert exact[0][-1, 0] == 0 and reference[0][-1, 0] == 1  # A exactly, B in float32
    check = compare_outputs(exact, reference, "detection", model.output_names)
    assert check.reason().startswith("boxes differ from PyTorch by up to 1 px")
    settled, against = _detections_exactly(model, exact, check, RTOL)
    assert settled.passed() and against == {"reference": "float64", "float32_matched": 11}
    dropped = [x[1:] for x in exact]
    check = compare_outputs(dropped, reference, "detection", model.output_names)
    settled, against = _detections_exactly(model, dropped, check, RTOL)
    assert not settled.passed() and against == {}


def _mask_head_v2() -> Any:
    """Mask R-CNN v2's mask head (convolutions with batch norm) behind a count of rows only the
    values decide, as NMS decides the detections it gets; its batch norms hold real statistics."""
    import torch
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    class Kept(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = MaskRCNNHeads(4, [4, 4], 1, norm_layer=torch.nn.BatchNorm2d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x[x.mean((1, 2, 3)) > 0])

    torch.manual_seed(0)
    module = Kept().eval()
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            for value in (norm.running_mean, norm.weight, norm.bias):
                value.data.normal_()
            norm.running_var.data.uniform_(0.5, 2.0)
    return module


def test_mask_head_with_batch_norm_exports_with_the_same_results() -> None:
    """Batch norm over a data-dependent count of rows stops torch.export (torch asks whether the
    input is empty); the error names the model's line, not torch's dispatch. `exportable()`
    exports it, and the program gives the model's results, for some rows and for none."""
    import torch

    from hostkit.errors import ModelError

    module = _mask_head_v2()
    x = np.random.default_rng(0).standard_normal((6, 4, 14, 14)).astype(np.float32)
    plain = LoadedModel(name="head", program=None, inputs=[x], identity="head", _module=module)
    with pytest.raises(ModelError) as refused:
        plain.exported()
    assert str(refused.value).startswith("torch.export failed for head: a data-dependent guard")
    place = str(refused.value).rpartition(" at ")[2]
    assert "test_detection.py:" in place and place.endswith(
        " in forward: return self.head(x[x.mean((1, 2, 3)) > 0])"), place

    patched = LoadedModel(name="head", program=None, inputs=[x], identity="head",
                          _module=module, family="detection")
    program = patched.exported().module()
    for rows, kept in ((x, int((x.mean((1, 2, 3)) > 0).sum())), (-abs(x), 0)):
        with torch.no_grad():
            want, got = module(torch.from_numpy(rows)), program(torch.from_numpy(rows))
        assert want.shape == (kept, 4, 14, 14) and got.shape == want.shape
        assert torch.equal(got, want)
    assert 0 < int((x.mean((1, 2, 3)) > 0).sum()) < len(x)


def _assert_matched(result: dict[str, Any], err: str) -> dict[str, Any]:
    assert result["status"] == "ok", (result["error"], err[-2000:])
    check = result["check"]
    assert check["family"] == "detection"
    assert check["detections"] >= MIN_DETECTIONS
    assert check["matched"] == check["detections"] == check["device_detections"]
    assert check["max_box_px"] <= BOX_PX and check["max_score_diff"] <= SCORE_DIFF
    return check


@pytest.mark.integration
@pytest.mark.slow
def test_ssdlite_on_an_image_file(daemon: Any, write_inventory: Any, tmp_path: Path) -> None:
    from PIL import Image

    # SSDlite is built for its input's size: at its own 320x320 the library is the one
    # test_bench_a_detector deploys, compiled once for both (80 s)
    y, x = np.mgrid[0:320, 0:320]
    noise = np.random.default_rng(0).integers(0, 60, (320, 320, 3))
    pixels = np.stack([(x * 2.1) % 255, (y * 1.7) % 255, ((x - y) * 0.8) % 255], -1) + noise
    image = tmp_path / "street.png"
    Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(image)
    code, result, err = deploy_json(daemon_inventory(write_inventory, daemon),
                                "ssdlite320_mobilenet_v3_large", "--input", str(image))
    assert result is not None, err
    check = _assert_matched(result, err)
    assert check["outputs"] == ["boxes", "scores", "labels"]
    assert "ObjectDetection" in (result["preprocessing"] or "")


@pytest.mark.integration
@pytest.mark.slow
def test_mask_rcnn_with_masks_pasted_on_the_host(daemon: Any, write_inventory: Any) -> None:
    code, result, err = deploy_json(daemon_inventory(write_inventory, daemon), "maskrcnn_resnet50_fpn",
                                "--input-shape", "1,3,224,224")
    assert result is not None, err
    check = _assert_matched(result, err)
    assert check["outputs"] == ["boxes", "labels", "scores", "masks"]
    assert check["masks"] == check["matched"] and check["min_mask_iou"] >= 0.99


@pytest.mark.integration
@pytest.mark.slow
def test_saved_detector_program(daemon: Any, write_inventory: Any, tmp_path: Path) -> None:
    """A detector saved as .pt2 through `exportable()`: its NMS is edgekit's custom op, which
    loading registers; the outputs are named, so the check is the detection one."""
    import torch
    import torchvision

    from hostkit.models.detection import detector_kwargs, exportable
    from hostkit.models.init import live_init

    name, shape = "ssdlite320_mobilenet_v3_large", (1, 3, 320, 320)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                         **detector_kwargs(name, shape, seeded=True))
    live_init(model, shape, seed=3)
    saved = tmp_path / "ssd.pt2"
    with exportable():
        program = torch.export.export(model.eval(), (torch.rand(shape),))
    torch.export.save(program, saved)
    code, result, err = deploy_json(daemon_inventory(write_inventory, daemon), str(saved))
    assert result is not None, err
    check = _assert_matched(result, err)
    assert check["outputs"] == ["boxes", "scores", "labels"]


@pytest.mark.integration
def test_retinanet_checked_through_zero_area_boxes_and_near_ties(daemon: Any,
                                                                 write_inventory: Any) -> None:
    """RetinaNet with seeded weights: 300 detections from 5 x 1000 top-k candidates ranked among
    a million scores within 1e-4 of each other, some boxes clipped to zero width at the image
    edge. Where float32 PyTorch decides a near tie otherwise, float64 PyTorch settles it."""
    code, result, err = deploy_json(daemon_inventory(write_inventory, daemon),
                                    "retinanet_resnet50_fpn", "--input-shape", "1,3,256,256")
    assert result is not None, err
    check = _assert_matched(result, err)
    assert check["detections"] == 300 and check["outputs"] == ["boxes", "scores", "labels"]
    if check.get("reference") == "float64":
        assert check["float32_matched"] < check["detections"]


@pytest.mark.integration
def test_bench_a_detector(daemon: Any, write_inventory: Any,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """`edgekit bench` on a detector as on a classifier: checked detection by detection, timed
    on the device, and PyTorch beside it there, loading the exported program with edgekit's NMS
    operator in it and checked detection by detection too."""
    inventory = daemon_inventory(write_inventory, daemon)
    code = main(["bench", "-i", str(inventory), "-d", "dev", "ssdlite320_mobilenet_v3_large",
                 "--json", "--repeat", "3", "--warmup", "1", "--baselines", "torch"])
    (result,) = json.loads(capsys.readouterr().out)
    assert code == 0
    _assert_matched(result, "")
    latency = result["latency_ms"]
    assert latency["n"] == 3 and 0 < latency["p50"] <= latency["p90"]
    assert result["first_inference_ms"] > 0 and result["load_s"] is not None
    (torch_run,) = result["baselines"]
    assert torch_run["engine"] == "torch" and torch_run["status"] == "ok", torch_run["reason"]
    assert torch_run["latency_ms"]["n"] == 3 and torch_run["max_abs_diff"] < 1e-3
