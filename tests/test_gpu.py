"""An NVIDIA GPU on this machine standing in for a Jetson-class board: deploy, bench and a short
tune of mobilenet_v2 and resnet18 through a real daemon, outputs matched against PyTorch,
latency printed next to PyTorch eager and `torch.compile` on the same GPU.

Skipped where there is no GPU (CI). The daemon runs runtime-only (`--runtime-only`), the target
names no arch (completed from the device's report), and the kernels are compiled here for it.
Set EDGEKIT_GPU_REPORT=FILE to keep the figures as JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.cli import main


def _gpu_missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs torch"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU on this machine (torch.cuda.is_available() is False)"
    return None


pytestmark = [pytest.mark.integration, pytest.mark.gpu,
              pytest.mark.skipif(_gpu_missing() is not None, reason=str(_gpu_missing()))]

MODELS = ["mobilenet_v2", "resnet18"]
FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def gpu_inventory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from conftest import Daemon

    workdir = tmp_path_factory.mktemp("gpu-daemon")
    daemon = Daemon(workdir, extra=["--runtime-only"])
    inventory = workdir / "inventory.yaml"
    inventory.write_text(json.dumps({"devices": {"gpu": {
        "target": {"kind": "cuda", "host": {"kind": "llvm"}},
        "host": "127.0.0.1", "port": daemon.port}}}), encoding="utf-8")
    yield inventory
    daemon.stop()
    report = os.environ.get("EDGEKIT_GPU_REPORT")
    if report:
        Path(report).write_text(json.dumps(FIGURES, indent=2), encoding="utf-8")


def _deploy(inventory: Path, model: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(["deploy", "-i", str(inventory), "--device", "gpu", model, "--json",
                 "--repeat", "50", "--warmup", "10"])
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["error"]
    assert result["top1_match"] and result["max_abs_diff"] < 1e-3
    return result


def _torch_p50_ms(model: str, compiled: bool, runs: int = 50) -> float:
    import torch

    from hostkit.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(model))
    module = loaded._module.cuda().eval()
    inputs = [torch.from_numpy(x).cuda() for x in loaded.inputs]
    if compiled:
        module = torch.compile(module)
    samples = []
    with torch.no_grad():
        for index in range(runs + 10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            module(*inputs)
            torch.cuda.synchronize()
            if index >= 10:
                samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


@pytest.mark.parametrize("model", MODELS)
def test_deploy_and_bench_next_to_pytorch(gpu_inventory: Path, model: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    result = _deploy(gpu_inventory, model, capsys)
    gpus = result["device_info"]["gpus"]
    assert gpus and result["device_info"]["tvm_runtime_only"] is True
    assert gpus[0]["arch"] in result["target"], "the arch comes from the device's report"
    figures = {"gpu": gpus[0]["name"], "arch": gpus[0]["arch"],
               "tvm_p50_ms": result["latency_ms"]["p50"], "compile_s": result["compile_s"],
               "library_mb": round(result["artifact_bytes"] / 1e6, 1),
               "max_abs_diff": result["max_abs_diff"],
               "eager_p50_ms": _torch_p50_ms(model, compiled=False),
               "compile_p50_ms": _torch_p50_ms(model, compiled=True)}
    FIGURES[model] = figures
    with capsys.disabled():
        print(f"\n{model} on {figures['gpu']}: TVM {figures['tvm_p50_ms']:.2f} ms, eager "
              f"{figures['eager_p50_ms']:.2f} ms, torch.compile {figures['compile_p50_ms']:.2f} ms")


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_short_tune_then_deploy_applies_it(gpu_inventory: Path, model: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tune", "-i", str(gpu_inventory), "--device", "gpu", model, "--trials", "64",
                 "--time-budget", "4", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["valid_trials"] > 0, summary
    result = _deploy(gpu_inventory, model, capsys)
    assert result["tuned"] is True
    FIGURES.setdefault(model, {})["tuned_p50_ms"] = result["latency_ms"]["p50"]
    with capsys.disabled():
        print(f"\n{model} tuned ({summary['valid_trials']} trials): "
              f"{result['latency_ms']['p50']:.2f} ms")
