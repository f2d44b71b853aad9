"""A program quantized by the user with PyTorch's PT2E flow (torchao), deployed by path: its own
scales, int8 kernels on the board, checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostkit.cli import main
from hostkit.models import ModelSpec, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pt2e_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MobileNetV2 quantized with torchao's X86 quantizer: uint8 activations with zero points
    (the first convolution pads a zero point), int8 weights per channel."""
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = load_model(ModelSpec(name="mobilenet_v2"))
    x = torch.from_numpy(model.inputs[0])
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model._module.eval(), (x,)).module(), quantizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        prepared(torch.randn(x.shape, generator=generator))
    path = tmp_path_factory.mktemp("pt2e") / "mobilenet_v2_int8.pt2"
    torch.export.save(torch.export.export(convert_pt2e(prepared), (x,)), str(path))
    return path


def test_pt2e_program_runs_int8_with_its_own_scales(pt2e_file: Path, daemon: Any,
                                                     write_inventory: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                               "port": daemon.port}}})
    assert main(["deploy", "-i", str(inv), "-d", "dev", str(pt2e_file), "--json", "--repeat", "2",
                 "--warmup", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok", result["error"]
    assert result["precision"] == "int8"
    q = result["quantization"]
    assert q["method"].startswith("pt2e") and q["samples"] == 0
    # Every convolution and the classifier compute on integers (uint8/int8 inputs, in the IR).
    assert q["int8_layers"] == 53 and q["fp32_layers"] == []
    assert q["int8_mb"] < q["fp32_mb"] / 3
    # The board against PyTorch's integer arithmetic: the usual tolerance.
    assert result["rel_err"] < 1e-4 and result["check"]["top3"]
    # The saved program, which rounds in float, agrees by label.
    assert q["vs_source"]["top1"] and q["vs_source"]["top3"]
    assert q["vs_source"]["max_abs_diff"] >= 0.0


def test_pt2e_program_with_quantize_flag_is_one_line(pt2e_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "-d", "local", str(pt2e_file), "--quantize", "int8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "already quantized (PT2E); drop --quantize" in err[-1], err
