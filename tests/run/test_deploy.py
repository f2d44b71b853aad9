"""Integration: real `edgekit-device` daemons on loopback, deploy and bench through the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from devicekit.info import compute_threads
from hostkit.cli import main

pytestmark = pytest.mark.integration


def _inventory(write_inventory: Any, daemon: Any, **more: Any) -> Path:
    devices = {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": daemon.port},
               **more}
    return write_inventory({"devices": devices})


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_deploy_tinycnn_then_cached(daemon: Any, write_inventory: Any,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon)
    # An input shape no other test uses, so this artifact is new to the session's caches.
    shape = ["--input-shape", "1,3,40,40"]
    assert main(["deploy", "-i", str(inv), "--device", "dev", "tinycnn", "--json",
                 "--repeat", "5", *shape]) == 0
    first = _json(capsys)
    assert first["status"] == "ok" and first["max_abs_diff"] < 1e-4 and first["top1_match"]
    assert first["cached"] is False and first["uploaded"] is True
    assert first["latency_ms"]["n"] == 5 and first["latency_ms"]["p50"] > 0
    assert first["device_info"]["tvm_version"]
    stored = list(daemon.store.glob(f"{first['artifact_sha256']}.so"))
    assert stored, "the artifact lands in the daemon's store under its hash"

    assert main(["deploy", "-i", str(inv), "--device", "dev", "tinycnn", "--json",
                 "--repeat", "3", *shape]) == 0
    second = _json(capsys)
    assert second["cached"] is True and second["compile_s"] == 0.0
    assert second["uploaded"] is False, "an unchanged artifact is not pushed again"
    assert second["artifact_sha256"] == first["artifact_sha256"]


def test_deploy_resnet18_matches_pytorch(daemon: Any, write_inventory: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon)
    assert main(["deploy", "-i", str(inv), "--device", "dev", "resnet18", "--json",
                 "--repeat", "2", "--warmup", "0"]) == 0
    result = _json(capsys)
    assert result["status"] == "ok", result["error"]
    assert result["max_abs_diff"] < 1e-4 and result["top1_match"] and result["top5_match"]
    for key in ("compile_s", "upload_s", "load_s", "first_inference_ms"):
        assert result[key] is not None and result[key] >= 0
    assert len(result["artifact_sha256"]) == 64


def test_weights_file_and_pt2_model(daemon: Any, write_inventory: Any, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from hostkit.models import ModelSpec, load_model

    inv = _inventory(write_inventory, daemon)
    model = load_model(ModelSpec("tinycnn", seed=7))
    weights = tmp_path / "w.pt"
    torch.save(model._module.state_dict(), weights)
    assert main(["deploy", "-i", str(inv), "-d", "dev", "tinycnn", "--weights", str(weights),
                 "--json", "--repeat", "2"]) == 0
    with_weights = _json(capsys)
    assert with_weights["status"] == "ok" and with_weights["cached"] is False

    program = tmp_path / "tiny.pt2"
    torch.export.save(model.exported(), str(program))
    assert main(["deploy", "-i", str(inv), "-d", "dev", str(program), "--json",
                 "--repeat", "2"]) == 0
    from_file = _json(capsys)
    assert from_file["status"] == "ok" and from_file["model"] == "tiny.pt2"
    assert from_file["max_abs_diff"] < 1e-4


def test_bench_unreachable_device_is_a_failed_row(daemon: Any, write_inventory: Any,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on loopback: nothing listens there.
    inv = _inventory(write_inventory, daemon,
                     gone={"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": 9,
                           "connect_timeout": 2})
    out_csv = tmp_path / "out" / "bench.csv"
    code = main(["bench", "-i", str(inv), "--all-devices", "tinycnn", "--json", "--repeat", "3",
                 "--csv", str(out_csv)])
    assert code == 1
    rows = {r["device"]: r for r in _json(capsys)}
    assert rows["dev"]["status"] == "ok"
    assert rows["gone"]["status"] == "failed" and rows["gone"]["stage"] == "connect"
    assert "connection refused at 127.0.0.1:9" in rows["gone"]["error"]
    assert "edgekit devices" in rows["gone"]["error"]
    with open(out_csv, encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["status"] for r in table] == ["ok", "failed"]


def test_bench_table_rendering(daemon: Any, write_inventory: Any,
                               capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, daemon)
    assert main(["bench", "-i", str(inv), "--device", "dev", "tinycnn", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert "edgekit bench" in out and "tinycnn" in out and "1 ok, 0 failed" in out


def test_embedded_local_daemon_started_and_stopped(write_inventory: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 is closed, so edgekit must start its own daemon and stop it afterwards.
    inv = write_inventory({"devices": {"local": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                 "port": 9, "managed": "local"}}})
    before = _daemons()
    assert main(["deploy", "-i", str(inv), "-d", "local", "tinycnn", "--json",
                 "--repeat", "2"]) == 0
    assert _json(capsys)["status"] == "ok"
    deadline = time.monotonic() + 10
    while _daemons() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _daemons() - before, "the embedded daemon and its TVM worker are gone"


def _daemons() -> set[int]:
    """Daemons and TVM workers descending from this test process (others may run beside it)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if proc.status() != psutil.STATUS_ZOMBIE and (
                    "devicekit serve" in cmd or "tvm.exec.popen_worker" in cmd):
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def test_tracker_transport(tmp_path: Path, write_inventory: Any,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import Daemon

    tracker_port = _free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "devicekit", "tracker", "--port",
                                str(tracker_port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    daemon = None
    try:
        _wait_port(tracker_port)
        daemon = Daemon(tmp_path, ["--tracker", f"127.0.0.1:{tracker_port}", "--key", "box"])
        inv = write_inventory({"devices": {"box": {
            "target": {"kind": "llvm"}, "transport": "tracker",
            "tracker": f"127.0.0.1:{tracker_port}", "key": "box"}}})
        time.sleep(1.0)  # the daemon registers with the tracker right after binding
        assert main(["deploy", "-i", str(inv), "-d", "box", "tinycnn", "--json",
                     "--repeat", "2"]) == 0
        assert _json(capsys)["status"] == "ok"
    finally:
        if daemon:
            daemon.stop()
        tracker.terminate()
        tracker.wait(10)


def test_daemon_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    from conftest import Daemon

    d = Daemon(tmp_path)
    worker_pids = {c.pid for c in psutil.Process(d.proc.pid).children(recursive=True)}
    assert worker_pids, "TVM's server worker runs under the daemon"
    assert d.stop() == 0
    assert "stopped" in d.logs()
    time.sleep(1.0)
    assert not [p for p in worker_pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_daemon_killed_hard_leaves_no_worker(tmp_path: Path) -> None:
    import os
    import signal

    from conftest import Daemon

    d = Daemon(tmp_path)
    workers = [c.pid for c in psutil.Process(d.proc.pid).children(recursive=True)]
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers), "the watchdog ends TVM's worker when the daemon dies"
    d.log.close()


def test_devices_lists_reachability(daemon: Any, write_inventory: Any,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {
        "dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": daemon.port},
        "gone": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": 9},
        "nowhere": {"target": {"kind": "llvm"}, "host": "no-such-board.invalid"},
        "emb": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": 9, "managed": "local"},
    }})
    # Exit 1: two devices do not answer, and the one line on stderr names them.
    assert main(["devices", "-i", str(inv), "--json"]) == 1
    captured = capsys.readouterr()
    rows = {r["device"]: r for r in json.loads(captured.out)}
    assert captured.err.strip() == ("edgekit: error: 2 of 4 devices did not answer as they "
                                    "should (unreachable, silent or another TVM): gone, nowhere")
    assert rows["dev"]["status"] == "reachable" and rows["dev"]["info"]["cores"] >= 1
    # kernels run on every physical core (TVM's own default on x86 is half the CPUs)
    assert rows["dev"]["info"]["tvm_threads"] == int(os.environ.get("TVM_NUM_THREADS")
                                                     or compute_threads())
    assert rows["gone"]["status"] == "unreachable"
    assert rows["gone"]["reports"].startswith("connection refused at 127.0.0.1:9")
    assert "cannot resolve host no-such-board.invalid" in rows["nowhere"]["reports"]
    assert rows["emb"]["status"] == "on demand"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    from hostkit.net import port_open

    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", port, 0.5):
        assert time.monotonic() < deadline, "tracker did not start"
        time.sleep(0.2)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to be pinned to")
def test_a_build_leaves_the_process_on_every_core(daemon: Any, write_inventory: Any) -> None:
    """TVM's thread pool, started in the host by a build, pinned the host's thread to one core,
    and a local daemon started after it ran every engine on that core (2x slower). Run in a
    fresh process: this one's TVM pool may have started long before."""
    inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"},
                                               "host": "127.0.0.1", "port": daemon.port}}})
    code = ("import json, os\n"
            "from hostkit.inventory import load_inventory\n"
            "from hostkit.models import ModelSpec\n"
            "from hostkit.run.deploy import RunOptions, run_on_device\n"
            "before = sorted(os.sched_getaffinity(0))\n"
            f"device = load_inventory({str(inv)!r}).get('dev')\n"
            "(row,) = run_on_device(device, [ModelSpec('tinycnn')], RunOptions(repeat=2))\n"
            "print(json.dumps([before, sorted(os.sched_getaffinity(0)), row.status]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    before, after, status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status == "ok", out.stderr[-2000:]
    assert after == before
