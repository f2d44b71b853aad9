"""`deploy --runtime cpp`: the export bundle's C++ runner on the device, beside the daemon."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hostkit.cli import main
from hostkit.report.render import bench_table, deploy_summary
from hostkit.report.results import CppRun, Latency, RunResult
from hostkit.run.cpp import parse_runner_output


def test_runner_output_is_parsed() -> None:
    run = parse_runner_output("load_ms 0.370\nfirst_inference_ms 0.880\nwrote out/output0.npy\n"
                              "latency_ms n=50 p50=0.510 p90=1.344 p99=10.974 mean=1.001 "
                              "std=1.705 min=0.461\n", 1234)
    assert (run.bundle_bytes, run.load_ms, run.first_inference_ms) == (1234, 0.37, 0.88)
    assert run.latency_ms == Latency(p50=0.51, p90=1.344, mean=1.001, std=1.705, n=50)


def test_reports_show_the_runner_beside_the_daemon() -> None:
    result = RunResult(device="local", model="tinycnn", status="ok", target="llvm",
                       latency_ms=Latency.from_samples([0.5, 0.6]),
                       cpp=CppRun(bundle_bytes=6_200_000, load_ms=0.4, first_inference_ms=0.9,
                                  latency_ms=Latency(0.49, 0.56, 0.5, 0.01, 50), rel_err=3.8e-7))
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, color_system=None)
    deploy_summary(console, result)
    bench_table(console, [result])
    text = buffer.getvalue()
    assert ("bundle 6.2 MB · load 0.40 ms · first inference 0.90 ms · relative error 3.80e-07"
            in text)
    assert "p50 0.49 ms · p90 0.56 ms" in text and "C++ p50 ms" in text
    assert "C++: the export bundle's runner on the device" in text


@pytest.mark.integration
def test_deploy_runtime_cpp_on_local(daemon: Any, write_inventory: Any,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"local": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                 "port": daemon.port, "managed": "local"}}})
    assert main(["deploy", "-i", str(inv), "--device", "local", "tinycnn", "--runtime", "cpp",
                 "--repeat", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok", result["error"]
    cpp = result["cpp"]
    assert cpp["rel_err"] < 1e-4 and cpp["latency_ms"]["n"] == 20 and cpp["bundle_bytes"] > 1e6
    assert cpp["latency_ms"]["p50"] > 0 and result["latency_ms"]["p50"] > 0
    print(f"local tinycnn: daemon p50 {result['latency_ms']['p50']:.3f} ms, C++ runner p50 "
          f"{cpp['latency_ms']['p50']:.3f} ms, relative error {cpp['rel_err']:.2e}")


def test_runtime_cpp_needs_a_way_to_start_a_program(write_inventory: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A device reached over RPC alone: one line, before anything is compiled or connected."""
    inv = write_inventory({"devices": {"pi4": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                               "port": 9}}})
    assert main(["deploy", "-i", str(inv), "--device", "pi4", "tinycnn", "--runtime", "cpp",
                 "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "cpp" and result["artifact_sha256"] is None
    assert result["error"] == ("--runtime cpp starts the runner as a program on the device, but "
                               "pi4 is reached over rpc only (use transport: ssh, or copy an "
                               "`edgekit export` bundle there and run it)")
