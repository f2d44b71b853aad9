"""ONNX Runtime on the emulated arm64 board, beside TVM (issue 13): the board image that carries
the engine (`board up --baselines onnxruntime`, aarch64 wheels installed offline under qemu) runs
the host's ONNX export in the board's daemon, and its outputs match the host's PyTorch.

Correctness only: under qemu the timings (and so the ratios) are the emulator's, and are marked
so. The first run builds that image beside the lean default one (about 12 minutes on 2 busy
cores); later runs boot it in seconds. Needs root, like every emulated-board test.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from typing import Any, Iterator

import pytest

from hostkit.cli import main
from hostkit.inventory import Device

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
# A /30 of its own (no other test uses 169.254.42.12/30), so this board never meets theirs.
BOARD = {"target": AARCH64_TARGET, "host": "169.254.42.13", "port": 9090,
         "managed": "qemu-arm64", "emulated": True, "format": "so",
         "cross_compiler": "aarch64-linux-gnu-gcc", "session_timeout": 300}


@pytest.fixture(scope="module")
def board_with_ort(edgekit_cache: Any) -> Iterator[Device]:
    from conftest import USER_BOARD_IMAGES

    from hostkit.boards.emulator import board_down, board_up
    from hostkit.boards.image import IMAGES_ENV, host_problems

    problems = host_problems()
    if problems:
        pytest.skip(problems[0])
    os.environ.setdefault(IMAGES_ENV, str(USER_BOARD_IMAGES))
    device = Device(name="emu-ort", **BOARD)  # type: ignore[arg-type]
    board_up(device, progress=lambda line: print(line, file=sys.stderr),
             baselines=("onnxruntime",))
    yield device
    board_down(device)


def test_onnxruntime_runs_on_the_emulated_board_and_matches(
        board_with_ort: Device, write_inventory: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hostkit.boards.emulator import board_status

    assert board_status(board_with_ort)["baselines"] == "onnxruntime"
    inv = write_inventory({"devices": {"emu-ort": BOARD}})
    assert main(["deploy", "-i", str(inv), "-d", "emu-ort", "tinycnn", "--baselines",
                 "onnxruntime,torch", "--json", "--repeat", "3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "ok" and record["emulated"] is True
    assert record["device_info"]["arch"] == "aarch64"
    ort, torch_run = record["baselines"]
    assert ort["status"] == "ok", ort["reason"]
    assert ort["rel_err"] <= 1e-4 and ort["version"] == metadata.version("onnxruntime")
    assert ort["emulated"] is True and ort["tvm_ratio"] > 0
    # The lean image's engines: torch is not in this one, and says so without failing the row.
    assert (torch_run["status"], torch_run["reason"]) == ("n/a", "not installed")
    with capsys.disabled():  # the figures, for the report
        print(f"emulated board: TVM p50 {record['latency_ms']['p50']:.2f} ms (rel err "
              f"{record['rel_err']:.1e}), onnxruntime p50 {ort['latency_ms']['p50']:.2f} ms (rel "
              f"err {ort['rel_err']:.1e}), TVM {ort['tvm_ratio']:.2f}x onnxruntime")

    assert main(["deploy", "-i", str(inv), "-d", "emu-ort", "tinycnn", "--baselines",
                 "onnxruntime", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert "x onnxruntime*" in out, "ratios on an emulated board are marked"
