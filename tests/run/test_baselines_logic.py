"""Unit tests of the baselines' pure logic: engine names, the fastest engine, ratios, rendering."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from rich.console import Console

from hostkit.engines import board_wheels, parse_engines
from hostkit.report.render import bench_table, deploy_summary, write_csv
from hostkit.report.results import Baseline, Latency, RunResult
from hostkit.run.baselines import fastest


def _lat(p50: float) -> Latency:
    return Latency(p50=p50, p90=p50, mean=p50, std=0.0, n=3)


def _result(emulated: bool = False) -> RunResult:
    result = RunResult(device="pi", model="resnet18", status="ok", latency_ms=_lat(62.0),
                       emulated=emulated, rel_err=1e-6)
    result.baselines = [
        Baseline("torch", "ok", version="2.14.1", threads=4, latency_ms=_lat(100.0),
                 rel_err=0.0, tvm_ratio=0.62, emulated=emulated),
        Baseline("onnxruntime", "n/a", reason="not installed", emulated=emulated),
    ]
    result.fastest = fastest(62.0, result.baselines)
    return result


@pytest.mark.parametrize("text, engines", [
    ("torch,onnxruntime", ("torch", "onnxruntime")),
    ("ORT, pytorch", ("onnxruntime", "torch")),
    ("torch,torch", ("torch",)),
])
def test_parse_engines(text: str, engines: tuple[str, ...]) -> None:
    assert parse_engines(text) == engines


@pytest.mark.parametrize("text, message", [
    ("tflite", "unknown baseline engine 'tflite': choose from torch, onnxruntime"),
    (" , ", "no baseline engine given"),
])
def test_parse_engines_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_engines(text)


def test_fastest_ignores_engines_without_a_matching_run() -> None:
    ok = Baseline("onnxruntime", "ok", latency_ms=_lat(10.0))
    wrong = Baseline("torch", "failed", reason="outputs differ", latency_ms=_lat(1.0))
    assert fastest(62.0, [ok, wrong]) == "onnxruntime"
    assert fastest(5.0, [ok, wrong]) == "tvm"
    assert fastest(None, [wrong]) is None


def test_ratios_name_each_engine_and_mark_an_emulated_board() -> None:
    assert _result().ratios() == "0.62x torch"
    assert _result(emulated=True).ratios() == "0.62x torch*"


def test_tables_show_each_engine_and_the_fastest() -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    bench_table(console, [_result()])
    deploy_summary(console, _result())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "engines on each device" in text and "0.62x torch" in text
    assert "n/a (not installed)" in text
    assert "100.00" in text and "62.00" in text
    assert "fastest" in text and "│ tvm" in text


def test_html_charts_each_engine() -> None:
    from hostkit.report.html import html_report

    page = html_report([_result()], "bench")
    assert "Engines on each device" in page
    assert "pi · resnet18 · tvm (fastest)" in page and "pi · resnet18 · torch" in page
    assert "onnxruntime" not in page.split("Engines on each device")[1], "n/a has no bar"


def test_csv_carries_each_engine(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    write_csv(path, [_result()])
    with open(path, encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["torch_status"], row["torch_p50_ms"], row["torch_tvm_ratio"]) == \
        ("ok", "100.0", "0.62")
    assert (row["onnxruntime_status"], row["onnxruntime_p50_ms"]) == ("n/a", "")
    assert row["fastest"] == "tvm"


def test_board_wheels_pin_the_hosts_versions_and_take_torch_without_cuda() -> None:
    from importlib import metadata

    ort, torch_wheel, torch_deps = board_wheels(("torch", "onnxruntime"))
    assert ort.requirements == (f"onnxruntime=={metadata.version('onnxruntime')}",)
    assert torch_wheel.no_deps and torch_wheel.index_url
    assert torch_wheel.requirements[0].endswith("+cpu")
    assert not any(r.startswith(("nvidia", "cuda", "triton")) for r in torch_deps.requirements)


def test_default_board_image_keeps_its_key() -> None:
    from hostkit.boards.image import image_key

    assert image_key(()) == image_key()
    assert image_key(("onnxruntime",)) != image_key()


def test_device_probe_of_an_unknown_engine() -> None:
    from devicekit.baselines import probe

    assert probe("tflite")["status"] == "failed"
    assert probe("onnxruntime")["status"] == "ok"


def test_torch_engine_loads_a_program_holding_torchvision_operators(tmp_path: Path) -> None:
    """A Faster/Mask R-CNN program holds `torchvision::roi_align`: the device's torch engine must
    register torchvision's operators before loading it (a fresh process has not imported
    torchvision; the failure was 'error when deserializing the saved file')."""
    import subprocess
    import sys

    import torch
    import torchvision  # noqa: F401  (registers roi_align for the export here)

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            boxes = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])
            return torch.ops.torchvision.roi_align(x, boxes, 1.0, 2, 2, 2, False)

    saved = tmp_path / "pool.pt2"
    torch.export.save(torch.export.export(Pool(), (torch.rand(1, 2, 8, 8),)), str(saved))
    code = ("import numpy as np, sys; from devicekit.baselines import _torch_runner; "
            f"out = _torch_runner(__import__('pathlib').Path({str(saved)!r}), "
            "[np.ones((1, 2, 8, 8), 'float32')], 1)(); print(out[0].shape)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(1, 2, 2, 2)"
