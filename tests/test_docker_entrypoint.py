"""docker/'s entrypoints run as separate hosts: a tracker on this host, a device daemon in its own
network namespace (the compose file's layout, without a Docker engine), deployed to via the tracker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.cli import main
from hostkit.net import port_open

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="network namespaces need root and iproute2"),
]

REPO = Path(__file__).resolve().parent.parent
NS, VETH_HOST, VETH_NS = "ek-dockt", "ek-dockt-h", "ek-dockt-b"
HOST_IP, DEVICE_IP = "169.254.43.1", "169.254.43.2"  # a link-local /30 of this test's own


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace() -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    _ip("netns", "add", NS)
    try:
        _ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
        _ip("link", "set", VETH_NS, "netns", NS)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST)
        _ip("link", "set", VETH_HOST, "up")
        _ip("-n", NS, "addr", "add", f"{DEVICE_IP}/30", "dev", VETH_NS)
        _ip("-n", NS, "link", "set", VETH_NS, "up")
        _ip("-n", NS, "link", "set", "lo", "up")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_device_entrypoint_registers_with_tracker_and_serves(namespace: str, tmp_path: Path,
                                                            write_inventory: Any,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    tracker_port = 19190
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    logs = open(tmp_path / "hosts.log", "wb")
    tracker = subprocess.Popen([str(REPO / "docker/device-entrypoint.sh"), "edgekit-device",
                                "tracker", "--listen", HOST_IP, "--port", str(tracker_port)],
                               env=env, stdout=logs, stderr=subprocess.STDOUT,
                               start_new_session=True)
    device = None
    try:
        deadline = time.monotonic() + 60
        while not port_open(HOST_IP, tracker_port, 0.5):
            assert time.monotonic() < deadline and tracker.poll() is None, "tracker did not start"
            time.sleep(0.2)
        device_env = {**env, "EDGEKIT_TRACKER": f"{HOST_IP}:{tracker_port}",
                      "EDGEKIT_KEY": "docker-cpu", "EDGEKIT_STORE": str(tmp_path / "store")}
        device = subprocess.Popen(["ip", "netns", "exec", namespace,
                                   str(REPO / "docker/device-entrypoint.sh")], env=device_env,
                                  stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
        inv = write_inventory({"devices": {"container": {
            "target": {"kind": "llvm"}, "transport": "tracker",
            "tracker": f"{HOST_IP}:{tracker_port}", "key": "docker-cpu"}}})
        deadline = time.monotonic() + 60
        while not (tmp_path / "hosts.log").read_text(errors="replace").count("registered"):
            assert time.monotonic() < deadline and device.poll() is None, \
                (tmp_path / "hosts.log").read_text(errors="replace")
            time.sleep(0.5)
        assert main(["deploy", "-i", str(inv), "-d", "container", "tinycnn", "--json",
                     "--repeat", "2"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["status"] == "ok" and result["max_abs_diff"] < 1e-4
        assert list((tmp_path / "store").glob(f"{result['artifact_sha256']}.*"))
        assert port_open(DEVICE_IP, 9090, 2), "the daemon serves on its own host's address"
    finally:
        if device is not None:
            _stop(device)
        _stop(tracker)
        logs.close()
