"""Unit tests of result records and their rendering: latency statistics, tables."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from hostkit.report.render import bench_table, deploy_summary, devices_table
from hostkit.report.results import Latency, RunResult


def test_latency_stats() -> None:
    lat = Latency.from_samples([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (lat.p50, lat.n, lat.mean) == (3.0, 5, 4.0)
    assert lat.p90 == pytest.approx(7.6)
    assert Latency.from_samples([]).n == 0


def _render(fn, arg) -> str:  # type: ignore[no-untyped-def]
    buffer = io.StringIO()
    fn(Console(file=buffer, width=200, color_system=None), arg)
    return buffer.getvalue()


def test_reports_render_status_and_reasons() -> None:
    ok = RunResult(device="local", model="resnet18", target="llvm", status="ok",
                   latency_ms=Latency.from_samples([5.0, 6.0]), max_abs_diff=1e-6,
                   rel_err=2.5e-7, ref_max=4.0, cosine=1.0,
                   top1_match=True, top5_match=True, artifact_sha256="ab" * 32,
                   artifact_bytes=1000)
    bad = RunResult(device="pi4-emu", model="resnet18", emulated=True,
                    error="cannot reach pi4.local:9090")
    text = _render(bench_table, [ok, bad])
    assert "pi4-emu*" in text and "failed" in text and "cannot reach pi4.local:9090" in text
    assert "1 ok, 1 failed" in text and "emulated board" in text
    summary = _render(deploy_summary, ok)
    assert "relative error 2.50e-07 (max abs diff 1.00e-06, PyTorch's outputs up to 4.00e+00)" \
        in summary and "p50 5.50 ms" in summary


def test_names_and_errors_are_shown_as_written_not_read_as_markup() -> None:
    """Inventory names and error text are data: `[/x]` must neither vanish nor break rich."""
    failed = RunResult(device="[/x]", model="[bold]m", status="failed",
                       error="unknown key '[red]' in [/y]", stage="model")
    for text in (_render(deploy_summary, failed), _render(bench_table, [failed])):
        assert "[/x]" in text and "[bold]m" in text and "unknown key '[red]' in [/y]" in text
    row = {"device": "[/x]", "transport": "rpc", "address": "h:9", "target": "[/t]",
           "groups": ["[g]"], "status": "unreachable", "reports": "[/r]"}
    text = _render(devices_table, [row])
    assert all(word in text for word in ("[/x]", "[/t]", "[g]", "[/r]"))
