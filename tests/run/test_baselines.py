"""Integration: baseline engines on real loopback daemons, beside TVM (issue 13).

A daemon "without onnxruntime" is a real daemon whose Python cannot import it: a folder put first
on its PYTHONPATH holds an `onnxruntime` package that raises as a missing module does (the n/a
case) or as an installed but broken build does (a missing shared library: the failed-cell case).
Everything else is the real engine, run on the daemon and timed there.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.cli import main

pytestmark = pytest.mark.integration

NOT_INSTALLED = ('raise ModuleNotFoundError("No module named \'onnxruntime\'", '
                 'name="onnxruntime")\n')
BROKEN = ('raise ImportError("libonnxruntime.so.1.32.0: cannot open shared object file: No such '
          'file or directory")\n')


def _inventory(write_inventory: Any, port: int) -> Path:
    return write_inventory({"devices": {"dev": {"target": {"kind": "llvm"},
                                                "host": "127.0.0.1", "port": port}}})


def _shim_daemon(tmp_path: Path, body: str) -> Any:
    """A real daemon whose `import onnxruntime` runs `body` first (a shim on its PYTHONPATH)."""
    from conftest import Daemon

    shim = tmp_path / "shim" / "onnxruntime"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(body, encoding="utf-8")
    path = os.pathsep.join([str(shim.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return Daemon(tmp_path, env={"PYTHONPATH": path})


@pytest.fixture
def daemon_without_ort(tmp_path: Path) -> Iterator[Any]:
    d = _shim_daemon(tmp_path, NOT_INSTALLED)
    yield d
    d.stop()


@pytest.fixture
def daemon_with_broken_ort(tmp_path: Path) -> Iterator[Any]:
    d = _shim_daemon(tmp_path, BROKEN)
    yield d
    d.stop()


def test_resnet18_in_tvm_torch_and_onnxruntime_on_the_device(
        daemon: Any, write_inventory: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon.port)
    out_csv = tmp_path / "bench.csv"
    assert main(["bench", "-i", str(inv), "--device", "dev", "resnet18", "--baselines",
                 "torch,onnxruntime", "--repeat", "2", "--warmup", "0", "--json",
                 "--csv", str(out_csv)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok", row["error"]
    assert row["rel_err"] <= 1e-4
    engines = {b["engine"]: b for b in row["baselines"]}
    assert list(engines) == ["torch", "onnxruntime"]
    tvm_p50 = row["latency_ms"]["p50"]
    for engine, b in engines.items():
        assert b["status"] == "ok", b["reason"]
        assert b["rel_err"] <= 1e-4, f"{engine} differs from the host's PyTorch"
        assert b["latency_ms"]["n"] == 2 and b["latency_ms"]["p50"] > 0
        assert b["tvm_ratio"] == pytest.approx(tvm_p50 / b["latency_ms"]["p50"])
        assert b["version"] and b["threads"] >= 1 and b["emulated"] is False
    p50s = {"tvm": tvm_p50, **{e: b["latency_ms"]["p50"] for e, b in engines.items()}}
    assert row["fastest"] == min(p50s, key=lambda e: p50s[e])
    # The model files landed in the daemon's store, so a second run sends nothing new.
    assert len(list((daemon.store / "baselines").glob("*.pt2"))) >= 1
    assert len(list((daemon.store / "baselines").glob("*.onnx"))) >= 1
    with open(out_csv, encoding="utf-8") as handle:
        (line,) = list(csv.DictReader(handle))
    assert line["torch_status"] == "ok" and line["onnxruntime_status"] == "ok"
    assert float(line["torch_tvm_ratio"]) == pytest.approx(engines["torch"]["tvm_ratio"])
    assert line["fastest"] == row["fastest"]


def test_a_device_without_onnxruntime_shows_n_a(daemon_without_ort: Any, write_inventory: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon_without_ort.port)
    assert main(["bench", "-i", str(inv), "--device", "dev", "tinycnn", "--baselines",
                 "torch,onnxruntime", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert "n/a (not installed)" in out, out
    assert "engines on each device" in out and "x torch" in out
    assert main(["deploy", "-i", str(inv), "--device", "dev", "tinycnn", "--baselines",
                 "onnxruntime", "--json", "--repeat", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    (ort,) = record["baselines"]
    assert record["status"] == "ok"
    assert (ort["status"], ort["reason"], ort["tvm_ratio"]) == ("n/a", "not installed", None)
    assert record["fastest"] == "tvm", "with no baseline measured, TVM is the only engine"


def test_a_broken_engine_fails_only_its_own_cell(daemon_with_broken_ort: Any,
                                                 write_inventory: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon_with_broken_ort.port)
    assert main(["bench", "-i", str(inv), "--device", "dev", "tinycnn", "--baselines",
                 "torch,onnxruntime", "--repeat", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and row["error"] is None
    torch_run, ort = row["baselines"]
    assert torch_run["status"] == "ok" and torch_run["rel_err"] <= 1e-4
    assert ort["status"] == "failed" and ort["tvm_ratio"] is None
    assert "importing onnxruntime failed" in ort["reason"]
    assert "cannot open shared object file" in ort["reason"]


def test_unknown_engine_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "local", "tinycnn", "--baselines", "torch,tflite"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown baseline engine 'tflite': choose from torch, onnxruntime" in err
