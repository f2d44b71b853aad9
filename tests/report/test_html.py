"""The HTML report: self-contained, escaped, and rendered by a real browser (headless Chromium),
checked on the screenshot, not only on the file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hostkit.cli import main
from hostkit.report.html import html_report
from hostkit.report.results import Latency, RunResult

BAR_RGB = (0x4F, 0x7B, 0xD9)


def _results() -> list[RunResult]:
    ok = RunResult(device="pi4", model="resnet18", target="llvm", status="ok",
                   latency_ms=Latency.from_samples([50.0, 52.0]), rel_err=1e-6, memory_mb=120.0)
    fast = RunResult(device="nuc", model="resnet18", target="llvm", status="ok",
                     latency_ms=Latency.from_samples([5.0, 6.0]), rel_err=2e-6)
    bad = RunResult(device="<script>alert(1)</script>", model="resnet18",
                    error="cannot reach <b>pi4.local</b>")
    ok.profile = {"rows": [{"name": "conv2d 3x3 64->64 @56x56", "total_ms": 20.0},
                           {"name": "matmul 1x512 by 512x1000", "total_ms": 0.5}]}
    return [ok, fast, bad]


def test_page_is_self_contained_and_escaped() -> None:
    page = html_report(_results(), "edgekit bench")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;pi4.local&lt;/b&gt;" in page
    assert page.count("<svg") == 2, "a latency chart and one profile chart"
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page and "src=" not in page


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("needs Debian's chromium (scripts/setup.sh installs it)")
    return path


def screenshot(page: Path, out: Path, profile_dir: Path) -> Any:
    """Render `page` in headless Chromium (no network) and return the screenshot's pixels."""
    from PIL import Image

    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile_dir}", "--window-size=1000,900",
                    f"--screenshot={out}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB"))


def _bar_pixels(pixels: Any) -> int:
    return int(np.all(np.abs(pixels.astype(int) - BAR_RGB) <= 6, axis=-1).sum())


def test_chromium_renders_the_charts(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html_report(_results(), "edgekit bench"), encoding="utf-8")
    pixels = screenshot(page, tmp_path / "shot.png", tmp_path / "chrome")
    assert pixels.shape[0] > 100 and pixels.std() > 10, "not a blank page"
    assert _bar_pixels(pixels) > 2000, "the bars are drawn"


@pytest.mark.integration
def test_bench_html_from_a_real_run(daemon: Any, write_inventory: Any, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                               "port": daemon.port}}})
    page = tmp_path / "reports" / "bench.html"
    assert main(["bench", "-i", str(inv), "-d", "dev", "tinycnn", "--repeat", "3", "--json",
                 "--html", str(page)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    text = page.read_text(encoding="utf-8")
    assert "dev · tinycnn" in text and f"{result['latency_ms']['p50']:,.2f} ms" in text
    assert _bar_pixels(screenshot(page, tmp_path / "bench.png", tmp_path / "chrome")) > 200

    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert main(["bench", "-i", str(inv), "-d", "dev", "tinycnn", "--html",
                 str(blocked / "page.html")]) == 1
    assert f"cannot write {blocked / 'page.html'}: {blocked} is a file, not a folder" in \
        capsys.readouterr().err
