"""CLI: each bad input is one clear line on stderr, a non-zero exit, and nothing half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostkit.cli import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and "edgekit:" in ln]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_device_lists_known(write_inventory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"pi4": {"target": {"kind": "llvm"}},
                                       "local": {"target": {"kind": "llvm"}}}})
    assert main(["deploy", "-i", str(inv), "--device", "pi5", "resnet18"]) == 1
    assert _err(capsys) == (f"edgekit: error: unknown device 'pi5' in {inv}; did you mean 'pi4'? "
                            "known devices: pi4, local")


def test_unknown_model_suggests_close_names(write_inventory: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"local": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                 "port": 9, "managed": "local"}}})
    assert main(["deploy", "-i", str(inv), "--device", "local", "resnet181", "--json"]) == 1
    captured = capsys.readouterr()
    assert '"status": "failed"' in captured.out
    assert "unknown model 'resnet181': did you mean resnet18" in captured.out


def test_missing_inventory_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "-i", str(tmp_path / "missing.yaml"), "--all-devices"]) == 1
    line = _err(capsys)
    assert line.startswith("edgekit: error: inventory file ") and "missing.yaml not found" in line


def test_bad_inventory_key(write_inventory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"x": {"target": {"kind": "llvm"}, "hots": "a"}}})
    assert main(["devices", "-i", str(inv)]) == 1
    assert _err(capsys) == f"edgekit: error: {inv}: unknown key 'devices.x.hots'; did you mean 'host'?"


@pytest.mark.parametrize(("argv", "needle"), [
    (["deploy", "resnet18"], "the following arguments are required: --device/-d"),
    (["deploy", "-d", "x", "resnet18", "--repeat", "0"], "expected a positive integer, got '0'"),
    (["deploy", "-d", "x", "resnet18", "--input-shape", "1,a"], "--input-shape expects positive"),
    (["deploy", "-d", "x", "resnet18", "--format", "zip"], "invalid choice: 'zip'"),
    (["bench", "--all-devices", "--group", "g"], "not allowed with argument"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_bad_flags_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgekit: error: ") and needle in err


def test_bench_needs_a_device_selection(write_inventory: Any,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"x": {"target": {"kind": "llvm"}}}})
    assert main(["bench", "-i", str(inv)]) == 1
    assert _err(capsys) == "edgekit: error: choose devices with --device NAME, --group G or --all-devices"


def test_unknown_target_tag_is_a_failed_row(write_inventory: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"x": {"target": "raspberry-pi/4b-aarch65"}}})
    out_csv = tmp_path / "r.csv"
    assert main(["bench", "-i", str(inv), "--all-devices", "tinycnn", "--json",
                 "--csv", str(out_csv)]) == 1
    out = capsys.readouterr().out
    assert "unknown target 'raspberry-pi/4b-aarch65'" in out and '"stage": "target"' in out
    assert out_csv.exists() and not list(tmp_path.glob(".r.csv.*"))


def test_unresolvable_board_fails_fast_without_compiling(write_inventory: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"pi4": {"target": "raspberry-pi/4b-aarch64",
                                               "host": "pi4.invalid", "connect_timeout": 2}}})
    assert main(["deploy", "-i", str(inv), "-d", "pi4", "resnet18", "--json"]) == 1
    out = capsys.readouterr().out
    assert '"stage": "connect"' in out and "cannot resolve host pi4.invalid" in out
    assert '"compile_s": null' in out


def test_unreachable_deploy_is_one_red_line(write_inventory: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"pi4": {"target": "raspberry-pi/4b-aarch64",
                                               "host": "pi4.invalid"}}})
    assert main(["deploy", "-i", str(inv), "-d", "pi4", "resnet18"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("edgekit: error:")]
    assert errors == ["edgekit: error: pi4: cannot resolve host pi4.invalid (check the host in the "
                      "inventory, or use an IP address) (stage: connect)"]
