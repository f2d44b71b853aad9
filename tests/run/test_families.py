"""Model families on a real daemon: a segmenter checked pixel by pixel, image and .npy inputs, and
a detector torch.export cannot take refused in one line that names the guard it stopped at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploying import daemon_inventory, deploy_json

from hostkit.cli import main

pytestmark = pytest.mark.integration




def _scene(path: Path) -> Path:
    from PIL import Image

    y, x = np.mgrid[0:180, 0:240]
    noise = np.random.default_rng(0).integers(0, 40, (180, 240, 3))
    pixels = np.stack([(x * 0.9) % 255, (y * 1.3) % 255, ((x + y) * 0.4) % 255], -1) + noise
    Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(path)
    return path


def test_segmenter_is_checked_pixel_by_pixel(daemon: Any, write_inventory: Any) -> None:
    inv = daemon_inventory(write_inventory, daemon)
    shape = ["--input-shape", "1,3,96,128"]
    code, result, err = deploy_json(inv, "lraspp_mobilenet_v3_large", *shape)
    assert code == 0 and result is not None and result["status"] == "ok", err
    check = result["check"]
    assert check["family"] == "segmentation" and check["outputs"] == ["out"]
    assert check["pixels"] == 96 * 128 and check["pixel_agreement"] >= 0.999
    assert result["ref_max"] > 0.5 and result["rel_err"] < 1e-4

    code, perturbed, _ = deploy_json(inv, "lraspp_mobilenet_v3_large", *shape, "--perturb")
    assert code == 1 and perturbed is not None and perturbed["stage"] == "check"
    assert perturbed["status"] == "failed" and perturbed["rel_err"] > 1e-4


def test_image_input_is_preprocessed_like_torchvision(daemon: Any, write_inventory: Any,
                                                      tmp_path: Path) -> None:
    inv = daemon_inventory(write_inventory, daemon)
    image = _scene(tmp_path / "scene.png")
    code, result, err = deploy_json(inv, "squeezenet1_1", "--input", str(image))
    assert code == 0 and result is not None and result["status"] == "ok", err
    assert "ImageClassification" in (result["preprocessing"] or "")
    assert "crop_size=[224]" in result["preprocessing"]
    assert result["check"]["top1"] is True and result["rel_err"] < 1e-4


def test_npy_input_and_its_errors(daemon: Any, write_inventory: Any, tmp_path: Path) -> None:
    inv = daemon_inventory(write_inventory, daemon)
    tensor = tmp_path / "x.npy"
    np.save(tensor, np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32))
    code, result, err = deploy_json(inv, "tinycnn", "--input", str(tensor))
    assert code == 0 and result is not None and result["status"] == "ok", err
    assert result["preprocessing"] is None

    strings = tmp_path / "s.npy"
    np.save(strings, np.array(["a", "b"]))
    code, result, _ = deploy_json(inv, "tinycnn", "--input", str(strings))
    assert code == 1 and result is not None and result["stage"] == "model"
    assert result["error"] == f"input file {strings} holds <U1; expected float32 numbers"
    junk = tmp_path / "photo.png"
    junk.write_bytes(b"not a png")
    code, result, _ = deploy_json(inv, "squeezenet1_1", "--input", str(junk))
    assert code == 1 and result is not None
    assert result["error"].startswith(f"input file {junk} is not a readable image")
    code, result, _ = deploy_json(inv, "tinycnn", "--input", str(junk))
    assert code == 1 and result is not None
    assert result["error"] == (f"input file {junk}: tinycnn has no published preprocessing; "
                               "give a .npy tensor instead")


def test_a_detector_that_cannot_be_exported_is_refused_naming_the_guard(
        daemon: Any, write_inventory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No detector name stays a refused one (each is made exportable in turn), so the refusal
    is shown on Keypoint R-CNN with its keypoint export patch withdrawn: torchvision's own
    keypoint decoding loops over the detections in Python, torch.export stops there, and the
    line names the model, the guard and its place in torchvision's code."""
    from torchvision.models.detection import roi_heads

    from hostkit.models import keypoints

    monkeypatch.setattr(keypoints, "heatmaps_only", roi_heads.keypointrcnn_inference)
    inv = daemon_inventory(write_inventory, daemon)
    code, result, err = deploy_json(inv, "keypointrcnn_resnet50_fpn", "--input-shape", "1,3,128,128")
    assert code == 1 and result is not None and result["stage"] == "export"
    assert result["error"].startswith("torch.export failed for keypointrcnn_resnet50_fpn: "
                                      "a data-dependent guard")
    assert "heatmaps_to_keypoints" in result["error"], "the guard's place is named"
    assert "def forward" not in err and len(err.splitlines()) < 20, "no traced-graph dump"


def test_models_lists_names_by_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert list(groups) == ["classification", "segmentation", "detection"]
    assert "resnet18" in groups["classification"] and "tinycnn" in groups["classification"]
    assert "fcn_resnet50" in groups["segmentation"]
    assert "maskrcnn_resnet50_fpn" in groups["detection"]
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "segmentation: 6 models" in text and "checked detection by detection" in text


def test_saved_program_with_dict_outputs(daemon: Any, write_inventory: Any,
                                         tmp_path: Path) -> None:
    """A segmenter-style .pt2 returns a dict: its entries are compared one by one, by name."""
    import torch

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": self.conv(x), "aux": torch.tanh(x).mean(dim=1, keepdim=True)}

    torch.manual_seed(0)
    saved = tmp_path / "heads.pt2"
    torch.export.save(torch.export.export(Heads().eval(), (torch.randn(1, 3, 16, 16),)), saved)
    code, result, err = deploy_json(daemon_inventory(write_inventory, daemon), str(saved))
    assert code == 0 and result is not None and result["status"] == "ok", err
    assert result["check"]["outputs"] == ["out", "aux"]
    assert result["check"]["family"] == "segmentation" and result["rel_err"] < 1e-4
