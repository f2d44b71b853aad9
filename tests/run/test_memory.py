"""Memory on the device: what a deploy reports, and a model refused because the board (here a
daemon in a memory cgroup, as in a container) has no room for it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.cli import main

pytestmark = pytest.mark.integration

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _inventory(write_inventory: Any, port: int) -> Path:
    return write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                "port": port}}})


def test_deploy_reports_memory(daemon: Any, write_inventory: Any,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import torchvision

    inv = _inventory(write_inventory, daemon.port)
    assert main(["deploy", "-i", str(inv), "-d", "dev", "resnet18", "--json", "--repeat", "2",
                 "--warmup", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok", result["error"]
    weights = sum(p.numel() for p in torchvision.models.resnet18().parameters()) * 4 / 1e6
    memory = result["memory"]
    assert abs(memory["params_mb"] - weights) / weights < 0.05, (memory, weights)
    assert memory["artifact_mb"] > 0.9 * weights, "the library carries the weights"
    assert result["device_info"]["memory_available_bytes"] > 0
    # The session loaded ~47 MB of weights into tensors and ran: its peak is above idle by at
    # least that, and by far less than the machine.
    assert weights * 0.9 < result["memory_mb"] < 4000
    assert memory["peak_rss_mb"] >= memory["idle_rss_mb"]
    # TVM's static plan for ResNet-18's activations at 224x224: a few MB, far below the weights.
    assert 1.0 < memory["workspace_mb"] < 40.0, memory


@pytest.fixture
def small_daemon(tmp_path: Path) -> Iterator[Any]:
    """A daemon whose memory cgroup leaves it 64 MB, like a small board or a tight container."""
    from conftest import Daemon

    if not (CGROUP_V1 / "cgroup.procs").exists() or os.geteuid() != 0:
        pytest.skip("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = CGROUP_V1 / f"edgekit-test-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(64 << 20))
    daemon = Daemon(tmp_path)
    try:
        import psutil

        # TVM's server already forked its worker: the whole process tree moves into the group.
        root = psutil.Process(daemon.proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            (group / "cgroup.procs").write_text(str(proc.pid))
        yield daemon
    finally:
        daemon.stop()
        for pid in (group / "cgroup.procs").read_text().split():
            (CGROUP_V1 / "cgroup.procs").write_text(pid)
        group.rmdir()


def test_model_larger_than_the_device_is_refused_before_upload(
        small_daemon: Any, write_inventory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    inv = _inventory(write_inventory, small_daemon.port)
    assert main(["deploy", "-i", str(inv), "-d", "dev", "resnet18", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "memory" and result["uploaded"] is None
    # the library holds the weights as its kernels read them: Winograd's transformed weights
    # are larger than the model's (60 MB against 47 since the tenth session)
    need = re.match(r"resnet18 needs about (\d+) MB on the device \(library (\d+) MB "
                    r"\+ weights 47 MB \+ workspace 7 MB\) but it has ", result["error"])
    assert need, result["error"]
    assert abs(int(need[1]) - (int(need[2]) + 47 + 7)) <= 1 and int(need[2]) >= 40
    available = result["device_info"]["memory_available_bytes"]
    assert available <= 64 << 20 and f"{available / 1e6:.0f} MB available" in result["error"]
    assert not list(small_daemon.store.glob("*.so")), "nothing was sent"
