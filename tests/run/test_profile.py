"""`edgekit profile` on a real daemon: every kernel timed on the device, named, and adding up to
the end-to-end latency."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from hostkit.cli import main

pytestmark = pytest.mark.integration


def test_profile_resnet18_adds_up(daemon: Any, write_inventory: Any, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                               "port": daemon.port}}})
    rows_csv = tmp_path / "kernels.csv"
    # timing each of ~200 calls (kernels and VM built-ins) costs some: kernels may sum to a
    # little more than the untimed run; time they leave out would be a kernel not counted.
    # Each row is its median call over 5 runs, but this shared machine sometimes slows for a
    # while (an end-to-end p50 of 19 ms once against 12 in the runs before and after): a kernel
    # left out would miss every time, a slow spell passes, so the profile gets three tries.
    gaps = []
    for _ in range(3):
        assert main(["profile", "-i", str(inv), "-d", "dev", "resnet18", "--runs", "5", "--repeat",
                     "5", "--warmup", "1", "--json", "--csv", str(rows_csv)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["status"] == "ok", result["error"]
        profile = result["profile"]
        gaps.append(profile["unaccounted"])
        if -0.15 < gaps[-1] < 0.10:
            break
    assert -0.15 < gaps[-1] < 0.10, gaps
    names = [row["name"] for row in profile["rows"]]
    # the 3x3 stride-1 convolutions run as Winograd's three kernels, the others direct
    assert any(name.startswith("winograd 3x3 multiply 64->64") for name in names), names
    assert any(name.startswith("winograd 3x3 input transform 64") for name in names), names
    assert any(name.startswith("conv2d 7x7 3->64 @112x112") for name in names), names
    convs = [row for row in profile["rows"]
             if row["name"].startswith(("conv2d", "winograd 3x3 multiply"))]
    assert sum(row["calls"] for row in convs) == 20, "ResNet-18 has 20 convolutions"
    assert all(row["gflops"] and row["gflops"] > 0 for row in convs)
    with rows_csv.open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(profile["rows"])

    assert main(["profile", "-i", str(inv), "-d", "dev", "resnet18", "--runs", "1", "--repeat",
                 "1", "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    assert "edgekit profile: resnet18 on dev" in text and "kernels sum to" in text
    # the table stops at 20 rows and says so (ResNet-18 fits it since its batch norms joined
    # the convolutions' kernels)
    assert ("top 20 of" in text) == (len(profile["rows"]) > 20)
