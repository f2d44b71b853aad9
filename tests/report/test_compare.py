"""The regression gate: exit codes on a synthetic slowdown, noise that is not a slowdown, a check
that got worse, and bad result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostkit.cli import main


def _record(device: str, p50: float, std: float = 0.1, n: int = 50, status: str = "ok",
            rel_err: float = 1e-6) -> dict[str, Any]:
    return {"device": device, "model": "resnet18", "status": status, "rel_err": rel_err,
            "error": None if status == "ok" else "outputs differ from PyTorch",
            "latency_ms": {"p50": p50, "p90": p50, "mean": p50, "std": std, "n": n}}


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write(tmp_path / "old.json", [_record("a", 10.0), _record("b", 10.0)])
    same = _write(tmp_path / "same.json", [_record("a", 10.4), _record("b", 9.0)])
    assert main(["compare", str(old), str(same)]) == 0
    assert "0 regressed of 2" in capsys.readouterr().out

    slow = _write(tmp_path / "slow.json", [_record("a", 12.0), _record("b", 10.0)])
    assert main(["compare", str(old), str(slow), "--json"]) == 1
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["a"]["slower"] and rows["a"]["regressed"] and rows["a"]["change"] == 0.2
    assert not rows["b"]["regressed"]
    assert main(["compare", str(old), str(slow), "--max-slowdown", "25"]) == 0
    capsys.readouterr()


def test_noise_is_not_a_slowdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write(tmp_path / "old.json", [_record("a", 10.0, std=8.0, n=4)])
    noisy = _write(tmp_path / "noisy.json", [_record("a", 13.0, std=8.0, n=4)])
    assert main(["compare", str(old), str(noisy), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["change"] == pytest.approx(0.3) and row["noise_ms"] > 3.0 and not row["slower"]


def test_a_check_that_got_worse_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write(tmp_path / "old.json", [_record("a", 10.0), _record("b", 10.0)])
    worse = _write(tmp_path / "worse.json", [_record("a", 10.0, status="failed"),
                                             _record("b", 10.0, rel_err=3e-3),
                                             _record("c", 5.0)])
    assert main(["compare", str(old), str(worse)]) == 1
    out = capsys.readouterr().out
    assert "was ok, now failed: outputs differ from PyTorch" in out
    assert "relative error 0.003 now above 0.0001" in out and "only in the new run" in out


def test_bad_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{not json", encoding="utf-8")
    assert main(["compare", str(junk), str(junk)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edgekit: error: {junk} is not a JSON file of edgekit results")
    assert len(err.splitlines()) == 1
    assert main(["compare", str(tmp_path / "none.json"), str(junk)]) == 1
    assert "no such results file" in capsys.readouterr().err
    other = _write(tmp_path / "other.json", [{"name": "x"}])  # type: ignore[list-item]
    assert main(["compare", str(other), str(other)]) == 1
    assert "holds no edgekit result records" in capsys.readouterr().err
