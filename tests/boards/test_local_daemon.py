"""The daemon edgekit starts for a `managed: local` device dies with edgekit, even a killed one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration

PARENT = """
from hostkit.boards.launch import LocalDaemon
from hostkit.inventory import Device
daemon = LocalDaemon(Device(name="local", target={"kind": "llvm"}, managed="local"))
host, port = daemon.start()
print(daemon.proc.pid, port, flush=True)
import time
time.sleep(600)
"""


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_local_daemon_exits_when_edgekit_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    daemon_pid = 0
    try:
        assert parent.stdout is not None
        daemon_pid, port = (int(x) for x in parent.stdout.readline().split())
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # serving while its parent lives
        time.sleep(1.5)
        assert psutil.pid_exists(daemon_pid), "the daemon stopped while edgekit was still running"
        parent.send_signal(signal.SIGKILL)  # no handler runs: only the daemon can notice
        parent.wait()
        assert _gone(daemon_pid, 10.0), "the local daemon outlived the edgekit that started it"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        parent.kill()
        if daemon_pid and psutil.pid_exists(daemon_pid):
            os.killpg(daemon_pid, signal.SIGKILL)
