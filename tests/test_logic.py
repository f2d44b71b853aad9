"""Unit tests of pure logic: targets, output comparison, latency statistics, versions, reports."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from rich.console import Console

from hostkit.errors import ConnectError, TargetError
from hostkit.inventory import parse_inventory
from hostkit.report import bench_table, deploy_summary
from hostkit.results import Latency, RunResult, compare_outputs
from hostkit.targets import arch_of_triple, check_cross_compiler, resolve_target


def _device(target, **extra):  # type: ignore[no-untyped-def]
    return parse_inventory({"devices": {"d": {"target": target, **extra}}}).get("d")


@pytest.mark.parametrize(("triple", "arch"), [
    ("aarch64-linux-gnu", "aarch64"), ("armv7l-linux-gnueabihf", "arm"),
    ("arm-linux-gnueabihf", "arm"), ("x86_64-linux-gnu", "x86_64"), ("arm64", "aarch64"),
])
def test_arch_of_triple(triple: str, arch: str) -> None:
    assert arch_of_triple(triple) == arch


def test_resolve_tag_and_dict_targets() -> None:
    pi = resolve_target(_device("raspberry-pi/4b-aarch64"))
    assert pi.triple == "aarch64-linux-gnu" and pi.is_cross and pi.kind == "llvm"
    local = resolve_target(_device({"kind": "llvm"}))
    assert not local.is_cross


def test_bad_targets_are_one_line() -> None:
    with pytest.raises(TargetError) as err:
        resolve_target(_device("raspberry-pi/4b-aarch65"))
    assert str(err.value).startswith("d: unknown target 'raspberry-pi/4b-aarch65': did you mean "
                                     "'raspberry-pi/4b-aarch64'?")
    with pytest.raises(TargetError, match="old string form"):
        resolve_target(_device("llvm -mcpu=cortex-a72"))


def test_missing_cross_compiler_names_the_debian_package() -> None:
    device = _device("raspberry-pi/4b-aarch64", cross_compiler="no-such-aarch64-gcc")
    with pytest.raises(TargetError) as err:
        check_cross_compiler(device, resolve_target(device))
    assert "no-such-aarch64-gcc for aarch64-linux-gnu not found" in str(err.value)
    assert "apt-get install gcc-aarch64-linux-gnu" in str(err.value)
    # the host compiler builds for x86_64, not for the board
    wrong = _device("raspberry-pi/4b-aarch64", cross_compiler="gcc")
    with pytest.raises(TargetError, match="gcc builds for x86_64.*but the target is aarch64"):
        check_cross_compiler(wrong, resolve_target(wrong))
    tar = _device("raspberry-pi/4b-aarch64", cross_compiler="no-such-gcc", format="tar")
    assert check_cross_compiler(tar, resolve_target(tar)) is None


def test_compare_outputs() -> None:
    want = [np.array([[0.1, 0.9, 0.3, 0.2, 0.5, 0.7, 0.0]], dtype=np.float32)]
    same = compare_outputs([want[0] + 1e-6], want)
    assert same.max_abs_diff == pytest.approx(1e-6, rel=0.1) and same.top1_match and same.top5_match
    swapped = want[0].copy()
    swapped[0, 1], swapped[0, 5] = 0.7, 0.9
    moved = compare_outputs([swapped], want)
    assert moved.top1_match is False and moved.top5_match is True
    assert math.isinf(compare_outputs([np.zeros((1, 3))], want).max_abs_diff)


def test_latency_stats() -> None:
    lat = Latency.from_samples([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (lat.p50, lat.n, lat.mean) == (3.0, 5, 4.0)
    assert lat.p90 == pytest.approx(7.6)
    assert Latency.from_samples([]).n == 0


def test_version_mismatch_names_both_versions() -> None:
    import tvm

    from hostkit.remote import check_versions

    with pytest.raises(ConnectError) as err:
        check_versions("pi4", {"tvm_version": "0.19.0"})
    assert f"host has {tvm.__version__}, device has 0.19.0" in str(err.value)
    assert "edgekit device install --device pi4" in str(err.value)
    check_versions("pi4", {"tvm_version": tvm.__version__})


def _render(fn, arg) -> str:  # type: ignore[no-untyped-def]
    buffer = io.StringIO()
    fn(Console(file=buffer, width=140, color_system=None), arg)
    return buffer.getvalue()


def test_reports_render_status_and_reasons() -> None:
    ok = RunResult(device="local", model="resnet18", target="llvm", status="ok",
                   latency_ms=Latency.from_samples([5.0, 6.0]), max_abs_diff=1e-6,
                   top1_match=True, top5_match=True, artifact_sha256="ab" * 32,
                   artifact_bytes=1000)
    bad = RunResult(device="pi4-emu", model="resnet18", emulated=True,
                    error="cannot reach pi4.local:9090")
    text = _render(bench_table, [ok, bad])
    assert "pi4-emu*" in text and "failed" in text and "cannot reach pi4.local:9090" in text
    assert "1 ok, 1 failed" in text and "emulated board" in text
    summary = _render(deploy_summary, ok)
    assert "max abs diff 1.00e-06" in summary and "p50 5.50 ms" in summary
