"""int8 end to end on a real daemon: calibrated MobileNetV2 runs int8 kernels and matches
PyTorch's quantized model; the summary says what was quantized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hostkit.cli import main

pytestmark = pytest.mark.integration


def _inventory(write_inventory: Any, daemon: Any) -> Path:
    return write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                "port": daemon.port}}})


def test_int8_mobilenet_v2_matches_pytorch_quantized(daemon: Any, write_inventory: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon)
    assert main(["deploy", "-i", str(inv), "-d", "dev", "mobilenet_v2", "--quantize", "int8",
                 "--calibration", "8", "--json", "--repeat", "2", "--warmup", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok", result["error"]
    assert result["precision"] == "int8"
    q = result["quantization"]
    assert q["method"] == "minmax" and q["samples"] == 8
    assert q["int8_layers"] == 53 and q["fp32_layers"] == [], "every conv and the classifier"
    assert q["int8_mb"] < q["fp32_mb"] / 3
    assert 0.0 <= q["vs_fp32_top1"] <= 1.0
    check = result["check"]
    assert check["top1"] and check["top3"] and result["rel_err"] < 1e-4


def test_int8_from_image_folder_with_entropy(daemon: Any, write_inventory: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon)
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        np.save(folder / f"{i}.npy", rng.standard_normal((1, 3, 24, 24)).astype(np.float32))
    (folder / "notes.txt").write_text("ignored")
    assert main(["deploy", "-i", str(inv), "-d", "dev", "tinycnn", "--input-shape", "1,3,24,24",
                 "--quantize", "int8", "--calibration", str(folder), "--calibration-method",
                 "entropy", "--json", "--repeat", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok", result["error"]
    assert result["quantization"]["samples"] == 3
    assert result["quantization"]["method"] == "entropy"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["deploy", "-i", str(inv), "-d", "dev", "tinycnn", "--quantize", "int8",
                 "--calibration", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"edgekit: error: dev: --calibration {empty}: no images")
