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


@pytest.mark.parametrize("command", ["deploy", "bench", "tune"])
def test_unknown_model_refused_before_any_daemon_starts(
        command: str, write_inventory: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import hostkit.run.deploy
    import hostkit.run.tune

    def started(*_: Any, **__: Any) -> None:
        raise AssertionError("a daemon was started for a model that does not exist")

    monkeypatch.setattr(hostkit.run.deploy, "run_fleet", started)
    monkeypatch.setattr(hostkit.run.tune, "tune_on_device", started)
    inv = write_inventory({"devices": {"local": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                 "port": 9, "managed": "local"}}})
    assert main([command, "-i", str(inv), "--device", "local", "resnet181", "--json"]) == 1
    assert _err(capsys) == ("edgekit: error: unknown model 'resnet181': did you mean resnet18, "
                            "resnet101, resnet152? give a torchvision classification model name or "
                            "a path to a .pt2 file (`edgekit models` lists the names)")


def test_missing_model_and_weights_files(write_inventory: Any, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"x": {"target": {"kind": "llvm"}}}})
    assert main(["deploy", "-i", str(inv), "-d", "x", str(tmp_path / "net.pt2")]) == 1
    assert _err(capsys) == f"edgekit: error: model file {tmp_path / 'net.pt2'} not found"
    assert main(["deploy", "-i", str(inv), "-d", "x", "tinycnn", "--weights",
                 str(tmp_path / "w.pth")]) == 1
    assert _err(capsys) == f"edgekit: error: weights file {tmp_path / 'w.pth'} not found"


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
    assert _err(capsys) == ("edgekit: error: choose devices with --device NAME, --group G, "
                            "--all-devices or --rerun-failed RESULTS")


@pytest.mark.parametrize(("target", "problem"), [
    ("raspberry-pi/9", "unknown target tag 'raspberry-pi/9'; did you mean "
                       "'raspberry-pi/4b-aarch64'? use a TVM tag (tvm.target.list_tags()) or a "
                       "dict such as {kind: llvm}"),
    ({"kind": "nosuchkind"}, "unknown target kind 'nosuchkind'; known kinds: "),
    ({"kind": "llvm", "mcpu": 5}, """target {"kind": "llvm", "mcpu": 5} is rejected by TVM: Option"""
                                  """ 'mcpu': expected type 'str' but got 'int'"""),
])
@pytest.mark.parametrize("argv", [["devices"], ["bench", "--all-devices", "tinycnn", "--csv"],
                                  ["deploy", "-d", "ok", "tinycnn"]])
def test_what_deploy_refuses_every_command_refuses(
        write_inventory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        target: Any, problem: str, argv: list[str]) -> None:
    """The inventory is checked whole at load: one bad target refuses it for every command."""
    inv = write_inventory({"groups": {"arm": {"target": target}},
                           "devices": {"ok": {"target": {"kind": "llvm"}},
                                       "pi4": {"groups": ["arm"]}}})
    out_csv = tmp_path / "r.csv"
    argv = [*argv, str(out_csv)] if argv[-1] == "--csv" else argv
    assert main([argv[0], "-i", str(inv), *argv[1:]]) == 1
    assert _err(capsys).startswith(f"edgekit: error: {inv}: groups.arm.target: {problem}")
    assert not list(tmp_path.glob("*r.csv*")), "nothing half-written"


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


def test_unexpected_error_is_one_line_and_the_tracebacks_go_to_the_debug_log(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import logging
    import sys
    import warnings

    import hostkit.cli

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))

    def broken(args: Any) -> int:
        try:
            {}["missing"]
        except KeyError:  # what run_fleet does with an unmapped failure: log it, report a row
            logging.getLogger("edgekit").exception("unexpected error on %s", "dev")
        library = logging.getLogger("a-library")  # its own handler, as torch's logging has
        handler = logging.StreamHandler(sys.stderr)
        library.addHandler(handler)
        monkeypatch.setattr(library, "propagate", False)
        library.warning("Traceback (most recent call last):\n  a library's own")
        library.removeHandler(handler)
        warnings.warn("a library warning")
        print("a library writing to stderr", file=sys.stderr)
        print("edgekit: note: printed to sys.stderr by edgekit code", file=sys.stderr)
        raise RuntimeError("first\nline two")

    monkeypatch.setitem(hostkit.cli.COMMANDS, "models", broken)
    assert main(["models"]) == 1
    log = tmp_path / "logs" / "debug.log"
    assert capsys.readouterr().err == ("edgekit: note: printed to sys.stderr by edgekit code\n"
                                       f"edgekit: unexpected error: RuntimeError: line two "
                                       f"(traceback in {log}; please report it)\n")
    text = log.read_text()
    for needle in ("KeyError: 'missing'", "a library's own", "a library warning",
                   "a library writing to stderr", "RuntimeError: first"):
        assert needle in text
